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

``hil.train`` and ``hil.tune`` are also the modules of the trainer and of the search
(``hil.train.Trainer``, ``hil.tune.SEARCH_SPACE``): calling them runs the job. Everything is
imported on first use, so ``import hil`` is cheap and changes nothing in the process.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_config", "open_lab", "train", "train_in_the_loop", "tune", "upload"]

_FUNCTIONS = ("load_config", "upload", "open_lab", "train_in_the_loop")
_CALLABLE_MODULES = ("train", "tune")


def _callable_module(name: str) -> type[types.ModuleType]:
    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            from hil import api

            return getattr(api, name)(*args, **kwargs)

    CallableModule.__name__ = CallableModule.__qualname__ = f"{name}_module"
    CallableModule.__call__.__doc__ = f"hil.api.{name}"
    return CallableModule


_CLASSES = {name: _callable_module(name) for name in _CALLABLE_MODULES}


class _Package(types.ModuleType):
    """The ``hil`` package: makes the submodules ``hil.train`` and ``hil.tune`` callable as soon
    as the import system binds them, whoever imports them first."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CLASSES and isinstance(value, types.ModuleType) and type(value) is types.ModuleType:
            value.__class__ = _CLASSES[name]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
for _name in _CALLABLE_MODULES:  # bound before this package finished importing
    _mod = sys.modules.get(f"{__name__}.{_name}")
    if _mod is not None:
        setattr(sys.modules[__name__], _name, _mod)


def __getattr__(name: str) -> Any:
    if name in _FUNCTIONS:
        from hil import api

        return getattr(api, name)
    if name in _CALLABLE_MODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
