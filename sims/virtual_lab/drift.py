"""Slow random processes on a fixed time grid (sample position, contact resistance, offsets).

A process is drawn at ``k * step_s`` and, with ``hold_s`` set, interpolated linearly in
between and held for ``hold_s`` (so that physics depending on it can be cached per hold
interval): diffusive over many grid steps, smooth within one, like the creep of a holder.
Without ``hold_s`` it is held constant between grid points. Either way its value at a given
lab time does not depend on how often it is looked at: the same seed and the same actions give
the same trajectory. With ``tau_s=None`` it is a random walk (diffusion ``sigma_per_sqrt_s``);
otherwise an Ornstein-Uhlenbeck process with stationary standard deviation ``sigma`` and
correlation time ``tau_s`` (exact discretisation).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import lfilter


class GridProcess:
    """A vector random process of ``size`` components, piecewise constant on ``step_s``."""

    def __init__(self, rng: np.random.Generator, size: int, step_s: float, *,
                 sigma_per_sqrt_s: float = 0.0, sigma: float = 0.0,
                 tau_s: float | None = None, start: np.ndarray | None = None,
                 hold_s: float | None = None) -> None:
        if step_s <= 0 or (hold_s is not None and hold_s <= 0):
            raise ValueError(f"step_s and hold_s must be > 0, got {step_s!r}, {hold_s!r}")
        self.rng = rng
        self.hold_s = hold_s
        self.size = size
        self.step_s = float(step_s)
        self.tau_s = tau_s
        if tau_s is None:
            self._a = 1.0
            self._b = sigma_per_sqrt_s * math.sqrt(step_s)
            first = np.zeros(size) if start is None else np.asarray(start, float)
        else:
            self._a = math.exp(-step_s / tau_s)
            self._b = sigma * math.sqrt(1.0 - self._a ** 2)
            first = (rng.normal(0.0, sigma, size) if start is None
                     else np.asarray(start, float))
        self._values = first[None, :].copy()
        self._zero = self._b == 0.0

    def _extend(self, n_needed: int) -> None:
        n_new = max(n_needed - len(self._values), 0)
        if n_new == 0:
            return
        n_new = max(n_new, 256)  # generate in chunks; the draws do not depend on the chunking
        noise = self.rng.normal(0.0, 1.0, (n_new, self.size)) * self._b
        last = self._values[-1]
        if self._a == 1.0:
            new = last + np.cumsum(noise, axis=0)
        else:
            new = lfilter([1.0], [1.0, -self._a], noise, axis=0,
                          zi=(self._a * last)[None, :])[0]
        self._values = np.concatenate([self._values, new])

    def index(self, t_s: float) -> int:
        """Which interval ``t_s`` falls in: the value is constant within one."""
        return max(int(t_s // (self.hold_s or self.step_s)), 0)

    def value(self, t_s: float) -> np.ndarray:
        """The process at lab time ``t_s``."""
        if self._zero:
            return self._values[0]
        if self.hold_s is None:
            k = self.index(t_s)
            if k >= len(self._values):
                self._extend(k + 1)
            return self._values[k]
        t = self.index(t_s) * self.hold_s
        k, frac = divmod(t / self.step_s, 1.0)
        k = int(k)
        if k + 1 >= len(self._values):
            self._extend(k + 2)
        return self._values[k] + frac * (self._values[k + 1] - self._values[k])
