"""Lake Shore Model 425 gaussmeter (Hall probe): the field probe of the bench.

Why: the Kittel fit of the reference map (thesis 3.5.1, eq. 2.9) cannot tell the field
gradient and gamma apart from M_eff; a Hall probe measures the field itself, so the gradient
and the field zero come from a measurement instead of an assumption (issue 21, item 4).

Commands from the Lake Shore Model 425 Gaussmeter User's Manual, chapter 6 "Computer
Interface Operation", section 6.3.1 "Interface Commands" (the alphabetical command table):

- ``*IDN?``: ``LSCI,MODEL425,<serial>,<firmware>`` (p. 52, with ``*RST`` and ``ALARM``).
- ``RDGMODE <mode>,<filter>,<band>`` / ``RDGMODE?``: mode 1 DC, 2 RMS; DC filter 0 off,
  1 on; RMS band 1 wide, 2 narrow (p. 56, with ``RDGMNMX?``, ``REL``, ``RELAY``).
- ``UNIT <n>`` / ``UNIT?``: 1 Gauss, 2 Tesla, 3 Oersted, 4 A/m; ``TYPE?``: probe type, 40
  high sensitivity, 41 high stability, 42 ultra-high sensitivity, 50-52 the same with a
  user-programmable cable (p. 57, with ``RELSP`` and ``RELAYST?``).
- ``RANGE <n>`` / ``RANGE?`` (1 = lowest ... 4 = highest; the full scale depends on the probe,
  see ``PROBE_RANGES_G``), ``AUTO <0|1>`` / ``AUTO?`` (autorange), ``RDGFIELD?`` (the field,
  ``+nnn.nnnE+nn`` in the present units), ``OPST?`` (operational status: bit 0 no probe,
  bit 1 field overload, bit 2 new reading, bit 4 invalid probe, bit 6 calibration error,
  bit 7 zero probe done), ``ZCLEAR`` / ``ZPROBE`` (clear the zero, zero the probe), ``*CLS``
  and ``*ESR?`` (Standard Event Status Register, read and cleared by the query: bit 5 CME
  command error, bit 4 EXE execution error, bit 2 QYE query error): the same table; their
  spellings and the status bits agree with two independent drivers (Lake Shore's own
  ``lakeshore`` package and the Simons Observatory ``socs`` agent for the 425).
- The USB port is a virtual serial port: 57 600 baud, 7 data bits, odd parity, 1 stop bit,
  CR LF after commands and replies (chapter 6, USB interface; the same settings in Lake
  Shore's Python driver for the 425).
- Probe ranges: the Model 425 specifications, "Measurement" table.

A field in gauss equals the field in oersted in air (B = mu0 H), which is how ``field_oe``
reads it; ``field_t`` is the same reading in tesla. The driver fixes the units to gauss at
connect, so a reading's unit never depends on what the front panel was left at.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from drivers.base import (
    Instrument,
    InstrumentError,
    LimitError,
    ProtocolError,
    Range,
    SerialSettings,
    Setting,
)

log = logging.getLogger(__name__)

#: Full scale (G) of ranges 1-4 per probe type (Model 425 specifications): high sensitivity
#: (HSE), high stability (HST), ultra-high sensitivity (UHS); 50-52 are the same probes with a
#: user-programmable cable.
PROBE_RANGES_G: dict[int, tuple[float, float, float, float]] = {
    40: (35.0, 350.0, 3.5e3, 35e3),
    41: (350.0, 3.5e3, 35e3, 350e3),
    42: (0.35, 3.5, 35.0, 350.0),
}
PROBE_NAMES = {40: "high sensitivity", 41: "high stability", 42: "ultra-high sensitivity"}
#: Status bits of ``OPST?`` that make a reading meaningless.
_BAD_STATUS = {1: "no probe", 2: "field overload", 16: "invalid probe", 64: "calibration error"}
#: Standard Event Status Register bits (``*ESR?``).
_ESR_BITS = {32: "command error (CME: unknown command)",
             16: "execution error (EXE: parameter out of range)",
             4: "query error (QYE: no reply to read)"}
GAUSS_PER_TESLA = 1.0e4


def _parse_int(reply: str) -> int:
    return int(float(reply.strip()))


class LakeShore425(Instrument):
    """Lake Shore Model 425 gaussmeter over its USB virtual serial port (manual 6.2)."""

    MODEL = "Lake Shore 425"
    KIND = "gaussmeter"
    IDN_PATTERN = r"LSCI,MODEL425,"
    INTERFACES = ("ASRL",)
    READ_TERMINATION = "\r\n"
    WRITE_TERMINATION = "\r\n"
    SERIAL = SerialSettings(57600, data_bits=7, stop_bits=1, parity="odd")
    #: ``range``: the range index of ``RANGE`` (a configuration may pin it, e.g. [2, 2]).
    HARD_LIMITS: ClassVar = {"range": Range(1, 4, "index")}
    DEFAULT_TIMEOUT_MS = 3000.0

    units = Setting("UNIT?", "UNIT {}", choices={"G": "1", "T": "2", "Oe": "3", "A/m": "4"},
                    parse=lambda r: {"1": "G", "2": "T", "3": "Oe", "4": "A/m"}[r.strip()],
                    doc="field units of readings (manual 6.3.1 UNIT)")
    range_index = Setting("RANGE?", "RANGE {}", limit="range", fmt="{:d}", parse=_parse_int,
                          doc="range 1 (lowest) to 4 (highest) (manual 6.3.1 RANGE)")
    autorange = Setting("AUTO?", "AUTO {}", choices={True: "1", False: "0"},
                        parse=lambda r: r.strip() == "1",
                        doc="autorange on/off (manual 6.3.1 AUTO)")

    # ---- connection

    def _identify(self) -> str:
        return self.query("*IDN?")

    def _configure(self) -> None:
        """Clear the status register, report in gauss, DC mode with the filter on."""
        self.write("*CLS")
        self.set(type(self).units.command_for(self, "G"))
        self.set_dc_mode(filter_on=True)

    def check_errors(self, after: str = "") -> None:
        """Read ``*ESR?`` (read-and-clear) and raise on a command or execution error."""
        reply = self.query("*ESR?")
        try:
            esr = _parse_int(reply)
        except ValueError:
            raise ProtocolError(f"unexpected reply {reply!r} to *ESR?",
                                instrument=self.describe(), command=after or None) from None
        problems = [text for bit, text in _ESR_BITS.items() if esr & bit]
        if problems:
            where = f" after {after!r}" if after else ""
            raise InstrumentError(f"instrument reported{where}: " + "; ".join(problems),
                                  instrument=self.describe(), command=after or None)

    def drain_errors(self) -> list[str]:
        esr = _parse_int(self.query("*ESR?"))
        return [text for bit, text in _ESR_BITS.items() if esr & bit]

    def safe_shutdown(self) -> None:
        """Nothing to switch off: a gaussmeter sources nothing. Kept for the common interface."""

    # ---- configuration

    def set_dc_mode(self, *, filter_on: bool = True) -> None:
        """DC field measurement, DC filter on or off (``RDGMODE 1,<filter>,1``)."""
        if not isinstance(filter_on, bool):
            raise LimitError(f"filter_on must be True or False, got {filter_on!r}; nothing "
                             "was sent", instrument=self.describe())
        self.set(f"RDGMODE 1,{int(filter_on)},1")

    def reading_mode(self) -> tuple[str, bool]:
        """(``"dc"`` or ``"rms"``, DC filter on) from ``RDGMODE?``."""
        reply = self.query("RDGMODE?")
        try:
            mode, filt, _band = (int(x) for x in reply.split(","))
        except ValueError:
            raise ProtocolError(f"unexpected reply {reply!r} to RDGMODE?",
                                instrument=self.describe(), command="RDGMODE?") from None
        return {1: "dc", 2: "rms"}.get(mode, f"mode {mode}"), bool(filt)

    def probe_type(self) -> int:
        """The probe's type code (``TYPE?``): 40/50 HSE, 41/51 HST, 42/52 UHS."""
        return _parse_int(self.query("TYPE?"))

    def ranges_g(self) -> tuple[float, float, float, float]:
        """Full scale (G) of ranges 1-4 for the connected probe."""
        code = self.probe_type()
        base = code - 10 if code >= 50 else code
        if base not in PROBE_RANGES_G:
            raise ProtocolError(f"unknown probe type {code}", instrument=self.describe(),
                                command="TYPE?")
        return PROBE_RANGES_G[base]

    def set_range_for_g(self, max_field_g: float) -> float:
        """Fix the smallest range that reads ``|max_field_g|``; returns its full scale (G).

        Checked against the probe's ranges and the configured ``range`` limit before sending.
        """
        if not isinstance(max_field_g, int | float) or max_field_g != max_field_g:
            raise LimitError(f"max_field_g must be a number, got {max_field_g!r}; nothing "
                             "was sent", instrument=self.describe())
        scales = self.ranges_g()
        allowed = self.limits["range"]
        for index, full in enumerate(scales, start=1):
            if abs(max_field_g) <= full and index in allowed:
                self.autorange = False
                self.range_index = index
                return full
        raise LimitError(f"a field of {max_field_g:g} G is beyond every allowed range "
                         f"({', '.join(f'{s:g} G' for s in scales)}; range limit {allowed}); "
                         "nothing was sent", instrument=self.describe())

    def zero_probe(self) -> None:
        """Clear and redo the probe's zero offset (``ZCLEAR``, ``ZPROBE``).

        The probe must sit in the zero-gauss chamber: zeroing it in the magnet subtracts the
        magnet's field from every later reading.
        """
        self.set("ZCLEAR")
        self.set("ZPROBE")

    # ---- readings

    def status_bits(self) -> int:
        """The operational status register (``OPST?``)."""
        return _parse_int(self.query("OPST?"))

    def field_g(self) -> float:
        """The present DC field reading in gauss (``RDGFIELD?``).

        Refused (``InstrumentError``) when ``OPST?`` reports no probe, an overload, an invalid
        probe or a calibration error, so an overloaded reading is never taken for a field.
        """
        reply = self.query("RDGFIELD?")
        status = self.status_bits()
        bad = [text for bit, text in _BAD_STATUS.items() if status & bit]
        if bad:
            raise InstrumentError(f"reading {reply!r} is not valid: {', '.join(bad)}",
                                  instrument=self.describe(), command="RDGFIELD?")
        try:
            return float(reply)
        except ValueError:
            raise ProtocolError(f"reading {reply!r} is not a number",
                                instrument=self.describe(), command="RDGFIELD?") from None

    def field_oe(self) -> float:
        """The field in oersted (equal to the gauss reading in air, B = mu0 H)."""
        return self.field_g()

    def field_t(self) -> float:
        """The field in tesla."""
        return self.field_g() / GAUSS_PER_TESLA

    def status(self) -> str:
        mode, filt = self.reading_mode()
        code = self.probe_type()
        name = PROBE_NAMES.get(code - 10 if code >= 50 else code, f"type {code}")
        auto = "auto" if self.autorange else f"range {self.range_index}"
        return f"{name} probe, {mode}{' filtered' if filt else ''}, {auto}"
