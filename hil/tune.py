"""Hyperparameter search with Optuna over the paper's parameters (thesis 6.7.3).

Trials are trained in batches on the stacked network (``--batch`` trials per job), reported
to Optuna after every epoch for pruning, and scored on a validation part of the training
half by default (``--objective test`` reproduces the paper's practice of scoring on test).
The study lives in a relational database: an SQLite file in the run folder by default, or
any SQLAlchemy URL shared by several worker processes or machines (``--storage``).
A killed search resumes: trials left running by a dead worker on this host are marked failed
and their parameters queued again.
"""

from __future__ import annotations

import copy
import datetime
import math
import os
import socket
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from hil.config import RunConfig, update, validate
from hil.errors import ConfigError
from hil.tasks import make_task
from hil.train import Trainer

#: The paper's search space (thesis 6.7.3): tau, lr0, lr decay, densities, S, S_in, b_in.
SEARCH_SPACE: dict[str, FloatDistribution] = {
    "model.tau_ns": FloatDistribution(3.0, 60.0, log=True),
    "train.lr0": FloatDistribution(1e-3, 0.2, log=True),
    "train.lr_decay": FloatDistribution(1.0, 50.0, log=True),
    "model.density_inter": FloatDistribution(0.2, 1.0),
    "model.density_intra": FloatDistribution(0.05, 1.0),
    "model.S": FloatDistribution(0.1, 2.0, log=True),
    "model.S_in": FloatDistribution(0.5, 10.0, log=True),
    "model.b_in": FloatDistribution(-0.5, 0.5),
}


def apply_params(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    cfg = copy.deepcopy(base)
    nested: dict[str, dict[str, Any]] = {}
    for key, v in params.items():
        sec, name = key.split(".", 1)
        nested.setdefault(sec, {})[name] = v
    update(cfg, nested, "optuna trial")
    return validate(cfg, "optuna trial")


def parse_space(specs: list[str] | None) -> dict[str, FloatDistribution]:
    """``key=low:high[:log]`` entries replace or extend the default space."""
    space = dict(SEARCH_SPACE)
    for spec in specs or []:
        try:
            key, rng = spec.split("=", 1)
            parts = rng.split(":")
            low, high = float(parts[0]), float(parts[1])
            log = len(parts) > 2 and parts[2] == "log"
            space[key] = FloatDistribution(low, high, log=log)
        except (ValueError, IndexError):
            raise ConfigError("--space", f"cannot read {spec!r}; use section.key=low:high[:log]",
                              "command line") from None
        apply_params(RunConfig(), {key: low})  # key must exist
    return space


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(study: optuna.Study, orphan_grace_s: float = 5.0) -> int:
    """Fail trials left RUNNING by dead workers and queue their parameters again.

    A trial is stale when its worker ran on this host and that process is gone, or when it
    never got a worker tag at all and is older than ``orphan_grace_s`` (its worker was killed
    between asking for the trial and tagging it; a live worker tags within milliseconds).
    """
    host = socket.gethostname()
    now = datetime.datetime.now()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "host" in t.user_attrs:
            stale = t.user_attrs["host"] == host and not _alive(int(t.user_attrs.get("pid", -1)))
        else:
            started = t.datetime_start or now
            stale = (now - started).total_seconds() > orphan_grace_s
        if stale:
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number})
            n += 1
    return n


def open_study(storage: str, study_name: str, seed: int | None,
               direction: str = "maximize") -> optuna.Study:
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=5)
    return optuna.create_study(storage=storage, study_name=study_name, direction=direction,
                               sampler=sampler, pruner=pruner, load_if_exists=True)


def _finished(study: optuna.Study) -> int:
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=states))


