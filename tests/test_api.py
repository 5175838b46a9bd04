"""The Python API, ``python -m hil``, logging, ``--json`` and the metrics viewers."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hil.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "3", "--set", "model.n_hidden=4", "--set", "model.n_layers=2",
        "--set", "train.batch_size=400", "--seeds", "0-1", "--no-progress"]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_readme_python_snippet_runs(runs_dir, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    section = text.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(ROOT)  # the snippet names lab_configs/ relative to the checkout
    exec(compile(code, "README.md: From Python", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.splitlines()
    assert str(runs_dir) in out[0]  # the run folder, under $HIL_RUNS
    assert len(out) == 5 and "model.tau_ns" in out[1] and "KEITHLEY" in out[4].upper()
    acc, device_s = map(float, out[3].split())
    assert 0 < acc <= 1 and 0 < device_s <= 1.0 + 0.05  # the budget, within one batch
    kinds = sorted("-".join(p.name.split("-")[2:-1]) for p in runs_dir.iterdir())
    assert kinds == ["train", "train-in-the-loop", "tune", "upload"]


def test_import_hil_is_cheap_and_exposes_the_api():
    r = _python("import sys, hil; assert 'torch' not in sys.modules, 'torch'; "
                "assert 'matplotlib' not in sys.modules, 'matplotlib'; "
                "print(sorted(n for n in hil.__all__ if not n.startswith('_')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['load_config', 'open_lab', 'train', 'train_in_the_loop', 'tune', 'upload']"
    # the library's modules do not shadow the API's functions, whoever is imported first
    r = _python("import hil.training.train, hil.training.tune\nimport hil\n"
                "from hil.training import tune\n"
                "assert hil.train.__module__ == 'hil.api' and hil.tune.__module__ == 'hil.api'\n"
                "print(hil.training.train.Trainer.__name__, len(tune.SEARCH_SPACE),"
                " hil.load_config.__module__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Trainer", "8", "hil.api"]


def test_python_m_hil():
    r = subprocess.run([sys.executable, "-m", "hil", "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "usage: hil" in r.stdout and "tune" in r.stdout


def test_plotting_never_switches_the_matplotlib_backend(tmp_path):
    """A notebook's backend stays as it is: importing hil's plotting modules and drawing with
    them neither switches it nor touches pyplot."""
    r = _python(f"""
import sys, matplotlib
matplotlib.use("pdf")
import hil.network.analysis, hil.conv.report, hil.conv.hybrid, hil.chip.study, hil.training.tune
from hil import plots
hist = [{{"epoch": e, "seed": s, "train_accuracy": 0.1 * e, "test_accuracy": 0.1 * e}}
        for s in (0, 1) for e in range(3)]
plots.accuracy_curves(hist, "accuracy", {str(tmp_path / 'acc.png')!r})
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["pdf", "False"]
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"


def test_json_output_and_human_text(runs_dir, capsys):
    assert main(["train", *TINY, "--json"]) == 0
    cap = capsys.readouterr()
    result = json.loads(cap.out)  # stdout holds the one JSON object and nothing else
    assert result["command"] == "train" and result["exit_code"] == 0
    folder = Path(result["run_folder"])
    assert folder.parent == runs_dir
    assert result["summary"] == json.loads((folder / "summary.json").read_text())
    assert "test accuracy over 2 seed(s)" in cap.err
    # an error is in the JSON object too, and the exit code
    assert main(["tune", "--report", "x", "--json"]) == 2
    result = json.loads(capsys.readouterr().out)
    assert result["exit_code"] == 2 and "--storage" in result["error"]


def test_driver_traffic_goes_to_the_run_log_and_with_v_to_the_terminal(tmp_path, capsys, mocker):
    """Every exchange the VISA transport carries is in the run folder's hil.log (a spy on the
    transport says what was sent); with -v the terminal shows it too."""
    import hil
    from drivers.base import VisaTransport
    from hil.logs import cli_session
    from hil.runs import RunFolder

    writes = mocker.spy(VisaTransport, "write")
    queries = mocker.spy(VisaTransport, "query")
    with cli_session(logging.WARNING) as folders:
        folder = RunFolder.create("lab", tmp_path)
        with hil.open_lab(ROOT / "lab_configs" / "sim.yaml", roles=["voltmeter"]) as lab:
            assert lab["voltmeter"].identity
    assert folders == [folder]
    sent = [c.args[1] for c in writes.call_args_list + queries.call_args_list]
    assert queries.call_count >= 1 and any("IDN" in c for c in sent)
    log = (folder.path / "hil.log").read_text()
    for command in sent:
        assert f"<- {command}" in log, command
    assert "<-" not in capsys.readouterr().err  # not on the terminal without -v
    # -v: the traffic on the terminal; nothing of the session is left installed afterwards
    n_handlers = len(logging.getLogger().handlers)
    queries.reset_mock()
    assert main(["lab", "check", str(ROOT / "lab_configs" / "sim.yaml"), "-v"]) == 0
    err = capsys.readouterr().err
    assert queries.call_count >= 1
    for c in queries.call_args_list:
        assert re.search(rf"DEBUG drivers\.\S+: \S+ <- {re.escape(c.args[1])}", err), c.args[1]
    assert len(logging.getLogger().handlers) == n_handlers
    assert logging.getLogger("drivers").level == logging.NOTSET


def test_tensorboard_event_files_hold_one_scalar_per_epoch(runs_dir, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["train", *TINY, "--log", "tensorboard"]) == 0
    folder = next(runs_dir.iterdir())
    acc = EventAccumulator(str(folder / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train_loss/seed_0", "test_accuracy/seed_1", "lr/seed_0"} <= set(tags)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for seed in (0, 1):
        events = acc.Scalars(f"test_accuracy/seed_{seed}")
        assert [e.step for e in events] == [0, 1, 2]
        expected = [r["test_accuracy"] for r in records if r["seed"] == seed]
        assert [e.value for e in events] == pytest.approx(expected, rel=1e-6)


def test_missing_viewer_or_lab_driver_is_one_line_naming_the_extra(runs_dir, monkeypatch, capsys,
                                                                   tmp_path):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(["train", *TINY, "--log", "tensorboard"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'hil[tensorboard]'" in err
    assert not runs_dir.exists()
    # a bench on the pyvisa-py backend without pyvisa-py installed
    import hil

    monkeypatch.setitem(sys.modules, "pyvisa_py", None)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text("visa_backend: '@py'\ninstruments:\n  nvm:\n    driver: keithley_2182a\n"
                   "    address: GPIB0::7::INSTR\n  smb:\n    driver: rs_smb100a\n"
                   "    address: GPIB0::28::INSTR\n"
                   "roles:\n  voltmeter: nvm\n  rf_source: smb\n")
    from hil.errors import HilError

    with pytest.raises(HilError) as err_info:
        hil.open_lab(cfg)
    assert "pip install 'hil[lab]'" in str(err_info.value)
