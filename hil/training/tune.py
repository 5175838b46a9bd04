"""Hyperparameter search with Optuna over the paper's parameters (thesis 6.7.3).

Trials are trained in batches on the stacked network (``--batch`` trials per job), reported
to Optuna after every epoch for pruning, and scored on a validation part of the training
half by default (``--objective test`` reproduces the paper's practice of scoring on test).
The study lives in a relational database: an SQLite file in the run folder by default, or
any SQLAlchemy URL shared by several worker processes or machines (``--storage``), or an
Optuna journal file on a shared filesystem (``--storage journal:PATH``).
A killed search resumes: every worker records a heartbeat of its running trials in a database
storage (Optuna's heartbeat, ``--heartbeat``); a trial whose heartbeat is older than
``--grace-period``, on any machine, is failed by the next worker and its parameters queued again
(once: the retry replaces it in the trial count). Optuna's journal storage has no heartbeat: there
a trial is recovered only by a worker on its own host once its process is gone.
The study stores its base config, search space and objective; a worker or ``--resume`` with
other ones is refused, naming what differs. Worker processes stop when their parent dies.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import inspect
import json
import math
import multiprocessing as mp
import os
import random
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.distributions import FloatDistribution, distribution_to_json
from optuna.trial import TrialState

from hil.config import RunConfig, update, validate
from hil.errors import ConfigError, HilError
from hil.extras import MissingExtra, available, require
from hil.network.tasks import make_task
from hil.runs import atomic_path, atomic_write, pid_alive, save_figure
from hil.training.train import Trainer

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


#: Seconds between two heartbeats of a running trial, and how old its last one may be before
#: another worker fails the trial and queues it again (``--heartbeat``, ``--grace-period``).
HEARTBEAT_S = 10
GRACE_S = 60
#: How often a trial killed with its worker is queued again before it counts as failed.
MAX_RETRY = 3
#: Environment variables naming a scheduler's job and task; part of a worker's identity.
SCHEDULER_IDS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID",
                 "PBS_JOBID", "PBS_ARRAY_INDEX", "LSB_JOBID", "LSB_JOBINDEX", "SGE_TASK_ID",
                 "JOB_ID")


def _retry_callback() -> Callable[[optuna.Study, Any], None]:
    cls = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
           or optuna.storages.RetryFailedTrialCallback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=MAX_RETRY)


def retried_numbers(trials: list[Any]) -> set[int]:
    """Numbers of the trials that were queued again (a retry replaces them)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def count_trials(study: optuna.Study) -> tuple[int, int]:
    """(finished, running) trials of ``study``. Finished: complete, pruned, or failed and not
    queued again; a failed trial whose retry is queued is not counted, the retry is once it runs
    (a waiting trial is asked for by the next worker with room)."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    finished = running = 0
    for t in trials:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            finished += 1
        elif t.state == TrialState.FAIL and t.number not in retried:
            finished += 1
        elif t.state == TrialState.RUNNING:
            running += 1
    return finished, running


def has_heartbeat(storage: optuna.storages.BaseStorage) -> bool:
    return getattr(storage, "get_heartbeat_interval", lambda: None)() is not None


def fail_and_retry(study: optuna.Study, number: int) -> bool:
    """Fail RUNNING trial ``number`` and queue its parameters again (as Optuna's heartbeat
    does); False when another worker finished or failed it first."""
    try:
        study.tell(number, state=TrialState.FAIL)
    except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
        return False
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    _retry_callback()(study, frozen)
    return True



def recover_stale(study: optuna.Study, orphan_grace_s: float = GRACE_S,
                  storage: optuna.storages.BaseStorage | None = None) -> int:
    """Fail trials left RUNNING by dead workers and queue their parameters again; returns how many.

    With a heartbeat (a database storage): Optuna's :func:`optuna.storages.fail_stale_trials`, a
    trial whose heartbeat is older than the grace period, whichever machine ran it. Without one
    (a journal file): a trial whose worker ran on this host and whose process is gone. Either way
    a trial that never got a worker tag and is older than ``orphan_grace_s`` (its worker was
    killed between asking for it and tagging it, before any heartbeat) is recovered too.
    """
    before = len(retried_numbers(study.get_trials(deepcopy=False)))
    n = 0
    if storage is not None and has_heartbeat(storage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        n = len(retried_numbers(study.get_trials(deepcopy=False))) - before
    host = socket.gethostname()
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "host" in t.user_attrs:  # tagged: a heartbeat covers it, unless of an earlier hil
            beats = "worker" in t.user_attrs and storage is not None and has_heartbeat(storage)
            stale = (not beats and t.user_attrs["host"] == host and "pid" in t.user_attrs
                     and not pid_alive(int(t.user_attrs["pid"])))
        else:
            started = t.datetime_start or now
            stale = (now - started).total_seconds() > orphan_grace_s
        if stale and fail_and_retry(study, t.number):
            n += 1
    return n


def worker_identity() -> str:
    """This worker: host, process id and the scheduler's job and task ids where there are."""
    parts = [socket.gethostname(), f"pid={os.getpid()}"]
    parts += [f"{k}={os.environ[k]}" for k in SCHEDULER_IDS if os.environ.get(k)]
    return ",".join(parts)


