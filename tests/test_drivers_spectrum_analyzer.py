"""R&S FSV driver against its pyvisa-sim definition."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from spy import open_spied as spy_open
from spy import sim_backend

from drivers.base import InstrumentError, InstrumentTimeout, LimitError
from drivers.spectrum_analyzer import RohdeSchwarzFSV

FSV = "TCPIP0::192.168.1.40::inst0::INSTR"


@pytest.fixture
def sim(tmp_path: Path) -> str:
    return sim_backend(tmp_path)




open_spied = partial(spy_open, RohdeSchwarzFSV, FSV)


def test_set_and_read_back(sim):
    with RohdeSchwarzFSV.open(FSV, sim) as sa:
        sa.center_hz = 2.75e9
        sa.span_hz = 20e6
        sa.rbw_hz = 100e3
        sa.ref_level_dbm = -5.5
        sa.attenuation_db = 25
        assert sa.center_hz == pytest.approx(2.75e9)
        assert sa.span_hz == pytest.approx(20e6)
        assert sa.rbw_hz == pytest.approx(100e3)
        assert sa.ref_level_dbm == pytest.approx(-5.5)
        assert sa.attenuation_db == 25


def test_measure_peak_sweeps_then_reads_the_marker(sim):
    sa, log = open_spied(sim)
    with sa:
        before = len(log.entries)
        freq, power = sa.measure_peak(2.25e9, 10e6, rbw_hz=30e3)
        assert (freq, power) == (pytest.approx(2.2500125e9), pytest.approx(-12.37))
        commands = [e["command"] for e in log.entries[before:] if e["command"] != "SYST:ERR?"]
        assert commands == ["FREQ:CENT 2250000000.000", "FREQ:SPAN 10000000.000",
                            "BAND:RES 30000.000", "INIT:IMM", "*OPC?", "CALC:MARK1:MAX",
                            "CALC:MARK1:X?", "CALC:MARK1:Y?"]


def test_single_sweep_mode_and_minimum_attenuation_at_connect(sim):
    sa, log = open_spied(sim, limits={"attenuation_db": [20, 70]})
    with sa:
        assert "INIT:CONT OFF" in [e["command"] for e in log.entries]
        assert sa.attenuation_db == 20  # the sim started at 10 dB, below the configured minimum


def test_out_of_limit_requests_are_refused_before_sending(sim):
    sa, log = open_spied(sim, limits={"attenuation_db": [10, 70], "freq_hz": [1e9, 4e9]})
    with sa:
        before = len(log.entries)
        with pytest.raises(LimitError, match=r"attenuation_db=5 dB refused \(allowed \[10, 70\]"):
            sa.attenuation_db = 5
        with pytest.raises(LimitError, match="steps in 5 dB"):
            sa.attenuation_db = 12
        with pytest.raises(LimitError, match="center_hz"):
            sa.center_hz = 5e9
        with pytest.raises(LimitError, match="rbw_hz"):  # checked before the centre is sent
            sa.measure_peak(2e9, 1e6, rbw_hz=20e6)
        assert log.entries[before:] == []


def test_instrument_error_is_raised_with_its_own_message(sim):
    # The driver allows the FSV family's 40 GHz; the simulated unit is an FSV-7.
    with RohdeSchwarzFSV.open(FSV, sim) as sa:
        with pytest.raises(InstrumentError, match=r"FREQ:CENT 10000000000.000.*-222,\"Data out "
                                                  r"of range\""):
            sa.center_hz = 10e9


def test_timeout(sim):
    with pytest.raises(InstrumentTimeout, match=r"sa \(R&S FSV at TCPIP0::192.168.1.99::inst0::"
                                                r"INSTR\): no reply to '\*IDN\?'"):
        RohdeSchwarzFSV.open("TCPIP0::192.168.1.99::inst0::INSTR", sim, timeout_ms=50,
                             name="sa")


def test_close_leaves_the_input_attenuated(sim):
    with pytest.raises(RuntimeError):
        with RohdeSchwarzFSV.open(FSV, sim, options={"safe_attenuation_db": 30.0}) as sa:
            sa.attenuation_db = 0
            raise RuntimeError("calibration failed")
    with RohdeSchwarzFSV.open(FSV, sim) as sa:
        assert sa.attenuation_db == 30


def test_safe_attenuation_must_lie_within_the_limits(sim):
    with pytest.raises(LimitError, match="safe_attenuation_db"):
        RohdeSchwarzFSV.open(FSV, sim, options={"safe_attenuation_db": 80.0})
