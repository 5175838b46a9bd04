"""A simulated chip: an array of spin-torque oscillators wired as the multilayer network.

The device integrates the same network physics as the model (``sims.neurons``, paper eq. 1)::

    dx_i/dt = -gamma_i x_i (1 + Q_i x_i) + sigma_i I_i x_i (1 - x_i)
    I_i     = S (W_ext y_prev + W_int y + b)_i + b_fixed + offset_i  (+ W_in u' in layer 0)

but never exactly as the model does:

* every oscillator has its own damping ``gamma_i``, drive coefficient ``sigma_i`` and non-linear
  damping ``Q_i``, drawn once (log-normal, mean = nominal, configurable coefficient of variation),
  and a static offset on its drive;
* weights are programmed with finite resolution (``weight_bits`` over ``±w_max``), a static
  per-synapse gain error and a fresh write error at every upload; exactly-zero weights are
  disconnected synapses and stay exactly zero;
* thermal noise enters the dynamics (Euler-Maruyama): for the oscillator's power ``x = |c|^2``
  a complex thermal force of intensity ``D`` on the amplitude ``c`` gives, in Ito form,
  ``dx = (f(x) + D) dt + sqrt(2 D x) dW`` (Slavin & Tiberkevich's auto-oscillator with noise):
  fluctuations grow with the power, and an oscillator below threshold does not sit at exactly
  zero but at a thermal floor ``~ D / (gamma - sigma I)``; other neuron types get additive
  noise ``sqrt(2 D) dW``. Readout noise is added to every measured value;
* ``gamma_i``, ``sigma_i`` and the offsets drift slowly (random walk in device time);
* the integrator is converged, as a physical chip is exact: by default exponential Heun
  (second order, stable at any drive; :func:`sims.neurons.held_drive_step`) at 16 steps per
  input point, where halving the step moves no value by more than 1e-3; stochastic Heun or
  Euler on request. The noise is added as in Euler-Maruyama.

Device time advances by the time the sequences take on the chip (input points plus the
relaxation wait between two sequences) and a fixed overhead per call and per upload, as an
instrument would need. Each sequence starts from the oscillator's rest state under its fixed
bias with inputs and trainable biases off, and the high-pass filters discharged (thesis 6.10:
"remove all inputs and wait a few times the relaxation time").

Seeded: every random draw comes from a stream spawned from ``seed``; all static draws (the
per-oscillator values, offsets, synapse gain errors), the weights actually programmed at the
last upload and the drifted current values are reported by :meth:`describe`; for the dynamic
noise the stream seeds and the number of draws are reported.

Imports nothing from the rest of the project except ``sims.neurons`` and ``sims.schema``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sims.neurons import (
    CLIPPED_TYPES,
    HELD_DRIVE_TYPES,
    NEURON_TYPES,
    TANH_OUTPUT_TYPES,
    default_fixed_bias,
    drift,
    held_drive_step,
    rest_state,
)
from sims.schema import ConfigError, apply_mapping, check_choices, choices

METHODS = ("expheun", "heun", "euler")
STREAMS = ("mismatch", "offsets", "synapse_gain", "writes", "thermal", "readout", "drift")


class DeviceConfigError(ConfigError):
    """A device setting is invalid; ``key`` names it (the project's one configuration error
    type, :class:`sims.schema.ConfigError`)."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        super().__init__(key, message, source)


#: Settings renamed: old name -> (new name, why); an old name given is refused naming the new one.
RENAMED_SETTINGS = {"substeps": ("solver_substeps", "the chip's own solver steps per input "
                                 "point, not the trained model's model.substeps")}


