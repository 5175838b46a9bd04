"""Fast checks of calibration/reference.py against a synthetic map with known truth (written to
kill mutmut's survivors, scripts/mutation.sh): the Kittel fit recovers M_eff and the field zero,
the inverse law and the interpolator agree with the model, the sweep saves and resumes."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from calibration import reference as ref
from calibration.reference import (
    ReferenceMap,
    SweepPlan,
    kittel_hz,
    measure_reference_map,
    read_points,
    rescaled_power,
    resonance_from_curve,
    synapse_v,
)

MEFF_OE, GAMMA, GRAD, Z0_MM, WIDTH_HZ = 9000.0, 2.9e6, 140.0, 20.0, 60e6
FREQS = np.arange(1.0e9, 5.5e9 + 1, 10e6)
ZS = np.round(np.arange(18.3, 21.71, 0.1), 6)


def line_v(freq_hz: np.ndarray, fr_hz: float, amp_v: float = 1e-6) -> np.ndarray:
    """An antisymmetric line (eq. 2.11 shape) crossing zero at ``fr_hz``."""
    d = np.asarray(freq_hz, float) - fr_hz
    return amp_v * d * WIDTH_HZ / (d * d + WIDTH_HZ ** 2)


def truth_rows(devices: dict[str, float], diodes: int = 2) -> list[dict[str, Any]]:
    rows = []
    for z in ZS:
        fr = float(kittel_hz(GRAD * (Z0_MM - z), MEFF_OE, GAMMA))
        for name, scale in devices.items():
            v = diodes * scale * line_v(FREQS, fr)
            rows += [{"device": name, "stage_z_mm": float(z), "freq_hz": float(f), "voltage_v": float(x)}
                     for f, x in zip(FREQS, v, strict=True)]
    return rows


def plan(devices: dict[str, float], **kw: Any) -> SweepPlan:
    return SweepPlan(devices={d: i + 1 for i, d in enumerate(devices)}, stage_z_mm=list(ZS),
                     freq_hz=list(FREQS), **kw)


@pytest.fixture(scope="module")
def truth_map() -> ReferenceMap:
    devices = {"a": 0.9, "b": 1.1}
    return ReferenceMap(plan(devices), truth_rows(devices))


def test_kittel_law_values() -> None:
    assert float(kittel_hz(100.0, 9000.0, 2.9e6)) == pytest.approx(2.9e6 * math.sqrt(100 * 9100))
    assert float(kittel_hz(-100.0, 9000.0, 2.9e6)) == float(kittel_hz(100.0, 9000.0, 2.9e6))
    assert float(kittel_hz(0.0, 9000.0, 2.9e6)) == 0.0


def test_resonance_from_curve_cases() -> None:
    f = np.arange(10.0)
    assert resonance_from_curve(f, line_v(f * 1e9, 4.5e9)[:] * 0 + np.array(
        [0, -1, -2, -1, -0.5, 0.5, 1, 2, 1, 0])) == pytest.approx(4.5)
    assert resonance_from_curve(f, np.array([0, -1, -2, -1, 0, 1, 1, 2, 1, 0])) == 4.0  # exact zero
    assert resonance_from_curve(f, np.array([0, 1, 2, 1, 0.5, -0.5, -1, -2, -1, 0])) == pytest.approx(4.5)
    assert resonance_from_curve(f, np.array([-2, -1, 0, 1, 2, 3, 4, 5, 6, 7.0])) is None  # lobe at an end
    assert resonance_from_curve(f, np.array([0, -1, -2, -1, 0.5, 1, 2, 3, 4, 5.0])) is None  # max at end
    assert resonance_from_curve(f, np.array([0, 1, 2, 3, 2, 1, 0.5, 0.2, 0.6, 0.1])) is None  # no minimum<0
    assert resonance_from_curve(f, np.array([0, -1, -2, -3, -2, -1, -0.5, -0.2, -0.6, -0.1])) is None


def test_map_averages_devices_per_diode(truth_map: ReferenceMap) -> None:
    assert truth_map.complete
    k = int(np.argmin(np.abs(ZS - 19.0)))
    fr = float(kittel_hz(GRAD, MEFF_OE, GAMMA))
    np.testing.assert_allclose(truth_map.v_ref[k], line_v(FREQS, fr), rtol=1e-9, atol=1e-18)
    np.testing.assert_allclose(truth_map.device_grid_v[0, k], 0.9 * line_v(FREQS, fr), atol=1e-18)
    partial = ReferenceMap(plan({"a": 1, "b": 1}), truth_rows({"a": 1.0}))
    assert not partial.complete
    np.testing.assert_allclose(partial.v_ref[k], line_v(FREQS, fr), atol=1e-18)  # only "a" measured
    empty = ReferenceMap(plan({"a": 1}), [])
    assert np.all(np.isnan(empty.v_ref)) and not empty.complete


def test_kittel_fit_recovers_meff_and_field_zero(truth_map: ReferenceMap) -> None:
    res = truth_map.resonance_hz()
    assert np.isnan(res[np.argmin(np.abs(ZS - Z0_MM))])  # at the field zero: no line in the band
    fit = truth_map.fit_kittel()
    assert fit.meff_oe == pytest.approx(MEFF_OE, rel=2e-3)
    assert fit.stage_z0_mm == pytest.approx(Z0_MM, abs=2e-3)
    h = GRAD * np.abs(Z0_MM - ZS)
    assert fit.n_points == int(np.sum((h > 40) & (h < 320)))
    assert fit.gamma_hz_per_oe == GAMMA and fit.gradient_oe_per_mm == GRAD
    assert fit.gradient_source == "assumed (sweep plan)" and fit.meff_gradient_sigma_oe == 0.0
    assert 0 < fit.meff_fit_sigma_oe < 20 and fit.meff_sigma_oe == pytest.approx(fit.meff_fit_sigma_oe)
    assert 0 < fit.stage_z0_sigma_mm < 1e-2 and not fit.stage_z0_fixed
    # f^2 ~ gamma^2 H M_eff: M_eff ~ gamma^-2, so dM_eff/dgamma ~ -2 M_eff / gamma
    assert fit.dmeff_dgamma_oe_per_hz_per_oe == pytest.approx(-2 * MEFF_OE / GAMMA, rel=0.1)
    assert set(fit.meff_at_gamma_oe) == {"2.8e+06", "2.9e+06"}
    assert fit.meff_at_gamma_oe["2.9e+06"] == pytest.approx(fit.meff_oe)
    assert fit.meff_at_gamma_oe["2.8e+06"] > fit.meff_oe
    assert fit.gamma2_meff_hz2_per_oe == pytest.approx(GAMMA ** 2 * fit.meff_oe)
    assert fit.gamma2_meff_rel_sigma == pytest.approx(fit.meff_sigma_oe / fit.meff_oe)
    free = fit.gamma_free  # noise-free data: gamma free recovers the truth, strongly correlated
    assert free is not None and set(free) == {
        "gamma_hz_per_oe", "gamma_sigma_hz_per_oe", "meff_oe", "meff_sigma_oe", "correlation"}
    assert free["gamma_hz_per_oe"] == pytest.approx(GAMMA, rel=1e-3)
    assert free["meff_oe"] == pytest.approx(MEFF_OE, rel=1e-3)
    assert 0 < free["gamma_sigma_hz_per_oe"] < 1e4 and 0 < free["meff_sigma_oe"] < 50
    assert -1.0 <= free["correlation"] < -0.99
    assert truth_map.kittel is fit


def test_kittel_fit_at_another_gamma_and_with_a_measured_gradient() -> None:
    devices = {"a": 1.0}
    m = ReferenceMap(plan(devices), truth_rows(devices))
    fit = m.fit_kittel(gamma_hz_per_oe=2.8e6)
    assert fit.meff_oe == pytest.approx(MEFF_OE * (GAMMA / 2.8e6) ** 2, rel=0.03)
    assert m.gamma_hz_per_oe == 2.8e6 and set(fit.meff_at_gamma_oe) == {"2.8e+06", "2.9e+06"}
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="gamma_hz_per_oe must be > 0"):
            m.fit_kittel(gamma_hz_per_oe=bad)
    m.use_field_calibration(GRAD, 2.0, probe_stage_z0_mm=19.5, device_offset_mm=0.5, source="probe")
    assert m.kittel is None and m.fixed_stage_z0_mm == 20.0 and m.probe_stage_z0_mm == 19.5
    fit = m.fit_kittel(gamma_hz_per_oe=GAMMA)
    assert fit.stage_z0_fixed and fit.stage_z0_mm == 20.0 and fit.stage_z0_sigma_mm == 0.0
    assert fit.meff_oe == pytest.approx(MEFF_OE, rel=2e-3) and fit.gradient_source == "probe"
    assert fit.probe_stage_z0_mm == 19.5 and fit.gradient_sigma_oe_per_mm == 2.0
    # a 2 Oe/mm gradient uncertainty on 140: M_eff ~ 1/G, so about 2/140 of M_eff
    assert fit.meff_gradient_sigma_oe == pytest.approx(MEFF_OE * 2 / GRAD, rel=0.1)
    assert fit.meff_sigma_oe == pytest.approx(math.hypot(fit.meff_fit_sigma_oe, fit.meff_gradient_sigma_oe))
    m.use_field_calibration(GRAD, 0.0)
    assert m.fixed_stage_z0_mm is None and m.probe_stage_z0_mm is None and m.gradient_source == "field probe"


@pytest.mark.parametrize("kw, match", [
    ({"gradient_oe_per_mm": -1.0}, "gradient_oe_per_mm must be a finite"),
    ({"gradient_oe_per_mm": math.nan}, "gradient_oe_per_mm must be a finite"),
    ({"gradient_oe_per_mm": "1"}, "gradient_oe_per_mm must be a finite"),
    ({"gradient_sigma_oe_per_mm": -0.1}, "gradient_sigma_oe_per_mm must be a finite"),
    ({"gradient_sigma_oe_per_mm": math.inf}, "gradient_sigma_oe_per_mm must be a finite"),
    ({"gradient_oe_per_mm": 0.0}, "must be > 0"),
    ({"device_offset_mm": 0.1}, "needs probe_stage_z0_mm"),
])
def test_field_calibration_is_validated(truth_map: ReferenceMap, kw: dict, match: str) -> None:
    args = {"gradient_oe_per_mm": 140.0, "gradient_sigma_oe_per_mm": 1.0, **kw}
    g, s = args.pop("gradient_oe_per_mm"), args.pop("gradient_sigma_oe_per_mm")
    with pytest.raises(ValueError, match=match):
        truth_map.use_field_calibration(g, s, **args)


def test_too_few_resonances_are_refused() -> None:
    few = ReferenceMap(SweepPlan(devices={"a": 1}, stage_z_mm=list(ZS[:3]), freq_hz=list(FREQS)),
                       [r for r in truth_rows({"a": 1.0}) if r["stage_z_mm"] in set(ZS[:3])])
    with pytest.raises(ValueError, match="only 3 resonances in the band"):
        few.fit_kittel()
    devices = {"a": 1.0}
    m = ReferenceMap(plan(devices), truth_rows(devices))
    with pytest.raises(ValueError, match="between 300 and 320 Oe"):
        m.fit_kittel(min_field_oe=300)


def test_inverse_law_positions_and_interpolation(truth_map: ReferenceMap) -> None:
    m = truth_map
    fit = m.fit_kittel()
    np.testing.assert_allclose(m.z_mm(), -(ZS - fit.stage_z0_mm))  # direction -1
    np.testing.assert_allclose(m.field_oe(), GRAD * m.z_mm())
    for f in (2e9, 3e9, 4e9):
        z = float(m.z_for_resonance_mm(f))
        assert z > 0 and float(kittel_hz(GRAD * z, fit.meff_oe, GAMMA)) == pytest.approx(f, rel=1e-9)
        assert float(m.z_for_resonance_mm(f, sign=-1.0)) == pytest.approx(-z)
    v_ref = m.interpolator()
    z_rows = m.z_mm()
    k = int(np.argmin(np.abs(ZS - 19.0)))
    np.testing.assert_allclose(v_ref(FREQS, np.full(FREQS.shape, z_rows[k])), m.v_ref[k], atol=1e-15)
    assert np.all(v_ref(FREQS, np.full(FREQS.shape, z_rows.max() + 0.5)) == 0.0)  # outside the map
    assert np.all(v_ref(FREQS, np.full(FREQS.shape, z_rows.min() - 0.5)) == 0.0)
    # between two rows the line sits at the Kittel resonance of that z (not smeared)
    z_mid = 0.5 * (z_rows[k] + z_rows[k + 1])
    fr_mid = float(kittel_hz(GRAD * z_mid, fit.meff_oe, GAMMA))
    v = v_ref(FREQS, np.full(FREQS.shape, z_mid))
    assert resonance_from_curve(FREQS, v) == pytest.approx(fr_mid, abs=2e6)
    assert np.max(np.abs(v)) == pytest.approx(np.max(np.abs(m.v_ref[k])), rel=0.05)
    assert v_ref(3e9, z_mid).shape == ()


def test_fit_kittel_runs_when_positions_are_asked_first() -> None:
    devices = {"a": 1.0}
    m = ReferenceMap(plan(devices), truth_rows(devices))
    z = m.z_for_resonance_mm(3e9)
    assert m.kittel is not None and float(z) > 0
    m2 = ReferenceMap(plan(devices), truth_rows(devices))
    assert m2.z_mm().shape == ZS.shape and m2.kittel is not None


def test_power_rescaling_and_synapse(truth_map: ReferenceMap) -> None:
    fit = truth_map.fit_power_rescaling(dz_um=70.0, fit_range_hz=(2e9, 3e9))
    assert (fit["dz_um"], fit["fit_lo_hz"], fit["fit_hi_hz"]) == (70.0, 2e9, 3e9)
    # the synthetic lines have the same height at every z: the peak depends on f only weakly
    assert abs(fit["slope_v_per_hz"]) * 1e9 < 0.2 * fit["intercept_v"] and fit["intercept_v"] > 0
    v_ref = truth_map.interpolator()
    z = float(truth_map.z_for_resonance_mm(2.5e9))
    v = synapse_v(v_ref, FREQS, z, 70.0)
    assert np.max(np.abs(v)) == pytest.approx(fit["slope_v_per_hz"] * 2.5e9 + fit["intercept_v"], rel=0.02)
    np.testing.assert_allclose(v, v_ref(FREQS, z - 0.035) - v_ref(FREQS, z + 0.035))
    line = {"slope_v_per_hz": 1e-15, "intercept_v": 1e-6, "fit_lo_hz": 1.5e9, "fit_hi_hz": 3.5e9}
    assert float(rescaled_power(3.1e9, line, 40.0)) == pytest.approx(40.0)
    assert float(rescaled_power(2e9, line, 40.0)) == pytest.approx(40.0 * (1e-6 + 3.1e-6) / (1e-6 + 2e-6))
    assert float(rescaled_power(1e9, line, 1.0)) == float(rescaled_power(1.5e9, line, 1.0))  # clipped
    assert float(rescaled_power(9e9, line, 1.0)) == float(rescaled_power(3.5e9, line, 1.0))
    assert float(rescaled_power(2e9, line, 1.0, f_norm_hz=2e9)) == pytest.approx(1.0)


# --------------------------------------------------------------------------- the sweep


class FakeLab(dict):
    """Drivers by role: a voltmeter reading the synthetic line at the source frequency."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.t_s = 100.0
        self.clock = SimpleNamespace(now_s=lambda: self.t_s)
        lab = self

        class Rf:
            freq_hz = 0.0
            on = False

            def output_off(self) -> None:
                self.on = False
                lab.log.append(("off",))

            def output_on(self) -> None:
                self.on = True
                lab.log.append(("on",))

            def apply(self, f: float, p: float) -> None:
                self.freq_hz = f
                lab.log.append(("apply", f, p))

        class Nvm:
            def configure_voltage(self, nplc: float) -> None:
                lab.log.append(("nplc", nplc))

            def read_voltage_v(self) -> float:
                lab.t_s += 1.0
                return 0.5 + (float(line_v(rf.freq_hz, 2e9)) if rf.on else 0.0)

        class Stage:
            homed = False
            z = 0.0

            def status(self) -> str:
                return "READY" if self.homed else "NOT REFERENCED"

            def home(self) -> None:
                self.homed = True
                lab.log.append(("home",))

            def move_abs_mm(self, z: float) -> None:
                self.z = z
                lab.log.append(("move", z))

        rf = Rf()
        super().__init__({"rf_source": rf, "voltmeter": Nvm(), "stage.z": Stage(),
                          "switch": SimpleNamespace(port=0), "source_switch": SimpleNamespace(port=0)})