def worker_seed(sampler_seed: int, identity: str, n_trials_before: int) -> int:
    """The sampler seed of one worker: ``--sampler-seed`` mixed with the worker's identity (two
    live workers never share host and pid) and the study's trial count when it started (a
    resumed worker does not replay the start-up trials drawn before)."""
    text = f"{sampler_seed}|{identity}|{n_trials_before}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


class Heartbeat:
    """Records the heartbeat of this worker's running trials every ``interval`` seconds in a
    thread (Optuna starts one only inside ``Study.optimize``; a worker here asks and tells)."""

    def __init__(self, storage: optuna.storages.BaseStorage, study_name: str) -> None:
        self.storage = storage
        self.interval = storage.get_heartbeat_interval() if has_heartbeat(storage) else None
        self.study_id = storage.get_study_id_from_name(study_name) if self.interval else None
        self.ids: set[int] = set()
        self.stop = threading.Event()
        if self.interval:
            threading.Thread(target=self._run, daemon=True, name="hil-heartbeat").start()

    def add(self, number: int) -> int | None:
        if not self.interval:
            return None
        tid = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        self.storage.record_heartbeat(tid)
        self.ids.add(tid)
        return tid

    def clear(self) -> None:
        self.ids.clear()

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            for tid in list(self.ids):
                try:
                    self.storage.record_heartbeat(tid)
                except Exception:  # noqa: BLE001 - a busy database: the next beat retries
                    pass

    def close(self) -> None:
        self.stop.set()


def study_record(base: RunConfig, space: dict[str, FloatDistribution], objective: str,
                 seeds_per_trial: int) -> dict[str, Any]:
    """What makes two workers' scores comparable: the config a trial starts from (without the
    preset's name; only the seeds a trial trains), the search space and the objective."""
    return {"config_hash": _config_hash(_scored(base.to_dict(), seeds_per_trial)),
            "search_space": {k: _space_text(v) for k, v in space.items()},
            "objective": objective}


def _space_text(d: Any) -> str:
    """A search dimension as ``--space`` writes it (``low:high[:log]``), else Optuna's JSON."""
    if isinstance(d, FloatDistribution) and d.step is None:
        return f"{d.low:g}:{d.high:g}" + (":log" if d.log else "")
    return distribution_to_json(d)


def _scored(cfg: dict[str, Any], seeds_per_trial: int) -> dict[str, Any]:
    cfg = {k: v for k, v in cfg.items() if k != "preset"}
    cfg["seeds"] = list(cfg.get("seeds", []))[:seeds_per_trial]
    return cfg


def _config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _diff(have: Any, want: Any, key: str = "") -> list[str]:
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(have) | set(want), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in have:
                out.append(f"{sub} not in the study's")
            elif k not in want:
                out.append(f"{sub} only in the study's")
            else:
                out += _diff(have[k], want[k], sub)
        return out
    return [] if have == want else [f"{key} {have!r} in the study, {want!r} here"]


def _differs(what: list[str], hint: str) -> str:
    shown = "; ".join(what[:4]) + (f" (+{len(what) - 4} more)" if len(what) > 4 else "")
    return f"{shown}; {hint}"


