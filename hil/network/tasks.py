"""Tasks: sequential digits, sine/square discrimination and the 3-bit flip-flop.

A task owns its data (generated or shipped, never downloaded), its loss and its metric.
Data tensors are ``(B, T, n_in)`` inputs and targets of shape ``(B,)`` (label after the last
step), ``(B, T)`` (label at every step) or ``(B, T, n_out)`` (regression targets).

Each task class subclasses its spec (:mod:`hil.task_specs`: name, epoch scheme, shapes, extra
validation) and is registered in :data:`TASKS` with :func:`register_task`; :func:`make_task`
and the config validation look names up there, and the trainer asks the task how to train
(``epoch_scheme``, ``bptt_modes``), so adding a task touches neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from hil.config import TaskConfig
from hil.errors import ConfigError
from hil.task_specs import DigitsSpec, FlipFlopSpec, SineSquareSpec, TaskSpec, register_spec


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


class Task(TaskSpec):
    """Base class. ``per_step``: the loss uses every time step, else only the last one.
    ``error_budget_title``: set where :meth:`error_budget` says where the misses are."""

    n_in = 1
    n_out = 1
    per_step = False
    metric_name = "accuracy"
    error_budget_title: ClassVar[str | None] = None

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self.splits: dict[str, Split] = {}
        self.input_centre = 0.0

    @classmethod
    def from_config(cls, cfg: TaskConfig, output_gain: float = 1000.0) -> Task:
        """The task for ``cfg``; ``output_gain`` (``train.output_gain``) for tasks that use it."""
        return cls(cfg)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-trial mean loss ``(K,)`` from readout ``out (K, B, T, n_out)``."""
        raise NotImplementedError

    def metric(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-trial score in [0, 1] ``(K,)``; higher is better."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "n_in": self.n_in, "n_out": self.n_out,
                **{k: len(v) for k, v in self.splits.items()}}

    def error_budget(self, out: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, Any] | None:
        """Where the misses of readout ``out`` are on inputs ``x``, targets ``y`` (one trial);
        None for a task without such a breakdown (``error_budget_title`` None)."""
        return None


TaskT = TypeVar("TaskT", bound=type[Task])

TASKS: dict[str, type[Task]] = {}


def register_task(cls: TaskT) -> TaskT:
    """Add ``cls`` under ``cls.name`` for :func:`make_task`, and its spec for the config
    validation and memory estimate (:mod:`hil.task_specs`); usable as a class decorator."""
    register_spec(cls)
    TASKS[cls.name] = cls
    return cls


@register_task
class SequentialDigits(DigitsSpec, Task):
    """The 8x8 digits shipped with scikit-learn, scanned row by row, one pixel per input point.

    50/50 train/test split (stratified, fixed ``random_state=0``), pixels scaled to [0, 1]
    and centred on the training mean (thesis 6.9.1). Label after the 64th point, NLL loss
    on LogSoftmax of the readout. ``val_fraction`` holds part of the training half out for
    hyperparameter search, so that the test half stays untouched.
    """

    n_in = 1
    n_out = 10

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__(cfg)
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = (d.data / 16.0).astype(np.float32)
        y = d.target.astype(np.int64)
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)
        if cfg.val_fraction > 0:
            xtr, xva, ytr, yva = train_test_split(
                xtr, ytr, test_size=cfg.val_fraction, random_state=1, stratify=ytr
            )
            self.splits["val"] = Split(torch.from_numpy(xva)[..., None], torch.from_numpy(yva))
        self.splits["train"] = Split(torch.from_numpy(xtr)[..., None], torch.from_numpy(ytr))
        self.splits["test"] = Split(torch.from_numpy(xte)[..., None], torch.from_numpy(yte))
        self.input_centre = float(xtr.mean())

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(out[:, :, -1], dim=-1)  # (K, B, 10)
        return -logp.gather(-1, y.expand(logp.shape[0], -1).unsqueeze(-1)).squeeze(-1).mean(1)

    def metric(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out[:, :, -1].argmax(-1) == y).float().mean(1)


