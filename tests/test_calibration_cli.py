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

    assert run("chain", "measure", LAB, "--design", str(design), "--map", csv, "--fabricate",
               "--ports", "chain2=3", "--n-avg", "4", "--no-record") == 0
    weights = json.loads((only_run(runs_dir, "chain-measure") / "weights.json").read_text())
    assert weights["mean_abs_dw_pct"]["chain2"] < 6.0  # a coarse 0.5 mm map: a loose bound

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


def test_bad_arguments_are_config_errors(runs_dir):
    from hil.errors import HilError

    with pytest.raises(HilError):
        run("source", "calibrate", LAB, "--channels", "four")
    with pytest.raises(HilError, match="virtual lab"):
        calibrate._open(str(Path(LAB).parent / "template_real_bench.yaml"), {"x": 1}, runs_dir)