@dataclass
class DeviceConfig:
    """Design values (nominal) and non-idealities of a simulated oscillator-array chip."""

    # structure and nominal physics (the model's values)
    n_in: int = 1
    n_layers: int = 3
    n_hidden: int = 32
    neuron: str = dataclasses.field(default="spintronic", metadata=choices(NEURON_TYPES, "neuron type"))
    tau_ns: float = 5.0  # nominal relaxation time, gamma = 1 / tau
    sigma: float = 1.0  # nominal drive coefficient
    q: float = 0.0  # nominal non-linear damping Q
    S: float = 1.0  # amplifier gain of every layer's drive
    S_in: float = 1.0  # input scaling
    b_in: float = 0.0  # input offset after centring and scaling
    input_centre: float = 0.0
    b_fixed: float | None = None  # fixed bias; None: the model's default (2 gamma for spintronic)
    highpass: bool = True
    f_cut_ghz: float = 0.001
    dt_ns: float = 1.0  # time of one input point
    w_max: float = 1.0  # programmable weight range ±w_max
    b_max: float = 0.2  # programmable bias range ±b_max
    # integrator: the chip's own solver steps per input point (not the trained model's
    # model.substeps; converged: halving the step moves no measured value by more than 1e-3,
    # tests/test_convergence.py)
    solver_substeps: int = 16
    # expheun | heun | euler; None: expheun where the neuron has it, else heun
    method: str | None = dataclasses.field(default=None, metadata=choices(METHODS, "method"))
    # mismatch (coefficients of variation, log-normal around the nominal value)
    cv_gamma: float = 0.2
    cv_sigma: float = 0.2
    cv_q: float = 0.0
    offset_std: float = 0.01  # static drive offset per oscillator (drive units, GHz)
    # weight programming
    weight_bits: int | None = 8  # resolution over ±w_max (±b_max for biases); None: continuous
    program_noise: float = 0.002  # write error per upload, std relative to w_max (b_max)
    synapse_gain_cv: float = 0.02  # static gain error per synapse (weights only, not biases)
    # noise
    thermal_d_ghz: float = 2e-5  # thermal diffusion D of the power: dx += D dt + sqrt(2 D x dt) N(0, 1)
    # False: the thermal drift D dt only, without the fluctuations (what a model with the same
    # thermal floor predicts; the gap budget's reference chip)
    thermal_fluctuations: bool = True
    readout_noise: float = 0.005  # std added to every measured value
    # drift and timing
    drift_per_sqrt_s: float = 0.005  # relative random walk of gamma, sigma per sqrt(s) of device time
    relax_ns: float = 50.0  # wait between two sequences
    call_overhead_s: float = 1e-3  # per run call
    program_overhead_s: float = 1e-2  # per upload

    @property
    def gamma(self) -> float:
        return 1.0 / self.tau_ns

    @property
    def b_fixed_value(self) -> float:
        return self.b_fixed if self.b_fixed is not None else default_fixed_bias(self.neuron, self.gamma)

    @property
    def M(self) -> int:
        return self.n_layers * self.n_hidden

    @property
    def scheme(self) -> str:
        """The integrator that runs: exponential Heun (each oscillator's equation solved in
        closed form at a held drive, that drive the mean of the step's start and a predicted
        end; second order, stable at any drive) where the neuron type has a closed form,
        else stochastic Heun."""
        if self.method is not None:
            return self.method
        return "expheun" if self.neuron in HELD_DRIVE_TYPES else "heun"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: DeviceConfig | None = None, *,
                     prefix: str = "", source: str | None = None,
                     number_text: bool = False) -> DeviceConfig:
        """``base`` (default: the defaults) with ``values`` set, each converted to its field's
        type, and validated; unknown or renamed keys and bad values raise
        :class:`DeviceConfigError` naming ``source`` and ``prefix.key``. ``number_text``: read
        text like ``2e-5`` as a number (command-line values)."""
        cfg = dataclasses.replace(base) if base is not None else cls()
        try:
            apply_mapping(cfg, values, prefix, source, renamed=RENAMED_SETTINGS,
                          number_text=number_text)
        except ConfigError as exc:
            raise DeviceConfigError(exc.key, exc.message, source) from None
        try:
            return cfg.validate()
        except DeviceConfigError as exc:
            key = f"{prefix}.{exc.key}" if prefix else exc.key
            raise DeviceConfigError(key, exc.message, source) from None

    def validate(self) -> DeviceConfig:
        """Raise :class:`DeviceConfigError` naming the first bad value."""

        def req(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise DeviceConfigError(key, msg)

        for key in ("n_in", "n_layers", "n_hidden", "solver_substeps"):
            v = getattr(self, key)
            req(isinstance(v, int) and not isinstance(v, bool) and v >= 1, key,
                f"must be an integer >= 1, got {v!r}")
        try:
            check_choices(self)  # neuron, method
        except ConfigError as exc:
            raise DeviceConfigError(exc.key, exc.message) from None
        req(self.scheme != "expheun" or self.neuron in HELD_DRIVE_TYPES, "method",
            f"expheun is defined for {', '.join(HELD_DRIVE_TYPES)} neurons, not {self.neuron!r}")
        for key in ("tau_ns", "sigma", "S", "S_in", "dt_ns", "w_max", "b_max"):
            v = getattr(self, key)
            req(_finite(v) and v > 0, key, f"must be a positive number, got {v!r}")
        for key in ("q", "cv_gamma", "cv_sigma", "cv_q", "offset_std", "program_noise",
                    "synapse_gain_cv", "thermal_d_ghz", "readout_noise", "drift_per_sqrt_s",
                    "relax_ns", "call_overhead_s", "program_overhead_s", "f_cut_ghz"):
            v = getattr(self, key)
            req(_finite(v) and v >= 0, key, f"must be a number >= 0, got {v!r}")
        for key in ("b_in", "input_centre"):
            req(_finite(getattr(self, key)), key, "must be a finite number")
        if self.b_fixed is not None:
            req(_finite(self.b_fixed), "b_fixed", "must be a finite number or null")
        req(isinstance(self.thermal_fluctuations, bool), "thermal_fluctuations",
            f"must be true or false, got {self.thermal_fluctuations!r}")
        if self.weight_bits is not None:
            req(isinstance(self.weight_bits, int) and 2 <= self.weight_bits <= 32, "weight_bits",
                f"must be an integer in [2, 32] or null, got {self.weight_bits!r}")
        req(2 * math.pi * self.f_cut_ghz * self.dt_ns / self.solver_substeps < 1, "f_cut_ghz",
            "2 pi f_cut times the integration step must be < 1")
        return self


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class DeviceResult:
    """What one run measured: every oscillator's power ``states`` and the high-pass filter
    outputs ``filtered`` at the end of every input point, ``(B, T, M)``; ``outputs`` is the last
    layer's part of ``states``. ``device_time_s``: time the run took on the chip."""

    outputs: np.ndarray
    states: np.ndarray
    filtered: np.ndarray
    device_time_s: float


@contextlib.contextmanager
def _single_thread():
    """Small matrices integrate faster on one BLAS thread than on several competing ones."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _lognormal(rng: np.random.Generator, mean: float, cv: float, n: int) -> np.ndarray:
    """``n`` positive draws with the given mean and coefficient of variation."""
    if cv == 0 or mean == 0:
        return np.full(n, float(mean))
    s = math.sqrt(math.log1p(cv * cv))
    return mean * np.exp(s * rng.standard_normal(n) - 0.5 * s * s)


class OscillatorArrayDevice:
    """One simulated chip. API: :meth:`program` (upload weights as arrays), :meth:`run` (a batch of
    input sequences), :meth:`describe`, :meth:`programmed` (the weights actually written)."""

    def __init__(self, config: DeviceConfig | None = None, seed: int = 0) -> None:
        self.config = cfg = dataclasses.replace(config or DeviceConfig()).validate()
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DeviceConfigError("seed", f"must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        ss = np.random.SeedSequence(self.seed)
        children = ss.spawn(len(STREAMS))
        self._rng = {name: np.random.default_rng(c) for name, c in zip(STREAMS, children, strict=True)}
        self._stream_seeds = {name: [int(v) for v in c.generate_state(2)]
                              for name, c in zip(STREAMS, children, strict=True)}
        self._draws = dict.fromkeys(STREAMS, 0)
        M, N = cfg.M, cfg.n_hidden
        # static draws
        self.gamma0 = self._draw("mismatch", lambda r: _lognormal(r, cfg.gamma, cfg.cv_gamma, M), M)
        self.sigma0 = self._draw("mismatch", lambda r: _lognormal(r, cfg.sigma, cfg.cv_sigma, M), M)
        self.q0 = self._draw("mismatch", lambda r: _lognormal(r, cfg.q, cfg.cv_q, M), M)
        self.offset0 = self._draw("offsets", lambda r: cfg.offset_std * r.standard_normal(M), M)
        shapes = [((N, cfg.n_in) if li == 0 else (N, N), (N, N)) for li in range(cfg.n_layers)]
        self.synapse_gain = [
            {"W_ext": self._draw("synapse_gain", lambda r, s=se: cfg.synapse_gain_cv * r.standard_normal(s),
                                 int(np.prod(se))),
             "W_int": self._draw("synapse_gain", lambda r, s=si: cfg.synapse_gain_cv * r.standard_normal(s),
                                 int(np.prod(si)))}
            for se, si in shapes
        ]
        # drifting current values
        self.gamma = self.gamma0.copy()
        self.sigma = self.sigma0.copy()
        self.q = self.q0.copy()
        self.offset = self.offset0.copy()
        self.device_time_s = 0.0
        self._drift_time_s = 0.0
        self.counters = {"uploads": 0, "runs": 0, "sequences": 0, "input_points": 0,
                         "host_seconds": 0.0}
        self._layers: list[dict[str, np.ndarray]] | None = None
        self._written_error: list[dict[str, np.ndarray]] | None = None

    # ------------------------------------------------------------------ state (checkpoints)
    _ARRAYS = ("gamma", "sigma", "q", "offset")

    def get_state(self) -> dict[str, Any]:
        """Everything that changes while the chip is used (random streams, drifted values, what
        is programmed, the clock and counters) as plain Python data, so that a checkpoint puts
        back the very chip it left: the same draws follow as if it had never stopped."""
        def layers(ls: list[dict[str, np.ndarray]] | None) -> list[dict[str, Any]] | None:
            return None if ls is None else [{k: v.tolist() for k, v in layer.items()} for layer in ls]

        return {"seed": self.seed,
                "rng": {name: r.bit_generator.state for name, r in self._rng.items()},
                "draws": dict(self._draws),
                **{name: getattr(self, name).tolist() for name in self._ARRAYS},
                "device_time_s": self.device_time_s, "drift_time_s": self._drift_time_s,
                "counters": dict(self.counters),
                "layers": layers(self._layers), "written_error": layers(self._written_error)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Put back :meth:`get_state` of a chip drawn with the same config and seed."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state of the chip drawn with seed {state['seed']}, this one has {self.seed}")
        for name, st in state["rng"].items():
            self._rng[name].bit_generator.state = st
        self._draws = dict(state["draws"])
        for name in self._ARRAYS:
            setattr(self, name, np.asarray(state[name], dtype=np.float64))
        self.device_time_s = float(state["device_time_s"])
        self._drift_time_s = float(state["drift_time_s"])
        self.counters = dict(state["counters"])

        def layers(ls: list[dict[str, Any]] | None) -> list[dict[str, np.ndarray]] | None:
            return None if ls is None else [{k: np.asarray(v, dtype=np.float64) for k, v in layer.items()}
                                            for layer in ls]

        self._layers = layers(state["layers"])
        self._written_error = layers(state["written_error"])

    # ------------------------------------------------------------------ randomness
    def _draw(self, stream: str, fn, count: int) -> np.ndarray:
        self._draws[stream] += int(count)
        return np.asarray(fn(self._rng[stream]), dtype=np.float64)

    # ------------------------------------------------------------------ programming
    def _quantize(self, w: np.ndarray, vmax: float) -> np.ndarray:
        w = np.clip(w, -vmax, vmax)
        bits = self.config.weight_bits
        if bits is None:
            return w
        step = vmax / (2 ** (bits - 1) - 1)
        return np.round(w / step) * step

    def program(self, layers: list[dict[str, Any]]) -> None:
        """Write the weights: one dict per layer with ``W_ext`` (N x n_in for layer 0, else N x N,
        from the previous layer), ``W_int`` (N x N, zero diagonal) and ``b`` (N). Values beyond
        the range are clipped, then quantized, scaled by the synapse's static gain error, and a
        fresh write error is added; exact zeros stay disconnected."""
        cfg = self.config
        N = cfg.n_hidden
        if len(layers) != cfg.n_layers:
            raise ValueError(f"layers: expected {cfg.n_layers} layer dicts, got {len(layers)}")
        written, errors = [], []
        for li, layer in enumerate(layers):
            exp = {"W_ext": (N, cfg.n_in) if li == 0 else (N, N), "W_int": (N, N), "b": (N,)}
            out, err = {}, {}
            for key, shape in exp.items():
                if key not in layer:
                    raise ValueError(f"layers[{li}].{key}: missing; each layer needs W_ext, W_int and b")
                a = np.asarray(layer[key], dtype=np.float64)
                if a.shape != shape:
                    raise ValueError(f"layers[{li}].{key}: expected shape {shape}, got {a.shape}")
                if not np.isfinite(a).all():
                    raise ValueError(f"layers[{li}].{key}: values must be finite")
                if key == "W_int" and np.any(np.diag(a) != 0):
                    raise ValueError(f"layers[{li}].W_int: the diagonal must be zero (no self-synapse)")
                vmax = cfg.b_max if key == "b" else cfg.w_max
                q = self._quantize(a, vmax)
                if key != "b":
                    q = q * (1.0 + self.synapse_gain[li][key])
                e = self._draw("writes", lambda r, s=shape: cfg.program_noise * r.standard_normal(s),
                               int(np.prod(shape))) * vmax
                connected = a != 0
                e = np.where(connected, e, 0.0)
                out[key] = np.where(connected, q + e, 0.0)
                err[key] = out[key] - np.where(connected, np.clip(a, -vmax, vmax), 0.0)
            written.append(out)
            errors.append(err)
        self._layers = written
        self._written_error = errors
        self.counters["uploads"] += 1
        self._advance(cfg.program_overhead_s)

    def programmed(self) -> list[dict[str, np.ndarray]]:
        """The weights actually on the chip after the last upload (copies)."""
        if self._layers is None:
            raise RuntimeError("nothing programmed yet: call program() first")
        return [{k: v.copy() for k, v in layer.items()} for layer in self._layers]

    # ------------------------------------------------------------------ time and drift
    def _advance(self, seconds: float) -> None:
        """Advance device time; parameters random-walk with it."""
        self.device_time_s += seconds
        d = self.config.drift_per_sqrt_s
        if d > 0 and seconds > 0:
            M = self.config.M
            s = d * math.sqrt(seconds)
            z = self._draw("drift", lambda r: r.standard_normal((3, M)), 3 * M)
            self.gamma = self.gamma * np.exp(s * z[0])
            self.sigma = self.sigma * np.exp(s * z[1])
            self.offset = self.offset + s * self.config.b_fixed_value * z[2]
        self._drift_time_s += seconds

    # ------------------------------------------------------------------ dynamics
    def _full_matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(W_in (N, n_in), Wr (M_send, M_recv) scaled by S, bias (M,))`` of the programmed chip."""
        cfg = self.config
        N, M = cfg.n_hidden, cfg.M
        assert self._layers is not None
        W = np.zeros((M, M))
        bias = np.zeros(M)
        for li, layer in enumerate(self._layers):
            r = slice(li * N, (li + 1) * N)
            W[r, r] = layer["W_int"]
            if li > 0:
                W[r, (li - 1) * N : li * N] = layer["W_ext"]
            bias[r] = layer["b"]
        return self._layers[0]["W_ext"], cfg.S * W.T, bias

    def rest_states(self) -> np.ndarray:
        """Each oscillator's rest state under its fixed bias and offset (inputs and biases off)."""
        cfg = self.config
        return np.array([
            rest_state(cfg.neuron, float(g), cfg.b_fixed_value + float(o), float(s), float(q))
            for g, s, q, o in zip(self.gamma, self.sigma, self.q, self.offset, strict=True)
        ])

    def run(self, inputs: Any) -> DeviceResult:
        """Run a batch of input sequences ``(B, T, n_in)`` (or ``(B, T)`` for one input) and measure
        every oscillator's state and filter output at the end of every input point."""
        if self._layers is None:
            raise RuntimeError("nothing programmed yet: call program() first")
        cfg = self.config
        u = np.asarray(inputs, dtype=np.float64)
        if u.ndim == 2 and cfg.n_in == 1:
            u = u[..., None]
        if u.ndim != 3 or u.shape[2] != cfg.n_in or u.shape[0] < 1 or u.shape[1] < 1:
            raise ValueError(f"inputs: expected shape (B, T, {cfg.n_in}), got {tuple(np.shape(inputs))}")
        if not np.isfinite(u).all():
            raise ValueError("inputs: values must be finite")
        t0 = time.perf_counter()
        with _single_thread():
            res = self._integrate(u)
        self.counters["host_seconds"] += time.perf_counter() - t0
        return res

    def _integrate(self, u: np.ndarray) -> DeviceResult:
        cfg = self.config
        B, T, _ = u.shape
        # the parameters drift during the relaxation before the batch and the call's overhead
        self._advance(cfg.call_overhead_s)
        N, M = cfg.n_hidden, cfg.M
        W_in, Wr, bias = self._full_matrices()
        f32 = np.float32  # single precision, as the model: ample for a noisy chip, twice as fast
        u_scaled = cfg.S_in * (u - cfg.input_centre) + cfg.b_in
        C = np.zeros((B, T, M))
        C[..., :N] = u_scaled @ W_in.T
        C = (cfg.S * (C + bias) + cfg.b_fixed_value + self.offset).astype(f32)  # drive but the recurrent part
        Wr = Wr.astype(f32)
        h = cfg.dt_ns / cfg.solver_substeps
        a = f32(1.0 - 2 * math.pi * cfg.f_cut_ghz * h)
        wh = 2 * math.pi * cfg.f_cut_ghz * h
        a_e, ah_e = f32(math.exp(-wh)), f32(math.exp(-wh / 2))  # expheun: exact decay, mid-step increment
        kind, method = cfg.neuron, cfg.scheme
        gamma, sigma, q = self.gamma.astype(f32), self.sigma.astype(f32), self.q.astype(f32)
        if not q.any():
            q = f32(0.0)
        tanh_out = kind in TANH_OUTPUT_TYPES
        clip = kind in CLIPPED_TYPES or kind == "spintronic"

        def out(x: np.ndarray) -> np.ndarray:
            return np.tanh(x) if tanh_out else x

        def f(x: np.ndarray, y: np.ndarray, ct: np.ndarray) -> np.ndarray:
            return drift(kind, x, ct + y @ Wr, gamma, sigma, q)

        x = np.broadcast_to(self.rest_states().astype(f32), (B, M)).copy()
        y = np.zeros((B, M), f32) if cfg.highpass else out(x)
        xs = np.empty((B, T, M), f32)
        ys = np.empty((B, T, M), f32)
        D = cfg.thermal_d_ghz
        power_noise = kind == "spintronic"
        two_dh, dh = f32(2 * D * h), f32(D * h if power_noise else 0.0)
        h32, half_h = f32(h), f32(0.5 * h)
        floor = f32(D) if power_noise and D > 0 and method == "expheun" else None
        rng = self._rng["thermal"]
        fluctuate = D > 0 and cfg.thermal_fluctuations
        for t in range(T):
            ct = C[:, t]
            xi = rng.standard_normal((cfg.solver_substeps, B, M), dtype=f32) if fluctuate else None
            for s in range(cfg.solver_substeps):
                # Ito noise of the oscillator's power, at the start of the step (x >= 0: clipped):
                # the fluctuation sqrt(2 D x h) xi and the drift D h; exponential Heun has the
                # drift in its closed form (the floor) and adds the fluctuation only
                drift_dh = dh if method != "expheun" else f32(0.0)
                if xi is not None:
                    noise = (np.sqrt(two_dh * x) if power_noise else np.sqrt(two_dh)) * xi[s] + drift_dh
                else:
                    noise = drift_dh
                if method == "expheun":
                    d0 = sigma * (ct + y @ Wr)
                    xp = held_drive_step(kind, x, d0, gamma, h32, q, np, floor=floor)[0]
                    # filter: exact decay e^{-w h}, increment weighted at mid-step (second order)
                    yp = a_e * y + ah_e * (out(xp) - out(x)) if cfg.highpass else out(xp)
                    dm = f32(0.5) * (d0 + sigma * (ct + yp @ Wr))
                    xn = held_drive_step(kind, x, dm, gamma, h32, q, np, floor=floor)[0] + noise
                    if clip:
                        np.clip(xn, 0.0, 1.0, out=xn)
                    y = a_e * y + ah_e * (out(xn) - out(x)) if cfg.highpass else out(xn)
                    x = xn
                    continue
                f0 = f(x, y, ct)
                xn = x + h32 * f0 + noise
                if method == "heun":
                    if clip:
                        np.clip(xn, 0.0, 1.0, out=xn)
                    yp = a * y + out(xn) - out(x) if cfg.highpass else out(xn)
                    xn = x + half_h * (f0 + f(xn, yp, ct)) + noise
                if clip:
                    np.clip(xn, 0.0, 1.0, out=xn)
                y = a * y + out(xn) - out(x) if cfg.highpass else out(xn)
                x = xn
            xs[:, t] = x
            ys[:, t] = y
        if fluctuate:
            self._draws["thermal"] += B * M * T * cfg.solver_substeps
        xs, ys = xs.astype(np.float64), ys.astype(np.float64)
        if cfg.readout_noise > 0:
            rd = cfg.readout_noise
            xs = xs + self._draw("readout", lambda r: rd * r.standard_normal(xs.shape), xs.size)
            ys = ys + self._draw("readout", lambda r: rd * r.standard_normal(ys.shape), ys.size)
        seq_s = B * (T * cfg.dt_ns + cfg.relax_ns) * 1e-9
        self._advance(seq_s)
        self.counters["runs"] += 1
        self.counters["sequences"] += B
        self.counters["input_points"] += B * T
        return DeviceResult(outputs=xs[..., M - N :].copy(), states=xs, filtered=ys,
                            device_time_s=cfg.call_overhead_s + seq_s)

    # ------------------------------------------------------------------ report
    def describe(self) -> dict[str, Any]:
        """Identity, settings, every static draw, the programmed weights, drifted values, counters."""
        def lists(layers):
            return None if layers is None else [{k: v.tolist() for k, v in d.items()} for d in layers]

        return {
            "identity": {"model": "sims.OscillatorArrayDevice", "serial": f"SIM-OSC-{self.seed}",
                         "seed": self.seed},
            "config": dataclasses.asdict(self.config),
            "drawn": {
                "gamma_ghz": self.gamma0.tolist(), "sigma": self.sigma0.tolist(),
                "q": self.q0.tolist(), "offset_ghz": self.offset0.tolist(),
                "synapse_gain_error": lists(self.synapse_gain),
            },
            "current": {
                "gamma_ghz": self.gamma.tolist(), "sigma": self.sigma.tolist(),
                "q": self.q.tolist(), "offset_ghz": self.offset.tolist(),
                "rest_state": self.rest_states().tolist(),
            },
            "programmed": lists(self._layers),
            "write_error": lists(self._written_error),
            "noise_streams": {name: {"seed_words": self._stream_seeds[name], "draws": self._draws[name]}
                              for name in STREAMS},
            "counters": {**self.counters, "device_time_s": self.device_time_s},
        }
