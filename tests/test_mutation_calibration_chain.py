"""Fast checks of calibration/chain.py against synthetic truth (written to kill mutmut's
survivors, scripts/mutation.sh): the circuit factors, the chain voltage of a reference law known
in closed form, Algorithm 1 meeting its stated target, the layout checks, the design file, and
locating / placing a chain on a fake bench whose chain sits at a known stage position."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from calibration import chain as ch
from calibration.chain import (
    ChainDesign,
    approach_z,
    chain_voltage_v,
    default_blocks,
    design_chain,
    design_chains,
    error_table,
    extract_weights,
    layout_problems,
    locate_chain,
    measure_inputs_v,
    measure_profile_v,
    place_chain,
    read_design,
    synapse_factors,
    virtual_lab_overrides,
    weight_metric,
    write_design,
)

FREQS = (1.75e9, 2.25e9, 2.75e9, 3.25e9)
TARGET = (-0.1322, -0.3949, -0.2745, 0.3621)
WIDTH_UM = 40.0


def z_res_um(freq_hz: np.ndarray) -> np.ndarray:
    """Where the synthetic reference diode resonates: 400 um per GHz from the field zero."""
    return 400.0 * np.asarray(freq_hz, float) / 1e9


def v_ref(freq_hz: np.ndarray, z_mm: np.ndarray) -> np.ndarray:
    """A reference device's voltage: an antisymmetric line in z around the resonance (1 uV)."""
    d = 1e3 * np.asarray(z_mm, float) - z_res_um(freq_hz)
    return 1e-6 * d * WIDTH_UM / (d * d + WIDTH_UM ** 2)


def rescale(freq_hz: np.ndarray) -> np.ndarray:
    return 1.0 + 0.2 * (np.asarray(freq_hz, float) / 1e9 - 2.5)


def design(**kw: Any) -> ChainDesign:
    args = {"v_range_v": 7e-8, **kw}
    return design_chain("c0", v_ref, rescale, list(z_res_um(np.array(FREQS))), FREQS, TARGET, **args)


# --------------------------------------------------------------------------- circuit law


def test_default_blocks_and_synapse_factors() -> None:
    assert default_blocks(4) == [[0, 1], [2, 3]]
    assert default_blocks(9) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert default_blocks(3) == [[0], [1], [2]]
    assert default_blocks(2) == [[0], [1]]
    assert default_blocks(1) == [[0]]
    np.testing.assert_allclose(synapse_factors([[0], [1], [2]]), [1 / 3] * 3)
    np.testing.assert_allclose(synapse_factors([[0, 1], [2, 3]]), [1 / 8] * 4)
    # one single synapse and a block of two: 1 / (1 * 1.5) and 1 / (8 * 1.5), by index
    np.testing.assert_allclose(synapse_factors([[2], [0, 1]]), [1 / 12, 1 / 12, 2 / 3])


def test_chain_voltage_of_a_quadratic_reference_law() -> None:
    """V_ref = f_GHz z^2 (z in mm): each synapse gives -2 z dz f_GHz (um^2 -> mm^2: 1e-6)."""
    def quad(f: np.ndarray, z: np.ndarray) -> np.ndarray:
        return f / 1e9 * z ** 2

    f = np.array([1e9, 2e9])
    z, dz = [100.0, 300.0, 500.0], [10.0, -20.0, 4.0]
    each = np.array([-2 * zi * di * 1e-6 * f / 1e9 for zi, di in zip(z, dz, strict=True)])
    got = chain_voltage_v(quad, rescale, f, z, dz)  # 3 synapses: in series, 1/3 each
    np.testing.assert_allclose(got, each.sum(0) / 3 * rescale(f), rtol=1e-9)
    got = chain_voltage_v(quad, rescale, f, z, dz, blocks=[[0], [1, 2]])
    np.testing.assert_allclose(got, (2 / 3 * each[0] + (each[1] + each[2]) / 12) * rescale(f), rtol=1e-9)
    got = chain_voltage_v(quad, rescale, f, z, dz, blocks=[])  # empty: the default layout
    np.testing.assert_allclose(got, each.sum(0) / 3 * rescale(f), rtol=1e-9)
    got = chain_voltage_v(quad, rescale, 2e9, z, dz)  # a scalar frequency
    assert float(got) == pytest.approx(float(each[:, 1].sum() / 3 * rescale(2e9)))


