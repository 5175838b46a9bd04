"""Issue 21, item 4: the field probe (Lake Shore 425), the field calibration, and a Kittel fit
that is not circular. Item 5 (part): calibration commands print and record their lab time,
accumulated across resumes.

``World.truth()`` and the probe model's state are read here only to check results; the
calibration runs with ``World.truth`` made to fail, so it cannot have read it. Run with ``-s``
for the measured numbers.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.optimize import brentq
from spy import sim_backend
from test_calibration_cli import only_run, run
from test_drivers_definitions import ErrorChecking

import sims
from calibration.field import (
    FieldCalibration,
    FieldPoint,
    FieldScanPlan,
    calibrate_field,
    fit_field_profile,
)
from calibration.reference import ReferenceMap, SweepPlan, kittel_hz
from drivers.base import DriverError, IdentityError, InstrumentError, LimitError
from drivers.gaussmeter import LakeShore425
from drivers.registry import DRIVERS
from hil.bench.lab import load_lab_config, open_lab
from hil.errors import ConfigError, HilError
from sims.virtual_lab import World, WorldConfigError
from sims.visa import visa_library

ROOT = Path(sims.__file__).resolve().parent.parent
LAB = ROOT / "lab_configs" / "virtual.yaml"
SIM_ADDRESS = "ASRL7::INSTR"
PROBE = {"address": "ASRL/dev/ttyACM0::INSTR", "model": "lakeshore_425"}


# --------------------------------------------------------------------------- driver vs manual


@pytest.fixture
def sim425(tmp_path: Path) -> Any:
    """A private copy of the 425's pyvisa-sim file (out-of-range values queue EXE)."""
    path = tmp_path / "lakeshore_425.yaml"
    path.write_text((ROOT / "sims" / "visa" / "lakeshore_425.yaml").read_text())
    return visa_library(path)


def EsrChecking(inner: Any, misspell: dict[str, str] | None = None) -> ErrorChecking:
    """The definitions test's checking transport on ``*ESR?``, recording errors (not stopping)."""
    return ErrorChecking(inner, "esr", misspell, stop=False)


def _exercise(g: LakeShore425) -> None:
    assert g.units == "G" and g.reading_mode() == ("dc", True)  # set at connect
    assert g.probe_type() == 40 and g.ranges_g()[1] == 350.0
    assert g.set_range_for_g(250.0) == 350.0
    assert g.range_index == 2 and g.autorange is False
    g.autorange = True
    assert g.autorange is True
    g.set_dc_mode(filter_on=False)
    assert g.reading_mode() == ("dc", False)
    field_g = g.field_g()
    assert abs(field_g) < 35 and g.field_oe() != 0.0 and abs(g.field_t()) < 35e-4
    g.zero_probe()
    assert "high sensitivity probe" in g.status()


def test_every_gaussmeter_command_is_in_the_manual_definition(sim425):
    transport = EsrChecking(LakeShore425.open_transport(SIM_ADDRESS, sim425, 300))
    with LakeShore425(transport) as g:
        _exercise(g)
    assert transport.errors == [], transport.errors
    assert {"RDGFIELD?", "OPST?", "UNIT 1", "RANGE 2", "ZPROBE"} <= set(transport.sent)


@pytest.mark.parametrize("right, wrong", [("RDGMODE 1", "RDGMOD 1"), ("RANGE ", "RANG "),
                                          ("ZPROBE", "ZPROB")])
def test_a_misspelt_gaussmeter_command_fails_naming_it(sim425, right, wrong):
    transport = EsrChecking(LakeShore425.open_transport(SIM_ADDRESS, sim425, 300),
                            {right: wrong})
    try:
        with LakeShore425(transport) as g:
            _exercise(g)
    except (DriverError, AssertionError):  # refused, unanswered, or read back wrong
        pass
    # the instrument flagged the misspelt command itself (CME, *ESR? bit 5)
    assert any(wrong.strip() in cmd and esr == "32" for cmd, esr in transport.errors), \
        transport.errors


