"""RF source drivers (R&S SMB100A, Keysight N5183B) against their pyvisa-sim definitions."""

from __future__ import annotations

from pathlib import Path

import pytest
from spy import open_spied, sim_backend

from drivers.base import IdentityError, InstrumentError, InstrumentTimeout, LimitError
from drivers.nanovoltmeter import Keithley2182A, differential_measurement
from drivers.recording import ExchangeLog, RecordingTransport
from drivers.rf_source import KeysightN5183B, RohdeSchwarzSMB100A

SMB = (RohdeSchwarzSMB100A, "GPIB0::28::INSTR", "SOUR:POW:LIM:AMPL?")
MXG = (KeysightN5183B, "TCPIP0::192.168.1.31::inst0::INSTR", "SOUR:POW:USER:MAX?")


@pytest.fixture
def sim(tmp_path: Path) -> str:
    return sim_backend(tmp_path)




def sent(log: ExchangeLog) -> list[str]:
    return [e["command"] for e in log.entries]


@pytest.mark.parametrize("cls,address,ceiling_query", [SMB, MXG])
def test_set_and_read_back(sim, cls, address, ceiling_query):
    with cls.open(address, sim, limits={"power_dbm": [-50, 10]}) as src:
        src.freq_hz = 2.25e9
        src.power_dbm = -7.25
        assert src.freq_hz == pytest.approx(2.25e9)
        assert src.power_dbm == pytest.approx(-7.25)
        src.power_mw = 0.5
        assert src.power_dbm == pytest.approx(-3.01, abs=0.005)
        assert src.power_mw == pytest.approx(0.5, rel=2e-3)
        src.apply(freq_hz=1.75e9, power_dbm=-20)
        assert (src.freq_hz, src.power_dbm) == (pytest.approx(1.75e9), pytest.approx(-20))
        src.output_on()
        assert src.output_enabled is True
        src.output_off()
        assert src.output_enabled is False


@pytest.mark.parametrize("cls,address,ceiling_query", [SMB, MXG])
def test_instrument_level_ceiling_is_set_at_connect(sim, cls, address, ceiling_query):
    src, log = open_spied(cls, address, sim, limits={"power_dbm": [-50, 7.5]})
    with src:
        assert float(src.query(ceiling_query)) == pytest.approx(7.5)
        assert any(c.startswith(ceiling_query[:-1] + " 7.50") for c in sent(log))


@pytest.mark.parametrize("cls,address,ceiling_query", [SMB, MXG])
def test_out_of_limit_requests_are_refused_before_sending(sim, cls, address, ceiling_query):
    src, log = open_spied(cls, address, sim, limits={"power_dbm": [-50, 10],
                                                     "freq_hz": [1e9, 3e9]})
    with src:
        before = len(log.entries)
        with pytest.raises(LimitError, match=r"power_dbm=10.01 dBm refused \(allowed \[-50, 10\]"):
            src.power_dbm = 10.006  # rounds to 10.01 at the instrument's 0.01 dB resolution
        with pytest.raises(LimitError, match="freq_hz"):
            src.freq_hz = 3.5e9
        with pytest.raises(LimitError, match="power_mw must be > 0"):
            src.power_mw = 0
        with pytest.raises(LimitError):
            src.power_mw = 11.0  # 10.4 dBm
        with pytest.raises(LimitError):  # nothing at all when one of the two is wrong
            src.apply(freq_hz=2e9, power_dbm=20)
        with pytest.raises(LimitError, match="allowed: True, False"):
            src.output_enabled = "yes"
        assert len(log.entries) == before, sent(log)[before:]
        src.power_dbm = 10.004  # rounds to 10.00: allowed
        assert src.power_dbm == pytest.approx(10.0)


def test_config_limits_cannot_loosen_and_nothing_is_sent(sim):
    log = ExchangeLog()
    transport = RecordingTransport(RohdeSchwarzSMB100A.open_transport("GPIB0::28::INSTR", sim),
                                   log, "dut")
    with pytest.raises(LimitError, match=r"beyond what the instrument can do.*\[-145, 30\] dBm"):
        RohdeSchwarzSMB100A(transport, limits={"power_dbm": [-10, 35]})
    assert [e["op"] for e in log.entries] == ["close"]


def test_instrument_error_is_raised_with_its_own_message(sim):
    # The driver allows the model family's 40 GHz; this unit has option B103 (3.2 GHz).
    with RohdeSchwarzSMB100A.open("GPIB0::28::INSTR", sim) as src:
        with pytest.raises(InstrumentError) as info:
            src.freq_hz = 4e9
        message = str(info.value)
        assert '-222,"Data out of range"' in message
        assert "SOUR:FREQ 4000000000.000" in message
        assert "SMB100A at GPIB0::28::INSTR" in message
        src.freq_hz = 3e9  # the queue was emptied: the next set is clean
        assert src.freq_hz == pytest.approx(3e9)


