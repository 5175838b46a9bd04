"""Gradient estimators for chip-in-the-loop training (issue 22): how the chip's parameters get a
gradient, and how much device time each step costs.

Every estimator returns, from :meth:`Estimator.forward`, the states the readout and the loss see
(``(K, B, T, M)``, differentiable in the twin's ``W_in``, ``W_rec`` and ``bias``); the trainer is
the same for all of them. Selectable by name (``--estimator``):

- ``physics``: the physics-aware backward (paper section V): forward on the chip, backward through
  the twin pinned to the measured states (:class:`hil.chip.chip_in_loop.ChipFunction`). One upload
  and one run per step.
- ``twin:every=K``: twin-only steps (forward and backward on the twin, no device time), with a
  physics-aware chip step every ``K`` batches; after each chip step the twin's per-oscillator
  physics is re-identified from the chip batches already measured (:func:`reidentify`), so the
  twin follows the chip's mismatch and drift without a separate calibration.
- ``spsa:c=C,n=N``: model-free (simultaneous perturbation). The chip runs at the parameters and at
  ``N`` pairs of random ±C perturbations of every chip parameter at once; the directional
  derivative of the loss along each perturbation is measured on the chip, and the gradient is
  their mean times the perturbation. No model of the chip enters; the readout (on the host)
  gets its exact gradient from the measured states. ``2N + 1`` uploads and runs per step; the
  sample variance of the estimate is reported (``variance`` in :meth:`Estimator.report`).

Unbiasedness: on a noiseless, mismatch-free chip the physics-aware gradient equals the model's
exactly; the twin steps are the model's own gradient; SPSA's expectation equals the gradient of
the loss linearised in the states (to O(C^2)), with the variance it reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hil.errors import ConfigError
from hil.network.model import State

if TYPE_CHECKING:
    from hil.chip.chip_in_loop import ChipInTheLoop


class Estimator:
    """Base: :meth:`forward` on a training batch, :meth:`report` of what it did, and
    :meth:`state`/:meth:`load_state` for checkpoints (tensors and plain data)."""

    name = "estimator"

    def forward(self, loop: ChipInTheLoop, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        return {"estimator": self.spec()}

    def spec(self) -> str:
        return self.name

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        return None


class PhysicsAware(Estimator):
    """Forward on the chip, backward through the twin at the measured states."""

    name = "physics"

    def forward(self, loop: ChipInTheLoop, u: torch.Tensor) -> torch.Tensor:
        from hil.chip.chip_in_loop import ChipFunction

        tw = loop.twin
        loop.chip_steps += 1
        return ChipFunction.apply(loop, u, tw.W_in, tw.W_rec, tw.bias)


@dataclass
class TwinPeriodic(Estimator):
    """Twin-only steps, a physics-aware chip step every ``every`` batches (the first batch is
    one), and after each the twin re-identified from the last ``memory`` chip batches."""

    every: int = 10
    memory: int = 2
    reidentify_iters: int = 25
    buffer: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    reidentified: int = 0
    residual_before: list[float] = field(default_factory=list)
    residual_after: list[float] = field(default_factory=list)
    name = "twin"

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError("--estimator", f"twin:every must be >= 1, got {self.every}")
        if self.memory < 1:
            raise ConfigError("--estimator", f"twin:memory must be >= 1, got {self.memory}")

    def spec(self) -> str:
        return f"twin:every={self.every}"

    def forward(self, loop: ChipInTheLoop, u: torch.Tensor) -> torch.Tensor:
        step = loop.steps - 1  # loop.forward counted this step already
        if step % self.every:
            loop.twin_steps += 1
            xs, _ = loop.twin(u)
            loop.last_filtered = None
            return xs
        xs = PhysicsAware().forward(loop, u)
        ys = loop.last_filtered
        if ys is not None:
            self.buffer.append((u.detach(), xs.detach(), ys.detach()))
            del self.buffer[: -self.memory]
            before, after = reidentify(loop.twin, self.buffer, iters=self.reidentify_iters,
                                       seed=self.reidentified)
            self.residual_before.append(before)
            self.residual_after.append(after)
            self.reidentified += 1
        return xs

    def report(self) -> dict[str, Any]:
        return {"estimator": self.spec(), "reidentified": self.reidentified,
                "one_step_residual_before": self.residual_before[-1] if self.residual_before else None,
                "one_step_residual_after": self.residual_after[-1] if self.residual_after else None}

    def state(self) -> dict[str, Any]:
        return {"buffer": [list(b) for b in self.buffer], "reidentified": self.reidentified,
                "residual_before": list(self.residual_before), "residual_after": list(self.residual_after)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.buffer = [tuple(b) for b in state["buffer"]]
        self.reidentified = int(state["reidentified"])
        self.residual_before = list(state["residual_before"])
        self.residual_after = list(state["residual_after"])


def one_step_predictions(twin, u: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor,
                         buffers: dict[str, torch.Tensor] | None = None,
                         points: torch.Tensor | None = None) -> torch.Tensor:
    """The twin's prediction of every measured state from the measured state one input point
    before (teacher forcing): ``(K, B, T, M)``, differentiable in ``buffers`` (physics). Every
    point starts from a measurement, so all points run at once as one batch of length-1 inputs.
    ``points``: indices into the flattened ``B * T`` points to predict only those
    (``(K, len(points), M)``)."""
    K, B, T, M = xs.shape
    st = twin.initial_state(B)
    x0 = torch.cat([st.x.unsqueeze(2), xs[:, :, :-1]], 2).reshape(K, B * T, M)
    y0 = torch.cat([st.y.unsqueeze(2), ys[:, :, :-1]], 2).reshape(K, B * T, M)
    uu = u.reshape(K, B * T, 1, u.shape[-1])
    if points is not None:
        x0, y0, uu = x0[:, points], y0[:, points], uu[:, points]
    engine = twin.engine
    twin.engine = "reference"  # plain autograd: gradients reach the physics buffers
    try:
        args = (uu, State(x0, y0))
        _, fin = torch.func.functional_call(twin, buffers, args) if buffers else twin(*args)
    finally:
        twin.engine = engine
    return fin.x.reshape(K, -1, M) if points is not None else fin.x.reshape(K, B, T, M)


def reidentify(twin, batches: list[tuple[torch.Tensor, ...]], iters: int = 25,
               lr: float = 0.03, points: int = 1024, seed: int = 0) -> tuple[float, float]:
    """Fit the twin's per-oscillator ``gamma``, ``sigma`` and fixed bias (every trial) to chip
    batches ``(u, xs, ys)`` already measured, by the one-step prediction error over ``points``
    input points drawn from each batch; keep the fit for each trial only where it lowers that
    error by more than 1 %. Returns the RMS error before and after. No device time: the batches
    are measured already."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for _, xs, _ in batches:
        n = xs.shape[1] * xs.shape[2]
        picks.append(torch.randperm(n, generator=gen)[:points] if points < n else None)
    from hil.chip.chip_in_loop import BOUNDED_TYPES

    names = ("gamma", "sigma", "b_fixed")
    start = {n: getattr(twin, n).detach().clone() for n in names}
    logs = {n: start[n].abs().clamp_min(1e-12).log().requires_grad_(True) for n in ("gamma", "sigma")}
    shift = torch.zeros_like(start["b_fixed"], requires_grad=True)
    leaves = [*logs.values(), shift]
    opt = torch.optim.Adam(leaves, lr=lr)
    bounded = twin.kind in BOUNDED_TYPES

    def error(buf: dict[str, torch.Tensor] | None) -> torch.Tensor:
        e = torch.zeros(twin.K, dtype=start["gamma"].dtype)
        for (u, xs, ys), pick in zip(batches, picks, strict=True):
            if bounded:
                xs = xs.clamp(0.0, 1.0)
            pred = one_step_predictions(twin, u, xs, ys, buf, pick)
            target = xs.reshape(xs.shape[0], -1, xs.shape[-1])[:, pick] if pick is not None else xs
            e = e + ((pred - target) ** 2).flatten(1).mean(1)
        return e / len(batches)

    def current() -> dict[str, torch.Tensor]:
        return {"gamma": logs["gamma"].exp() * start["gamma"].sign(),
                "sigma": logs["sigma"].exp() * start["sigma"].sign(),
                "b_fixed": start["b_fixed"] + shift}

    with torch.no_grad():
        e0 = error(None)
    with torch.enable_grad():
        for _ in range(iters):
            loss = error(current()).sum()
            # gradients of the physics only: the network's parameters' .grad stay untouched
            for leaf, g in zip(leaves, torch.autograd.grad(loss, leaves), strict=True):
                leaf.grad = g
            opt.step()
    with torch.no_grad():
        fit = current()
        e1 = error(fit)
        # a fit that gains less than 1 % is noise (on a chip the twin already matches, Adam's
        # fixed-size first steps only wander): the twin is left as it was
        better = (e1 < 0.99 * e0).view(-1, 1, 1)
        for n in names:
            getattr(twin, n).copy_(torch.where(better, fit[n], start[n]))
        _refresh_rest(twin, [k for k in range(twin.K) if bool(better[k])])
        e_end = torch.where(better.view(-1), e1, e0)
    return float(e0.mean().sqrt()), float(e_end.mean().sqrt())