def test_gaussmeter_limits_are_checked_before_sending(sim425):
    transport = EsrChecking(LakeShore425.open_transport(SIM_ADDRESS, sim425, 300))
    with LakeShore425(transport, limits={"range": [1, 2]}) as g:
        before = len(transport.sent)
        with pytest.raises(LimitError, match=r"range_index=3 index refused \(allowed \[1, 2\]"):
            g.range_index = 3
        with pytest.raises(LimitError, match="beyond every allowed range"):
            g.set_range_for_g(1000.0)  # 3.5 kG range needed, the config allows 1-2
        with pytest.raises(LimitError, match="must be a number"):
            g.set_range_for_g("big")  # type: ignore[arg-type]
        with pytest.raises(LimitError, match="filter_on must be True or False"):
            g.set_dc_mode(filter_on=1)  # type: ignore[arg-type]
        with pytest.raises(LimitError, match="refused; allowed: 'G', 'T', 'Oe', 'A/m'"):
            g.units = "kG"
        assert transport.sent[before:] == ["TYPE?"]  # the 1000 G look-up; nothing else sent
    with pytest.raises(LimitError, match="beyond what the instrument can do"):
        LakeShore425(LakeShore425.open_transport(SIM_ADDRESS, sim425, 300),
                     limits={"range": [0, 5]})
    assert DRIVERS["lakeshore_425"] is LakeShore425


def test_a_wrong_instrument_at_the_address_is_refused(tmp_path):
    backend = sim_backend(tmp_path)  # sim_lab.yaml: an SMC100 at ASRL1
    with pytest.raises((IdentityError, DriverError)):
        LakeShore425.open("ASRL1::INSTR", backend, timeout_ms=200)


# --------------------------------------------------------------------------- virtual probe


def _true_zero_and_slope(lab: Any) -> tuple[float, float]:
    """Stage z where the field along the probe's axis is zero, and dH/dz there (truth)."""
    world = lab.world
    probe = world.instruments["gauss"]
    pose = world.config["pose"]["z"]
    here = world.instruments[pose["stage"]].axis.physical(world.clock.now_s())
    x, y, z_now = probe.position_mm()

    def hz(stage_z: float) -> float:
        return float(world.magnets.field_oe(x, y, z_now + pose["direction"] * (stage_z - here))[2])

    z0 = brentq(hz, 15.0, 25.0)
    return z0, (hz(z0 + 1e-4) - hz(z0 - 1e-4)) / 2e-4


def _calibrate(lab: Any, monkeypatch: pytest.MonkeyPatch) -> FieldCalibration:
    def no_truth(self: Any) -> None:
        raise AssertionError("the field calibration read World.truth()")

    with monkeypatch.context() as m:
        m.setattr(World, "truth", no_truth)
        plan = FieldScanPlan(stage_z_mm=list(np.round(np.arange(18.5, 22.01, 0.25), 4)))
        return calibrate_field(lab, plan)


@pytest.mark.parametrize("gradient, mount", [(None, [0.0, 4.0, 0.0]),
                                             (150.0, [0.3, -3.0, 0.4])])
def test_field_calibration_recovers_gradient_and_zero(monkeypatch, gradient, mount):
    over: dict[str, Any] = {"instruments": {"gauss": {**PROBE, "mount_mm": mount}}}
    if gradient is not None:
        over["magnets"] = {"gradient_oe_per_mm": gradient}
    world = World.from_file("thesis_bench.yaml", seed=2024, overrides=over)
    with open_lab(LAB, world=world, roles=["field_probe", "stage.z"]) as lab:
        cal = _calibrate(lab, monkeypatch)
        z0, slope = _true_zero_and_slope(lab)
        configured = lab.world.config["magnets"]["gradient_oe_per_mm"]
    print(f"\nprobe scan: gradient {cal.gradient_oe_per_mm:.3f} +- "
          f"{cal.gradient_sigma_oe_per_mm:.3f} Oe/mm (configured {configured:g}, local "
          f"{abs(slope):.3f}); zero at stage z {cal.stage_z0_mm:.4f} +- "
          f"{cal.stage_z0_sigma_mm:.4f} mm (truth {z0:.4f}); lab time {cal.lab_time_s:.0f} s")
    assert abs(cal.gradient_oe_per_mm / configured - 1) < 0.02  # the tolerance
    assert abs(cal.gradient_oe_per_mm / abs(slope) - 1) < 0.005  # measured: 0.02-0.1 %
    assert cal.direction == -1.0  # the z stage moves the magnet array
    # the field zero within 2 % of the scan's +-250 Oe in field terms (5 Oe, 36 um)
    assert abs(cal.stage_z0_mm - z0) * configured < 0.02 * 250
    assert abs(cal.stage_z0_mm - z0) < 3 * cal.stage_z0_sigma_mm  # an honest uncertainty
    assert 0 < cal.lab_time_s < 600 and cal.n_points == 15 and cal.residual_rms_oe < 0.1


