"""Typed, validated configuration for models, tasks and training.

Configs come from a preset (``hil/presets/*.yaml``), a user YAML file and command-line
overrides, merged in that order. Every value is checked; a bad one raises
:class:`hil.errors.ConfigError` naming the source, the key and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hil.errors import ConfigError
from hil.task_specs import TASK_SPECS, task_spec
from sims.neurons import NEURON_TYPES, default_fixed_bias
from sims.schema import ConfigError as SchemaConfigError
from sims.schema import apply_mapping, check_choices, choices

SCHEMES = ("euler", "expheun")  # as hil.network.engine.SCHEMES (the engine checks they agree)
EXPHEUN_KINDS = ("spintronic", "ctrnn")

TASKS = TASK_SPECS  # task name -> spec (hil.task_specs); hil.network.tasks registers the full classes
ENGINES = ("fast", "reference")
BPTT_MODES = ("full", "truncated", "shifted", "exact")
MAX_SEEDS = 10_000  # seeds in one run (they train together as a batch dimension)


@dataclass
class ModelConfig:
    """The multilayer dynamical network (paper eq. 2-5, thesis eq. 6.1-6.2). Units: ns, GHz."""

    neuron: str = field(default="spintronic", metadata=choices(NEURON_TYPES, "model"))
    n_layers: int = 3
    n_hidden: int = 32
    tau_ns: float = 14.12  # relaxation time, gamma = 1 / tau
    q: float = 0.0  # non-linear damping Q (paper eq. 1)
    sigma: float = 1.0  # drive coefficient (paper eq. 1)
    S: float = 0.5  # amplification applied to every layer's drive
    S_in: float = 1.0  # input scaling
    b_in: float = 0.0  # input offset, added after centring and scaling
    b_fixed: float | None = None  # fixed bias; None: rest at x = 0.5 (2 gamma, spintronic)
    highpass: bool | None = None  # high-pass filter between layers; None: on except for ctrnn
    f_cut_ghz: float = 0.001  # filter cut-off (1 MHz)
    density_inter: float = 0.5
    density_intra: float = 0.5
    dt_ns: float = 1.0  # time between two input points
    substeps: int = 4  # integration steps per input point
    # euler | expheun (hil.network.engine.SCHEMES); None: expheun where defined
    integrator: str | None = field(default=None, metadata=choices(SCHEMES, "integrator"))
    # thermal diffusion of the oscillator's power (GHz): the Ito drift of thermal noise, so that
    # an oscillator below threshold rests at ~D / (gamma - I) instead of exactly 0 and one above
    # threshold always starts; the simulated chip's default is 2e-5 (spintronic neurons; other
    # neuron types have no power and ignore it)
    thermal_d_ghz: float = 0.0
    w_clip_dt: float | None = 0.25  # weights clipped to w_clip_dt / dt_ns (thesis 6.7.2); None: off
    b_clip_dt: float | None = 0.15  # biases clipped to b_clip_dt / dt_ns; None: off
    init_scale: float = 1.0  # weights ~ U(-a, a), a = init_scale / sqrt(fan-in)

    @property
    def gamma(self) -> float:
        return 1.0 / self.tau_ns

    @property
    def b_fixed_value(self) -> float:
        if self.b_fixed is not None:
            return self.b_fixed
        return default_fixed_bias(self.neuron, self.gamma)

    @property
    def highpass_on(self) -> bool:
        return self.highpass if self.highpass is not None else self.neuron != "ctrnn"

    @property
    def scheme(self) -> str:
        """The integration scheme that runs: ``integrator``, or by default exponential Heun
        (converged at a few steps per point, stable at any drive) where the neuron type has it,
        explicit Euler for the clipped comparison neurons of thesis eq. 5.12."""
        if self.integrator is not None:
            return self.integrator
        return "expheun" if self.neuron in EXPHEUN_KINDS else "euler"

    @property
    def h_ns(self) -> float:
        """Integration step."""
        return self.dt_ns / self.substeps

    @property
    def w_clip(self) -> float | None:
        return None if self.w_clip_dt is None else self.w_clip_dt / self.dt_ns

    @property
    def b_clip(self) -> float | None:
        return None if self.b_clip_dt is None else self.b_clip_dt / self.dt_ns


@dataclass
class TaskConfig:
    """Which task, with its options (see :mod:`hil.network.tasks`)."""

    name: str = "digits"
    # digits
    val_fraction: float = 0.0  # part of the training half held out for validation
    # sine/square (thesis 5.5)
    n_periods: int = 80
    points_per_period: int = 8
    window: int = 30  # truncated-BPTT window (k1 = k2)
    # flip-flop (seed 004)
    n_bits: int = 3
    seq_len: int = 200
    n_train: int = 600
    n_test: int = 200
    pulse_prob: float = 0.05
    input_noise: float = 0.05
    delay: int = 2  # output lag in input points after a pulse


@dataclass
class TrainConfig:
    """Optimisation: Adam, lr0 / (epoch / decay + 1), per-element gradient clipping."""

    epochs: int = 60
    batch_size: int = 120
    lr0: float = 0.01
    lr_decay: float = 5.0
    grad_clip: float | None = 1.0
    # full | truncated | shifted | exact (the last three: sine/square only)
    bptt: str = field(default="full", metadata=choices(BPTT_MODES, "mode"))
    output_gain: float = 1000.0  # sine/square: gain before the sigmoid (thesis eq. 5.5)
    # truncated/shifted BPTT: at most this many windows (weight updates) per epoch, taken
    # every k-th window over the whole series; None: all windows. exact: the windows an
    # epoch trains on, batch_size per update (None: as many as the series has)
    windows_per_epoch: int | None = None
    engine: str = field(default="fast", metadata=choices(ENGINES, "engine"))
    max_rollbacks: int = 3  # per seed, on a non-finite loss


@dataclass
class HardwareConfig:
    """Hardware-aware off-chip training: the chip's known non-idealities, drawn afresh in every
    training pass (never in evaluation), so that the weights found work on a chip that has
    them. Names and meanings as the simulated chip's settings
    (:class:`sims.oscillator_device.DeviceConfig`); 0 or null: off."""

    weight_bits: int | None = None  # weights quantised over +-w_clip, biases over +-b_clip (STE)
    program_noise: float = 0.0  # write error per pass, std relative to w_clip (b_clip)
    synapse_gain_cv: float = 0.0  # multiplicative gain error of every synapse
    offset_std: float = 0.0  # drive offset of every oscillator (GHz)
    cv_gamma: float = 0.0  # mismatch of the damping (log-normal, coefficient of variation)
    cv_sigma: float = 0.0  # mismatch of the drive coefficient
    readout_noise: float = 0.0  # std added to every state the readout reads

    @property
    def active(self) -> bool:
        return self.weight_bits is not None or any(
            getattr(self, k) > 0 for k in ("program_noise", "synapse_gain_cv", "offset_std",
                                           "cv_gamma", "cv_sigma", "readout_noise"))


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    preset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- validation

@contextlib.contextmanager
def _hil_errors() -> Iterator[None]:
    """The schema helpers' :class:`sims.schema.ConfigError` as :class:`hil.errors.ConfigError`
    (its subclass, also a ``HilError``)."""
    try:
        yield
    except ConfigError:
        raise
    except SchemaConfigError as exc:
        raise ConfigError(exc.key, exc.message, exc.source) from None


def _req(cond: bool, key: str, msg: str, source: str | None) -> None:
    if not cond:
        raise ConfigError(key, msg, source)


def _pos(v: float, key: str, src: str | None) -> None:
    _req(math.isfinite(v) and v > 0, key, f"must be a positive number, got {v!r}", src)


def _unit(v: float, key: str, src: str | None, low_open: bool = False) -> None:
    ok = math.isfinite(v) and (0 < v if low_open else 0 <= v) and v <= 1
    rng = "(0, 1]" if low_open else "[0, 1]"
    _req(ok, key, f"must be in {rng}, got {v!r}", src)


def validate(cfg: RunConfig, source: str | None = None) -> RunConfig:
    """Check every value; raise :class:`ConfigError` on the first bad one."""
    m, t, tr = cfg.model, cfg.task, cfg.train
    for name in _SECTIONS:  # the keys with a fixed set of values (neuron, integrator, ...)
        with _hil_errors():
            check_choices(getattr(cfg, name), name, source)
    _req(m.n_layers >= 1, "model.n_layers", f"must be >= 1, got {m.n_layers}", source)
    _req(m.n_hidden >= 1, "model.n_hidden", f"must be >= 1, got {m.n_hidden}", source)
    _pos(m.tau_ns, "model.tau_ns", source)
    _pos(m.dt_ns, "model.dt_ns", source)
    _req(m.substeps >= 1, "model.substeps", f"must be an integer >= 1, got {m.substeps}", source)
    _req(math.isfinite(m.thermal_d_ghz) and m.thermal_d_ghz >= 0, "model.thermal_d_ghz",
         f"must be >= 0, got {m.thermal_d_ghz}", source)
    _req(m.scheme != "expheun" or m.neuron in EXPHEUN_KINDS, "model.integrator",
         f"'expheun' is defined for {', '.join(EXPHEUN_KINDS)} neurons, not {m.neuron!r}; use euler",
         source)
    _req(math.isfinite(m.q) and m.q >= 0, "model.q", f"must be >= 0, got {m.q}", source)
    _pos(m.sigma, "model.sigma", source)
    _pos(m.S, "model.S", source)
    _pos(m.S_in, "model.S_in", source)
    _req(math.isfinite(m.b_in), "model.b_in", f"must be a finite number, got {m.b_in}", source)
    if m.b_fixed is not None:
        _req(math.isfinite(m.b_fixed), "model.b_fixed", "must be a finite number or null", source)
    _req(math.isfinite(m.f_cut_ghz) and m.f_cut_ghz >= 0, "model.f_cut_ghz",
         f"must be >= 0 GHz, got {m.f_cut_ghz}", source)
    _req(2 * math.pi * m.f_cut_ghz * m.h_ns < 1, "model.f_cut_ghz",
         "2 pi f_cut times the Euler step must be < 1 for a stable filter", source)
    _unit(m.density_inter, "model.density_inter", source, low_open=True)
    _unit(m.density_intra, "model.density_intra", source)
    for key in ("w_clip_dt", "b_clip_dt"):
        v = getattr(m, key)
        if v is not None:
            _pos(v, f"model.{key}", source)
    _pos(m.init_scale, "model.init_scale", source)

    spec = task_spec(t.name, source)
    _req(0 <= t.val_fraction < 1, "task.val_fraction", f"must be in [0, 1), got {t.val_fraction}",
         source)
    for key in ("n_periods", "points_per_period", "window", "n_bits", "seq_len", "n_train",
                "n_test"):
        v = getattr(t, key)
        _req(isinstance(v, int) and v >= 1, f"task.{key}", f"must be an integer >= 1, got {v!r}",
             source)
    _unit(t.pulse_prob, "task.pulse_prob", source, low_open=True)
    _req(t.input_noise >= 0, "task.input_noise", f"must be >= 0, got {t.input_noise}", source)
    _req(t.delay >= 0, "task.delay", f"must be >= 0, got {t.delay}", source)
    spec.validate(t, source)  # the task's own checks (flip-flop: the pulse and its switch fit)

    hw = cfg.hardware
    if hw.weight_bits is not None:
        _req(isinstance(hw.weight_bits, int) and 2 <= hw.weight_bits <= 32, "hardware.weight_bits",
             f"must be an integer in [2, 32] or null, got {hw.weight_bits!r}", source)
        _req(m.w_clip is not None and m.b_clip is not None, "hardware.weight_bits",
             "quantisation needs the programmable ranges: set model.w_clip_dt and model.b_clip_dt", source)
    for key in ("program_noise", "synapse_gain_cv", "offset_std", "cv_gamma", "cv_sigma", "readout_noise"):
        v = getattr(hw, key)
        _req(math.isfinite(v) and v >= 0, f"hardware.{key}", f"must be a number >= 0, got {v!r}", source)
    _req(hw.program_noise == 0 or (m.w_clip is not None and m.b_clip is not None), "hardware.program_noise",
         "the write error is relative to the programmable ranges: set model.w_clip_dt and b_clip_dt", source)

    _req(tr.epochs >= 1, "train.epochs", f"must be >= 1, got {tr.epochs}", source)
    _req(tr.batch_size >= 1, "train.batch_size", f"must be >= 1, got {tr.batch_size}", source)
    _pos(tr.lr0, "train.lr0", source)
    _pos(tr.lr_decay, "train.lr_decay", source)
    if tr.grad_clip is not None:
        _pos(tr.grad_clip, "train.grad_clip", source)
    _pos(tr.output_gain, "train.output_gain", source)
    if tr.windows_per_epoch is not None:
        v = tr.windows_per_epoch
        _req(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
             "train.windows_per_epoch", f"must be an integer >= 1 or null, got {v!r}", source)
    _req(tr.max_rollbacks >= 0, "train.max_rollbacks", "must be >= 0", source)
    _req(len(cfg.seeds) >= 1, "seeds", "at least one seed is needed", source)
    _req(len(set(cfg.seeds)) == len(cfg.seeds), "seeds", f"seeds repeat: {cfg.seeds}", source)
    return cfg


# ----------------------------------------------------------------------------- loading

_SECTIONS = {"model": ModelConfig, "task": TaskConfig, "train": TrainConfig, "hardware": HardwareConfig}


#: Keys that no longer exist: (the value every config written before the removal holds, which
#: did what the program does now and is dropped silently so that old run folders still load;
#: why it was removed). Any other value is refused with the reason.
REMOVED_KEYS: dict[str, tuple[Any, str]] = {
    "train.eval_every": (1, "the test metric is evaluated after every epoch (the key was never "
                            "read)"),
}


def _apply(obj: Any, values: dict[str, Any], prefix: str, source: str | None) -> None:
    """Set the section ``prefix`` of a config from ``values``, each converted to its field's
    type (numbers written as text, like ``2e-5`` on the command line, are read as numbers)."""
    removed = {key.split(".", 1)[1]: why for key, (_, why) in REMOVED_KEYS.items()
               if key.startswith(prefix + ".")}
    values = {k: v for k, v in values.items()
              if not (k in removed and v == REMOVED_KEYS[f"{prefix}.{k}"][0])}
    with _hil_errors():
        apply_mapping(obj, values, prefix, source, removed=removed, number_text=True)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (``{"model": {"S": 1}}`` -> ``{"model.S": 1}``),
    the names ``--set`` uses."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_seeds(spec: Any, source: str | None = None) -> list[int]:
    """``"0-9"``, ``"0,3,5"``, ``7`` or a list -> list of ints."""
    if isinstance(spec, bool):
        raise ConfigError("seeds", "expected integers like 0-9 or 0,1,2", source)
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, list):
        out = []
        for s in spec:
            out += parse_seeds(s, source)
        return out
    if isinstance(spec, str):
        out: list[int] = []
        try:
            for part in spec.split(","):
                part = part.strip()
                if "-" in part[1:]:
                    a, b = part.split("-", 1)
                    lo, hi = int(a), int(b)
                    if hi < lo:
                        raise ValueError
                    if len(out) + hi - lo + 1 > MAX_SEEDS:  # refused before the list is built
                        raise ConfigError("seeds", f"{spec!r} asks for {len(out) + hi - lo + 1} seeds; "
                                          f"at most {MAX_SEEDS} train in one run", source)
                    out += list(range(lo, hi + 1))
                elif part:
                    out.append(int(part))
        except ConfigError:
            raise
        except ValueError:
            raise ConfigError("seeds", f"cannot read {spec!r}; use 0-9 or 0,1,2", source) from None
        if not out:
            raise ConfigError("seeds", f"{spec!r} names no seed; use 0-9 or 0,1,2", source)
        if min(out) < 0:
            raise ConfigError("seeds", "seeds must be >= 0", source)
        return out
    raise ConfigError("seeds", f"cannot read {spec!r}; use 0-9 or 0,1,2", source)


def update(cfg: RunConfig, data: dict[str, Any], source: str | None) -> RunConfig:
    """Merge a nested dict (from YAML) into ``cfg``."""
    if not isinstance(data, dict):
        raise ConfigError("<top>", "a config file must be a mapping of sections", source)
    for k, v in data.items():
        if k in _SECTIONS:
            if not isinstance(v, dict):
                raise ConfigError(k, "must be a mapping", source)
            _apply(getattr(cfg, k), v, k, source)
        elif k == "seeds":
            cfg.seeds = parse_seeds(v, source)
        elif k == "preset":  # null stays None (it used to become the text 'None')
            cfg.preset = None if v is None else str(v)
        else:
            allowed = ", ".join([*_SECTIONS, "seeds", "preset"])
            raise ConfigError(k, f"unknown section; allowed: {allowed}", source)
    return cfg


def apply_overrides(cfg: RunConfig, overrides: list[str], source: str = "command line") -> RunConfig:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(item, "overrides look like section.key=value, e.g. model.S=0.5",
                              source)
        key, raw = item.split("=", 1)
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            why = str(getattr(exc, "problem", None) or "not a YAML value")
            raise ConfigError(key, f"cannot read the value {raw!r} ({why}); give a number, a "
                              "string, true/false, null or a [list]", source) from None
        update(cfg, {section: {name: value}}, source)
    return cfg


def preset_names() -> list[str]:
    files = resources.files("hil") / "presets"
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict[str, Any]:
    path = resources.files("hil") / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("preset", f"unknown preset {name!r}; available: "
                          f"{', '.join(preset_names())}", None)
    return yaml.safe_load(path.read_text()) or {}


def load_config(path: str | Path | None = None, preset: str | None = None,
                overrides: list[str] | None = None, seeds: Any = None) -> RunConfig:
    """Preset, then file, then overrides, then ``seeds`` (``--seeds``: "0-9", "0,3,5", a list);
    validated, and refused up front if it cannot fit in memory."""
    cfg = RunConfig()
    file_data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config", f"file not found: {p}", str(p))
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError("config", "not a text file (a YAML config is UTF-8 text with "
                              "sections model, task, train, hardware, seeds)", str(p)) from None
        except OSError as exc:
            raise ConfigError("config", f"cannot read the file: {exc.strerror or exc}", str(p)) from None
        if "\x00" in text:
            raise ConfigError("config", "not a text file (it holds NUL bytes); a YAML config is "
                              "UTF-8 text", str(p))
        try:
            file_data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            first = " ".join(str(exc).split())
            raise ConfigError("config", f"not valid YAML: {first[:200]}", str(p)) from None
        if not isinstance(file_data, dict):
            raise ConfigError("<top>", "a config file must be a mapping of sections", str(p))
    name = preset or file_data.get("preset")
    if name:
        update(cfg, load_preset(str(name)), f"preset {name}")
        cfg.preset = str(name)
    if file_data:
        update(cfg, file_data, str(path))
    if overrides:
        apply_overrides(cfg, overrides)
    if seeds is not None:
        cfg.seeds = parse_seeds(seeds, "--seeds")
        _req(len(set(cfg.seeds)) == len(cfg.seeds), "seeds",
             f"seeds repeat: {seeds!r}; each seed may appear once (it would be counted twice)", "--seeds")
    validate(cfg, source=str(path) if path else None)
    check_memory(cfg, source="--seeds" if seeds is not None else None)
    return cfg


# ----------------------------------------------------------------------------- memory

def available_memory() -> int | None:
    """Bytes of memory available to a new job (Linux ``MemAvailable``; else physical memory)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def _task_shape(t: TaskConfig, tr: TrainConfig) -> tuple[int, int, int, int]:
    """(input channels, points per sequence, sequences per training pass, per evaluation)."""
    return task_spec(t.name).shape(t, tr)


