"""Every command each driver can send, against its pyvisa-sim definition written from the manual.

``ErrorChecking`` sits between a driver and its instrument: after every command the driver
sends it reads the instrument's error state (SCPI ``SYST:ERR?`` until ``0``; the SMC100's
``TE``) and keeps any error with the command that caused it. Each driver's whole API is
exercised (``EXERCISES``) and no error may be queued, no query may go unanswered and every
read-back must match. The second test misspells one command on its way to the instrument,
as a typo in the driver would, and the same exercise must then fail, naming that command.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from spy import sim_backend

from drivers.base import DriverError, Instrument
from drivers.dc_source import Keithley2400, Keithley2401, RohdeSchwarzHMP4040
from drivers.nanovoltmeter import Keithley2182A
from drivers.rf_source import KeysightN5183B, RohdeSchwarzSMB100A
from drivers.rf_switch import MiniCircuitsRC1SP4T, SwitchGate
from drivers.spectrum_analyzer import RohdeSchwarzFSV
from drivers.stages import NewportSMC100


@pytest.fixture
def sim(tmp_path: Path) -> str:
    return sim_backend(tmp_path)


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch):
    monkeypatch.setattr(NewportSMC100, "POLL_S", 0.0)


class UndefinedCommand(AssertionError):
    """The instrument's definition refused a command the driver sent."""


class ErrorChecking:
    """A transport that reads the instrument's error state after every command it passes on
    and stops at the first error (``UndefinedCommand`` naming the command and the error).

    ``protocol``: "scpi" (``SYST:ERR?`` until a ``0`` entry), "smc100" (``<addr>TE``, "@" =
    none), "esr" (``*ESR?``, 0 = none; Lake Shore) or "status" (the instrument answers each set
    with its status; nothing to read). ``misspell``: ``{right: wrong}`` substitutions applied to
    outgoing commands. ``stop=False`` only records the errors (``errors``) and goes on.
    """

    def __init__(self, inner: Any, protocol: str, misspell: dict[str, str] | None = None,
                 stop: bool = True) -> None:
        self.inner = inner
        self.protocol = protocol
        self.misspell = misspell or {}
        self.stop = stop
        self.errors: list[tuple[str, str]] = []
        self.sent: list[str] = []

    @property
    def address(self) -> str:
        return self.inner.address

    @property
    def timeout_ms(self) -> float:
        return self.inner.timeout_ms

    @timeout_ms.setter
    def timeout_ms(self, value: float) -> None:
        self.inner.timeout_ms = value

    def _out(self, command: str) -> str:
        for right, wrong in self.misspell.items():
            command = command.replace(right, wrong)
        self.sent.append(command)
        return command

    def _is_error_query(self, command: str) -> bool:
        if self.protocol == "esr":
            return command == "*ESR?"
        return (command == "SYST:ERR?" if self.protocol == "scpi"
                else bool(re.fullmatch(r"\d+TE", command)))

    def _check(self, command: str) -> None:
        if self.protocol == "status" or self._is_error_query(command):
            return
        before = len(self.errors)
        if self.protocol == "scpi":
            for _ in range(20):
                reply = self.inner.query("SYST:ERR?")
                if int(re.match(r"\s*([+-]?\d+)", reply).group(1)) == 0:
                    break
                self.errors.append((command, reply))
        elif self.protocol == "esr":
            reply = self.inner.query("*ESR?")
            if int(reply) != 0:
                self.errors.append((command, reply))
        else:
            address = re.match(r"\d+", command).group(0)
            reply = self.inner.query(f"{address}TE")
            if reply != f"{address}TE@":
                self.errors.append((command, reply))
        if len(self.errors) > before and self.stop:
            raise UndefinedCommand(f"{command!r}: the instrument reported "
                                   f"{self.errors[before][1]}")

    def write(self, command: str) -> None:
        command = self._out(command)
        self.inner.write(command)
        self._check(command)

    def query(self, command: str) -> str:
        command = self._out(command)
        reply = self.inner.query(command)
        self._check(command)
        return reply

    def clear(self) -> None:
        self.inner.clear()

    def close(self) -> None:
        self.inner.close()