def test_sweep_writes_points_then_resumes(tmp_path: Any) -> None:
    p = SweepPlan(devices={"a": 4, "b": 6}, stage_z_mm=[2.0, 1.0], freq_hz=[1.9e9, 2.1e9],
                  power_dbm=10.0, nplc=5.0, n_off=3, source_port=7, extra={"note": "x"})
    path = tmp_path / "sub" / "map.csv"
    lab = FakeLab()
    calls: list[tuple[int, int]] = []
    assert measure_reference_map(lab, p, path, max_points=3, progress=lambda i, n: calls.append((i, n))) == 3
    assert calls == [(1, 8), (2, 8), (3, 8)]
    assert lab["source_switch"].port == 7 and ("home",) in lab.log and ("nplc", 5.0) in lab.log
    assert lab.log[-1] == ("off",) and not lab["rf_source"].on
    moves = [e[1] for e in lab.log if e[0] == "move"]
    assert moves == [1.0]  # stopped after 3 points, within the first z
    rows = read_points(path)
    assert [(r["device"], r["stage_z_mm"], r["freq_hz"]) for r in rows] == [
        ("a", 1.0, 1.9e9), ("a", 1.0, 2.1e9), ("b", 1.0, 1.9e9)]
    assert rows[0]["offset_v"] == pytest.approx(0.5) and rows[0]["power_dbm"] == 10.0
    assert rows[0]["voltage_v"] == pytest.approx(float(line_v(1.9e9, 2e9)))
    assert rows[0]["lab_time_s"] == 4.0  # three offset readings, then the point
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["note"] == "x" and meta["n_off"] == 3 and SweepPlan.from_metadata(meta) == p
    assert lab["switch"].port == 6
    with path.open("a") as fh:
        fh.write("b,1.0,2.1e9,10.0,0.1")  # torn line of a killed writer
    lab2 = FakeLab()
    lab2["stage.z"].homed = True
    assert measure_reference_map(lab2, p, path, lab_time_offset_s=50.0,
                                 progress=lambda i, n: calls.append((i, n))) == 5
    assert calls[3:] == [(4, 8), (5, 8), (6, 8), (7, 8), (8, 8)] and ("home",) not in lab2.log
    assert [e[1] for e in lab2.log if e[0] == "move"] == [1.0, 2.0]  # increasing z only
    rows = read_points(path)
    assert len(rows) == 8 and len({(r["device"], r["stage_z_mm"], r["freq_hz"]) for r in rows}) == 8
    assert rows[3]["lab_time_s"] == 50.0 + 4.0 and path.read_text().count("device") == 1
    assert measure_reference_map(FakeLab(), p, path) == 0  # all done: nothing measured
    m = ReferenceMap.load(path)
    assert m.complete and m.plan.devices == {"a": 4, "b": 6}