def estimate_memory(cfg: RunConfig, n_parallel: int | None = None) -> dict[str, int]:
    """Rough bytes a training run of ``cfg`` needs (float32): ``parameters`` (weights, masks,
    gradients, Adam moments, rollback copies) and ``state`` (the trajectories kept for the
    backward pass, or an evaluation's), for ``n_parallel`` networks trained together (default:
    one per seed). A lower estimate: it is meant to refuse sizes that cannot fit at all."""
    m, t, tr = cfg.model, cfg.task, cfg.train
    K = n_parallel or len(cfg.seeds)
    N, M = m.n_hidden, m.n_layers * m.n_hidden
    n_in, T, b_train, b_eval = _task_shape(t, tr)
    n_out = task_spec(t.name).n_outputs(t)
    params = N * n_in + 2 * M * M + M + n_out * N + n_out  # W_rec and its mask are M x M
    param_bytes = 4 * K * params * 6
    train_state = b_train * T * M * m.substeps * 3
    eval_state = b_eval * T * M * 2
    state_bytes = 4 * K * max(train_state, eval_state)
    return {"parameters": param_bytes, "state": state_bytes, "total": param_bytes + state_bytes}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"  # pragma: no cover


def check_memory(cfg: RunConfig, n_parallel: int | None = None, source: str | None = None) -> dict[str, int]:
    """Refuse up front, with the estimate, a size that cannot fit in this machine's memory
    (naming the key to lower), instead of failing to allocate terabytes mid-run."""
    est = estimate_memory(cfg, n_parallel)
    avail = available_memory()
    if avail is not None and est["total"] > avail:
        m = cfg.model
        K = n_parallel or len(cfg.seeds)
        key = "model.n_hidden" if est["parameters"] >= est["state"] else "train.batch_size"
        raise ConfigError(key, f"{m.n_layers} layer(s) x {m.n_hidden} neurons x {K} network(s) trained "
                          f"together need about {_size(est['total'])} of memory (parameters "
                          f"{_size(est['parameters'])}, trajectories {_size(est['state'])}); this "
                          f"machine has {_size(avail)} available; lower model.n_hidden, "
                          "model.n_layers, train.batch_size or the number of seeds", source)
    return est
