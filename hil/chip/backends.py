"""Backends: what the training code talks to when it uses a chip (DESIGN.md, "Backend").

A :class:`Backend` uploads per-layer parameters, runs a batch of input sequences and returns
the measured outputs (and, when it can, every layer's measured states), describes itself and is
closed when done; it is a context manager. Implementations:

* ``sim``: :class:`SimulatedDeviceBackend`, the in-memory simulated oscillator array of
  :mod:`sims.oscillator_device` (mismatch, noise, drift, finite-resolution programming);
* ``model``: :class:`ModelBackend`, the ideal model itself behind the same interface (a
  reference: the chip with no non-ideality, integrated exactly as the model does).

An instrument-backed chip implements the same five methods. ``tests/test_backends.py`` is the
contract every implementation must pass.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from hil.config import ModelConfig
from hil.errors import ConfigError, HilError
from sims.oscillator_device import DeviceConfig, DeviceConfigError, OscillatorArrayDevice

LAYER_KEYS = ("W_ext", "W_int", "b")


class BackendError(HilError):
    """A backend was used wrongly (closed, nothing uploaded, bad shapes) or failed."""


@dataclass(frozen=True)
class BackendSpec:
    """What a backend implements: network structure, programmable ranges, what it measures."""

    n_in: int
    n_layers: int
    n_hidden: int
    dt_ns: float
    w_max: float
    b_max: float
    offers_states: bool  # per-layer states and filter outputs at every input point

    @property
    def M(self) -> int:
        return self.n_layers * self.n_hidden


@dataclass
class Measurement:
    """One run's result. ``outputs``: last layer's states ``(B, T, N)``; ``states`` and
    ``filtered``: every oscillator's state and high-pass filter output ``(B, T, M)``, or None
    when the backend cannot measure them. ``device_time_s``: time the run took on the device."""

    outputs: np.ndarray
    states: np.ndarray | None
    filtered: np.ndarray | None
    device_time_s: float


class Backend(ABC):
    """Interface to a chip: :meth:`upload`, :meth:`run`, :meth:`describe`, :meth:`close`.

    The base class checks shapes and finiteness, refuses use after :meth:`close` or a run
    before any upload, and counts calls, sequences and device time (``counters``).
    Subclasses implement ``_upload``, ``_run``, ``_describe`` and optionally ``_close``.
    """

    name = "backend"

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.closed = False
        self.uploaded = False
        self.counters: dict[str, float] = {"uploads": 0, "runs": 0, "sequences": 0,
                                           "device_time_s": 0.0, "upload_time_s": 0.0,
                                           "host_seconds": 0.0}

    # ---------------------------------------------------------------- public API
    def upload(self, layers: Sequence[Mapping[str, Any]]) -> None:
        """Program the parameters: one mapping per layer with ``W_ext`` (N x n_in for layer 0,
        N x N from the previous layer otherwise), ``W_int`` (N x N, zero diagonal) and ``b`` (N).
        Arrays or tensors; values outside ±w_max / ±b_max are clipped by the device."""
        self._check_open()
        arrays = self._check_layers(layers)
        t0 = time.perf_counter()
        took = self._upload(arrays)
        host = time.perf_counter() - t0
        self.counters["uploads"] += 1
        self.counters["host_seconds"] += host
        # programming the chip is device time too (issue 22): what the chip reports, or else the
        # wall time of the call (a real bench is busy for as long as the upload takes)
        took = float(took) if took is not None else host
        self.counters["device_time_s"] += took
        self.counters["upload_time_s"] += took
        self.uploaded = True

    def run(self, inputs: Any) -> Measurement:
        """Run a batch of input sequences ``(B, T, n_in)`` and return what was measured."""
        self._check_open()
        if not self.uploaded:
            raise BackendError(f"{self.name}: run() before upload(): upload parameters first")
        u = np.asarray(inputs.detach().cpu().numpy() if isinstance(inputs, torch.Tensor) else inputs,
                       dtype=np.float64)
        if u.ndim != 3 or u.shape[2] != self.spec.n_in or min(u.shape) < 1:
            raise BackendError(f"{self.name}: inputs must have shape (B, T, {self.spec.n_in}), "
                               f"got {tuple(u.shape)}")
        if not np.isfinite(u).all():
            raise BackendError(f"{self.name}: inputs must be finite")
        t0 = time.perf_counter()
        m = self._run(u)
        self.counters["runs"] += 1
        self.counters["sequences"] += u.shape[0]
        self.counters["device_time_s"] += m.device_time_s
        self.counters["host_seconds"] += time.perf_counter() - t0
        return m

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps of this backend (tensors and plain data). The base class keeps
        the counters only: a real chip's physical state cannot be put back, so after a resume
        the parameters are uploaded again."""
        return {"counters": dict(self.counters)}

    def load_state(self, state: dict[str, Any]) -> bool:
        """Put back :meth:`state`; True when the chip itself is as it was (nothing to upload
        again), False when only the counters are."""
        self.counters.update(state["counters"])
        return False

    def describe(self) -> dict[str, Any]:
        """``identity``, ``parameters`` (settings and, for a simulation, every drawn value),
        ``spec`` and ``counters``."""
        d = self._describe()
        return {"backend": self.name, "identity": d.get("identity", {}),
                "parameters": d.get("parameters", {}), "spec": dataclasses.asdict(self.spec),
                "counters": dict(self.counters), "closed": self.closed}

    def close(self) -> None:
        if not self.closed:
            self._close()
            self.closed = True

    def __enter__(self) -> Backend:
        self._check_open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- to implement
    @abstractmethod
    def _upload(self, layers: list[dict[str, np.ndarray]]) -> float | None:
        """Program the chip; return the device time it took (s), or None to count the call's
        wall time."""

    @abstractmethod
    def _run(self, inputs: np.ndarray) -> Measurement: ...

    @abstractmethod
    def _describe(self) -> dict[str, Any]: ...

    def _close(self) -> None:
        return None

    # ---------------------------------------------------------------- checks
    def _check_open(self) -> None:
        if self.closed:
            raise BackendError(f"{self.name}: the backend is closed")

    def _check_layers(self, layers: Sequence[Mapping[str, Any]]) -> list[dict[str, np.ndarray]]:
        sp = self.spec
        if len(layers) != sp.n_layers:
            raise BackendError(f"{self.name}: expected {sp.n_layers} layers, got {len(layers)}")
        out = []
        for li, layer in enumerate(layers):
            shapes = {"W_ext": (sp.n_hidden, sp.n_in if li == 0 else sp.n_hidden),
                      "W_int": (sp.n_hidden, sp.n_hidden), "b": (sp.n_hidden,)}
            d = {}
            for key, shape in shapes.items():
                if key not in layer:
                    raise BackendError(f"{self.name}: layers[{li}].{key} is missing")
                v = layer[key]
                a = np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v,
                               dtype=np.float64)
                if a.shape != shape:
                    raise BackendError(f"{self.name}: layers[{li}].{key} must have shape {shape}, "
                                       f"got {a.shape}")
                if not np.isfinite(a).all():
                    raise BackendError(f"{self.name}: layers[{li}].{key} has non-finite values")
                d[key] = a
            if np.any(np.diag(d["W_int"]) != 0):
                raise BackendError(f"{self.name}: layers[{li}].W_int must have a zero diagonal")
            out.append(d)
        return out


