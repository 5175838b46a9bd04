"""World files: loading, inheritance, overrides, defaults and validation.

A world file (YAML, ``yaml.safe_load``) describes one simulated bench: the material and the
magnet array, the fabrication spreads, the drift, the sample's devices, the instruments (by
VISA address) and how they are wired. ``base: other.yaml`` inherits another world file (a
relative path starts at the file's folder) and deep-merges this one over it (mappings merge,
everything else replaces; a mapping holding ``__replace__: true`` replaces instead of merging,
e.g. to give a derived world its own ``sample.devices``). ``load_world_config(path,
overrides=...)`` merges a mapping of overrides last, which is how a lab configuration or a
test adjusts a world.

Every section is completed from ``DEFAULTS`` / ``INSTRUMENT_DEFAULTS``; unknown keys are
refused with a ``WorldConfigError`` naming the file and the key, so a typo cannot silently
fall back to a default. The defaults are the documented physics choices (see
``sims.spindiode`` and the world files' comments).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sims.schema import ConfigError, complete_mapping
from sims.schema import deep_merge as schema_deep_merge

#: Sections with fixed keys, and their defaults.
DEFAULTS: dict[str, dict[str, Any]] = {
    # sims.spindiode.SpinDiodeMaterial
    "material": {"meff_oe": 9680.0, "gamma_hz_per_oe": 2.9e6, "alpha": 0.01,
                 "extrinsic_linewidth_hz": 0.0, "sensitivity_v_per_w": 2.5e-2,
                 "phase_deg": 6.0, "power_shift_hz_per_w": -1.0e8},
    # sims.spindiode.MagnetArray
    "magnets": {"gradient_oe_per_mm": 140.0, "center_field_oe": 0.0, "saturation_oe": 2000.0,
                "curvature_oe_per_mm2": 1.0, "residual_x_oe": 2.0, "residual_y_oe": 3.0,
                "cross_yz_oe_per_mm": 0.5},
    # 1-sigma spreads of what fabrication and gluing draw (thesis 3.4.4, 3.6, 4.7); width,
    # contact, position, M_eff, phase: *_pair_sigma* shared by a synapse's two diodes, *_sigma*
    # each diode's own (sims.virtual_lab.sample)
    "fabrication": {"sheet_resistance_ohm_sq": 45.0, "diode_length_um": 10.0,
                    "diode_width_um": 5.0, "width_sigma_um": 0.05, "width_pair_sigma_um": 0.25,
                    "contact_ohm": 12.0, "contact_sigma_ohm": 0.7,
                    "contact_pair_sigma_ohm": 4.0, "position_sigma_um": 0.25,
                    "position_pair_sigma_um": 2.0,
                    "meff_sigma_frac": 0.0003, "meff_pair_sigma_frac": 0.003,
                    "phase_sigma_deg": 0.2, "phase_pair_sigma_deg": 1.0, "wire_bond_nh": 3.0,
                    "wire_bond_sigma_frac": 0.25, "pad_capacitance_pf": 0.3,
                    "pad_capacitance_sigma_frac": 0.1,
                    "placement_sigma_mm": {"x": 0.05, "y": 1.0, "z": 1.0},
                    "placement_rotation_sigma_deg": 1.0},
    # slow changes over lab time (thesis 4.7)
    "drift": {"step_s": 600.0, "hold_s": 1.0, "position_um_per_sqrt_h": 2.0,
              "contact_frac_per_sqrt_h": 0.01,
              "move_kick_um": 0.05, "move_kick_frac": 0.0002},
    # the RF line from the output switch to every device (thesis 2.6.1, 3.5.1)
    "holder": {"attenuator_db": 3.0, "loss_db_at_1ghz": 0.8, "ripple_db": 0.1,
               "ripple_period_hz": 4.0e8},
    "sample": {"placement_mm": {"x": 0.0, "y": 0.0, "z": 0.0}, "rotation_deg": 0.0,
               "devices": {}},
    # which stage sets which coordinate of the sample relative to the magnet centre
    "pose": {},
    "rf": {},
    "vco_source": {},
}

TOP_KEYS = ("name", "frame", "seed", "base", "instruments", *DEFAULTS)

POSE_AXES = ("x", "y", "z", "rotation")
POSE_DEFAULTS = {"stage": None, "reference": 0.0, "direction": 1.0}

DEVICE_DEFAULTS: dict[str, Any] = {
    "origin_um": [0.0, 0.0], "pair_spacing_um": 40.0, "synapses": None, "diodes": None,
    "blocks": None, "voltmeter": None, "voltmeter_channel": 1, "current_line": None,
}
#: a ~40 um wide line over the diode: H = I / (2 w) ~ 0.15 Oe/mA (thesis 2.7.2 used +-40 mA)
CURRENT_LINE_DEFAULTS = {"source": None, "resistance_ohm": 15.0, "field_oe_per_ma": 0.15}

VCO_DEFAULTS: dict[str, Any] = {
    "name": "vco", "tuning": None, "amplifier": None, "combiner_loss_db": 10.0,
    "final_amplifier_gain_db": 10.0, "compression_mw": 100.0, "compression_smoothness": 6.0,
    # tuning-port lag (amplifier: half); calibrated to thesis 4.7's ~1 h per image for
    # Algorithm 3 (worlds/thesis_bench.yaml, tests/test_lab_timing.py)
    "settle_tau_s": 0.06,
    "power_noise_frac": 0.0008, "freq_noise_frac": 1.0e-5, "noise_knee_frac": 0.1,
    "threshold_v": 1.7,
    "saturation_v": 5.0, "jump_mw": 3.0, "unit_sigma_frac": 0.02, "amplifier_load_ohm": 40.0,
    "tuning_load_ohm": 1.0e5, "tuning_max_v": 20.0, "channels": [],
}
VCO_CHANNEL_DEFAULTS: dict[str, Any] = {
    "part": "CRBV55BE", "freq_range_hz": [1.53e9, 2.9e9], "tuning_curvature_v": 30.0,
    "attenuator_db": 0.0, "p_max_mw": 10.0,
}

#: Per instrument model: the settings a world may give, with their defaults.
INSTRUMENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "rs_smb100a": {"serial": "180123", "freq_range_hz": [9e3, 6e9],
                   "power_range_dbm": [-145.0, 18.0], "level_error_sigma_db": 0.15,
                   "level_noise_db": 0.01, "settle_freq_s": 0.003, "settle_level_s": 0.004,
                   "settle_output_s": 0.01, "io_s": None},
    "keysight_n5183b": {"serial": "MY53050123", "freq_range_hz": [9e3, 20e9],
                        "power_range_dbm": [-130.0, 25.0], "level_error_sigma_db": 0.2,
                        "level_noise_db": 0.01, "settle_freq_s": 0.002,
                        "settle_level_s": 0.003, "settle_output_s": 0.01, "io_s": None},
    "keithley_2182a": {"serial": "4075123", "noise_v": 20e-9, "noise_ref_nplc": 5.0,
                       "line_freq_hz": 50.0, "offset_sigma_v": 150e-9,
                       "offset_drift_v": 30e-9, "offset_tau_s": 600.0,
                       "autozero_factor": 2.0, "overhead_s": 0.002, "io_s": None},
    "keithley_2400": {"serial": "1234567", "voltage_range_v": [-210.0, 210.0],
                      "nplc": 1.0, "line_freq_hz": 50.0, "noise_a": 1e-9, "io_s": None},
    "keithley_2401": {"serial": "4321765", "voltage_range_v": [-21.0, 21.0],
                      "nplc": 1.0, "line_freq_hz": 50.0, "noise_a": 1e-9, "io_s": None},
    "rs_hmp4040": {"serial": "101234", "power_on_current_a": 0.5, "meas_noise_v": 0.0005,
                   "io_s": None},
    "rs_fsv": {"serial": "101873", "freq_range_hz": [10.0, 7e9], "danl_dbm_hz": -147.0,
               "level_error_sigma_db": 0.2, "level_noise_db": 0.03, "points": 691,
               "io_s": None},
    "minicircuits_rc_1sp4t": {"serial": "11901010123", "insertion_loss_db": 0.35,
                              "slope_db_per_ghz": 0.12, "loss_sigma_db": 0.05,
                              "ripple_db": 0.05, "ripple_period_hz": 7e8,
                              "isolation_db": 50.0, "switching_s": 0.025, "io_s": None},
    "newport_smc100": {"stage": "LTA-HS", "controller_address": 1, "acceleration": None,
                       "backlash": 0.002, "power_on": None, "referenced": False,
                       "io_s": None},
    "thorlabs_kdc101": {"stage": "Z825B", "serial": 27000123, "acceleration": None,
                        "backlash": 0.003, "power_on": None, "homed": False, "io_s": None},
    # sims.virtual_lab.chip: the simulated oscillator-array chip behind a SCPI controller;
    # device: DeviceConfig settings (structure, mismatch, ...); seed: None = the world's seed
    "hil_oscillator_chip": {"serial": "OSC-0001", "device": {}, "seed": None,
                            "max_block_bytes": 64_000_000, "io_s": None},
    # sims.virtual_lab.probes: the Lake Shore 425 gaussmeter's Hall probe on the sample
    # holder, ``mount_mm`` from the chip origin's design placement (moves with stages x, y, z)
    "lakeshore_425": {"serial": "4250123", "probe_type": 40, "mount_mm": [0.0, 0.0, 0.0],
                      "axis": "z", "mount_sigma_mm": 0.05, "gain_sigma_frac": 0.001,
                      "offset_sigma_g": 0.3, "noise_g": 0.05, "filter_noise_factor": 0.3,
                      "update_s": 0.1, "io_s": None},
}


class WorldConfigError(ConfigError):
    """A world file is unreadable or has a missing, unknown or ill-typed key (the project's one
    configuration error type, :class:`sims.schema.ConfigError`; note the argument order)."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(key, message, source)


