"""Lab configuration: which instrument plays which role, where it is, and its limits.

A lab configuration is a YAML file (read with ``yaml.safe_load``)::

    name: spin-diode bench 2
    visa_backend: ""                  # "" system VISA, "@py", "<file>@sim" (pyvisa-sim) or
                                      # "@virtual" (the virtual lab, see below)
    instruments:
      smb:
        driver: rs_smb100a            # a name from drivers.registry.DRIVERS
        address: GPIB0::28::INSTR
        timeout_ms: 3000              # optional
        visa_backend: "@py"           # optional, overrides the top-level one
        limits:                       # optional; may only tighten the driver's hard limits
          freq_hz: [1.0e9, 3.5e9]
          power_dbm: {max: 10}
        options: {}                   # driver options (e.g. stage: Z825B)
    roles:
      rf_source: smb
      voltmeter: nvm

The virtual lab (``sims.virtual_lab``): instruments whose ``visa_backend`` is ``@virtual``
(or ``virtual``) are simulated instruments of one shared world, named by a top-level
``virtual_lab: {world: <world file>, seed: <int>, overrides: {...}}`` (a relative world path
starts at the package root like ``@sim`` files; ``overrides`` are deep-merged into the world
file). Every virtual instrument of a ``Lab`` shares that one world and its clock: ``lab.world``
(its ``truth()`` is for tests and reports only), ``lab.clock`` and ``lab.sleep`` (lab time on
the virtual bench, wall time on a real one). The loader checks that the world has an instrument
of the configured driver at every virtual address.

``load_lab_config`` validates everything before any instrument is touched and stops at the
first problem with one ``ConfigError`` naming the file, the key and what is allowed: unknown
driver, missing role, bad address, a limit beyond what the instrument can do, wrong type, a
key given twice (an instrument name defined twice: YAML would keep the last silently) and
two instruments at one address (naming both). ``LabConfig.identity_hash()`` identifies the
resolved configuration (a sweep stores it; ``--resume`` compares it).

One program per bench: opening an instrument first takes an exclusive lock on its address
(``hil.locks``; a lock file per address, plus the VISA exclusive lock where the resource
supports it); a second program is refused with the holder's pid, command and start time
before anything is opened or sent.
A relative ``<file>@sim`` path is resolved against the installed package root (the folder
holding ``sims/``), so ``sims/visa/sim_lab.yaml@sim`` works from any working directory.

``open_lab(config)`` opens the instruments and returns a ``Lab`` giving drivers by role;
closing it (or leaving its ``with`` block, also on an exception) makes every instrument safe.
``record_to=`` appends every exchange to a JSON-lines file, ``replay=`` serves a recorded
session back to the same driver calls (see ``drivers.recording``).

``hil lab check CONFIG`` opens every instrument and prints role, model, identity, address
and status; the exit code is 1 if any instrument fails.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from drivers.base import (
    WALL_CLOCK,
    Clock,
    DriverError,
    Instrument,
    Limits,
    parse_limit_spec,
)
from drivers.recording import LOG_NAME, ExchangeLog, RecordingTransport, ReplaySession
from drivers.registry import DRIVERS
from drivers.stages import Stage
from hil.errors import ConfigError, HilError
from sims.schema import ConfigError as SchemaConfigError
from sims.schema import check_keys, yaml_number_hint


@dataclass(frozen=True)
class RoleSpec:
    kind: str
    doc: str
    unit: str | None = None  # stages: the unit the axis must work in


ROLES: Mapping[str, RoleSpec] = {
    "rf_source": RoleSpec("rf_source", "CW source feeding the sample (thesis 2.6)"),
    "voltmeter": RoleSpec("voltmeter", "nanovoltmeter on the bias-tee DC port (thesis 2.6.1)"),
    "dc_source": RoleSpec("dc_source", "DC bias source"),
    "vco_supply": RoleSpec("dc_source", "supply of the VCO/amplifier channels (thesis 4.5)"),
    "spectrum_analyzer": RoleSpec("spectrum_analyzer", "analyser calibrating the sources"),
    "switch": RoleSpec("switch", "4-way switch to the chains and the analyser (thesis 4.4)"),
    "source_switch": RoleSpec("switch", "switch choosing the RF source (thesis 4.4)"),
    "stage.x": RoleSpec("stage", "sample x", "mm"),
    "stage.y": RoleSpec("stage", "sample y", "mm"),
    "stage.z": RoleSpec("stage", "magnet array height (field gradient axis)", "mm"),
    "stage.rotation": RoleSpec("stage", "magnet array rotation", "deg"),
    "field_probe": RoleSpec("gaussmeter", "Hall probe on the sample holder: field gradient "
                            "and field zero (hil calibrate field)"),
}

DEFAULT_REQUIRED_ROLES: tuple[str, ...] = ("rf_source", "voltmeter")

_TOP_KEYS = ("name", "visa_backend", "instruments", "roles", "virtual_lab")
_VIRTUAL = "@virtual"
_VIRTUAL_KEYS = ("world", "seed", "overrides")
_INSTRUMENT_KEYS = ("driver", "address", "visa_backend", "timeout_ms", "limits", "options")
_ADDRESS_EXAMPLES = ("GPIB0::28::INSTR, TCPIP0::192.168.1.31::inst0::INSTR, "
                     "TCPIP0::192.168.1.50::23::SOCKET, USB0::0x0AAD::0x0054::102345::INSTR, "
                     "ASRL/dev/ttyUSB0::INSTR")


def package_root() -> Path:
    """The folder holding the installed ``sims`` package (relative sim paths start here)."""
    import sims

    return Path(sims.__file__).resolve().parent.parent


class LabError(HilError):
    """An instrument of the lab could not be opened, used or closed."""


@dataclass(frozen=True)
class InstrumentConfig:
    """One validated ``instruments:`` entry."""

    name: str
    driver: str
    address: str
    backend: str = ""
    timeout_ms: float | None = None
    limits: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def driver_class(self) -> type[Instrument]:
        return DRIVERS[self.driver]

    def effective_limits(self) -> Limits:
        """The driver's hard limits tightened by this entry."""
        cls = self.driver_class
        return cls.hard_limits(cls.validate_options(self.options)).tightened(self.limits)


