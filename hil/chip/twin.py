"""The digital twin: identify a chip's per-oscillator physics, verify what was programmed, and
watch for drift.

Calibration (:func:`calibrate`)
    With every weight at zero, each oscillator feels only its own bias, so one upload of a bias
    level ``b`` probes all oscillators at once: from rest, the state follows the step response
    of paper eq. 1 under the constant drive ``I = S b + c`` (``c`` = fixed bias + the
    oscillator's offset). That response is logistic and has a closed form::

        r = sigma I - gamma,   a = sigma I + gamma Q,
        x(t) = x0 e^{r t} / (1 + a x0 (e^{r t} - 1) / r)

    Several levels, each averaged over repeated sequences, are fitted together by least squares
    for ``gamma_i``, ``sigma_i``, ``c_i`` (and the start ``x0_i``). Any drive ``I(t)`` enters as
    ``sigma S``, ``sigma c - gamma`` and ``sigma c + gamma Q`` only, so ``gamma``, ``Q`` and the
    offset cannot all be separated from the oscillator's state: ``Q`` is held at its nominal
    value (0 in the paper) and the other three are identified.

Program and verify (:func:`program_and_verify`)
    After an upload, probe sequences are run on the chip; the effective parameters are
    identified by fitting the twin's one-input-point map, started from the measured states,
    to the measured next states; the residual (effective minus intended) is logged per
    parameter, subtracted from what is uploaded, and the loop repeats until within tolerance.

Monitoring (:class:`TwinMonitor`)
    Every N training steps the free-running twin and the chip are compared on a fixed probe
    set; past a threshold (relative to the residual right after calibration) the twin is
    re-identified and the event recorded.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hil.chip.backends import Backend, BackendError
from hil.config import ModelConfig
from hil.errors import ConfigError
from hil.network.model import DynamicalNetwork, State
from sims.neurons import rest_state

DEFAULT_LEVELS = (-1.0, 0.0, 1.0)  # bias probe levels, fractions of b_max (on any symmetric grid)
DEFAULT_REPEATS = 512  # runs averaged per upload, against noise
DEFAULT_WRITES = 8  # uploads averaged per probe level, against write errors


@dataclass
class TwinParameters:
    """Per-oscillator physics of one chip as identified (or nominal). Arrays of length M."""

    gamma_ghz: np.ndarray
    sigma: np.ndarray
    q: np.ndarray
    b_fixed: np.ndarray  # fixed bias + the oscillator's offset
    offset_ghz: np.ndarray  # b_fixed - nominal fixed bias
    fit_rmse: np.ndarray | None = None  # per oscillator, state units
    source: str = "nominal"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
             for k, v in dataclasses.asdict(self).items()}
        return d

    @classmethod
    def nominal(cls, cfg: ModelConfig) -> TwinParameters:
        M = cfg.n_layers * cfg.n_hidden
        return cls(np.full(M, cfg.gamma), np.full(M, cfg.sigma), np.full(M, cfg.q),
                   np.full(M, cfg.b_fixed_value), np.zeros(M), source="nominal")


# ----------------------------------------------------------------------------- twin networks

@torch.no_grad()
def apply_twin(net: DynamicalNetwork, k: int, twin: TwinParameters) -> None:
    """Give trial ``k`` of ``net`` the per-oscillator ``gamma``, ``sigma``, ``Q`` and fixed bias
    of ``twin`` (and the matching rest states)."""
    if len(twin.gamma_ghz) != net.M:
        raise ConfigError("twin", f"has {len(twin.gamma_ghz)} oscillators, the model {net.M}")
    net.gamma[k, 0] = torch.as_tensor(twin.gamma_ghz, dtype=net.gamma.dtype)
    net.sigma[k, 0] = torch.as_tensor(twin.sigma, dtype=net.sigma.dtype)
    net.q[k, 0] = torch.as_tensor(twin.q, dtype=net.q.dtype)
    net.b_fixed[k, 0] = torch.as_tensor(twin.b_fixed, dtype=net.b_fixed.dtype)
    rest = [rest_state(net.kind, float(g), float(b), float(s), float(q))
            for g, s, q, b in zip(twin.gamma_ghz, twin.sigma, twin.q, twin.b_fixed, strict=True)]
    net.x_rest[k, 0] = torch.tensor(rest, dtype=net.x_rest.dtype)


def twin_of(net: DynamicalNetwork, k: int) -> TwinParameters:
    """The per-oscillator physics trial ``k`` of ``net`` currently uses."""
    c = net.configs[k]
    g = net.gamma[k, 0].double().numpy()
    return TwinParameters(g.copy(), net.sigma[k, 0].double().numpy().copy(),
                          net.q[k, 0].double().numpy().copy(), net.b_fixed[k, 0].double().numpy().copy(),
                          net.b_fixed[k, 0].double().numpy() - c.b_fixed_value, source="model")


@torch.no_grad()
def single_trial(net: DynamicalNetwork, k: int, substeps: int | None = None) -> DynamicalNetwork:
    """A one-trial copy of trial ``k`` (parameters, masks and per-oscillator physics), optionally
    integrated with another number of Euler steps per input point."""
    cfg = copy.deepcopy(net.configs[k])
    if substeps is not None:
        cfg.substeps = int(substeps)
    one = DynamicalNetwork([cfg], net.n_in, net.n_out, [net.seeds[k]], float(net.input_centre))
    one.engine = net.engine
    for name in ("W_in", "W_rec", "bias", "W_out", "b_out"):
        getattr(one, name).copy_(getattr(net, name)[k : k + 1])
    for name in ("mask", "gamma", "sigma", "q", "b_fixed", "x_rest", "S", "S_in", "b_in", "w_clip", "b_clip"):
        getattr(one, name).copy_(getattr(net, name)[k : k + 1])
    return one


# ----------------------------------------------------------------------------- calibration

def _zero_layers(spec, bias: float) -> list[dict[str, np.ndarray]]:
    N = spec.n_hidden
    return [{"W_ext": np.zeros((N, spec.n_in if li == 0 else N)), "W_int": np.zeros((N, N)),
             "b": np.full(N, bias)} for li in range(spec.n_layers)]


def step_responses(backend: Backend, levels: tuple[float, ...] = DEFAULT_LEVELS,
                   repeats: int = DEFAULT_REPEATS, n_points: int = 60, writes: int = DEFAULT_WRITES
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Measure every oscillator's response to bias steps: ``(biases (J,), mean states (J, T, M))``.

    All weights are zero, so each oscillator is driven only by its bias; ``levels`` are
    fractions of the backend's bias range; each level is averaged over ``repeats`` sequences,
    split over ``writes`` uploads so that the write error of the bias averages out too."""
    sp = backend.spec
    if not sp.offers_states:
        raise BackendError(f"{backend.name}: calibration needs per-oscillator states, which this "
                           "backend does not measure")
    if writes < 1 or repeats < writes or n_points < 2:
        raise ConfigError("calibration", "need writes >= 1, repeats >= writes and n_points >= 2")
    b_max = sp.b_max if math.isfinite(sp.b_max) else 1.0
    biases = np.array([lv * b_max for lv in levels], dtype=np.float64)
    per_write = [repeats // writes + (1 if i < repeats % writes else 0) for i in range(writes)]
    acc = np.zeros((len(biases), n_points, sp.M))
    # levels interleaved, so that a slow drift of the chip during the probes affects all alike
    for n in per_write:
        for j, b in enumerate(biases):
            backend.upload(_zero_layers(sp, float(b)))
            m = backend.run(np.zeros((n, n_points, sp.n_in)))
            assert m.states is not None
            acc[j] += m.states.sum(0)
    means = list(acc / repeats)
    return biases, np.stack(means)


def logistic_response(t: torch.Tensor, x0: torch.Tensor, r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Exact solution of ``dx/dt = r x - a x^2`` from ``x0`` (stable at ``r -> 0``)."""
    rt = r * t
    safe_r = torch.where(r.abs() < 1e-9, torch.full_like(r, 1e-9), r)
    growth = torch.where(r.abs() < 1e-9, t.expand_as(rt), torch.expm1(rt) / safe_r)
    return x0 * torch.exp(rt) / (1 + a * x0 * growth)


def fit_step_responses(biases: np.ndarray, means: np.ndarray, cfg: ModelConfig, dt_ns: float,
                       iters: int = 100, min_signal: float = 0.02, weak_signal: float = 0.15
                       ) -> TwinParameters:
    """Least-squares fit of ``gamma_i``, ``sigma_i`` and ``c_i`` (plus the start ``x0_i``) to the
    measured step responses (see the module docstring), one small problem per oscillator, all
    solved together by Levenberg-Marquardt. Q is held at its nominal value.

    An oscillator whose rest state (the trace of the level nearest zero) stays below
    ``min_signal`` is below threshold: a step can only lift it off from noise, which the
    deterministic response does not describe, so it keeps the nominal values and is listed in
    ``meta["unidentified"]``."""
    if cfg.neuron != "spintronic":
        raise ConfigError("model.neuron", "step-response calibration is for the spintronic "
                          f"oscillator (paper eq. 1), not {cfg.neuron!r}")
    J, T, M = means.shape
    y = torch.as_tensor(means, dtype=torch.float64)  # (J, T, M)
    t = (torch.arange(1, T + 1, dtype=torch.float64) * dt_ns).view(1, T, 1)
    b = torch.as_tensor(biases, dtype=torch.float64).view(J, 1, 1)
    S, q = cfg.S, cfg.q
    j0 = int(np.argmin(np.abs(biases)))
    # Near threshold (low state) thermal noise biases the mean response away from the
    # deterministic one (the mean feels a E[x^2] = a (m^2 + var)): such traces are left out
    # when at least two levels of that oscillator settle above ``weak_signal``.
    settled = torch.as_tensor(means[:, -max(1, T // 8):].mean(1))  # (J, M)
    strong = settled >= weak_signal
    use = torch.where(strong.sum(0, keepdim=True) >= 2, strong, torch.ones_like(strong))
    w = use.to(torch.float64).view(J, 1, M)
    x0_init = torch.as_tensor(means[j0, 0], dtype=torch.float64).clamp(1e-3, 0.999)
    theta = torch.stack([torch.full((M,), math.log(cfg.gamma), dtype=torch.float64),
                         torch.full((M,), math.log(cfg.sigma), dtype=torch.float64),
                         torch.full((M,), cfg.b_fixed_value, dtype=torch.float64),
                         torch.log(x0_init / (1 - x0_init))])  # (4, M)

    def residual(lg: torch.Tensor, ls: torch.Tensor, c: torch.Tensor, lx: torch.Tensor) -> torch.Tensor:
        g, s = lg.exp(), ls.exp()
        drive = S * b + c  # (J, 1, M)
        return (logistic_response(t, torch.sigmoid(lx), s * drive - g, s * drive + g * q) - y) * w

    def jacobian(th: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals and their derivatives by central differences: oscillators are independent,
        so one perturbed evaluation per parameter gives every oscillator's column at once."""
        cols = []
        for p in range(4):
            d = 1e-6 * (1 + th[p].abs())
            up, down = th.clone(), th.clone()
            up[p] += d
            down[p] -= d
            cols.append(((residual(*up) - residual(*down)) / (2 * d)).reshape(J * T, M))
        return residual(*th).reshape(J * T, M), torch.stack(cols, -1).permute(1, 0, 2)  # (JT,M), (M,JT,4)

    lam = torch.full((M,), 1e-2, dtype=torch.float64)
    r, jac = jacobian(theta)
    cost = (r ** 2).sum(0)
    eye = torch.eye(4, dtype=torch.float64)
    for _ in range(iters):
        A = jac.transpose(1, 2) @ jac  # (M, 4, 4)
        g = (jac.transpose(1, 2) @ r.T.unsqueeze(-1)).squeeze(-1)  # (M, 4)
        damp = lam.view(M, 1, 1) * (torch.diagonal(A, dim1=1, dim2=2).unsqueeze(-1) * eye + 1e-12 * eye)
        step = torch.linalg.solve(A + damp, -g.unsqueeze(-1)).squeeze(-1).T  # (4, M)
        cand = theta + step
        r_new = residual(*cand)
        cost_new = (r_new.reshape(J * T, M) ** 2).sum(0)
        better = torch.isfinite(cost_new) & (cost_new < cost)
        theta = torch.where(better, cand, theta)
        lam = torch.where(better, lam * 0.3, lam * 10).clamp(1e-9, 1e9)
        if bool((~better & (lam >= 1e9)).all() | (step.abs().max() < 1e-12)):
            break
        r, jac = jacobian(theta)
        cost = (r ** 2).sum(0)
    with torch.no_grad():
        rmse = (cost / (w.sum(0).view(M) * T)).sqrt().numpy()
        gam, sig, cc = theta[0].exp().numpy(), theta[1].exp().numpy(), theta[2].numpy()
    # at rest at zero (no signal without a step): growth from noise is not the logistic response
    dead = np.nonzero(means[j0].mean(0) < min_signal)[0]
    gam, sig, cc = gam.copy(), sig.copy(), cc.copy()
    gam[dead], sig[dead], cc[dead] = cfg.gamma, cfg.sigma, cfg.b_fixed_value
    return TwinParameters(gam, sig, np.full(M, q), cc, cc - cfg.b_fixed_value,
                          fit_rmse=rmse, source="calibrated",
                          meta={"levels_bias": biases.tolist(), "n_points": T,
                                "unidentified": dead.tolist()})


def calibrate(backend: Backend, cfg: ModelConfig, levels: tuple[float, ...] = DEFAULT_LEVELS,
              repeats: int = DEFAULT_REPEATS, n_points: int = 60,
              writes: int = DEFAULT_WRITES) -> TwinParameters:
    """Identify a chip's per-oscillator ``gamma_i``, ``sigma_i`` and offsets from step responses.

    Leaves the probe weights on the chip: upload the network's parameters again afterwards."""
    biases, means = step_responses(backend, levels, repeats, n_points, writes)
    tp = fit_step_responses(biases, means, cfg, backend.spec.dt_ns)
    tp.meta.update({"repeats": repeats, "writes": writes, "levels_fraction": list(levels),
                    "device_time_s_after": backend.counters["device_time_s"]})
    return tp


def calibration_errors(tp: TwinParameters, truth: dict[str, Any]) -> dict[str, Any]:
    """Relative errors of an identified twin against a simulated chip's true current values
    (``describe()["parameters"]["current"]``), over the identified oscillators (the ones below
    threshold, ``meta["unidentified"]``, are counted apart)."""
    M = len(tp.gamma_ghz)
    ok = np.setdiff1d(np.arange(M), np.asarray(tp.meta.get("unidentified", []), dtype=int))
    out: dict[str, Any] = {"identified": int(len(ok)), "unidentified": int(M - len(ok))}
    for key in ("gamma_ghz", "sigma"):
        rel = np.abs(getattr(tp, key)[ok] / np.asarray(truth[key])[ok] - 1)
        out[key] = {"max_rel": float(rel.max()), "median_rel": float(np.median(rel)),
                    "within_2pct": float((rel <= 0.02).mean())}
    off = np.asarray(truth["offset_ghz"])[ok]
    d = tp.offset_ghz[ok] - off
    out["offset_ghz"] = {"max_abs": float(np.abs(d).max()), "rms_abs": float(np.sqrt((d ** 2).mean()))}
    return out


# ----------------------------------------------------------------------------- residuals

@torch.no_grad()
def state_residual(net: DynamicalNetwork, k: int, backend: Backend, inputs: torch.Tensor,
                   upload: bool = True) -> dict[str, Any]:
    """RMS difference, per layer and overall, between the chip's measured states and the
    free-running twin's for trial ``k``'s parameters on ``inputs (B, T, n_in)``."""
    if upload:
        backend.upload(net.layer_weights(k))
    m = backend.run(inputs)
    one = single_trial(net, k)
    xs, _ = one(inputs)
    model = xs[0].double().numpy()
    meas = m.states if m.states is not None else None
    N = net.N
    if meas is None:  # only the outputs are measured
        d = m.outputs - model[..., net.M - N :]
        return {"rms": float(np.sqrt((d ** 2).mean())), "per_layer": [None] * (net.L - 1)
                + [float(np.sqrt((d ** 2).mean()))]}
    d = meas - model
    per_layer = [float(np.sqrt((d[..., li * N : (li + 1) * N] ** 2).mean())) for li in range(net.L)]
    return {"rms": float(np.sqrt((d ** 2).mean())), "per_layer": per_layer}


# ----------------------------------------------------------------------------- program and verify

def identify_parameters(net: DynamicalNetwork, k: int, inputs: torch.Tensor, states: np.ndarray,
                        filtered: np.ndarray, substeps: int | None = None, iters: int = 60
                        ) -> list[dict[str, torch.Tensor]]:
    """The parameters the chip effectively has, identified from measured trajectories: the twin's
    one-input-point map, started from each measured state, is fitted to the next measured state
    (least squares over ``W_in``, the masked ``W_rec`` and the biases, starting from trial
    ``k``'s values). Returns per-layer ``W_ext``, ``W_int``, ``b`` like ``layer_weights``."""
    one = single_trial(net, k, substeps)
    B, T, _ = inputs.shape
    X = torch.as_tensor(states, dtype=torch.float32)
    Y = torch.as_tensor(filtered, dtype=torch.float32)
    x_prev = X[:, :-1].reshape(1, B * (T - 1), -1)
    y_prev = Y[:, :-1].reshape(1, B * (T - 1), -1)
    u = inputs[:, 1:].reshape(B * (T - 1), 1, -1)
    target = X[:, 1:].reshape(1, B * (T - 1), -1)
    params = [one.W_in, one.W_rec, one.bias]
    for p in one.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-16)
    start = State(x_prev, y_prev)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        _, fin = one(u, start)
        loss = ((fin.x - target) ** 2).sum() / one.M
        loss.backward()
        return loss

    opt.step(closure)
    return one.layer_weights(0)


@dataclass
class VerifyReport:
    converged: bool
    iterations: list[dict[str, Any]]  # per iteration: per-parameter residual stats, state residual
    residuals: list[dict[str, np.ndarray]]  # final per-element residual (effective - intended)
    uploaded: list[dict[str, np.ndarray]]  # what was finally uploaded

    def to_dict(self) -> dict[str, Any]:
        return {"converged": self.converged, "iterations": self.iterations}


def _stats(res: list[dict[str, np.ndarray]], masks: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    out = {}
    for li, (layer, mk) in enumerate(zip(res, masks, strict=True)):
        for key, v in layer.items():
            sel = v[mk[key]]
            out[f"layer{li}.{key}"] = {"rms": float(np.sqrt((sel ** 2).mean())) if sel.size else 0.0,
                                       "max_abs": float(np.abs(sel).max()) if sel.size else 0.0}
    return out


def program_and_verify(net: DynamicalNetwork, k: int, backend: Backend, probe: torch.Tensor,
                       tol: float = 0.01, max_iters: int = 3, substeps: int | None = None,
                       log: Callable[[dict[str, Any]], None] | None = None) -> VerifyReport:
    """Upload trial ``k``'s parameters, then probe, identify, compare and correct until every
    parameter's residual is within ``tol`` (absolute) or ``max_iters`` corrections were made.
    A parameter whose correction falls outside the programmable range is clipped, counted as
    ``unreachable`` and left out of the tolerance check.

    ``substeps``: Euler steps per input point of the twin used for the identification (finer than
    the model's makes the identified values less biased by the model's own integrator)."""
    if not backend.spec.offers_states:
        raise BackendError(f"{backend.name}: program-and-verify needs per-oscillator states")
    target = [{key: v.double().numpy() for key, v in layer.items()} for layer in net.layer_weights(k)]
    masks = [{key: (v != 0) if key != "b" else np.ones_like(v, dtype=bool) for key, v in layer.items()}
             for layer in target]
    lim = {"W_ext": backend.spec.w_max, "W_int": backend.spec.w_max, "b": backend.spec.b_max}
    upload = copy.deepcopy(target)
    # parameters whose correction would leave the programmable range cannot be reached: they
    # are reported apart and do not block convergence
    reachable = [{key: np.ones_like(v, dtype=bool) for key, v in layer.items()} for layer in target]
    iterations: list[dict[str, Any]] = []
    converged = False
    res: list[dict[str, np.ndarray]] = []
    for it in range(max_iters + 1):
        backend.upload(upload)
        m = backend.run(probe)
        assert m.states is not None and m.filtered is not None
        with torch.no_grad():
            xs, _ = single_trial(net, k)(probe)
        state_rms = float(np.sqrt(((m.states - xs[0].double().numpy()) ** 2).mean()))
        eff = identify_parameters(net, k, probe, m.states, m.filtered, substeps)
        res = [{key: (eff[li][key].double().numpy() - target[li][key]) * masks[li][key]
                for key in target[li]} for li in range(len(target))]
        ok = [{key: masks[li][key] & reachable[li][key] for key in masks[li]} for li in range(len(masks))]
        stats = _stats(res, ok)
        worst = max(s["max_abs"] for s in stats.values())
        unreachable = [{key: masks[li][key] & ~reachable[li][key] for key in masks[li]}
                       for li in range(len(masks))]
        n_out = int(sum(int(m.sum()) for layer in unreachable for m in layer.values()))
        out_worst = max((float(np.abs(res[li][key][unreachable[li][key]]).max())
                         for li in range(len(res)) for key in res[li] if unreachable[li][key].any()),
                        default=0.0)
        rec = {"iteration": it, "state_rms": state_rms, "max_abs_residual": worst, "parameters": stats,
               "unreachable": n_out, "unreachable_max_abs_residual": out_worst}
        iterations.append(rec)
        if log:
            log(rec)
        if worst <= tol:
            converged = True
            break
        if it == max_iters:
            break
        for li in range(len(upload)):
            for key in upload[li]:
                v = upload[li][key] - res[li][key]
                reachable[li][key] &= np.abs(v) <= lim[key]
                upload[li][key] = np.clip(v, -lim[key], lim[key]) * masks[li][key]
    return VerifyReport(converged, iterations, res, upload)


# ----------------------------------------------------------------------------- monitoring

@dataclass
class TwinMonitor:
    """Every ``every`` training steps, compare twin and chip on ``probe``; when the residual of a
    trial exceeds ``ratio`` times its baseline (the residual right after the last (re)calibration)
    and ``floor``, re-identify that trial's twin. ``on_event(record)`` receives every check."""

    probe: torch.Tensor
    every: int = 50
    ratio: float = 1.5
    floor: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)  # kwargs for calibrate()
    on_event: Callable[[dict[str, Any]], None] | None = None
    baseline: dict[int, float] = field(default_factory=dict)
    recalibrations: int = 0

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError("--monitor-every", f"must be >= 1, got {self.every}")
        if not self.ratio > 1:
            raise ConfigError("--monitor-ratio", f"must be > 1, got {self.ratio}")

    def check(self, net: DynamicalNetwork, backends: list[Backend], step: int) -> list[dict[str, Any]]:
        """Measure every trial's residual; recalibrate those past the threshold. Returns the records."""
        records = []
        for k, be in enumerate(backends):
            r = state_residual(net, k, be, self.probe)["rms"]
            base = self.baseline.setdefault(k, r)
            rec: dict[str, Any] = {"event": "twin_check", "step": step, "trial": k, "residual": r,
                                   "baseline": base, "threshold": max(self.ratio * base, self.floor)}
            if r > rec["threshold"]:
                tp = calibrate(be, net.configs[k], **self.calibration)
                apply_twin(net, k, tp)
                after = state_residual(net, k, be, self.probe)["rms"]
                self.baseline[k] = after
                self.recalibrations += 1
                rec.update({"event": "twin_recalibrated", "residual_after": after,
                            "twin": tp.to_dict()})
            records.append(rec)
            if self.on_event:
                self.on_event(rec)
        return records