def test_the_probe_model_answers_as_the_manual_says(tmp_path):
    world = World.from_file("thesis_bench.yaml", seed=3,
                            overrides={"instruments": {"gauss": PROBE}})
    with open_lab(LAB, world=world, roles=["field_probe", "stage.z"]) as lab:
        g, stage = lab["field_probe"], lab["stage.z"]
        stage.home()
        stage.move_abs_mm(18.5)  # ~250 Oe at the probe
        g.range_index = 1  # 35 G: overloaded
        with pytest.raises(InstrumentError, match="field overload"):
            g.field_oe()
        g.set_range_for_g(350)
        lab.sleep(0.1 - lab.clock.now_s() % 0.1 + 1e-3)  # just after a new reading
        first = g.field_oe()
        assert first == g.field_oe()  # no new reading within update_s (0.1 s)
        assert 200 < first < 300 and first == round(first, 2)  # 350 G range: 0.01 G steps
        lab.sleep(0.2)
        again = g.field_oe()
        assert again != first and again == pytest.approx(first, abs=0.1)  # noise 0.015 G
        assert g.field_t() == pytest.approx(again / 1e4, abs=1e-5)
        g.write("RANGE 9")
        assert g.drain_errors() == ["execution error (EXE: parameter out of range)"]
        g.write("RDGFLD?")
        assert g.drain_errors() == ["command error (CME: unknown command)"]
        g.zero_probe()  # in the magnet: subtracts the field, as the manual warns
        lab.sleep(0.2)
        assert abs(g.field_oe()) < 0.05
    bad = {"instruments": {"gauss": {**PROBE, "mount_mm": [0, 4]}}}
    with pytest.raises(WorldConfigError, match=r"instruments\.gauss\.mount_mm: must be \[x, y, z\]"):
        World.from_file("thesis_bench.yaml", overrides=bad)
    bad = {"instruments": {"gauss": {**PROBE, "axis": "w"}}}
    with pytest.raises(WorldConfigError, match=r"instruments\.gauss\.axis"):
        World.from_file("thesis_bench.yaml", overrides=bad)


def test_field_probe_role_in_the_lab_configs(tmp_path):
    for name in ("virtual.yaml", "sim.yaml", "template_real_bench.yaml"):
        cfg = load_lab_config(ROOT / "lab_configs" / name)
        assert cfg.instrument_for("field_probe").driver == "lakeshore_425"
    text = LAB.read_text().replace("field_probe: gauss", "field_probe: nvm")
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"roles\.field_probe.*is a voltmeter; this role "
                                          r"needs a gaussmeter"):
        load_lab_config(path)
    path.write_text(LAB.read_text().replace("address: ASRL/dev/ttyACM0::INSTR",
                                            "address: GPIB0::9::INSTR"))
    with pytest.raises(ConfigError, match=r"GPIB address but the Lake Shore 425 is reached "
                                          r"through ASRL only"):
        load_lab_config(path)


def test_field_fit_refuses_what_it_cannot_fit():
    pts = [FieldPoint(z, 10.0 + z, 0.01, 5, 0.0) for z in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)]
    with pytest.raises(ValueError, match="does not cross zero"):
        fit_field_profile(pts)
    with pytest.raises(ValueError, match="at least 6 points"):
        fit_field_profile(pts[:5], order=3)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        FieldScanPlan(stage_z_mm=[1, 2, 3, 4, 5, 6, 7], order=4).check()
    with pytest.raises(ValueError, match="n_avg must be an integer >= 2"):
        FieldScanPlan(stage_z_mm=[1, 2, 3, 4, 5, 6, 7], n_avg=1).check()
    line = [FieldPoint(z, -140.0 * (z - 3.3), 0.01, 5, 0.0) for z in (1.0, 2, 3, 4, 5, 6)]
    cal = fit_field_profile(line, order=1, accuracy_frac=0.0, zero_uncertainty_oe=0.0)
    assert cal.slope_oe_per_mm == pytest.approx(-140.0) and cal.stage_z0_mm == pytest.approx(3.3)


# --------------------------------------------------------------------------- the Kittel fit


Z0, MEFF, GAMMA, G_TRUE = 20.137, 9680.0, 2.9e6, 140.0


