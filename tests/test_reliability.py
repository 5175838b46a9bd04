"""Reliable runs (issue 18): safe checkpoint loads, redacted secrets, atomic result files, run
status and ``hil runs``, and one clean line (exit code 2, no run folder) for every bad input."""

from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

import hil.runs as runs
from hil.cli import main
from hil.errors import HilError
from hil.runs import RunFolder

TINY = ["--epochs", "1", "--seeds", "0", "--set", "model.n_hidden=4", "--set", "model.n_layers=1",
        "--set", "train.batch_size=400", "--no-progress"]


def _folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _one_clean_line(err: str) -> str:
    """The error output is one ``hil ...: error: ...`` line, without a traceback."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny trained run folder shared by the checkpoint tests (read-only for them)."""
    root = tmp_path_factory.mktemp("trained")
    assert main(["train", "--task", "digits", *TINY, "--runs-dir", str(root)]) == 0
    return _folders(root)[0]


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- 1. checkpoints

def test_checkpoint_holds_only_tensors_and_plain_data(trained):
    ckpt = torch.load(trained / "model.pt", weights_only=True)  # raises if it needed pickling

    def plain(obj):
        if isinstance(obj, dict):
            return all(isinstance(k, str) and plain(v) for k, v in obj.items())
        if isinstance(obj, list):
            return all(plain(v) for v in obj)
        return obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor))

    assert plain(ckpt)
    assert ckpt["seeds"] == [0] and isinstance(ckpt["input_centre"], float)


@pytest.mark.parametrize("argv", [
    ["analyse", "{run}"], ["design", "--run", "{run}"],
    ["upload", "{run}", "--backend", "model", "--no-budget"],
    ["train", "--task", "digits", *TINY, "--backend", "model", "--in-the-loop", "--twin", "nominal",
     "--init", "{run}"]])
def test_every_checkpoint_load_is_weights_only(trained, tmp_path, runs_dir, mocker, argv):
    run = _copy_run(trained, tmp_path / "run")
    spy = mocker.spy(torch, "load")
    assert main([a.replace("{run}", str(run)) for a in argv]) == 0
    assert spy.call_count >= 1
    assert all(c.kwargs.get("weights_only") is True for c in spy.call_args_list)


