"""Hyperparameter search with Optuna over the paper's parameters (thesis 6.7.3).

Trials are trained in batches on the stacked network (``--batch`` trials per job), reported
to Optuna after every epoch for pruning, and scored on a validation part of the training
half by default (``--objective test`` reproduces the paper's practice of scoring on test).
The study lives in a relational database: an SQLite file in the run folder by default, or
any SQLAlchemy URL shared by several worker processes or machines (``--storage``), or an
Optuna journal file on a shared filesystem (``--storage journal:PATH``).
A killed search resumes: trials left running by a dead worker on this host are marked failed
and their parameters queued again.
"""

from __future__ import annotations

import copy
import datetime
import math
import multiprocessing as mp
import os
import random
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from hil.config import RunConfig, update, validate
from hil.errors import ConfigError, HilError
from hil.extras import MissingExtra, available, require
from hil.runs import atomic_path, atomic_write, save_figure
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


JOURNAL_PREFIX = "journal:"


def redact(storage: str) -> str:
    """``storage`` with any password replaced by ``***``, safe to print or store
    (:func:`hil.runs.redact_secrets`, the one helper for this)."""
    from hil.runs import redact_secrets

    return redact_secrets(storage)


def storage_url(storage: str) -> str:
    """Check a ``--storage`` value and name its database driver explicitly.

    ``postgresql://`` (and ``postgres://``) becomes ``postgresql+psycopg://`` (psycopg 3, the
    ``postgres`` extra), or ``postgresql+psycopg2://`` when only psycopg2 is installed, since
    SQLAlchemy's default driver for the plain scheme differs between its versions.
    """
    if storage.startswith(JOURNAL_PREFIX):
        if not storage[len(JOURNAL_PREFIX):]:
            raise ConfigError("--storage", "journal: needs a file path, e.g. journal:/shared/s.log",
                              "command line")
        return storage
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except ArgumentError:
        raise ConfigError("--storage", f"{redact(storage)!r} is neither a database URL (e.g. "
                          "postgresql://user@host/db, sqlite:///study.db) nor journal:PATH",
                          "command line") from None
    backend, _, driver = url.drivername.partition("+")
    if backend in ("postgresql", "postgres"):
        if not driver:
            if available("psycopg"):
                driver = "psycopg"
            elif available("psycopg2"):
                driver = "psycopg2"
            else:
                raise MissingExtra("psycopg", "a PostgreSQL study database")
        elif driver == "psycopg":
            require("psycopg", "a PostgreSQL study database")
        url = url.set(drivername=f"postgresql+{driver}")
        return url.render_as_string(hide_password=False)
    _check_dialect(url, storage)
    return storage


def _check_dialect(url: Any, storage: str) -> None:
    """An unknown scheme (``foo://``) or a database driver that is not installed stops here,
    before a run folder is made, in one line."""
    from sqlalchemy.exc import NoSuchModuleError

    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise ConfigError("--storage", f"{redact(storage)!r}: unknown database scheme "
                          f"{url.drivername!r}; use postgresql://user@host/db, sqlite:///path.db "
                          "or journal:PATH", "command line") from None
    try:
        dbapi = getattr(dialect, "import_dbapi", None) or dialect.dbapi
        if callable(dbapi):
            dbapi()
    except ImportError as exc:
        raise ConfigError("--storage", f"{redact(storage)!r}: the database driver for "
                          f"{url.drivername!r} is not installed ({exc})", "command line") from None