# --------------------------------------------------------------------------- Algorithm 1


def test_design_meets_its_target_on_the_grid() -> None:
    """On a fine grid (0.02 um) the rounded design meets the target to 1e-3 (measured 3e-4)."""
    d = design(grid_um=0.02)
    assert d.name == "c0" and d.freq_hz == list(FREQS) and d.target_w == list(TARGET)
    assert d.z_um == [700.0, 900.0, 1100.0, 1300.0]
    assert d.v_range_v == 7e-8 and d.v_w1_v == pytest.approx(7e-8 / 0.3949)
    assert d.blocks == [[0, 1], [2, 3]]
    np.testing.assert_allclose(np.array(d.dz_um) / 0.04, np.round(np.array(d.dz_um) / 0.04), atol=1e-9)
    np.testing.assert_allclose(d.predicted_w, TARGET, atol=1e-3)  # the stated target
    again = chain_voltage_v(v_ref, rescale, np.array(FREQS), d.z_um, d.dz_um, d.blocks) / d.v_w1_v
    np.testing.assert_allclose(d.predicted_w, again, rtol=1e-12)
    # this line's weight has the opposite sign of dz, for every synapse alike
    assert [math.copysign(1, x) for x in d.dz_um] == [-math.copysign(1, w) for w in TARGET]
    one = design(grid_um=0.02, passes=1)  # one pass ignores how later synapses change earlier ones
    assert np.abs(np.array(one.predicted_w) - TARGET).max() > 0.01


def test_design_rounds_to_the_lithography_grid() -> None:
    d = design()  # 1 um grid: dz in steps of 2 um
    assert all(x % 2 == 0 for x in d.dz_um)
    np.testing.assert_allclose(d.predicted_w, TARGET, atol=0.03)
    z = [701.3, 899.6, 1100.2, 1299.4]
    d = design_chain("g", v_ref, rescale, z, FREQS, TARGET, v_range_v=7e-8, grid_um=5.0)
    assert d.z_um == [700.0, 900.0, 1100.0, 1300.0]
    assert all(x % 10 == 0 for x in d.dz_um)  # dz on twice the grid
    again = chain_voltage_v(v_ref, rescale, np.array(FREQS), d.z_um, d.dz_um, d.blocks) / d.v_w1_v
    np.testing.assert_allclose(d.predicted_w, again, rtol=1e-12)  # the rounded design's weights
    capped = design(dz_max_um=10.0)  # the bound holds (the target is then missed)
    assert max(abs(x) for x in capped.dz_um) <= 10.0
    assert np.abs(np.array(capped.predicted_w) - TARGET).max() > 0.05


def test_design_chains_lowers_v_range_until_dz_fits() -> None:
    z = list(z_res_um(np.array(FREQS)))
    weights = {"a": TARGET, "b": (0.2, -0.3, 0.25, -0.1)}
    designs = design_chains(v_ref, rescale, z, FREQS, weights, v_range_v=1e-7, dz_max_um=40.0)
    assert [d.name for d in designs] == ["a", "b"]
    v = designs[0].v_range_v
    assert designs[1].v_range_v == v
    k = round(math.log(v / 1e-7) / math.log(0.95))
    assert k >= 1 and v == pytest.approx(1e-7 * 0.95 ** k)
    for d in designs:
        assert max(abs(x) for x in d.dz_um) <= 40.0 and not layout_problems(d)
    # one step higher was not feasible
    prev = [design_chain(n, v_ref, rescale, z, FREQS, w, v_range_v=v / 0.95, dz_max_um=42.0)
            for n, w in weights.items()]
    assert max(abs(x) for d in prev for x in d.dz_um) > 40.0
    # the first V_range is used when it fits
    first = design_chains(v_ref, rescale, z, FREQS, {"a": TARGET}, v_range_v=v, dz_max_um=40.0)
    assert first[0].v_range_v == v
    # a design whose largest |dz| is exactly the bound is accepted
    dmax = max(abs(x) for x in designs[0].dz_um)
    edge = design_chains(v_ref, rescale, z, FREQS, {"a": TARGET}, v_range_v=v, dz_max_um=dmax)
    assert edge[0].v_range_v == v and max(abs(x) for x in edge[0].dz_um) == dmax
    # 60 shrinks at most: 1e-7 * 0.95^60 = 4.61e-9 V
    with pytest.raises(ValueError, match=r"<= 40 um down to V_range 4.61e-09 V"):
        design_chains(v_ref, rescale, z, FREQS, {"a": TARGET}, v_range_v=1e-7, dz_max_um=40.0,
                      min_gap_um=500.0)