def synthetic_map(mocker: Any, gradient_assumed: float, noise_hz: float = 5e6,
                  seed: int = 1) -> ReferenceMap:
    """A map whose resonances follow eq. 2.9 in the true gradient, read with ``noise_hz``
    (a 25 MHz frequency grid's zero-crossing error), whose plan assumes ``gradient_assumed``."""
    stage = np.round(np.arange(17.5, 22.81, 0.1), 4)
    rng = np.random.default_rng(seed)
    fr = kittel_hz(G_TRUE * (Z0 - stage), MEFF, GAMMA) + rng.normal(0, noise_hz, len(stage))
    m = ReferenceMap(SweepPlan(devices={"ref": 1}, stage_z_mm=list(stage), freq_hz=[1e9, 5e9],
                               gradient_oe_per_mm=gradient_assumed), [])
    mocker.patch.object(m, "resonance_hz", return_value=fr)
    return m


def test_assumed_gradient_makes_meff_circular_and_the_measured_one_fixes_it(mocker):
    m = synthetic_map(mocker, gradient_assumed=150.0)  # the bench "was built with" 150
    wrong = m.fit_kittel()
    assert abs(wrong.meff_oe / MEFF - 1) > 0.05  # 7 % off, with a tiny fit uncertainty
    assert wrong.gradient_source == "assumed (sweep plan)"
    m.use_field_calibration(139.98, 0.28, probe_stage_z0_mm=20.27, source="field probe")
    fit = m.fit_kittel()
    print(f"\nM_eff {fit.meff_oe:.0f} +- {fit.meff_sigma_oe:.0f} Oe at gamma/2pi 2.9 MHz/Oe "
          f"(fit {fit.meff_fit_sigma_oe:.0f}, gradient {fit.meff_gradient_sigma_oe:.0f}); "
          f"dM/dgamma {fit.dmeff_dgamma_oe_per_hz_per_oe * 1e6:.0f} Oe per MHz/Oe; "
          f"at {fit.meff_at_gamma_oe}; gamma free {fit.gamma_free}")
    assert abs(fit.meff_oe - MEFF) < 3 * fit.meff_sigma_oe
    assert abs(fit.meff_oe / MEFF - 1) < 0.01
    # the gradient's 0.2 % reaches M_eff in proportion (f^2 ~ gamma^2 G u M_eff)
    assert fit.meff_gradient_sigma_oe == pytest.approx(fit.meff_oe * 0.28 / 139.98, rel=0.1)
    assert fit.meff_sigma_oe == pytest.approx(np.hypot(fit.meff_fit_sigma_oe,
                                                       fit.meff_gradient_sigma_oe))
    assert fit.gradient_oe_per_mm == 139.98 and fit.probe_stage_z0_mm == 20.27
    assert abs(fit.stage_z0_mm - Z0) < 0.005 and not fit.stage_z0_fixed


def test_meff_is_reported_for_a_stated_gamma_and_how_it_moves_with_gamma(mocker):
    m = synthetic_map(mocker, gradient_assumed=G_TRUE)
    m.use_field_calibration(G_TRUE, 0.28)
    fit = m.fit_kittel(gamma_hz_per_oe=2.9e6)
    at = {float(k): v for k, v in fit.meff_at_gamma_oe.items()}
    assert set(at) == {2.8e6, 2.9e6} and at[2.9e6] == pytest.approx(fit.meff_oe)
    # f^2 ~ gamma^2 H M_eff: M_eff ~ gamma^-2 (the 10.4 kOe at 2.8 MHz/Oe)
    assert at[2.8e6] / at[2.9e6] == pytest.approx((2.9 / 2.8) ** 2, rel=0.005)
    assert 10200 < at[2.8e6] < 10600
    assert fit.dmeff_dgamma_oe_per_hz_per_oe == pytest.approx(-2 * fit.meff_oe / 2.9e6, rel=0.06)
    assert fit.gamma2_meff_hz2_per_oe == pytest.approx(2.9e6 ** 2 * fit.meff_oe)
    assert "constrains mostly gamma^2 M_eff" in fit.note
    # gamma left free: the map cannot tell gamma and M_eff apart
    free = fit.gamma_free
    assert free is not None and free["correlation"] < -0.99
    assert free["meff_sigma_oe"] > 10 * fit.meff_fit_sigma_oe and free["meff_sigma_oe"] > 200
    # a stated 2.8 MHz/Oe is kept for the interpolation and the inverse Kittel law
    fit28 = m.fit_kittel(gamma_hz_per_oe=2.8e6)
    assert fit28.meff_oe == pytest.approx(at[2.8e6], rel=1e-6) and m.gamma_hz_per_oe == 2.8e6
    z = m.z_for_resonance_mm(2.0e9)
    assert kittel_hz(G_TRUE * z, fit28.meff_oe, 2.8e6) == pytest.approx(2.0e9)