def check_study(study: optuna.Study, base: RunConfig, space: dict[str, FloatDistribution],
                objective: str, seeds_per_trial: int, claim: bool = True) -> None:
    """Record the study's base config, search space and objective at its first use (``claim``),
    else refuse a worker whose ones differ (:class:`ConfigError`, naming the difference)."""
    attrs = study.user_attrs
    source = f"study {study.study_name!r}"
    hint = "give the study's settings, or another --study-name for a new search"
    rec = study_record(base, space, objective, seeds_per_trial)
    if "base_config" not in attrs:
        if not claim or study.get_trials(deepcopy=False):
            raise ConfigError("--resume" if not claim else "--study-name",
                              "not a study of hil tune (it stores no base config)", source)
        study.set_user_attr("base_config", base.to_dict())
        for k, v in rec.items():
            study.set_user_attr(k, v)
        attrs = study.user_attrs
    if attrs.get("objective", objective) != objective:
        raise ConfigError("--objective", f"the study scores on {attrs['objective']!r}, not "
                          f"{objective!r}; {hint}", source)
    have_space = attrs.get("search_space", rec["search_space"])
    if have_space != rec["search_space"]:
        raise ConfigError("--space", "another search space: "
                          + _differs(_diff(have_space, rec["search_space"]), hint), source)
    want = _scored(base.to_dict(), seeds_per_trial)
    have_hash = attrs.get("config_hash") or _config_hash(_scored(attrs["base_config"],
                                                                 seeds_per_trial))
    if have_hash != rec["config_hash"]:
        what = _diff(_scored(attrs["base_config"], seeds_per_trial), want)
        if attrs["base_config"].get("preset") != base.preset:
            what.insert(0, f"preset {attrs['base_config'].get('preset')!r} in the study, "
                        f"{base.preset!r} here")
        raise ConfigError("config", "another base config (preset, --config or --set): "
                          + _differs(what or ["config hash"], hint), source)
    for k, v in rec.items():  # a study of an earlier hil records them now
        if k not in attrs:
            study.set_user_attr(k, v)


def _die_with_parent(parent: int) -> None:
    """End this worker process (SIGTERM, so that it queues its trials again) when ``parent``
    dies: ``prctl(PR_SET_PDEATHSIG)`` on Linux, else a thread that watches the parent's pid."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            armed = libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent and pid_alive(parent):
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True, name="hil-parent-watch").start()


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


def make_storage(storage: str, heartbeat: int | None = None,
                 grace_period: int | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage for a ``--storage`` value (a database URL or ``journal:PATH``).

    ``heartbeat``: seconds between the heartbeats of a running trial (database storages only);
    a trial whose last heartbeat is older than ``grace_period`` is failed and queued again.
    """
    storage = storage_url(storage)
    if storage.startswith(JOURNAL_PREFIX):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(storage[len(JOURNAL_PREFIX):]).expanduser()
        if not path.parent.is_dir():
            raise ConfigError("--storage", f"folder {path.parent} of the journal file does not "
                              "exist", "command line")
        return JournalStorage(JournalFileBackend(str(path)))
    from sqlalchemy.exc import SQLAlchemyError

    kwargs: dict[str, Any] = {}
    if heartbeat:
        params = inspect.signature(optuna.storages.RDBStorage).parameters
        name = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params
                else "failed_trial_callback")
        kwargs = {"heartbeat_interval": int(heartbeat),
                  "grace_period": int(grace_period or 2 * heartbeat), name: _retry_callback()}
    # workers starting together on an empty database race to create its tables: retry
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(storage, **kwargs)
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