@torch.no_grad()
def _refresh_rest(twin, trials: list[int]) -> None:
    """The rest states that go with the (re-identified) physics of ``trials``."""
    from hil.chip.twin import rest_state

    for k in trials:
        rest = [rest_state(twin.kind, float(g), float(b), float(s), float(q))
                for g, s, q, b in zip(twin.gamma[k, 0], twin.sigma[k, 0], twin.q[k, 0],
                                      twin.b_fixed[k, 0], strict=True)]
        twin.x_rest[k, 0] = torch.tensor(rest, dtype=twin.x_rest.dtype)


@dataclass
class SPSA(Estimator):
    """Simultaneous-perturbation gradient of the chip's parameters, measured on the chip."""

    c: float = 0.02
    n: int = 2
    seed: int = 0
    steps: int = 0
    variance_sum: float = 0.0
    norm2_sum: float = 0.0
    name = "spsa"

    def __post_init__(self) -> None:
        if not self.c > 0:
            raise ConfigError("--estimator", f"spsa:c must be > 0, got {self.c}")
        if self.n < 1:
            raise ConfigError("--estimator", f"spsa:n must be >= 1, got {self.n}")
        self.gen = torch.Generator().manual_seed(7_777 + int(self.seed))

    def spec(self) -> str:
        return f"spsa:c={self.c:g},n={self.n}"

    def forward(self, loop: ChipInTheLoop, u: torch.Tensor) -> torch.Tensor:
        tw = loop.twin
        loop.chip_steps += 1
        return SPSAFunction.apply(loop, self, u, tw.W_in, tw.W_rec, tw.bias)

    def perturbations(self, params: tuple[torch.Tensor, ...], mask: torch.Tensor) -> list[torch.Tensor]:
        """Rademacher ±1 directions for each parameter; ``W_rec`` only where synapses exist."""
        out = []
        for i, p in enumerate(params):
            d = torch.randint(0, 2, p.shape, generator=self.gen).to(p.dtype) * 2 - 1
            out.append(d * mask if i == 1 else d)
        return out

    def report(self) -> dict[str, Any]:
        """``relative_variance``: the trace of the step estimate's covariance (from the ``n``
        samples of each step) over its squared norm, summed over steps. Since the expected
        squared norm is the gradient's plus that trace, this is the fraction of the estimate
        that is noise: near 0 a clean gradient, near 1 a step that is mostly noise (SPSA in
        thousands of dimensions with a few samples is there)."""
        rel = self.variance_sum / self.norm2_sum if self.norm2_sum > 0 else None
        return {"estimator": self.spec(), "steps": self.steps, "relative_variance": rel}

    def state(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "steps": self.steps, "variance_sum": self.variance_sum,
                "norm2_sum": self.norm2_sum}

    def load_state(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.steps = int(state["steps"])
        self.variance_sum = float(state["variance_sum"])
        self.norm2_sum = float(state["norm2_sum"])


class SPSAFunction(torch.autograd.Function):
    """Forward: the chip at ``theta`` and at ``theta ± c d_j``; backward: per trial,
    ``mean_j <g, x(theta + c d_j) - x(theta - c d_j)> / (2c) * d_j`` (the loss's change along
    ``d_j``, linearised in the measured states, so any readout and loss work unchanged)."""

    @staticmethod
    def forward(ctx, loop: ChipInTheLoop, est: SPSA, u: torch.Tensor, W_in: torch.Tensor,  # type: ignore[override]
                W_rec: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        xs, _ = loop.measure(u, W_in, W_rec, bias)
        filtered = loop.last_filtered
        params = (W_in, W_rec, bias)
        diffs, dirs = [], []
        for _ in range(est.n):
            d = est.perturbations(params, loop.twin.mask)
            plus, _ = loop.measure(u, *(p + est.c * di for p, di in zip(params, d, strict=True)))
            minus, _ = loop.measure(u, *(p - est.c * di for p, di in zip(params, d, strict=True)))
            diffs.append((plus - minus) / (2 * est.c))
            dirs.append(d)
        loop.last_filtered = filtered
        ctx.est, ctx.dirs = est, dirs
        ctx.save_for_backward(*diffs)
        return xs

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        est: SPSA = ctx.est
        diffs = ctx.saved_tensors
        samples = []
        for diff, d in zip(diffs, ctx.dirs, strict=True):
            D = (g * diff).sum(dim=(1, 2, 3))  # (K,) directional derivative per trial
            samples.append([D.view((-1,) + (1,) * (di.dim() - 1)) * di for di in d])
        n = len(samples)
        mean = [sum(s[i] for s in samples) / n for i in range(3)]
        est.steps += 1
        if n > 1:
            var = sum(float(((s[i] - mean[i]) ** 2).sum()) for s in samples for i in range(3)) / (n - 1)
            est.variance_sum += var / n  # the variance of the mean of n samples
            est.norm2_sum += sum(float((m ** 2).sum()) for m in mean)
        out = [torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0) for m in mean]
        return (None, None, None, *out)


ESTIMATORS = ("physics", "twin", "spsa")


def make_estimator(spec: str | None, seed: int = 0) -> Estimator:
    """``physics`` (default), ``twin[:every=K,memory=R]`` or ``spsa[:c=C,n=N]``."""
    spec = (spec or "physics").strip()
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    allowed = {"physics": {}, "twin": {"every": int, "memory": int},
               "spsa": {"c": float, "n": int}}
    if name not in allowed:
        raise ConfigError("--estimator", f"unknown estimator {name!r}; allowed: {', '.join(ESTIMATORS)} "
                          "(e.g. physics, twin:every=10, spsa:c=0.02,n=2)")
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed[name]:
            keys = ", ".join(allowed[name]) or "none"
            raise ConfigError("--estimator", f"{spec!r}: {item!r} is not a setting of {name} "
                              f"(settings: {keys})")
        try:
            kwargs[key] = allowed[name][key](value)
        except ValueError:
            raise ConfigError("--estimator", f"{spec!r}: {key} must be a number, got {value!r}") from None
        if isinstance(kwargs[key], float) and not math.isfinite(kwargs[key]):
            raise ConfigError("--estimator", f"{spec!r}: {key} must be finite")
    if name == "physics":
        return PhysicsAware()
    if name == "twin":
        return TwinPeriodic(**kwargs)
    return SPSA(seed=seed, **kwargs)