def worker(base: RunConfig, storage: str, study_name: str, n_trials: int, batch: int,
           objective: str, space: dict[str, FloatDistribution], seed: int,
           progress: bool = True, threads: int | None = None) -> int:
    """Ask, train and tell batches of trials until the study holds ``n_trials``."""
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(storage, study_name, seed)
    task = make_task(base.task, base.train.output_gain)
    split = "val" if objective == "val" else "test"
    if split not in task.splits:
        raise ConfigError("task.val_fraction", "must be > 0 to score on a validation split",
                          "tune")
    metric = f"{split}_{task.metric_name}"
    done = 0
    while True:
        room = n_trials - _finished(study)
        if room <= 0:
            break
        trials = [study.ask(space) for _ in range(min(batch, room))]
        cfgs = []
        for t in trials:
            t.set_user_attr("host", socket.gethostname())
            t.set_user_attr("pid", os.getpid())
            cfgs.append(apply_params(base, t.params))
        seeds = [base.seeds[0]] * len(trials)
        pruned: set[int] = set()

        def on_epoch(epoch: int, rec: dict[str, Any], trials=trials, pruned=pruned) -> set[int]:
            stop = set()
            values = rec["evals"][split]["metric"]
            for k, t in enumerate(trials):
                if k in pruned:
                    continue
                v = float(values[k])
                t.report(v if math.isfinite(v) else 0.0, epoch)
                if t.should_prune():
                    pruned.add(k)
                    stop.add(k)
            return stop

        trainer = Trainer([c.model for c in cfgs], [c.train for c in cfgs], seeds, task,
                          progress=progress, on_epoch=on_epoch,
                          label=f"trials {trials[0].number}-{trials[-1].number}")
        result = trainer.fit()
        for k, (t, fin) in enumerate(zip(trials, result.final, strict=True)):
            t.set_user_attr("test_" + task.metric_name, fin.get(f"test_{task.metric_name}"))
            t.set_user_attr("status", fin["status"])
            if k in pruned:
                study.tell(t, state=TrialState.PRUNED)
            elif fin["status"] == "failed" or not math.isfinite(fin.get(metric, math.nan)):
                study.tell(t, state=TrialState.FAIL)
            else:
                study.tell(t, fin[metric])
            done += 1
    return done


def best_config(study: optuna.Study, base: RunConfig) -> RunConfig:
    return apply_params(base, study.best_trial.params)


def write_report(study: optuna.Study, base: RunConfig, folder: Path) -> dict[str, Any]:
    """trials.csv, best.yaml (a config ``hil train --config`` accepts) and plots."""
    folder = Path(folder)
    _write_trials_csv(study, folder / "trials.csv")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    out: dict[str, Any] = {"trials": counts}
    if complete:
        best = study.best_trial
        cfg = best_config(study, base)
        d = cfg.to_dict()
        d["task"]["val_fraction"] = 0.0
        (folder / "best.yaml").write_text(
            f"# best trial {best.number} of study {study.study_name!r}: objective "
            f"{best.value:.4f}\n" + yaml.safe_dump(d, sort_keys=False))
        out.update({"best_trial": best.number, "best_value": best.value,
                    "best_params": best.params, "best_user_attrs": best.user_attrs})
        _plots(study, folder)
    return out


def _write_trials_csv(study: optuna.Study, path: Path) -> None:
    import csv

    trials = study.get_trials(deepcopy=False)
    params = sorted({k for t in trials for k in t.params})
    attrs = sorted({k for t in trials for k in t.user_attrs})
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["number", "state", "value", "duration_s", *params, *attrs])
        for t in trials:
            dur = t.duration.total_seconds() if t.duration else ""
            w.writerow([t.number, t.state.name, t.value, dur,
                        *[t.params.get(k, "") for k in params],
                        *[t.user_attrs.get(k, "") for k in attrs]])


def _plots(study: optuna.Study, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    vals = [t.value for t in trials]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([t.number for t in trials], [100 * v for v in vals], "o", ms=4, label="trial")
    best = [max(vals[: i + 1]) for i in range(len(vals))]
    ax.plot([t.number for t in trials], [100 * b for b in best], "k-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "optimization_history.png", dpi=120)
    plt.close(fig)
    keys = sorted({k for t in trials for k in t.params})
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 2.8), sharey=True)
        for ax, k in zip(list(getattr(axes, "flat", [axes])), keys, strict=False):
            ax.scatter([t.params.get(k, float("nan")) for t in trials], [100 * v for v in vals],
                       s=10)
            ax.set_xlabel(k.split(".")[-1])
            if SEARCH_SPACE.get(k) is not None and SEARCH_SPACE[k].log:
                ax.set_xscale("log")
        fig.tight_layout()
        fig.savefig(folder / "slices.png", dpi=110)
        plt.close(fig)