class _Payload:
    """Unpickling this would create the marker file: code run by a crafted checkpoint."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("argv", [["analyse", "{run}"], ["upload", "{run}"], ["design", "--run", "{run}"],
                                  ["train", "--backend", "sim", "--in-the-loop", "--init", "{run}", *TINY]])
def test_crafted_checkpoint_runs_no_code(trained, tmp_path, runs_dir, capsys, argv):
    run = _copy_run(trained, tmp_path / "run")
    payload = _Payload()
    payload.marker = tmp_path / "pwned"
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["extra"] = payload
    torch.save(ckpt, run / "model.pt")
    assert main([a.replace("{run}", str(run)) for a in argv]) == 2
    line = _one_clean_line(capsys.readouterr().err)
    assert str(run / "model.pt") in line and "refused" in line
    assert not payload.marker.exists()
    assert _folders(runs_dir) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_one_line(trained, tmp_path, capsys, damage):
    run = _copy_run(trained, tmp_path / "run")
    raw = (run / "model.pt").read_bytes()
    (run / "model.pt").write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"\x00\xffnot a zip" * 50,
                                    "empty": b""}[damage])
    assert main(["analyse", str(run)]) == 2
    line = _one_clean_line(capsys.readouterr().err)
    assert str(run / "model.pt") in line and "not a readable checkpoint" in line


def test_conv_model_loads_weights_only_and_corrupt_is_hil_error(tmp_path):
    from hil.conv.network import ConvNet, load_model, save_model

    save_model(tmp_path / "m.pt", ConvNet(8), {"dataset": "digits"})
    model, meta = load_model(tmp_path / "m.pt")
    assert meta == {"dataset": "digits"}
    (tmp_path / "m.pt").write_bytes(b"junk")
    with pytest.raises(HilError, match="m.pt: not a readable checkpoint"):
        load_model(tmp_path / "m.pt")


# ----------------------------------------------------------------------------- 2. secrets

@pytest.mark.parametrize("text, expected", [
    ("postgresql://user:password@host/db", "postgresql://user:***@host/db"),
    ("postgresql+psycopg://u:p@ss:w@rd@h:5432/db?x=1", "postgresql+psycopg://u:***@h:5432/db?x=1"),
    ("--storage=mysql://root:hunter2@10.0.0.1/s and sqlite:///a.db",
     "--storage=mysql://root:***@10.0.0.1/s and sqlite:///a.db"),
    ('{"url": "redis://:tok@h/0"}', '{"url": "redis://:***@h/0"}'),
    ("postgresql://host/db?password=s3cret&sslmode=require", "postgresql://host/db?password=***&sslmode=require"),
    ("postgresql://user@host/db", "postgresql://user@host/db"),
    ("journal:/shared/study.log", "journal:/shared/study.log"),
    ("https://example.org/a:b", "https://example.org/a:b"),
])
def test_redact_secrets(text, expected):
    assert runs.redact_secrets(text) == expected
    from hil.training.tune import redact

    assert redact(text) == expected  # the tune module uses the same helper


def test_secret_never_reaches_files_or_terminal(tmp_path, monkeypatch, capsys):
    from hil.logs import cli_session

    url = "postgresql://lab:s3cret@127.0.0.1:1/studies"
    monkeypatch.setattr(sys, "argv", ["hil", "tune", "--storage", url])
    with cli_session(logging.DEBUG):
        folder = RunFolder.create("tune", tmp_path)
        folder.write_config({"storage": url})
        folder.write_json("tune_summary.json", {"storage": url, "note": f"opened {url}"})
        folder.append_metrics({"storage": url})
        folder.write_text("notes.md", f"study in {url}\n")
        logging.getLogger("hil.training.tune").warning("cannot open %s", url)
        folder.set_status("failed", f"cannot open {url}")
    err = capsys.readouterr().err
    assert "s3cret" not in err and "lab:***@" in err
    for p in folder.path.iterdir():
        text = p.read_text()
        assert "s3cret" not in text, p.name
    assert "lab:***@127.0.0.1" in (folder.path / "environment.json").read_text()
    assert "lab:***@" in (folder.path / "hil.log").read_text()


def test_tune_storage_password_not_printed(runs_dir, capsys):
    """A database that cannot be reached: the message names it without the password, and the
    run folder made for the search is removed (nothing was searched)."""
    rc = main(["tune", *TINY, "--n-trials", "1", "--storage", "postgresql://lab:s3cret@127.0.0.1:1/db"])
    out = capsys.readouterr()
    assert rc == 2
    assert "s3cret" not in out.out + out.err
    assert "lab:***@127.0.0.1" in _one_clean_line(out.err)
    assert _folders(runs_dir) == []


# ----------------------------------------------------------------------------- 4. atomic writes

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_previous_file(tmp_path, mocker):
    folder = RunFolder(tmp_path / "run")
    folder.write_json("summary.json", {"ok": 1})
    folder.write_config({"model": {"S": 0.5}})
    mocker.patch("hil.runs.os.fsync", side_effect=_enospc)
    with pytest.raises(HilError, match=r"cannot write .*summary.json: No space left on device .*previous"):
        folder.write_json("summary.json", {"ok": 2})
    with pytest.raises(HilError, match="config.yaml: No space left"):
        folder.write_config({"model": {"S": 0.9}})
    assert json.loads(folder.file("summary.json").read_text()) == {"ok": 1}
    assert "0.5" in folder.file("config.yaml").read_text()
    assert sorted(p.name for p in folder.path.iterdir()) == ["config.yaml", "summary.json"]  # no temp files


def test_model_pt_is_never_truncated(trained, tmp_path, mocker):
    from hil.training.checkpoints import load_run, save_checkpoint
    from hil.training.train import TrainResult

    run = _copy_run(trained, tmp_path / "run")
    before = (run / "model.pt").read_bytes()
    cfg, _, net = load_run(run)
    real_save = torch.save

    def half_then_full_disk(obj, f, *a, **k):  # writes part of the file, then the disk is full
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        _enospc()

    mocker.patch("hil.training.checkpoints.torch.save", side_effect=half_then_full_disk)
    with pytest.raises(HilError, match="model.pt: No space left on device"):
        save_checkpoint(TrainResult(net, [], [], [], 0.0), cfg, run / "model.pt")
    assert (run / "model.pt").read_bytes() == before
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []


def test_full_disk_during_training_fails_cleanly(runs_dir, capsys, mocker):
    mocker.patch("hil.training.checkpoints.torch.save", side_effect=_enospc)
    assert main(["train", "--task", "digits", *TINY]) == 2
    line = _one_clean_line(capsys.readouterr().err)
    assert "checkpoint.pt: No space left on device" in line  # the first file torch writes: epoch 0's
    folder, = _folders(runs_dir)
    st = runs.read_status(folder)
    assert st["status"] == "failed" and "No space left" in st["reason"]
    assert not (folder / "model.pt").exists() and not (folder / "checkpoint.pt").exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp files


def test_figures_and_text_are_written_atomically(tmp_path, mocker):
    from hil.plots import plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    runs.save_figure(fig, tmp_path / "a.png", dpi=50)
    good = (tmp_path / "a.png").read_bytes()
    assert good.startswith(b"\x89PNG")
    mocker.patch("hil.runs.os.replace", side_effect=_enospc)
    with pytest.raises(HilError, match="a.png"):
        runs.save_figure(fig, tmp_path / "a.png", dpi=80)
    with pytest.raises(HilError, match="t.csv"):
        runs.atomic_write(tmp_path / "t.csv", "a,b\n")
    plt.close(fig)
    assert (tmp_path / "a.png").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_metrics_lines_are_valid_json_with_null_for_non_finite(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.append_metrics({"epoch": 0, "train_loss": float("nan"), "val": float("inf"), "ok": 0.5})

    def no_constants(name):
        raise AssertionError(f"bare {name} in metrics.jsonl")

    rec = json.loads(folder.file("metrics.jsonl").read_text(), parse_constant=no_constants)
    assert rec == {"epoch": 0, "train_loss": None, "val": None, "ok": 0.5}


#: a digits run whose only seed diverges in its first epoch (no rollback allowed)
DIVERGING = ["train", "--task", "digits", "--epochs", "1", "--set", "model.S_in=500",
             "--set", "model.substeps=1", "--set", "model.integrator=euler",
             "--set", "train.max_rollbacks=0", "--set", "model.n_hidden=4",
             "--set", "model.n_layers=1", "--set", "train.batch_size=400", "--seeds", "0",
             "--no-progress"]


def test_diverged_epoch_is_null_not_zero(runs_dir, capsys):
    """A seed that diverges: its epoch's train_loss is null (not 0.0), and every line parses."""
    rc = main(DIVERGING)
    assert rc == 1
    folder, = _folders(runs_dir)

    def no_constants(name):
        raise AssertionError(f"bare {name}")

    recs = [json.loads(ln, parse_constant=no_constants)
            for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    assert recs and recs[0]["status"] == "failed"
    assert recs[0]["train_loss"] is None


# ----------------------------------------------------------------------------- 5. status, hil runs

def test_status_complete_and_hil_runs_table(runs_dir, capsys):
    assert main(["train", "--task", "digits", *TINY]) == 0
    folder, = _folders(runs_dir)
    st = runs.read_status(folder)
    assert st["status"] == "complete" and st["kind"] == "train"
    assert st["started"] <= st["finished"] and "pid" not in st
    (runs_dir / "not-a-run").mkdir()
    old = runs_dir / "20250101-120000-tune-digits"  # a folder from before status.json
    old.mkdir()
    (old / "environment.json").write_text(json.dumps({"created": "2025-01-01T12:00:00"}))
    capsys.readouterr()
    assert main(["runs", str(runs_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["date", "kind", "status", "task", "result", "folder"]
    row = next(ln for ln in out if folder.name in ln)
    assert "train" in row and "complete" in row and "digits" in row and "accuracy median" in row
    old_row = next(ln for ln in out if old.name in ln)
    assert "tune" in old_row and "unknown" in old_row and "2025-01-01 12:00" in old_row
    assert not any("not-a-run" in ln for ln in out)
    assert main(["runs"]) == 0  # default: $HIL_RUNS
    assert folder.name in capsys.readouterr().out


def test_status_running_then_failed_with_reason(runs_dir, capsys, mocker):
    seen = {}

    def fail(cfg, folder, progress=True):
        seen["status"] = runs.read_status(folder.path)["status"]
        folder.append_metrics({"epoch": 0})
        raise HilError("the chip stopped answering")

    mocker.patch("hil.jobs.train_run", side_effect=fail)
    assert main(["train", "--task", "digits", *TINY]) == 2
    folder, = _folders(runs_dir)
    assert seen["status"] == "running"
    st = runs.read_status(folder)
    assert st["status"] == "failed" and st["reason"] == "the chip stopped answering"
    capsys.readouterr()
    main(["runs"])
    out = capsys.readouterr().out
    assert "failed" in out and "reason: the chip stopped answering" in out


def test_status_interrupted(runs_dir, mocker):
    def interrupt(cfg, folder, progress=True):
        folder.append_metrics({"epoch": 0})
        raise KeyboardInterrupt

    mocker.patch("hil.jobs.train_run", side_effect=interrupt)
    assert main(["train", "--task", "digits", *TINY]) == 130
    folder, = _folders(runs_dir)
    st = runs.read_status(folder)
    assert st["status"] == "interrupted" and st["reason"]


def test_every_seed_failed_exits_non_zero_and_says_failed(runs_dir, capsys):
    rc = main(DIVERGING)
    assert rc == 1
    assert "every seed failed" in capsys.readouterr().err
    folder, = _folders(runs_dir)
    st = runs.read_status(folder)
    assert st["status"] == "failed" and "every seed failed" in st["reason"]


def test_api_run_records_status(runs_dir):
    import hil

    cfg = hil.load_config(preset="digits", overrides=["model.n_hidden=4", "model.n_layers=1",
                                                      "train.epochs=1", "train.batch_size=400"], seeds="0")
    run = hil.train(cfg, progress=False)
    assert runs.read_status(run.folder)["status"] == "complete"


# ----------------------------------------------------------------------------- 6. clean errors

@pytest.fixture
def files(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\x00\x01\xff\xfe\x89PNG binary")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.db").write_bytes(b"this is not an sqlite database" * 40)
    (tmp_path / "map.csv").write_bytes(b"\xff\xfe garbage")
    (tmp_path / "map.json").write_text("{ not json")
    return tmp_path


CASES = {
    "binary config": (["train", "--config", "{tmp}/binary.yaml", *TINY],
                      "binary.yaml: config: not a text file"),
    "bad --set YAML": (["train", *TINY, "--set", "model.S=[1,{"], "model.S: cannot read the value '[1,{'"),
    "huge n_hidden": (["train", *TINY, "--set", "model.n_hidden=10000000"],
                      "model.n_hidden: 1 layer(s) x 10000000"),
    "huge seed range": (["train", *TINY[:2], "--seeds", "0-100000000"], "asks for 100000001 seeds; at most"),
    "storage not a URL": (["tune", *TINY, "--storage", "notaurl"],
                          "--storage: 'notaurl' is neither a database URL"),
    "storage unknown scheme": (["tune", *TINY, "--storage", "foo://h/db"], "unknown database scheme 'foo'"),
    "corrupt study.db": (["tune", *TINY, "--n-trials", "1", "--resume", "{tmp}/study"],
                         "study.db: file is not a database"),
    "corrupt reference map": (["chain", "design", "--map", "{tmp}/map.csv"],
                              "map.csv: not a readable reference map"),
    "z-step 0": (["calibrate", "reference", "lab_configs/virtual.yaml", "--z-step", "0"],
                 "--z-step: must be a number > 0"),
    "threads -1": (["train", *TINY, "--threads", "-1"], "--threads: must be an integer >= 1, got -1"),
    "seeds ,": (["train", *TINY[:2], "--seeds", ","], "seeds: ',' names no seed"),
    "flip-flop delay": (["train", "--task", "flipflop", *TINY, "--set", "task.seq_len=20",
                         "--set", "task.delay=20"], "task.delay: must be < task.seq_len - 3"),
    "duplicate seeds": (["train", *TINY[:2], "--seeds", "0,0"], "seeds: seeds repeat"),
    "--init without --in-the-loop": (["train", *TINY, "--init", "{tmp}"],
                                     "--init: only chip-in-the-loop training"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_no_folder(case, files, runs_dir, capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # lab_configs/ relative paths
    argv, words = CASES[case]
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    assert main(argv) == 2
    line = _one_clean_line(capsys.readouterr().err)
    assert words in line
    assert _folders(runs_dir) == []
    if case == "corrupt study.db":  # a resumed folder is kept, marked failed
        assert runs.read_status(files / "study")["status"] == "failed"


def test_huge_size_names_the_estimate(runs_dir, capsys):
    assert main(["train", *TINY, "--set", "model.n_hidden=10000000"]) == 2
    line = _one_clean_line(capsys.readouterr().err)
    assert "need about" in line and "PB of memory" in line and "available" in line


def test_memory_estimate_refuses_above_available(mocker):
    from hil.config import check_memory, estimate_memory, load_config

    cfg = load_config(preset="digits")
    est = estimate_memory(cfg)
    assert 0 < est["total"] < 2e9  # the preset fits easily
    mocker.patch("hil.config.available_memory", return_value=est["total"] // 2)
    with pytest.raises(HilError, match="model.n_hidden|train.batch_size"):
        check_memory(cfg)


def test_postgresql_without_driver(runs_dir, capsys, mocker):
    mocker.patch("hil.training.tune.available", return_value=False)
    assert main(["tune", *TINY, "--storage", "postgresql://lab:s3cret@db.example/studies"]) == 2
    out = capsys.readouterr()
    line = _one_clean_line(out.err)
    assert "psycopg" in line and "pip install 'hil[postgres]'" in line
    assert "s3cret" not in out.err
    assert _folders(runs_dir) == []


def test_driver_limit_error_is_one_line(runs_dir, capsys, mocker):
    from drivers.base import LimitError

    def refuse(cfg, folder, progress=True):
        raise LimitError("power_dbm=40 dBm refused (allowed [-20, 18]); nothing was sent",
                         instrument="smb (SMB100A at TCPIP::sim)")

    mocker.patch("hil.jobs.train_run", side_effect=refuse)
    assert main(["train", *TINY]) == 2
    line = _one_clean_line(capsys.readouterr().err)
    assert "instrument refused: smb (SMB100A at TCPIP::sim): power_dbm=40 dBm refused" in line
    assert _folders(runs_dir) == []  # refused before any result: the folder is removed


def test_failed_validation_after_folder_leaves_none(runs_dir, capsys, mocker):
    """A value refused after the folder was made (nothing written but its bookkeeping)."""
    from hil.errors import ConfigError

    def refuse(cfg, folder, progress=True):
        folder.write_config(cfg.to_dict())
        raise ConfigError("train.engine", "not on this machine", "command line")

    mocker.patch("hil.jobs.train_run", side_effect=refuse)
    assert main(["train", *TINY]) == 2
    _one_clean_line(capsys.readouterr().err)
    assert _folders(runs_dir) == []
