"""Keithley 2182A on pyvisa-sim, and the RF on/off differential measurement (thesis 2.6.1)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from spy import open_spied as spy_open
from spy import sim_backend

from drivers.base import InstrumentError, InstrumentTimeout, LimitError
from drivers.nanovoltmeter import DifferentialReading, Keithley2182A, differential_measurement
from drivers.rf_source import RohdeSchwarzSMB100A

ADDRESS = "GPIB0::7::INSTR"


@pytest.fixture
def sim(tmp_path: Path) -> str:
    return sim_backend(tmp_path)




open_spied = partial(spy_open, Keithley2182A, ADDRESS)


def test_set_and_read_back(sim):
    with Keithley2182A.open(ADDRESS, sim) as nvm:
        nvm.configure_voltage(channel=2, nplc=1.5, filter_count=20, range_v=0.1)
        assert nvm.channel == 2
        assert nvm.nplc == pytest.approx(1.5)
        assert nvm.filter_enabled is True
        assert nvm.filter_count == 20
        assert nvm.filter_type == "repeat"
        assert nvm.range_v(2) == pytest.approx(0.1)
        nvm.filter_type = "moving"
        assert nvm.filter_type == "moving"
        nvm.channel = 1
        nvm.set_range_v(10.0, channel=1)
        assert nvm.range_v(1) == pytest.approx(10.0)
        readings = [nvm.read_voltage_v() for _ in range(3)]
        assert all(1e-6 <= v <= 3e-6 for v in readings)
        assert 1e-6 <= nvm.fetch_voltage_v() <= 3e-6


def test_out_of_limit_requests_are_refused_before_sending(sim):
    nvm, log = open_spied(sim, limits={"nplc": [1, 10]})
    with nvm:
        before = len(log.entries)
        with pytest.raises(LimitError, match=r"nplc=0.50 PLC|nplc=0.5 PLC"):
            nvm.nplc = 0.5
        with pytest.raises(LimitError, match="nplc"):
            nvm.nplc = 20
        with pytest.raises(LimitError, match="filter_count"):
            nvm.filter_count = 101
        with pytest.raises(LimitError, match="integer"):
            nvm.filter_count = 2.5
        with pytest.raises(LimitError, match="allowed: 1, 2"):
            nvm.channel = 3
        with pytest.raises(LimitError, match=r"range_v \(channel 2\)=50 V refused"):
            nvm.set_range_v(50, channel=2)  # channel 2 reads at most 12 V
        with pytest.raises(LimitError, match="channel must be 1 or 2"):
            nvm.set_range_v(1, channel=0)
        with pytest.raises(LimitError, match="nplc"):  # one bad argument: no command at all
            nvm.configure_voltage(channel=1, nplc=30, filter_count=10)
        with pytest.raises(LimitError, match="filter_count"):
            nvm.configure_voltage(channel=1, nplc=5, filter_count=0)
        assert log.entries[before:] == []


def test_instrument_error_is_raised_with_its_own_message(sim):
    # The driver allows NPLC up to 60 (60 Hz mains); this instrument runs on 50 Hz.
    with Keithley2182A.open(ADDRESS, sim) as nvm:
        with pytest.raises(InstrumentError) as info:
            nvm.nplc = 55
        assert '-222,"Parameter data out of range"' in str(info.value)
        assert "SENS:VOLT:NPLC 55.00" in str(info.value)
        assert nvm.nplc == pytest.approx(5.0)  # unchanged


def test_timeout_names_instrument_and_command(sim):
    with pytest.raises(InstrumentTimeout, match=r"voltmeter \(Keithley 2182A at GPIB0::30::INSTR\)"
                                                r": no reply to '\*IDN\?' within 50 ms"):
        Keithley2182A.open("GPIB0::30::INSTR", sim, timeout_ms=50, name="voltmeter")


# --------------------------------------------------------------------- differential measurement


class FakeSource:
    def __init__(self, events: list[str], fail_on: str | None = None) -> None:
        self.events, self.fail_on, self.on = events, fail_on, False

    def output_on(self) -> None:
        if self.fail_on == "on":
            raise RuntimeError("source refused")
        self.on = True
        self.events.append("on")

    def output_off(self) -> None:
        if self.fail_on == "off":
            raise RuntimeError("cannot switch off")
        self.on = False
        self.events.append("off")


class FakeMeter:
    """Reads offset + drift, plus a signal when the RF is on."""

    def __init__(self, source: FakeSource, events: list[str], signal_v: float = 2e-6,
                 fail_at: int | None = None, exc: BaseException | None = None) -> None:
        self.source, self.events, self.signal_v = source, events, signal_v
        self.fail_at, self.exc, self.n = fail_at, exc, 0

    def read_voltage_v(self) -> float:
        self.n += 1
        if self.n == self.fail_at:
            raise self.exc or OSError("read failed")
        self.events.append("read")
        offset = 5e-6 + 1e-7 * self.n  # offset with drift
        return offset + (self.signal_v + 1e-8 * self.n if self.source.on else 0.0)


def test_differential_measurement_removes_offset_and_drift():
    events: list[str] = []
    source = FakeSource(events)
    result = differential_measurement(source, FakeMeter(source, events), n_avg=3)
    assert isinstance(result, DifferentialReading)
    assert events == ["on", "read", "off", "read"] * 3 + ["off"]
    # diffs: (signal + 1e-8 n_on) - 1e-7 (one drift step between the two readings)
    expected = [2e-6 + 1e-8 * n - 1e-7 for n in (1, 3, 5)]
    assert result.diffs_v == pytest.approx(tuple(expected))
    assert result.mean_v == pytest.approx(sum(expected) / 3)
    assert result.std_v == pytest.approx(2e-8)
    assert result.sem_v == pytest.approx(2e-8 / 3 ** 0.5)
    assert result.n == 3 and source.on is False


@pytest.mark.parametrize("fail_at,exc", [(1, OSError("GPIB")), (2, OSError("GPIB")),
                                         (5, KeyboardInterrupt())])
def test_rf_is_off_on_every_exit_path(fail_at, exc):
    events: list[str] = []
    source = FakeSource(events)
    with pytest.raises(type(exc)):
        differential_measurement(source, FakeMeter(source, events, fail_at=fail_at, exc=exc),
                                 n_avg=4)
    assert source.on is False
    assert events[-1] == "off"


def test_failure_to_switch_off_is_reported_with_the_original_error():
    events: list[str] = []
    source = FakeSource(events, fail_on="off")
    with pytest.raises(RuntimeError, match="cannot switch off"):
        differential_measurement(source, FakeMeter(source, events), n_avg=1)

    events2: list[str] = []
    source2 = FakeSource(events2)
    meter = FakeMeter(source2, events2, fail_at=1, exc=OSError("read failed"))
    source2.fail_on = None
    with pytest.raises(OSError) as info:
        differential_measurement(source2, meter, n_avg=1)
    assert not getattr(info.value, "__notes__", None)  # clean switch-off: no warning added

    events3: list[str] = []
    source3 = FakeSource(events3)
    meter3 = FakeMeter(source3, events3, fail_at=1, exc=OSError("read failed"))

    def broken_off() -> None:
        raise RuntimeError("RF stuck")

    source3.output_off = broken_off  # type: ignore[method-assign]
    with pytest.raises(OSError, match="read failed") as info3:
        differential_measurement(source3, meter3, n_avg=1)
    assert any("RF stuck" in note for note in info3.value.__notes__)


@pytest.mark.parametrize("n_avg", [0, -1, 1.5, True])
def test_n_avg_is_validated(n_avg):
    events: list[str] = []
    source = FakeSource(events)
    with pytest.raises(ValueError, match="n_avg"):
        differential_measurement(source, FakeMeter(source, events), n_avg=n_avg)
    assert events == []


def test_differential_measurement_on_the_simulated_bench(sim):
    with RohdeSchwarzSMB100A.open("GPIB0::28::INSTR", sim) as src, \
            Keithley2182A.open(ADDRESS, sim) as nvm:
        src.apply(freq_hz=2.25e9, power_dbm=-10)
        result = differential_measurement(src, nvm, n_avg=3)
        assert result.n == 3 and len(result.on_v) == len(result.off_v) == 3
        assert all(1e-6 <= v <= 3e-6 for v in result.on_v + result.off_v)
        assert abs(result.mean_v) < 2e-6
        assert src.output_enabled is False
