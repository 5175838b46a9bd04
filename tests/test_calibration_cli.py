"""Issue 5 commands, run through their parser (the ``hil`` entry point imports every command
module; these tests build a parser with only ``hil.commands.calibrate``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import sims
from hil.commands import calibrate

LAB = str(Path(sims.__file__).resolve().parent.parent / "lab_configs" / "virtual.yaml")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="hil")
    calibrate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def only_run(root: Path, kind: str) -> Path:
    (path,) = [p for p in root.iterdir() if p.name.endswith(kind)]
    return path


def test_reference_resume_design_measure_optimise_source(runs_dir, capsys):
    grid = ["--no-record", "--reference-sample", "--z-step", "0.5", "--f-step", "100e6"]
    assert run("calibrate", "reference", LAB, *grid, "--max-points", "500") == 3  # interrupted
    ref = only_run(runs_dir, "calibrate-reference")
    assert "run again with --resume" in capsys.readouterr().out
    assert run("calibrate", "reference", LAB, *grid, "--resume", str(ref)) == 0
    out = capsys.readouterr().out
    assert "853 new points" in out and "M_eff" in out
    fit = json.loads((ref / "reference_fit.json").read_text())
    assert abs(fit["kittel"]["meff_oe"] - 9680) < 300
    assert (ref / "reference_map.png").stat().st_size > 1000

    csv = str(ref / "reference_map.csv")
    assert run("chain", "design", "--map", csv) == 0
    design = only_run(runs_dir, "chain-design") / "chain_design.json"
    chains = json.loads(design.read_text())["chains"]
    assert [c["name"] for c in chains] == ["chain0", "chain1", "chain2"]
    assert all(not c["layout_problems"] for c in chains)
    assert (design.parent / "chain_design.png").stat().st_size > 30_000  # item 5: the drawing

    assert run("chain", "measure", LAB, "--design", str(design), "--map", csv, "--fabricate",
               "--ports", "chain2=3", "--n-avg", "4", "--no-record") == 0
    weights = json.loads((only_run(runs_dir, "chain-measure") / "weights.json").read_text())
    assert weights["mean_abs_dw_pct"]["chain2"] < 6.0  # a coarse 0.5 mm map: a loose bound
    assert (only_run(runs_dir, "chain-measure") / "chain_weights.png").stat().st_size > 10_000

    assert run("position", "optimise", LAB, "--design", str(design), "--map", csv, "--fabricate",
               "--ports", "chain2=3", "--trials", "3", "--track-inputs", "2", "--every", "1",
               "--no-record") == 0
    pos = only_run(runs_dir, "position-optimise")
    data = json.loads((pos / "positions.json").read_text())
    assert data["tracking"]["chain2"]["optimised_at"] == [0, 1]
    assert (pos / "position_tracking.png").exists()

    assert run("source", "calibrate", LAB, "--channels", "4=3.25e9") == 0  # recorded
    assert (only_run(runs_dir, "source-calibrate") / "instrument_io.jsonl").stat().st_size > 0
    cal = json.loads((only_run(runs_dir, "source-calibrate") / "source_calibration.json").read_text())
    assert list(cal["channels"]) == ["4"] and cal["switch_attenuation"]["attenuation_db"]
    assert (only_run(runs_dir, "source-calibrate") / "source_calibration.png").stat().st_size > 10_000


def test_bad_arguments_are_config_errors(runs_dir):
    from hil.bench.calibrate import open_calibration_lab
    from hil.errors import HilError

    with pytest.raises(HilError):
        run("source", "calibrate", LAB, "--channels", "four")
    with pytest.raises(HilError, match="virtual lab"):
        open_calibration_lab(str(Path(LAB).parent / "template_real_bench.yaml"), {"x": 1}, runs_dir)


def test_resume_refuses_changed_settings_and_accumulates_lab_time(runs_dir, capsys, tmp_path):
    grid = ["--no-record", "--reference-sample", "--z-step", "2.5", "--f-step", "1e9",
            "--max-points", "10"]
    assert run("calibrate", "reference", LAB, *grid) == 3
    ref = only_run(runs_dir, "calibrate-reference")
    first = json.loads((ref / "sweep_state.json").read_text())
    assert first["sessions"] == 1 and first["lab_time_s"] > 0
    assert len(first["settings"]["lab_config_sha256"]) == 64

    from hil.errors import HilError

    with pytest.raises(HilError, match=r"settings differ.*nplc: 1.0 in the sweep, 2.0 now"):
        run("calibrate", "reference", LAB, *grid, "--nplc", "2", "--resume", str(ref))
    with pytest.raises(HilError, match=r"power_dbm: 16.0 in the sweep, 10.0 now"):
        run("calibrate", "reference", LAB, *grid, "--power-dbm", "10", "--resume", str(ref))
    other_lab = tmp_path / "lab.yaml"  # the same bench with one limit changed
    other_lab.write_text(Path(LAB).read_text().replace("power_dbm: [-60, 18]",
                                                       "power_dbm: [-60, 17]"))
    with pytest.raises(HilError, match=r"lab_config_sha256: \"[0-9a-f]{64}\" in the sweep"):
        run("calibrate", "reference", str(other_lab), *grid, "--resume", str(ref))
    with pytest.raises(HilError, match=r"--resume .*nowhere: no such run folder"):
        run("calibrate", "reference", LAB, *grid, "--resume", str(runs_dir / "nowhere"))
    assert not (runs_dir / "nowhere").exists()

    assert run("calibrate", "reference", LAB, *grid, "--resume", str(ref)) == 3
    second = json.loads((ref / "sweep_state.json").read_text())
    assert second["sessions"] == 2 and second["lab_time_s"] > first["lab_time_s"]
    assert second["settings"] == first["settings"]
    assert "over 2 session(s)" in capsys.readouterr().out


def test_two_resumes_of_one_folder_cannot_both_run(runs_dir):
    import os
    import subprocess
    import sys
    import time

    grid = ["--no-record", "--reference-sample", "--z-step", "2.5", "--f-step", "1e9"]
    assert run("calibrate", "reference", LAB, *grid, "--max-points", "1") == 3
    ref = only_run(runs_dir, "calibrate-reference")
    # another program resumes the folder and holds it (a sweep that waits in its progress bar)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom hil.locks import BenchLock\n"
         "with BenchLock(__import__('pathlib').Path(sys.argv[1]) / '.lock', 'run folder'):\n"
         "    print('holding', flush=True)\n    time.sleep(30)\n", str(ref)],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert holder.stdout.readline().strip() == "holding"
        from hil.locks import LockedError

        with pytest.raises(LockedError, match=rf"run folder .* is in use by pid {holder.pid}"):
            run("calibrate", "reference", LAB, *grid, "--resume", str(ref))
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.05)
    assert run("calibrate", "reference", LAB, *grid, "--max-points", "1", "--resume", str(ref)) == 3