def open_study(storage: str | optuna.storages.BaseStorage, study_name: str, seed: int | None,
               direction: str = "maximize", prune_warmup: int = 5,
               create: bool = True) -> optuna.Study:
    """Create or load a study; ``prune_warmup`` epochs pass before a trial can be pruned.
    ``create=False`` (``--resume``): the study must exist."""
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=8)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=prune_warmup)
    store = make_storage(storage) if isinstance(storage, str) else storage
    if create:
        return optuna.create_study(storage=store, study_name=study_name, direction=direction,
                                   sampler=sampler, pruner=pruner, load_if_exists=True)
    try:
        return optuna.load_study(study_name=study_name, storage=store, sampler=sampler,
                                 pruner=pruner)
    except KeyError:
        names = optuna.get_all_study_names(store)
        raise ConfigError("--resume", f"no study {study_name!r} to continue; the storage holds "
                          f"{', '.join(map(repr, names)) or 'none (an empty study.db)'}",
                          "command line") from None


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
           prune_warmup: int = 5, heartbeat: int = HEARTBEAT_S, grace_period: int = GRACE_S,
           create: bool = True, echo: Callable[[str], None] | None = None) -> int:
    """Ask, train and tell batches of trials until the study holds ``n_trials`` finished ones.

    With ``seeds_per_trial`` = n > 1 every trial is trained with the config's first n seeds
    (stacked with the batch's other trials) and scored, and pruned, on the median over them.
    ``seed`` is mixed with this worker's identity (:func:`worker_seed`). Trials of dead workers
    are recovered before every batch (:func:`recover_stale`); with a heartbeat a worker whose
    count is reached waits for trials still running elsewhere, since one may come back.
    An interrupted worker (Ctrl-C, SIGTERM, its parent gone) fails its trials and queues them
    again before it exits.
    """
    echo = echo or _stderr
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Heartbeat of storage is supposed to be used")
    store = make_storage(storage, heartbeat, grace_period)
    identity = worker_identity()
    study = open_study(store, study_name, None, prune_warmup=prune_warmup, create=create)
    own_seed = worker_seed(seed, identity, len(study.get_trials(deepcopy=False)))
    study.sampler = optuna.samplers.TPESampler(seed=own_seed, n_startup_trials=8)
    check_seeds_per_trial(study, base, seeds_per_trial)
    check_study(study, base, space, objective, seeds_per_trial, claim=create)
    n_seeds = seeds_per_trial
    trial_seeds = list(base.seeds[:n_seeds])
    task = make_task(base.task, base.train.output_gain)
    split = "val" if objective == "val" else "test"
    if split not in task.splits:
        raise ConfigError("task.val_fraction", "must be > 0 to score on a validation split",
                          "tune")
    metric = f"{split}_{task.metric_name}"
    beat = Heartbeat(store, study_name)
    done = 0
    try:
        while True:
            recover_stale(study, orphan_grace_s=grace_period, storage=store)
            finished, running = count_trials(study)
            room = n_trials - finished - running
            if room <= 0:
                # a trial of a dead worker may come back: one with a heartbeat, or not tagged yet
                # (a trial of an earlier hil, tagged without a heartbeat, may never)
                running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                           if "worker" in t.user_attrs or "host" not in t.user_attrs]
                if running and beat.interval:
                    time.sleep(beat.interval)
                    continue
                break
            done += _run_batch(study, base, min(batch, room), space, beat, identity, own_seed,
                               task, split, metric, n_seeds, trial_seeds, progress, echo)
    finally:
        beat.close()
    return done


def _run_batch(study: optuna.Study, base: RunConfig, n: int, space: dict[str, FloatDistribution],
               beat: Heartbeat, identity: str, own_seed: int, task: Any, split: str, metric: str,
               n_seeds: int, trial_seeds: list[int], progress: bool,
               echo: Callable[[str], None]) -> int:
    """Ask ``n`` trials, train them stacked and tell them; returns how many were told."""
    trials: list[optuna.Trial] = []
    told: set[int] = set()
    try:
        for _ in range(n):
            t = study.ask(space)
            trials.append(t)
            beat.add(t.number)  # before the tag: a tagged trial always has a heartbeat
            t.set_user_attr("worker", identity)
            t.set_user_attr("sampler_seed", own_seed)
            t.set_user_attr("host", socket.gethostname())
            t.set_user_attr("pid", os.getpid())
        cfgs = [apply_params(base, t.params) for t in trials]
        # stacked member j = trial j // n_seeds with seed trial_seeds[j % n_seeds]
        members = [(k, sd) for k in range(len(trials)) for sd in trial_seeds]
        pruned: set[int] = set()
        lost: set[int] = set()  # failed as stale by another worker meanwhile: not ours to tell

        def on_epoch(epoch: int, rec: dict[str, Any]) -> set[int]:
            stop = set()
            values = rec["evals"][split]["metric"]
            for k, t in enumerate(trials):
                if k in pruned or k in lost:
                    continue
                own = range(k * n_seeds, (k + 1) * n_seeds)
                try:
                    t.report(seed_median([float(values[j]) for j in own]), epoch)
                    prune = t.should_prune()
                except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError):
                    lost.add(k)
                    stop.update(own)
                    continue
                if prune:
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
            if k in lost:
                told.add(k)
                echo(f"trial {t.number} was failed by another worker (no heartbeat for the grace "
                     "period) and queued again; its result here is dropped")
                continue
            fins = result.final[k * n_seeds:(k + 1) * n_seeds]
            ok = [f for f in fins if f["status"] != "failed"
                  and math.isfinite(f.get(metric, math.nan))]
            vals = [f.get(metric, math.nan) if f["status"] != "failed" else math.nan for f in fins]
            tests = [f.get(test_key, math.nan) if f["status"] != "failed" else math.nan
                     for f in fins]
            try:
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
            except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError, ValueError):
                echo(f"trial {t.number} was failed by another worker (no heartbeat for the grace "
                     "period) and queued again; its result here is dropped")
            told.add(k)
    except BaseException as exc:
        # interrupted (Ctrl-C, SIGTERM, the parent gone): the trials are not bad, queue them
        # again now instead of after the grace period; a crash fails them without a retry
        for k, t in enumerate(trials):
            if k not in told:
                if isinstance(exc, Exception):
                    try:
                        study.tell(t, state=TrialState.FAIL)
                    except Exception:  # noqa: BLE001 - already finished elsewhere
                        pass
                else:
                    fail_and_retry(study, t.number)
        raise
    finally:
        beat.clear()
    return len(told)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _worker_entry(kwargs: dict[str, Any], parent: int) -> None:
    from hil.termination import install_termination_handlers

    install_termination_handlers()  # SIGTERM unwinds: the worker queues its trials again
    _die_with_parent(parent)
    try:
        worker(**kwargs)
    except KeyboardInterrupt:
        sys.exit(130)


