"""CW RF sources: Rohde & Schwarz SMB100A and Keysight N5183B (MXG X-series).

Both speak the SCPI SOURce/OUTPut subsystems (``SOUR:FREQ``, ``SOUR:POW``, ``OUTP``) and
both have an instrument-side ceiling on the output level, which the driver sets at connect
to the configured maximum so that even a command sent by another program (or a driver bug)
cannot exceed it:

- SMB100A: ``SOURce:POWer:LIMit[:AMPLitude]`` "limits the maximum RF output level in CW and
  sweep mode" (R&S SMB100A Operating Manual, SOURce:POWer subsystem).
- N5183B: ``SOURce:POWer:USER:MAX`` with ``SOURce:POWer:USER:ENABle ON`` (Keysight X-Series
  Signal Generators SCPI Command Reference, Amplitude subsystem).

Commands, checked against the manuals: ``SOURce:FREQuency[:CW]`` (SMB100A Operating Manual,
"SOURce:FREQuency subsystem"; Keysight X-Series SCPI Command Reference, "Frequency
subsystem"), ``SOURce:POWer[:LEVel][:IMMediate][:AMPLitude]`` ("SOURce:POWer subsystem" /
"Amplitude subsystem"), ``OUTPut[:STATe]`` ("OUTPut subsystem" in both), ``*IDN?``,
``*OPT?``, ``*CLS``, ``*OPC?`` (IEEE 488.2 common commands, both manuals) and
``SYSTem:ERRor[:NEXT]?`` ("SYSTem subsystem"; an unknown header queues -113, a value out of
range -222, an empty queue reads ``0,"No error"``, ``+0,"No error"`` on the N5183B).

Frequencies are in Hz, levels in dBm (``power_mw`` converts); the ranges below are the
widest the model family offers (frequency options up to 40 GHz). At connect the N5183B's
limits are narrowed to what the unit has: its frequency option from ``*OPT?`` (513, 520,
532, 540: 13, 20, 31.8, 40 GHz; the same table as QCoDeS' N51x1 driver) and its settable
level from ``SOUR:POW? MIN`` / ``SOUR:POW? MAX`` (SCPI-99 Vol. 1, 7.2.1.1: a numeric
setting's query takes MINimum|MAXimum), so the level ceiling is set within the unit's own
range. A lab configuration narrows them further to what the sample can take.
"""

from __future__ import annotations

import math
from typing import ClassVar

from drivers.base import (
    ON_OFF,
    InstrumentError,
    LimitError,
    Range,
    ScpiInstrument,
    Setting,
    parse_bool,
)


class RfSource(ScpiInstrument):
    """A CW source: frequency, level, output on/off, and an instrument-side level ceiling."""

    KIND = "rf_source"
    #: Resolution of the set commands: 1 mHz, 0.01 dB (both data sheets).
    freq_hz = Setting("SOUR:FREQ?", "SOUR:FREQ {}", unit="Hz", limit="freq_hz", fmt="{:.3f}",
                      doc="CW output frequency")
    power_dbm = Setting("SOUR:POW?", "SOUR:POW {}", unit="dBm", limit="power_dbm",
                        fmt="{:.2f}", doc="CW output level")
    output_enabled = Setting("OUTP?", "OUTP {}", choices=ON_OFF, parse=parse_bool,
                             doc="RF output state")

    # ---- derived units

    @property
    def power_mw(self) -> float:
        """Output level in mW (converted from the dBm the instrument reports)."""
        return 10.0 ** (self.power_dbm / 10.0)

    @power_mw.setter
    def power_mw(self, value: float) -> None:
        limit = self.limits["power_dbm"]
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise LimitError(f"power_mw must be > 0 mW (allowed "
                             f"[{10 ** (limit.min / 10):.3g}, {10 ** (limit.max / 10):.3g}] mW), "
                             f"got {value!r}; nothing was sent", instrument=self.describe())
        self.power_dbm = 10.0 * math.log10(value)

    # ---- output

    def output_on(self) -> None:
        """Switch the RF output on and wait until the level has settled (``*OPC?``)."""
        self.output_enabled = True
        self.wait_complete()

    def output_off(self) -> None:
        """Switch the RF output off and wait for it (``*OPC?``)."""
        self.output_enabled = False
        self.wait_complete()

    def apply(self, freq_hz: float, power_dbm: float) -> None:
        """Set frequency and level (both checked before either is sent), then sync."""
        commands = [type(self).freq_hz.command_for(self, freq_hz),
                    type(self).power_dbm.command_for(self, power_dbm)]
        for command in commands:
            self.set(command)
        self.wait_complete()

    # ---- protective limit

    def _configure(self) -> None:
        super()._configure()
        self._read_hardware_range()
        ceiling = self.limits["power_dbm"].max
        self._set_level_ceiling(ceiling)
        actual = self._level_ceiling()
        if abs(actual - ceiling) > 0.011:
            raise InstrumentError(f"the instrument's level ceiling reads {actual:g} dBm after "
                                  f"setting {ceiling:g} dBm", instrument=self.describe())

    def _read_hardware_range(self) -> None:
        """Narrow the limits to the installed options (models that can tell)."""

    def _set_level_ceiling(self, dbm: float) -> None:
        raise NotImplementedError

    def _level_ceiling(self) -> float:
        raise NotImplementedError

    # ---- safety and status

    def safe_shutdown(self) -> None:
        """RF off (sent first, before any check), then confirmed by reading it back."""
        self.write("OUTP OFF")
        if self.output_enabled:
            raise InstrumentError("RF output still reads ON after OUTP OFF",
                                  instrument=self.describe())
        self.report_errors(after="OUTP OFF")

    def status(self) -> str:
        state = "ON" if self.output_enabled else "off"
        return (f"RF {state}, {self.freq_hz / 1e9:.6g} GHz, {self.power_dbm:.2f} dBm "
                f"(ceiling {self._level_ceiling():.2f} dBm)")