def sine_square_sequence(n_periods: int, points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One series of ``n_periods`` random sine or square periods (thesis 5.5, Fig. 5.2).

    Label 1 for every point of a sine period, 0 for a square one. Both waves share their
    extremes (+1 at a quarter period, -1 at three quarters), so those points can only be
    labelled from memory of the previous points.
    """
    rng = np.random.default_rng(seed)
    k = np.arange(points)
    sine = np.sin(2 * np.pi * k / points)
    square = np.where(k < points // 2, 1.0, -1.0)
    kinds = rng.integers(0, 2, n_periods)
    x = np.concatenate([sine if c else square for c in kinds]).astype(np.float32)
    y = np.repeat(kinds, points).astype(np.float32)
    return x, y


VAL_SERIES_SEED = 999


@register_task
class SineSquare(SineSquareSpec, Task):
    """Point-by-point sine/square discrimination (thesis 5.5): one training series and one
    test series drawn with another seed; with ``task.val_fraction > 0`` also a validation
    series (a third draw, seed 999, of the same length: the training series is not split).
    Loss: BCE of ``sigmoid(gain * readout)``
    (thesis eq. 5.5; the gain is ``train.output_gain``)."""

    n_in = 1
    n_out = 1
    per_step = True

    def __init__(self, cfg: TaskConfig, output_gain: float = 1000.0) -> None:
        super().__init__(cfg)
        self.gain = output_gain
        draws = [("train", 12345), ("test", 54321)]
        if cfg.val_fraction > 0:  # a third draw of the same length, for choosing settings
            draws.append(("val", VAL_SERIES_SEED))
        for name, seed in draws:
            x, y = sine_square_sequence(cfg.n_periods, cfg.points_per_period, seed)
            self.splits[name] = Split(torch.from_numpy(x)[None, :, None], torch.from_numpy(y)[None])
        self.input_centre = 0.0

    @classmethod
    def from_config(cls, cfg: TaskConfig, output_gain: float = 1000.0) -> Task:
        return cls(cfg, output_gain)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.gain * out[..., 0]
        return F.binary_cross_entropy_with_logits(
            logits, y.expand_as(logits), reduction="none"
        ).mean(dim=(1, 2))

    def metric(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out[..., 0] > 0).float() == y).float().mean(dim=(1, 2))


def flipflop_batch(
    n: int, seq_len: int, n_bits: int, pulse_prob: float, noise: float, delay: int,
    width: int, seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """3-bit flip-flop data (seed 004): noisy +1 (set) / -1 (reset) pulses of ``width`` points
    at random times on each channel; each output holds the sign of its channel's last pulse,
    switching ``delay`` points after the pulse's falling edge. Outputs start at 0.
    """
    rng = np.random.default_rng(seed)
    x = np.zeros((n, seq_len, n_bits), np.float32)
    y = np.zeros((n, seq_len, n_bits), np.float32)
    for i in range(n):
        for b in range(n_bits):
            state = 0.0
            t = int(rng.integers(0, 10))
            switches = []
            while t < seq_len - width:
                if rng.random() < pulse_prob:
                    sign = 1.0 if rng.random() < 0.5 else -1.0
                    x[i, t : t + width, b] = sign
                    switches.append((t + width + delay, sign))
                    t += width + delay + 2
                else:
                    t += 1
            j = 0
            for t in range(seq_len):
                while j < len(switches) and switches[j][0] <= t:
                    state = switches[j][1]
                    j += 1
                y[i, t, b] = state
    x += noise * rng.standard_normal(x.shape).astype(np.float32)
    return x, y


@register_task
class FlipFlop(FlipFlopSpec, Task):
    """3-bit flip-flop memory (seed 004): MSE on every step; the metric is the fraction of
    output time steps within 0.2 of the target. The pulse ``width`` is the spec's."""

    per_step = True
    metric_name = "within_0.2"
    error_budget_title = "flip-flop misses"

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__(cfg)
        self.n_in = self.n_out = cfg.n_bits
        for name, n, seed in (("train", cfg.n_train, 1), ("test", cfg.n_test, 2)):
            x, y = flipflop_batch(n, cfg.seq_len, cfg.n_bits, cfg.pulse_prob, cfg.input_noise,
                                  cfg.delay, self.width, seed)
            self.splits[name] = Split(torch.from_numpy(x), torch.from_numpy(y))
        if cfg.val_fraction > 0:  # hold out the last part of the training draws
            tr = self.splits["train"]
            n_val = max(1, round(cfg.val_fraction * len(tr.x)))
            if n_val >= len(tr.x):
                raise ConfigError("task.val_fraction", f"leaves no training sequence of "
                                  f"{len(tr.x)}", "task")
            self.splits["val"] = Split(tr.x[-n_val:], tr.y[-n_val:])
            self.splits["train"] = Split(tr.x[:-n_val], tr.y[:-n_val])
        self.input_centre = 0.0

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).mean(dim=(1, 2, 3))

    def metric(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y).abs() <= 0.2).float().mean(dim=(1, 2, 3))

    def error_budget(self, out: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, Any] | None:
        from hil.network.analysis import flipflop_error_budget  # plotting stack: only when asked

        return flipflop_error_budget(out, x, y)


def make_task(cfg: TaskConfig, output_gain: float = 1000.0) -> Task:
    """The registered task named ``cfg.name`` (:data:`TASKS`)."""
    cls = TASKS.get(cfg.name)
    if cls is None:
        raise ConfigError("task.name", f"unknown task {cfg.name!r}; allowed: {', '.join(TASKS)}")
    return cls.from_config(cfg, output_gain)