# --------------------------------------------------------------------------- layout and files


def chain_of(v: list[float], dz: list[float], name: str = "x") -> ChainDesign:
    return ChainDesign(name, [1e9] * len(v), [0.1] * len(v), [100.0 + x for x in v], dz, 1e-6, 1e-5)


def test_layout_problems_cases() -> None:
    assert layout_problems(chain_of([0.0, 20.0, 40.0], [4.0, -6.0, 2.0])) == []
    # gap exactly the minimum is allowed; one um less is not (per sign column)
    assert layout_problems(chain_of([0.0, 14.0], [0.0, 0.0])) == []
    probs = layout_problems(chain_of([0.0, 13.0], [0.0, 0.0]))
    assert len(probs) == 2 and all("apart" in p for p in probs)
    assert "(sign +1)" in probs[0] and "(sign -1)" in probs[1]
    probs = layout_problems(chain_of([0.0, 20.0, 33.0], [0.0, 0.0, 0.0]))  # the gap is v1 - v0
    assert len(probs) == 2 and all("synapses 1 and 2" in p for p in probs)
    probs = layout_problems(chain_of([0.0, 20.0], [0.0, 12.0]))  # only the +1 column: 14 um
    assert probs == []
    probs = layout_problems(chain_of([0.0, 20.0], [0.0, 14.0]))  # +1 column 13 apart
    assert len(probs) == 1 and "sign +1" in probs[0] and "synapses 0 and 1" in probs[0]
    probs = layout_problems(chain_of([0.0, 20.0], [0.0, -14.0]))  # -1 column 13 apart
    assert len(probs) == 1 and "sign -1" in probs[0]
    # the arguments change the rule
    assert layout_problems(chain_of([0.0, 14.0], [0.0, 0.0]), diode_extent_um=12.0) != []
    assert layout_problems(chain_of([0.0, 14.0], [0.0, 0.0]), min_gap_um=3.5) != []
    assert layout_problems(chain_of([0.0, 30.0], [1.0, 0.0])) != []  # 0.5 um off the grid
    assert layout_problems(chain_of([0.0, 30.0], [1.0, 0.0]), grid_um=0.5) == []
    assert any("grid" in p for p in layout_problems(chain_of([0.0, 30.0], [1.0, 0.0])))
    d = chain_of([0.0, 30.0], [0.0, 0.0])
    d.z_um = [130.0, 100.0]
    assert any("increasing z" in p for p in layout_problems(d))


def test_design_file_round_trip(tmp_path: Path) -> None:
    d = design()
    path = write_design(tmp_path / "d.json", [d], {"map": "synthetic"})
    assert path == tmp_path / "d.json"
    assert path.read_text().startswith('{\n  "format": ')  # indented JSON
    data = json.loads(path.read_text())
    assert data["format"] == "hil chain design v1" and data["meta"] == {"map": "synthetic"}
    c = data["chains"][0]
    assert c["v_um"] == d.v_um() == [0.0, 200.0, 400.0, 600.0]
    assert c["diodes"] == d.diodes() and len(c["diodes"]) == 8
    assert c["spacing_um"] == [200.0, 200.0, 200.0] and c["layout_problems"] == []
    assert data["units"] == {"freq_hz": "Hz", "z_um": "um from the field zero along the gradient",
                             "v_um": "um on the chip along the gradient, from synapse 0",
                             "dz_um": "um, +: reference-sign diode at v - dz/2", "v_range_v": "V",
                             "v_w1_v": "V"}
    back = read_design(path)
    assert back == [d]
    ov = virtual_lab_overrides([d, chain_of([0.0, 30.0], [2.0, -4.0], "y")])
    assert ov["sample"]["placement_mm"] == {"z": pytest.approx(0.7)}
    assert ov["sample"]["devices"]["c0"]["synapses"] == [{"v_um": v, "dz_um": x} for v, x in zip(
        d.v_um(), d.dz_um, strict=True)]
    assert ov["sample"]["devices"]["c0"]["blocks"] == [[0, 1], [2, 3]]
    assert ov["sample"]["devices"]["y"]["synapses"][1] == {"v_um": 30.0, "dz_um": -4.0}
    assert virtual_lab_overrides([d], placement_z_mm=20.5)["sample"]["placement_mm"] == {"z": 20.5}


