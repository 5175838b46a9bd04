"""Reliable shared studies (issue 18, item 7): workers killed mid-trial are recovered by Optuna's
heartbeat and their trials retried once; a study refuses workers of another search; workers end
with their parent. Several real ``hil tune`` processes on one SQLite study, tiny trials."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hil.cli import main
from hil.training.tune import SEARCH_SPACE, make_storage

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "2", "--set", "model.n_hidden=4", "--set", "model.n_layers=2",
        "--set", "train.batch_size=400", "--seeds", "0", "--no-progress"]
BEAT = ["--heartbeat", "1", "--grace-period", "3"]
#: TINY with first epochs long enough (18 updates of 16 neurons) that a poll every ~0.2 s sees a
#: trial before its first report: with TINY's single update per epoch the window was missed
#: once in CI
LONGER_EPOCHS = [*TINY, "--set", "train.batch_size=50", "--set", "model.n_hidden=16"]


def _hil(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hil", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trials(url: str, name: str = "hil") -> list:
    """The study's trials, or [] while it does not exist yet or the database is busy."""
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials()
    except Exception:  # noqa: BLE001
        return []


def _wait(cond, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie has ended; its new parent reaps it


def _running_of(url: str, pid: int, fresh: bool = False) -> list:
    """RUNNING trials of worker ``pid``; ``fresh``: only those that reported no epoch yet (an
    epoch of training is left, so a kill now lands mid-trial)."""
    return [t for t in _trials(url) if t.state == TrialState.RUNNING
            and t.user_attrs.get("pid") == pid and not (fresh and t.intermediate_values)]


def test_killed_worker_of_three_is_recovered_by_heartbeat(tmp_path):
    """Two workers, one SIGKILLed mid-trial, a third joining later: every requested trial
    completes, the killed one is retried (once) and no configuration is trained twice."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "HIL_RUNS": str(tmp_path / "runs")}
    n = 6
    argv = ["tune", *LONGER_EPOCHS, *BEAT, "--storage", url, "--n-trials", str(n), "--batch", "1"]
    a, b = _hil([*argv, "--name", "a"], env), _hil([*argv, "--name", "b"], env)
    try:
        _wait(lambda: _running_of(url, a.pid, fresh=True), 60, "a trial of worker a")
        a.send_signal(signal.SIGKILL)
        a.wait()
        killed = _wait(lambda: _running_of(url, a.pid), 10, "the killed trial")[0]
        c = _hil([*argv, "--name", "c"], env)
        outs = [p.communicate(timeout=120)[0] for p in (b, c)]
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    assert [b.returncode, c.returncode] == [0, 0], outs
    trials = optuna.load_study(study_name="hil", storage=url).get_trials()
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # every requested trial finished; workers check the count before asking, so two may
    # overshoot by one trial
    assert n <= len(done) <= n + 1, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # the killed trial is failed and its retry, with the same parameters, ran to the end
    fails = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in fails] == [killed.number]
    retry = [t for t in trials if t.system_attrs.get("retry_history") == [killed.number]]
    assert len(retry) == 1 and retry[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry[0].params == killed.params
    # none trained twice: the finished trials' configurations are all different
    drawn = [tuple(sorted(t.params.items())) for t in done]
    assert len(drawn) == len(set(drawn))
    # each worker draws with its own sampler seed, recorded per trial with its identity
    seeds = {}
    for t in trials:
        seeds.setdefault(t.user_attrs["worker"], set()).add(t.user_attrs["sampler_seed"])
    assert all(len(s) == 1 for s in seeds.values())
    assert len({next(iter(s)) for s in seeds.values()}) == len(seeds) >= 2
    assert any(str(a.pid) in w for w in seeds)


def test_requeued_trial_runs_and_replaces_its_failed_twin(tmp_path, runs_dir):
    """A trial left RUNNING by a dead worker (heartbeat stopped) is failed and retried: the
    retry runs, and the failed original does not count towards --n-trials."""
    assert main(["tune", *TINY, *BEAT, "--n-trials", "2", "--batch", "1"]) == 0
    folder = next(runs_dir.iterdir())
    url = f"sqlite:///{folder / 'study.db'}"
    store = make_storage(url, heartbeat=1, grace_period=3)
    study = optuna.load_study(study_name="hil", storage=store)
    dead = study.ask(SEARCH_SPACE)  # a worker that asked, beat once, was tagged and died
    study_id = store.get_study_id_from_name("hil")
    store.record_heartbeat(store.get_trial_id_from_study_id_trial_number(study_id, dead.number))
    dead.set_user_attr("worker", "elsewhere,pid=1")
    time.sleep(3.5)
    assert main(["tune", *TINY, *BEAT, "--n-trials", "3", "--batch", "1",
                 "--resume", str(folder)]) == 0
    trials = optuna.load_study(study_name="hil", storage=url).get_trials()
    states = [t.state for t in trials]
    # 2 before, the dead one failed, its retry complete: 3 finished, no new trial drawn
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL,
                      TrialState.COMPLETE], states
    assert trials[3].params == dead.params
    assert trials[3].system_attrs["retry_history"] == [dead.number]


def test_resume_with_another_search_is_refused(runs_dir, capsys, tmp_path):
    assert main(["tune", *TINY, "--epochs", "1", "--n-trials", "1", "--batch", "1"]) == 0
    folder = next(runs_dir.iterdir())
    url = f"sqlite:///{folder / 'study.db'}"
    capsys.readouterr()
    cases = [(["--preset", "sine_square"], "config", "preset 'digits' in the study, 'sine_square' here"),
             (["--set", "model.n_hidden=8"], "config", "model.n_hidden 4 in the study, 8 here"),
             (["--objective", "test"], "--objective", "'val', not 'test'"),
             (["--space", "model.S=0.2:1.5:log"], "--space",
              "model.S '0.1:2:log' in the study, '0.2:1.5:log' here")]
    for extra, key, detail in cases:
        assert main(["tune", *TINY, "--epochs", "1", "--n-trials", "3", *extra,
                     "--resume", str(folder)]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the folder and study
        assert err.startswith("hil tune: error: study 'hil':") and key in err and detail in err
    # a second worker of a shared study with another config is refused the same way
    assert main(["tune", *TINY, "--epochs", "3", "--n-trials", "3", "--storage", url]) == 2
    assert "train.epochs 1 in the study, 3 here" in capsys.readouterr().err
    trials = optuna.load_study(study_name="hil", storage=url).get_trials()
    assert len(trials) == 1  # nothing trained into the study


def test_empty_or_foreign_study_db_is_refused(runs_dir, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    db = folder / "study.db"
    db.touch()
    argv = ["tune", *TINY, "--n-trials", "1", "--resume", str(folder)]
    assert main(argv) == 2
    assert "study.db is empty" in capsys.readouterr().err
    assert db.stat().st_size == 0  # not silently made a new study
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE other (x)")
    assert main(argv) == 2
    assert "not an Optuna study database" in capsys.readouterr().err
    db.unlink()
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="hil")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)  # not a hil study
    assert main(argv) == 2
    assert "not a study of hil tune" in capsys.readouterr().err
    assert main([*argv, "--study-name", "other"]) == 2
    assert "no study 'other' to continue" in capsys.readouterr().err
    assert len(study.get_trials()) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_with_their_parent(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "HIL_RUNS": str(tmp_path / "runs")}
    parent = _hil(["tune", *TINY, *BEAT, "--epochs", "4", "--storage", url, "--n-trials", "50",
                   "--batch", "1", "--workers", "2"], env)
    workers: set = set()
    try:
        def two_workers():
            pids = {t.user_attrs.get("pid") for t in _trials(url) if t.state == TrialState.RUNNING}
            return pids if len(pids - {None}) >= 2 else None

        workers = _wait(two_workers, 60, "two workers running trials")
        assert parent.pid not in workers
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        _wait(lambda: all(_gone(p) for p in workers), 20, "the workers to end")
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in workers:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)
    # the workers end on SIGTERM and normally fail and requeue their trial at once; a worker
    # signalled while it writes to the database can leave its trial RUNNING (seen once under
    # load), and then the heartbeat recovers it: after the grace period none stays RUNNING
    from hil.training.tune import make_storage

    time.sleep(3.5)
    study = optuna.load_study(study_name="hil", storage=make_storage(url, 1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials()
    assert not [t for t in trials if t.state == TrialState.RUNNING and "worker" in t.user_attrs]
    retried = {n for t in trials if t.state == TrialState.WAITING
               for n in t.system_attrs["retry_history"]}
    assert retried == {t.number for t in trials if t.state == TrialState.FAIL}
    assert len({t.user_attrs["sampler_seed"] for t in trials if "sampler_seed" in t.user_attrs}) == 2


def test_worker_identity_and_seed(monkeypatch):
    from hil.training.tune import worker_identity, worker_seed

    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(k, raising=False)
    plain = worker_identity()
    assert f"pid={os.getpid()}" in plain
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    task3 = worker_identity()
    assert "SLURM_JOB_ID=77" in task3 and "SLURM_ARRAY_TASK_ID=3" in task3
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    seeds = {worker_seed(0, i, 0) for i in (plain, task3, worker_identity())}
    assert len(seeds) == 3  # same --sampler-seed, three workers, three seeds
    assert worker_seed(0, plain, 0) != worker_seed(0, plain, 5)  # a resume draws anew