class RohdeSchwarzSMB100A(RfSource):
    """Rohde & Schwarz SMB100A analog signal generator (9 kHz ... 40 GHz by option)."""

    MODEL = "Rohde & Schwarz SMB100A"
    IDN_PATTERN = r"Rohde&Schwarz,SMB100A,"
    # Data sheet: 9 kHz (B101..B106) to 40 GHz (B140); -145 dBm to +30 dBm (high-power opt.)
    HARD_LIMITS: ClassVar = {"freq_hz": Range(9e3, 40e9, "Hz"),
                             "power_dbm": Range(-145.0, 30.0, "dBm")}

    def _set_level_ceiling(self, dbm: float) -> None:
        # SMB100A Operating Manual, SOURce:POWer subsystem, :LIMit[:AMPLitude]
        self.set(f"SOUR:POW:LIM:AMPL {dbm:.2f}")

    def _level_ceiling(self) -> float:
        return self.query_float("SOUR:POW:LIM:AMPL?")


class KeysightN5183B(RfSource):
    """Keysight N5183B MXG X-series microwave analog signal generator (9 kHz ... 40 GHz)."""

    MODEL = "Keysight N5183B"
    IDN_PATTERN = r"(Keysight|Agilent) Technologies,N5183B,"
    # Data sheet: 9 kHz to 40 GHz (option 540); settable level -130 dBm (1E1) to +30 dBm.
    HARD_LIMITS: ClassVar = {"freq_hz": Range(9e3, 40e9, "Hz"),
                             "power_dbm": Range(-130.0, 30.0, "dBm")}
    #: Frequency options of the N5183B and their upper frequency (data sheet; *OPT?).
    FREQUENCY_OPTIONS: ClassVar[dict[str, float]] = {"513": 13e9, "520": 20e9, "532": 31.8e9,
                                                      "540": 40e9}

    def _read_hardware_range(self) -> None:
        reply = self.query("*OPT?")
        options = {o.strip().strip('"').upper() for o in reply.split(",")}
        found = [hz for opt, hz in self.FREQUENCY_OPTIONS.items() if opt in options]
        if not found:
            raise InstrumentError(f"*OPT? reply {reply!r} names no frequency option "
                                  f"({', '.join(self.FREQUENCY_OPTIONS)})",
                                  instrument=self.describe(), command="*OPT?")
        self._narrow_limit("freq_hz", 0.0, max(found), f"frequency option {reply!r}")
        self._narrow_limit("power_dbm", self.query_float("SOUR:POW? MIN"),
                           self.query_float("SOUR:POW? MAX"), "the unit's settable level")

    def _set_level_ceiling(self, dbm: float) -> None:
        # X-Series SCPI Command Reference, Amplitude subsystem, :POWer:USER:MAX and :ENABle
        self.set(f"SOUR:POW:USER:MAX {dbm:.2f}")
        self.set("SOUR:POW:USER:ENAB ON")

    def _level_ceiling(self) -> float:
        if not parse_bool(self.query("SOUR:POW:USER:ENAB?")):
            raise InstrumentError("user maximum power is not enabled",
                                  instrument=self.describe())
        return self.query_float("SOUR:POW:USER:MAX?")
