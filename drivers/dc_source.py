"""DC sources: Keithley 2400-series SourceMeters and the R&S HMP4040 four-channel supply.

Keithley 2400/2401, checked against the Series 2400 SourceMeter User's Manual, "SCPI Reference
Tables": ``SOURce:FUNCtion VOLTage`` and ``SOURce:VOLTage:MODE FIXed`` (SOURce summary),
``SOURce:VOLTage[:LEVel]`` (SOURce summary, amplitude), ``SOURce:VOLTage:PROTection``
(over-voltage protection, one of 20, 40, 60, 80, 100, 120, 160 V or NONE; SOURce summary),
``SENSe:FUNCtion 'CURRent'`` and ``SENSe:CURRent:PROTection`` (the current compliance;
SENSe summary), ``OUTPut[:STATe]`` (OUTPut summary), ``FORMat:ELEMents VOLTage,CURRent``
(FORMat summary), ``READ?`` ("Measurement commands") and ``SYSTem:ERRor?`` (SYSTem summary).
PyMeasure's Keithley2400 spells the same short forms.

R&S HMP4040, checked against the HMP series SCPI programmer's manual ("Command reference":
INSTrument, SOURce, OUTPut, MEASure subsystems): ``INSTrument:NSELect 1..4`` selects the
channel the following commands act on; ``VOLTage``, ``CURRent`` (the current limit),
``VOLTage:PROTection`` (OVP), ``OUTPut[:STATe]`` per channel, ``OUTPut:GENeral`` (master),
``MEASure:VOLTage?``/``MEASure:CURRent?``. Each channel: 0-32 V, 0-10 A. The driver's
channels are objects (``hmp.ch1``, ``hmp.channels[0]``, ``hmp.channel(n)``), as QCoDeS models
multi-channel instruments; each selects its channel before every command it sends.

At connect each driver sets the instrument's own protection to the configured maxima (the
2400's compliance and OVP, the HMP's per-channel OVP) and lowers any setpoint above them, so
the limits hold even for commands that do not come through this driver.
"""

from __future__ import annotations

from functools import cached_property
from typing import ClassVar

from drivers.base import (
    ON_OFF,
    InstrumentError,
    LimitError,
    ProtocolError,
    Range,
    ScpiInstrument,
    Setting,
    parse_bool,
)

#: Over-voltage protection levels of the 2400 series (V); above 160 V only NONE exists.
_K2400_OVP_LEVELS_V = (20.0, 40.0, 60.0, 80.0, 100.0, 120.0, 160.0)


class Keithley2400(ScpiInstrument):
    """Keithley 2400 SourceMeter used as a voltage source with current compliance."""

    MODEL = "Keithley 2400"
    KIND = "dc_source"
    IDN_PATTERN = r"KEITHLEY INSTRUMENTS INC\.,MODEL 2400,"
    INTERFACES = ("GPIB",)
    HARD_LIMITS: ClassVar = {"voltage_v": Range(-210.0, 210.0, "V"),
                             "current_a": Range(0.0, 1.05, "A")}

    source_voltage_v = Setting("SOUR:VOLT:LEV?", "SOUR:VOLT:LEV {}", unit="V",
                               limit="voltage_v", fmt="{:.6f}", doc="source voltage")
    compliance_current_a = Setting("SENS:CURR:PROT?", "SENS:CURR:PROT {}", unit="A",
                                   limit="current_a", fmt="{:.9f}", doc="current compliance")
    output_enabled = Setting("OUTP?", "OUTP {}", choices=ON_OFF, parse=parse_bool,
                             doc="source output state")

    def _configure(self) -> None:
        super()._configure()
        vmax = max(abs(self.limits["voltage_v"].min), abs(self.limits["voltage_v"].max))
        level = next((lv for lv in _K2400_OVP_LEVELS_V if lv >= vmax), None)
        self.set(f"SOUR:VOLT:PROT {level:.0f}" if level is not None else "SOUR:VOLT:PROT NONE")
        if level is not None and abs(self.query_float("SOUR:VOLT:PROT?") - level) > 1e-6:
            raise InstrumentError(f"over-voltage protection did not take the value {level:g} V",
                                  instrument=self.describe())
        if self.compliance_current_a > self.limits["current_a"].max:
            self.compliance_current_a = self.limits["current_a"].max
        setpoint = self.source_voltage_v
        if setpoint not in self.limits["voltage_v"]:
            self.source_voltage_v = 0.0 if 0.0 in self.limits["voltage_v"] else \
                self.limits["voltage_v"].min

    def configure_voltage_source(self, compliance_current_a: float) -> None:
        """Source volts, measure current, with the given compliance (checked first)."""
        command = type(self).compliance_current_a.command_for(self, compliance_current_a)
        self.set("SOUR:FUNC VOLT")
        self.set("SOUR:VOLT:MODE FIX")
        self.set("SENS:FUNC 'CURR'")
        self.set(command)
        self.set("FORM:ELEM VOLT,CURR")

    def measure(self) -> tuple[float, float]:
        """(voltage_v, current_a) from one ``READ?``."""
        reply = self.query("READ?")
        try:
            voltage, current = (float(x) for x in reply.split(",")[:2])
        except ValueError:
            raise ProtocolError(f"cannot read voltage,current from {reply!r}",
                                instrument=self.describe(), command="READ?") from None
        return voltage, current

    def safe_shutdown(self) -> None:
        """Output off (sent first), confirmed, then the setpoint back to 0 V."""
        self.write("OUTP OFF")
        if self.output_enabled:
            raise InstrumentError("output still reads ON after OUTP OFF",
                                  instrument=self.describe())
        if 0.0 in self.limits["voltage_v"]:
            self.write("SOUR:VOLT:LEV 0.000000")
        self.report_errors(after="OUTP OFF")

    def status(self) -> str:
        state = "ON" if self.output_enabled else "off"
        return (f"output {state}, {self.source_voltage_v:g} V, compliance "
                f"{self.compliance_current_a:g} A")