def test_sweep_refuses_another_plan_and_no_source_switch(tmp_path: Any) -> None:
    p = SweepPlan(devices={"a": 1}, stage_z_mm=[1.0], freq_hz=[2e9], source_port=None)
    path = tmp_path / "m.csv"
    lab = FakeLab()
    del lab["source_switch"]
    assert measure_reference_map(lab, p, path) == 1
    for change in ({"devices": {"b": 1}}, {"stage_z_mm": [2.0]}, {"freq_hz": [3e9]}, {"power_dbm": 1.0},
                   {"direction": 1.0}):
        other = SweepPlan(**{**p.__dict__, **change})
        with pytest.raises(ValueError, match="another"):
            measure_reference_map(FakeLab(), other, path)
    same_but_nplc = SweepPlan(**{**p.__dict__, "nplc": 10.0})
    assert measure_reference_map(FakeLab(), same_but_nplc, path) == 0


def test_saved_points_and_keys(tmp_path: Any) -> None:
    path = tmp_path / "p.csv"
    assert read_points(path) == []
    ref._drop_torn_line(path)  # no file: nothing to do
    assert not path.exists()
    path.write_text("device,stage_z_mm,freq_hz,power_dbm,voltage_v,offset_v,lab_time_s\n"
                    "a,1.0,2e9,16,1e-6,0.1,3\nb,x,2e9,16,1e-6,0.1,3\nc,1.0,2e9,16\n")
    assert read_points(path) == [{"device": "a", "stage_z_mm": 1.0, "freq_hz": 2e9, "power_dbm": 16.0,
                                  "voltage_v": 1e-6, "offset_v": 0.1, "lab_time_s": 3.0}]
    path.write_bytes(b"h\nrow1\npartial")
    ref._drop_torn_line(path)
    assert path.read_bytes() == b"h\nrow1\n"
    ref._drop_torn_line(path)
    assert path.read_bytes() == b"h\nrow1\n"
    assert ref._key("a", 1.0000004, 2e9 + 0.4) == ("a", 1000000, 2000000000)
    assert ref.sidecar_path(path).name == "p.json"


