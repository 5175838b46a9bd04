"""Task specifications: what the configuration and the trainer need to know about a task
without its data, and the registry of task names.

:mod:`hil.config` validates ``task.name`` and estimates a run's memory from these specs; it
must stay cheap to import, so this module imports neither torch nor :mod:`hil.network.tasks`. The
task classes of :mod:`hil.network.tasks` subclass these specs and add the data, loss and metric;
registering one (:func:`hil.network.tasks.register_task`) registers its spec here too, so a new task
is a new class, with no name compared anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, TypeVar

from hil.errors import ConfigError

if TYPE_CHECKING:
    from hil.config import TaskConfig, TrainConfig

# How an epoch visits the training split, and the BPTT modes (``train.bptt``) each allows:
# "batches": shuffled mini-batches of whole sequences, loss after full BPTT over each;
# "sequence": one long series, trained on whole (full) or in windows (truncated, shifted-start
# or exact-start BPTT, thesis 5.7).
EPOCH_SCHEMES: dict[str, tuple[str, ...]] = {
    "batches": ("full",),
    "sequence": ("full", "truncated", "shifted", "exact"),
}


class TaskSpec:
    """A task as the configuration sees it. Subclasses set ``name`` and ``epoch_scheme`` and
    override :meth:`shape` (and :meth:`n_outputs`, :meth:`validate` where needed)."""

    name: ClassVar[str] = "task"
    epoch_scheme: ClassVar[str] = "batches"  # a key of EPOCH_SCHEMES

    @classmethod
    def bptt_modes(cls) -> tuple[str, ...]:
        """The ``train.bptt`` modes this task can train with (its epoch scheme decides)."""
        return EPOCH_SCHEMES[cls.epoch_scheme]

    @classmethod
    def n_outputs(cls, t: TaskConfig) -> int:
        """Readout channels the task needs."""
        return 1

    @classmethod
    def shape(cls, t: TaskConfig, tr: TrainConfig) -> tuple[int, int, int, int]:
        """(input channels, points per sequence in one backward pass, sequences per training
        pass, sequences per evaluation): what the memory estimate needs."""
        raise NotImplementedError(f"{cls.__name__}.shape")

    @classmethod
    def validate(cls, t: TaskConfig, source: str | None = None) -> None:
        """Checks of ``t`` beyond those every task shares; raise :class:`ConfigError`."""
        return None


SpecT = TypeVar("SpecT", bound=type[TaskSpec])

TASK_SPECS: dict[str, type[TaskSpec]] = {}


def register_spec(cls: SpecT) -> SpecT:
    """Add (or replace) ``cls`` under ``cls.name``; usable as a class decorator."""
    if not cls.name or cls.name == TaskSpec.name:
        raise ValueError(f"{cls.__name__}: set a task name (class attribute name)")
    if cls.epoch_scheme not in EPOCH_SCHEMES:
        raise ValueError(f"{cls.__name__}: unknown epoch_scheme {cls.epoch_scheme!r}; allowed: "
                         f"{', '.join(EPOCH_SCHEMES)}")
    TASK_SPECS[cls.name] = cls
    return cls


def task_spec(name: str, source: str | None = None) -> type[TaskSpec]:
    """The registered spec of task ``name``; an unknown name names the allowed ones."""
    try:
        return TASK_SPECS[name]
    except KeyError:
        raise ConfigError("task.name", f"unknown task {name!r}; allowed: {', '.join(TASK_SPECS)}",
                          source) from None


@register_spec
class DigitsSpec(TaskSpec):
    """Sequential 8x8 digits: 64 points of one pixel, ten classes, 1797 images (898 to train)."""

    name = "digits"
    epoch_scheme = "batches"

    @classmethod
    def n_outputs(cls, t: TaskConfig) -> int:
        return 10

    @classmethod
    def shape(cls, t: TaskConfig, tr: TrainConfig) -> tuple[int, int, int, int]:
        return 1, 64, min(tr.batch_size, 899), 899


@register_spec
class SineSquareSpec(TaskSpec):
    """Sine/square discrimination on one long series: the windowed BPTT modes apply."""

    name = "sine_square"
    epoch_scheme = "sequence"

    @classmethod
    def shape(cls, t: TaskConfig, tr: TrainConfig) -> tuple[int, int, int, int]:
        T = t.n_periods * t.points_per_period
        window = T if tr.bptt == "full" else min(T, t.window)
        return 1, window, (tr.batch_size if tr.bptt == "exact" else 1), 1


@register_spec
class FlipFlopSpec(TaskSpec):
    """The ``n_bits`` flip-flop: one input and one output channel per bit."""

    name = "flipflop"
    epoch_scheme = "batches"
    width = 3  # points of a set/reset pulse

    @classmethod
    def n_outputs(cls, t: TaskConfig) -> int:
        return t.n_bits

    @classmethod
    def shape(cls, t: TaskConfig, tr: TrainConfig) -> tuple[int, int, int, int]:
        return t.n_bits, t.seq_len, min(tr.batch_size, t.n_train), t.n_test

    @classmethod
    def validate(cls, t: TaskConfig, source: str | None = None) -> None:
        # a pulse and its delayed switch must fit in the sequence
        if not t.delay + cls.width < t.seq_len:
            raise ConfigError("task.delay", f"must be < task.seq_len - {cls.width} (the pulse width) = "
                              f"{t.seq_len - cls.width}, got {t.delay}: no output could ever switch, "
                              "and a network that outputs 0 would score 100 %", source)