REPLACE = "__replace__"


def deep_merge(base: Any, over: Any) -> Any:
    """``over`` merged into a copy of ``base``: mappings merge key by key, the rest replaces
    (and so does a mapping marked ``__replace__: true``)."""
    return schema_deep_merge(base, over, REPLACE)


def _read(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    source = str(path)
    if path in seen:
        raise WorldConfigError(source, "base", "inherits itself")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorldConfigError(source, "file", f"cannot read the world file: {exc}") from None
    except yaml.YAMLError as exc:
        raise WorldConfigError(source, "yaml", f"not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise WorldConfigError(source, "(top level)", "must be a mapping")
    data = dict(data)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise WorldConfigError(source, "base", f"must be a file name, got {base!r}")
    base_path = (path.parent / base).resolve()
    return deep_merge(_read(base_path, (*seen, path)), data)


def _section(source: str, key: str, given: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` checked against ``defaults`` (unknown keys refused, numbers where the default
    is a float) and deep-merged over them."""
    try:
        return complete_mapping(given, defaults, key, source, merge=deep_merge)
    except WorldConfigError:
        raise
    except ConfigError as exc:
        raise WorldConfigError(source, exc.key, exc.message) from None


def load_world_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None,
                      seed: int | None = None) -> dict[str, Any]:
    """Read ``path`` (following ``base:``), merge ``overrides`` and complete the defaults."""
    path = Path(path).resolve()
    data = _read(path, ())
    if overrides:
        data = deep_merge(data, dict(overrides))
    return complete_world_config(data, source=str(path), seed=seed)


def complete_world_config(data: Mapping[str, Any], *, source: str = "<world>",
                          seed: int | None = None) -> dict[str, Any]:
    """Validate an already-read world mapping and fill in every default."""
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise WorldConfigError(source, str(unknown[0]), f"unknown key; allowed: "
                               f"{', '.join(TOP_KEYS)}")
    cfg: dict[str, Any] = {"name": str(data.get("name", "virtual lab")),
                           "frame": str(data.get("frame", "")), "source": source}
    chosen = data.get("seed", 0) if seed is None else seed
    if isinstance(chosen, bool) or not isinstance(chosen, int) or chosen < 0:
        raise WorldConfigError(source, "seed", f"must be an integer >= 0, got {chosen!r}")
    cfg["seed"] = chosen
    for key in ("material", "magnets", "fabrication", "drift", "holder"):
        cfg[key] = _section(source, key, data.get(key), DEFAULTS[key])
    sample = _section(source, "sample", data.get("sample"), DEFAULTS["sample"])
    devices = sample["devices"] or {}
    if not isinstance(devices, Mapping):
        raise WorldConfigError(source, "sample.devices", "must be a mapping of device name "
                               "to its description")
    sample["devices"] = {name: _device(source, name, dev) for name, dev in devices.items()}
    cfg["sample"] = sample

    instruments = data.get("instruments") or {}
    if not isinstance(instruments, Mapping):
        raise WorldConfigError(source, "instruments", "must be a mapping of name to "
                               "{address, model, ...}")
    cfg["instruments"] = {name: _instrument(source, name, spec)
                          for name, spec in instruments.items()}

    pose = data.get("pose") or {}
    if not isinstance(pose, Mapping):
        raise WorldConfigError(source, "pose", "must be a mapping of axis to {stage, ...}")
    bad = [k for k in pose if k not in POSE_AXES]
    if bad:
        raise WorldConfigError(source, f"pose.{bad[0]}", f"unknown axis; allowed: "
                               f"{', '.join(POSE_AXES)}")
    cfg["pose"] = {axis: _section(source, f"pose.{axis}", pose.get(axis), POSE_DEFAULTS)
                   for axis in POSE_AXES}
    for axis, spec in cfg["pose"].items():
        stage = spec["stage"]
        if stage is not None and stage not in cfg["instruments"]:
            raise WorldConfigError(source, f"pose.{axis}.stage",
                                   f"names {stage!r}, which is not an instrument")

    vco = data.get("vco_source")
    cfg["vco_source"] = None if not vco else _vco(source, vco, cfg["instruments"])
    cfg["rf"] = _rf(source, data.get("rf") or {}, cfg)
    for name, dev in cfg["sample"]["devices"].items():
        meter = dev["voltmeter"]
        if meter is None:
            meters = [n for n, i in cfg["instruments"].items() if i["model"] == "keithley_2182a"]
            dev["voltmeter"] = meters[0] if meters else None
        elif meter not in cfg["instruments"]:
            raise WorldConfigError(source, f"sample.devices.{name}.voltmeter",
                                   f"names {meter!r}, which is not an instrument")
        line = dev["current_line"]
        if line is not None and line["source"] not in cfg["instruments"]:
            raise WorldConfigError(source, f"sample.devices.{name}.current_line.source",
                                   f"names {line['source']!r}, which is not an instrument")
    return cfg


def _device(source: str, name: str, given: Any) -> dict[str, Any]:
    key = f"sample.devices.{name}"
    dev = _section(source, key, given, DEVICE_DEFAULTS)
    has_syn, has_diodes = dev["synapses"] is not None, dev["diodes"] is not None
    if has_syn == has_diodes:
        raise WorldConfigError(source, key, "give either synapses (double-diode synapses, "
                               "thesis 2.7.3) or diodes (single diodes), not both or neither")
    items = dev["synapses"] if has_syn else dev["diodes"]
    if not isinstance(items, list) or not items:
        raise WorldConfigError(source, f"{key}.{'synapses' if has_syn else 'diodes'}",
                               "must be a non-empty list")
    allowed = {"v_um", "u_um", "dz_um"} if has_syn else {"v_um", "u_um", "sign"}
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or not set(item) <= allowed or "v_um" not in item:
            raise WorldConfigError(source, f"{key}[{i}]", f"must be a mapping with v_um and "
                                   f"optionally {', '.join(sorted(allowed - {'v_um'}))}")
        if not has_syn and item.get("sign", 1) not in (1, -1):
            raise WorldConfigError(source, f"{key}.diodes[{i}].sign", "must be +1 or -1")
    blocks = dev["blocks"]
    if blocks is None:
        blocks = [[i] for i in range(len(items))]
    flat = sorted(i for block in blocks for i in block) if isinstance(blocks, list) and all(
        isinstance(b, list) for b in blocks) else None
    if flat != list(range(len(items))):
        raise WorldConfigError(source, f"{key}.blocks", f"must be a list of lists using each "
                               f"element index 0..{len(items) - 1} exactly once (blocks in "
                               "series, elements of a block in parallel; thesis eq. 3.1)")
    dev["blocks"] = blocks
    if dev["current_line"] is not None:
        dev["current_line"] = _section(source, f"{key}.current_line", dev["current_line"],
                                       CURRENT_LINE_DEFAULTS)
    return dev


def _instrument(source: str, name: str, given: Any) -> dict[str, Any]:
    key = f"instruments.{name}"
    if not isinstance(given, Mapping) or "model" not in given or "address" not in given:
        raise WorldConfigError(source, key, "must be a mapping with at least address and model")
    model = given["model"]
    if model not in INSTRUMENT_DEFAULTS:
        raise WorldConfigError(source, f"{key}.model", f"unknown model {model!r}; allowed: "
                               f"{', '.join(INSTRUMENT_DEFAULTS)}")
    rest = {k: v for k, v in given.items() if k not in ("model", "address")}
    spec = _section(source, key, rest, INSTRUMENT_DEFAULTS[model])
    spec["model"] = model
    if model == "hil_oscillator_chip":  # the chip's settings, checked now rather than at open
        _chip_settings(source, f"{key}.device", spec["device"])
    spec["address"] = canonical_address(given["address"], source, f"{key}.address")
    return spec


def _chip_settings(source: str, key: str, given: Any) -> None:
    """Check a simulated chip's ``device`` settings (``sims.oscillator_device.DeviceConfig``
    names and types, renamed keys named; the values the chip will be built with)."""
    from sims.oscillator_device import DeviceConfig

    if given is None:
        return
    if not isinstance(given, Mapping):
        raise WorldConfigError(source, key, "must be a mapping of DeviceConfig settings")
    try:
        DeviceConfig.from_mapping(given, prefix=key, source=source)
    except ConfigError as exc:
        raise WorldConfigError(source, exc.key, exc.message) from None


def canonical_address(address: Any, source: str = "<world>", key: str = "address") -> str:
    """The VISA resource name as pyvisa normalises it (so lookups match what drivers open)."""
    from pyvisa import rname

    if not isinstance(address, str):
        raise WorldConfigError(source, key, f"must be a VISA resource name, got {address!r}")
    try:
        return str(rname.parse_resource_name(address))
    except rname.InvalidResourceName as exc:
        raise WorldConfigError(source, key, f"{address!r} is not a VISA resource name "
                               f"({exc})") from None


def _vco(source: str, given: Any, instruments: Mapping[str, Any]) -> dict[str, Any]:
    vco = _section(source, "vco_source", given, VCO_DEFAULTS)
    channels = vco["channels"]
    if not isinstance(channels, list) or not channels:
        raise WorldConfigError(source, "vco_source.channels", "must be a non-empty list")
    vco["channels"] = [_section(source, f"vco_source.channels[{i}]", ch, VCO_CHANNEL_DEFAULTS)
                       for i, ch in enumerate(channels)]
    for part in ("tuning", "amplifier"):
        wiring = vco[part]
        if (not isinstance(wiring, Mapping) or set(wiring) != {"supply", "channels"}
                or wiring["supply"] not in instruments
                or instruments[wiring["supply"]]["model"] != "rs_hmp4040"
                or len(wiring["channels"]) != len(channels)):
            raise WorldConfigError(source, f"vco_source.{part}",
                                   f"must be {{supply: <an rs_hmp4040 instrument>, channels: "
                                   f"[one supply channel per VCO, {len(channels)} in all]}}")
    return vco


def _rf(source: str, given: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    allowed = ("source", "source_switch", "sink", "output_switch")
    bad = [k for k in given if k not in allowed]
    if bad:
        raise WorldConfigError(source, f"rf.{bad[0]}", f"unknown key; allowed: "
                               f"{', '.join(allowed)}")
    instruments = cfg["instruments"]
    sources = {n for n, i in instruments.items()
               if i["model"] in ("rs_smb100a", "keysight_n5183b")}
    if cfg["vco_source"] is not None:
        sources.add(cfg["vco_source"]["name"])
    sinks = set(cfg["sample"]["devices"]) | {n for n, i in instruments.items()
                                              if i["model"] == "rs_fsv"}
    out: dict[str, Any] = {"source": None, "source_switch": None, "sink": None,
                           "output_switch": None}
    for side, names, what in (("source", sources, "an RF source"),
                              ("sink", sinks, "a device or the spectrum analyser")):
        switch_key = f"{'source' if side == 'source' else 'output'}_switch"
        if side in given and switch_key in given:
            raise WorldConfigError(source, f"rf.{side}", f"give {side} or {switch_key}, not both")
        if side in given:
            if given[side] not in names:
                raise WorldConfigError(source, f"rf.{side}", f"must be {what}: "
                                       f"{', '.join(sorted(names)) or 'none defined'}")
            out[side] = given[side]
        elif switch_key in given:
            sw = given[switch_key]
            if (not isinstance(sw, Mapping) or set(sw) != {"switch", "ports"}
                    or instruments.get(sw["switch"], {}).get("model") != "minicircuits_rc_1sp4t"
                    or not isinstance(sw["ports"], Mapping)):
                raise WorldConfigError(source, f"rf.{switch_key}", "must be {switch: <a "
                                       "minicircuits_rc_1sp4t instrument>, ports: {1..4: name}}")
            for port, name in sw["ports"].items():
                # on the output side a port may feed several devices through a splitter
                split = side == "sink" and isinstance(name, list) and len(name) >= 2 \
                    and len(set(name)) == len(name) and all(n in names for n in name)
                if port not in (1, 2, 3, 4) or not (split or (isinstance(name, str) and name in names)):
                    also = " (or a list of devices behind a splitter)" if side == "sink" else ""
                    raise WorldConfigError(source, f"rf.{switch_key}.ports.{port}",
                                           f"ports are 1-4 and each names {what}{also}: "
                                           f"{', '.join(sorted(names))}")
            out[switch_key] = {"switch": sw["switch"],
                               "ports": {p: (list(n) if isinstance(n, list) else n)
                                         for p, n in sw["ports"].items()}}
    return out
