"""R&S FSV signal and spectrum analyser: centre/span/RBW, single sweep, peak marker.

Used to calibrate the multi-channel VCO source in frequency and power (thesis 4.5.2): tune a
channel, sweep around it, read the peak marker. Commands checked against the R&S FSV
Operating Manual, "Remote Control - Commands" (SENSe:FREQuency, SENSe:BANDwidth, INPut,
DISPlay, INITiate, CALCulate:MARKer subsystems; common commands; SYSTem:ERRor):
``[SENSe:]FREQuency:CENTer|SPAN``, ``[SENSe:]BANDwidth[:RESolution]``,
``INPut:ATTenuation`` (0-70 dB in 5 dB steps), ``DISPlay[:WINDow]:TRACe:Y[:SCALe]:RLEVel``,
``INITiate:CONTinuous OFF`` + ``INITiate[:IMMediate]`` and ``*OPC?`` for a complete single
sweep, ``CALCulate:MARKer1:MAXimum[:PEAK]``, ``CALCulate:MARKer1:X?`` and ``:Y?``.

The RF input is the part at risk: a lab configuration can raise the minimum input
attenuation (``limits: {attenuation_db: [10, 70]}``), and closing the driver leaves at least
``safe_attenuation_db`` in front of the mixer.
"""

from __future__ import annotations

from typing import ClassVar

from drivers.base import LimitError, Option, Range, ScpiInstrument, Setting


class RohdeSchwarzFSV(ScpiInstrument):
    """R&S FSV (FSV3 ... FSV40) spectrum analyser."""

    MODEL = "R&S FSV"
    KIND = "spectrum_analyzer"
    IDN_PATTERN = r"Rohde&Schwarz,FSV"
    INTERFACES = ("GPIB", "TCPIP", "USB")
    HARD_LIMITS: ClassVar = {"freq_hz": Range(10.0, 40e9, "Hz"),
                             "span_hz": Range(0.0, 40e9, "Hz"),
                             "rbw_hz": Range(1.0, 10e6, "Hz"),
                             "attenuation_db": Range(0.0, 70.0, "dB"),
                             "ref_level_dbm": Range(-130.0, 30.0, "dBm")}
    OPTIONS: ClassVar = {"safe_attenuation_db": Option(
        float, 10.0, "input attenuation left in place on close (dB, multiple of 5)")}
    DEFAULT_TIMEOUT_MS = 10000.0

    center_hz = Setting("FREQ:CENT?", "FREQ:CENT {}", unit="Hz", limit="freq_hz", fmt="{:.3f}",
                        doc="centre frequency")
    span_hz = Setting("FREQ:SPAN?", "FREQ:SPAN {}", unit="Hz", limit="span_hz", fmt="{:.3f}",
                      doc="frequency span")
    rbw_hz = Setting("BAND:RES?", "BAND:RES {}", unit="Hz", limit="rbw_hz", fmt="{:.3f}",
                     doc="resolution bandwidth")
    ref_level_dbm = Setting("DISP:TRAC:Y:RLEV?", "DISP:TRAC:Y:RLEV {}", unit="dBm",
                            limit="ref_level_dbm", fmt="{:.2f}", doc="reference level")

    @property
    def attenuation_db(self) -> float:
        """RF input attenuation (dB)."""
        return self.query_float("INP:ATT?")

    @attenuation_db.setter
    def attenuation_db(self, value: float) -> None:
        value = self.limits["attenuation_db"].check("attenuation_db", value,
                                                    instrument=self.describe())
        if value % 5:
            raise LimitError(f"attenuation_db={value:g} dB refused: the FSV attenuator steps "
                             "in 5 dB; nothing was sent", instrument=self.describe())
        self.set(f"INP:ATT {value:.1f}")

    def _configure(self) -> None:
        super()._configure()
        safe = self.options["safe_attenuation_db"]
        if safe > self.limits["attenuation_db"].max or safe % 5:
            raise LimitError(f"safe_attenuation_db={safe:g} dB must be a multiple of 5 dB no "
                             f"larger than {self.limits['attenuation_db'].max:g} dB",
                             instrument=self.describe())
        self.set("INIT:CONT OFF")
        if self.attenuation_db < self.limits["attenuation_db"].min:
            self.attenuation_db = self.limits["attenuation_db"].min

    def sweep(self) -> None:
        """One complete sweep (``INIT:IMM`` then ``*OPC?``)."""
        self.write("INIT:IMM")
        self.wait_complete()
        self.check_errors(after="INIT:IMM")

    def peak(self) -> tuple[float, float]:
        """(freq_hz, power_dbm) of the highest point of the last sweep (marker 1)."""
        self.set("CALC:MARK1:MAX")
        return self.query_float("CALC:MARK1:X?"), self.query_float("CALC:MARK1:Y?")

    def measure_peak(self, center_hz: float, span_hz: float,
                     rbw_hz: float | None = None) -> tuple[float, float]:
        """Sweep ``span_hz`` around ``center_hz`` and return the peak (all checked first)."""
        cls = type(self)
        commands = [cls.center_hz.command_for(self, center_hz),
                    cls.span_hz.command_for(self, span_hz)]
        if rbw_hz is not None:
            commands.append(cls.rbw_hz.command_for(self, rbw_hz))
        for command in commands:
            self.set(command)
        self.sweep()
        return self.peak()

    def safe_shutdown(self) -> None:
        """Leave ``safe_attenuation_db`` in front of the mixer and the display sweeping."""
        safe = max(self.options["safe_attenuation_db"], self.limits["attenuation_db"].min)
        self.write(f"INP:ATT {safe:.1f}")
        self.write("INIT:CONT ON")
        self.report_errors(after="INP:ATT")

    def status(self) -> str:
        return (f"centre {self.center_hz / 1e9:.6g} GHz, span {self.span_hz / 1e6:.6g} MHz, "
                f"attenuation {self.attenuation_db:g} dB")
