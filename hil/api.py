"""The Python API: what the ``hil`` commands do, callable from a notebook or a script.

``import hil`` exposes these functions (``hil.load_config``, ``hil.training.train``, ``hil.upload``,
``hil.training.tune``, ``hil.open_lab``). Jobs write the same run folders as the commands and return a
:class:`Run` (the folder and its summary); nothing is printed but progress bars (``tqdm.auto``:
notebook widgets in Jupyter) and nothing changes matplotlib's backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hil.errors import HilError
from hil.runs import RunFolder, tracked

if TYPE_CHECKING:
    from hil.bench.lab import Lab
    from hil.config import RunConfig

__all__ = ["Run", "load_config", "open_lab", "train", "train_in_the_loop", "tune", "upload"]


@dataclass(frozen=True)
class Run:
    """A finished job: its run folder and the summary it wrote there."""

    folder: Path
    summary: dict[str, Any]


def load_config(path: str | Path | None = None, *, preset: str | None = None,
                overrides: Iterable[str] = (), seeds: str | Sequence[int] | None = None) -> RunConfig:
    """A validated run config: ``preset``, then the YAML file at ``path``, then ``overrides``
    (``"model.S=0.8"``, as ``--set``), then ``seeds`` (``"0-9"`` or a list)."""
    from hil.config import load_config as _load

    return _load(path, preset=preset, overrides=list(overrides),
                 seeds=None if seeds is None else (seeds if isinstance(seeds, str) else list(seeds)))


def _config(config: RunConfig | str | Path) -> RunConfig:
    from hil.config import RunConfig

    return config if isinstance(config, RunConfig) else load_config(config)


def _folder(kind: str, runs_dir: str | Path | None, name: str | None, log: Iterable[str]) -> RunFolder:
    from hil.viewers import make_sinks

    folder = RunFolder.create(kind, runs_dir, name)
    folder.sinks.extend(make_sinks(log, folder))
    return folder


def train(config: RunConfig | str | Path, *, runs_dir: str | Path | None = None, name: str | None = None,
          progress: bool = True, log: Iterable[str] = ()) -> Run:
    """Train every seed of ``config`` (a config or a YAML file) off-chip, as ``hil train``.

    ``log=["tensorboard"]`` also writes TensorBoard event files (``<run folder>/tensorboard``).
    """
    from hil.jobs import train_run

    cfg = _config(config)
    folder = _folder("train", runs_dir, name or cfg.task.name, log)
    try:
        with tracked([folder]):
            summary = train_run(cfg, folder, progress=progress)
    finally:
        folder.close_sinks()
    return Run(folder.path, summary)


def train_in_the_loop(config: RunConfig | str | Path, *, backend: str = "sim", device: Iterable[str] = (),
                      twin: str = "calibrated", init: str | Path | None = None, estimator: str | None = None,
                      device_budget_s: float | None = None, curve_every: int = 0,
                      runs_dir: str | Path | None = None, name: str | None = None,
                      progress: bool = True) -> Run:
    """Train with the chip in the loop, as ``hil train --backend NAME --in-the-loop``: one chip per
    seed, ``estimator`` (``physics``, ``twin:every=K``, ``spsa:c=C,n=N``; see
    :mod:`hil.chip.estimators`), an optional ``device_budget_s`` per chip, from the weights of the
    trained run ``init``."""
    from hil.chip.chip_in_loop import check_loop_settings
    from hil.jobs import train_in_the_loop_run
    from hil.training.checkpoints import load_run

    cfg = _config(config)
    check_loop_settings(estimator, device_budget_s, curve_every)  # before any folder or chip
    if init is not None:
        p = Path(init)
        load_run(p if p.is_dir() else p.parent)
    folder = RunFolder.create("train-in-the-loop", runs_dir, name or cfg.task.name)
    with tracked([folder]):
        summary = train_in_the_loop_run(cfg, folder, backend, list(device), twin=twin,
                                        init=None if init is None else str(init), progress=progress,
                                        estimator=estimator, device_budget_s=device_budget_s,
                                        curve_every=curve_every)
    return Run(folder.path, summary)


def upload(run_folder: str | Path, *, backend: str = "sim", device: Iterable[str] = (),
           verify: bool = False, tol: float = 0.01, max_iters: int = 3, calibrated_twin: bool = False,
           runs_dir: str | Path | None = None, name: str | None = None) -> Run:
    """Upload a trained run to one chip per seed and report the model-to-chip gap, as ``hil upload``."""
    from hil.jobs import upload_run

    folder = RunFolder.create("upload", runs_dir, name or backend)
    with tracked([folder]):
        summary = upload_run(Path(run_folder), backend, folder, list(device), verify=verify, tol=tol,
                             max_iters=max_iters, calibrated_twin=calibrated_twin)
    return Run(folder.path, summary)


def tune(config: RunConfig | str | Path, *, n_trials: int = 40, batch: int = 4, workers: int = 1,
         storage: str | None = None, study_name: str = "hil", objective: str = "val",
         space: Sequence[str] | None = None, seeds_per_trial: int = 1, prune_warmup: int = 5,
         sampler_seed: int = 0, runs_dir: str | Path | None = None, name: str | None = None,
         progress: bool = True) -> Run:
    """Optuna search over the paper's hyperparameters, as ``hil tune``; the summary is the report
    (trial counts, best trial, its parameters); ``best.yaml`` in the folder is its config.

    ``storage``: a database URL or ``journal:PATH`` shared with other workers (default: SQLite
    in the run folder); ``space``: ``"section.key=low:high[:log]"`` changes, as ``--space``.
    """
    from hil.jobs import run_search
    from hil.network.engine import record_engine
    from hil.training import tune as _tune

    cfg = _config(config)
    if objective == "val" and cfg.task.val_fraction == 0:
        cfg.task.val_fraction = 0.2
    dims = _tune.parse_space(list(space) if space else None)
    if storage:
        _tune.storage_url(storage)
    folder = RunFolder.create("tune", runs_dir, name or cfg.task.name)
    with tracked([folder]):
        folder.write_config(cfg.to_dict())
        record_engine(folder, cfg.train.engine)
        folder.write_json("search_space.json", {k: repr(v) for k, v in dims.items()})
        report = run_search(cfg, folder.path, storage=storage, study_name=study_name,
                                  n_trials=n_trials, batch=batch, workers=workers, objective=objective,
                                  space=dims, seeds_per_trial=seeds_per_trial, prune_warmup=prune_warmup,
                                  sampler_seed=sampler_seed, progress=progress, echo=lambda _: None)
        folder.write_json("tune_summary.json", report)
    return Run(folder.path, report)


def open_lab(config: str | Path | Any, **kwargs: Any) -> Lab:
    """Open the instruments of a lab config (``with hil.open_lab("lab.yaml") as lab: ...``);
    see :func:`hil.bench.lab.open_lab` for ``record_to``, ``replay``, ``roles`` and ``world``.
    A missing optional driver package is named with the extra that installs it."""
    from hil.bench.lab import open_lab as _open
    from hil.extras import hint

    try:
        return _open(config, **kwargs)
    except HilError as exc:
        h = hint(exc)
        if h:
            raise HilError(f"{exc} ({h})") from exc
        raise