# ----------------------------------------------------------------------------- simulated chip

def device_config(model: ModelConfig, n_in: int, input_centre: float,
                  overrides: Mapping[str, Any] | Sequence[str] | None = None) -> DeviceConfig:
    """The chip that implements ``model``: nominal values from the model config, programmable
    ranges from its clipping (``w_clip``, ``b_clip``; 10 / 1 when clipping is off), and the
    simulation's default non-idealities unless ``overrides`` (``{"cv_gamma": 0.3}`` or
    ``["cv_gamma=0.3"]``) change them. Bad keys or values raise ConfigError("device.<key>")."""
    base = DeviceConfig(
        n_in=n_in, n_layers=model.n_layers, n_hidden=model.n_hidden, neuron=model.neuron,
        tau_ns=model.tau_ns, sigma=model.sigma, q=model.q, S=model.S, S_in=model.S_in,
        b_in=model.b_in, input_centre=float(input_centre), b_fixed=model.b_fixed_value,
        highpass=model.highpass_on, f_cut_ghz=model.f_cut_ghz, dt_ns=model.dt_ns,
        w_max=model.w_clip if model.w_clip is not None else 10.0,
        b_max=model.b_clip if model.b_clip is not None else 1.0,
    )
    try:
        return DeviceConfig.from_mapping(parse_device_overrides(overrides), base, prefix="device",
                                         number_text=True)
    except DeviceConfigError as exc:
        raise ConfigError(exc.key, exc.message) from None