def run_search(base: RunConfig, folder: Path, *, storage: str | None = None, study_name: str = "hil",
               n_trials: int = 40, batch: int = 4, workers: int = 1, objective: str = "val",
               space: dict[str, FloatDistribution] | None = None, seeds_per_trial: int = 1,
               prune_warmup: int = 5, sampler_seed: int = 0, threads: int | None = None,
               progress: bool = True, echo: Callable[[str], None] = _stderr,
               heartbeat: int = HEARTBEAT_S, grace_period: int = GRACE_S,
               resume: bool = False) -> dict[str, Any]:
    """Run (or continue) a search with ``workers`` processes, then write its report.

    ``storage``: a database URL or ``journal:PATH`` shared with other machines, or None for
    ``study.db`` (SQLite) in ``folder``. ``resume``: the study must exist and be a hil study
    with the same base config, search space and objective. Returns the report of
    :func:`write_report`.
    """
    if n_trials < 1 or batch < 1 or workers < 1:
        raise ConfigError("--n-trials/--batch/--workers", "must be >= 1", "command line")
    if prune_warmup < 0:
        raise ConfigError("--prune-warmup", f"must be >= 0, got {prune_warmup}", "command line")
    if heartbeat < 1 or grace_period <= heartbeat:
        raise ConfigError("--heartbeat/--grace-period", "need 1 <= heartbeat < grace period "
                          f"(seconds), got {heartbeat} and {grace_period}", "command line")
    space = dict(SEARCH_SPACE) if space is None else space
    storage = storage or f"sqlite:///{(Path(folder) / 'study.db').resolve()}"
    echo(f"study: {study_name} in {redact(storage)}")
    store = make_storage(storage, heartbeat, grace_period)
    study = open_study(store, study_name, None, prune_warmup=prune_warmup, create=not resume)
    check_seeds_per_trial(study, base, seeds_per_trial)
    check_study(study, base, space, objective, seeds_per_trial, claim=not resume)
    n_requeued = recover_stale(study, orphan_grace_s=grace_period, storage=store)
    if n_requeued:
        echo(f"resumed: {n_requeued} trial(s) of a killed worker queued again")
    kwargs = dict(base=base, storage=storage, study_name=study_name, n_trials=n_trials,
                  batch=batch, objective=objective, space=space, progress=progress,
                  seeds_per_trial=seeds_per_trial, prune_warmup=prune_warmup, seed=sampler_seed,
                  heartbeat=heartbeat, grace_period=grace_period, create=not resume)
    if workers == 1:
        worker(threads=threads, echo=echo, **kwargs)
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_entry,
                             args=({**kwargs, "threads": 1, "progress": False}, os.getpid()))
                 for _ in range(workers)]
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        except BaseException:
            for p in procs:  # Ctrl-C or SIGTERM here: the workers queue their trials and end
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=30)
            raise
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise WorkerError(f"{len(bad)} worker(s) exited with errors: {bad}")
    return write_report(study, base, Path(folder))


def check_study_file(path: Path) -> None:
    """``--resume``: the run folder's ``study.db`` must be an Optuna study database, not a
    missing, empty or foreign file (opening it would silently start a new study in it)."""
    import sqlite3

    path = Path(path)
    if not path.is_file():
        raise ConfigError("--resume", f"no study.db in {path.parent}", "command line")
    if not path.stat().st_size:
        raise ConfigError("--resume", f"{path} is empty; nothing to continue", "command line")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise ConfigError("--resume", f"{path}: {exc}; nothing to continue",
                          "command line") from None
    if not {"studies", "trials"} <= tables:
        raise ConfigError("--resume", f"{path} is not an Optuna study database; nothing to "
                          "continue", "command line")


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
