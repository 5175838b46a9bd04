"""Metrics for standard viewers: TensorBoard event files beside a run folder's ``metrics.jsonl``.

A sink receives every metrics record a run appends (see :class:`hil.runs.RunFolder`); the
TensorBoard sink writes every number of a record as a scalar, tagged ``<metric>/seed_<seed>``
(``trial_<k>``, ``stage_<name>``, ... for records of other jobs) at step ``epoch`` (or ``step``,
``image``; else a count), into ``<run folder>/tensorboard``::

    tensorboard --logdir runs/      # every run folder's curves side by side
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hil.errors import ConfigError
from hil.extras import require

#: ``--log`` choices
VIEWERS = ("tensorboard",)
#: record keys that say whose metrics a record holds (part of the tag, not scalars)
IDENTITY_KEYS = ("stage", "plan", "level", "chain", "seed", "trial")
#: record keys giving the step, first found wins
STEP_KEYS = ("epoch", "step", "iteration", "image")


def scalars(record: dict[str, Any], counter: dict[str, int] | None = None) -> list[tuple[str, float, int]]:
    """``(tag, value, step)`` for every number of a metrics record."""
    who = []
    for key in IDENTITY_KEYS:
        if key in record and not (key == "trial" and "seed" in record):  # seed names a train member
            who.append(f"{key}_{record[key]}")
    suffix = "/" + "/".join(who) if who else ""
    step_key = next((k for k in STEP_KEYS if isinstance(record.get(k), int)), None)
    out = []
    for key, value in record.items():
        if key in IDENTITY_KEYS or key == step_key or isinstance(value, bool):
            continue
        if not isinstance(value, int | float):
            continue
        tag = f"{key}{suffix}"
        if step_key is not None:
            step = int(record[step_key])
        else:
            step = counter[tag] if counter is not None else 0
            if counter is not None:
                counter[tag] += 1
        out.append((tag, float(value), step))
    return out


class TensorBoardSink:
    """Writes metrics records as TensorBoard scalars; the event file is opened on the first
    record (a run that logs nothing leaves no folder) and flushed after every record."""

    def __init__(self, logdir: Path) -> None:
        require("tensorboard", "--log tensorboard")
        self.logdir = Path(logdir)
        self._writer: Any = None
        self._counter: dict[str, int] = defaultdict(int)

    def write(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.logdir))
        for tag, value, step in scalars(record, self._counter):
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def check_viewers(names: Iterable[str]) -> None:
    """Stop before any work when a viewer's package is missing (one line naming the extra)."""
    for name in names:
        if name == "tensorboard":
            require("tensorboard", "--log tensorboard")


def make_sinks(names: Iterable[str], folder: Any) -> list[TensorBoardSink]:
    """The sinks for ``--log`` choices, writing into ``folder`` (a RunFolder)."""
    sinks = []
    for name in names:
        if name == "tensorboard":
            sinks.append(TensorBoardSink(folder.path / "tensorboard"))
        else:
            raise ConfigError("--log", f"unknown viewer {name!r}; choose from {', '.join(VIEWERS)}",
                              "command line")
    return sinks