class Keithley2401(Keithley2400):
    """Keithley 2401 (the 20 V, 1 A member of the 2400 series)."""

    MODEL = "Keithley 2401"
    IDN_PATTERN = r"KEITHLEY INSTRUMENTS INC\.,MODEL 2401,"
    HARD_LIMITS: ClassVar = {"voltage_v": Range(-21.0, 21.0, "V"),
                             "current_a": Range(0.0, 1.05, "A")}


class HMP4040Channel:
    """One output channel of an HMP4040 (``hmp.channels[0]`` is ``hmp.ch1``).

    Every command selects the channel first (``INST:NSEL n``), since the HMP applies
    ``VOLT``, ``CURR``, ``OUTP`` and ``MEAS`` to the selected channel. The channel shares its
    supply's transport, its limits (one set for all four channels, checked before anything is
    sent) and its error handling: each setting is followed by the supply's error check, and an
    exception inside the supply's ``with`` block switches every output off.
    """

    def __init__(self, supply: RohdeSchwarzHMP4040, number: int) -> None:
        self.supply = supply
        self.number = number

    def __repr__(self) -> str:
        return f"<{self.supply.describe()} channel {self.number}>"

    def select(self) -> None:
        """Make this channel the target of the following channel commands."""
        self.supply.set(f"INST:NSEL {self.number}")

    def _set_checked(self, limit: str, header: str, value: float) -> None:
        """``header value`` (3 decimals) to this channel, ``value`` checked against ``limit``
        before anything is sent."""
        checked = self.supply.limits[limit].check(f"{limit} (channel {self.number})", value,
                                                  instrument=self.supply.describe())
        self.select()
        self.supply.set(f"{header} {checked:.3f}")

    def _query_float(self, query: str) -> float:
        self.select()
        return self.supply.query_float(query)

    def set_voltage_v(self, voltage_v: float) -> None:
        """Voltage setpoint (1 mV resolution), checked before anything is sent."""
        self._set_checked("voltage_v", "VOLT", voltage_v)

    def voltage_v(self) -> float:
        """Voltage setpoint as the supply reads it back."""
        return self._query_float("VOLT?")

    def set_current_a(self, current_a: float) -> None:
        """Current limit (1 mA resolution), checked before anything is sent."""
        self._set_checked("current_a", "CURR", current_a)

    def current_a(self) -> float:
        """Current limit as the supply reads it back."""
        return self._query_float("CURR?")

    def set_output(self, enabled: bool) -> None:
        """Switch this channel's output on or off (the master ``OUTP:GEN`` is not touched)."""
        if not isinstance(enabled, bool):
            raise LimitError(f"enabled must be True or False, got {enabled!r} (channel "
                             f"{self.number}); nothing was sent",
                             instrument=self.supply.describe())
        self.select()
        self.supply.set(f"OUTP {ON_OFF[enabled]}")

    def output_on(self) -> None:
        self.set_output(True)

    def output_off(self) -> None:
        self.set_output(False)

    def output_enabled(self) -> bool:
        self.select()
        return parse_bool(self.supply.query("OUTP?"))

    def measure_voltage_v(self) -> float:
        """Voltage measured at the output terminals."""
        return self._query_float("MEAS:VOLT?")

    def measure_current_a(self) -> float:
        """Current measured through the output."""
        return self._query_float("MEAS:CURR?")


