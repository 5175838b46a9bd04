"""Record every exchange to a JSON-lines file; replay it through the same driver calls."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_drivers_stages import FakeKDC101

import sims
from drivers.base import InstrumentTimeout
from drivers.nanovoltmeter import Keithley2182A, differential_measurement
from drivers.recording import (
    ExchangeLog,
    RecordingTransport,
    ReplayDivergence,
    ReplaySession,
    read_log,
)
from drivers.stages import ThorlabsKDC101
from hil.bench.lab import load_lab_config, open_lab

ROOT = Path(sims.__file__).resolve().parent.parent
ROLES = ["rf_source", "voltmeter", "stage.x"]


@pytest.fixture
def sim_config(tmp_path: Path) -> Path:
    """lab_configs/sim.yaml pointed at a private copy of the simulated lab."""
    sim_file = tmp_path / "sim_lab.yaml"
    shutil.copy(ROOT / "sims" / "visa" / "sim_lab.yaml", sim_file)
    data = yaml.safe_load((ROOT / "lab_configs" / "sim.yaml").read_text())
    data["visa_backend"] = f"{sim_file}@sim"
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def session(lab, freq_hz: float = 2.0e9):
    """The driver calls of a short measurement; returns everything it read."""
    src, nvm, x = lab["rf_source"], lab["voltmeter"], lab["stage.x"]
    src.apply(freq_hz=freq_hz, power_dbm=-10)
    nvm.configure_voltage(channel=1, nplc=1)
    readings = [nvm.read_voltage_v() for _ in range(3)]
    diff = differential_measurement(src, nvm, n_avg=2)
    x.move_abs_mm(12.5)
    return readings, diff, x.position_mm, src.freq_hz


def test_replay_gives_the_same_readings_without_the_instruments(sim_config, tmp_path):
    config = load_lab_config(sim_config)
    run = tmp_path / "run"
    with open_lab(config, record_to=run, roles=ROLES) as lab:
        recorded = session(lab)
    log_file = run / "instrument_io.jsonl"
    assert log_file.is_file()
    (tmp_path / "sim_lab.yaml").unlink()  # the replay cannot be talking to the simulator

    with open_lab(config, replay=log_file, roles=ROLES) as lab:
        replayed = session(lab)
    lab.replay.assert_complete()
    assert replayed == recorded
    readings = recorded[0]
    assert len(set(readings)) == 3  # the simulator's readings are random: not a coincidence


def test_diverging_replay_shows_expected_and_actual_command(sim_config, tmp_path):
    config = load_lab_config(sim_config)
    with open_lab(config, record_to=tmp_path / "run", roles=ROLES) as lab:
        session(lab, freq_hz=2.0e9)
    with pytest.raises(ReplayDivergence) as info:
        with open_lab(config, replay=tmp_path / "run" / "instrument_io.jsonl", roles=ROLES) as lab:
            session(lab, freq_hz=2.1e9)
    message = str(info.value)
    assert "smb" in message and "diverged at exchange #" in message
    assert "expected: write 'SOUR:FREQ 2000000000.000'" in message
    assert "actual:   write 'SOUR:FREQ 2100000000.000'" in message


def test_skipped_step_and_early_end_are_reported(sim_config, tmp_path):
    config = load_lab_config(sim_config)
    with open_lab(config, record_to=tmp_path / "run", roles=ROLES) as lab:
        session(lab)
    log_file = tmp_path / "run" / "instrument_io.jsonl"
    with pytest.raises(ReplayDivergence) as info:
        with open_lab(config, replay=log_file, roles=ROLES) as lab:
            lab["rf_source"].apply(freq_hz=2.0e9, power_dbm=-10)
            lab["voltmeter"].read_voltage_v()  # the recording configured the meter first
    assert "expected: write \"SENS:FUNC 'VOLT'\"\n  actual:   query 'READ?'" in str(info.value)

    untouched = ReplaySession(log_file)
    with pytest.raises(ReplayDivergence, match=r"ended early: smb: next expected query "
                                               r"'\*IDN\?' \(#1\)"):
        untouched.assert_complete()


def test_log_is_append_only_json_lines_with_timestamps(sim_config, tmp_path):
    config = load_lab_config(sim_config)
    log_file = tmp_path / "io.jsonl"
    with open_lab(config, record_to=log_file, roles=["rf_source"]) as lab:
        lab["rf_source"].freq_hz = 1.5e9
    first = log_file.read_text().splitlines()
    entries = [json.loads(line) for line in first]
    assert {e["instrument"] for e in entries} == {"smb"}
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert all(e["t_start"] <= e["t_end"] for e in entries)
    assert entries[0]["op"] == "query" and entries[0]["command"] == "*IDN?"
    assert entries[0]["reply"].startswith("Rohde&Schwarz,SMB100A")
    assert entries[-1]["op"] == "close"
    assert {"write", "query", "close"} == {e["op"] for e in entries}

    with open_lab(config, record_to=log_file, roles=["rf_source"]) as lab:
        lab["rf_source"].freq_hz = 1.6e9
    lines = log_file.read_text().splitlines()
    assert lines[: len(first)] == first  # appended, never rewritten
    sessions = {e["session"] for e in read_log(log_file)}
    assert len(sessions) == 2
    with pytest.raises(ValueError, match="holds 2 sessions"):
        ReplaySession(log_file)
    second = json.loads(lines[-1])["session"]
    replay = ReplaySession(log_file, session=second)
    with open_lab(config, replay=replay, roles=["rf_source"]) as lab:
        lab["rf_source"].freq_hz = 1.6e9  # what the second session did (the first set 1.5 GHz)
    replay.assert_complete()


def test_a_recorded_timeout_is_replayed_as_a_timeout(tmp_path):
    sim_file = tmp_path / "sim_lab.yaml"
    shutil.copy(ROOT / "sims" / "visa" / "sim_lab.yaml", sim_file)
    log_path = tmp_path / "io.jsonl"
    with ExchangeLog(log_path) as log:
        transport = Keithley2182A.open_transport("GPIB0::30::INSTR", f"{sim_file}@sim", 50)
        with pytest.raises(InstrumentTimeout) as recorded:
            Keithley2182A(RecordingTransport(transport, log, "nvm"))
    entries = read_log(log_path)
    assert entries[0]["error"] == "timeout" and entries[0]["command"] == "*IDN?"
    with pytest.raises(InstrumentTimeout) as replayed:
        Keithley2182A(ReplaySession(log_path).transport("nvm"))
    assert str(replayed.value) == str(recorded.value)
    assert "no reply to '*IDN?' within 50 ms" in str(replayed.value)


def test_binary_apt_session_replays_byte_for_byte(tmp_path):
    log_path = tmp_path / "apt.jsonl"
    with ExchangeLog(log_path) as log:
        stage = ThorlabsKDC101(RecordingTransport(FakeKDC101(), log, "x"),  # type: ignore[arg-type]
                               options={"stage": "Z825B"})
        stage.move_abs_mm(7.25)
        recorded = stage.position_mm
        stage.close()
    replay = ReplaySession(log_path)
    stage = ThorlabsKDC101(replay.transport("x"), options={"stage": "Z825B"})
    stage.move_abs_mm(7.25)
    assert stage.position_mm == recorded
    stage.close()
    replay.assert_complete()

    replay = ReplaySession(log_path)
    stage = ThorlabsKDC101(replay.transport("x"), options={"stage": "Z825B"})
    with pytest.raises(ReplayDivergence, match=r"expected: write_raw '5304060[0-9a-f]+'\n"
                                               r"  actual:   write_raw '5304060"):
        stage.move_abs_mm(7.5)


def test_corrupt_log_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "io.jsonl"
    path.write_text('{"op": "write", "command": "X", "instrument": "a", "session": "s"}\nnot json\n')
    with pytest.raises(ValueError, match=r"io.jsonl:2: not an instrument log entry"):
        read_log(path)
