"""Mini-Circuits RC-1SP4T-A18 driver against its pyvisa-sim definition (Telnet socket)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from spy import open_spied as spy_open
from spy import sim_backend

from drivers.base import InstrumentError, InstrumentTimeout, LimitError
from drivers.nanovoltmeter import differential_measurement
from drivers.rf_switch import MiniCircuitsRC1SP4T, SwitchGate

SW = "TCPIP0::192.168.1.50::23::SOCKET"


@pytest.fixture
def sim(tmp_path: Path) -> str:
    return sim_backend(tmp_path)




open_spied = partial(spy_open, MiniCircuitsRC1SP4T, SW)


def test_identity_and_set_and_read_back(sim):
    with MiniCircuitsRC1SP4T.open(SW, sim) as sw:
        assert sw.identity == "MN=RC-1SP4T-A18; SN=11901010123"
        for port in (3, 1, 4, 0):
            sw.port = port
            assert sw.port == port


def test_out_of_limit_requests_are_refused_before_sending(sim):
    sw, log = open_spied(sim, limits={"port": [0, 3]})  # port 4 is not wired on this bench
    with sw:
        before = len(log.entries)
        with pytest.raises(LimitError, match=r"port=4 refused \(allowed \[0, 3\]\)"):
            sw.port = 4
        with pytest.raises(LimitError, match="integer"):
            sw.port = 2.0
        with pytest.raises(LimitError, match="integer"):
            sw.port = True
        assert log.entries[before:] == []


def test_instrument_error_is_raised_with_its_own_message(sim):
    with MiniCircuitsRC1SP4T.open(SW, sim) as sw:
        with pytest.raises(InstrumentError, match=r"switch answered '0' \(failure\) to "
                                                  r"':SP4TA:STATE:7'"):
            sw.set(":SP4TA:STATE:7")  # sent without the driver's check: the switch refuses


def test_timeout(sim):
    with pytest.raises(InstrumentTimeout, match=r"TCPIP0::192.168.1.99::23::SOCKET: no reply to "
                                                r"':MN\?' within 50 ms"):
        MiniCircuitsRC1SP4T.open("TCPIP0::192.168.1.99::23::SOCKET", sim, timeout_ms=50)


def test_close_disconnects_every_port(sim):
    with pytest.raises(RuntimeError):
        with MiniCircuitsRC1SP4T.open(SW, sim) as sw:
            sw.port = 2
            raise RuntimeError("oops")
    with MiniCircuitsRC1SP4T.open(SW, sim) as sw:
        assert sw.port == 0


def test_switch_as_rf_gate_in_a_differential_measurement(sim):
    class Meter:
        def __init__(self, sw: MiniCircuitsRC1SP4T) -> None:
            self.sw = sw

        def read_voltage_v(self) -> float:
            return 3e-6 if self.sw.port == 1 else 1e-6

    with MiniCircuitsRC1SP4T.open(SW, sim) as sw:
        result = differential_measurement(SwitchGate(sw, on_port=1, off_port=4), Meter(sw), 2)
        assert result.mean_v == pytest.approx(2e-6)
        assert sw.port == 4