class RohdeSchwarzHMP4040(ScpiInstrument):
    """R&S (Hameg) HMP4040: four isolated 32 V / 10 A channels (thesis 4.5 VCO/amp supply).

    The channels are ``HMP4040Channel`` objects: ``channels`` (``channels[0]`` is channel 1),
    ``ch1`` ... ``ch4``, or ``channel(n)`` for a channel number held in a variable.
    """

    MODEL = "R&S HMP4040"
    KIND = "dc_source"
    IDN_PATTERN = r"(ROHDE&SCHWARZ|HAMEG),HMP4040,"
    INTERFACES = ("USB", "TCPIP", "GPIB")
    CHANNELS: ClassVar[tuple[int, ...]] = (1, 2, 3, 4)
    HARD_LIMITS: ClassVar = {"voltage_v": Range(0.0, 32.0, "V"),
                             "current_a": Range(0.0, 10.0, "A")}

    @cached_property
    def channels(self) -> tuple[HMP4040Channel, ...]:
        """The four channels, in order (``channels[0]`` is channel 1)."""
        return tuple(HMP4040Channel(self, number) for number in self.CHANNELS)

    def channel(self, number: int) -> HMP4040Channel:
        """Channel ``number`` (1-4); ``LimitError`` for any other number, nothing sent."""
        if isinstance(number, bool) or number not in self.CHANNELS:
            raise LimitError(f"channel must be one of {self.CHANNELS}, got {number!r}; "
                             "nothing was sent", instrument=self.describe())
        return self.channels[self.CHANNELS.index(number)]

    @property
    def ch1(self) -> HMP4040Channel:
        return self.channels[0]

    @property
    def ch2(self) -> HMP4040Channel:
        return self.channels[1]

    @property
    def ch3(self) -> HMP4040Channel:
        return self.channels[2]

    @property
    def ch4(self) -> HMP4040Channel:
        return self.channels[3]

    def _configure(self) -> None:
        super()._configure()
        vmax = self.limits["voltage_v"].max
        imax = self.limits["current_a"].max
        for ch in self.channels:
            ch.select()
            self.set(f"VOLT:PROT {vmax:.3f}")
            ovp = self.query_float("VOLT:PROT?")
            if abs(ovp - vmax) > 0.0011:
                raise InstrumentError(f"channel {ch.number} OVP reads {ovp:g} V after setting "
                                      f"{vmax:g} V", instrument=self.describe())
            if self.query_float("VOLT?") > vmax:
                self.set(f"VOLT {vmax:.3f}")
            if self.query_float("CURR?") > imax:
                self.set(f"CURR {imax:.3f}")

    def safe_shutdown(self) -> None:
        """Master output off first, then every channel off, each confirmed by read-back.

        Plain writes (no error check between them), so that one refused command cannot stop
        the remaining channels from being switched off.
        """
        self.write("OUTP:GEN OFF")
        still_on = []
        for channel in self.CHANNELS:
            self.write(f"INST:NSEL {channel}")
            self.write("OUTP OFF")
            if parse_bool(self.query("OUTP?")):
                still_on.append(channel)
        if still_on:
            raise InstrumentError(f"channel(s) {still_on} still read ON after OUTP OFF",
                                  instrument=self.describe())
        self.report_errors(after="OUTP OFF")

    def status(self) -> str:
        parts = []
        for ch in self.channels:
            state = "ON" if ch.output_enabled() else "off"
            parts.append(f"ch{ch.number} {state} {ch.voltage_v():.3f} V")
        return ", ".join(parts)
