"""Studies shared across machines: a real PostgreSQL server, journal files, a scheduler array.

The PostgreSQL test runs against a private server started for the session (``tests/pgserver.py``):
skipped only outside CI on a machine without the server binaries, failed in CI (``CI`` set)
when the server cannot start.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hil.cli import main
from hil.training.tune import make_storage, redact, storage_url

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--set", "model.n_hidden=4", "--set", "model.n_layers=2",
        "--set", "train.batch_size=400", "--seeds", "0", "--no-progress"]


@pytest.fixture(scope="session")
def postgres_url():
    from pgserver import PostgresServer, ServerUnavailable

    in_ci = bool(os.environ.get("CI"))
    if not in_ci:
        pytest.importorskip("psycopg")
    try:
        server = PostgresServer.start()
    except ServerUnavailable as exc:
        if in_ci:
            pytest.fail(f"CI must run the PostgreSQL test: {exc}")
        pytest.skip(str(exc))
    try:
        yield server.url
    finally:
        server.stop()


def _unique_configs(trials) -> bool:
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    return len(drawn) == len(set(drawn))


def _hil(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hil", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_workers_share_a_postgresql_study(postgres_url, tmp_path, capsys):
    """Two worker processes (as on two machines) run one study in a real PostgreSQL server."""
    env = {**os.environ, "HIL_RUNS": str(tmp_path / "runs")}
    n = 6
    # trials of ~8 updates each: with TINY's single update the first worker once finished all six
    # before the second had started (CI dry run), and "both workers ran trials" failed
    longer = [*TINY, "--set", "train.batch_size=50", "--set", "model.n_hidden=16"]
    argv = ["tune", *longer, "--storage", postgres_url, "--study-name", "shared", "--n-trials", str(n),
            "--batch", "1"]
    procs = [_hil([*argv, "--sampler-seed", str(i), "--name", f"w{i}"], env) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    study = optuna.load_study(study_name="shared", storage=make_storage(postgres_url))
    trials = study.get_trials()
    # every trial complete, none trained twice; each worker checks the count before asking,
    # so the two may together overshoot by one trial
    assert n <= len(trials) <= n + 1
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.state for t in trials]
    assert _unique_configs(trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers ran trials
    assert study.user_attrs["base_config"]["model"]["n_hidden"] == 16
    # the password never reaches the terminal or a run folder
    password = postgres_url.split(":")[2].split("@")[0]
    assert all(password not in out for out in outs)
    assert any("hil:***@127.0.0.1" in out for out in outs)
    for f in (tmp_path / "runs").rglob("*"):
        if f.is_file():
            assert password.encode() not in f.read_bytes(), f

    # the report of the shared study, written without training
    capsys.readouterr()
    assert main(["tune", "--report", "shared", "--storage", postgres_url, "--runs-dir",
                 str(tmp_path / "report")]) == 0
    assert password not in "".join(capsys.readouterr())
    folder = next((tmp_path / "report").iterdir())
    assert "tune-report-shared" in folder.name
    rows = (folder / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == len(trials) + 1
    assert (folder / "best.yaml").is_file()
    assert main(["train", "--config", str(folder / "best.yaml"), *TINY, "--runs-dir",
                 str(tmp_path / "again")]) == 0


def test_journal_storage_and_report(tmp_path, runs_dir):
    journal = f"journal:{tmp_path / 'study.journal'}"
    assert main(["tune", *TINY, "--storage", journal, "--study-name", "j", "--n-trials", "2",
                 "--batch", "2"]) == 0
    trials = optuna.load_study(study_name="j", storage=make_storage(journal)).get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    # continuing the same study from another folder adds to it, no configuration repeated
    assert main(["tune", *TINY, "--storage", journal, "--study-name", "j", "--n-trials", "3",
                 "--batch", "1"]) == 0
    trials = optuna.load_study(study_name="j", storage=make_storage(journal)).get_trials()
    assert len(trials) == 3 and _unique_configs(trials)
    assert main(["tune", "--report", "j", "--storage", journal]) == 0
    report = next(p for p in runs_dir.iterdir() if "tune-report" in p.name)
    assert (report / "best.yaml").is_file()
    assert len((report / "trials.csv").read_text().strip().splitlines()) == 4


def test_report_errors_name_the_option(tmp_path, runs_dir, capsys):
    assert main(["tune", "--report", "nope"]) == 2
    assert "--storage" in capsys.readouterr().err
    journal = f"journal:{tmp_path / 'empty.journal'}"
    assert main(["tune", "--report", "nope", "--storage", journal]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_storage_urls():
    # the plain scheme names psycopg 3 (the postgres extra) whatever SQLAlchemy's default is
    assert storage_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert storage_url("postgres://u:pw@h:5432/db") == "postgresql+psycopg://u:pw@h:5432/db"
    assert storage_url("sqlite:///x.db") == "sqlite:///x.db"
    assert storage_url("journal:/tmp/x.log") == "journal:/tmp/x.log"
    assert redact("postgresql://u:s3cret@h/db") == "postgresql://u:***@h/db"
    assert redact("not a url ://u:s3cret@h") == "not a url ://u:***@h"


def test_missing_database_driver_is_one_line_naming_the_extra(monkeypatch, capsys, runs_dir):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    assert main(["tune", *TINY, "--storage", "postgresql://u:pw@127.0.0.1:9/db"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("hil tune: error:") and "pip install 'hil[postgres]'" in err
    assert "Traceback" not in err and "pw@" not in err
    assert not runs_dir.exists()  # stopped before making a run folder


def test_slurm_array_example(tmp_path):
    """The documented scheduler array, run as two array tasks on one journal file, then reported."""
    script = ROOT / "examples" / "slurm_tune.sbatch"
    text = script.read_text()
    assert "#SBATCH --array" in text and "--storage" in text and "--study-name" in text
    journal = f"journal:{tmp_path / 'array.journal'}"
    env = {**os.environ, "HIL_STORAGE": journal, "HIL_STUDY": "array", "HIL_TRIALS": "4",
           "HIL_TUNE_ARGS": " ".join([*TINY, "--batch", "1"]), "HIL_RUNS": str(tmp_path / "runs"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    procs = [subprocess.Popen(["bash", str(script)], env={**env, "SLURM_ARRAY_TASK_ID": str(i)},
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = optuna.load_study(study_name="array", storage=make_storage(journal)).get_trials()
    assert 4 <= len(trials) <= 5
    assert all(t.state == TrialState.COMPLETE for t in trials) and _unique_configs(trials)
    assert len(list((tmp_path / "runs").iterdir())) == 2  # one run folder per array task
    assert main(["tune", "--report", "array", "--storage", journal, "--runs-dir",
                 str(tmp_path / "report")]) == 0
    assert (next((tmp_path / "report").iterdir()) / "best.yaml").is_file()