def test_n5183b_limits_follow_the_installed_options(sim):
    # No limits in the configuration: the unit (option 520, level up to +25 dBm) is narrower
    # than the driver's 40 GHz / +30 dBm, and connecting must still work.
    src, log = open_spied(KeysightN5183B, "TCPIP0::192.168.1.31::inst0::INSTR", sim)
    with src:
        assert "*OPT?" in sent(log)
        assert src.limits["freq_hz"].max == 20e9
        assert (src.limits["power_dbm"].min, src.limits["power_dbm"].max) == (-130.0, 25.0)
        assert src._level_ceiling() == pytest.approx(25.0)  # the ceiling within the unit's range
        before = len(log.entries)
        with pytest.raises(LimitError, match=r"freq_hz=3e\+10 Hz refused \(allowed \[9000, 2e\+10\]"):
            src.freq_hz = 30e9  # option 520 stops at 20 GHz: refused before sending
        assert len(log.entries) == before
        with pytest.raises(InstrumentError, match='-222,"Data out of range"'):
            src.set("SOUR:FREQ 30000000000.000")  # sent anyway: the unit's own error


def test_n5183b_config_limit_outside_the_unit_is_refused_at_connect(sim):
    with pytest.raises(LimitError, match=r"freq_hz \[2.5e\+10, 3e\+10\] Hz lies outside what "
                                         r"frequency option"):
        KeysightN5183B.open("TCPIP0::192.168.1.31::inst0::INSTR", sim,
                            limits={"freq_hz": [25e9, 30e9]})


@pytest.mark.parametrize("cls,address", [(RohdeSchwarzSMB100A, "GPIB0::30::INSTR"),
                                         (KeysightN5183B, "TCPIP0::192.168.1.99::inst0::INSTR")])
def test_timeout_names_instrument_and_command(sim, cls, address):
    with pytest.raises(InstrumentTimeout) as info:
        cls.open(address, sim, timeout_ms=50, name="rf_source")
    message = str(info.value)
    assert f"rf_source ({cls.MODEL} at {address})" in message
    assert "no reply to '*IDN?' within 50 ms" in message


def test_timeout_during_a_session(sim):
    with RohdeSchwarzSMB100A.open("GPIB0::28::INSTR", sim) as src:
        src.timeout_ms = 50
        with pytest.raises(InstrumentTimeout, match=r"no reply to 'SOUR:FREQ:MODE\?' within 50 ms "
                                                    r'\(query\); the instrument reported: '
                                                    r'-113,"Undefined header"'):
            src.query("SOUR:FREQ:MODE?")  # a query this definition does not know
        src.freq_hz = 2e9  # the error was read with the failed query, not blamed on this one


def test_wrong_instrument_at_the_address_is_refused(sim):
    src_log = ExchangeLog()
    transport = RecordingTransport(RohdeSchwarzSMB100A.open_transport("GPIB0::7::INSTR", sim),
                                   src_log, "dut")
    with pytest.raises(IdentityError, match=r"expected a Rohde & Schwarz SMB100A.*MODEL 2182A"):
        RohdeSchwarzSMB100A(transport)
    assert sent(src_log) == ["*IDN?", ""]  # identity query, then close: nothing driven


def test_rf_is_off_after_an_exception_in_a_with_block(sim):
    with pytest.raises(RuntimeError, match="boom"):
        with RohdeSchwarzSMB100A.open("GPIB0::28::INSTR", sim) as src:
            src.power_dbm = -10
            src.output_on()
            assert src.output_enabled
            raise RuntimeError("boom")
    with RohdeSchwarzSMB100A.open("GPIB0::28::INSTR", sim) as again:
        assert again.output_enabled is False


def test_rf_is_off_after_an_exception_inside_a_measurement(sim):
    class FailingVoltmeter:
        def __init__(self, inner: Keithley2182A) -> None:
            self.inner, self.calls = inner, 0

        def read_voltage_v(self) -> float:
            self.calls += 1
            if self.calls == 3:  # RF is on at this point
                raise OSError("GPIB bus error")
            return self.inner.read_voltage_v()

    with RohdeSchwarzSMB100A.open("GPIB0::28::INSTR", sim) as src, \
            Keithley2182A.open("GPIB0::7::INSTR", sim) as nvm:
        meter = FailingVoltmeter(nvm)
        with pytest.raises(OSError, match="GPIB bus error"):
            differential_measurement(src, meter, n_avg=5)
        assert meter.calls == 3
        assert src.output_enabled is False


def test_close_switches_rf_off(sim):
    src = RohdeSchwarzSMB100A.open("GPIB0::28::INSTR", sim)
    src.output_on()
    src.close()
    src.close()  # idempotent
    with KeysightN5183B.open("TCPIP0::192.168.1.31::inst0::INSTR", sim) as other:
        assert other.output_enabled is False
    with RohdeSchwarzSMB100A.open("GPIB0::28::INSTR", sim) as again:
        assert again.output_enabled is False
