"""Design rules of the paper (eq. 9-11) and the Euler stability check.

* relaxation time vs input time step: ``dt < tau`` (memory), ideally ``tau ~ 10 dt`` (thesis 6.10);
* cumulative drive ``I * dt ~ 1`` with ``I = S * <|W|> * sqrt(N_fan-in)`` (eq. 9, 11), within
  the roughly five-fold window the paper reports;
* explicit Euler (``model.integrator: euler``) stays stable while the largest drive times the
  step is small (about ``|I| h < 2``): raise ``model.substeps`` otherwise. The exponential
  Heun scheme solves each neuron's equation in closed form and is stable at any step; how far
  either is from a converged solution is measured by :func:`hil.training.convergence.step_error`
  (``hil design`` reports it).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hil.config import ModelConfig

DRIVE_WINDOW = (0.2, 5.0)  # five-fold around 1, as in paper Fig. 2b/3


def cumulative_drive(cfg: ModelConfig, mean_abs_w: float, fan_in: float) -> float:
    """``I * dt`` with ``I = S <|W|> sqrt(N)`` (paper eq. 9)."""
    return cfg.S * mean_abs_w * math.sqrt(fan_in) * cfg.dt_ns


def check(cfg: ModelConfig, layer_weights: list[dict[str, torch.Tensor]] | None = None
          ) -> dict[str, Any]:
    """Report the rules for a model (and its weights, if given) with warnings."""
    warnings: list[str] = []
    tau, dt = cfg.tau_ns, cfg.dt_ns
    report: dict[str, Any] = {"tau_ns": tau, "dt_ns": dt, "tau_over_dt": tau / dt,
                              "step_ns": cfg.h_ns, "substeps": cfg.substeps,
                              "integrator": cfg.scheme}
    euler = cfg.scheme == "euler"
    if dt >= tau:
        warnings.append(f"input time step dt = {dt} ns is not shorter than the relaxation time "
                        f"tau = {tau} ns: the network forgets between inputs (paper: dt < tau)")
    gamma_h = cfg.gamma * cfg.h_ns
    if euler and gamma_h > 0.5:
        warnings.append(f"gamma * h = {gamma_h:.2f} > 0.5: Euler step too coarse; raise substeps")
    fan_in = cfg.density_inter * cfg.n_hidden + cfg.density_intra * cfg.n_hidden
    report["fan_in"] = fan_in
    if cfg.w_clip is not None:
        worst = cfg.S * cfg.w_clip * fan_in * 1.0 + abs(cfg.b_fixed_value)
        report["worst_drive_times_h"] = worst * cfg.h_ns
    layers = []
    if layer_weights:
        for li, lw in enumerate(layer_weights):
            ws = [lw["W_ext"].abs().flatten(), lw["W_int"].abs().flatten()]
            nz = torch.cat([w[w > 0] for w in ws])
            mean_abs = float(nz.mean()) if nz.numel() else 0.0
            n_fan = fan_in if li > 0 else cfg.density_intra * cfg.n_hidden + lw["W_ext"].shape[1]
            drive = cumulative_drive(cfg, mean_abs, n_fan)
            peak = cfg.S * float(lw["W_ext"].abs().sum(1).max() + lw["W_int"].abs().sum(1).max()
                                 + lw["b"].abs().max()) + abs(cfg.b_fixed_value)
            layers.append({"layer": li, "mean_abs_w": mean_abs, "cumulative_drive": drive,
                           "peak_drive_times_h": peak * cfg.h_ns})
            lo, hi = DRIVE_WINDOW
            if not lo <= drive <= hi:
                warnings.append(f"layer {li}: cumulative drive I*dt = {drive:.2f} is outside "
                                f"[{lo}, {hi}] (paper eq. 11: about 1)")
            if euler and peak * cfg.h_ns > 2:
                warnings.append(f"layer {li}: peak drive x Euler step = {peak * cfg.h_ns:.2f} > 2:"
                                " explicit Euler may diverge; raise model.substeps")
    report["layers"] = layers
    report["warnings"] = warnings
    return report
