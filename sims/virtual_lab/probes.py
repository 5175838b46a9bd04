"""Field probe: a Lake Shore Model 425 gaussmeter whose Hall probe sits on the sample holder.

Why: the field gradient and the field zero must be measured, not assumed (issue 21, item 4);
this model reads the world's magnet-array field where the probe is, so a calibration through
``drivers.gaussmeter`` learns them as on a real bench.

Where: the Hall element sits at ``mount_mm`` (x, y, z; mm) from the chip origin's design
placement, on the holder that stages x, y and z move (the world's ``pose`` axes), plus a drawn
mounting error (``mount_sigma_mm``, hidden). The chip's own glue-placement error does not move
the probe, so the probe's field zero is the holder's, not the chip's. ``axis`` is the field
component it reads (the gradient axis z by default); the rotation stage turns the magnet array
under it as it does under the chip.

What it reads: gain (1 + a drawn calibration error, ``gain_sigma_frac``) times the field, plus a
drawn probe offset (``offset_sigma_g``, what ``ZPROBE`` in a zero-gauss chamber would remove),
minus the user zero of ``ZPROBE`` (which here zeroes the *present* reading: done in the magnet
it subtracts the field, as on the instrument), plus white noise (``noise_g`` per reading,
times ``filter_noise_factor`` with the DC filter on), rounded to the range's resolution (4 3/4
digits: full scale / 35 000). A new reading is available every ``update_s`` of lab time;
queries in between return the same reading. Beyond the range's full scale the reading is
clipped and ``OPST?`` sets the overload bit; with ``AUTO 1`` the range follows the field.

Commands (Model 425 User's Manual, 6.3.1; see ``drivers.gaussmeter``): ``*IDN?``, ``*CLS``,
``*RST``, ``*ESR?`` (read and clear; 32 unknown command, 16 parameter out of range),
``UNIT``, ``RANGE``, ``AUTO``, ``RDGMODE``, ``RDGFIELD?``, ``OPST?``, ``TYPE?``, ``ZCLEAR``,
``ZPROBE``; each with its ``?`` query where the manual has one. Serial line: 57600 baud, CR LF.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from sims.virtual_lab.config import WorldConfigError
from sims.virtual_lab.scpi import TextModel

if TYPE_CHECKING:
    from sims.virtual_lab.world import World

#: Full scale (G) of ranges 1-4 per probe type (Model 425 specifications).
PROBE_RANGES_G = {40: (35.0, 350.0, 3.5e3, 35e3), 41: (350.0, 3.5e3, 35e3, 350e3),
                  42: (0.35, 3.5, 35.0, 350.0)}
COUNTS = 35000  # 4 3/4 digits
UNIT_FACTOR = {1: 1.0, 2: 1e-4, 3: 1.0, 4: 1e3 / (4 * math.pi)}  # from gauss (in air)
_AXES = {"x": 0, "y": 1, "z": 2}

ESR_CME = 32
ESR_EXE = 16
OPST_OVERLOAD = 2
OPST_NEW_READING = 4
OPST_ZERO_DONE = 128


class Ls425Model(TextModel):
    MODEL = "lakeshore_425"
    TERM = "\r\n"
    BAUD = 57600
    TURNAROUND_S = 0.005

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        super().__init__(world, name, spec)
        source = world.config.get("source", "<world>")
        mount = spec["mount_mm"]
        if (not isinstance(mount, list | tuple) or len(mount) != 3
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in mount)):
            raise WorldConfigError(source, f"instruments.{name}.mount_mm", f"must be [x, y, z] in mm, "
                                   f"got {mount!r}")
        if spec["axis"] not in _AXES:
            raise WorldConfigError(source, f"instruments.{name}.axis", f"must be one of x, y, z, got "
                                   f"{spec['axis']!r}")
        if spec["probe_type"] not in PROBE_RANGES_G:
            raise WorldConfigError(source, f"instruments.{name}.probe_type", f"must be one of "
                                   f"{', '.join(map(str, PROBE_RANGES_G))}, got "
                                   f"{spec['probe_type']!r}")
        for key in ("mount_sigma_mm", "gain_sigma_frac", "offset_sigma_g", "noise_g",
                    "filter_noise_factor", "update_s"):
            value = spec[key]
            if not isinstance(value, int | float) or not value >= 0 or (key == "update_s"
                                                                         and value == 0):
                raise WorldConfigError(source, f"instruments.{name}.{key}", f"must be a number >= 0 "
                                       f"(> 0 for update_s), got {value!r}")
        rng = self.rng("unit")
        self.mount_error_mm = rng.normal(0.0, spec["mount_sigma_mm"], 3)
        self.gain = 1.0 + float(rng.normal(0.0, spec["gain_sigma_frac"]))
        self.offset_g = float(rng.normal(0.0, spec["offset_sigma_g"]))
        self.noise = self.rng("noise")
        self.ranges_g = PROBE_RANGES_G[spec["probe_type"]]
        self.reset()

    def reset(self) -> None:
        self.units = 1
        self.range = 2
        self.auto = True
        self.dc_filter = False
        self.user_zero_g = 0.0
        self.esr = 0
        self.zero_done = False
        self._slot: int | None = None
        self._reading_g = 0.0
        self._overload = False

    # ---- physics

    def position_mm(self) -> np.ndarray:
        """Where the Hall element is in the magnet frame now (mm; hidden)."""
        offsets = self.world.stage_offsets()
        return (self.world.sample.design_placement_mm + np.asarray(self.spec["mount_mm"], float)
                + self.mount_error_mm + np.array([offsets.get(k, 0.0) for k in "xyz"]))

    def true_field_g(self) -> float:
        """The field component along the probe's axis at its position (G = Oe in air)."""
        x, y, z = self.position_mm()
        phi = math.radians(self.world.stage_offsets().get("rotation", 0.0))
        cp, sp = math.cos(phi), math.sin(phi)
        hxm, hym, hz = self.world.magnets.field_oe(x * cp + y * sp, -x * sp + y * cp, z)
        h = (float(hxm * cp - hym * sp), float(hxm * sp + hym * cp), float(hz))
        return h[_AXES[self.spec["axis"]]]

    def _raw_g(self) -> float:
        """Gain, offset and noise, before the user zero and the range (one new reading)."""
        noise = self.spec["noise_g"] * (self.spec["filter_noise_factor"] if self.dc_filter
                                        else 1.0)
        return (self.gain * self.true_field_g() + self.offset_g
                + float(self.noise.normal(0.0, noise)))

    def _update(self) -> None:
        slot = int(self.clock.now_s() // self.spec["update_s"])
        if slot == self._slot:
            return
        self._slot = slot
        value = self._raw_g() - self.user_zero_g
        if self.auto:
            fits = [i for i, full in enumerate(self.ranges_g, 1) if abs(value) <= full]
            self.range = fits[0] if fits else len(self.ranges_g)
        full = self.ranges_g[self.range - 1]
        self._overload = abs(value) > full
        value = max(-full, min(full, value))
        step = full / COUNTS
        self._reading_g = round(value / step) * step

    # ---- commands

    def handle(self, command: str) -> str | None:
        head, _, args = command.strip().partition(" ")
        head, args = head.upper(), args.strip()
        query = head.endswith("?")
        word = head.rstrip("?")
        handler = {"*IDN": self._idn, "*CLS": self._cls, "*RST": self._rst, "*ESR": self._esr,
                   "UNIT": self._unit, "RANGE": self._range, "AUTO": self._auto,
                   "RDGMODE": self._mode, "RDGFIELD": self._field, "OPST": self._opst,
                   "TYPE": self._type, "ZCLEAR": self._zclear,
                   "ZPROBE": self._zprobe}.get(word)
        if handler is None:
            self.esr |= ESR_CME
            return None
        return handler(args, query)

    def _refuse(self, bit: int) -> None:
        self.esr |= bit
        return None

    def _int_in(self, args: str, lo: int, hi: int) -> int | None:
        try:
            value = int(args)
        except ValueError:
            self.esr |= ESR_EXE
            return None
        if not lo <= value <= hi:
            self.esr |= ESR_EXE
            return None
        return value

    def _idn(self, args: str, query: bool) -> str | None:
        if not query:
            return self._refuse(ESR_CME)
        return f"LSCI,MODEL425,{self.spec['serial']},1.3"

    def _cls(self, args: str, query: bool) -> None:
        self.esr = 0

    def _rst(self, args: str, query: bool) -> None:
        self.reset()

    def _esr(self, args: str, query: bool) -> str | None:
        if not query:
            return self._refuse(ESR_CME)
        value, self.esr = self.esr, 0
        return str(value)

    def _unit(self, args: str, query: bool) -> str | None:
        if query:
            return str(self.units)
        value = self._int_in(args, 1, 4)
        if value is not None:
            self.units = value
        return None

    def _range(self, args: str, query: bool) -> str | None:
        if query:
            return str(self.range)
        value = self._int_in(args, 1, 4)
        if value is not None:
            self.range, self.auto, self._slot = value, False, None
        return None

    def _auto(self, args: str, query: bool) -> str | None:
        if query:
            return "1" if self.auto else "0"
        value = self._int_in(args, 0, 1)
        if value is not None:
            self.auto, self._slot = bool(value), None
        return None

    def _mode(self, args: str, query: bool) -> str | None:
        if query:
            return f"1,{int(self.dc_filter)},1"
        parts = args.split(",")
        if len(parts) != 3:
            return self._refuse(ESR_EXE)
        mode = self._int_in(parts[0].strip(), 1, 2)
        filt = self._int_in(parts[1].strip(), 0, 1)
        band = self._int_in(parts[2].strip(), 1, 2)
        if mode is None or filt is None or band is None:
            return None
        if mode != 1:  # this model simulates DC fields only
            return self._refuse(ESR_EXE)
        self.dc_filter, self._slot = bool(filt), None
        return None

    def _field(self, args: str, query: bool) -> str | None:
        if not query:
            return self._refuse(ESR_CME)
        self._update()
        return f"{self._reading_g * UNIT_FACTOR[self.units]:+.4E}"

    def _opst(self, args: str, query: bool) -> str | None:
        if not query:
            return self._refuse(ESR_CME)
        self._update()
        bits = OPST_NEW_READING | (OPST_OVERLOAD if self._overload else 0)
        if self.zero_done:
            bits |= OPST_ZERO_DONE
            self.zero_done = False
        return str(bits)

    def _type(self, args: str, query: bool) -> str | None:
        if not query:
            return self._refuse(ESR_CME)
        return str(self.spec["probe_type"])

    def _zclear(self, args: str, query: bool) -> None:
        self.user_zero_g, self._slot = 0.0, None

    def _zprobe(self, args: str, query: bool) -> None:
        self.clock.advance(1.0, f"{self.name}: zero probe")
        self.user_zero_g, self._slot = self._raw_g(), None
        self.zero_done = True

    def truth(self) -> dict[str, Any]:
        return {"position_mm": self.position_mm().tolist(),
                "mount_error_mm": self.mount_error_mm.tolist(), "gain": self.gain,
                "offset_g": self.offset_g, "user_zero_g": self.user_zero_g,
                "field_g": self.true_field_g()}
