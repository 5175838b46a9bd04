"""Issue 20, item 7: one way to open an instrument, and drivers that wait on the lab's clock.

Every driver a ``Lab`` opens waits (polls, settling) and times out on the clock of where it
lives: the virtual world's clock on the virtual bench, the wall clock on a real one. The chip of
the ``lab:`` backend is opened through a ``Lab`` too, so its exchanges are recorded like every
other instrument's, and closing the backend closes that lab.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from drivers.base import WALL_CLOCK, InstrumentError, InstrumentTimeout
from drivers.nanovoltmeter import differential_measurement
from drivers.recording import LOG_NAME
from hil.bench.lab import Lab, open_lab, package_root
from hil.chip.backends import InstrumentChipBackend
from hil.errors import ConfigError
from sims.oscillator_device import DeviceConfig

ROOT = package_root()
VIRTUAL = ROOT / "lab_configs" / "virtual.yaml"
CFG = DeviceConfig(n_in=2, n_layers=2, n_hidden=5)


def chip_layers(seed: int = 0, scale: float = 0.3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    N = CFG.n_hidden
    out = []
    for li in range(CFG.n_layers):
        w_int = rng.uniform(-scale, scale, (N, N))
        np.fill_diagonal(w_int, 0.0)
        out.append({"W_ext": rng.uniform(-scale, scale, (N, CFG.n_in if li == 0 else N)),
                    "W_int": w_int, "b": np.full(N, 0.05)})
    return out


def chip_inputs() -> np.ndarray:
    return np.random.default_rng(1).random((2, 6, CFG.n_in))


# --------------------------------------------------------------------------- drivers' clocks


def test_a_lab_gives_each_driver_the_clock_of_where_it_lives(tmp_path: Path):
    """Virtual instruments get the world's clock, one on pyvisa-sim the wall clock."""
    data = yaml.safe_load(VIRTUAL.read_text())
    sim_file = tmp_path / "sim_lab.yaml"
    shutil.copy(ROOT / "sims" / "visa" / "sim_lab.yaml", sim_file)
    data["instruments"]["smb_sim"] = {"driver": "rs_smb100a", "address": "GPIB0::28::INSTR",
                                      "visa_backend": f"{sim_file}@sim"}
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with open_lab(path, instruments=["smb", "smb_sim"], roles=["stage.x"]) as lab:
        assert set(lab.instruments) == {"smb", "smb_sim", "x"}
        assert lab["rf_source"].clock is lab.world.clock
        assert lab["stage.x"].clock is lab.world.clock
        assert lab.instruments["smb_sim"].clock is WALL_CLOCK


def test_open_lab_refuses_an_unknown_instrument_name():
    with pytest.raises(ConfigError, match=r"no instrument named 'nope'; instruments: smb, "):
        open_lab(VIRTUAL, instruments=["nope"])


def test_a_stage_timeout_on_the_virtual_bench_elapses_in_lab_time(monkeypatch):
    """A stalled axis (it never reports the end of its move): the driver polls on the virtual
    clock and gives up once ``timeout_s`` of lab time has passed, in milliseconds of wall time."""
    with open_lab(VIRTUAL, roles=["stage.x"]) as lab:
        x = lab["stage.x"]
        axis = lab.world.instruments["x"].axis
        monkeypatch.setattr(axis, "moving", lambda t_s=None: True)  # stalled
        timeout_s = 30.0
        wall_start = time.perf_counter()
        with lab.clock.stopwatch() as lap, pytest.raises(InstrumentTimeout,
                                                         match=r"still moving after 30 s"):
            x.move_abs_mm(15.0, timeout_s=timeout_s)
        wall_s = time.perf_counter() - wall_start
        assert timeout_s < lap.lab_s < timeout_s + 0.5  # past the deadline, by about one poll
        assert lap.spent_s["sleep"] > timeout_s / 2  # the pauses between polls: lab time
        assert wall_s < 5.0  # no wall-clock waiting (a wall-clock deadline would take 30 s)


def test_settling_waits_of_a_measurement_cost_lab_time_without_a_sleep_argument():
    """``differential_measurement`` waits on the voltmeter's clock unless told otherwise."""
    with open_lab(VIRTUAL, roles=["rf_source", "voltmeter"]) as lab:
        smb, nvm = lab["rf_source"], lab["voltmeter"]
        wall_start = time.perf_counter()
        with lab.clock.stopwatch() as lap:
            differential_measurement(smb, nvm, 2, settle_s=2.0)
        assert lap.spent_s["sleep"] == pytest.approx(2 * 2 * 2.0)  # on, off: 2 waits per pair
        assert time.perf_counter() - wall_start < 4.0  # not 8 s of wall time
        with lab.clock.stopwatch() as lap:
            differential_measurement(smb, nvm, 1, settle_s=2.0, sleep=lambda s: None)
        assert "sleep" not in lap.spent_s  # an explicit sleep still replaces the clock's


# --------------------------------------------------------------------------- the chip backend


def test_the_chip_backend_opens_its_chip_through_a_lab_on_the_virtual_clock():
    with InstrumentChipBackend(VIRTUAL, CFG, seed=3) as be:
        assert isinstance(be.lab, Lab)
        assert be.lab.instruments == {"chip": be.chip}  # only the chip is opened
        assert be.world is be.lab.world and be.chip.clock is be.world.clock


def test_the_chip_backend_records_its_exchanges_when_its_lab_records(tmp_path: Path):
    u = chip_inputs()
    with InstrumentChipBackend(VIRTUAL, CFG, seed=3) as plain:
        plain.upload(chip_layers())
        expected = plain.run(u)
    with InstrumentChipBackend(VIRTUAL, CFG, seed=3, record_to=tmp_path) as be:
        be.upload(chip_layers())
        got = be.run(u)
    # recording changes nothing measured, nor the lab time
    np.testing.assert_array_equal(got.outputs, expected.outputs)
    np.testing.assert_array_equal(got.states, expected.states)
    assert got.device_time_s == expected.device_time_s
    entries = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert entries and {e["instrument"] for e in entries} == {"chip"}
    assert {e["address"] for e in entries} == {"TCPIP0::192.168.1.70::inst0::INSTR"}
    assert any(e["op"] == "query" and e["command"] == "*IDN?" and "OSC-ARRAY" in e["reply"]
               for e in entries)
    raw = [bytes.fromhex(e["command"]) for e in entries if e["op"] == "write_raw"]
    assert any(block.startswith(b"RUN 2,6,") for block in raw)  # the run's binary block
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))


def test_closing_the_chip_backend_closes_its_lab(mocker):
    be = InstrumentChipBackend(VIRTUAL, CFG, seed=0)
    lab_close = mocker.spy(be.lab, "close")
    chip_close = mocker.spy(be.chip, "close")
    be.close()
    lab_close.assert_called_once_with()
    chip_close.assert_called_once_with()  # made safe by the lab
    assert be.lab.instruments == {}
    assert be.describe()["identity"]["idn"]  # what the chip said before it was closed
    be.close()  # twice is harmless
    lab_close.assert_called_once_with()


def test_a_chip_that_refuses_its_configuration_leaves_the_lab_closed(mocker):
    lab_close = mocker.spy(Lab, "close")
    bad = dataclasses.replace(CFG, n_hidden=0)
    with pytest.raises(InstrumentError, match=r"-224.*device.n_hidden"):  # the chip's own error
        InstrumentChipBackend(VIRTUAL, bad, seed=0)
    assert lab_close.call_count == 1
