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
``MEASure:VOLTage?``/``MEASure:CURRent?``. Each channel: 0-32 V, 0-10 A.

At connect each driver sets the instrument's own protection to the configured maxima (the
2400's compliance and OVP, the HMP's per-channel OVP) and lowers any setpoint above them, so
the limits hold even for commands that do not come through this driver.
"""

from __future__ import annotations

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


class RohdeSchwarzHMP4040(ScpiInstrument):
    """R&S (Hameg) HMP4040: four isolated 32 V / 10 A channels (thesis 4.5 VCO/amp supply)."""

    MODEL = "R&S HMP4040"
    KIND = "dc_source"
    IDN_PATTERN = r"(ROHDE&SCHWARZ|HAMEG),HMP4040,"
    INTERFACES = ("USB", "TCPIP", "GPIB")
    CHANNELS: ClassVar[tuple[int, ...]] = (1, 2, 3, 4)
    HARD_LIMITS: ClassVar = {"voltage_v": Range(0.0, 32.0, "V"),
                             "current_a": Range(0.0, 10.0, "A")}

    def _channel(self, channel: int) -> int:
        if isinstance(channel, bool) or channel not in self.CHANNELS:
            raise LimitError(f"channel must be one of {self.CHANNELS}, got {channel!r}; "
                             "nothing was sent", instrument=self.describe())
        return channel

    def select(self, channel: int) -> None:
        """Make ``channel`` the target of the following channel commands."""
        self.set(f"INST:NSEL {self._channel(channel)}")

    def set_voltage_v(self, channel: int, voltage_v: float) -> None:
        """Voltage setpoint of ``channel`` (1 mV resolution), checked before anything is sent."""
        self._channel(channel)
        value = self.limits["voltage_v"].check(f"voltage_v (channel {channel})", voltage_v,
                                               instrument=self.describe())
        self.select(channel)
        self.set(f"VOLT {value:.3f}")

    def voltage_v(self, channel: int) -> float:
        self.select(channel)
        return self.query_float("VOLT?")

    def set_current_a(self, channel: int, current_a: float) -> None:
        """Current limit of ``channel`` (1 mA resolution)."""
        self._channel(channel)
        value = self.limits["current_a"].check(f"current_a (channel {channel})", current_a,
                                               instrument=self.describe())
        self.select(channel)
        self.set(f"CURR {value:.3f}")

    def current_a(self, channel: int) -> float:
        self.select(channel)
        return self.query_float("CURR?")

    def set_output(self, channel: int, enabled: bool) -> None:
        """Switch one channel's output on or off."""
        if not isinstance(enabled, bool):
            raise LimitError(f"enabled must be True or False, got {enabled!r}",
                             instrument=self.describe())
        self.select(channel)
        self.set(f"OUTP {ON_OFF[enabled]}")

    def output_enabled(self, channel: int) -> bool:
        self.select(channel)
        return parse_bool(self.query("OUTP?"))

    def measure_voltage_v(self, channel: int) -> float:
        self.select(channel)
        return self.query_float("MEAS:VOLT?")

    def measure_current_a(self, channel: int) -> float:
        self.select(channel)
        return self.query_float("MEAS:CURR?")

    def _configure(self) -> None:
        super()._configure()
        vmax = self.limits["voltage_v"].max
        imax = self.limits["current_a"].max
        for channel in self.CHANNELS:
            self.select(channel)
            self.set(f"VOLT:PROT {vmax:.3f}")
            ovp = self.query_float("VOLT:PROT?")
            if abs(ovp - vmax) > 0.0011:
                raise InstrumentError(f"channel {channel} OVP reads {ovp:g} V after setting "
                                      f"{vmax:g} V", instrument=self.describe())
            if self.query_float("VOLT?") > vmax:
                self.set(f"VOLT {vmax:.3f}")
            if self.query_float("CURR?") > imax:
                self.set(f"CURR {imax:.3f}")

    def safe_shutdown(self) -> None:
        """Master output off first, then every channel off, each confirmed by read-back."""
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
        for channel in self.CHANNELS:
            state = "ON" if self.output_enabled(channel) else "off"
            parts.append(f"ch{channel} {state} {self.voltage_v(channel):.3f} V")
        return ", ".join(parts)
