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

import math
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


#: Neuron types with a closed-form step at a held drive (:func:`held_drive_step`).
HELD_DRIVE_TYPES = ("spintronic", "ctrnn")
#: |rate x step| beyond which the closed form is evaluated at the cap (exp(60) fits a float32).
Z_CAP = 60.0
#: |z| below which psi1(z) = (1 - exp(-z)) / z and its derivative come from their series.
Z_SERIES = 0.5
PSI_COEF = [1.0 / math.factorial(n + 1) for n in range(10)]  # psi1(z) = sum a_n (-z)^n


def _psi1_series(z: Any) -> tuple[Any, Any]:
    """``psi1(z)`` and ``psi1'(z)`` by their series (accurate to 1e-10 relative for |z| < 0.5)."""
    w = -z
    p = z * 0 + PSI_COEF[9]
    dp = z * 0 + 9 * PSI_COEF[9]
    for n in range(8, -1, -1):
        p = p * w + PSI_COEF[n]
        if n >= 1:
            dp = dp * w + n * PSI_COEF[n]
    return p, -dp


def _logistic(y: Any, r: Any, c: Any, h: float, xp: Any, grads: bool) -> tuple[Any, ...]:
    """``dy/dt = r y - c y^2`` over ``h``: ``y' = y / (F + c y psi)``, ``F = exp(-r h)``,
    ``psi = (1 - F) / r``. With ``grads``: ``(y', dy'/dy, dy'/dr, dy'/dc)``."""
    zr = r * h
    z = xp.clip(zr, -Z_CAP, Z_CAP)
    small = xp.abs(z) < Z_SERIES
    zero, one = z * 0, z * 0 + 1
    p_s, dp_s = _psi1_series(xp.where(small, z, zero))
    zb = xp.where(small, one, z)  # no division by ~0 in the branch not taken (nor its gradient)
    # near z = 0, F = 1 - z psi1 (not exp(-z)): 1 - F then carries no cancellation, and the
    # step's fixed point is exactly r / c in any precision
    F = xp.where(small, 1 - z * p_s, xp.exp(-z))
    psi1 = xp.where(small, p_s, (1 - F) / zb)
    psi = h * psi1
    den = F + c * y * psi
    yn = y / den
    if not grads:
        return (yn,)
    psi_r = h * h * xp.where(small, dp_s, (F - psi1) / zb)
    F_r = h * xp.where(small, -(p_s + z * dp_s), -F)  # dF/dr of F as computed (exact adjoint)
    inside = xp.where(xp.abs(zr) < Z_CAP, one, zero)
    return yn, F / (den * den), -yn / den * inside * (c * y * psi_r + F_r), -yn / den * (y * psi)


def held_drive_step(kind: str, x: Any, drive: Any, gamma: Any, h: float, q: Any = None,
                    xp: Any = None, grads: bool = False, floor: Any = None) -> tuple[Any, ...]:
    """A neuron's own equation solved exactly over a step ``h`` at the held drive ``drive``
    (``sigma * I``, the drive coefficient included): the core of the exponential Heun scheme.

    Spintronic: ``dx/dt = r x - c x^2`` with ``r = D - gamma``, ``c = D + gamma Q`` (a logistic
    equation): ``x' = x / (F + c x psi)``, ``F = exp(-r h)``, ``psi = (1 - F) / r``; it keeps
    x in [0, 1] at any step. With the thermal ``floor`` (the oscillator's thermal diffusion
    ``D_th``: the Ito drift of its power, ``dx/dt = D_th + r x - c x^2``) the same closed form
    holds for ``y = x - b`` around a root ``b`` of the right-hand side, with rate ``+-s``,
    ``s = sqrt(r^2 + 4 c D_th)``: an oscillator below threshold rests at ``~D_th / (gamma - D)``
    instead of exactly 0, and one above threshold always starts (as a physical one does).
    CTRNN: ``x' = x E + D (1 - E) / gamma``, ``E = exp(-gamma h)``. ``xp`` is the array module
    (``numpy`` or ``torch``). Returns ``(x',)``, or with ``grads`` ``(x', dx'/dx, dx'/dD)``: the
    factors of the training engine's adjoint.
    """
    if kind == "ctrnn":
        E = xp.exp(-gamma * h)
        W = (1 - E) / gamma
        xn = x * E + drive * W
        return (xn, E + 0 * x, W + 0 * x) if grads else (xn,)
    if kind != "spintronic":
        raise ValueError(f"no closed-form step for {kind!r} neurons; allowed: {', '.join(HELD_DRIVE_TYPES)}")
    c = drive + gamma * q if q is not None else drive
    r = drive - gamma
    if floor is None:
        res = _logistic(x, r, c, h, xp, grads)
        return res if not grads else (res[0], res[1], res[2] + res[3])
    # roots of D_th + r x - c x^2: around b = x- (r >= 0, rate +s) or b = x+ (r < 0, rate -s);
    # both in the forms free of cancellation, finite as c -> 0
    s = xp.sqrt(r * r + 4 * c * floor)
    sg = xp.where(r >= 0, s * 0 + 1, s * 0 - 1)
    ar_s = r * sg + s  # |r| + s > 0
    b = -2 * sg * floor / ar_s
    res = _logistic(x - b, sg * s, c, h, xp, grads)
    xn = res[0] + b
    if not grads:
        return (xn,)
    _, dy, d_r, d_c = res
    ds = (r + 2 * floor) / s
    db = 2 * sg * floor * (sg + ds) / (ar_s * ar_s)
    return xn, dy, db * (1 - dy) + d_r * sg * ds + d_c


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
