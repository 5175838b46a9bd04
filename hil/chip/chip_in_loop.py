"""Chip-in-the-loop training (physics-aware training): the forward pass runs on the chip, the
backward pass differentiates the model (the twin) at what the chip measured.

:class:`ChipFunction` is the ``torch.autograd.Function``: its forward uploads every trial's
parameters to that trial's backend and runs the batch there, returning the measured states;
its backward rebuilds the twin's trajectory *pinned to the measured states*::

    x~_t = Phi(x~_{t-1}, u_t; theta)  with its value replaced by the measured x_t (and y_t)

so that the value is the chip's and the Jacobians ``dPhi/dx`` and ``dPhi/dtheta`` are the twin's,
evaluated where the chip actually was at every input point. When a backend measures only its
outputs, the backward falls back to the classic form: the twin's own trajectory at the same
parameters and inputs, with the output gradient taken at the measured outputs.

:class:`ChipInTheLoop` wraps the twin so that the ordinary :class:`~hil.training.train.Trainer` trains it
unchanged (rollback, per-trial learning rates, per-epoch evaluation, now measured on the chip);
:class:`ChipInTheLoopTrainer` does the wrapping. :func:`train_in_the_loop_run` is the job behind
``hil train --backend NAME --in-the-loop``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from hil.chip.backends import Backend, Measurement, layers_from_tensors, make_backend
from hil.chip.estimators import Estimator, PhysicsAware, make_estimator
from hil.chip.twin import TwinMonitor, TwinParameters, apply_twin, calibrate
from hil.config import ModelConfig, RunConfig, TrainConfig
from hil.errors import ConfigError
from hil.network.engine import record_engine
from hil.network.model import DynamicalNetwork, State
from hil.network.tasks import Task
from hil.runs import RunFolder
from hil.training.train import Trainer, TrainResult
from sims.neurons import CLIPPED_TYPES

#: Neuron types whose state is a normalised power in [0, 1].
BOUNDED_TYPES = ("spintronic", *CLIPPED_TYPES)
#: Measured powers below this are not pinned in the backward pass (see :func:`pinned_twin`).
PIN_FLOOR = 0.02


def pinned_twin(twin: DynamicalNetwork, u: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor,
                params: dict[str, torch.Tensor], pin_floor: float = PIN_FLOOR) -> torch.Tensor:
    """The twin's trajectory pinned to measured states: differentiable in ``params`` (and the
    chain through every point), valued at the measured ``xs``. ``u (K,B,T,n_in)``,
    ``xs, ys (K,B,T,M)`` measured states and filter outputs.

    For the oscillator (whose drive term is ``I x (1 - x)``) a state measured below ``pin_floor``
    is not pinned: such a reading is mostly readout noise, and the twin's own (tiny) value
    keeps the model's exact cancellation between the huge sensitivity of the final state to an
    almost-off neuron's state and its vanishing sensitivity to the parameters; pinning it to a
    noise-sized value instead multiplies the two and the gradient explodes."""
    K, B, T, _ = xs.shape
    bounded = twin.kind in BOUNDED_TYPES
    if bounded:
        # readout noise can put a measured power outside [0, 1]; the state itself is not there
        xs = xs.clamp(0.0, 1.0)
    st = twin.initial_state(B)
    x_prev, y_prev = st.x, st.y
    out = []
    for t in range(T):
        _, fin = torch.func.functional_call(twin, params, (u[:, :, t : t + 1], State(x_prev, y_prev)))
        meas = xs[:, :, t]
        if bounded and pin_floor > 0:
            meas = torch.where(meas > pin_floor, meas, fin.x.detach())
        x_prev = fin.x + (meas - fin.x).detach()
        y_prev = fin.y + (ys[:, :, t] - fin.y).detach()
        out.append(x_prev)
    return torch.stack(out, 2)


class ChipFunction(torch.autograd.Function):
    """Forward on the chips, backward through the twin at the measured states (module docstring)."""

    @staticmethod
    def forward(ctx, loop: ChipInTheLoop, u: torch.Tensor, W_in: torch.Tensor,  # type: ignore[override]
                W_rec: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        xs, ys = loop.measure(u, W_in, W_rec, bias)
        ctx.loop = loop
        ctx.has_states = ys is not None
        ctx.save_for_backward(u, xs, ys if ys is not None else xs, W_in, W_rec, bias)
        return xs

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        u, xs, ys, W_in, W_rec, bias = ctx.saved_tensors
        loop: ChipInTheLoop = ctx.loop
        twin = loop.twin
        with torch.enable_grad():
            p = {"W_in": W_in.detach().requires_grad_(True), "W_rec": W_rec.detach().requires_grad_(True),
                 "bias": bias.detach().requires_grad_(True)}
            if ctx.has_states:
                pred = pinned_twin(twin, u, xs, ys, p)
                grads = torch.autograd.grad(pred, list(p.values()), g, allow_unused=True)
            else:
                free, _ = torch.func.functional_call(twin, p, (u,))
                last = slice(twin.M - twin.N, twin.M)
                grads = torch.autograd.grad(free[..., last], list(p.values()), g[..., last],
                                            allow_unused=True)
        loop.backward_calls += 1
        out = []
        for gr in grads:
            if gr is not None and not bool(torch.isfinite(gr).all()):
                loop.nonfinite_backward += 1  # counted and reported; the step ignores those entries
                gr = torch.nan_to_num(gr, nan=0.0, posinf=0.0, neginf=0.0)
            out.append(gr)
        return (None, None, *out)


class ChipInTheLoop(nn.Module):
    """The network as the trainer sees it: parameters and readout are the twin's, the forward
    pass is measured on one backend per trial (``backends[k]`` is trial ``k``'s chip)."""

    def __init__(self, twin: DynamicalNetwork, backends: list[Backend],
                 monitor: TwinMonitor | None = None, estimator: Estimator | None = None) -> None:
        super().__init__()
        if len(backends) != twin.K:
            raise ConfigError("--backend", f"one backend per trial is needed: {twin.K} trials, "
                              f"{len(backends)} backends")
        for be in backends:
            sp = be.spec
            if (sp.n_in, sp.n_layers, sp.n_hidden) != (twin.n_in, twin.L, twin.N):
                raise ConfigError("--backend", f"{be.name}: implements n_in={sp.n_in}, "
                                  f"{sp.n_layers} layers x {sp.n_hidden}, the model n_in={twin.n_in}, "
                                  f"{twin.L} x {twin.N}")
        self.twin = twin
        self.backends = backends
        self.monitor = monitor
        self.steps = 0
        self.backward_calls = 0
        self.nonfinite_backward = 0
        self.last_filtered: torch.Tensor | None = None
        self._uploaded: list[tuple[torch.Tensor, ...] | None] = [None] * twin.K
        self.estimator = estimator if estimator is not None else PhysicsAware()
        self.chip_steps = 0  # training steps that ran the chip
        self.twin_steps = 0  # training steps on the twin alone (no device time)
        # device time spent measuring the test split (reporting only: not part of the budget)
        self.test_time_s = [0.0] * twin.K
        # trials whose chip is still trained; a stopped trial's chip is left idle in training
        # steps (its states come from the twin), so that it spends no more device time; it is
        # still measured when the network is evaluated
        self.active: torch.Tensor = torch.ones(twin.K, dtype=torch.bool)
        self._idle = torch.zeros(twin.K, dtype=torch.bool)  # this pass's idle trials

    # ---------------------------------------------------------------- what the trainer uses
    kind = property(lambda self: self.twin.kind)
    K = property(lambda self: self.twin.K)
    M = property(lambda self: self.twin.M)
    N = property(lambda self: self.twin.N)
    L = property(lambda self: self.twin.L)
    n_in = property(lambda self: self.twin.n_in)
    n_out = property(lambda self: self.twin.n_out)
    seeds = property(lambda self: self.twin.seeds)
    configs = property(lambda self: self.twin.configs)

    def readout(self, xseq: torch.Tensor) -> torch.Tensor:
        return self.twin.readout(xseq)

    def trainable(self) -> list[nn.Parameter]:
        return self.twin.trainable()

    def clip_parameters(self) -> None:
        self.twin.clip_parameters()

    def layer_weights(self, k: int = 0) -> list[dict[str, torch.Tensor]]:
        return self.twin.layer_weights(k)

    def invalidate(self) -> None:
        """Forget what was uploaded (someone else programmed the chips)."""
        self._uploaded = [None] * self.K

    # ---------------------------------------------------------------- forward
    def forward(self, u: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if state is not None:
            raise ConfigError("train.bptt", "chip-in-the-loop runs whole sequences from the chip's "
                              "rest state; truncated or shifted BPTT is not available")
        if u.dim() == 3:
            u = u.unsqueeze(0).expand(self.K, *u.shape)
        if torch.is_grad_enabled():
            self.steps += 1
            if self.monitor is not None and self.steps % self.monitor.every == 0:
                self.monitor.check(self.twin, self.backends, self.steps)
                self.invalidate()
        tw = self.twin
        training = torch.is_grad_enabled()
        self._idle = ~self.active if training else torch.zeros_like(self.active)
        if training:
            xs = self.estimator.forward(self, u.contiguous())
        else:  # evaluation: every trial measured on its chip
            xs = ChipFunction.apply(self, u.contiguous(), tw.W_in, tw.W_rec, tw.bias)
        y_last = (self.last_filtered[:, :, -1] if self.last_filtered is not None
                  else torch.zeros_like(xs[:, :, -1]))
        return xs, State(xs[:, :, -1], y_last)

    @torch.no_grad()
    def measure(self, u: torch.Tensor, W_in: torch.Tensor, W_rec: torch.Tensor, bias: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Upload (if changed) and run every trial on its backend; ``(states, filtered)``, each
        ``(K, B, T, M)``; hidden layers come from the twin when a backend measures outputs only."""
        tw = self.twin
        Wm = W_rec * tw.mask
        xs_all, ys_all = [], []
        free = None
        for k, be in enumerate(self.backends):
            if bool(self._idle[k]):  # stopped, training: the chip stays idle, the twin stands in
                if free is None:
                    free, _ = tw(u)
                xs_all.append(free[k].clone())
                ys_all.append(torch.zeros_like(free[k]))  # placeholder filter outputs
                continue
            cur = (W_in[k].detach(), Wm[k].detach(), bias[k].detach())
            last = self._uploaded[k]
            if last is None or not all(torch.equal(a, b) for a, b in zip(cur, last, strict=True)):
                be.upload(layers_from_tensors(*cur, tw.L, tw.N))
                self._uploaded[k] = tuple(c.clone() for c in cur)
            m: Measurement = be.run(u[k])
            if m.states is not None and m.filtered is not None:
                xs_all.append(torch.as_tensor(m.states, dtype=W_in.dtype))
                ys_all.append(torch.as_tensor(m.filtered, dtype=W_in.dtype))
            else:
                if free is None:
                    free, _ = tw(u)
                x = free[k].clone()
                x[..., tw.M - tw.N :] = torch.as_tensor(m.outputs, dtype=W_in.dtype)
                xs_all.append(x)
                ys_all.append(None)  # type: ignore[arg-type]
        xs = torch.stack(xs_all)
        # an idle trial's filter outputs are placeholders; they count only if a chip measured some
        ys = (torch.stack(ys_all) if not bool(self._idle.all()) and all(y is not None for y in ys_all)
              else None)
        self.last_filtered = ys
        return xs, ys

    def device_counters(self, k: int) -> dict[str, float]:
        """Trial ``k``'s chip use: ``device_time_s`` everything the chip spent (calibration,
        uploads, relaxation, runs), ``train_device_time_s`` the same without measuring the test
        split (what a training budget counts)."""
        c = self.backends[k].counters
        return {"device_runs": c["runs"], "device_uploads": c["uploads"],
                "device_sequences": c["sequences"], "device_time_s": c["device_time_s"],
                "upload_time_s": c["upload_time_s"], "train_device_time_s": self.train_time_s(k)}

    def train_time_s(self, k: int) -> float:
        return float(self.backends[k].counters["device_time_s"] - self.test_time_s[k])

    @contextlib.contextmanager
    def measuring_test(self) -> Iterator[None]:
        """Device time spent inside the block is reporting, not training (``test_time_s``)."""
        before = [be.counters["device_time_s"] for be in self.backends]
        try:
            yield
        finally:
            for k, be in enumerate(self.backends):
                self.test_time_s[k] += be.counters["device_time_s"] - before[k]

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        """Counters, what is on each chip, the estimator's and the monitor's state and each
        backend's (:meth:`hil.chip.backends.Backend.state`): tensors and plain data."""
        return {"steps": self.steps, "backward_calls": self.backward_calls,
                "nonfinite_backward": self.nonfinite_backward, "chip_steps": self.chip_steps,
                "twin_steps": self.twin_steps, "test_time_s": list(self.test_time_s),
                "uploaded": [None if u is None else list(u) for u in self._uploaded],
                "estimator": self.estimator.state(),
                "monitor": None if self.monitor is None else {
                    "baseline": {str(k): v for k, v in self.monitor.baseline.items()},
                    "recalibrations": self.monitor.recalibrations},
                "backends": [be.state() for be in self.backends]}

    def load_state(self, state: dict[str, Any]) -> None:
        for key in ("steps", "backward_calls", "nonfinite_backward", "chip_steps", "twin_steps"):
            setattr(self, key, int(state[key]))
        self.test_time_s = [float(v) for v in state["test_time_s"]]
        self.estimator.load_state(state["estimator"])
        if self.monitor is not None and state["monitor"] is not None:
            self.monitor.baseline = {int(k): float(v) for k, v in state["monitor"]["baseline"].items()}
            self.monitor.recalibrations = int(state["monitor"]["recalibrations"])
        for k, (be, st) in enumerate(zip(self.backends, state["backends"], strict=True)):
            same_chip = st is not None and be.load_state(st)
            # a chip that could not be put back as it was gets the parameters uploaded again
            u = state["uploaded"][k]
            self._uploaded[k] = tuple(u) if same_chip and u is not None else None


def check_loop_settings(estimator: Estimator | str | None, device_budget_s: float | None,
                        curve_every: int, source: str | None = None, seed: int = 0) -> Estimator:
    """The estimator (built from its spec, a stochastic one seeded with ``seed``), or one
    :class:`ConfigError` for a wrong spec, a device budget that is not > 0 or a negative
    ``curve_every``: the trainer, the job, the CLI and the API check these before anything is
    opened."""
    if device_budget_s is not None and not device_budget_s > 0:
        raise ConfigError("--device-budget", f"must be > 0 seconds, got {device_budget_s}", source)
    if curve_every < 0:
        raise ConfigError("--curve-every", f"must be >= 0, got {curve_every}", source)
    return estimator if isinstance(estimator, Estimator) else make_estimator(estimator, seed)


class TwinTrainer(Trainer):
    """Off-chip training on the model with per-trial twin physics (e.g. calibrated on each chip)
    and, optionally, starting from given weights (``init``, a DynamicalNetwork state dict)."""

    def __init__(self, model_cfgs: list[ModelConfig], train_cfgs: list[TrainConfig], seeds: list[int],
                 task: Task, twins: list[TwinParameters] | None = None,
                 init: dict[str, torch.Tensor] | None = None, **kwargs: Any) -> None:
        super().__init__(model_cfgs, train_cfgs, seeds, task, **kwargs)
        _prepare(self.net, init, twins)
        self._snapshot()


def _prepare(net: DynamicalNetwork, init: dict[str, torch.Tensor] | None,
             twins: list[TwinParameters] | None) -> None:
    if init is not None:
        load_parameters(net, init)
    if twins is not None:
        if len(twins) != net.K:
            raise ConfigError("twin", f"one twin per trial is needed, got {len(twins)}")
        for k, tp in enumerate(twins):
            apply_twin(net, k, tp)


class ChipInTheLoopTrainer(Trainer):
    """:class:`~hil.training.train.Trainer` with the forward pass on ``backends`` (one per trial).

    ``init``: a DynamicalNetwork state dict (e.g. off-chip trained weights) to start from;
    ``twins``: per-trial twin physics for the backward pass (default: the nominal model);
    ``estimator``: how the chip's parameters get their gradient (:mod:`hil.chip.estimators`).

    Device time is a budget (issue 22): ``device_budget_s`` stops each trial once its chip has
    spent that much on training (calibration, uploads, relaxation and runs; measuring the test
    split is reporting and not counted) and puts back its best weights so far (by the
    validation metric measured on the chip, or the training metric where there is no validation
    split). ``curve_every``: also measure the test split every that many updates, so that
    accuracy versus device time has more points than epochs (``curve`` records in the log)."""

    def __init__(self, model_cfgs: list[ModelConfig], train_cfgs: list[TrainConfig], seeds: list[int],
                 task: Task, backends: list[Backend], twins: list[TwinParameters] | None = None,
                 init: dict[str, torch.Tensor] | None = None, monitor: TwinMonitor | None = None,
                 log: Callable[[dict[str, Any]], None] | None = None, progress: bool = True,
                 label: str = "chip-in-the-loop", estimator: Estimator | str | None = None,
                 device_budget_s: float | None = None, curve_every: int = 0,
                 checkpoint: Callable[[dict[str, Any]], None] | None = None) -> None:
        user_log = log

        def with_counters(rec: dict[str, Any]) -> None:
            if isinstance(self.net, ChipInTheLoop):
                rec.update(self.net.device_counters(rec["trial"]))
            if user_log:
                user_log(rec)

        estimator = check_loop_settings(estimator, device_budget_s, curve_every, seed=seeds[0])
        super().__init__(model_cfgs, train_cfgs, seeds, task, log=with_counters, progress=progress,
                         label=label, checkpoint=checkpoint)
        twin = self.net
        _prepare(twin, init, twins)
        self.net = ChipInTheLoop(twin, backends, monitor, estimator)  # type: ignore[assignment]
        self.loop: ChipInTheLoop = self.net  # type: ignore[assignment]
        self.loop.active = self.active  # the same tensor: a stopped trial's chip goes idle
        self.device_budget_s = device_budget_s
        self.curve_every = int(curve_every)
        self.curve: list[dict[str, Any]] = []
        self._snapshot()
        # the best weights so far, by the chip-measured score (the start counts as -inf)
        self.best_score = [-float("inf")] * self.K
        self.best_params = [self._trial_state(k)[0] for k in range(self.K)]
        self.user_log = user_log

    @property
    def updates(self) -> int:
        """Training updates so far (each is one training forward of the loop)."""
        return self.loop.steps

    @property
    def budget_stopped(self) -> list[int]:
        """Trials stopped by the device budget."""
        return [k for k, st in enumerate(self.statuses) if st.status == "budget"]

    def curve_record(self, k: int, epoch: int, value: float, **flags: bool) -> dict[str, Any]:
        """One point of trial ``k``'s accuracy-vs-device-time curve, kept in ``curve``."""
        rec = {"event": "curve", "epoch": epoch, "update": self.updates, "seed": self.seeds[k],
               "trial": k, f"test_{self.task.metric_name}": value,
               "train_device_time_s": self.loop.train_time_s(k), **flags}
        self.curve.append(rec)
        return rec

    # ------------------------------------------------------------- device time
    def _progress_extra(self) -> str:
        t = [self.loop.train_time_s(k) for k in range(self.K)]
        budget = f" of {self.device_budget_s:g}" if self.device_budget_s is not None else ""
        return f", device {max(t):.2f}{budget} s/chip"

    def _evaluate(self, split: str) -> dict[str, torch.Tensor]:
        if split != "test":
            return super()._evaluate(split)
        with self.loop.measuring_test():
            return super()._evaluate(split)

    def _after_update(self, epoch: int) -> None:
        if self.device_budget_s is not None:
            for k in range(self.K):
                if self.active[k] and self.loop.train_time_s(k) >= self.device_budget_s:
                    self._stop_on_budget(k, epoch)
        if self.curve_every and self.updates % self.curve_every == 0 and self.active.any():
            self._curve_point(epoch)

    def _curve_point(self, epoch: int) -> None:
        """Measure the test split now (not counted in the budget) and log one point per trial."""
        ev = self._evaluate("test")
        for k in range(self.K):
            if not self.active[k]:  # a stopped trial's last point is its final one (fit)
                continue
            rec = self.curve_record(k, epoch, float(ev["metric"][k]))
            if self.user_log:
                self.user_log(rec)

    @torch.no_grad()
    def _stop_on_budget(self, k: int, epoch: int) -> None:
        self.active[k] = False
        st = self.statuses[k]
        st.status = "budget"
        st.events.append(f"epoch {epoch}: device budget of {self.device_budget_s:g} s spent "
                         f"({self.loop.train_time_s(k):.3f} s); best weights so far put back")
        for n, p in self.net.named_parameters():
            p[k].copy_(self.best_params[k][n])

    def _epoch_done(self, epoch: int, evals: dict[str, dict[str, torch.Tensor]],
                    train_metric: torch.Tensor) -> None:
        score = evals["val"]["metric"] if "val" in evals else train_metric
        for k in range(self.K):
            if self.active[k] and float(score[k]) > self.best_score[k]:
                self.best_score[k] = float(score[k])
                self.best_params[k] = self._trial_state(k)[0]
        for k in range(self.K):
            if self.active[k]:
                self.curve_record(k, epoch, float(evals["test"]["metric"][k]), epoch_end=True)

    def fit(self) -> TrainResult:
        result = super().fit()
        stopped = self.budget_stopped
        if stopped:  # the final records: the put-back best weights, measured on the chip
            metric = self.task.metric_name
            ev = self._evaluate("test")
            for k in stopped:
                f = result.final[k]
                f[f"test_{metric}"] = float(ev["metric"][k])
                f["test_loss"] = float(ev["loss"][k])
                rec = self.curve_record(k, f["epoch"], f[f"test_{metric}"], final=True)
                if self.user_log:
                    self.user_log(rec)
        return result

    # ------------------------------------------------------------- checkpoint / resume
    def resume_state(self, next_epoch: int, seconds: float = 0.0) -> dict[str, Any]:
        st = super().resume_state(next_epoch, seconds)
        # which trials are stopped, and why, is the trainer's own state (active, statuses)
        st["chip"] = {"loop": self.loop.state(), "curve": copy.deepcopy(self.curve),
                      "best_score": list(self.best_score),
                      "best_params": [dict(b) for b in self.best_params]}
        return st

    def load_resume_state(self, state: dict[str, Any]) -> None:
        super().load_resume_state(state)
        c = state["chip"]
        self.loop.load_state(c["loop"])
        self.curve = list(c["curve"])
        self.best_score = [float(v) for v in c["best_score"]]
        self.best_params = [dict(b) for b in c["best_params"]]


@torch.no_grad()
def load_parameters(net: DynamicalNetwork, state: dict[str, torch.Tensor]) -> None:
    """Copy trainable parameters (and masks) from a DynamicalNetwork state dict of the same shape."""
    for name in ("W_in", "W_rec", "bias", "W_out", "b_out", "mask"):
        src = state[name]
        dst = getattr(net, name)
        if src.shape != dst.shape:
            raise ConfigError("--init", f"{name} has shape {tuple(src.shape)}, the model "
                              f"{tuple(dst.shape)}: same structure and seeds are needed")
        dst.copy_(src)


# ----------------------------------------------------------------------------- the job

#: what ``hil train --in-the-loop`` keeps beside the config, so that ``--resume`` rebuilds the same run
LOOP_SETTINGS = ("backend", "device", "twin", "init", "monitor_every", "monitor_ratio", "estimator",
                 "device_budget_s", "curve_every")


def train_in_the_loop_run(cfg: RunConfig, folder: RunFolder, backend: str,
                          device: list[str] | dict[str, Any] | None = None, twin: str = "calibrated",
                          init: str | None = None, monitor_every: int = 0, monitor_ratio: float = 1.5,
                          progress: bool = True, estimator: str | None = None,
                          device_budget_s: float | None = None, curve_every: int = 0,
                          resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``cfg``'s seeds with the chip in the loop (one simulated chip per seed, drawn with
    that seed); write metrics (with device counters), twin calibrations and events, the final
    sim-to-real report and the checkpoint of the twin to ``folder``.

    Every epoch ends with ``checkpoint.pt`` (the trainer, the twin, the estimator and each chip's
    state as far as the backend can give it: the simulated chip entirely, so that a resumed run
    on it ends with the same weights as an uninterrupted one). ``resume``: such a checkpoint
    (from :func:`hil.training.checkpoints.check_resume`); the run goes on in its own folder with its own
    settings, without calibrating again (the twin is in the checkpoint)."""
    from hil.chip.study import sim_to_real_report
    from hil.network.tasks import make_task
    from hil.training.checkpoints import (
        CHECKPOINT_FILE,
        CHECKPOINT_FORMAT,
        load_run,
        plain,
        resume_trainer,
        save_checkpoint,
    )
    from hil.training.train import summarize

    if twin not in ("nominal", "calibrated"):
        raise ConfigError("--twin", f"unknown twin {twin!r}; allowed: nominal, calibrated")
    check_loop_settings(estimator, device_budget_s, curve_every)  # before any chip is opened
    settings = {"backend": backend, "device": plain(device), "twin": twin, "init": init,
                "monitor_every": monitor_every, "monitor_ratio": monitor_ratio, "estimator": estimator,
                "device_budget_s": device_budget_s, "curve_every": curve_every}
    torch.manual_seed(cfg.seeds[0])
    if resume is None:
        folder.write_config(cfg.to_dict())
        record_engine(folder, cfg.train.engine)
        folder.write_json("loop_settings.json", settings)
    task = make_task(cfg.task, cfg.train.output_gain)
    K = len(cfg.seeds)
    backends = [make_backend(backend, cfg.model, task.n_in, task.input_centre, s, device) for s in cfg.seeds]
    if resume is None:
        folder.write_json("backends.json", [b.describe() for b in backends])
    config = plain(cfg.to_dict())
    try:
        twins = None
        init_state = None
        if resume is None and twin == "calibrated":
            twins = [calibrate(be, cfg.model) for be in backends]
            folder.write_json("twin_calibration.json", [t.to_dict() for t in twins])
        if init and resume is None:
            from pathlib import Path

            p = Path(init)
            _, _, src = load_run(p if p.is_dir() else p.parent)
            if list(src.seeds) != list(cfg.seeds):
                raise ConfigError("--init", f"the checkpoint has seeds {src.seeds}, the run {cfg.seeds}")
            init_state = src.state_dict()
        monitor = None
        if monitor_every:
            probe = task.splits["train"].x[:32]

            def on_event(rec: dict[str, Any]) -> None:
                folder.append_metrics(rec, "twin_events.jsonl")

            monitor = TwinMonitor(probe=probe, every=monitor_every, ratio=monitor_ratio, on_event=on_event)

        def checkpoint(state: dict[str, Any]) -> None:
            folder.save_torch(CHECKPOINT_FILE, {"format": CHECKPOINT_FORMAT, "mode": "chip-in-the-loop",
                                                "config": config, "loop": settings, "trainer": state})

        trainer = ChipInTheLoopTrainer([cfg.model] * K, [cfg.train] * K, cfg.seeds, task, backends,
                                       twins=twins, init=init_state, monitor=monitor,
                                       log=folder.append_metrics, progress=progress,
                                       label=f"{cfg.task.name} chip-in-the-loop x{K}", estimator=estimator,
                                       device_budget_s=device_budget_s, curve_every=curve_every,
                                       checkpoint=checkpoint)
        if resume is not None:
            resume_trainer(trainer, resume, folder)
        result = trainer.fit()
        loop: ChipInTheLoop = result.net  # type: ignore[assignment]
        metric = task.metric_name
        ok = [f for f in result.final if f["status"] != "failed"]
        twin_result = TrainResult(loop.twin, result.history, result.final, result.statuses, result.seconds)
        save_checkpoint(twin_result, cfg, folder.file("model.pt"))
        folder.write_json("final.json", result.final)
        with loop.measuring_test():
            report = sim_to_real_report(loop.twin, task, backends, folder)
        summary = {
            "task": cfg.task.name, "mode": "chip-in-the-loop", "backend": backend, "twin": twin,
            "estimator": loop.estimator.report(), "device_budget_s": device_budget_s,
            "budget_stopped_seeds": [cfg.seeds[k] for k in trainer.budget_stopped],
            "metric": metric, "test_on_device": summarize([f[f"test_{metric}"] for f in ok]),
            "failed_seeds": [f["seed"] for f in result.final if f["status"] == "failed"],
            "train_seconds": result.seconds,
            "device": [loop.device_counters(k) for k in range(K)],
            "chip_steps": loop.chip_steps, "twin_steps": loop.twin_steps,
            "backward_calls": loop.backward_calls, "nonfinite_backward": loop.nonfinite_backward,
            "twin_recalibrations": monitor.recalibrations if monitor else 0,
            "sim_to_real": report["summary"],
        }
        folder.write_json("summary.json", summary)
        folder.write_json("device_time_curve.json", trainer.curve)
        from hil import plots

        plots.accuracy_curves(result.history, metric, folder.file("accuracy.png"))
        if trainer.curve:
            plots.device_time_curves({loop.estimator.spec(): trainer.curve}, metric,
                                     folder.file("device_time.png"),
                                     title=f"{cfg.task.name}: accuracy vs device time")
        folder.file(CHECKPOINT_FILE).unlink(missing_ok=True)  # model.pt and the results are written
        return summary
    finally:
        for be in backends:
            be.close()


def print_summary(summary: dict[str, Any], folder: RunFolder) -> None:
    s = summary["test_on_device"]
    m = summary["metric"]
    print(f"\nchip-in-the-loop ({summary['backend']}, {summary['twin']} twin): test {m} on the device "
          f"over {s['n']} seed(s): median {100 * s['median']:.2f} %, mean {100 * s['mean']:.2f} "
          f"± {100 * s['std']:.2f} %")
    dev = summary["device"]
    print(f"device: {int(np.sum([d['device_runs'] for d in dev]))} runs, "
          f"{int(np.sum([d['device_uploads'] for d in dev]))} uploads, "
          f"{np.sum([d['device_time_s'] for d in dev]):.3f} s of device time "
          f"({np.sum([d['train_device_time_s'] for d in dev]):.3f} s for training, uploads "
          f"{np.sum([d['upload_time_s'] for d in dev]):.3f} s of it); estimator "
          f"{summary['estimator']['estimator']}: {summary['chip_steps']} chip steps, "
          f"{summary['twin_steps']} twin steps")
    if summary.get("budget_stopped_seeds"):
        print(f"device budget of {summary['device_budget_s']:g} s reached by seeds "
              f"{summary['budget_stopped_seeds']}: their best weights so far were kept")
    print(f"run folder: {folder}")
