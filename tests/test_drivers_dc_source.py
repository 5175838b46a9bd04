"""Keithley 2400 and R&S HMP4040 drivers against their pyvisa-sim definitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from spy import open_spied, sim_backend

from drivers.base import IdentityError, InstrumentError, InstrumentTimeout, LimitError
from drivers.dc_source import Keithley2400, Keithley2401, RohdeSchwarzHMP4040

K2400 = "GPIB0::24::INSTR"
SMUS = pytest.mark.parametrize("cls,address", [(Keithley2400, "GPIB0::24::INSTR"),
                                               (Keithley2401, "GPIB0::25::INSTR")])
HMP = "USB0::0x0AAD::0x0117::101234::INSTR"


@pytest.fixture
def sim(tmp_path: Path) -> Any:
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


def _sent(log: Any, before: int) -> list[str]:
    """The commands sent since entry ``before``, without the error-queue reads between them."""
    return [e["command"] for e in log.entries[before:] if e["command"] != "SYST:ERR?"]


def test_hmp_channels_are_objects_of_the_supply(sim):
    with RohdeSchwarzHMP4040.open(HMP, sim) as psu:
        assert [ch.number for ch in psu.channels] == [1, 2, 3, 4]
        assert (psu.ch1, psu.ch2, psu.ch3, psu.ch4) == psu.channels
        assert psu.channel(3) is psu.ch3 is psu.channels[2]
        assert all(ch.supply is psu for ch in psu.channels)
        for bad in (0, 5, True, "1", 1.0 + 1e-9):
            with pytest.raises(LimitError, match=r"channel must be one of \(1, 2, 3, 4\)"):
                psu.channel(bad)


def test_hmp_set_and_read_back_per_channel(sim):
    with RohdeSchwarzHMP4040.open(HMP, sim, limits={"voltage_v": [0, 20],
                                                    "current_a": [0, 1]}) as psu:
        psu.ch1.set_voltage_v(17.5)
        psu.ch3.set_voltage_v(2.5)
        psu.ch3.set_current_a(0.25)
        psu.ch3.output_on()
        assert psu.ch1.voltage_v() == pytest.approx(17.5)
        assert psu.ch3.voltage_v() == pytest.approx(2.5)
        assert psu.ch3.current_a() == pytest.approx(0.25)
        assert psu.ch3.output_enabled() is True
        assert psu.ch1.output_enabled() is False
        assert psu.ch3.measure_voltage_v() == pytest.approx(0.0)
        assert psu.ch3.measure_current_a() == pytest.approx(0.0)
        psu.ch3.output_off()
        assert psu.ch3.output_enabled() is False


def test_hmp_each_channel_selects_itself_before_every_command(sim):
    psu, log = open_spied(RohdeSchwarzHMP4040, HMP, sim, limits={"voltage_v": [0, 20]})
    with psu:
        before = len(log.entries)
        psu.ch2.set_voltage_v(3.0)
        psu.channels[3].set_current_a(0.5)
        psu.channel(1).set_output(True)
        psu.ch2.measure_voltage_v()
        psu.ch4.measure_current_a()
        psu.ch1.output_off()
        assert _sent(log, before) == [
            "INST:NSEL 2", "VOLT 3.000",
            "INST:NSEL 4", "CURR 0.500",
            "INST:NSEL 1", "OUTP ON",
            "INST:NSEL 2", "MEAS:VOLT?",
            "INST:NSEL 4", "MEAS:CURR?",
            "INST:NSEL 1", "OUTP OFF"]
        # every setting (the selection included) is followed by the supply's error check
        sets = [e for e in log.entries[before:] if e["op"] == "write"]
        after = [log.entries[log.entries.index(e) + 1]["command"] for e in sets]
        assert after == ["SYST:ERR?"] * len(sets)
        # the selection is the instrument's: another channel's command moved it
        assert psu.query("INST:NSEL?") == "1"
        assert psu.ch2.voltage_v() == pytest.approx(3.0)
        assert psu.ch1.voltage_v() != pytest.approx(3.0)


def test_hmp_protection_is_set_and_setpoints_lowered_at_connect(sim):
    with RohdeSchwarzHMP4040.open(HMP, sim, limits={"voltage_v": [0, 0.5],
                                                    "current_a": [0, 0.05]}) as psu:
        for ch in psu.channels:
            ch.select()
            assert float(psu.query("VOLT:PROT?")) == pytest.approx(0.5)
            assert ch.voltage_v() <= 0.5  # the sim starts at 1 V
            assert ch.current_a() <= 0.05  # and 0.1 A


@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_hmp_out_of_limit_requests_are_refused_before_sending(sim, number):
    psu, log = open_spied(RohdeSchwarzHMP4040, HMP, sim, limits={"voltage_v": [0, 5],
                                                                 "current_a": [0, 2]})
    with psu:
        ch = psu.channel(number)
        before = len(log.entries)
        with pytest.raises(LimitError, match=rf"voltage_v \(channel {number}\)=5.1 V refused"):
            ch.set_voltage_v(5.1)
        with pytest.raises(LimitError, match=rf"current_a \(channel {number}\)=12 A refused"):
            ch.set_current_a(12)
        with pytest.raises(LimitError, match=rf"voltage_v \(channel {number}\).*nan"):
            ch.set_voltage_v(float("nan"))
        with pytest.raises(LimitError, match=rf"True or False, got 1 \(channel {number}\)"):
            ch.set_output(1)
        with pytest.raises(LimitError, match=r"channel must be one of"):
            psu.channel(5).set_voltage_v(1.0)
        assert log.entries[before:] == []
        ch.set_voltage_v(5.0)  # the limit itself is allowed
        assert ch.voltage_v() == pytest.approx(5.0)


def test_hmp_instrument_error_is_raised_with_its_own_message(sim):
    with RohdeSchwarzHMP4040.open(HMP, sim) as psu:
        psu.ch2.select()
        with pytest.raises(InstrumentError, match=r'-222,"Data out of range"'):
            psu.set("VOLT 40.000")  # beyond 32 V, sent without the driver's check
        with pytest.raises(InstrumentError, match=r"INST:NSEL 5.*-222"):
            psu.set("INST:NSEL 5")  # no channel 5


def test_hmp_timeout(sim):
    with pytest.raises(InstrumentTimeout, match=r"R&S HMP4040 at USB0::0x0AAD::0x0117::999999::"
                                                r"INSTR: no reply to '\*IDN\?'"):
        RohdeSchwarzHMP4040.open("USB0::0x0AAD::0x0117::999999::INSTR", sim, timeout_ms=50)


def test_hmp_all_outputs_off_after_exception(sim):
    with pytest.raises(RuntimeError):
        with RohdeSchwarzHMP4040.open(HMP, sim) as psu:
            for ch in (psu.ch1, psu.ch2, psu.ch4):
                ch.output_on()
            psu.write("OUTP:GEN ON")
            raise RuntimeError("measurement failed")
    with RohdeSchwarzHMP4040.open(HMP, sim) as psu:
        assert [ch.output_enabled() for ch in psu.channels] == [False] * 4
        assert psu.query("OUTP:GEN?") == "OFF"


def test_hmp_a_refused_channel_command_switches_every_output_off(sim):
    with pytest.raises(LimitError, match=r"voltage_v \(channel 3\)"):
        with RohdeSchwarzHMP4040.open(HMP, sim, limits={"voltage_v": [0, 5]}) as psu:
            psu.ch1.set_voltage_v(2.0)
            psu.ch1.output_on()
            psu.ch3.output_on()
            psu.ch3.set_voltage_v(6.0)  # over the limit: refused, and the supply made safe
    with RohdeSchwarzHMP4040.open(HMP, sim) as psu:
        assert [ch.output_enabled() for ch in psu.channels] == [False] * 4