def test_extract_weights_error_table_and_metric() -> None:
    w, v_max = extract_weights([2e-6, -1e-6, 3e-6], [0.4, -0.2, 0.5])
    assert v_max == pytest.approx((0.8e-6 + 0.2e-6 + 1.5e-6) / 0.45)
    np.testing.assert_allclose(w, np.array([2e-6, -1e-6, 3e-6]) / v_max)
    rows = [{"name": "a", "target_w": [0.1, -0.2], "measured_w": [0.12, -0.17], "v_max_v": 2.5e-6,
             "dz_um": [10, -20], "resistance_ohm": 123.45},
            {"name": "b", "target_w": [0.3, 0.1], "measured_w": [0.3, 0.05], "v_max_v": 2.5005e-3,
             "dz_um": [4, 6]}]
    text, means = error_table(rows)
    assert means == {"a": pytest.approx(2.5), "b": pytest.approx(2.5), "overall": pytest.approx(2.5)}
    lines = text.split("\n")
    assert lines[0] == "a R=123.5 Ohm  (V_max 2.500 uV)" + "        w0        w1"
    assert lines[1] == "  theoretical weights    " + "    0.1000   -0.2000"
    assert lines[2] == "  experimental weights   " + "    0.1200   -0.1700"
    assert lines[3] == "  dw (in % of w=1)       " + "      2.00      3.00"
    assert lines[4] == "  dz (um)                " + "        10       -20"
    assert lines[5] == "b  (V_max 2500.500 uV)" + "        w0        w1"  # exactly 1e6 uV per V
    assert lines[-1] == "mean |dw| (% of w=1): a 2.50, b 2.50, overall 2.50"
    _, means = error_table([{**rows[1], "measured_w": [0.3, 0.0]}, {**rows[1], "name": "c"}])
    assert means["overall"] == pytest.approx(3.75)  # over every weight, not per chain
    m, v_max = weight_metric(np.array([1e-6, 2e-6]), [0.1, 0.2])
    assert m == pytest.approx(0.0, abs=1e-12) and v_max == pytest.approx(1e-5)
    m, v_max = weight_metric(np.array([1e-6, 1e-6]), [0.1, 0.2])
    assert v_max == pytest.approx(0.3e-6 / 0.05)
    assert m == pytest.approx(math.sqrt(((1 / 6 - 0.1) ** 2 + (1 / 6 - 0.2) ** 2) / 2))
    assert weight_metric(np.array([-1e-6, -2e-6]), [0.1, 0.2]) == (math.inf, pytest.approx(-1e-5))
    with np.errstate(invalid="ignore"):  # no signal: V_max 0 (the weights are 0 / 0)
        assert weight_metric(np.array([0.0, 0.0]), [0.1, 0.2]) == (math.inf, 0.0)


# --------------------------------------------------------------------------- a fake bench


class Stage:
    def __init__(self, position_mm: float = 0.0, referenced: bool = True) -> None:
        self.position_mm = position_mm
        self.referenced = referenced
        self.moves: list[float] = []
        self.homed = 0

    def status(self) -> str:
        return "READY" if self.referenced else "READY NOT REFERENCED"

    def home(self) -> None:
        self.homed += 1
        self.referenced = True
        self.position_mm = 0.0

    def move_abs_mm(self, z: float) -> None:
        self.moves.append(z)
        self.position_mm = z


class Source:
    def __init__(self) -> None:
        self.on = False
        self.freq_hz = 0.0
        self.dbm = -100.0
        self.calls: list[tuple[Any, ...]] = []

    def apply(self, freq_hz: float, dbm: float) -> None:
        self.calls.append(("apply", freq_hz, dbm))
        self.freq_hz, self.dbm = freq_hz, dbm

    def output_on(self) -> None:
        self.calls.append(("on",))
        self.on = True

    def output_off(self) -> None:
        self.calls.append(("off",))
        self.on = False


class Port:
    def __init__(self) -> None:
        self.port = 0


