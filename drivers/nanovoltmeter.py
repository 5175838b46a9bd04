"""Keithley 2182A nanovoltmeter, and the RF on/off differential measurement of thesis 2.6.1.

Commands checked against the Keithley Model 2182/2182A User's Manual (2182A-900-01),
"SCPI Reference Tables" (SENSe and SYSTem command summaries) and "Measurement queries":
``SENSe:CHANnel 1|2`` (SENSe summary, channel select), ``SENSe:FUNCtion 'VOLTage'`` (SENSe
summary, function), ``SENSe:VOLTage:NPLCycles`` (0.01 to 50/60 power-line cycles; SENSe
summary, speed), ``SENSe:VOLTage:CHANnel<n>:RANGe[:UPPer]`` and ``...:RANGe:AUTO`` (channel
1: 10 mV ... 100 V, 120 V the largest expected reading; channel 2: 100 mV ... 10 V; SENSe
summary, range), the digital filter ``SENSe:VOLTage:DFILter:STATe``, ``:COUNt`` (1 to 100)
and ``:TCONtrol MOVing|REPeat`` (SENSe summary, filter), ``READ?`` (trigger and read) and
``FETCh?`` (last reading) ("Measurement queries"), ``SYSTem:ERRor?`` (SYSTem summary; -113
"Undefined header", -222 "Parameter data out of range"). The driver sends the short forms
(upper-case letters of each mnemonic); QCoDeS' and PyMeasure's 2182 drivers spell them alike.

The spin-diode voltage is a small DC voltage riding on offsets and drift, so it is measured
as the difference between a reading with RF on and one with RF off, averaged over ``n_avg``
pairs (thesis section 2.6.1). ``differential_measurement`` switches the RF off on every exit
path, including errors and Ctrl-C.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from drivers.base import (
    ON_OFF,
    WALL_CLOCK,
    Clock,
    LimitError,
    ProtocolError,
    Range,
    ScpiInstrument,
    Setting,
    parse_bool,
)

log = logging.getLogger(__name__)

#: Input limits of the two channels (the largest reading range is 100 V / 10 V; 120 V / 12 V
#: is the maximum "expected reading" the range command accepts).
_CHANNEL_RANGE_V = {1: Range(0.0, 120.0, "V"), 2: Range(0.0, 12.0, "V")}


class Keithley2182A(ScpiInstrument):
    """Keithley 2182A (and 2182) two-channel nanovoltmeter."""

    MODEL = "Keithley 2182A"
    KIND = "voltmeter"
    IDN_PATTERN = r"KEITHLEY INSTRUMENTS INC\.,MODEL 2182A?,"
    INTERFACES = ("GPIB",)
    HARD_LIMITS: ClassVar = {"nplc": Range(0.01, 60.0, "PLC"),
                             "filter_count": Range(1, 100, "readings"),
                             "range_v": Range(0.0, 120.0, "V")}
    #: A reading at NPLC 60 with a 100-reading filter takes ~2 min; keep the default modest
    #: and let the lab configuration raise ``timeout_ms`` for slow settings.
    DEFAULT_TIMEOUT_MS = 10000.0

    channel = Setting("SENS:CHAN?", "SENS:CHAN {}", choices={1: "1", 2: "2"},
                      parse=lambda r: int(float(r)), doc="measurement channel")
    nplc = Setting("SENS:VOLT:NPLC?", "SENS:VOLT:NPLC {}", unit="PLC", limit="nplc",
                   fmt="{:.2f}", doc="integration time in power-line cycles")
    filter_enabled = Setting("SENS:VOLT:DFIL:STAT?", "SENS:VOLT:DFIL:STAT {}", choices=ON_OFF,
                             parse=parse_bool, doc="digital averaging filter on/off")
    filter_count = Setting("SENS:VOLT:DFIL:COUN?", "SENS:VOLT:DFIL:COUN {}", unit="readings",
                           limit="filter_count", fmt="{:d}", parse=lambda r: int(float(r)),
                           doc="readings averaged by the digital filter")
    filter_type = Setting("SENS:VOLT:DFIL:TCON?", "SENS:VOLT:DFIL:TCON {}",
                          choices={"moving": "MOV", "repeat": "REP"},
                          parse=lambda r: {"MOV": "moving", "REP": "repeat"}[r.strip()[:3]],
                          doc="filter type: moving or repeating average")

    def configure_voltage(self, *, channel: int = 1, nplc: float = 5.0,
                          filter_count: int | None = None, range_v: float | None = None) -> None:
        """DC volts on ``channel``; optional digital filter and fixed range (else autorange).

        Every argument is checked before the first command is sent.
        """
        cls = type(self)
        commands = ["SENS:FUNC 'VOLT'", cls.channel.command_for(self, channel),
                    cls.nplc.command_for(self, nplc)]
        if range_v is None:
            commands.append(f"SENS:VOLT:CHAN{channel}:RANG:AUTO ON")
        else:
            commands.append(self._range_command(range_v, channel))
        if filter_count is None:
            commands.append(cls.filter_enabled.command_for(self, False))
        else:
            commands += [cls.filter_count.command_for(self, filter_count),
                         cls.filter_type.command_for(self, "repeat"),
                         cls.filter_enabled.command_for(self, True)]
        for command in commands:
            self.set(command)

    def set_range_v(self, range_v: float, *, channel: int) -> None:
        """Fixed range able to read ``range_v`` volts on ``channel`` (turns autorange off)."""
        self.set(self._range_command(range_v, channel))

    def _range_command(self, range_v: float, channel: int) -> str:
        if channel not in _CHANNEL_RANGE_V:
            raise LimitError(f"channel must be 1 or 2, got {channel!r}; nothing was sent",
                             instrument=self.describe())
        what = f"range_v (channel {channel})"
        value = _CHANNEL_RANGE_V[channel].check(what, range_v, instrument=self.describe())
        self.limits["range_v"].check(what, value, instrument=self.describe())
        return f"SENS:VOLT:CHAN{channel}:RANG {value:.4f}"

    def range_v(self, channel: int) -> float:
        """The range of ``channel`` in volts."""
        return self.query_float(f"SENS:VOLT:CHAN{channel}:RANG?")

    def read_voltage_v(self) -> float:
        """Trigger a reading and return it in volts (``READ?``)."""
        return self._parse_reading(self.query("READ?"), "READ?")

    def fetch_voltage_v(self) -> float:
        """The latest reading in volts, without a new trigger (``FETC?``)."""
        return self._parse_reading(self.query("FETC?"), "FETC?")

    def _parse_reading(self, reply: str, command: str) -> float:
        try:
            return float(reply.split(",")[0])
        except ValueError:
            raise ProtocolError(f"reading {reply!r} is not a number",
                                instrument=self.describe(), command=command) from None

    def safe_shutdown(self) -> None:
        """Nothing to switch off: a voltmeter sources nothing. Kept for the common interface."""

    def status(self) -> str:
        filt = f"filter {self.filter_count}" if self.filter_enabled else "filter off"
        return f"channel {self.channel}, NPLC {self.nplc:g}, {filt}"


# --------------------------------------------------------------------------- thesis 2.6.1


class RfGate(Protocol):
    """Anything that switches the RF reaching the sample: a source, or a switch in front."""

    def output_on(self) -> None: ...

    def output_off(self) -> None: ...


class VoltageReader(Protocol):
    def read_voltage_v(self) -> float: ...


@dataclass(frozen=True)
class DifferentialReading:
    """Result of ``differential_measurement``: the mean of (V_on - V_off) and its spread."""

    mean_v: float
    std_v: float
    n: int
    on_v: tuple[float, ...]
    off_v: tuple[float, ...]

    @property
    def diffs_v(self) -> tuple[float, ...]:
        return tuple(a - b for a, b in zip(self.on_v, self.off_v, strict=True))

    @property
    def sem_v(self) -> float:
        """Standard error of the mean."""
        return self.std_v / self.n ** 0.5


def clock_of(*instruments: Any) -> Clock:
    """The ``clock`` of the first of ``instruments`` that has one (a driver), else the wall
    clock: procedures that wait between instrument calls wait in the instruments' lab time."""
    for instrument in instruments:
        clock = getattr(instrument, "clock", None)
        if isinstance(clock, Clock):
            return clock
    return WALL_CLOCK


