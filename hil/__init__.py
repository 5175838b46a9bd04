"""hil: hardware-in-the-loop training for physical neural networks.

The core package: differentiable models of spintronic networks, tasks, trainers,
hyperparameter search, run folders and the ``hil`` command line.

From Python (see :mod:`hil.api`)::

    import hil

    cfg = hil.load_config(preset="digits", overrides=["train.epochs=5"], seeds="0-1")
    run = hil.train(cfg)                  # a Run: run.folder, run.summary
    best = hil.tune(cfg, n_trials=20)     # Optuna search; best.folder / "best.yaml"
    chips = hil.upload(run.folder)        # the model-to-chip gap on simulated chips
    loop = hil.train_in_the_loop(cfg, init=run.folder, estimator="twin:every=10")
    with hil.open_lab("lab_configs/virtual.yaml") as lab: ...

The jobs live in :mod:`hil.jobs` (what the commands and this API run), the library in
sub-packages by concern: :mod:`hil.network` (model, engines, tasks), :mod:`hil.training`
(trainer, search), :mod:`hil.chip` (backends, twin, chip-in-the-loop, studies),
:mod:`hil.conv` (the hybrid conv network), :mod:`hil.bench` (lab configs, instruments); the
command line is a thin layer on top (:mod:`hil.cli`, :mod:`hil.commands`). Everything is
imported on first use, so ``import hil`` is cheap and changes nothing in the process.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_config", "open_lab", "train", "train_in_the_loop", "tune", "upload"]

_FUNCTIONS = ("load_config", "upload", "open_lab", "train", "train_in_the_loop", "tune")


def __getattr__(name: str) -> Any:
    if name in _FUNCTIONS:
        from hil import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
