"""Issue 20 item 1: the calibration procedures as library jobs (``hil.bench.calibrate``), called
with typed arguments and a run folder, without the command line; the commands only parse,
call them and print (their output is checked in test_calibration_cli.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_calibration_cli import LAB

import hil.jobs
from calibration.field import FieldScanPlan
from calibration.reference import SweepPlan
from hil.bench import calibrate as jobs
from hil.errors import HilError
from hil.runs import RunFolder


def test_the_jobs_are_exported_from_hil_jobs():
    for name in ("reference_map_job", "chain_design_job", "chain_measure_job", "position_job",
                 "source_job", "field_job", "load_reference_model", "design_chain_set"):
        assert getattr(hil.jobs, name) is getattr(jobs, name)
        assert name in hil.jobs.__all__
    from hil.conv.jobs import train_conv_job

    assert hil.jobs.train_conv_job is train_conv_job


def test_field_job_writes_its_files_and_returns_what_it_wrote(tmp_path, capsys):
    plan = FieldScanPlan(stage_z_mm=np.arange(18.5, 22.01, 0.5).tolist(), n_avg=2, settle_s=0.5,
                         max_field_oe=350.0, order=3)
    run = RunFolder(tmp_path / "field")
    res = jobs.field_job(LAB, plan, run, accuracy_frac=0.002, zero_uncertainty_oe=0.5, record=False)
    assert capsys.readouterr().out == ""  # printing is the command's
    assert res.calibration_file == run.file("field_calibration.json")
    saved = json.loads(res.calibration_file.read_text())
    assert saved["gradient_oe_per_mm"] == pytest.approx(res.calibration.gradient_oe_per_mm)
    assert 130 < abs(res.calibration.gradient_oe_per_mm) < 150  # the virtual magnets' ~140 Oe/mm
    assert res.figure.stat().st_size > 10_000
    assert json.loads(run.file("lab_time.json").read_text()) == res.lab_time
    assert res.lab_time["command"] == "calibrate field" and res.lab_time["lab_time_s"] > 0
    assert not run.file("instrument_io.jsonl").exists()  # record=False


def test_reference_sweep_state_is_checked_on_resume(tmp_path):
    plan = SweepPlan(devices={"ref0": 1}, stage_z_mm=[19.0, 21.0], freq_hz=[2e9, 3e9])
    settings = jobs.reference_sweep_settings(LAB, plan, reference_sample=True)
    assert len(settings["lab_config_sha256"]) == 64 and settings["reference_sample"] is True
    run = RunFolder(tmp_path / "sweep")
    with pytest.raises(HilError, match=r"no sweep_state\.json \(not a reference sweep folder\?\)"):
        jobs.check_resume(run, settings)
    jobs.new_sweep(run, settings)
    assert jobs.check_resume(run, settings)["sessions"] == 0
    with pytest.raises(HilError, match=r"settings differ.*nplc: 1\.0 in the sweep, 2\.0 now"):
        jobs.check_resume(run, {**settings, "nplc": 2.0})


def test_a_map_cut_short_is_resumed_to_the_end_and_fitted(tmp_path):
    plan = SweepPlan(devices={"ref0": 1, "ref1": 2, "ref2": 3},
                     stage_z_mm=np.round(np.arange(17.5, 22.51, 0.5), 6).tolist(),
                     freq_hz=np.round(np.arange(1e9, 5.01e9, 100e6)).tolist())
    settings = jobs.reference_sweep_settings(LAB, plan, reference_sample=True)
    run = RunFolder(tmp_path / "ref")
    first = jobs.reference_map_job(LAB, plan, run, settings=settings, reference_sample=True,
                                   record=False, max_points=500)
    assert (first.new_points, first.saved_points, first.total_points) == (500, 500, 1353)
    assert not first.complete and first.fit is None
    assert not run.file("reference_fit.json").exists()
    rest = jobs.reference_map_job(LAB, plan, run, settings=settings, resume=True,
                                  reference_sample=True, record=False)
    assert (rest.new_points, rest.saved_points, rest.complete) == (853, 1353, True)
    assert rest.lab_time["sessions"] == 2 and rest.lab_time["lab_time_s"] > first.lab_time["lab_time_s"]
    fit = json.loads(run.file("reference_fit.json").read_text())
    assert fit["kittel"]["meff_oe"] == pytest.approx(rest.fit.meff_oe)
    assert fit["power_rescaling"] == pytest.approx(rest.rescaling)
    model = jobs.load_reference_model(run.file("reference_map.csv"))
    assert model.rescaling == pytest.approx(rest.rescaling)
