"""Optuna search: shared storage with two workers, and resume after a kill."""

import os
import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from hil.cli import main
from hil.training.tune import recover_stale

TINY = ["--epochs", "1", "--set", "model.n_hidden=4", "--set", "model.n_layers=2",
        "--set", "train.batch_size=400", "--seeds", "0", "--no-progress"]


def _study(folder):
    return optuna.load_study(study_name="hil", storage=f"sqlite:///{folder / 'study.db'}")


def test_two_workers_share_one_study(runs_dir):
    assert main(["tune", *TINY, "--n-trials", "4", "--batch", "1", "--workers", "2"]) == 0
    folder = next(runs_dir.iterdir())
    trials = _study(folder).get_trials()
    # the workers share the study's trial count: 4 in all, not 4 each (a worker checks the
    # count before asking, so concurrent workers may overshoot by (workers - 1) * batch)
    assert 4 <= len(trials) <= 5
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    # trials ran in worker processes, not in this one (which worker ran which is timing)
    assert os.getpid() not in {t.user_attrs["pid"] for t in trials}
    assert (folder / "best.yaml").is_file() and (folder / "trials.csv").is_file()
    # the best config is accepted by hil train
    assert main(["train", "--config", str(folder / "best.yaml"), *TINY]) == 0


def test_stale_trial_of_a_dead_worker_is_requeued(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=storage, study_name="hil", direction="maximize")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    t = study.ask({"model.S": optuna.distributions.FloatDistribution(0.1, 1.0)})
    import socket

    t.set_user_attr("host", socket.gethostname())
    t.set_user_attr("pid", dead.pid)
    # a storage without a heartbeat (as a journal file): the dead pid on this host tells
    assert recover_stale(study) == 1
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert trials[1].state == TrialState.WAITING
    assert trials[1].params == t.params and trials[1].system_attrs["retry_history"] == [0]


def test_untagged_orphan_is_requeued_after_grace(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(storage=storage, study_name="hil", direction="maximize")
    study.ask({"model.S": optuna.distributions.FloatDistribution(0.1, 1.0)})  # never tagged
    assert recover_stale(study, orphan_grace_s=60) == 0  # could still be a live worker
    time.sleep(0.2)
    assert recover_stale(study, orphan_grace_s=0.1) == 1
    assert study.get_trials()[0].state == TrialState.FAIL


def test_killed_search_resumes(runs_dir):
    """A search SIGKILLed mid-run keeps its finished trials and ``--resume`` completes it.

    The first search asks for many more trials than it can run before the kill, so it cannot
    end on its own first; trials count as finished whether complete or pruned."""
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    env = {**os.environ, "HIL_RUNS": str(runs_dir)}
    beat = ["--heartbeat", "1", "--grace-period", "3"]  # the killed trial is stale after 3 s
    cmd = [sys.executable, "-m", "hil.cli", "tune", *TINY, *beat, "--n-trials", "500", "--batch", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: a loaded CI machine starts Python slowly
    folder = None
    done: list = []
    last_error = None
    while time.time() < deadline:
        dirs = list(runs_dir.iterdir()) if runs_dir.exists() else []
        if dirs and (dirs[0] / "study.db").exists():
            folder = dirs[0]
            try:
                done = _study(folder).get_trials(states=finished_states)
            except Exception as exc:  # study not created yet, or the database busy
                last_error = exc
                done = []
            if len(done) >= 2:
                break
        if proc.poll() is not None:  # exited on its own: nothing left to kill
            break
        time.sleep(0.05)
    exited_early = proc.poll()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert exited_early is None, f"the search exited on its own with code {exited_early}"
    assert folder is not None and len(done) >= 2, (
        f"the search never finished two trials before the deadline (last read error: {last_error!r})")
    before = len(_study(folder).get_trials(states=finished_states))
    assert 2 <= before < 500
    target = before + 3
    time.sleep(4)  # past the grace period of the killed trial's last heartbeat
    assert main(["tune", *TINY, *beat, "--n-trials", str(target), "--batch", "1",
                 "--resume", str(folder)]) == 0
    trials = _study(folder).get_trials()
    finished = [t for t in trials if t.state in finished_states]
    # a killed trial retried counts once: only failures that were not queued again count
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    assert len(finished) >= target - sum(t.state == TrialState.FAIL and t.number not in retried
                                         for t in trials)
    assert len(finished) > before
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # the resumed sampler does not replay the configurations drawn before the kill (only a
    # killed trial's own parameters come back, queued again on purpose)
    drawn = [tuple(sorted(t.params.items())) for t in trials
             if t.state != TrialState.FAIL and not t.system_attrs.get("retry_history")]
    assert len(drawn) == len(set(drawn))


def test_seed_median_counts_a_diverged_seed_as_zero():
    from hil.training.tune import seed_median

    assert seed_median([0.5, 0.9, 0.7]) == 0.7
    assert seed_median([0.5, 0.9]) == 0.7
    assert seed_median([0.8, float("nan"), 0.9]) == 0.8  # nan -> 0: [0, 0.8, 0.9]
    assert seed_median([float("nan"), float("inf"), 0.9]) == 0.0


TINY3 = [a if a != "0" else "0-2" for a in TINY]  # the same tiny run with seeds 0-2


def test_seeds_per_trial_scores_the_median_over_seeds(runs_dir, capsys):
    # every worker draws with its own sampler seed (host, pid): the space is narrowed around
    # the digits preset, so that whatever is drawn learns and the seeds can differ
    space = ["model.tau_ns=5:6.5:log", "train.lr0=0.02:0.05:log", "model.S=0.7:1.0:log",
             "model.S_in=3:4:log", "model.b_in=0.15:0.3"]
    argv = ["tune", *TINY3, "--epochs", "2", "--n-trials", "3", "--batch", "2",
            *[a for sp in space for a in ("--space", sp)],
            "--seeds-per-trial", "3", "--prune-warmup", "10"]
    assert main(argv) == 0
    folder = next(runs_dir.iterdir())
    study = _study(folder)
    assert study.user_attrs["seeds_per_trial"] == 3
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)  # no pruning
    for t in trials:
        per_seed = t.user_attrs["val_accuracy_per_seed"]
        assert t.user_attrs["seeds"] == [0, 1, 2] and len(per_seed) == 3
        assert t.value == sorted(per_seed)[1]
        assert t.user_attrs["status"] == "3/3 seeds ok"
    # the seeds are real: the three members of a trial start from different weights
    assert any(len(set(t.user_attrs["val_accuracy_per_seed"])) > 1 for t in trials)
    # a study keeps its seed count: resuming it with another one is refused, naming the option
    capsys.readouterr()
    assert main([*argv[:-4], "--seeds-per-trial", "2", "--resume", str(folder)]) == 2
    assert "--seeds-per-trial" in capsys.readouterr().err
    assert len(_study(folder).get_trials()) == 3


def test_seeds_per_trial_and_warmup_bad_values(runs_dir, capsys):
    assert main(["tune", *TINY, "--n-trials", "1", "--seeds-per-trial", "2"]) == 2
    err = capsys.readouterr().err
    assert "seeds" in err and "at least 2" in err
    assert main(["tune", *TINY, "--n-trials", "1", "--seeds-per-trial", "0"]) == 2
    assert "--seeds-per-trial" in capsys.readouterr().err
    assert main(["tune", *TINY, "--n-trials", "1", "--prune-warmup", "-1"]) == 2
    assert "--prune-warmup" in capsys.readouterr().err