def parse_device_overrides(overrides: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """``["cv_gamma=0.3", "method=euler"]`` (values read as YAML scalars) or a mapping -> dict."""
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return {str(k).removeprefix("device."): v for k, v in overrides.items()}
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(str(item), "device settings look like KEY=VALUE, e.g. cv_gamma=0.2",
                              "command line")
        k, raw = item.split("=", 1)
        out[k.strip().removeprefix("device.")] = yaml.safe_load(raw)
    return out


class SimulatedDeviceBackend(Backend):
    """The simulated oscillator-array chip of :mod:`sims.oscillator_device` as a backend."""

    name = "sim"

    def __init__(self, config: DeviceConfig, seed: int) -> None:
        try:
            self.device = OscillatorArrayDevice(config, seed)
        except DeviceConfigError as exc:
            raise ConfigError(f"device.{exc.key}", exc.message) from None
        c = self.device.config
        super().__init__(BackendSpec(n_in=c.n_in, n_layers=c.n_layers, n_hidden=c.n_hidden,
                                     dt_ns=c.dt_ns, w_max=c.w_max, b_max=c.b_max, offers_states=True))

    def _upload(self, layers: list[dict[str, np.ndarray]]) -> float:
        before = self.device.device_time_s
        self.device.program(layers)
        return self.device.device_time_s - before

    def state(self) -> dict[str, Any] | None:
        """The chip's whole changing state (random streams, drifted values, what is programmed,
        its clock) and the counters: a checkpoint resumes on the very chip it left."""
        return {"device": self.device.get_state(), "counters": dict(self.counters),
                "uploaded": self.uploaded}

    def load_state(self, state: dict[str, Any]) -> bool:
        self.device.set_state(state["device"])
        self.counters.update(state["counters"])
        self.uploaded = bool(state["uploaded"])
        return True

    def _run(self, inputs: np.ndarray) -> Measurement:
        r = self.device.run(inputs)
        return Measurement(r.outputs, r.states, r.filtered, r.device_time_s)

    def _describe(self) -> dict[str, Any]:
        d = self.device.describe()
        return {"identity": d["identity"], "parameters": d}


# ----------------------------------------------------------------------------- the model as a chip

class ModelBackend(Backend):
    """The ideal model behind the backend interface: what a chip with no mismatch, noise or
    drift, integrated exactly like the model, would measure. A reference for tests and for the
    "ideal" column of the studies. Device time: the sequences' duration, no overhead."""

    name = "model"

    def __init__(self, model: ModelConfig, n_in: int, input_centre: float, seed: int = 0) -> None:
        from hil.network.model import DynamicalNetwork

        self.model_cfg = model
        self.seed = int(seed)
        self.net = DynamicalNetwork([model], n_in, 1, [int(seed)], input_centre)
        super().__init__(BackendSpec(
            n_in=n_in, n_layers=model.n_layers, n_hidden=model.n_hidden, dt_ns=model.dt_ns,
            w_max=model.w_clip if model.w_clip is not None else float("inf"),
            b_max=model.b_clip if model.b_clip is not None else float("inf"), offers_states=True))

    @torch.no_grad()
    def _upload(self, layers: list[dict[str, np.ndarray]]) -> float:
        net, N = self.net, self.spec.n_hidden
        W = torch.zeros(net.M, net.M)
        b = torch.zeros(net.M)
        for li, layer in enumerate(layers):
            r = slice(li * N, (li + 1) * N)
            W[r, r] = torch.as_tensor(layer["W_int"], dtype=torch.float32)
            if li > 0:
                W[r, (li - 1) * N : li * N] = torch.as_tensor(layer["W_ext"], dtype=torch.float32)
            b[r] = torch.as_tensor(layer["b"], dtype=torch.float32)
        # every synapse of the interface exists on this "chip": no sparsity mask
        net.mask.fill_(1.0)
        net.mask[0].fill_diagonal_(0.0)
        net.W_rec.copy_(W.unsqueeze(0))
        net.W_in.copy_(torch.as_tensor(layers[0]["W_ext"], dtype=torch.float32).unsqueeze(0))
        net.bias.copy_(b.unsqueeze(0))
        net.clip_parameters()
        return 0.0  # the ideal chip programs instantly

    @torch.no_grad()
    def _run(self, inputs: np.ndarray) -> Measurement:
        from hil.network.model import State

        net = self.net
        u = torch.as_tensor(inputs, dtype=torch.float32)
        st: State = net.initial_state(u.shape[0])
        xs, ys = [], []
        for t in range(u.shape[1]):  # point by point, to measure the filter outputs too
            _, st = net(u[:, t : t + 1], st)
            xs.append(st.x[0])
            ys.append(st.y[0])
        x = torch.stack(xs, 1).double().numpy()
        y = torch.stack(ys, 1).double().numpy()
        dur = u.shape[0] * u.shape[1] * self.spec.dt_ns * 1e-9
        return Measurement(x[..., net.M - net.N :].copy(), x, y, dur)

    def _describe(self) -> dict[str, Any]:
        return {"identity": {"model": "hil.ModelBackend", "serial": f"MODEL-{self.seed}"},
                "parameters": {"model": dataclasses.asdict(self.model_cfg),
                               "input_centre": float(self.net.input_centre)}}


# ----------------------------------------------------------------------------- chip over VISA

LAB_PREFIX = "lab:"


def lab_config_path(lab_config: str | Path) -> Path:
    """``lab_config`` as given, or relative to the installed package when only it exists there
    (``lab:lab_configs/virtual.yaml`` from any folder)."""
    from hil.bench.lab import package_root

    path = Path(lab_config)
    if not path.exists() and not path.is_absolute() and (package_root() / path).exists():
        path = package_root() / path
    return path


class InstrumentChipBackend(Backend):
    """A chip controller reached through a lab configuration (its instrument with driver
    ``hil_oscillator_chip``, or else the chip of its virtual world; ``drivers.oscillator_chip``):
    uploads and runs go over VISA as binary blocks. On the virtual lab
    (``lab_configs/virtual.yaml``) the controller emulates the simulated chip, which is
    configured here with ``config`` and ``seed`` (so it draws the same chip as the ``sim``
    backend; values travel as float32).

    The chip is opened through a :class:`hil.bench.lab.Lab` like every other instrument (``self.lab``):
    the bench lock, the lab clock (the virtual world's on the virtual bench), and with
    ``record_to`` (a run folder or a ``.jsonl`` file, as for ``open_lab``) every exchange is
    recorded; closing the backend closes the lab, which makes the chip safe."""

    name = "lab"

    def __init__(self, lab_config: str | Path, config: DeviceConfig, seed: int, *,
                 record_to: str | Path | None = None) -> None:
        path = lab_config_path(lab_config)
        self.lab_config = str(path)
        self._last_description: dict[str, Any] | None = None
        self.lab, self.chip, self.world = self._open_chip(path, record_to=record_to)
        try:
            self.chip.clear_errors()
            self.cfg = self.chip.configure(dataclasses.asdict(config), seed)
        except BaseException as exc:
            self._close_lab(exc)
            raise
        c = self.cfg
        super().__init__(BackendSpec(n_in=c["n_in"], n_layers=c["n_layers"], n_hidden=c["n_hidden"],
                                     dt_ns=c["dt_ns"], w_max=c["w_max"], b_max=c["b_max"],
                                     offers_states=True))

    @classmethod
    def _open_chip(cls, path: Path, *, record_to: str | Path | None = None) -> tuple[Any, Any, Any]:
        """Open the chip controller of a lab configuration through a ``Lab``: its instrument with
        a chip driver, or else the ``hil_oscillator_chip`` of its virtual world (added to the
        configuration as a virtual instrument). ``(lab, driver, world or None)``; the world is
        the one the chip lives in (None on a real bench)."""
        from drivers.base import DriverError
        from drivers.oscillator_chip import OscillatorChipController
        from hil.bench.lab import InstrumentConfig, LabError, load_lab_config, open_lab

        cfg = load_lab_config(path)
        world: Any = None
        chip = next((inst for inst in cfg.instruments.values()
                     if inst.driver_class.KIND == OscillatorChipController.KIND), None)
        if chip is None:
            if cfg.virtual is None:
                raise ConfigError("--backend", f"{path} has no instrument with a chip driver "
                                  "(hil_oscillator_chip) and no virtual world")
            world = cfg.virtual.build()
            chips = [(n, m) for n, m in world.instruments.items()
                     if m.MODEL == "hil_oscillator_chip"]
            if not chips:
                raise ConfigError("--backend", f"neither {path} nor its virtual world "
                                  f"{cfg.virtual.world.name} has an oscillator-array chip "
                                  "controller")
            world_name, model = chips[0]
            name = world_name if world_name not in cfg.instruments else f"{world_name}@virtual"
            chip = InstrumentConfig(name=name, driver=model.MODEL, address=model.address,
                                    backend="@virtual")
            cfg = dataclasses.replace(cfg, instruments={**cfg.instruments, name: chip})
        try:
            lab = open_lab(cfg, record_to=record_to, world=world, instruments=[chip.name])
        except LabError as exc:
            # the driver's own message, as when the chip was opened directly
            cause = exc.__cause__ if isinstance(exc.__cause__, DriverError | ConnectionError) else exc
            raise BackendError(f"{cls.name}: cannot open the chip of {path}: {cause}") from exc
        return lab, lab.instruments[chip.name], lab.world if chip.backend == "@virtual" else None

    def _close_lab(self, exc: BaseException | None = None) -> None:
        """Close the lab (the chip made safe, the exchange log closed); a failure becomes a
        ``BackendError``, or a note on ``exc`` when closing after another error."""
        from hil.bench.lab import LabError

        try:
            self.lab.close()
        except LabError as close_exc:
            if exc is None:
                raise BackendError(f"{self.name}: {close_exc}") from close_exc
            exc.add_note(str(close_exc))

    def _upload(self, layers: list[dict[str, np.ndarray]]) -> float | None:
        from drivers.base import DriverError

        t0 = self.world.clock.now_s() if self.world is not None else None
        try:
            self.chip.upload(layers, self.cfg)
        except DriverError as exc:
            raise BackendError(f"{self.name}: upload failed: {exc}") from exc
        # on the virtual bench: lab time on its clock; on a real one: the call's wall time
        return self.world.clock.now_s() - t0 if t0 is not None else None

    def _run(self, inputs: np.ndarray) -> Measurement:
        from drivers.base import DriverError

        t0 = self.world.clock.now_s() if self.world is not None else time.perf_counter()
        try:
            r = self.chip.run(inputs, self.cfg)
        except DriverError as exc:
            raise BackendError(f"{self.name}: run failed: {exc}") from exc
        # the bench's time, not only the chip's: transfers and waits count (issue 22). On the
        # virtual lab its clock; on a real bench the call's wall time, or the chip's own figure
        # where that is longer
        took = (self.world.clock.now_s() - t0 if self.world is not None
                else max(time.perf_counter() - t0, float(r["device_time_s"])))
        return Measurement(r["outputs"], r["states"], r["filtered"], float(took))

    def _describe(self) -> dict[str, Any]:
        if self._last_description is not None:  # closed: what the chip said last
            return self._last_description
        return {"identity": {"idn": self.chip.identity, "lab_config": self.lab_config,
                             "address": getattr(self.chip.transport, "address", "")},
                "parameters": self.chip.describe_device()}

    def _close(self) -> None:
        try:
            self._last_description = self._describe()
        finally:
            self._close_lab()


def _sim(arg: str | None, model: ModelConfig, n_in: int, input_centre: float, seed: int,
         device: Mapping[str, Any] | Sequence[str] | None) -> Backend:
    return SimulatedDeviceBackend(device_config(model, n_in, input_centre, device), seed)


def _model(arg: str | None, model: ModelConfig, n_in: int, input_centre: float, seed: int,
           device: Mapping[str, Any] | Sequence[str] | None) -> Backend:
    _check_model(arg, model, n_in, device)
    return ModelBackend(model, n_in, input_centre, seed)


def _lab(arg: str | None, model: ModelConfig, n_in: int, input_centre: float, seed: int,
         device: Mapping[str, Any] | Sequence[str] | None) -> Backend:
    return InstrumentChipBackend(str(arg), device_config(model, n_in, input_centre, device), seed)


BackendFactory = Callable[[str | None, ModelConfig, int, float, int,
                           Mapping[str, Any] | Sequence[str] | None], Backend]
#: backend name -> how to build it ``(argument, model, n_in, input_centre, seed, device)``
BACKENDS: dict[str, BackendFactory] = {"sim": _sim, "model": _model}
#: backends that take an argument, written ``NAME:ARG``: ``lab:<lab config>``
PARAMETRISED_BACKENDS: dict[str, BackendFactory] = {LAB_PREFIX.rstrip(":"): _lab}


def _backend_key(name: str) -> tuple[str, str | None]:
    """``(registry key, argument)`` of a backend name (``sim`` -> ``("sim", None)``,
    ``lab:x.yaml`` -> ``("lab", "x.yaml")``), or the ConfigError listing the allowed names."""
    head, sep, arg = name.partition(":")
    if sep and arg and head in PARAMETRISED_BACKENDS:
        return head, arg
    if not sep and name in BACKENDS:
        return name, None
    allowed = [*BACKENDS, *(f"{k}:<lab config>" for k in PARAMETRISED_BACKENDS)]
    raise ConfigError("--backend", f"unknown backend {name!r}; allowed: {', '.join(allowed)}")


def make_backend(name: str, model: ModelConfig, n_in: int, input_centre: float, seed: int,
                 device: Mapping[str, Any] | Sequence[str] | None = None) -> Backend:
    """Build backend ``name`` (a key of :data:`BACKENDS`, or ``NAME:ARG`` for one of
    :data:`PARAMETRISED_BACKENDS`) for a model config; ``seed`` draws the simulated chip."""
    key, arg = _backend_key(name)
    factory = BACKENDS[key] if arg is None else PARAMETRISED_BACKENDS[key]
    return factory(arg, model, n_in, input_centre, seed, device)


def _check_chip(arg: str | None, model: ModelConfig, n_in: int,
                device: Mapping[str, Any] | Sequence[str] | None) -> None:
    device_config(model, n_in, 0.0, device)


def _check_model(arg: str | None, model: ModelConfig, n_in: int,
                 device: Mapping[str, Any] | Sequence[str] | None) -> None:
    if device:
        raise ConfigError("--device", "the model backend has no device settings")


def _check_lab(arg: str | None, model: ModelConfig, n_in: int,
               device: Mapping[str, Any] | Sequence[str] | None) -> None:
    from hil.bench.lab import load_lab_config

    load_lab_config(lab_config_path(str(arg)))  # a missing or invalid file: one ConfigError
    device_config(model, n_in, 0.0, device)


#: what each backend checks before anything runs: its device settings, its lab config
BACKEND_CHECKS: dict[str, Callable[[str | None, ModelConfig, int,
                                    Mapping[str, Any] | Sequence[str] | None], None]] = {
    "sim": _check_chip, "model": _check_model, LAB_PREFIX.rstrip(":"): _check_lab}


def check_backend(name: str, model: ModelConfig, n_in: int,
                  device: Mapping[str, Any] | Sequence[str] | None = None) -> None:
    """Refuse what :func:`make_backend` would refuse (an unknown name, bad device settings, a
    missing or invalid lab config) without building anything: called before training, so a
    mistake costs no training or device time."""
    key, arg = _backend_key(name)
    BACKEND_CHECKS[key](arg, model, n_in, device)


def layers_from_tensors(W_in: torch.Tensor, W_rec: torch.Tensor, bias: torch.Tensor, n_layers: int,
                        n_hidden: int) -> list[dict[str, torch.Tensor]]:
    """Per-layer parameters of one trial from the model's ``W_in (N, n_in)``, masked
    ``W_rec (M, M)`` and ``bias (M,)``."""
    N = n_hidden
    out = []
    for li in range(n_layers):
        r = slice(li * N, (li + 1) * N)
        out.append({"W_ext": W_in if li == 0 else W_rec[r, (li - 1) * N : li * N],
                    "W_int": W_rec[r, r], "b": bias[r]})
    return out