class Voltmeter:
    """Offset 5 uV plus, with the RF on, the synthetic chain at the stage's offset from
    ``best_mm`` (the chain moves down the gradient as the stage moves up) times the power."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.reads = 0

    def read_voltage_v(self) -> float:
        self.reads += 1
        b = self.bench
        if b.fail_after is not None and self.reads > b.fail_after:
            raise RuntimeError("voltmeter fault")
        if not b.rf.on or (b.chain_port is not None and b["switch"].port != b.chain_port):
            return 5e-6
        p_mw = 10 ** (b.rf.dbm / 10)
        pickup = b.pickup_v * math.sin(37.0 * b.rf.freq_hz / 1e9)  # RF pickup, fixed per frequency
        shift_um = 1e3 * (b.best_mm - b.stage.position_mm)
        d = b.design
        z = [x + shift_um for x in d.z_um]
        v = chain_voltage_v(v_ref, lambda f: np.ones_like(f), np.array([b.rf.freq_hz]), z, d.dz_um, d.blocks)
        return 5e-6 + float(v[0]) * p_mw + pickup


class Bench(dict):
    """lab[...] instruments and lab.sleep, as the routines use them."""

    def __init__(self, d: ChainDesign, best_mm: float, fail_after: int | None = None,
                 pickup_v: float = 0.0, chain_port: int | None = None) -> None:
        self.design, self.best_mm, self.fail_after, self.pickup_v = d, best_mm, fail_after, pickup_v
        self.chain_port = chain_port  # the switch port the chain is on (None: every port)
        self.rf, self.stage = Source(), Stage(19.0)
        super().__init__({"rf_source": self.rf, "voltmeter": Voltmeter(self), "switch": Port(),
                          "source_switch": Port(), "stage.z": self.stage})
        self.slept: list[float] = []

    def sleep(self, s: float) -> None:
        self.slept.append(s)


def test_approach_z_always_from_below() -> None:
    s = Stage(5.0, referenced=False)
    approach_z(s, 2.0)
    assert s.homed == 1 and s.moves == [2.0]  # homed to 0, then from below
    approach_z(s, 1.0)
    assert s.moves[-2:] == [pytest.approx(0.95), 1.0]
    approach_z(s, 1.0, overshoot_mm=0.2)  # at the target: still from below
    assert s.moves[-2:] == [pytest.approx(0.8), 1.0]
    approach_z(s, 1.0 + 5e-5)  # within 0.1 um above: counts as at it
    assert s.moves[-2:] == [pytest.approx(0.95005), 1.00005]
    n = len(s.moves)
    approach_z(s, 1.0002)  # above: a single move
    assert s.moves[n:] == [1.0002] and s.homed == 1


def test_measure_inputs_and_profile_on_the_fake_bench() -> None:
    d = design()
    bench = Bench(d, best_mm=19.0)
    v = measure_inputs_v(bench, 3, d.freq_hz, [2.0, 1.0, 4.0, 0.5], n_avg=3)
    assert bench["switch"].port == 3 and bench["source_switch"].port == 2
    expect = [float(chain_voltage_v(v_ref, lambda f: np.ones_like(f), np.array([f]), d.z_um, d.dz_um)[0]) * p
              for f, p in zip(d.freq_hz, [2.0, 1.0, 4.0, 0.5], strict=True)]
    np.testing.assert_allclose(v, expect, rtol=1e-9)
    applies = [c for c in bench.rf.calls if c[0] == "apply"]
    assert [a[1] for a in applies] == d.freq_hz
    assert [a[2] for a in applies] == pytest.approx([10 * math.log10(p) for p in (2.0, 1.0, 4.0, 0.5)])
    assert bench.rf.calls[-1] == ("off",) and bench["voltmeter"].reads == 4 * 3 * 2
    assert bench.slept == [0.0] * 24  # the lab's sleep, not the wall clock
    bench = Bench(d, best_mm=19.0)
    measure_inputs_v(bench, 1, d.freq_hz[:1], [1.0], n_avg=1, source_port=None)
    assert bench["source_switch"].port == 0 and bench["switch"].port == 1
    bench = Bench(d, best_mm=19.0)
    measure_inputs_v(bench, 1, d.freq_hz[:1], [1.0])  # 8 on/off pairs by default
    assert bench["voltmeter"].reads == 16
    bench = Bench(d, best_mm=19.0, fail_after=3)
    with pytest.raises(RuntimeError, match="fault"):
        measure_inputs_v(bench, 1, d.freq_hz, [1.0] * 4)
    assert not bench.rf.on
    # a sweep: the offset (RF off, two reads) removed, RF on throughout, off after
    bench = Bench(d, best_mm=19.0)
    f = np.array([1.8e9, 2.6e9, 3.1e9])
    prof = measure_profile_v(bench, 4, f, [1.0, 2.0, 3.0], source_port=1)
    exp = chain_voltage_v(v_ref, lambda x: np.ones_like(x), f, d.z_um, d.dz_um) * np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(prof, exp, rtol=1e-9, atol=1e-18)
    assert bench["switch"].port == 4 and bench["source_switch"].port == 1
    assert bench["voltmeter"].reads == 2 + 3 and not bench.rf.on
    assert bench.rf.calls[:3] == [("off",), ("apply", 1.8e9, 0.0), ("on",)]
    bench = Bench(d, best_mm=19.0)
    measure_profile_v(bench, 4, f, [1.0, 2.0, 3.0], n_off=5, source_port=None)
    assert bench["voltmeter"].reads == 5 + 3 and bench["source_switch"].port == 0
    bench = Bench(d, best_mm=19.0)
    measure_profile_v(bench, 4, f, [1.0, 2.0, 3.0])
    assert bench["source_switch"].port == 2
    bench = Bench(d, best_mm=19.0, fail_after=3)
    with pytest.raises(RuntimeError, match="fault"):
        measure_profile_v(bench, 4, f, [1.0, 2.0, 3.0])
    assert not bench.rf.on


def test_locate_chain_finds_a_known_shift() -> None:
    d = design()
    f = np.arange(1.5e9, 3.5e9 + 1, 25e6)
    for shift_um in (0.0, 135.0, -420.0):
        v = 3.0 * chain_voltage_v(v_ref, rescale, f, [z + shift_um for z in d.z_um], d.dz_um)
        shift_mm, res = locate_chain(v, f, d, v_ref, rescale)
        assert shift_mm == pytest.approx(1e-3 * shift_um, abs=1e-9) and res < 1e-9
    v = chain_voltage_v(v_ref, rescale, f, [z + 60.0 for z in d.z_um], d.dz_um)
    shift_mm, _ = locate_chain(v, f, d, v_ref, rescale, span_mm=0.5, step_mm=0.02)
    assert shift_mm == pytest.approx(0.06, abs=1e-9)
    shift_mm, _ = locate_chain(v, f, d, v_ref, rescale, span_mm=0.05, step_mm=0.01)
    assert shift_mm == pytest.approx(0.05, abs=1e-9)  # the span bounds it
    # the wrong sign fits no positive scale: an infinite residual
    v0 = chain_voltage_v(v_ref, rescale, f, d.z_um, d.dz_um)
    assert locate_chain(-v0, f, d, v_ref, rescale, span_mm=0.0) == (0.0, math.inf)
    # the design's own blocks are used (a series layout is another profile)
    series = ChainDesign(**{**d.__dict__, "blocks": [[0], [1, 2, 3]]})
    vs = chain_voltage_v(v_ref, rescale, f, d.z_um, d.dz_um, series.blocks)
    assert locate_chain(vs, f, series, v_ref, rescale)[1] < 1e-9
    assert locate_chain(vs, f, d, v_ref, rescale)[1] > 1e-3


def test_place_chain_reaches_the_design_position() -> None:
    """Glued 0.3 mm off: the profile step brings the stage to it, the fine scan refines it."""
    d = design()
    d.blocks = [[0, 1], [2, 3]]
    bench = Bench(d, best_mm=20.3, chain_port=2)
    said: list[str] = []
    out = place_chain(bench, 2, d, v_ref, rescale, 1.0,
                      stage_ref_mm=20.0, progress=said.append, fine_step_mm=0.004, fine_span_mm=0.012)
    assert out["stage_z_mm"] == pytest.approx(20.3, abs=1e-3)
    assert bench.stage.position_mm == out["stage_z_mm"]
    assert abs(out["profile_shift_mm"]) < 0.02 and out["profile_residual"] < 1e-6
    assert len(out["fine"]) == 7 and out["fine"][0][0] == pytest.approx(out["fine"][3][0] - 0.012)
    assert said[0].startswith("c0: profile says +300 um from design")
    assert said[-1] == f"c0: best stage z {out['stage_z_mm']:.4f} mm"
    sweep = [c[2] for c in bench.rf.calls if c[0] == "apply"][:82]  # P0 r(f), below the 50 mW cap
    assert max(sweep) == pytest.approx(10 * math.log10(float(rescale(3.5e9))))
    # the fine scan's readings: 4 on/off pairs per frequency by default (2 sweeps of 2 + 81 before)
    bench = Bench(d, best_mm=20.3)
    place_chain(bench, 2, d, v_ref, rescale, 1.0, stage_ref_mm=20.0, fine_span_mm=0.0)
    assert bench["voltmeter"].reads == 2 * (2 + 81) + 4 * 4 * 2
    # the opposite stage direction: the first step goes the other way
    bench = Bench(d, best_mm=20.3)
    said = []
    out = place_chain(bench, 2, d, v_ref, rescale, 1.0, progress=said.append,
                      stage_ref_mm=20.0, direction=1.0, fine_span_mm=0.0)
    assert sum("profile says" in x for x in said) == 4  # four sweeps at most
    assert bench.stage.moves[:3] == pytest.approx([20.0, 19.65, 19.7])  # 20 - 0.3, from below
    assert abs(out["profile_shift_mm"]) > 0.3  # and further away each time


def test_place_chain_searches_when_no_line_is_in_the_band() -> None:
    """Glued 1.2 mm off: the first sweep is RF pickup only (residual > 0.5), so the stage
    looks for the loudest position within +-1.5 mm first, then locates from there."""
    d = design()
    bench = Bench(d, best_mm=21.2, pickup_v=3e-9, chain_port=2)
    said: list[str] = []
    out = place_chain(bench, 2, d, v_ref, rescale, 1.0, stage_ref_mm=20.0, progress=said.append,
                      fine_span_mm=0.0)
    assert said[0] == "c0: no line in the band (residual 0.99); loudest at stage z 21.250 mm"
    assert said[1].startswith("c0: profile says -50 um from design")  # located from the loudest
    assert 21.75 not in bench.stage.moves  # the search ends at +1.5 mm
    searched = [z for z in bench.stage.moves[1:] if abs(round(4 * (z - 18.5)) - 4 * (z - 18.5)) < 1e-9]
    assert searched[:13] == pytest.approx(np.arange(18.5, 21.51, 0.25))  # the search grid
    assert out["stage_z_mm"] == pytest.approx(21.2, abs=0.003)
    assert out["profile_residual"] < 0.5
    said = []
    bench = Bench(d, best_mm=21.2, pickup_v=3e-9)  # search off: no sweep between the 4 located ones
    place_chain(bench, 2, d, v_ref, rescale, 1.0, stage_ref_mm=20.0, search_mm=0.0, fine_span_mm=0.0,
                progress=said.append)
    assert not any("no line" in x for x in said)
    said = []
    bench = Bench(d, best_mm=21.2, pickup_v=3e-9, chain_port=2)  # a narrower search: +-0.75 mm
    place_chain(bench, 2, d, v_ref, rescale, 1.0, stage_ref_mm=20.0, search_mm=0.75, fine_span_mm=0.0,
                progress=said.append)
    assert said[0].endswith("loudest at stage z 20.750 mm")


def test_place_chain_caps_the_profile_power_and_fits_the_minimum() -> None:
    """P0 = 100 mW: the sweep's powers are scaled to at most 50 mW (shape kept); the chain's
    best position (20.3023 mm) lies between the fine scan's points: the parabola finds it."""
    d = design()
    bench = Bench(d, best_mm=20.3023)
    out = place_chain(bench, 2, d, v_ref, rescale, 100.0, stage_ref_mm=20.0)
    sweep = [c[2] for c in bench.rf.calls if c[0] == "apply"][:82]
    assert max(sweep) == pytest.approx(10 * math.log10(50.0))
    assert sweep[1] - sweep[-1] == pytest.approx(10 * math.log10(float(rescale(1.5e9) / rescale(3.5e9))))
    assert len(out["fine"]) == 16  # +-0.03 mm in 4 um steps
    grid = min(abs(z - 20.3023) for z, _ in out["fine"])
    assert abs(out["stage_z_mm"] - 20.3023) < 0.5 * grid + 1e-4


def test_chain_module_constants() -> None:
    assert ch.THESIS_FREQS_HZ == FREQS
    assert set(ch.THESIS_WEIGHTS) == {"chain0", "chain1", "chain2"}
    assert ch.THESIS_WEIGHTS["chain0"] == TARGET
