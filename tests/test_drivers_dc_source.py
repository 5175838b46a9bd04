"""Keithley 2400 and R&S HMP4040 drivers against their pyvisa-sim definitions."""

from __future__ import annotations

from pathlib import Path

import pytest
from spy import open_spied, sim_backend

from drivers.base import IdentityError, InstrumentError, InstrumentTimeout, LimitError
from drivers.dc_source import Keithley2400, Keithley2401, RohdeSchwarzHMP4040

K2400 = "GPIB0::24::INSTR"
SMUS = pytest.mark.parametrize("cls,address", [(Keithley2400, "GPIB0::24::INSTR"),
                                               (Keithley2401, "GPIB0::25::INSTR")])
HMP = "USB0::0x0AAD::0x0117::101234::INSTR"


@pytest.fixture
def sim(tmp_path: Path) -> str:
    return sim_backend(tmp_path)




# --------------------------------------------------------------------------- Keithley 2400


@SMUS
def test_2400_set_and_read_back(sim, cls, address):
    with cls.open(address, sim, limits={"voltage_v": [-5, 5],
                                               "current_a": [0, 0.01]}) as smu:
        smu.configure_voltage_source(compliance_current_a=0.002)
        assert smu.compliance_current_a == pytest.approx(0.002)
        smu.source_voltage_v = -1.25
        assert smu.source_voltage_v == pytest.approx(-1.25)
        smu.output_enabled = True
        assert smu.output_enabled is True
        assert smu.measure() == (pytest.approx(1.0), pytest.approx(2.5e-5))


def test_2400_protection_is_set_at_connect(sim):
    with Keithley2400.open(K2400, sim, limits={"voltage_v": [-30, 30]}) as smu:
        assert float(smu.query("SOUR:VOLT:PROT?")) == 40  # smallest OVP level >= 30 V
    with Keithley2400.open(K2400, sim, limits={"voltage_v": [-2, 2],
                                               "current_a": [0, 5e-5]}) as smu:
        assert float(smu.query("SOUR:VOLT:PROT?")) == 20
        # the instrument's compliance (1.05e-4 A after reset) was above the limit: lowered
        assert smu.compliance_current_a == pytest.approx(5e-5)


@SMUS
def test_2400_out_of_limit_requests_are_refused_before_sending(sim, cls, address):
    smu, log = open_spied(cls, address, sim, limits={"voltage_v": [-5, 5],
                                                            "current_a": [0, 0.01]})
    with smu:
        before = len(log.entries)
        with pytest.raises(LimitError, match=r"source_voltage_v=5.5 V refused \(allowed \[-5, 5\]"):
            smu.source_voltage_v = 5.5
        with pytest.raises(LimitError, match="compliance_current_a"):
            smu.compliance_current_a = 0.02
        with pytest.raises(LimitError, match="compliance_current_a"):
            smu.configure_voltage_source(compliance_current_a=1.0)
        with pytest.raises(LimitError, match="finite number"):
            smu.source_voltage_v = float("nan")
        assert log.entries[before:] == []


def test_2401_has_the_lower_voltage_range(sim):
    assert Keithley2401.hard_limits()["voltage_v"].max == 21
    assert Keithley2400.hard_limits()["voltage_v"].max == 210
    with Keithley2401.open("GPIB0::25::INSTR", sim) as smu:
        assert float(smu.query("SOUR:VOLT:PROT?")) == 40  # smallest OVP level above 21 V
        with pytest.raises(LimitError, match=r"allowed \[-21, 21\] V"):
            smu.source_voltage_v = 25
    with pytest.raises(LimitError, match="beyond what the instrument can do"):
        Keithley2401.open("GPIB0::25::INSTR", sim, limits={"voltage_v": [-30, 30]})
    with pytest.raises(IdentityError, match="MODEL 2400"):  # a 2400 is not a 2401
        Keithley2401.open(K2400, sim)


@SMUS
def test_2400_instrument_error_is_raised_with_its_own_message(sim, cls, address):
    with cls.open(address, sim) as smu:
        with pytest.raises(InstrumentError, match=r'after .SOUR:VOLT:PROT 5.: -222,"Parameter '
                                                  r'data out of range"'):
            smu.set("SOUR:VOLT:PROT 5")  # not one of the 2400's OVP levels
    with Keithley2401.open("GPIB0::25::INSTR", sim) as smu:
        with pytest.raises(InstrumentError, match="-222"):
            smu.set("SOUR:VOLT:LEV 30.000000")  # beyond the 2401's 21 V, sent unchecked


