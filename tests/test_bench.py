"""Smoke test of the engine benchmark at a tiny size: every row is there and the
implementations agree (no timing assertions: this only checks that the benchmark works)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchdiffeq")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_engine.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_engine", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_engine"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_runs_and_implementations_agree(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "bench.json"
    rows = bench.main(["--seeds", "1,2", "--batch", "6", "--points", "5", "--hidden", "4",
                       "--layers", "2", "--rounds", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert {(r["impl"], r["seeds"]) for r in rows} == {(i, k) for i in bench.IMPLS for k in (1, 2)}
    for r in rows:
        assert r["median_ms"] > 0 and math.isfinite(r["sample_steps_per_s"])
        assert r["loss_rel_diff"] < 1e-5, r
        assert r["grad_rel_diff"] < 1e-3, r
        assert r["state_diff"] < 1e-5, r
        assert r["rounds"] == 1
        assert f"{r['impl']:<12} {r['seeds']:>5}" in printed
    assert "2 seeds at once take" in printed
    assert json.loads(out.read_text())["rows"] == rows


def test_benchmark_ctrnn_rows_agree(capsys):
    """``--neuron ctrnn`` runs every implementation on the CTRNN (tanh outputs, no filter)."""
    bench = _load()
    rows = bench.main(["--neuron", "ctrnn", "--seeds", "1", "--batch", "6", "--points", "5",
                       "--hidden", "4", "--layers", "2", "--rounds", "1", "--no-memory"])
    assert {r["impl"] for r in rows} == set(bench.IMPLS)
    for r in rows:
        assert r["loss_rel_diff"] < 1e-5 and r["grad_rel_diff"] < 1e-3 and r["state_diff"] < 1e-5, r
    assert "ctrnn" in capsys.readouterr().out


def test_subnormal_benchmark_runs(tmp_path, capsys, native_lib):
    """Smoke test of bench_subnormals.py: both modes run on the same parameters and agree (no
    timing assertion; whether subnormals appear depends on training longer than this)."""
    from hil.network import engine

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_subnormals.py"
    spec = importlib.util.spec_from_file_location("bench_subnormals", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "sub.json"
    res = mod.main(["--warmup-epochs", "1", "--rounds", "1", "--json", str(out)])
    assert set(res["median_ms"]) == {"flush", "subnormal"}
    assert res["max_state_diff"] < 1e-30 and 0 <= res["subnormal_state_fraction"] < 1
    assert engine.set_flush_subnormals(True) is True  # the default is restored
    assert json.loads(out.read_text())["slowdown_without_flush"] > 0
    assert "without flush-to-zero" in capsys.readouterr().out