# --------------------------------------------------------------------------- exercises


def _rf_source(src: Any) -> None:
    src.freq_hz = 2.5e9
    assert src.freq_hz == pytest.approx(2.5e9)
    src.power_dbm = -12.5
    assert src.power_dbm == pytest.approx(-12.5)
    src.power_mw = 0.5
    assert src.power_mw == pytest.approx(0.5, rel=1e-3)
    src.apply(freq_hz=2.0e9, power_dbm=-20.0)
    src.output_on()
    assert src.output_enabled is True
    src.output_off()
    assert src.output_enabled is False
    assert "ceiling" in src.status()


def _nanovoltmeter(nvm: Keithley2182A) -> None:
    nvm.configure_voltage(channel=1, nplc=5, filter_count=10, range_v=0.1)
    assert nvm.channel == 1 and nvm.nplc == pytest.approx(5.0)
    assert nvm.filter_enabled is True and nvm.filter_count == 10
    assert nvm.filter_type == "repeat"
    assert nvm.range_v(1) == pytest.approx(0.1)
    nvm.configure_voltage(channel=2, nplc=1)  # autorange, filter off
    assert nvm.channel == 2 and nvm.filter_enabled is False
    nvm.set_range_v(1.0, channel=2)
    assert nvm.range_v(2) == pytest.approx(1.0)
    assert abs(nvm.read_voltage_v()) < 1 and abs(nvm.fetch_voltage_v()) < 1
    assert "channel 2" in nvm.status()


def _sourcemeter(smu: Keithley2400) -> None:
    smu.configure_voltage_source(compliance_current_a=1e-4)
    assert smu.compliance_current_a == pytest.approx(1e-4)
    smu.source_voltage_v = 0.5
    assert smu.source_voltage_v == pytest.approx(0.5)
    smu.output_enabled = True
    assert smu.output_enabled is True
    voltage_v, current_a = smu.measure()
    assert isinstance(voltage_v, float) and isinstance(current_a, float)
    smu.output_enabled = False
    assert "output off" in smu.status()


def _supply(psu: RohdeSchwarzHMP4040) -> None:
    for channel in psu.CHANNELS:
        psu.set_voltage_v(channel, 1.5 + channel)
        psu.set_current_a(channel, 0.05 * channel)
        assert psu.voltage_v(channel) == pytest.approx(1.5 + channel)
        assert psu.current_a(channel) == pytest.approx(0.05 * channel)
        psu.set_output(channel, True)
        assert psu.output_enabled(channel) is True
        psu.measure_voltage_v(channel)
        psu.measure_current_a(channel)
        psu.set_output(channel, False)
    assert "ch4 off" in psu.status()


def _analyser(fsv: RohdeSchwarzFSV) -> None:
    fsv.center_hz = 2.25e9
    fsv.span_hz = 10e6
    fsv.rbw_hz = 10e3
    fsv.ref_level_dbm = -10.0
    fsv.attenuation_db = 20
    assert (fsv.center_hz, fsv.span_hz, fsv.rbw_hz) == (2.25e9, 10e6, 10e3)
    assert fsv.ref_level_dbm == pytest.approx(-10.0) and fsv.attenuation_db == 20
    freq_hz, power_dbm = fsv.measure_peak(2.25e9, 5e6, rbw_hz=30e3)
    assert freq_hz > 0 and power_dbm < 30
    assert "attenuation" in fsv.status()


def _switch(sw: MiniCircuitsRC1SP4T) -> None:
    for port in (3, 1, 4, 2, 0):
        sw.port = port
        assert sw.port == port, f"read back {sw.port} after setting port {port}"
    gate = SwitchGate(sw, on_port=2, off_port=0)
    gate.output_on()
    assert sw.port == 2
    gate.output_off()
    assert sw.status() == "all ports disconnected"


