"""Every command each driver can send, against its pyvisa-sim definition written from the manual.

``ErrorChecking`` sits between a driver and its instrument: after every command the driver
sends it reads the instrument's error state (SCPI ``SYST:ERR?`` until ``0``; the SMC100's
``TE``) and keeps any error with the command that caused it. Each driver's whole API is
exercised (``EXERCISES``) and no error may be queued, no query may go unanswered and every
read-back must match. The second test misspells one command on its way to the instrument,
as a typo in the driver would, and the same exercise must then fail, naming that command.
The last tests check that a value out of an instrument's range queues its range error (SCPI
-222, SMC100 "C", Lake Shore EXE) through ``sims.visa.visa_library``, without patching
pyvisa-sim.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from spy import sim_backend

import sims.visa
from drivers.base import DriverError, Instrument
from drivers.dc_source import Keithley2400, Keithley2401, RohdeSchwarzHMP4040
from drivers.nanovoltmeter import Keithley2182A
from drivers.rf_source import KeysightN5183B, RohdeSchwarzSMB100A
from drivers.rf_switch import MiniCircuitsRC1SP4T, SwitchGate
from drivers.spectrum_analyzer import RohdeSchwarzFSV
from drivers.stages import NewportSMC100


@pytest.fixture
def sim(tmp_path: Path) -> Any:
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
    for ch in psu.channels:
        ch.set_voltage_v(1.5 + ch.number)
        ch.set_current_a(0.05 * ch.number)
        assert ch.voltage_v() == pytest.approx(1.5 + ch.number)
        assert ch.current_a() == pytest.approx(0.05 * ch.number)
        ch.output_on()
        assert ch.output_enabled() is True
        ch.measure_voltage_v()
        ch.measure_current_a()
        ch.output_off()
        assert ch.output_enabled() is False
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


def _run(case: Case, sim: Any, misspell: dict[str, str] | None = None) -> ErrorChecking:
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


# --------------------------------------------------------------------------- range errors

#: (definitions file, address, commands leading up to the refused one, a setting outside the
#: instrument's range, its read-back query, error query, range entry, unknown-header entry,
#: empty-queue reply)
RANGE_CASES = {
    "smb100a": ("sim_lab.yaml", "GPIB0::28::INSTR", [], "SOUR:FREQ 1.000", "SOUR:FREQ?",
                "SYST:ERR?", '-222,"Data out of range"', '-113,"Undefined header"',
                '0,"No error"'),
    "k2400_ovp": ("sim_lab.yaml", "GPIB0::24::INSTR", [], "SOUR:VOLT:PROT 5", "SOUR:VOLT:PROT?",
                  "SYST:ERR?", '-222,"Parameter data out of range"', '-113,"Undefined header"',
                  '0,"No error"'),
    "hmp4040_channel": ("sim_lab.yaml", "USB0::0x0AAD::0x0117::101234::INSTR", ["INST:NSEL 2"],
                        "VOLT 40.000", "VOLT?", "SYST:ERR?", '-222,"Data out of range"',
                        '-113,"Undefined header"', '0,"No error"'),
    "hmp4040_select": ("sim_lab.yaml", "USB0::0x0AAD::0x0117::101234::INSTR", [],
                       "INST:NSEL 5", "INST:NSEL?", "SYST:ERR?", '-222,"Data out of range"',
                       '-113,"Undefined header"', '0,"No error"'),
    "smc100": ("sim_lab.yaml", "ASRL1::INSTR", [], "1PA60.000", "1TP", "1TE", "1TEC", "1TEA",
               "1TE@"),
    "ls425": ("lakeshore_425.yaml", "ASRL7::INSTR", [], "UNIT 7", "UNIT?", "*ESR?", "16", "32",
              "0"),
}


def _open_raw(backend: Any, address: str) -> Any:
    import pyvisa

    res = pyvisa.ResourceManager(backend).open_resource(address)
    res.timeout = 200
    crlf = address.startswith("ASRL")
    res.write_termination = res.read_termination = "\r\n" if crlf else "\n"
    return res


@pytest.mark.parametrize("name", list(RANGE_CASES))
def test_a_value_out_of_range_queues_the_range_error_and_answers_nothing(tmp_path, name):
    file, address, setup, refused, getter, err_q, range_e, command_e, empty = RANGE_CASES[name]
    path = tmp_path / file
    shutil.copy(Path(sims.visa.__file__).with_name(file), path)
    res = _open_raw(sims.visa.visa_library(path), address)
    for command in setup:
        res.write(command)
    assert res.query(err_q) == empty
    before = res.query(getter)
    res.write(refused)
    assert res.query(err_q) == range_e  # not the reply to the setting: it answered nothing
    assert res.query(err_q) == empty
    assert res.query(getter) == before  # the setting did not take
    res.write("NOPE:NOT:A:HEADER 1")
    assert res.query(err_q) == command_e  # an unknown header stays a command error
    assert res.query(err_q) == empty


def test_the_range_error_needs_the_library_not_a_patch_of_pyvisa_sim(tmp_path):
    """pyvisa-sim is used as published: opened as a plain ``@sim`` string, the definitions'
    ``e: range_error`` is sent back as a reply (and nothing is queued)."""
    from pyvisa_sim.channels import Channels
    from pyvisa_sim.component import Component

    path = tmp_path / "sim_lab.yaml"
    shutil.copy(sims.visa.SIM_FILE, path)
    sims.visa.visa_library(path)
    assert Component._match_setters.__module__ == "pyvisa_sim.component"
    assert Channels._match_setters.__module__ == "pyvisa_sim.channels"
    res = _open_raw(f"{path}@sim", "GPIB0::28::INSTR")
    res.write("SOUR:FREQ 1.000")
    assert res.read() == sims.visa.RANGE_ERROR
    assert res.query("SYST:ERR?") == '0,"No error"'


@pytest.mark.parametrize("file", ["sim_lab.yaml", "lakeshore_425.yaml"])
def test_every_ranged_setter_of_a_device_with_a_range_error_names_it(file):
    """A property added without ``e: range_error`` would answer -113 for a value out of range."""
    data = yaml.safe_load(Path(sims.visa.__file__).with_name(file).read_text())
    checked = 0
    for device_name, device in data["devices"].items():
        queues = device.get("error", {}).get("error_queue", [])
        if not any(sims.visa.RANGE_ERROR in q for q in queues):
            continue
        components = [device, *device.get("channels", {}).values()]
        for comp in components:
            for prop_name, prop in comp.get("properties", {}).items():
                if "setter" in prop and prop.get("specs"):
                    assert prop["setter"].get("e") == sims.visa.RANGE_ERROR, \
                        f"{file}: {device_name}.{prop_name} has no 'e: range_error'"
                    checked += 1
    assert checked >= 4