def test_probe_zero_plus_offset_holds_the_field_zero(mocker):
    m = synthetic_map(mocker, gradient_assumed=G_TRUE)
    m.use_field_calibration(G_TRUE, 0.28, probe_stage_z0_mm=20.1, device_offset_mm=0.037)
    fit = m.fit_kittel()
    assert fit.stage_z0_fixed and fit.stage_z0_mm == pytest.approx(20.137)
    assert abs(fit.meff_oe / MEFF - 1) < 0.01
    with pytest.raises(ValueError, match="gradient_oe_per_mm must be > 0"):
        m.use_field_calibration(0.0, 0.1)
    with pytest.raises(ValueError, match="device_offset_mm needs probe_stage_z0_mm"):
        m.use_field_calibration(140.0, 0.1, device_offset_mm=0.1)
    with pytest.raises(ValueError, match="gamma_hz_per_oe must be > 0"):
        m.fit_kittel(gamma_hz_per_oe=-1.0)


# --------------------------------------------------------------------------- commands


def test_hil_calibrate_field_writes_and_prints_its_lab_time(runs_dir, capsys):
    assert run("calibrate", "field", str(LAB), "--no-record", "--z-step", "0.5") == 0
    out = capsys.readouterr().out
    folder = only_run(runs_dir, "calibrate-field")
    cal = FieldCalibration.load(folder / "field_calibration.json")
    assert abs(cal.gradient_oe_per_mm / 140 - 1) < 0.02 and cal.n_points == 8
    lab_time = json.loads((folder / "lab_time.json").read_text())
    assert lab_time["lab_time_s"] == pytest.approx(cal.lab_time_s) and cal.lab_time_s > 5
    assert f"lab time {cal.lab_time_s:.0f} s" in out and "Oe/mm" in out
    assert (folder / "field_profile.png").stat().st_size > 1000
    with open(folder / "field_profile.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 8
    with pytest.raises(ConfigError, match="--z-stop"):
        run("calibrate", "field", str(LAB), "--z-start", "22", "--z-stop", "18")
    with pytest.raises(ConfigError, match="at least 6 distinct stage positions"):
        run("calibrate", "field", str(LAB), "--z-step", "2")
    with pytest.raises(ValueError, match="not a field calibration"):
        FieldCalibration.load(folder / "lab_time.json")
    with pytest.raises(HilError, match="--field-calibration .*not a field calibration"):
        run("calibrate", "reference", str(LAB), "--field-calibration",
            str(folder / "lab_time.json"))


def test_resumed_reference_sweep_accumulates_lab_time(runs_dir, capsys):
    grid = ["--no-record", "--reference-sample", "--z-step", "2.5", "--f-step", "1e9",
            "--max-points", "10"]
    assert run("calibrate", "reference", str(LAB), *grid) == 3
    ref = only_run(runs_dir, "calibrate-reference")
    first = json.loads((ref / "lab_time.json").read_text())
    assert first["sessions"] == 1 and first["lab_time_s"] > 0
    assert f"lab time {first['lab_time_s']:.0f} s" in capsys.readouterr().out
    assert run("calibrate", "reference", str(LAB), *grid, "--resume", str(ref)) == 3
    second = json.loads((ref / "lab_time.json").read_text())
    state = json.loads((ref / "sweep_state.json").read_text())
    assert second["sessions"] == 2 and second["lab_time_s"] == pytest.approx(state["lab_time_s"])
    assert second["lab_time_s"] > first["lab_time_s"]
    assert "over 2 session(s)" in capsys.readouterr().out
    with open(ref / "reference_map.csv") as fh:
        times = [float(r["lab_time_s"]) for r in csv.DictReader(fh)]
    assert len(times) == 20
    # the map's lab-time column goes on from the first session instead of restarting at 0
    assert min(times[10:]) > first["lab_time_s"] >= max(times[:10])
    assert max(times) <= second["lab_time_s"]
    with pytest.raises(ConfigError, match="--device-offset-mm"):
        run("calibrate", "reference", str(LAB), *grid, "--device-offset-mm", "0.1")


def test_source_calibration_records_its_lab_time(runs_dir, capsys):
    assert run("source", "calibrate", str(LAB), "--channels", "4=3.25e9", "--no-record") == 0
    folder = only_run(runs_dir, "source-calibrate")
    record = json.loads((folder / "lab_time.json").read_text())
    assert record["command"] == "source calibrate" and record["lab_time_s"] > 1
    assert f"lab time {record['lab_time_s']:.0f} s" in capsys.readouterr().out