@SMUS
def test_2400_timeout(sim, cls, address):
    with pytest.raises(InstrumentTimeout, match=rf"{cls.MODEL} at GPIB0::30::INSTR: no reply "
                                                r"to '\*IDN\?'"):
        cls.open("GPIB0::30::INSTR", sim, timeout_ms=50)


@SMUS
def test_2400_output_off_after_exception(sim, cls, address):
    with pytest.raises(ZeroDivisionError):
        with cls.open(address, sim, limits={"voltage_v": [-5, 5]}) as smu:
            smu.source_voltage_v = 3.0
            smu.output_enabled = True
            raise ZeroDivisionError("a bug in the measurement code")
    with cls.open(address, sim) as smu:
        assert smu.output_enabled is False
        assert smu.source_voltage_v == 0.0


# --------------------------------------------------------------------------- HMP4040


def test_hmp_set_and_read_back_per_channel(sim):
    with RohdeSchwarzHMP4040.open(HMP, sim, limits={"voltage_v": [0, 20],
                                                    "current_a": [0, 1]}) as psu:
        psu.set_voltage_v(1, 17.5)
        psu.set_voltage_v(3, 2.5)
        psu.set_current_a(3, 0.25)
        psu.set_output(3, True)
        assert psu.voltage_v(1) == pytest.approx(17.5)
        assert psu.voltage_v(3) == pytest.approx(2.5)
        assert psu.current_a(3) == pytest.approx(0.25)
        assert psu.output_enabled(3) is True
        assert psu.output_enabled(1) is False
        assert psu.measure_voltage_v(3) == pytest.approx(0.0)


def test_hmp_protection_is_set_and_setpoints_lowered_at_connect(sim):
    with RohdeSchwarzHMP4040.open(HMP, sim, limits={"voltage_v": [0, 0.5],
                                                    "current_a": [0, 0.05]}) as psu:
        for channel in psu.CHANNELS:
            psu.select(channel)
            assert float(psu.query("VOLT:PROT?")) == pytest.approx(0.5)
            assert psu.voltage_v(channel) <= 0.5  # the sim starts at 1 V
            assert psu.current_a(channel) <= 0.05  # and 0.1 A


def test_hmp_out_of_limit_requests_are_refused_before_sending(sim):
    psu, log = open_spied(RohdeSchwarzHMP4040, HMP, sim, limits={"voltage_v": [0, 5]})
    with psu:
        before = len(log.entries)
        with pytest.raises(LimitError, match=r"voltage_v \(channel 2\)=5.1 V refused"):
            psu.set_voltage_v(2, 5.1)
        with pytest.raises(LimitError, match=r"channel must be one of \(1, 2, 3, 4\)"):
            psu.set_voltage_v(5, 1.0)
        with pytest.raises(LimitError, match="current_a"):
            psu.set_current_a(1, 12)
        with pytest.raises(LimitError, match="True or False"):
            psu.set_output(1, 1)
        assert log.entries[before:] == []


def test_hmp_instrument_error_is_raised_with_its_own_message(sim):
    with RohdeSchwarzHMP4040.open(HMP, sim) as psu:
        psu.select(2)
        with pytest.raises(InstrumentError, match=r'-222,"Data out of range"'):
            psu.set("VOLT 40.000")  # beyond 32 V, sent without the driver's check


def test_hmp_timeout(sim):
    with pytest.raises(InstrumentTimeout, match=r"R&S HMP4040 at USB0::0x0AAD::0x0117::999999::"
                                                r"INSTR: no reply to '\*IDN\?'"):
        RohdeSchwarzHMP4040.open("USB0::0x0AAD::0x0117::999999::INSTR", sim, timeout_ms=50)


def test_hmp_all_outputs_off_after_exception(sim):
    with pytest.raises(RuntimeError):
        with RohdeSchwarzHMP4040.open(HMP, sim) as psu:
            for channel in (1, 2, 4):
                psu.set_output(channel, True)
            psu.write("OUTP:GEN ON")
            raise RuntimeError("measurement failed")
    with RohdeSchwarzHMP4040.open(HMP, sim) as psu:
        assert [psu.output_enabled(ch) for ch in psu.CHANNELS] == [False] * 4
        assert psu.query("OUTP:GEN?") == "OFF"