def test_interpolation_blends_rows_of_different_height() -> None:
    """Rows whose line height grows with z: between two rows the blend is linear in z (eq. 2.9
    detuning), at the first and last row the row itself."""
    rows = []
    for z in ZS:
        fr = float(kittel_hz(GRAD * (Z0_MM - z), MEFF_OE, GAMMA))
        amp = 1e-6 * (1.0 + (z - ZS[0]))
        rows += [{"device": "a", "stage_z_mm": float(z), "freq_hz": float(f), "voltage_v": float(x)}
                 for f, x in zip(FREQS, line_v(FREQS, fr, amp), strict=True)]
    m = ReferenceMap(plan({"a": 1.0}, diodes_per_device=1), rows)
    fit = m.fit_kittel()
    v_ref = m.interpolator()
    z_rows = m.z_mm()
    for k in (0, len(ZS) - 1):  # the map's edges are inside
        np.testing.assert_allclose(v_ref(FREQS, np.full(FREQS.shape, z_rows[k])), m.v_ref[k], atol=1e-15)
    k = int(np.argmin(np.abs(ZS - 19.0)))
    for t in (0.25, 0.5):
        z = (1 - t) * z_rows[k] + t * z_rows[k + 1]
        fr = float(kittel_hz(GRAD * z, fit.meff_oe, GAMMA))
        amp = 1e-6 * (1.0 + (1 - t) * (ZS[k] - ZS[0]) + t * (ZS[k + 1] - ZS[0]))
        want = line_v(FREQS, fr, amp)
        got = v_ref(FREQS, np.full(FREQS.shape, z))
        near = np.abs(FREQS - fr) < 0.5e9  # away from the band edges (the shift leaves the grid there)
        np.testing.assert_allclose(got[near], want[near], atol=0.01 * np.max(np.abs(want)))
    both = v_ref(np.array([2e9, 3e9]), np.array([z_rows[k], z_rows[k + 2]]))  # two z at once
    assert both[0] == pytest.approx(float(v_ref(2e9, z_rows[k]))) and both[1] == pytest.approx(
        float(v_ref(3e9, z_rows[k + 2])))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the tiny-gamma fit goes astray
