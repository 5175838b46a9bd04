"""Fast checks of calibration/position.py against synthetic truth (written to kill mutmut's
survivors, scripts/mutation.sh): eq. 4.4's metric by hand, one-hot inputs on a fake generator,
Algorithm 2 finding a known optimum on a fake stage, tracking with its records, and the
tracking CSV (torn lines, resume)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from calibration.chain import ChainDesign
from calibration.position import (
    TRACK_COLUMNS,
    Tracking,
    append_track_row,
    generator_one_hot,
    metric,
    optimise_z,
    read_track_rows,
    track,
)

W = (-0.2, 0.4, 0.3)
FREQS = (1.75e9, 2.25e9, 2.75e9)
DESIGN = ChainDesign("c1", list(FREQS), list(W), [700.0, 900.0, 1100.0], [10.0, -20.0, 14.0], 1e-7, 2.5e-7)
Z_BEST = 20.4


# --------------------------------------------------------------------------- the metric


def test_metric_by_hand() -> None:
    x = np.eye(3)
    v = 1e-6 * np.array(W)
    m, v_max = metric(v, x, W)
    assert m == pytest.approx(0.0, abs=1e-12) and v_max == pytest.approx(1e-6)
    v2 = v + np.array([1e-8, -1e-8, 0.0])  # orthogonal to nothing in particular: by hand
    s = np.array(W)
    vm = float(v2 @ s / (s @ s))
    m, v_max = metric(v2, x, W)
    assert v_max == pytest.approx(vm)
    assert m == pytest.approx(math.sqrt(np.mean((v2 - vm * s) ** 2)) / vm)
    # rescale: an input's value is P / rescale
    rescale = np.array([2.0, 4.0, 0.5])
    m, v_max = metric(v, np.diag(rescale * 3.0), W, rescale)
    assert v_max == pytest.approx(1e-6 / 3.0) and m == pytest.approx(0.0, abs=1e-12)
    m, v_max = metric(v, np.diag(rescale), W)  # without it the powers are the values
    assert m > 0.1
    # one input set (a 1-D row) and a wrong sign
    m, v_max = metric(np.array([2e-7]), np.array([0.0, 1.0, 0.0]), W)
    assert v_max == pytest.approx(5e-7) and m == pytest.approx(0.0, abs=1e-12)
    assert metric(-v, x, W) == (math.inf, pytest.approx(-1e-6))
    assert metric(0 * v, x, W) == (math.inf, 0.0)


# --------------------------------------------------------------------------- a fake bench


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now_s(self) -> float:
        return self.t


class Stage:
    def __init__(self, z: float = 19.0) -> None:
        self.position_mm = z
        self.moves: list[float] = []

    def status(self) -> str:
        return "READY"

    def move_abs_mm(self, z: float) -> None:
        self.moves.append(z)
        self.position_mm = z


class Source:
    def __init__(self) -> None:
        self.on, self.freq_hz, self.dbm = False, 0.0, -100.0

    def apply(self, freq_hz: float, dbm: float) -> None:
        self.freq_hz, self.dbm = freq_hz, dbm

    def output_on(self) -> None:
        self.on = True

    def output_off(self) -> None:
        self.on = False


class Port:
    port = 0


class Voltmeter:
    """With the RF on: power (mW) times a per-frequency sensitivity (the chain's weight, in uV)."""

    def __init__(self, rf: Source) -> None:
        self.rf, self.reads = rf, 0

    def read_voltage_v(self) -> float:
        self.reads += 1
        if not self.rf.on:
            return 3e-6
        k = FREQS.index(self.rf.freq_hz)
        return 3e-6 + 1e-6 * W[k] * 10 ** (self.rf.dbm / 10)


class Bench(dict):
    def __init__(self) -> None:
        self.rf, self.stage, self.clock = Source(), Stage(), Clock()
        super().__init__({"rf_source": self.rf, "voltmeter": Voltmeter(self.rf), "switch": Port(),
                          "source_switch": Port(), "stage.z": self.stage})

    def sleep(self, s: float) -> None:
        self.clock.t += s


def test_generator_one_hot_measures_one_tone_per_set() -> None:
    lab = Bench()
    measure = generator_one_hot(5, FREQS, n_avg=3)
    inputs = np.array([[0.0, 2.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 4.0]])
    v = measure(lab, inputs)
    np.testing.assert_allclose(v, 1e-6 * np.array([2.0 * W[1], 0.5 * W[0], 4.0 * W[2]]), rtol=1e-9)
    assert lab["switch"].port == 5 and lab["voltmeter"].reads == 3 * 3 * 2 and not lab.rf.on
    v = generator_one_hot(5, FREQS)(lab, np.array([0.0, 0.0, 1.0]))  # one set as a row; 4 readings
    np.testing.assert_allclose(v, [1e-6 * W[2]], rtol=1e-9)
    assert lab["voltmeter"].reads == 18 + 4 * 2
    with pytest.raises(ValueError):
        measure(lab, np.array([[1.0, 1.0, 0.0]]))  # two tones at once: not one-hot


# --------------------------------------------------------------------------- Algorithm 2


def chain_measure(lab: Any, inputs_mw: np.ndarray) -> np.ndarray:
    """The chain at stage z: the right weights at Z_BEST, growing misfit away from it, and the
    wrong sign beyond 21 mm (V_max < 0: an infinite metric)."""
    z = lab["stage.z"].position_mm
    s = np.atleast_2d(inputs_mw) @ np.array(W)
    scale = 1e-6 * (1.0 if z < 21.0 else -1.0)
    wrong = np.atleast_2d(inputs_mw) @ np.array([1.0, 0.5, 0.0])
    return scale * s + 2e-6 * (z - Z_BEST) * wrong


def test_optimise_z_finds_the_known_best_position() -> None:
    lab = Bench()
    inputs = np.eye(3)
    opt = optimise_z(lab, DESIGN, chain_measure, inputs, np.ones(3), 19.9, 21.2, n_trials=25, seed=3)
    assert opt.stage_z_mm == pytest.approx(Z_BEST, abs=0.03)
    assert lab.stage.position_mm == opt.stage_z_mm  # left at the best trial, approached from below
    assert lab.stage.moves[-1] == opt.stage_z_mm
    assert len(opt.trials) == 25 and all(19.9 <= z <= 21.2 for z, _ in opt.trials)
    ms = [m for _, m in opt.trials]
    assert opt.m == min(ms) and (opt.stage_z_mm, opt.m) in opt.trials
    assert any(math.isinf(m) for m in ms)  # trials beyond 21 mm: wrong sign, never the best
    best_m, best_v = metric(chain_measure(lab, inputs), inputs, W)
    assert opt.m == pytest.approx(best_m) and opt.v_max_v == pytest.approx(best_v)
    again = optimise_z(Bench(), DESIGN, chain_measure, inputs, np.ones(3), 19.9, 21.2, n_trials=25, seed=3)
    assert again.trials == opt.trials  # seeded
    other = optimise_z(Bench(), DESIGN, chain_measure, inputs, np.ones(3), 19.9, 21.2, n_trials=5, seed=4)
    assert len(other.trials) == 5 and other.trials != opt.trials[:5]
    # the defaults: 25 trials, seed 0
    dflt = optimise_z(Bench(), DESIGN, chain_measure, inputs, np.ones(3), 20.3, 20.5)
    assert len(dflt.trials) == 25
    assert dflt.trials[:4] == optimise_z(Bench(), DESIGN, chain_measure, inputs, np.ones(3), 20.3, 20.5,
                                         n_trials=4, seed=0).trials
    # the rescale reaches the metric: x = P / rescale
    lab = Bench()
    opt2 = optimise_z(lab, DESIGN, chain_measure, 2.0 * inputs, np.full(3, 2.0), 20.3, 20.5,
                      n_trials=6, seed=0)
    assert opt2.v_max_v == pytest.approx(2e-6, rel=0.1)


def test_track_reoptimises_and_records_every_input() -> None:
    lab = Bench()
    run = np.zeros((7, 3))
    run[np.arange(7), [0, 1, 2, 1, 0, 2, 1]] = 1.0
    rows: list[dict[str, Any]] = []
    seen: list[int] = []

    def between(i: int) -> None:
        seen.append(i)
        lab.sleep(10.0)

    t = track(lab, DESIGN, chain_measure, np.eye(3), run, np.ones(3), 20.41, every=3, window_mm=0.02,
              n_trials=6, seed=0, between=between, on_input=rows.append, lab_time_offset_s=100.0)
    assert t.optimised_at == [0, 3, 6] and len(t.z_mm) == len(t.v_max_v) == 3
    assert all(abs(z - Z_BEST) <= 0.03 for z in t.z_mm)
    assert t.input_index == list(range(7)) and seen == list(range(7))
    assert t.lab_time_s == [100.0 + 10.0 * i for i in range(7)]
    assert [r["optimised"] for r in rows] == [True, False, False, True, False, False, True]
    assert [r["input"] for r in rows] == list(range(7)) and [r["m"] for r in rows] == t.input_m
    assert rows[4]["z_mm"] == t.z_mm[1] and rows[4]["v_max_v"] == t.v_max_v[1]
    assert [r["lab_time_s"] for r in rows] == t.lab_time_s
    # each input's misfit: |V - V_max w.x| / V_max at the stage where it was measured
    lab2 = Bench()
    lab2.stage.position_mm = t.z_mm[0]
    v = chain_measure(lab2, run[1][None, :])[0]
    assert t.input_m[1] == pytest.approx(abs(v - t.v_max_v[0] * W[1]) / t.v_max_v[0])
    # resuming at input 4: optimised there whatever ``every`` says, then on schedule
    t2 = track(Bench(), DESIGN, chain_measure, np.eye(3), run, np.ones(3), 20.41, every=3, n_trials=4,
               start=4)
    assert t2.optimised_at == [4, 6] and t2.input_index == [4, 5, 6] and t2.lab_time_s == [0.0] * 3
    # the window: centred on the last optimum
    lab3 = Bench()
    t3 = track(lab3, DESIGN, chain_measure, np.eye(3), run[:1], np.ones(3), 20.0, window_mm=0.05, n_trials=5)
    assert 19.95 <= t3.z_mm[0] <= 20.05
    # the defaults: every 10 inputs, +-15 um, 12 trials seeded 0 (+ the input's index)
    run11 = np.zeros((11, 3))
    run11[:, 1] = 1.0
    t5 = track(Bench(), DESIGN, chain_measure, np.eye(3), run11, np.ones(3), 20.41)
    assert t5.optimised_at == [0, 10]
    first = optimise_z(Bench(), DESIGN, chain_measure, np.eye(3), np.ones(3), 20.395, 20.425, n_trials=12)
    assert t5.z_mm[0] == first.stage_z_mm and t5.v_max_v[0] == first.v_max_v
    z = t5.z_mm[0]
    tenth = optimise_z(Bench(), DESIGN, chain_measure, np.eye(3), np.ones(3), z - 0.015, z + 0.015,
                       n_trials=12, seed=10)
    assert t5.z_mm[1] == tenth.stage_z_mm
    # the rescale divides the run's powers too
    t4 = track(Bench(), DESIGN, chain_measure, 2.0 * np.eye(3), 2.0 * run[:2], np.full(3, 2.0), 20.4,
               n_trials=3, window_mm=0.001)
    v = 2.0 * 1e-6 * W[0] + 2e-6 * (t4.z_mm[0] - Z_BEST) * 2.0
    assert t4.input_m[0] == pytest.approx(abs(v - t4.v_max_v[0] * W[0]) / t4.v_max_v[0])


def test_track_passes_the_rescale_and_default_trials_to_the_optimisation() -> None:
    """The calibration inputs are rescaled too (V_max per x = 1, not per mW), and by default
    each re-optimisation measures the calibration set 12 times (one per Optuna trial)."""
    t = track(Bench(), DESIGN, chain_measure, 2.0 * np.eye(3), 2.0 * np.eye(3)[:1], np.full(3, 2.0),
              20.4, n_trials=3, window_mm=0.001)
    assert t.v_max_v[0] == pytest.approx(2e-6, rel=0.01)  # 2 mW per x = 1: twice the 1 uV per mW
    calls: list[int] = []

    def counting(lab: Any, inputs_mw: np.ndarray) -> np.ndarray:
        calls.append(len(np.atleast_2d(inputs_mw)))
        return chain_measure(lab, inputs_mw)

    run = np.zeros((2, 3))
    run[:, 1] = 1.0
    track(Bench(), DESIGN, counting, np.eye(3), run, np.ones(3), 20.41)
    assert calls == [3] * 12 + [1, 1]  # 12 trials on the 3 calibration sets, then the 2 inputs


# --------------------------------------------------------------------------- the tracking file


def row(i: int, chain: str = "c1", optimised: bool = False) -> dict[str, Any]:
    return {"chain": chain, "input": i, "tone": i % 3, "m": 0.01 * i, "lab_time_s": 10.0 * i,
            "z_mm": 20.0 + 0.125 * i, "v_max_v": 1e-6, "optimised": optimised, "session": 2}


def test_track_rows_round_trip_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "track.csv"
    assert read_track_rows(path) == {}
    path.write_text("")  # empty: the header is written first
    for i in (2, 0, 1):
        append_track_row(path, row(i, optimised=i == 0))
    append_track_row(path, row(0, chain="c2", optimised=True))
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(TRACK_COLUMNS) and len(lines) == 5
    assert lines[1] == "c1,2,2,0.02,20.0,20.25,1e-06,0,2"
    back = read_track_rows(path)
    assert list(back) == ["c1", "c2"]
    assert [r["input"] for r in back["c1"]] == [0, 1, 2]  # in input order
    assert back["c1"][2] == {**row(2), "optimised": False}
    assert back["c2"][0]["optimised"] is True and isinstance(back["c2"][0]["session"], int)
    # a torn last line (a killed writer) is cut off, on disk too; a bad row is skipped
    with path.open("a") as fh:
        fh.write("c1,3,0,0.5,x,20.4,1e-06,0,2\n")
        fh.write("c1,6,0,0.5\n")  # a short row: missing values
        fh.write("c1,4,1,0.04,40.0,20.4")
    back = read_track_rows(path)
    assert [r["input"] for r in back["c1"]] == [0, 1, 2]
    assert path.read_text().endswith("c1,6,0,0.5\n")  # the torn line is gone
    append_track_row(path, row(5))
    assert [r["input"] for r in read_track_rows(path)["c1"]] == [0, 1, 2, 5]
    tr = Tracking.from_rows(read_track_rows(path)["c1"])
    assert tr.optimised_at == [0] and tr.input_index == [0, 1, 2, 5]


def test_reading_a_complete_tracking_file_leaves_it_alone(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a torn last line makes the reader rewrite the file: a complete or empty file is not
    written (a rewrite races the writer, which may append between the read and the write)."""
    path = tmp_path / "track.csv"
    for i in range(3):
        append_track_row(path, row(i))
    writes: list[bytes] = []
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: writes.append(data))
    assert [r["input"] for r in read_track_rows(path)["c1"]] == [0, 1, 2]
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert read_track_rows(empty) == {}
    assert writes == []
    with path.open("a") as fh:
        fh.write("c1,3,0")  # torn: cut back to the last complete line
    read_track_rows(path)
    assert writes == [path.read_bytes()[:-len("c1,3,0")]]