def differential_measurement(source: RfGate, voltmeter: VoltageReader, n_avg: int, *,
                             settle_s: float = 0.0,
                             sleep: Callable[[float], None] | None = None) -> DifferentialReading:
    """Spin-diode voltage: RF on, read; RF off, read; difference, averaged ``n_avg`` times.

    The difference removes offsets and slow drift of the DC line (thesis 2.6.1). ``settle_s``
    waits after each switch before reading, on the voltmeter's clock (else the source's, else
    the wall clock; ``sleep`` replaces it). The RF is switched off on every exit path; if
    that itself fails, the original error is kept and the failure is added to it.
    """
    if isinstance(n_avg, bool) or not isinstance(n_avg, int) or n_avg < 1:
        raise ValueError(f"n_avg must be an integer >= 1, got {n_avg!r}")
    if not settle_s >= 0:
        raise ValueError(f"settle_s must be >= 0, got {settle_s!r}")
    if sleep is None:
        sleep = clock_of(voltmeter, source).sleep
    on_v: list[float] = []
    off_v: list[float] = []
    try:
        for _ in range(n_avg):
            source.output_on()
            sleep(settle_s)
            on_v.append(voltmeter.read_voltage_v())
            source.output_off()
            sleep(settle_s)
            off_v.append(voltmeter.read_voltage_v())
    except BaseException as exc:
        try:
            source.output_off()
        except Exception as off_exc:
            log.error("RF could not be switched off after %r: %s", exc, off_exc)
            exc.add_note(f"WARNING: switching the RF off after this error failed: {off_exc}")
        raise
    source.output_off()
    diffs = [a - b for a, b in zip(on_v, off_v, strict=True)]
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return DifferentialReading(statistics.fmean(diffs), std, n_avg, tuple(on_v), tuple(off_v))
