"""Dynamical-neuron physics shared by the differentiable model and the simulated devices.

All rates are in GHz (1/ns) and times in ns. Functions use only arithmetic operators and
``where``-style helpers passed in, so they accept numpy arrays and torch tensors alike.

Neuron types
------------
``spintronic``
    Normalised oscillation power of a spin-torque oscillator, Slavin's auto-oscillator model
    as simplified in the paper (eq. 2, thesis eq. 5.3) with the optional non-linear damping
    ``Q`` and drive coefficient ``sigma`` of paper eq. 1::

        dx/dt = -gamma * x * (1 + Q x) + sigma * I * x * (1 - x)

    Reading chosen: paper eq. 1 carries an overall factor 2; it is absorbed into ``gamma`` and
    ``sigma`` so that ``Q = 0, sigma = 1`` gives eq. 2 exactly, as the paper itself does.
``ctrnn``
    Continuous-time RNN neuron (paper eq. 6-8): ``dx/dt = -gamma x + I``, output ``tanh(x)``.
``linear`` / ``liquid`` / ``quadratic``
    The comparison neurons of thesis eq. 5.12: ``-gamma x + I``, ``-gamma x + I x`` and
    ``-gamma x + I x^2``. They are unbounded, so (as in the thesis) their state is clipped to
    [0, 1] after every step, with zero gradient while clipped.
"""

from __future__ import annotations

from typing import Any

NEURON_TYPES = ("spintronic", "ctrnn", "linear", "liquid", "quadratic")
#: Types whose state is clipped to [0, 1] after each Euler step (thesis 5.8).
CLIPPED_TYPES = ("linear", "liquid", "quadratic")
#: Types whose output fed to other neurons is tanh of the state.
TANH_OUTPUT_TYPES = ("ctrnn",)


def check_type(kind: str) -> None:
    if kind not in NEURON_TYPES:
        raise ValueError(f"unknown neuron type {kind!r}; allowed: {', '.join(NEURON_TYPES)}")


def drive_gain(kind: str, x: Any) -> Any:
    """``g(x)`` in ``dx/dt = -damping + sigma * I * g(x)``."""
    if kind == "spintronic":
        return x * (1 - x)
    if kind in ("ctrnn", "linear"):
        return x * 0 + 1
    if kind == "liquid":
        return x
    if kind == "quadratic":
        return x * x
    raise ValueError(f"unknown neuron type {kind!r}")


def drive_gain_derivative(kind: str, x: Any) -> Any:
    """``g'(x)``."""
    if kind == "spintronic":
        return 1 - 2 * x
    if kind in ("ctrnn", "linear"):
        return x * 0
    if kind == "liquid":
        return x * 0 + 1
    if kind == "quadratic":
        return 2 * x
    raise ValueError(f"unknown neuron type {kind!r}")


def drift(kind: str, x: Any, drive: Any, gamma: Any, sigma: Any = 1.0, q: Any = 0.0) -> Any:
    """Right-hand side ``dx/dt`` for a neuron of type ``kind`` under drive ``I``."""
    damping = gamma * x * (1 + q * x) if kind == "spintronic" else gamma * x
    return -damping + sigma * drive * drive_gain(kind, x)


def drift_dx(kind: str, x: Any, drive: Any, gamma: Any, sigma: Any = 1.0, q: Any = 0.0) -> Any:
    """Partial derivative of :func:`drift` with respect to ``x``."""
    damping_dx = gamma * (1 + 2 * q * x) if kind == "spintronic" else gamma + x * 0
    return -damping_dx + sigma * drive * drive_gain_derivative(kind, x)


def rest_state(kind: str, gamma: float, b_fixed: float, sigma: float = 1.0, q: float = 0.0) -> float:
    """Stable state with no input except the fixed bias (thesis eq. 6.4 for the spintronic case).

    For ``b_fixed = 2 gamma`` and ``Q = 0`` the spintronic neuron rests at x = 0.5 (eq. 6.5).
    """
    check_type(kind)
    if gamma <= 0:
        raise ValueError("gamma must be positive")
    if kind == "spintronic":
        a = sigma * b_fixed
        if a <= gamma:
            return 0.0
        # -gamma(1+Qx) + a(1-x) = 0  ->  x = (a - gamma) / (a + gamma Q)
        return float((a - gamma) / (a + gamma * q))
    if kind in ("ctrnn", "linear"):
        x = sigma * b_fixed / gamma
        return float(x) if kind == "ctrnn" else float(min(max(x, 0.0), 1.0))
    if kind == "liquid":
        # dx/dt = x (sigma b - gamma): neutral at sigma b = gamma, where any x rests; start at 0.5
        return 0.5 if abs(sigma * b_fixed - gamma) < 1e-12 else (1.0 if sigma * b_fixed > gamma else 0.0)
    # quadratic: x (sigma b x - gamma) = 0 -> unstable fixed point x = gamma / (sigma b)
    return float(min(max(gamma / (sigma * b_fixed), 0.0), 1.0)) if b_fixed > 0 else 0.0


def default_fixed_bias(kind: str, gamma: float) -> float:
    """Fixed bias that puts the neuron at rest at x = 0.5 (CTRNN: 0, rest at x = 0).

    Spintronic: 2 gamma (paper, thesis eq. 6.5); linear: gamma / 2; liquid: gamma (neutral);
    quadratic: 2 gamma (fixed point at 0.5).
    """
    check_type(kind)
    return {"spintronic": 2 * gamma, "ctrnn": 0.0, "linear": gamma / 2, "liquid": gamma,
            "quadratic": 2 * gamma}[kind]