def test_resonance_count_limits_and_gamma_bound() -> None:
    devices = {"a": 1.0}
    m = ReferenceMap(plan(devices), truth_rows(devices))
    keep = {float(z) for z in ZS[[0, 1, 2, 3]]}
    four = ReferenceMap(SweepPlan(devices={"a": 1}, stage_z_mm=sorted(keep), freq_hz=list(FREQS)),
                        [r for r in truth_rows(devices) if r["stage_z_mm"] in keep])
    assert len(four._kittel_points()[0]) == 4  # four resonances are enough to try
    with pytest.raises(ValueError, match="gamma_hz_per_oe must be > 0"):
        m.fit_kittel(gamma_hz_per_oe=0.0)
    fit = m.fit_kittel(gamma_hz_per_oe=0.5 * GAMMA)
    assert fit.gamma_hz_per_oe == 0.5 * GAMMA
    small = ReferenceMap(plan(devices), truth_rows(devices))
    small.gamma_hz_per_oe = 0.5  # a tiny but positive gamma is accepted (and fits badly)
    with pytest.raises((ValueError, RuntimeError)) as info:
        small.fit_kittel()
    assert "must be > 0" not in str(info.value)


def test_unreadable_rows_are_skipped_not_the_rest(tmp_path: Any) -> None:
    path = tmp_path / "p.csv"
    path.write_text("device,stage_z_mm,freq_hz,power_dbm,voltage_v,offset_v,lab_time_s\n"
                    "b,x,2e9,16,1e-6,0.1,3\na,1.0,2e9,16,1e-6,0.1,3\n")
    assert [r["device"] for r in read_points(path)] == ["a"]


def test_sweep_into_new_folders_resumes_after_a_complete_row(tmp_path: Any) -> None:
    p = SweepPlan(devices={"a": 1}, stage_z_mm=[1.0, 2.0], freq_hz=[1.9e9, 2.1e9], power_dbm=12.0)
    path = tmp_path / "x" / "y" / "map.csv"
    lab = FakeLab()
    assert measure_reference_map(lab, p, path, max_points=2) == 2  # the first z row complete
    assert ("apply", 1.9e9, 12.0) in lab.log
    lab2 = FakeLab()
    assert measure_reference_map(lab2, p, path) == 2
    assert [e[1] for e in lab2.log if e[0] == "move"] == [2.0]  # the finished row is skipped
    assert len(read_points(path)) == 4
