"""Off-chip training of stacked trials (seeds or hyperparameter configurations).

All trials train in one job on the stacked :class:`~hil.network.model.DynamicalNetwork`. Each trial
sees its own data order (drawn from its own seed), so a seed gives the same result whether
it trains alone or beside others. A trial whose loss or state becomes non-finite is rolled
back to its last good epoch with half the learning rate; after ``max_rollbacks`` it is marked
failed and frozen, and reported as such instead of being averaged in silently.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hil.config import HardwareConfig, ModelConfig, TrainConfig
from hil.errors import ConfigError
from hil.network.model import DynamicalNetwork, State
from hil.network.tasks import Task

EVAL_CHUNK = 300


class TrialAdam:
    """Adam (Kingma & Ba) with one learning rate per trial (leading dimension)."""

    def __init__(self, params: list[torch.nn.Parameter], K: int, betas=(0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = params
        self.K = K
        self.b1, self.b2 = betas
        self.eps = eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = torch.zeros(K)

    @torch.no_grad()
    def step(self, lr: torch.Tensor, active: torch.Tensor) -> None:
        """``lr``: (K,) learning rates; trials with ``active == False`` are left untouched."""
        self.t += active.float()
        t = self.t.clamp(min=1)
        c1 = 1 - self.b1 ** t
        c2 = 1 - self.b2 ** t
        step = (lr * active.float() / c1).to(self.params[0].dtype)
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            shape = (self.K,) + (1,) * (p.dim() - 1)
            g = torch.where(active.view(shape), p.grad, torch.zeros_like(p.grad))
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            denom = (v / c2.view(shape).to(v.dtype)).sqrt_().add_(self.eps)
            p.addcdiv_(m * step.view(shape), denom, value=-1.0)

    def state_of(self, k: int) -> dict[str, Any]:
        return {"m": [m[k].clone() for m in self.m], "v": [v[k].clone() for v in self.v],
                "t": float(self.t[k])}

    def load_state_of(self, k: int, st: dict[str, Any]) -> None:
        for m, v, ms, vs in zip(self.m, self.v, st["m"], st["v"], strict=True):
            m[k].copy_(ms)
            v[k].copy_(vs)
        self.t[k] = st["t"]


@dataclass
class TrialStatus:
    seed: int
    status: str = "ok"  # ok | rolled_back | failed | pruned
    rollbacks: int = 0
    events: list[str] = field(default_factory=list)


@dataclass
class TrainResult:
    net: DynamicalNetwork
    history: list[dict[str, Any]]
    final: list[dict[str, Any]]  # per trial
    statuses: list[TrialStatus]
    seconds: float


def lr_at(lr0: torch.Tensor, decay: torch.Tensor, epoch: int) -> torch.Tensor:
    """``lr0 / (epoch / decay + 1)`` (paper, thesis eq. 6.3)."""
    return lr0 / (epoch / decay + 1)


@torch.no_grad()
def evaluate(net: DynamicalNetwork, task: Task, split: str) -> dict[str, torch.Tensor]:
    """Per-trial loss, metric and fraction of saturated neurons on a split (no gradients)."""
    data = task.splits[split]
    outs, sat = [], []
    for i in range(0, len(data), EVAL_CHUNK):
        xseq, _ = net(data.x[i : i + EVAL_CHUNK])
        outs.append(net.readout(xseq if task.per_step else xseq[:, :, -1:]))
        if net.kind == "spintronic":
            sat.append(((xseq < 0.01) | (xseq > 0.99)).float().mean(dim=(1, 2, 3)))
    out = torch.cat(outs, dim=1)
    res = {"loss": task.loss(out, data.y), "metric": task.metric(out, data.y)}
    if sat:
        res["saturated"] = torch.stack(sat).mean(0)
    return res


class Trainer:
    """Trains ``K`` trials together. ``on_epoch(epoch, record) -> set of trial indices to
    stop`` lets a caller (Optuna pruning) stop trials early. ``checkpoint(state)`` is called at
    the end of every epoch with :meth:`resume_state`; :meth:`load_resume_state` on a trainer
    built the same way continues from it to the same final weights as an uninterrupted run."""

    def __init__(
        self,
        model_cfgs: list[ModelConfig],
        train_cfgs: list[TrainConfig],
        seeds: list[int],
        task: Task,
        log: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = True,
        on_epoch: Callable[[int, dict[str, Any]], set[int]] | None = None,
        label: str = "train",
        hardware: HardwareConfig | None = None,
        checkpoint: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if not (len(model_cfgs) == len(train_cfgs) == len(seeds)):
            raise ValueError("one model config, train config and seed per trial")
        t0 = train_cfgs[0]
        for tc in train_cfgs[1:]:
            for key in ("epochs", "batch_size", "bptt", "engine", "output_gain",
                        "windows_per_epoch"):
                if getattr(tc, key) != getattr(t0, key):
                    raise ConfigError(f"train.{key}", "must be equal across trials run together")
        if task.epoch_scheme not in self.epoch_schemes():
            raise ConfigError("task.name", f"task {task.name!r} has epoch scheme "
                              f"{task.epoch_scheme!r}; this trainer runs: "
                              f"{', '.join(self.epoch_schemes())}")
        if t0.bptt not in task.bptt_modes():
            raise ConfigError("train.bptt", f"{t0.bptt!r} is not available for the {task.name} task "
                              f"(epoch scheme {task.epoch_scheme!r}); allowed: "
                              f"{', '.join(task.bptt_modes())}")
        if t0.bptt == "exact" and any(c.highpass_on for c in model_cfgs):
            raise ConfigError("train.bptt", "exact start states need model.highpass off (the "
                              "filter state is not kept along the series)")
        self.task = task
        self.tcfg = t0
        self.seeds = list(seeds)
        self.K = len(seeds)
        self.net = DynamicalNetwork(model_cfgs, task.n_in, task.n_out, seeds, task.input_centre)
        self.net.engine = t0.engine
        self.lr0 = torch.tensor([tc.lr0 for tc in train_cfgs])
        self.decay = torch.tensor([tc.lr_decay for tc in train_cfgs])
        self.grad_clip = torch.tensor([tc.grad_clip or math.inf for tc in train_cfgs])
        self.lr_factor = torch.ones(self.K)
        self.active = torch.ones(self.K, dtype=torch.bool)
        self.opt = TrialAdam(self.net.trainable(), self.K)
        self.statuses = [TrialStatus(s) for s in seeds]
        self.max_rollbacks = t0.max_rollbacks
        self.log = log
        self.progress = progress
        self.on_epoch = on_epoch
        self.label = label
        self.history: list[dict[str, Any]] = []
        self.gens = [torch.Generator().manual_seed(10_007 * int(s) + 1) for s in seeds]
        # hardware-aware training: every update sees a fresh draw of the chip's non-idealities
        self.hardware = hardware if hardware is not None and hardware.active else None
        self.hw_gens = [torch.Generator().manual_seed(7_919 * int(s) + 3) for s in seeds]
        self.checkpoint = checkpoint
        self.start_epoch = 0  # > 0 after load_resume_state
        self.seconds_before = 0.0  # training time of the epochs before a resume
        self._snapshot()

    # ------------------------------------------------------------- snapshots / rollback
    def _trial_state(self, k: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Copy of trial ``k``'s parameters and optimiser state (a rollback point)."""
        return ({n: p[k].detach().clone() for n, p in self.net.named_parameters()},
                self.opt.state_of(k))

    def _snapshot(self) -> None:
        self._snap = [self._trial_state(k) for k in range(self.K)]

    @torch.no_grad()
    def _rollback(self, k: int, why: str, epoch: int) -> None:
        params, opt_state = self._snap[k]
        for n, p in self.net.named_parameters():
            p[k].copy_(params[n])
        self.opt.load_state_of(k, opt_state)
        st = self.statuses[k]
        st.rollbacks += 1
        if st.rollbacks > self.max_rollbacks:
            st.status = "failed"
            self.active[k] = False
            st.events.append(f"epoch {epoch}: {why}; failed after {self.max_rollbacks} rollbacks")
        else:
            st.status = "rolled_back"
            self.lr_factor[k] *= 0.5
            st.events.append(
                f"epoch {epoch}: {why}; rolled back to the last good epoch, lr halved. Likely "
                "cause: the drive times the Euler step is too large (raise model.substeps, "
                "lower S/S_in or the learning rate)"
            )

    # ------------------------------------------------------------- one update
    def _update(self, x: torch.Tensor, y: torch.Tensor, epoch: int,
                state: State | None = None) -> tuple[torch.Tensor, torch.Tensor, State]:
        net = self.net
        for p in net.trainable():
            p.grad = None
        hw = net.hardware_pass(self.hardware, self.hw_gens) if self.hardware else contextlib.nullcontext()
        with hw:
            xseq, fin = net(x, state)
            out = net.readout(xseq if self.task.per_step else xseq[:, :, -1:])
        losses = self.task.loss(out, y)
        bad = ~torch.isfinite(losses.detach()) | ~torch.isfinite(fin.x.detach()).flatten(1).all(1)
        use = self.active & ~bad
        if use.any():
            (losses * use.float()).nan_to_num(0.0).sum().backward()
            with torch.no_grad():
                for p in net.trainable():
                    if p.grad is not None:
                        shape = (self.K,) + (1,) * (p.dim() - 1)
                        c = self.grad_clip.view(shape).to(p.dtype)
                        p.grad.copy_(torch.maximum(torch.minimum(p.grad, c), -c))
            self.opt.step(lr_at(self.lr0, self.decay, epoch) * self.lr_factor, use)
            net.clip_parameters()
        for k in torch.nonzero(bad & self.active).flatten().tolist():
            self._rollback(k, "non-finite loss or state", epoch)
        metric = self.task.metric(out.detach(), y)
        self._after_update(epoch)
        return losses.detach(), metric, fin.detach()

    # ------------------------------------------------------------- epochs
    def epoch_schemes(self) -> dict[str, Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
        """The training epoch of each epoch scheme (:data:`hil.task_specs.EPOCH_SCHEMES`):
        ``epoch -> (train loss, train metric)`` per trial. The task's ``epoch_scheme`` picks
        one; looked up on every call, so a subclass or a test may replace a method."""
        return {"batches": self._epoch_batches, "sequence": self._epoch_sequence}

    def _epoch_batches(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.task.splits["train"]
        n, bs = len(data), self.tcfg.batch_size
        perms = torch.stack([torch.randperm(n, generator=g) for g in self.gens])  # (K, n)
        losses, metrics, counts = torch.zeros(self.K), torch.zeros(self.K), 0
        for i in range(0, n, bs):
            idx = perms[:, i : i + bs]
            x, y = data.x[idx], data.y[idx]
            loss, metric, _ = self._update(x, y, epoch)
            b = idx.shape[1]
            losses += loss * b  # a diverged batch: NaN for the epoch (null in metrics.jsonl)
            metrics += metric * b
            counts += b
        return losses / counts, metrics / counts

    def _after_update(self, epoch: int) -> None:
        """Called after every update, whatever the epoch's scheme (chip-in-the-loop: the device
        budget, the curve)."""
        return None

    def _epoch_done(self, epoch: int, evals: dict[str, dict[str, torch.Tensor]],
                    train_metric: torch.Tensor) -> None:
        """Called at the end of every epoch, after its records (chip-in-the-loop: best weights)."""
        return None

    def _progress_extra(self) -> str:
        """More for the progress bar (chip-in-the-loop: the device time spent)."""
        return ""

    def _evaluate(self, split: str) -> dict[str, torch.Tensor]:
        return evaluate(self.net, self.task, split)

    def _epoch_sequence(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One long series (sine/square), full, truncated, shifted-start or exact-start BPTT
        (thesis 5.7)."""
        data = self.task.splits["train"]
        x, y = data.x, data.y  # (1, T, 1), (1, T)
        T = x.shape[1]
        mode, w = self.tcfg.bptt, self.task.cfg.window
        if mode == "full":
            loss, metric, _ = self._update(x, y, epoch)
            return loss, metric
        if mode == "exact":
            return self._epoch_exact(x, y, epoch)
        losses, metrics, n = torch.zeros(self.K), torch.zeros(self.K), 0
        cap = self.tcfg.windows_per_epoch
        if mode == "truncated":
            # windows of w points, shifted by one more point every epoch (thesis 5.7.4)
            off = epoch % w
            with torch.no_grad():
                _, state = self.net(x[:, :off]) if off else (None, self.net.initial_state(1))
            starts = list(range(off, T - w + 1, w))
            # windows_per_epoch: every k-th window; the state runs through the skipped ones
            k = -(-len(starts) // cap) if cap else 1
            for j, s in enumerate(starts):
                if j % k:
                    with torch.no_grad():
                        _, state = self.net(x[:, s : s + w], state)
                    continue
                loss, metric, state = self._update(x[:, s : s + w], y[:, s : s + w], epoch, state)
                losses += loss  # a diverged window: NaN for the epoch (null in metrics.jsonl)
                metrics += metric
                n += 1
            return losses / max(n, 1), metrics / max(n, 1)
        # shifted start (eq. 5.11): window i covers points i..i+w-1; its start state is the
        # previous window's start state advanced by one point with the updated parameters.
        # windows_per_epoch: windows every k points, the start state advanced by k points.
        n_win = T - w + 1
        k = -(-n_win // cap) if cap else 1
        start = self.net.initial_state(1)
        for s in range(0, n_win, k):
            loss, metric, _ = self._update(x[:, s : s + w], y[:, s : s + w], epoch, start)
            losses += loss  # a diverged window: NaN for the epoch (null in metrics.jsonl)
            metrics += metric
            n += 1
            with torch.no_grad():
                _, start = self.net(x[:, s : s + k], start)
        return losses / n, metrics / n

    def _epoch_exact(self, x: torch.Tensor, y: torch.Tensor,
                     epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncated BPTT with exact start states (what eq. 5.11 approximates).

        Every update trains on ``batch_size`` windows of ``w`` points drawn at random over
        the series (each trial from its own generator); each window starts from the state
        the network, with its current parameters, reaches at that point from rest: one
        pass over the series without gradients per update. The thesis (5.7.4) calls this
        too costly in software; for a series of a few hundred points it is cheap.
        """
        net = self.net
        T, w = x.shape[1], self.task.cfg.window
        n_win = T - w + 1
        n = self.tcfg.windows_per_epoch or n_win
        bs = self.tcfg.batch_size
        pos = torch.stack([torch.randint(0, n_win, (n,), generator=g) for g in self.gens])
        offs = torch.arange(w)
        rest = net.initial_state(1)
        losses, metrics, count = torch.zeros(self.K), torch.zeros(self.K), 0
        for i in range(0, n, bs):
            p = pos[:, i : i + bs]  # (K, b) window starts
            with torch.no_grad():
                xseq, _ = net(x)  # (K, 1, T, M) states at the end of every point
            before = xseq[:, 0].gather(1, (p - 1).clamp(min=0).unsqueeze(-1).expand(-1, -1, net.M))
            sx = torch.where((p == 0).unsqueeze(-1), rest.x.expand_as(before), before)
            idx = p.unsqueeze(-1) + offs  # (K, b, w)
            xb, yb = x[0][idx], y[0][idx]  # (K, b, w, n_in), (K, b, w)
            loss, metric, _ = self._update(xb, yb, epoch, State(sx, net.output_of(sx)))
            b = p.shape[1]
            losses += loss * b  # a diverged batch: NaN for the epoch (null in metrics.jsonl)
            metrics += metric * b
            count += b
        return losses / count, metrics / count

    def fit(self) -> TrainResult:
        from tqdm.auto import tqdm

        t_start = time.perf_counter() - self.seconds_before
        epochs = self.tcfg.epochs
        bar = tqdm(total=epochs, initial=self.start_epoch, desc=self.label,
                   disable=not self.progress, unit="epoch", dynamic_ncols=True)
        eval_splits = [s for s in ("val", "test") if s in self.task.splits]
        for epoch in range(self.start_epoch, epochs):
            if not self.active.any():  # resumed after every trial had stopped
                break
            tr_loss, tr_metric = self.epoch_schemes()[self.task.epoch_scheme](epoch)
            evals = {s: self._evaluate(s) for s in eval_splits}
            # a trial whose evaluation is non-finite also rolls back
            for k in range(self.K):
                if self.active[k] and not all(
                    bool(torch.isfinite(e["loss"][k])) for e in evals.values()
                ):
                    self._rollback(k, "non-finite evaluation loss", epoch)
            lr = lr_at(self.lr0, self.decay, epoch) * self.lr_factor
            for k, seed in enumerate(self.seeds):
                rec = {
                    "epoch": epoch, "seed": seed, "trial": k,
                    "train_loss": float(tr_loss[k]), f"train_{self.task.metric_name}":
                    float(tr_metric[k]), "lr": float(lr[k]), "status": self.statuses[k].status,
                }
                for s, e in evals.items():
                    rec[f"{s}_loss"] = float(e["loss"][k])
                    rec[f"{s}_{self.task.metric_name}"] = float(e["metric"][k])
                    if "saturated" in e:
                        rec[f"{s}_saturated"] = float(e["saturated"][k])
                self.history.append(rec)
                if self.log:
                    self.log(rec)
            self._snapshot_good()
            self._epoch_done(epoch, evals, tr_metric)
            main = evals.get("val", evals.get("test"))
            if main is not None:
                good = main["metric"][self.active]
                if good.numel():
                    bar.set_postfix_str(
                        f"median {self.task.metric_name} {float(good.median()) * 100:.1f}% "
                        f"({int(self.active.sum())}/{self.K} trials){self._progress_extra()}"
                    )
            bar.update(1)
            if self.on_epoch is not None:
                stop = self.on_epoch(epoch, {"evals": evals, "train_metric": tr_metric})
                for k in stop:
                    if self.active[k]:
                        self.active[k] = False
                        self.statuses[k].status = "pruned"
            if self.checkpoint is not None:
                self.checkpoint(self.resume_state(epoch + 1, time.perf_counter() - t_start))
            if not self.active.any():
                break
        bar.close()
        final = []
        for k, seed in enumerate(self.seeds):
            last = [r for r in self.history if r["trial"] == k][-1]
            final.append({**last, "seed": seed, "status": self.statuses[k].status,
                          "rollbacks": self.statuses[k].rollbacks,
                          "events": self.statuses[k].events})
        return TrainResult(self.net, self.history, final, self.statuses,
                           time.perf_counter() - t_start)

    # ------------------------------------------------------------- checkpoint / resume
    def resume_state(self, next_epoch: int, seconds: float = 0.0) -> dict[str, Any]:
        """Everything :meth:`fit` needs to go on from ``next_epoch`` exactly as if it had not
        stopped: weights, optimiser, per-trial status (rollbacks, lr factors, failed flags) and
        rollback points, the history, and every random generator (the global torch, numpy and
        Python ones, each trial's data order and hardware-aware draws). Tensors and plain data
        only (it loads with ``torch.load(weights_only=True)``)."""
        return {
            "epoch": int(next_epoch),
            "seconds": float(seconds),
            "net": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "opt": {"m": [m.clone() for m in self.opt.m], "v": [v.clone() for v in self.opt.v],
                    "t": self.opt.t.clone()},
            "lr_factor": self.lr_factor.clone(),
            "active": self.active.clone(),
            "statuses": [dataclasses.asdict(st) for st in self.statuses],
            "snapshots": [{"params": p, "opt": o} for p, o in self._snap],
            "history": copy.deepcopy(self.history),
            "gens": [g.get_state() for g in self.gens],
            "hw_gens": [g.get_state() for g in self.hw_gens],
            "rng": rng_state(),
        }

    @torch.no_grad()
    def load_resume_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`resume_state` (this trainer built with the same configs, seeds and
        task); :meth:`fit` then starts at the stored epoch."""
        self.net.load_state_dict(state["net"])
        for dst, src in zip(self.opt.m + self.opt.v, state["opt"]["m"] + state["opt"]["v"], strict=True):
            dst.copy_(src)
        self.opt.t.copy_(state["opt"]["t"])
        self.lr_factor.copy_(state["lr_factor"])
        self.active.copy_(state["active"])
        self.statuses = [TrialStatus(**st) for st in state["statuses"]]
        self._snap = [(s["params"], s["opt"]) for s in state["snapshots"]]
        self.history = list(state["history"])
        for g, st in zip(self.gens + self.hw_gens, state["gens"] + state["hw_gens"], strict=True):
            g.set_state(st)
        set_rng_state(state["rng"])
        self.start_epoch = int(state["epoch"])
        self.seconds_before = float(state["seconds"])

    def _snapshot_good(self) -> None:
        """Keep the last good epoch of each trial (finite parameters) for rollback."""
        for k in range(self.K):
            finite = all(bool(torch.isfinite(p[k]).all()) for p in self.net.trainable())
            if finite and self.active[k]:
                self._snap[k] = self._trial_state(k)


def rng_state() -> dict[str, Any]:
    """The global torch, numpy and Python random states, as tensors and plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": int(version), "internal": [int(v) for v in internal],
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def summarize(values: list[float]) -> dict[str, float]:
    """Median, mean, standard deviation, quartiles, min and max."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size), "median": float(np.median(a)), "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "q25": float(np.percentile(a, 25)), "q75": float(np.percentile(a, 75)),
        "min": float(a.min()), "max": float(a.max()),
    }


def clone_cfg(cfg: Any, **changes: Any) -> Any:
    c = copy.deepcopy(cfg)
    for k, v in changes.items():
        setattr(c, k, v)
    return c
