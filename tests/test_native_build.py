"""The native kernel as a real source file: package data, the named-field call interface, the
build's cache key and error reporting, HIL_REQUIRE_NATIVE, the engine record of a run folder,
the engine registry, and the kernel's neuron functions against sims/neurons.py."""

import ctypes
import fnmatch
import json
import os
import shutil
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

from hil import config
from hil.config import ModelConfig
from hil.errors import ConfigError
from hil.network import engine
from hil.network.model import DynamicalNetwork
from hil.runs import RunFolder
from sims.neurons import (
    HELD_DRIVE_TYPES,
    NEURON_TYPES,
    PSI_COEF,
    Z_CAP,
    Z_SERIES,
    drive_gain,
    drive_gain_derivative,
    held_drive_step,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def isolated_native(monkeypatch, tmp_path):
    """A fresh, private native-library state: the process-wide cached library (and its build
    record) is restored afterwards, so a failed build here never reaches other tests."""
    saved_lib, saved_info = list(engine._native_lib), dict(engine._native_info)
    engine._native_lib.clear()
    monkeypatch.setenv("HIL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HIL_REQUIRE_NATIVE", raising=False)
    monkeypatch.delenv("HIL_CXXFLAGS", raising=False)
    yield
    engine._native_lib[:] = saved_lib
    engine._native_info.clear()
    engine._native_info.update(saved_info)


def _broken_compiler(tmp_path: Path) -> str:
    script = tmp_path / "broken-cxx"
    script.write_text("#!/bin/sh\necho 'engine_kernel.cpp:12: error: boom' >&2\nexit 1\n")
    script.chmod(0o755)
    return str(script)


# ---------------------------------------------------------------------------- the source file
def test_the_kernel_is_a_real_file_shipped_as_package_data():
    src = engine.KERNEL_SOURCE
    assert src == Path(engine.__file__).with_name("engine_kernel.cpp") and src.is_file()
    assert "int hil_scan(int dtype, int backward, const HilScanArgs* args)" in src.read_text()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["hil"]
    rel = src.relative_to(ROOT / "hil").as_posix()
    assert any(fnmatch.fnmatch(rel, p) for p in patterns), (rel, patterns)
    assert not hasattr(engine, "_NATIVE_SOURCE")  # no second copy in a Python string


def test_the_constants_of_sims_neurons_come_as_defines_not_prepended_text():
    flags = engine._kernel_flags()
    assert f"-DHIL_Z_CAP={Z_CAP!r}" in flags and f"-DHIL_Z_SERIES={Z_SERIES!r}" in flags
    psi = next(f for f in flags if f.startswith("-DHIL_PSI_A="))
    assert [float(c) for c in psi.split("=", 1)[1].strip("{}").split(",")] == PSI_COEF
    text = engine.KERNEL_SOURCE.read_text()
    assert "#define HIL_Z_CAP" not in text and "#error" in text  # defined once: in sims/neurons.py


# ---------------------------------------------------------------------------- call interface
def test_the_argument_struct_matches_the_librarys(native_lib):
    size = ctypes.c_int64()
    offsets = (ctypes.c_int64 * 64)()
    n = native_lib.hil_scan_args_layout(ctypes.byref(size), offsets, 64)
    fields = engine.HilScanArgs._fields_
    assert n == len(fields) and size.value == ctypes.sizeof(engine.HilScanArgs)
    assert list(offsets[:n]) == [getattr(engine.HilScanArgs, name).offset for name, _ in fields]


def test_a_mismatched_struct_is_refused_at_load(native_lib, monkeypatch):
    class Short(ctypes.Structure):  # one field fewer than the kernel's
        _fields_ = engine.HilScanArgs._fields_[:-1]

    monkeypatch.setattr(engine, "HilScanArgs", Short)
    private = ctypes.CDLL(native_lib._name)  # its own function objects: the shared one is untouched
    with pytest.raises(RuntimeError, match="does not match"):
        engine._declare(private)


def test_arguments_are_named_and_checked():
    with pytest.raises(AttributeError):
        engine.HilScanArgs(substep=4)  # misspelt: refused, not ignored
    with pytest.raises(TypeError):
        engine.HilScanArgs(*range(len(engine.HilScanArgs._fields_) + 1))
    args = engine.HilScanArgs(K=2, M=12, h=0.25)
    assert (args.K, args.M, args.h, args.C) == (2, 12, 0.25, None)


def test_a_call_names_its_tensors(native_lib):
    dyn = engine.Dynamics("spintronic", 0.1, 1, torch.ones(1, 1, 3), None, None)
    call = engine._NativeCall(native_lib, torch.Size((1, 2, 4, 3)), torch.float64, dyn)
    with pytest.raises(KeyError, match="no tensor argument 'K'"):
        call.run(False, {"K": torch.zeros(1, dtype=torch.float64)})


# ---------------------------------------------------------------------------- build and cache
def test_the_cache_key_covers_flags_compiler_and_source(monkeypatch):
    src = engine.KERNEL_SOURCE.read_bytes()
    monkeypatch.delenv("HIL_CXXFLAGS", raising=False)
    base = engine._kernel_flags()
    key = engine._cache_key("g++", "g++ 12", base, src)
    monkeypatch.setenv("HIL_CXXFLAGS", "-DHIL_EXTRA='a b' -fno-tree-vectorize")
    extra = engine._kernel_flags()
    assert extra == [*base, "-DHIL_EXTRA=a b", "-fno-tree-vectorize"]  # shell-split, appended
    assert engine._cache_key("g++", "g++ 12", extra, src) != key
    assert engine._cache_key("g++", "g++ 13", base, src) != key
    assert engine._cache_key("clang++", "g++ 12", base, src) != key
    assert engine._cache_key("g++", "g++ 12", base, src + b"\n") != key
    assert engine._cache_key("g++", "g++ 12", base, src) == key


def test_a_failing_compiler_names_file_and_line(isolated_native, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", _broken_compiler(tmp_path))
    with pytest.raises(RuntimeError, match="engine_kernel.cpp:12: error: boom"):
        engine._build_native()
    with pytest.warns(RuntimeWarning, match="engine_kernel.cpp:12: error: boom"):
        assert engine.native_library() is None  # the fallback: the torch back end runs
    assert "boom" in engine.native_record()["error"]


def test_require_native_raises_instead_of_falling_back(isolated_native, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", _broken_compiler(tmp_path))
    monkeypatch.setenv("HIL_REQUIRE_NATIVE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning-and-fallback
        with pytest.raises(RuntimeError, match="(?s)HIL_REQUIRE_NATIVE.*engine_kernel.cpp:12: error: boom"):
            engine.native_library()
        with pytest.raises(RuntimeError, match="boom"):  # every time, not once
            engine.native_library()


def test_real_compiler_errors_point_into_the_real_file(isolated_native, tmp_path, monkeypatch):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        pytest.skip("no C++ compiler")
    lines = engine.KERNEL_SOURCE.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("namespace {")) + 1
    lines.insert(at, "this is not C++;")
    bad = tmp_path / "src" / "engine_kernel.cpp"
    bad.parent.mkdir()
    bad.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(engine, "KERNEL_SOURCE", bad)
    with pytest.raises(RuntimeError, match=rf"engine_kernel\.cpp:{at + 1}:"):
        engine._build_native()


# ---------------------------------------------------------------------------- run record
def test_environment_json_records_the_engine(runs_dir, native_lib):
    """Every job records the engine it runs; a training run's environment.json says which."""
    from hil.api import train

    folder = RunFolder.create("train", runs_dir)
    engine.record_engine(folder, "fast")
    rec = json.loads(folder.file("environment.json").read_text())["engine"]
    assert rec["name"] == "fast" and rec["native"] is True
    assert rec["library"] == native_lib._name and rec["compiler"]
    assert "-O3" in rec["flags"] and any(f.startswith("-DHIL_Z_CAP=") for f in rec["flags"])
    previous = engine.set_native(False)
    try:
        engine.record_engine(folder, "reference")
    finally:
        engine.set_native(previous)
    rec = json.loads(folder.file("environment.json").read_text())["engine"]
    assert rec["name"] == "reference" and rec["native"] is False
    assert json.loads(folder.file("environment.json").read_text())["python"]  # the rest is kept
    run = train(config.load_config(preset="digits", overrides=["train.epochs=1",
                                                               "model.n_hidden=8"],
                                   seeds=[0]), runs_dir=runs_dir, progress=False)
    rec = json.loads((run.folder / "environment.json").read_text())["engine"]
    assert rec["name"] == "fast" and rec["native"] is True


# ---------------------------------------------------------------------------- engine registry
def test_engines_are_a_registry():
    assert tuple(engine.ENGINES) == config.ENGINES
    assert engine.get_engine("fast") is engine.run_fast
    assert engine.get_engine("reference") is engine.run_reference
    with pytest.raises(ConfigError, match="train.engine.*'rk4'.*fast, reference"):
        engine.get_engine("rk4")
    net = DynamicalNetwork([ModelConfig(n_hidden=4)], 1, 2, [0])
    net.engine = "rk4"
    with pytest.raises(ConfigError, match="allowed: fast, reference"):
        net(torch.rand(2, 3, 1))


# ---------------------------------------------------------------------------- neuron physics
def _grid(dtype: torch.dtype) -> torch.Tensor:
    return torch.linspace(-1.5, 2.5, 401, dtype=dtype)


@pytest.mark.parametrize("kind", NEURON_TYPES)
def test_python_gains_are_those_of_sims_neurons(kind):
    x = _grid(torch.float64)
    assert torch.equal(engine._gain(kind, x), drive_gain(kind, x))
    gdx = engine._gain_dx(kind, x)
    ref = drive_gain_derivative(kind, x)
    if kind in engine.CONSTANT_GAIN_KINDS:
        assert gdx is None and torch.equal(ref, torch.zeros_like(x))
    else:
        assert torch.equal(gdx, ref) and not torch.equal(ref, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", NEURON_TYPES)
def test_kernel_gain_and_output_are_those_of_sims_neurons(native_lib, kind, dtype):
    x = _grid(dtype)[:397]  # not a multiple of the tile width: the padded lanes are dropped
    got = engine.native_neuron(native_lib, kind, x)
    assert torch.equal(got["gain"], drive_gain(kind, x))
    tanh = kind == "ctrnn"
    out = torch.tanh(x.double()) if tanh else x.double()
    # float64: libm per lane; float32: the kernel's vector tanh (a few ulp)
    tol = dict(rtol=0, atol=1e-15) if dtype == torch.float64 else dict(rtol=0, atol=4e-7)
    torch.testing.assert_close(got["out"].double(), out, **tol)
    torch.testing.assert_close(got["out_dx"].double(), 1 - out**2 if tanh else torch.ones_like(out),
                               **(tol if dtype == torch.float64 else dict(rtol=0, atol=1e-6)))


@pytest.mark.parametrize(("kind", "floor"), [*((k, 0.0) for k in HELD_DRIVE_TYPES),
                                             ("spintronic", 0.02)])  # the floor: spintronic only
def test_kernel_held_drive_step_is_that_of_sims_neurons(native_lib, kind, floor):
    x, D = torch.meshgrid(torch.linspace(0.0, 1.0, 21, dtype=torch.float64),
                          torch.linspace(-4.0, 6.0, 37, dtype=torch.float64), indexing="ij")
    x, D = x.reshape(-1), D.reshape(-1)
    gamma, q, h = 1.3, 0.4 if kind == "spintronic" else 0.0, 0.35
    got = engine.native_neuron(native_lib, kind, x, D, gamma, q, h, floor)
    ref = held_drive_step(kind, x, D, torch.tensor(gamma, dtype=torch.float64), h,
                          torch.tensor(q, dtype=torch.float64) if kind == "spintronic" else None,
                          torch, True, torch.tensor(floor, dtype=torch.float64) if floor else None)
    for name, want in zip(("step", "step_dx", "step_dD"), ref, strict=True):
        torch.testing.assert_close(got[name], want.expand_as(x), rtol=1e-13, atol=1e-14)
    assert got["step"].std() > 0.05  # the grid does exercise the step
