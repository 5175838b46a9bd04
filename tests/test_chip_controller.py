"""The oscillator-array chip controller over pyvisa: the virtual instrument
(``sims.virtual_lab.chip``), its driver (``drivers.oscillator_chip``), the ``lab:`` backend and
chip-in-the-loop training through ``lab_configs/virtual.yaml``."""

import dataclasses
import json

import numpy as np
import pytest

from drivers.base import InstrumentError, LimitError
from drivers.oscillator_chip import OscillatorChipController, decode_block, encode_block
from hil.bench.lab import package_root
from hil.chip.backends import InstrumentChipBackend
from hil.cli import main
from sims.oscillator_device import DeviceConfig, OscillatorArrayDevice
from sims.virtual_lab import VirtualVisaLibrary, World

LAB = package_root() / "lab_configs" / "virtual.yaml"
ADDRESS = "TCPIP0::192.168.1.70::inst0::INSTR"
CFG = DeviceConfig(n_in=2, n_layers=2, n_hidden=5)


def f32(a):
    """Values a float32 block carries exactly."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def layers(seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    N = CFG.n_hidden
    out = []
    for li in range(CFG.n_layers):
        w_int = rng.uniform(-scale, scale, (N, N))
        np.fill_diagonal(w_int, 0.0)
        out.append({"W_ext": f32(rng.uniform(-scale, scale, (N, CFG.n_in if li == 0 else N))),
                    "W_int": f32(w_int), "b": f32(np.full(N, 0.05))})
    return out


def test_driver_round_trip_matches_the_in_memory_chip():
    u = f32(np.random.default_rng(1).random((3, 7, CFG.n_in)))
    ref = OscillatorArrayDevice(CFG, seed=3)
    ref.program(layers())
    expected = ref.run(u)
    lab, chip, world = InstrumentChipBackend._open_chip(LAB)  # the chip of virtual.yaml's world
    assert chip.clock is world.clock  # opened through the lab: it waits on the virtual clock
    with lab:
        assert "OSC-ARRAY" in chip.identity
        cfg = chip.configure(dataclasses.asdict(CFG), seed=3)
        assert (cfg["n_in"], cfg["n_layers"], cfg["n_hidden"]) == (2, 2, 5)
        chip.upload(layers(), cfg)
        for got, want in zip(chip.programmed(cfg), ref.programmed(), strict=True):
            for key in ("W_ext", "W_int", "b"):
                np.testing.assert_array_equal(got[key], f32(want[key]))
        t0 = world.clock.now_s()
        r = chip.run(u, cfg)
        assert world.clock.now_s() - t0 >= expected.device_time_s  # the run costs lab time
        np.testing.assert_array_equal(r["outputs"], f32(expected.outputs))
        np.testing.assert_array_equal(r["states"], f32(expected.states))
        assert r["device_time_s"] == pytest.approx(expected.device_time_s)
        assert chip.describe_device()["identity"]
    assert world.truth()["instruments"]["chip"]["seed"] == 3


def test_oversize_and_malformed_blocks_are_refused():
    world = World.from_file("thesis_bench.yaml")
    lib = VirtualVisaLibrary.for_world(world)
    with OscillatorChipController.open(ADDRESS, lib, options={"max_block_bytes": 4096},
                                       limits={"points": [1, 50]}) as chip:
        cfg = chip.configure(dataclasses.asdict(CFG), seed=0)
        chip.upload(layers(), cfg)
        with pytest.raises(LimitError, match="points=60"):
            chip.run(np.zeros((1, 60, CFG.n_in)), cfg)
        with pytest.raises(LimitError, match="exceeds max_block_bytes"):  # refused before sending
            chip.run(np.zeros((100, 10, CFG.n_in)), cfg)
        with pytest.raises(LimitError, match="finite"):
            chip.run(np.full((1, 2, CFG.n_in), np.nan), cfg)
        # the instrument's side: a declared length over its limit, a bad header, a wrong count
        world.instruments["chip"].spec["max_block_bytes"] = 64
        chip.write_raw(b"RUN 1,100," + encode_block(np.zeros(200, "<f4").tobytes()) + b"\n", "RUN")
        with pytest.raises(InstrumentError, match="-223"):
            chip.check_errors()
        world.instruments["chip"].spec["max_block_bytes"] = 1 << 20
        chip.write_raw(b"PAR:DATA #x12\n", "PAR:DATA")
        chip.write_raw(b"PAR:DATA " + encode_block(np.zeros(3, "<f4").tobytes()) + b"\n", "PAR:DATA")
        chip.write_raw(b"RUN 2,2," + encode_block(np.zeros(5, "<f4").tobytes()) + b"\n", "RUN")
        with pytest.raises(InstrumentError) as err:
            chip.check_errors()
        assert str(err.value).count("-161") == 3
        chip.write_raw(b"RUN 1,1," + encode_block(b"\0\0\xc0\x7f" * 2) + b"\n", "RUN")  # NaN
        with pytest.raises(InstrumentError, match="-224"):
            chip.check_errors()
        chip.write_raw(b"PAR:DATA #9999999", "PAR:DATA")  # never completed: cleared below
        chip.write_raw(b"RUN 1,1\n", "RUN")
        chip.clear_errors()
        chip.check_errors()  # empty again
        r = chip.run(f32(np.ones((1, 3, CFG.n_in))), cfg)  # still usable
        assert r["outputs"].shape == (1, 3, 5)
    assert decode_block(encode_block(b"ab\ncd") + b"\n") == b"ab\ncd"
    for bad in (b"12", b"#0", b"#2x1ab", b"#15abc", b"#13abcdef"):
        with pytest.raises(ValueError):
            decode_block(bad)


def test_chip_in_the_loop_training_through_the_virtual_lab(runs_dir, capsys):
    args = ["train", "--preset", "digits", "--seeds", "0", "--epochs", "1", "--set", "model.n_hidden=4",
            "--set", "model.n_layers=2", "--set", "train.batch_size=450", "--no-progress",
            "--backend", "lab:lab_configs/virtual.yaml", "--in-the-loop", "--twin", "nominal"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "chip-in-the-loop (lab:lab_configs/virtual.yaml, nominal twin)" in out
    folder = next(runs_dir.iterdir())
    summary = json.loads((folder / "summary.json").read_text())
    dev = summary["device"][0]
    assert dev["device_runs"] > 0 and dev["device_uploads"] > 0 and dev["device_time_s"] > 0
    backends = json.loads((folder / "backends.json").read_text())
    assert backends[0]["backend"] == "lab" and "OSC-ARRAY" in backends[0]["identity"]["idn"]


def test_bad_backend_names_are_refused_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--backend", "lab:", "--epochs", "1"])
    assert "lab:<lab config>" in capsys.readouterr().err