@dataclass(frozen=True)
class VirtualLabSpec:
    """The validated ``virtual_lab`` entry: which world file, which seed, what overrides."""

    world: Path
    seed: int | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        """A fresh ``sims.virtual_lab.World`` (all virtual instruments of a lab share one)."""
        from sims.virtual_lab import World

        return World.from_file(self.world, seed=self.seed, overrides=self.overrides)


@dataclass(frozen=True)
class LabConfig:
    """A validated lab configuration."""

    source: str
    name: str
    instruments: Mapping[str, InstrumentConfig]
    roles: Mapping[str, str]
    virtual: VirtualLabSpec | None = None

    def identity_hash(self) -> str:
        """SHA-256 of the resolved configuration (instruments with drivers, addresses,
        backends, limits and options; roles; the virtual world, seed and overrides): two
        files that open the same bench the same way hash alike, whatever their layout."""
        import hashlib
        import json

        resolved = {
            "instruments": {n: {"driver": i.driver, "address": i.address, "backend": i.backend,
                                "timeout_ms": i.timeout_ms, "limits": dict(i.limits),
                                "options": dict(i.options)}
                            for n, i in sorted(self.instruments.items())},
            "roles": dict(sorted(self.roles.items())),
            "virtual": None if self.virtual is None else {
                "world": str(self.virtual.world), "seed": self.virtual.seed,
                "overrides": self.virtual.overrides},
        }
        text = json.dumps(resolved, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()

    def roles_of(self, instrument: str) -> list[str]:
        return [role for role, name in self.roles.items() if name == instrument]

    def instrument_for(self, role: str) -> InstrumentConfig:
        if role not in self.roles:
            raise ConfigError(f"roles.{role}", f"no instrument has this role; roles defined: "
                              f"{', '.join(self.roles) or 'none'}", source=self.source)
        return self.instruments[self.roles[role]]


# --------------------------------------------------------------------------- loading


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of the file names one key twice (plain YAML keeps the last silently)."""

    def __init__(self, path: str, key: Any, first_line: int, second_line: int) -> None:
        self.path, self.key = path, key
        self.first_line, self.second_line = first_line, second_line
        super().__init__(f"{path or 'top level'}: {key!r} is defined twice (lines "
                         f"{first_line} and {second_line})")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(getattr(node, "_hil_path", ""), key, seen[key], line)
            except TypeError:  # an unhashable key; SafeLoader reports it itself
                break
            seen[key] = line
            if isinstance(value_node, yaml.MappingNode):
                parent = getattr(node, "_hil_path", "")
                value_node._hil_path = f"{parent}.{key}" if parent else str(key)  # type: ignore[attr-defined]
        return super().construct_mapping(node, deep=deep)


def load_lab_config(path: str | Path, *,
                    required_roles: Iterable[str] = DEFAULT_REQUIRED_ROLES) -> LabConfig:
    """Read and validate a lab configuration file (nothing is opened)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("file", f"cannot read the lab configuration: {exc.strerror}",
                          source=source) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except DuplicateKeyError as exc:
        what = "instrument name" if exc.path == "instruments" else "key"
        raise ConfigError(f"{exc.path}.{exc.key}" if exc.path else str(exc.key),
                          f"{what} {exc.key!r} is defined twice (lines {exc.first_line} and "
                          f"{exc.second_line}); YAML would silently keep only the second",
                          source=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError("yaml", f"not valid YAML: {exc}", source=source) from None
    return parse_lab_config(data, source=source, required_roles=required_roles)


def _err(key: str, message: str, source: str) -> ConfigError:
    return ConfigError(key, message, source=source)


def _check_keys(given: Mapping[Any, Any], allowed: Iterable[str], prefix: str,
                source: str) -> None:
    """Refuse an unknown key, listing the allowed ones (``sims.schema.check_keys``)."""
    try:
        check_keys(given, allowed, prefix, source)
    except SchemaConfigError as exc:
        raise _err(exc.key, exc.message, source) from None


def _resolve_backend(value: Any, key: str, source: str) -> str:
    allowed = "'' (system VISA), '@py', '@ivi', '@sim', '<file>.yaml@sim' or '@virtual'"
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise _err(key, f"must be a string, got {type(value).__name__} {value!r}; "
                   f"allowed: {allowed}", source)
    if value in ("@py", "@ivi", "@sim"):
        return value
    if value in (_VIRTUAL, "virtual"):
        return _VIRTUAL
    if value.endswith("@sim"):
        file = Path(value[: -len("@sim")])
        if not file.is_absolute():
            file = package_root() / file
        if not file.is_file():
            raise _err(key, f"pyvisa-sim file {file} does not exist (relative paths start at "
                       f"{package_root()})", source)
        return f"{file}@sim"
    raise _err(key, f"unknown VISA backend {value!r}; allowed: {allowed}", source)


def _check_address(address: Any, cls: type[Instrument], key: str, source: str) -> str:
    from pyvisa import rname

    if not isinstance(address, str):
        raise _err(key, f"must be a VISA resource string such as {_ADDRESS_EXAMPLES}; "
                   f"got {type(address).__name__} {address!r}", source)
    try:
        parsed = rname.parse_resource_name(address)
    except rname.InvalidResourceName as exc:
        raise _err(key, f"{address!r} is not a VISA resource name ({exc}); examples: "
                   f"{_ADDRESS_EXAMPLES}", source) from None
    interface = str(parsed.interface_type).upper()
    if interface not in cls.INTERFACES:
        raise _err(key, f"{address!r} is a {interface} address but the {cls.MODEL} is reached "
                   f"through {', '.join(cls.INTERFACES)} only", source)
    if interface == "GPIB":
        primary = getattr(parsed, "primary_address", "")
        if not (str(primary).isdigit() and 0 <= int(primary) <= 30):
            raise _err(key, f"GPIB primary address must be 0-30, got {primary!r} in "
                       f"{address!r}", source)
    return address


def _address_key(inst: InstrumentConfig) -> tuple[str, str]:
    """(backend, canonical address): ``GPIB::28`` and ``gpib0::28::INSTR`` are one place."""
    from pyvisa import rname

    try:
        address = str(rname.parse_resource_name(inst.address.upper()))
    except rname.InvalidResourceName:
        address = inst.address.upper()
    return inst.backend, address


def _check_one_instrument_per_address(instruments: Mapping[str, InstrumentConfig],
                                      source: str) -> None:
    """Two instruments at one address would mean two drivers sending to one instrument."""
    seen: dict[tuple[str, str], InstrumentConfig] = {}
    for inst in instruments.values():
        key = _address_key(inst)
        other = seen.get(key)
        if other is not None:
            raise _err(f"instruments.{inst.name}.address", f"{inst.address} is also the address "
                       f"of instrument {other.name!r} ({other.driver}); instruments "
                       f"{other.name!r} and {inst.name!r} cannot share one address", source)
        seen[key] = inst


def _parse_instrument(name: Any, entry: Any, top_backend: str, source: str) -> InstrumentConfig:
    base = f"instruments.{name}"
    if not isinstance(name, str) or not name:
        raise _err(base, "instrument names must be non-empty strings", source)
    if not isinstance(entry, Mapping):
        raise _err(base, f"must be a mapping with keys {', '.join(_INSTRUMENT_KEYS)}; got "
                   f"{type(entry).__name__}", source)
    _check_keys(entry, _INSTRUMENT_KEYS, base, source)
    for required in ("driver", "address"):
        if required not in entry:
            raise _err(f"{base}.{required}", "missing (required)", source)

    driver = entry["driver"]
    if not isinstance(driver, str) or driver not in DRIVERS:
        raise _err(f"{base}.driver", f"unknown driver {driver!r}; allowed: "
                   f"{', '.join(DRIVERS)}", source)
    cls = DRIVERS[driver]
    address = _check_address(entry["address"], cls, f"{base}.address", source)
    backend = (_resolve_backend(entry["visa_backend"], f"{base}.visa_backend", source)
               if "visa_backend" in entry else top_backend)

    timeout = entry.get("timeout_ms")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or not math.isfinite(timeout) or timeout <= 0):
        raise _err(f"{base}.timeout_ms", f"must be a positive number of milliseconds, got "
                   f"{timeout!r}", source)

    options = entry.get("options") or {}
    if not isinstance(options, Mapping):
        raise _err(f"{base}.options", f"must be a mapping; allowed options: "
                   f"{', '.join(cls.OPTIONS) or 'none'}", source)
    for opt, value in options.items():
        if opt not in cls.OPTIONS:
            raise _err(f"{base}.options.{opt}", f"unknown option for {driver}; allowed: "
                       f"{', '.join(cls.OPTIONS) or 'none'}", source)
        try:
            cls.OPTIONS[opt].validate(opt, value)
        except DriverError as exc:
            raise _err(f"{base}.options.{opt}", str(exc), source) from None

    limits_in = entry.get("limits") or {}
    if not isinstance(limits_in, Mapping):
        raise _err(f"{base}.limits", "must be a mapping of limit name to [min, max]", source)
    hard = cls.hard_limits(cls.validate_options(options))
    limits: dict[str, tuple[float | None, float | None]] = {}
    for limit, spec in limits_in.items():
        key = f"{base}.limits.{limit}"
        if limit not in hard:
            allowed = ", ".join(f"{k} {v}" for k, v in hard.items())
            raise _err(key, f"unknown limit for {driver}; allowed: {allowed}", source)
        try:
            lo, hi = parse_limit_spec(spec, limit)
            hard.tightened({limit: (lo, hi)})
        except DriverError as exc:
            raise _err(key, f"{exc} ({cls.MODEL}){yaml_number_hint(spec)}", source) from None
        limits[limit] = (lo, hi)
    return InstrumentConfig(name, driver, address, backend,
                            float(timeout) if timeout is not None else None, limits,
                            dict(options))


def parse_lab_config(data: Any, *, source: str = "<lab config>",
                     required_roles: Iterable[str] = DEFAULT_REQUIRED_ROLES) -> LabConfig:
    """Validate already-parsed YAML ``data``; ``source`` names the file in errors."""
    if not isinstance(data, Mapping):
        raise _err("(top level)", f"must be a mapping with keys {', '.join(_TOP_KEYS)}; got "
                   f"{type(data).__name__}", source)
    _check_keys(data, _TOP_KEYS, "", source)
    name = data.get("name", "")
    if not isinstance(name, str):
        raise _err("name", f"must be a string, got {name!r}", source)
    backend = _resolve_backend(data.get("visa_backend"), "visa_backend", source)

    raw_instruments = data.get("instruments")
    if not isinstance(raw_instruments, Mapping) or not raw_instruments:
        raise _err("instruments", "must be a non-empty mapping of instrument name to "
                   "{driver, address, ...}", source)
    instruments = {name_: _parse_instrument(name_, entry, backend, source)
                   for name_, entry in raw_instruments.items()}
    _check_one_instrument_per_address(instruments, source)

    raw_roles = data.get("roles") or {}
    if not isinstance(raw_roles, Mapping):
        raise _err("roles", f"must be a mapping of role to instrument name; roles: "
                   f"{', '.join(ROLES)}", source)
    roles: dict[str, str] = {}
    for role, instrument in raw_roles.items():
        key = f"roles.{role}"
        if role not in ROLES:
            raise _err(key, f"unknown role; allowed: {', '.join(ROLES)}", source)
        if not isinstance(instrument, str) or instrument not in instruments:
            raise _err(key, f"names instrument {instrument!r}, which is not defined; defined: "
                       f"{', '.join(instruments)}", source)
        spec, inst = ROLES[role], instruments[instrument]
        cls = inst.driver_class
        if cls.KIND != spec.kind:
            raise _err(key, f"instrument {instrument!r} ({inst.driver}) is a {cls.KIND}; this "
                       f"role needs a {spec.kind}", source)
        if spec.unit is not None and issubclass(cls, Stage):
            unit = cls.stage_model(cls.validate_options(inst.options)).unit
            if unit != spec.unit:
                raise _err(key, f"instrument {instrument!r} works in {unit}; this role needs "
                           f"an axis in {spec.unit}", source)
        roles[role] = instrument
    for role in required_roles:
        if role not in roles:
            raise _err(f"roles.{role}", f"missing; required roles: "
                       f"{', '.join(required_roles)}; defined instruments: "
                       f"{', '.join(instruments)}", source)
    virtual = _parse_virtual(data.get("virtual_lab"), instruments, source)
    return LabConfig(source, name, instruments, roles, virtual)


def _parse_virtual(entry: Any, instruments: Mapping[str, InstrumentConfig],
                   source: str) -> VirtualLabSpec | None:
    """Validate ``virtual_lab`` against the instruments that use the ``@virtual`` backend."""
    users = [inst for inst in instruments.values() if inst.backend == _VIRTUAL]
    if entry is None:
        if users:
            raise _err("virtual_lab", f"missing: instrument {users[0].name!r} uses the "
                       "@virtual backend, which needs {world: <world file>, seed: <int>}", source)
        return None
    if not isinstance(entry, Mapping) or "world" not in entry:
        raise _err("virtual_lab", f"must be a mapping with keys {', '.join(_VIRTUAL_KEYS)} "
                   "(world required)", source)
    _check_keys(entry, _VIRTUAL_KEYS, "virtual_lab", source)
    world = entry["world"]
    if not isinstance(world, str) or not world:
        raise _err("virtual_lab.world", f"must be a world file name, got {world!r}", source)
    path = Path(world) if Path(world).is_absolute() else package_root() / world
    if not path.is_file():
        raise _err("virtual_lab.world", f"world file {path} does not exist (relative paths "
                   f"start at {package_root()})", source)
    seed = entry.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise _err("virtual_lab.seed", f"must be an integer >= 0, got {seed!r}", source)
    overrides = entry.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise _err("virtual_lab.overrides", "must be a mapping merged into the world file",
                   source)
    from sims.virtual_lab import WorldConfigError, load_world_config
    from sims.virtual_lab.config import canonical_address

    try:
        world_cfg = load_world_config(path, overrides=overrides, seed=seed)
    except WorldConfigError as exc:
        raise _err("virtual_lab.world", str(exc), source) from None
    by_address = {spec["address"]: (name, spec) for name, spec in
                  world_cfg["instruments"].items()}
    for inst in users:
        key = f"instruments.{inst.name}.address"
        found = by_address.get(canonical_address(inst.address))
        if found is None:
            raise _err(key, f"the virtual world {path.name} has no instrument at "
                       f"{inst.address}; its addresses: {', '.join(by_address)}", source)
        world_name, spec = found
        if spec["model"] != inst.driver:
            raise _err(key, f"the virtual world has a {spec['model']} ({world_name!r}) at "
                       f"{inst.address}, not a {inst.driver}", source)
        stage = inst.options.get("stage")
        if stage is not None and "stage" in spec and spec["stage"] != stage:
            raise _err(f"instruments.{inst.name}.options.stage", f"the virtual world's "
                       f"{world_name!r} carries a {spec['stage']}, not a {stage}", source)
    return VirtualLabSpec(path, seed, dict(overrides))


# --------------------------------------------------------------------------- opening


class Lab:
    """Open drivers by role; closing makes every instrument safe (reverse opening order).

    ``world``: the virtual world the ``@virtual`` instruments live in; by default one is
    built from ``config.virtual`` when the first of them is opened, and shared by all.
    Every driver is opened with the clock of where it lives (``Instrument.clock``): the
    world's virtual clock for a ``@virtual`` instrument, the wall clock (``WALL_CLOCK``)
    otherwise, so its waits and timeouts run in that lab time.
    """

    def __init__(self, config: LabConfig, *, log: ExchangeLog | None = None,
                 replay: ReplaySession | None = None, world: Any = None) -> None:
        self.config = config
        self.log = log
        self.replay = replay
        self.instruments: dict[str, Instrument] = {}
        self._world = world
        self._visa_library: Any = None
        self._locks: dict[str, Any] = {}

    @property
    def world(self) -> Any:
        """The shared ``sims.virtual_lab.World`` (None for a lab without virtual instruments)."""
        if self._world is None and self.config.virtual is not None:
            self._world = self.config.virtual.build()
        return self._world

    @property
    def clock(self) -> Clock:
        """``now_s()`` and ``sleep(s)`` in lab time: the virtual clock, or the wall clock."""
        return self.world.clock if self.world is not None else WALL_CLOCK

    def clock_for(self, inst: InstrumentConfig) -> Clock:
        """The clock instrument ``inst`` waits on: its world's for a virtual one, else the wall
        clock."""
        return self.world.clock if inst.backend == _VIRTUAL else WALL_CLOCK

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of lab time (pass as ``sleep=`` to procedures that wait)."""
        self.clock.sleep(seconds)

    def _backend(self, inst: InstrumentConfig) -> Any:
        if inst.backend.endswith("@sim") and inst.backend != "@sim":
            from sims.visa import visa_library

            return visa_library(inst.backend)  # -222 for values out of range, -113 unknown
        if inst.backend != _VIRTUAL:
            return inst.backend
        if self._visa_library is None:
            from sims.virtual_lab import VirtualVisaLibrary

            self._visa_library = VirtualVisaLibrary.for_world(self.world)
        return self._visa_library

    def open_instrument(self, name: str) -> Instrument:
        """Open (if not yet open) the instrument called ``name`` in the configuration."""
        if name in self.instruments:
            return self.instruments[name]
        inst = self.config.instruments[name]
        cls = inst.driver_class
        what = f"instrument {name!r} ({inst.driver} at {inst.address})"
        self._lock(inst, what)
        try:
            if self.replay is not None:
                transport = self.replay.transport(name, inst.address)
                if inst.timeout_ms:
                    transport.timeout_ms = inst.timeout_ms
            else:
                transport = cls.open_transport(inst.address, self._backend(inst),
                                               inst.timeout_ms)
        except (ConnectionError, DriverError) as exc:
            self._unlock(name)
            raise LabError(f"cannot open {what}: {exc}") from exc
        if self.log is not None:
            transport = RecordingTransport(transport, self.log, name)
        try:
            driver = cls(transport, name=name, limits=inst.limits, options=inst.options,
                         clock=self.clock_for(inst))
        except DriverError as exc:
            self._unlock(name)
            raise LabError(f"cannot use {what}: {exc}") from exc
        except BaseException:
            self._unlock(name)
            raise
        self.instruments[name] = driver
        return driver

    def _lock(self, inst: InstrumentConfig, what: str) -> None:
        """One program per bench: lock the address before anything is opened or sent.

        Not for a replay or a virtual instrument (each program has its own world); a
        pyvisa-sim instrument is locked per simulation file, like the bench it stands for.
        """
        if self.replay is not None or inst.backend == _VIRTUAL:
            return
        from hil.locks import BenchLock, address_lock_path

        backend, address = _address_key(inst)
        key = f"{backend.removesuffix('@sim')}::{address}" if backend.endswith("@sim") else address
        lock = BenchLock(address_lock_path(key), what)
        try:
            lock.acquire()
        except HilError as exc:
            raise LabError(str(exc)) from None
        self._locks[inst.name] = lock

    def _unlock(self, name: str) -> None:
        lock = self._locks.pop(name, None)
        if lock is not None:
            lock.release()

    def __getitem__(self, role: str) -> Any:
        if role not in self.config.roles:
            raise LabError(f"{self.config.source}: no instrument has role {role!r}; roles: "
                           f"{', '.join(self.config.roles) or 'none'}")
        name = self.config.roles[role]
        if name not in self.instruments:
            raise LabError(f"instrument {name!r} (role {role}) was not opened")
        return self.instruments[name]

    def __contains__(self, role: str) -> bool:
        return self.config.roles.get(role) in self.instruments

    def identities(self) -> dict[str, dict[str, Any]]:
        """Per instrument: driver, model, identity string, address and roles (for run folders)."""
        return {name: {"driver": self.config.instruments[name].driver, "model": drv.MODEL,
                       "identity": drv.identity,
                       "address": self.config.instruments[name].address,
                       "roles": self.config.roles_of(name)}
                for name, drv in self.instruments.items()}

    def close(self) -> None:
        """Make every instrument safe and release it; all are tried, failures reported after."""
        failures = []
        for name, driver in reversed(list(self.instruments.items())):
            try:
                driver.close()
            except Exception as exc:  # keep closing the others
                failures.append(f"{name}: {exc}")
            finally:
                self._unlock(name)
        self.instruments.clear()
        for name in list(self._locks):
            self._unlock(name)
        if self.log is not None:
            self.log.close()
        if failures:
            raise LabError("closing the lab: " + "; ".join(failures))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except LabError as close_exc:
            exc.add_note(str(close_exc))


def open_lab(config: LabConfig | str | Path, *, record_to: str | Path | None = None,
             replay: str | Path | ReplaySession | None = None,
             roles: Iterable[str] | None = None, world: Any = None,
             instruments: Iterable[str] | None = None) -> Lab:
    """Open the instruments of ``config`` (all, or those of ``roles`` and/or those named in
    ``instruments``) and return the ``Lab``.

    ``record_to``: a run folder (the log is ``instrument_io.jsonl`` in it) or a ``.jsonl``
    file; every exchange is appended. ``replay``: a recorded log (or ``ReplaySession``)
    answering instead of the instruments. ``world``: a ``sims.virtual_lab.World`` for the
    ``@virtual`` instruments instead of the one ``config.virtual`` describes.
    """
    cfg = config if isinstance(config, LabConfig) else load_lab_config(config)
    if roles is None and instruments is None:
        names = list(cfg.instruments)
    else:
        names = [cfg.instrument_for(role).name for role in roles or ()]
        for name in instruments or ():
            if name not in cfg.instruments:
                raise ConfigError("instruments", f"no instrument named {name!r}; instruments: "
                                  f"{', '.join(cfg.instruments) or 'none'}", source=cfg.source)
            names.append(name)
        names = list(dict.fromkeys(names))
    log = None
    if record_to is not None:
        path = Path(record_to)
        log = ExchangeLog(path if path.suffix == ".jsonl" else path / LOG_NAME)
    session = ReplaySession(replay) if isinstance(replay, str | Path) else replay
    lab = Lab(cfg, log=log, replay=session, world=world)
    try:
        for name in names:
            lab.open_instrument(name)
    except BaseException as exc:
        try:
            lab.close()
        except LabError as close_exc:
            exc.add_note(str(close_exc))
        raise
    return lab


# --------------------------------------------------------------------------- hil lab check


@dataclass(frozen=True)
class CheckResult:
    instrument: str
    roles: tuple[str, ...]
    model: str
    address: str
    identity: str
    status: str
    ok: bool


def check_lab(config: LabConfig) -> list[CheckResult]:
    """Open, query and close every instrument, one at a time; failures do not stop the rest.

    The virtual instruments are checked in one shared world, as ``open_lab`` would open them.
    """
    results = []
    world = config.virtual.build() if config.virtual is not None else None
    for name, inst in config.instruments.items():
        lab = Lab(config, world=world)
        identity, ok = "", False
        try:
            driver = lab.open_instrument(name)
            identity = driver.identity
            status = driver.status()
            lab.close()
            ok = True
        except Exception as exc:  # report every kind of failure, keep checking the others
            kind = "" if isinstance(exc, LabError | DriverError) else f"{type(exc).__name__}: "
            status = f"FAILED: {kind}{exc}"
            try:
                lab.close()
            except LabError as close_exc:
                status += f"; {close_exc}"
        results.append(CheckResult(name, tuple(config.roles_of(name)),
                                   inst.driver_class.MODEL, inst.address, identity, status, ok))
    return results


#: three reference devices (two same-sign diodes in parallel, thesis Fig. 3.7c) on switch
#: ports 1-3: the virtual lab's reference sample (``--reference-sample``)
REFERENCE_SAMPLE: dict[str, Any] = {
    "sample": {"devices": {"__replace__": True, **{
        f"ref{i}": {"origin_um": [-450 + 450 * i, 0],
                    "diodes": [{"v_um": 0, "u_um": -8}, {"v_um": 0, "u_um": 8}],
                    "blocks": [[0, 1]]} for i in range(3)}}},
    "rf": {"output_switch": {"switch": "sp4t",
                             "ports": {1: "ref0", 2: "ref1", 3: "ref2", 4: "fsv"}}},
}


def load_reference_map(map_csv: str | Path) -> Any:
    """The reference map of ``map_csv`` (and its sidecar); a missing, corrupt or foreign file
    is one :class:`HilError` naming it, not a traceback."""
    from calibration.reference import ReferenceMap, sidecar_path

    try:
        return ReferenceMap.load(map_csv)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HilError(f"{map_csv}: not a readable reference map (with its sidecar "
                       f"{sidecar_path(Path(map_csv)).name}): {first[:200]}") from None
