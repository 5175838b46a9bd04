"""Issue 6: the hardware convolution on spin-diode chains (``calibration.mac``), in the virtual lab.

Everything is measured through the drivers; ``World.truth()`` is read only to check. The
fixture measures a reference map and calibrates the source once (about 10 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import sims
from calibration.chain import design_chains, place_chain, virtual_lab_overrides
from calibration.mac import (
    Convolver,
    Ledger,
    PlacedChain,
    ToneMap,
    ToneSource,
    fit_v_max,
    measure_source_settling,
    patches_2x2,
)
from calibration.position import generator_one_hot, optimise_z
from calibration.reference import ReferenceMap, measure_reference_map, rescaled_power
from calibration.source import calibrate_source
from hil.bench.lab import open_lab
from hil.commands.calibrate import REFERENCE_SAMPLE
from hil.conv.hybrid import reference_plan
from sims.virtual_lab import World

LAB = Path(sims.__file__).resolve().parent.parent / "lab_configs" / "virtual.yaml"
SEED = 2024
FREQS = (1.75e9, 2.25e9, 2.75e9, 3.25e9)
KERNELS = {"chain0": (0.52, -0.31, 0.12, -0.6), "chain1": (-0.2, 0.45, 0.33, 0.1),
           "chain2": (0.3, 0.25, -0.5, -0.15)}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("mac") / "reference_map.csv"
    plan = reference_plan()
    with open_lab(LAB, world=World.from_file("thesis_bench.yaml", seed=SEED,
                                             overrides=REFERENCE_SAMPLE)) as lab:
        measure_reference_map(lab, plan, path)
    m = ReferenceMap.load(path)
    m.fit_kittel()
    fit = m.fit_power_rescaling()

    def rescale(f: np.ndarray) -> np.ndarray:
        return rescaled_power(f, fit, 1.0)

    z_um = 1e3 * m.z_for_resonance_mm(np.array(FREQS))
    v_range = (fit["slope_v_per_hz"] * 3.1e9 + fit["intercept_v"]) / 4
    designs = design_chains(m.interpolator(), rescale, z_um, FREQS, KERNELS, v_range_v=v_range)
    with open_lab(LAB) as lab:
        cal = calibrate_source(lab, {i + 1: f for i, f in enumerate(FREQS)})
    return {"map": m, "rescale": rescale, "designs": designs, "cal": cal}


def placed_lab(bench: dict[str, Any]) -> tuple[Any, list[PlacedChain], ToneMap, float]:
    """A fabricated bench with the three chains placed (profile, then Algorithm 2)."""
    designs, cal, rescale = bench["designs"], bench["cal"], bench["rescale"]
    world = World.from_file("thesis_bench.yaml", seed=SEED, overrides=virtual_lab_overrides(designs))
    lab = open_lab(LAB, world=world)
    lab["voltmeter"].configure_voltage(nplc=5)
    tau = max(measure_source_settling(lab, cal, ch)["tau_s"] for ch in (1, 2, 3, 4))
    tones = ToneMap.fit(cal, [1, 2, 3, 4], FREQS, rescale(np.array(FREQS)))
    p1 = np.array(tones.p_x1_mw)
    chains = []
    for k, d in enumerate(designs):
        placed = place_chain(lab, k + 1, d, bench["map"].interpolator(), rescale, float(p1.max()),
                             stage_ref_mm=20.0, fine_span_mm=0.0)
        z0 = placed["stage_z_mm"]
        opt = optimise_z(lab, d, generator_one_hot(k + 1, d.freq_hz, n_avg=4), np.diag(p1), p1,
                         z0 - 0.03, z0 + 0.03, n_trials=15, seed=0)
        chains.append(PlacedChain(d.name, k + 1, list(d.target_w), opt.stage_z_mm, opt.v_max_v))
    return lab, chains, tones, tau


def digit_images(n: int) -> np.ndarray:
    from hil.conv.images import load_digits_images

    return load_digits_images().x_test[:n, 0].numpy().astype(float)


def test_ledger_books_exclusive_time_and_absorbs_reoptimisation():
    t = [0.0]
    led = Ledger(lambda: t[0])
    with led.on("outer"):
        t[0] += 1
        with led.on("inner"):
            t[0] += 2
            led.count("reads", 3)
    with led.on("re-optimisation"):
        with led.on("inner"):
            t[0] += 5
            led.count("reads")
    assert led.time_s == {"outer": 1.0, "inner": 2.0, "re-optimisation": 5.0}
    assert led.ops == {"reads": 3, "reads (re-optimisation)": 1}
    assert led.snapshot() == {"time_s": dict(led.time_s), "ops": dict(led.ops)}


def test_patches_match_the_network():
    from hil.conv.network import patches

    im = digit_images(3)
    ours = patches_2x2(im)
    theirs = patches(torch.as_tensor(im[:, None], dtype=torch.float32)).numpy()
    assert ours.shape == (3, 8, 8, 4) and np.allclose(ours, theirs, atol=1e-7)


def test_tone_source_encodes_settles_and_waits_by_step(bench):
    cal = bench["cal"]
    tones = ToneMap.fit(cal, [1, 2, 3, 4], FREQS, bench["rescale"](np.array(FREQS)))
    with open_lab(LAB) as lab:
        taus = [measure_source_settling(lab, cal, ch)["tau_s"] for ch in (1, 2, 3, 4)]
        for ch, tau in zip((1, 2, 3, 4), taus, strict=True):  # the world's lags, measured back
            assert tau == pytest.approx(lab.world.vco.amplifier[ch - 1].tau_s, rel=0.15), ch
        tau = max(taus)  # the worst channel, as hil conv deploy uses it
        src = ToneSource(lab, cal, tones, Ledger(lab.clock.now_s), tau_s=tau, eps=2e-3)
        # below the amplifier's threshold jump: rounded to the lowest level or to off
        x = src.encode(np.array([0.0, 0.001, 0.5, 1.0]))
        assert x[0] == 0 and x[1] == 0 and x[2] == pytest.approx(0.5) and x[3] == pytest.approx(1.0)
        src.start()
        big = src.full_scale_wait_s()
        src.apply(np.array([0.2, 0.2, 0.2, 0.2]))
        t0 = lab.clock.now_s()
        src._command(src.voltages(np.array([0.25, 0.2, 0.2, 0.2])))
        small = src.wait_needed_s(t0)
        assert 0 < small < 0.75 * big
        src.settle()
        eff = np.array(lab.world.truth()["vco_source"]["amplifier_v_effective"])
        for i, ch in enumerate((1, 2, 3, 4)):  # settled: power within eps of its full scale
            slope = np.polyval(np.polyder(cal.channels[ch].poly_mw), src.target_v[i])
            assert (abs(eff[i] - src.target_v[i]) - 1e-3) * slope <= 1.05 * 2e-3 * tones.p_x1_mw[i]
        src.shutdown()
        assert all(v == 0 for v in lab.world.instruments["vco_amp"].truth()["output_v"].values())


def test_planned_and_algorithm3_measure_the_same_macs_at_a_fraction_of_the_time(bench):
    lab, chains, tones, tau = placed_lab(bench)
    images = digit_images(4)
    out = {}
    try:
        for plan, n in (("planned", 4), ("algorithm3", 1)):
            led = Ledger(lab.clock.now_s)
            src = ToneSource(lab, bench["cal"], tones, led, tau_s=tau)
            conv = Convolver(lab, src, [PlacedChain(**vars(c)) for c in chains], led, plan=plan, every=4)
            calib = patches_2x2(images).reshape(-1, 4)[::7][:16]
            conv.reoptimise = lambda lab, ch, led, conv=conv, calib=calib: fit_v_max(conv, calib)
            t0 = lab.clock.now_s()
            res = conv.run(images[:n])
            out[plan] = (res, (lab.clock.now_s() - t0) / n, src)
            assert lab["source_switch"].port == 0  # RF off after
            assert all(v == 0 for v in lab.world.instruments["vco_amp"].truth()["output_v"].values())
    finally:
        lab.close()
    planned, t_planned, src = out["planned"]
    alg3, t_alg3, _ = out["algorithm3"]
    p = patches_2x2(images)
    zero = p.sum(-1) == 0
    assert np.array_equal(planned.measured, ~zero)               # zeros are never measured
    assert zero.any() and np.all(planned.volts.transpose(0, 2, 3, 1)[zero] == 0)
    assert alg3.measured.all()                                     # Algorithm 3 measures everything
    ops = planned.ledger["ops"]
    assert ops["patches known zero"] == zero.sum()
    assert ops["chain measurements"] == 3 * (len(np.unique(p[~zero], axis=0)))
    w = np.array([c.weights for c in chains])
    encoded = np.array([[[src.encode(q) for q in row] for row in im] for im in p])
    ideal = np.einsum("nhwi,ki->nkhw", encoded, w)
    for res, n in ((planned, 4), (alg3, 1)):
        core = ~zero[:n]
        err = (res.mac - ideal[:n]).transpose(0, 2, 3, 1)[core]
        rel = np.sqrt(np.mean(err ** 2)) / np.sqrt(np.mean(ideal[:n].transpose(0, 2, 3, 1)[core] ** 2))
        assert rel < 0.2, rel
    # the same image, both plans: the MACs agree within the measurement error
    diff = (planned.mac[0] - alg3.mac[0]).transpose(1, 2, 0)[~zero[0]]
    assert np.sqrt(np.mean(diff ** 2)) < 0.2 * np.sqrt(np.mean(ideal[0].transpose(1, 2, 0)[~zero[0]] ** 2))
    print(f"\nlab time per image: planned {t_planned:.0f} s, Algorithm 3 {t_alg3:.0f} s "
          f"({t_alg3 / t_planned:.1f}x)")
    # 8x8 digits have few zero patches and a V_max fit amortised over only four images; the
    # issue-21 comparison on the thesis's 28x28 images (>= 10x) is tests/test_lab_timing.py
    assert t_alg3 > 4 * t_planned


def test_rf_is_switched_off_when_a_reading_fails(bench):
    lab, chains, tones, tau = placed_lab(bench)
    try:
        led = Ledger(lab.clock.now_s)
        src = ToneSource(lab, bench["cal"], tones, led, tau_s=tau)
        conv = Convolver(lab, src, chains, led, plan="planned")
        calls = [0]
        real = lab["voltmeter"].read_voltage_v

        def flaky() -> float:
            calls[0] += 1
            if calls[0] > 5:
                raise TimeoutError("GPIB timeout (injected)")
            return real()

        lab["voltmeter"].read_voltage_v = flaky
        with pytest.raises(TimeoutError, match="injected"):
            conv.run(digit_images(1))
        assert lab["source_switch"].port == 0
        assert all(v == 0 for v in lab.world.instruments["vco_amp"].truth()["output_v"].values())
    finally:
        lab.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="tau_s"):
        ToneSource(None, None, None, None, tau_s=0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plan"):
        Convolver(None, None, [], None, plan="fastest")  # type: ignore[arg-type]


SPLITTER = {"rf": {"output_switch": {"switch": "sp4t", "ports": {1: ["chain0", "chain1"], 2: "chain1",
                                                                 3: "chain2", 4: "fsv"}}},
            "sample": {"devices": {"chain1": {"voltmeter_channel": 2}}}}


def test_splitter_feeds_two_chains_with_half_the_power_each():
    from sims.virtual_lab.config import WorldConfigError
    from sims.virtual_lab.world import SPLITTER_EXCESS

    world = World.from_file("thesis_bench.yaml", seed=SEED, overrides=SPLITTER)
    smb, sp4t = world.instruments["smb"], world.instruments["sp4t"]
    smb.output, smb.freq_hz, smb.power_dbm = True, 2.25e9, 10.0
    world.instruments["source_sel"].state = 2
    sp4t.state = 1
    f0, p0 = world.tones_at("chain0")
    f1, p1 = world.tones_at("chain1")
    sp4t.state = 2
    _, alone = world.tones_at("chain1")
    assert len(f0) == len(f1) == 1 and p0[0] > 0
    assert p1[0] == pytest.approx(alone[0] * SPLITTER_EXCESS / 2, rel=0.2)  # ports differ a little
    assert world.tones_at("chain2")[1][0] < 1e-4 * p0[0]  # only the switch's 50 dB isolation leaks
    bad = {"rf": {"output_switch": {"switch": "sp4t", "ports": {1: ["chain0", "nowhere"]}}}}
    with pytest.raises(WorldConfigError, match="splitter"):
        World.from_file("thesis_bench.yaml", seed=SEED, overrides=bad)


def test_chains_behind_a_splitter_are_read_on_their_channels_in_one_rf_period(bench):
    designs, cal, rescale = bench["designs"], bench["cal"], bench["rescale"]
    overrides = virtual_lab_overrides(designs)
    overrides["rf"] = SPLITTER["rf"]
    overrides["sample"]["devices"]["chain1"]["voltmeter_channel"] = 2
    world = World.from_file("thesis_bench.yaml", seed=SEED, overrides=overrides)
    tones = ToneMap.fit(cal, [1, 2, 3, 4], FREQS, rescale(np.array(FREQS)))
    with open_lab(LAB, world=world) as lab:
        lab["voltmeter"].configure_voltage(nplc=5)
        chains = []
        for d, port, ch in zip(designs, (1, 1, 3), (1, 2, 1), strict=True):
            lab["voltmeter"].channel = ch
            placed = place_chain(lab, port, d, bench["map"].interpolator(), rescale, max(tones.p_x1_mw),
                                 stage_ref_mm=20.0, fine_span_mm=0.0)
            chains.append(PlacedChain(d.name, port, list(d.target_w), placed["stage_z_mm"], 1e-6, ch))
        led = Ledger(lab.clock.now_s)
        conv = Convolver(lab, ToneSource(lab, cal, tones, led, tau_s=1.0), chains, led, group_um=60.0)
        assert conv.groups() == [[0, 1], [2]] or conv.groups() == [[1, 0], [2]]
        calib = patches_2x2(digit_images(2)).reshape(-1, 4)[::5][:12]
        with pytest.raises(RuntimeError, match="start the source"):
            fit_v_max(conv, calib)
        conv.reoptimise = lambda lab, ch, led: fit_v_max(conv, calib)
        res = conv.run(digit_images(1))
    ops = res.ledger["ops"]
    n = ops["chain measurements"] // 3
    # per patch: chain0 and chain1 share the port (no switch change between them) and are
    # read on channels 1 and 2; chain2 needs its own port
    assert ops["voltmeter channel changes"] >= n and ops["switch changes"] <= 2 * n + 2
    w = np.array([c.weights for c in chains])
    ideal = np.einsum("hwi,ki->khw", patches_2x2(digit_images(1))[0], w)
    core = res.measured[0]
    for k in range(3):
        corr = np.corrcoef(res.mac[0, k][core], ideal[k][core])[0, 1]
        assert corr > 0.9, (k, corr)


class _FakeSwitch:
    port = 3


class _FakeLab(dict):
    """What ``Convolver.run`` touches itself (the plan does the measuring)."""

    def __init__(self) -> None:
        super().__init__(source_switch=_FakeSwitch())


class _RecordingPlan:
    """A plan object: 'measures' each patch's sum on every chain and records its blocks."""

    name = "recording"

    def __init__(self) -> None:
        self.blocks: list[range] = []

    def measure_block(self, conv, block, patches, volts, measured, per_image_s, done) -> None:
        self.blocks.append(block)
        for i in block:
            for c in range(len(conv.chains)):
                volts[i, c] = (c + 1) * patches[i].sum(-1)
            measured[i] = True
            per_image_s.append(1.5)
        done(block)


