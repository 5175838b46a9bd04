"""Is a trained result a property of the ODE, or of the integrator it was trained with?

A chip integrates its equations exactly; a network trained through a coarse integrator can
learn to exploit that integrator's error (measured: the Euler-4 digits preset lost 20 points
when the same weights ran under a converged solution). Two checks:

* :func:`reference_check`: the trained weights' metric under a converged solution of the same
  ODE (exponential Heun, sub-steps doubled until the metric moves less than ``tol_points``),
  beside the training integrator's figure, per seed. Every training run records it.
* :func:`step_error`: the integrator's own error for a config (states at its step against
  states at a converged step, same weights and inputs), reported by ``hil design``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from hil.config import EXPHEUN_KINDS
from hil.network.model import DynamicalNetwork
from hil.network.tasks import Task

REFERENCE_SCHEME = "expheun"  # second order, stable at any drive; Euler for the clipped neurons
#: the metric may move by less than this (points) between the last two step halvings
TOL_POINTS = 0.2
#: the training integrator's figure may differ from the reference by this much (points)
WARN_POINTS = 1.0
MAX_SUBSTEPS = 128


@contextlib.contextmanager
def integration(net: DynamicalNetwork, scheme: str, substeps: int) -> Iterator[DynamicalNetwork]:
    """Run ``net`` with another integration scheme and step for the duration (same weights)."""
    saved = (net.scheme, net.substeps, net.h)
    net.scheme, net.h, net.substeps = scheme, net.h * net.substeps / substeps, substeps
    try:
        yield net
    finally:
        net.scheme, net.substeps, net.h = saved


def reference_scheme(net: DynamicalNetwork) -> str:
    return REFERENCE_SCHEME if net.kind in EXPHEUN_KINDS else "euler"


def _metric(net: DynamicalNetwork, task: Task, split: str) -> list[float]:
    from hil.training.train import evaluate

    return [float(v) for v in evaluate(net, task, split)["metric"]]


@torch.no_grad()
def reference_check(net: DynamicalNetwork, task: Task, split: str = "test",
                    tol_points: float = TOL_POINTS, warn_points: float = WARN_POINTS,
                    max_substeps: int = MAX_SUBSTEPS) -> dict[str, Any]:
    """The metric of every trial under the training integrator and under a converged reference.

    The reference starts at exponential Heun with twice the training sub-steps (at least 4)
    and doubles them until no trial's metric moves by ``tol_points`` or more. Returns the
    per-trial figures, the sub-steps reached, whether it converged, the largest gap in points
    and the warning text when that gap exceeds ``warn_points``.
    """
    trained = _metric(net, task, split)
    ref = reference_scheme(net)
    substeps = max(4, 2 * net.substeps)
    with integration(net, ref, substeps):
        prev = _metric(net, task, split)
    history = [{"substeps": substeps, "metric": prev}]
    converged = False
    while 2 * substeps <= max_substeps:
        substeps *= 2
        with integration(net, ref, substeps):
            cur = _metric(net, task, split)
        history.append({"substeps": substeps, "metric": cur})
        moved = max(abs(a - b) for a, b in zip(cur, prev, strict=True)) * 100
        prev = cur
        if moved < tol_points:
            converged = True
            break
    gaps = [100 * (t - r) for t, r in zip(trained, prev, strict=True)]
    worst = max(gaps, key=abs)
    report: dict[str, Any] = {
        "split": split,
        "trained": {"scheme": net.scheme, "substeps": net.substeps, "metric": trained},
        "reference": {"scheme": ref, "substeps": substeps, "metric": prev,
                      "converged": converged, "tol_points": tol_points, "history": history},
        "gap_points": gaps,
        "worst_gap_points": worst,
    }
    if not converged:
        report["warning"] = (f"the reference did not converge to {tol_points} points by "
                             f"{substeps} sub-steps per point")
    elif abs(worst) > warn_points:
        report["warning"] = (f"the training integrator ({net.scheme}, {net.substeps} sub-steps) "
                             f"differs from a converged solution of the same ODE by "
                             f"{worst:+.2f} points on {split}: the network exploits the "
                             "integrator's error; train with model.integrator=expheun or more "
                             "model.substeps")
    return report


@torch.no_grad()
def step_error(net: DynamicalNetwork, u: torch.Tensor, ref_substeps: int = 64) -> dict[str, Any]:
    """State error of the network's integrator on inputs ``u``: its states against those of a
    converged solution (exponential Heun at ``ref_substeps`` per point), same weights."""
    xs, _ = net(u)
    with integration(net, reference_scheme(net), ref_substeps):
        ref, _ = net(u)
    d = (xs - ref).abs()
    return {"scheme": net.scheme, "substeps": net.substeps, "reference_substeps": ref_substeps,
            "reference_scheme": reference_scheme(net),
            "max_abs_state_error": float(d.max()), "mean_abs_state_error": float(d.mean())}