def _stage(x: NewportSMC100) -> None:
    x.home()
    x.velocity_mm_s = 1.5
    assert x.velocity_mm_s == pytest.approx(1.5)
    x.move_abs_mm(12.5)
    assert x.position_mm == pytest.approx(12.5)
    x.move_rel_mm(-2.5)
    assert x.position_mm == pytest.approx(10.0)
    assert x.error_state() == ""
    x.stop()
    assert "READY" in x.status()


@dataclass(frozen=True)
class Case:
    cls: type[Instrument]
    address: str
    protocol: str
    exercise: Callable[[Any], None]
    misspell: dict[str, str]
    kwargs: dict[str, Any] = field(default_factory=dict)


CASES = {
    "smb100a": Case(RohdeSchwarzSMB100A, "GPIB0::28::INSTR", "scpi", _rf_source,
                    {"SOUR:POW:LIM:AMPL": "SOUR:POW:LIMT:AMPL"},
                    {"limits": {"freq_hz": [1e9, 3.2e9], "power_dbm": [-60, 16]}}),
    "n5183b": Case(KeysightN5183B, "TCPIP0::192.168.1.31::inst0::INSTR", "scpi", _rf_source,
                   {"SOUR:POW:USER:ENAB": "SOUR:POW:USER:ENBL"}),
    "k2182a": Case(Keithley2182A, "GPIB0::7::INSTR", "scpi", _nanovoltmeter,
                   {"SENS:VOLT:DFIL:TCON": "SENS:VOLT:DFIL:TCNT"}),
    "k2400": Case(Keithley2400, "GPIB0::24::INSTR", "scpi", _sourcemeter,
                  {"SENS:CURR:PROT": "SENS:CURR:PROTE"}, {"limits": {"voltage_v": [-2, 2]}}),
    "k2401": Case(Keithley2401, "GPIB0::25::INSTR", "scpi", _sourcemeter,
                  {"FORM:ELEM": "FORM:ELEMS"}),
    "hmp4040": Case(RohdeSchwarzHMP4040, "USB0::0x0AAD::0x0117::101234::INSTR", "scpi", _supply,
                    {"VOLT:PROT": "VOLT:PROTT"}, {"limits": {"voltage_v": [0, 20]}}),
    "fsv": Case(RohdeSchwarzFSV, "TCPIP0::192.168.1.40::inst0::INSTR", "scpi", _analyser,
                {"DISP:TRAC:Y:RLEV": "DISP:TRAC:Y:RLVL"}),
    "rc_1sp4t": Case(MiniCircuitsRC1SP4T, "TCPIP0::192.168.1.50::23::SOCKET", "status", _switch,
                     {":SP4TA:STATE": ":SP4T:STATE"}),  # the spelling issue 17 found
    "smc100": Case(NewportSMC100, "ASRL1::INSTR", "smc100", _stage, {"1VA": "1VB"},
                   {"options": {"stage": "LTA-HS"}}),
}


def _run(case: Case, sim: str, misspell: dict[str, str] | None = None) -> ErrorChecking:
    transport = ErrorChecking(case.cls.open_transport(case.address, sim, 200), case.protocol,
                              misspell)
    with case.cls(transport, **case.kwargs) as instrument:
        case.exercise(instrument)
    return transport


@pytest.mark.parametrize("name", list(CASES))
def test_every_driver_command_is_in_the_manual_definition(sim, name):
    transport = _run(CASES[name], sim)
    assert transport.errors == [], f"{name}: the instrument reported errors: {transport.errors}"
    assert transport.sent, "nothing was sent"


@pytest.mark.parametrize("name", list(CASES))
def test_a_misspelt_command_fails_the_definition_test(sim, name):
    case = CASES[name]
    (right, wrong), = case.misspell.items()
    try:
        transport = _run(case, sim, case.misspell)
    except (DriverError, AssertionError) as exc:  # refused, unanswered, or read back wrong
        message = str(exc)
    else:
        assert transport.errors, f"{name}: misspelling {right!r} as {wrong!r} went unnoticed"
        message = repr(transport.errors)
    # the failure names the command: as the driver sent it, or as it went on the wire
    assert right in message or wrong in message, message