def make_storage(storage: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for a ``--storage`` value (a database URL or ``journal:PATH``)."""
    storage = storage_url(storage)
    if storage.startswith(JOURNAL_PREFIX):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(storage[len(JOURNAL_PREFIX):]).expanduser()
        if not path.parent.is_dir():
            raise ConfigError("--storage", f"folder {path.parent} of the journal file does not "
                              "exist", "command line")
        return JournalStorage(JournalFileBackend(str(path)))
    from sqlalchemy.exc import SQLAlchemyError

    # workers starting together on an empty database race to create its tables: retry
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(storage)
        except SQLAlchemyError as exc:
            if attempt == 5 or _unreachable(exc):
                raise ConfigError("--storage", f"cannot open {redact(storage)}: "
                                  f"{_first_line(exc)}", "command line") from None
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
    raise AssertionError("unreachable")  # pragma: no cover


def _first_line(exc: BaseException) -> str:
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]


def _unreachable(exc: BaseException) -> bool:
    """Connection refused, unknown host or bad password: retrying does not help."""
    text = str(exc).lower()
    if 'database "' in text and "does not exist" in text:
        return True
    return any(s in text for s in ("connection refused", "could not translate host",
                                    "file is not a database", "disk image is malformed",
                                    "password authentication failed", "no password supplied",
                                    "name or service not known"))


def open_study(storage: str, study_name: str, seed: int | None,
               direction: str = "maximize", prune_warmup: int = 5) -> optuna.Study:
    """Create or load a study; ``prune_warmup`` epochs pass before a trial can be pruned."""
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=prune_warmup)
    study = optuna.create_study(storage=make_storage(storage), study_name=study_name,
                                direction=direction, sampler=sampler, pruner=pruner,
                                load_if_exists=True)
    n = len(study.get_trials(deepcopy=False))
    if n and seed is not None:
        # a resumed worker must not replay the random start-up trials a fresh sampler with the
        # same seed drew before (they would train the same configurations again): the seed
        # moves with the study's history, so a resume is still reproducible
        study.sampler = optuna.samplers.TPESampler(seed=seed + 7919 * n, n_startup_trials=8)
    return study


def _finished(study: optuna.Study) -> int:
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    return len(study.get_trials(deepcopy=False, states=states))


def check_seeds_per_trial(study: optuna.Study, base: RunConfig, n: int) -> None:
    """Fix the study's seeds per trial at its first use; refuse a different count later, since
    medians over different seed counts are not comparable objectives."""
    if n < 1:
        raise ConfigError("--seeds-per-trial", f"must be >= 1, got {n}", "command line")
    if n > len(base.seeds):
        raise ConfigError("seeds", f"--seeds-per-trial {n} needs at least {n} seeds, the config "
                          f"has {len(base.seeds)} ({base.seeds})", "command line")
    have = study.user_attrs.get("seeds_per_trial")
    if have is None:
        study.set_user_attr("seeds_per_trial", n)
    elif int(have) != n:
        raise ConfigError("--seeds-per-trial", f"the study was run with {have} seed(s) per trial, "
                          f"not {n}: give --seeds-per-trial {have} to continue it", "command line")


def seed_median(values: list[float]) -> float:
    """Objective of a multi-seed trial: the median over its seeds, a diverged seed (non-finite
    value) counted as 0, the worst accuracy, so that instability is penalised, not hidden."""
    v = sorted(x if math.isfinite(x) else 0.0 for x in values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def worker(base: RunConfig, storage: str, study_name: str, n_trials: int, batch: int,
           objective: str, space: dict[str, FloatDistribution], seed: int,
           progress: bool = True, threads: int | None = None, seeds_per_trial: int = 1,
           prune_warmup: int = 5) -> int:
    """Ask, train and tell batches of trials until the study holds ``n_trials``.

    With ``seeds_per_trial`` = n > 1 every trial is trained with the config's first n seeds
    (stacked with the batch's other trials) and scored, and pruned, on the median over them.
    """
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(storage, study_name, seed, prune_warmup=prune_warmup)
    check_seeds_per_trial(study, base, seeds_per_trial)
    n_seeds = seeds_per_trial
    trial_seeds = list(base.seeds[:n_seeds])
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
        # stacked member j = trial j // n_seeds with seed trial_seeds[j % n_seeds]
        members = [(k, sd) for k in range(len(trials)) for sd in trial_seeds]
        pruned: set[int] = set()

        def on_epoch(epoch: int, rec: dict[str, Any], trials=trials, pruned=pruned) -> set[int]:
            stop = set()
            values = rec["evals"][split]["metric"]
            for k, t in enumerate(trials):
                if k in pruned:
                    continue
                own = range(k * n_seeds, (k + 1) * n_seeds)
                t.report(seed_median([float(values[j]) for j in own]), epoch)
                if t.should_prune():
                    pruned.add(k)
                    stop.update(own)
            return stop

        trainer = Trainer([cfgs[k].model for k, _ in members], [cfgs[k].train for k, _ in members],
                          [sd for _, sd in members], task, progress=progress, on_epoch=on_epoch,
                          label=f"trials {trials[0].number}-{trials[-1].number}"
                          + (f" x {n_seeds} seeds" if n_seeds > 1 else ""))
        result = trainer.fit()
        test_key = f"test_{task.metric_name}"
        for k, t in enumerate(trials):
            fins = result.final[k * n_seeds:(k + 1) * n_seeds]
            ok = [f for f in fins if f["status"] != "failed"
                  and math.isfinite(f.get(metric, math.nan))]
            vals = [f.get(metric, math.nan) if f["status"] != "failed" else math.nan for f in fins]
            tests = [f.get(test_key, math.nan) if f["status"] != "failed" else math.nan
                     for f in fins]
            if n_seeds == 1:
                t.set_user_attr(test_key, fins[0].get(test_key))
                t.set_user_attr("status", fins[0]["status"])
            else:
                t.set_user_attr(test_key, seed_median([float(v) for v in tests]))
                t.set_user_attr("seeds", trial_seeds)
                t.set_user_attr(f"{split}_{task.metric_name}_per_seed",
                                [float(v) if math.isfinite(v) else None for v in vals])
                t.set_user_attr("status", f"{len(ok)}/{n_seeds} seeds ok")
            if k in pruned:
                study.tell(t, state=TrialState.PRUNED)
            elif not ok:
                study.tell(t, state=TrialState.FAIL)
            else:
                study.tell(t, seed_median([float(v) for v in vals]))
            done += 1
    return done


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _worker_entry(kwargs: dict[str, Any]) -> None:
    worker(**kwargs)


def run_search(base: RunConfig, folder: Path, *, storage: str | None = None, study_name: str = "hil",
               n_trials: int = 40, batch: int = 4, workers: int = 1, objective: str = "val",
               space: dict[str, FloatDistribution] | None = None, seeds_per_trial: int = 1,
               prune_warmup: int = 5, sampler_seed: int = 0, threads: int | None = None,
               progress: bool = True, echo: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Run (or continue) a search with ``workers`` processes, then write its report.

    ``storage``: a database URL or ``journal:PATH`` shared with other machines, or None for
    ``study.db`` (SQLite) in ``folder``. Returns the report of :func:`write_report`.
    """
    if n_trials < 1 or batch < 1 or workers < 1:
        raise ConfigError("--n-trials/--batch/--workers", "must be >= 1", "command line")
    if prune_warmup < 0:
        raise ConfigError("--prune-warmup", f"must be >= 0, got {prune_warmup}", "command line")
    space = dict(SEARCH_SPACE) if space is None else space
    storage = storage or f"sqlite:///{(Path(folder) / 'study.db').resolve()}"
    echo(f"study: {study_name} in {redact(storage)}")
    study = open_study(storage, study_name, sampler_seed, prune_warmup=prune_warmup)
    check_seeds_per_trial(study, base, seeds_per_trial)
    if "base_config" not in study.user_attrs:  # lets --report rebuild best.yaml anywhere
        study.set_user_attr("base_config", base.to_dict())
    n_requeued = recover_stale(study)
    if n_requeued:
        echo(f"resumed: {n_requeued} trial(s) of a killed worker queued again")
    kwargs = dict(base=base, storage=storage, study_name=study_name, n_trials=n_trials,
                  batch=batch, objective=objective, space=space, progress=progress,
                  seeds_per_trial=seeds_per_trial, prune_warmup=prune_warmup)
    if workers == 1:
        worker(seed=sampler_seed, threads=threads, **kwargs)
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_entry,
                             args=({**kwargs, "seed": sampler_seed + i, "threads": 1,
                                    "progress": False},))
                 for i in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise WorkerError(f"{len(bad)} worker(s) exited with errors: {bad}")
    return write_report(study, base, Path(folder))


class WorkerError(HilError):
    """A worker process of a multi-process search failed."""


def report_study(storage: str, study_name: str, folder: Path,
                 base: RunConfig | None = None) -> dict[str, Any]:
    """Write the report of an existing (e.g. shared) study into ``folder``, training nothing.

    The best config is built on the base config the study's first worker stored, else ``base``.
    """
    store = make_storage(storage)
    try:
        study = optuna.load_study(study_name=study_name, storage=store)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(store)]
        raise ConfigError("--report", f"no study {study_name!r} in {redact(storage)}; it holds "
                          f"{', '.join(map(repr, names)) or 'none'}", "command line") from None
    stored = study.user_attrs.get("base_config")
    if stored is not None:
        base = validate(update(RunConfig(), stored, f"study {study_name!r}"), "study")
    elif base is None:
        raise ConfigError("--report", f"study {study_name!r} stores no base config; give the "
                          "search's --preset/--config", "command line")
    return write_report(study, base, Path(folder))


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
        atomic_write(
            folder / "best.yaml", f"# best trial {best.number} of study {study.study_name!r}: objective "
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
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["number", "state", "value", "duration_s", *params, *attrs])
        for t in trials:
            dur = t.duration.total_seconds() if t.duration else ""
            w.writerow([t.number, t.state.name, t.value, dur,
                        *[t.params.get(k, "") for k in params],
                        *[t.user_attrs.get(k, "") for k in attrs]])


def _plots(study: optuna.Study, folder: Path) -> None:
    from hil.plots import plt

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
    save_figure(fig, folder / "optimization_history.png", dpi=120)
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
        save_figure(fig, folder / "slices.png", dpi=110)
        plt.close(fig)
