"""The virtual spintronics lab: one simulated physical world behind every virtual instrument.

A ``World`` holds the clock, the magnet array, the fabricated sample and every instrument
model, wired as the world file says (thesis 4.4): the RF sources (the precise generator, the
VCO source) feed the source-selector switch, whose common port feeds the output switch, whose
ports go to the devices' RF lines and to the spectrum analyser; each device's DC port goes to
a voltmeter channel; stages set the sample's pose in the gradient; a SourceMeter can drive a
device's current line; a gaussmeter's Hall probe on the holder reads the magnet-array field
(``probes``). So the nanovoltmeter's reading depends on where the stages are, on
what the selected source emits, on which switch port is connected, and on lab time (drift,
source stabilisation).

Everything random is seeded from the world's ``seed`` through named streams (fabrication,
placement, drift, each instrument's unit spread and noise), so one stream does not shift when
another is used more. Calibration code sees the world only through the instruments; the truth
(every drawn value and the present hidden state) is available from ``truth()``, for tests and
reports only.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sims.spindiode import MagnetArray, SpinDiodeMaterial
from sims.virtual_lab.chip import OscillatorChipModel
from sims.virtual_lab.clock import VirtualClock
from sims.virtual_lab.config import (
    WorldConfigError,
    canonical_address,
    complete_world_config,
    load_world_config,
)
from sims.virtual_lab.meters import FsvModel, K2182aModel
from sims.virtual_lab.probes import Ls425Model
from sims.virtual_lab.sample import Pose, Sample
from sims.virtual_lab.scpi import InstrumentModel
from sims.virtual_lab.sources import N5183bModel, RfSourceModel, Smb100aModel, VcoSource
from sims.virtual_lab.stages import STAGES, Kdc101Model, Smc100Model
from sims.virtual_lab.supplies import Hmp4040Model, K2400Model, K2401Model
from sims.virtual_lab.switches import Rc1sp4tModel

WORLDS_DIR = Path(__file__).resolve().parent / "worlds"

MODELS: dict[str, type[InstrumentModel]] = {
    cls.MODEL: cls for cls in (Smb100aModel, N5183bModel, K2182aModel, FsvModel, Hmp4040Model,
                               K2400Model, K2401Model, Rc1sp4tModel, Smc100Model, Kdc101Model,
                               OscillatorChipModel, Ls425Model)
}

EMPTY = (np.zeros(0), np.zeros(0))
#: a resistive splitter's loss beyond the 1/n division (0.5 dB)
SPLITTER_EXCESS = 10 ** (-0.05)


class World:
    """Clock, sample, magnets and instruments of one virtual bench (see the module doc)."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = dict(config)
        self.seed: int = config["seed"]
        self.name: str = config["name"]
        self.clock = VirtualClock()
        self.material = SpinDiodeMaterial(**config["material"])
        self.magnets = MagnetArray(**config["magnets"])
        self.sample = Sample(config, self.material, self.magnets, self.rng("fabrication"),
                             self.rng("drift"), self.rng("move-kicks"))
        self.instruments: dict[str, InstrumentModel] = {}
        self.by_address: dict[str, InstrumentModel] = {}
        for name, spec in config["instruments"].items():
            model = spec["model"]
            if model in ("newport_smc100", "thorlabs_kdc101") and spec["stage"] not in STAGES:
                raise WorldConfigError(config["source"], f"instruments.{name}.stage",
                                       f"unknown stage {spec['stage']!r}; allowed: "
                                       f"{', '.join(STAGES)}")
            if spec["address"] in self.by_address:
                raise WorldConfigError(config["source"], f"instruments.{name}.address",
                                       f"{spec['address']} is already used by "
                                       f"{self.by_address[spec['address']].name}")
            inst = MODELS[model](self, name, spec)
            self.instruments[name] = inst
            self.by_address[spec["address"]] = inst
        self.vco: VcoSource | None = None
        if config["vco_source"] is not None:
            self.vco = VcoSource(self, config["vco_source"])
            self.vco.attach()
        for name, dev in config["sample"]["devices"].items():
            line = dev["current_line"]
            if line is not None:
                source = self.instruments[line["source"]]
                if not isinstance(source, K2400Model):
                    raise WorldConfigError(config["source"], f"sample.devices.{name}."
                                           "current_line.source", "must be a keithley_2400/2401")
                source.connect_load(line["resistance_ohm"])
        self.rf = config["rf"]
        self.pose_axes = config["pose"]

    # ---- construction

    @classmethod
    def from_file(cls, path: str | Path, *, seed: int | None = None,
                  overrides: Mapping[str, Any] | None = None) -> World:
        """Build a world from a world file (a bare name is looked up in ``worlds/``)."""
        path = Path(path)
        if not path.is_absolute() and not path.exists() and (WORLDS_DIR / path).exists():
            path = WORLDS_DIR / path
        return cls(load_world_config(path, overrides=overrides, seed=seed))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, seed: int | None = None) -> World:
        return cls(complete_world_config(data, seed=seed))

    def rng(self, stream: str) -> np.random.Generator:
        """The seeded generator of one named stream (independent of every other stream)."""
        return np.random.default_rng([self.seed, zlib.crc32(stream.encode())])

    def instrument_at(self, address: str) -> InstrumentModel | None:
        try:
            return self.by_address.get(canonical_address(address))
        except WorldConfigError:
            return None

    # ---- pose

    def stage_offsets(self) -> dict[str, float]:
        """What the stages add to the sample's position (mm) and the magnet rotation (deg)."""
        t = self.clock.now_s()
        offsets: dict[str, float] = {}
        for axis, spec in self.pose_axes.items():
            stage = spec["stage"]
            if stage is None:
                continue
            inst = self.instruments[stage]
            physical = inst.axis.physical(t)  # type: ignore[attr-defined]
            offsets[axis] = spec["direction"] * (physical - spec["reference"])
        return offsets

    def stage_moved(self, name: str, distance: float) -> None:
        """A stage started a move: the sample is nudged (thesis 4.7)."""
        if any(spec["stage"] == name for spec in self.pose_axes.values()):
            self.sample.kick(distance)

    def pose(self) -> Pose:
        """Where the chip is now relative to the magnet centre (hidden from the drivers)."""
        return self.sample.pose(self.stage_offsets(), self.clock.now_s())

    # ---- RF network (thesis 4.4)

    def source_tones(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if self.vco is not None and name == self.vco.name:
            return self.vco.tones()
        inst = self.instruments[name]
        assert isinstance(inst, RfSourceModel)
        return inst.tones()

    def _switched(self, wiring: dict[str, Any], gather: Any) -> tuple[np.ndarray, np.ndarray]:
        switch = self.instruments[wiring["switch"]]
        assert isinstance(switch, Rc1sp4tModel)
        freqs, powers = [], []
        for port, name in wiring["ports"].items():
            f, p = gather(name)
            if len(f):
                freqs.append(f)
                powers.append(p * switch.ratio(port, f))
        if not freqs:
            return EMPTY
        return np.concatenate(freqs), np.concatenate(powers)

    def common_tones(self) -> tuple[np.ndarray, np.ndarray]:
        """Tones at the output switch's common port (after the source selector)."""
        if self.rf["source"] is not None:
            return self.source_tones(self.rf["source"])
        if self.rf["source_switch"] is not None:
            return self._switched(self.rf["source_switch"], self.source_tones)
        return EMPTY

    def tones_at(self, sink: str, common: tuple[np.ndarray, np.ndarray] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Tones (Hz, W) arriving at a device's RF line or at the analyser input now
        (``common``: the tones at the output switch's common port, if already known)."""
        if self.rf["sink"] is not None:
            if self.rf["sink"] != sink:
                return EMPTY
            return self.common_tones() if common is None else common
        wiring = self.rf["output_switch"]
        if wiring is None:
            return EMPTY
        # a port names one sink, or several behind a resistive power splitter (1/n each, and
        # the splitter's excess loss)
        share = {p: (1.0 if name == sink else SPLITTER_EXCESS / len(name))
                 for p, name in wiring["ports"].items()
                 if name == sink or (isinstance(name, list) and sink in name)}
        if not share:
            return EMPTY
        f, p = self.common_tones() if common is None else common
        if not len(f):
            return EMPTY
        switch = self.instruments[wiring["switch"]]
        assert isinstance(switch, Rc1sp4tModel)
        return f, p * sum(k * switch.ratio(port, f) for port, k in share.items())

    # ---- DC side

    def line_field_oe(self, device: str) -> float:
        line = self.config["sample"]["devices"][device]["current_line"]
        if line is None:
            return 0.0
        source = self.instruments[line["source"]]
        assert isinstance(source, K2400Model)
        return line["field_oe_per_ma"] * source.output_a() * 1e3

    def dc_voltage_v(self, voltmeter: str, channel: int) -> float:
        """The spin-diode voltage at a voltmeter channel: the devices wired to it, in series."""
        total = 0.0
        pose = None
        t = self.clock.now_s()
        common = None
        for name, dev in self.sample.devices.items():
            if dev.voltmeter != voltmeter or dev.channel != channel:
                continue
            common = self.common_tones() if common is None else common
            f, p = self.tones_at(name, common)
            if not len(f):
                continue
            pose = pose or self.pose()
            total += self.sample.device_voltage_v(dev, f, p, pose, t, self.line_field_oe(name))
        return total

    # ---- truth

    def truth(self) -> dict[str, Any]:
        """Every drawn value and the present hidden state (a copy). For tests and reports only:
        calibration code must learn the world through the instruments."""
        lines = {name: self.line_field_oe(name) for name in self.sample.devices}
        stages = {name: inst.truth() for name, inst in self.instruments.items()
                  if isinstance(inst, Smc100Model | Kdc101Model)}
        return copy.deepcopy({
            "seed": self.seed, "world": self.name, "frame": self.config["frame"],
            "lab_time_s": self.clock.now_s(),
            "material": dict(self.config["material"]), "magnets": dict(self.config["magnets"]),
            "sample": self.sample.truth(self.pose(), self.clock.now_s(), lines),
            "stages": stages, "stage_offsets": self.stage_offsets(),
            "instruments": {name: inst.truth() for name, inst in self.instruments.items()},
            "vco_source": self.vco.truth() if self.vco is not None else None,
        })

    def describe(self) -> str:
        return (f"{self.name} (seed {self.seed}, {len(self.instruments)} instruments, "
                f"{len(self.sample.devices)} devices; {self.clock.report()})")