def test_a_plan_object_is_used_and_names_map_through_the_registry():
    from types import SimpleNamespace

    from calibration.mac import PLANS, Algorithm3Plan, PlannedPlan, make_plan

    assert PLANS == {"planned": PlannedPlan, "algorithm3": Algorithm3Plan}
    events: list[str] = []
    source = SimpleNamespace(start=lambda: events.append("start"), shutdown=lambda: events.append("stop"))
    chains = [PlacedChain(f"c{k}", k + 1, [0.25] * 4, 1.0, v_max_v=2.0 * (k + 1)) for k in range(2)]
    plan = _RecordingPlan()
    lab = _FakeLab()
    conv = Convolver(lab, source, chains, Ledger(lambda: 0.0), plan=plan, every=2,  # type: ignore[arg-type]
                     source_port=1)
    assert conv.plan is plan
    finished: list[range] = []
    images = np.random.default_rng(0).random((5, 3, 3))
    res = conv.run(images, on_done=lambda idx, mac, volts: finished.append(idx))
    assert plan.blocks == [range(0, 2), range(2, 4), range(4, 5)] == finished
    assert events == ["start", "stop"] and lab["source_switch"].port == 0  # RF off after
    expected = patches_2x2(images).sum(-1) / 2.0  # chain c: (c + 1) x sum / (2 (c + 1))
    assert np.allclose(res.mac, expected[:, None])
    assert res.measured.all() and res.lab_s_per_image == [1.5] * 5
    # the names build the registry's plans; anything else is refused, naming what is allowed
    assert isinstance(make_plan("planned"), PlannedPlan)
    assert isinstance(Convolver(lab, source, chains, Ledger(lambda: 0.0), plan="algorithm3",  # type: ignore[arg-type]
                                source_port=1).plan, Algorithm3Plan)
    with pytest.raises(ValueError, match="plan must be one of 'planned', 'algorithm3'"):
        make_plan("fastest")
    with pytest.raises(TypeError, match="measure_block"):
        make_plan(object())  # type: ignore[arg-type]
