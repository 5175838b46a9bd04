"""Issue 21: the virtual lab held on several thesis figures at once (fast physics checks).

Each test reads the lab's physics directly (``World.sample``'s circuit, the switches'
transmission, the VCO source's amplifier), not through the drivers: they are fixed points of
the simulation that the slower driver-level tests (``test_virtual_lab_physics.py``,
``test_calibration_routines.py``) build on. Powers are at the source's output, as the thesis
quotes them; the bench's switches and holder sit between it and the chip, as on the real
bench. Tolerances: 30 % on voltages (the thesis reads them off figures), tighter where the
thesis is precise. Run with ``-s`` for the numbers.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from calibration.chain import (
    THESIS_FREQS_HZ,
    THESIS_WEIGHTS,
    chain_voltage_v,
    default_blocks,
    synapse_factors,
)
from sims.spindiode import chain_network, kittel_frequency_hz
from sims.virtual_lab import World
from sims.virtual_lab.sample import Pose

SEED = 2024  # lab_configs/virtual.yaml's seed
#: table 3.1 / section 4.3.2: V_max = V_range / max|w| at 200 mW base power
THESIS_VMAX_UV = {"chain0": 63.3, "chain1": 98.8, "chain2": 103.8}
THESIS_RANGE_UV = 25.0  # V_range (thesis 3.5.2, 4.6.2)
PORT = {"chain0": 1, "chain1": 2, "chain2": 3}
SMB_PORT = 2  # the precise generator on the source selector
#: no fabrication spread (the design model's identical diodes)
IDENTICAL = {"fabrication": {"width_sigma_um": 0.0, "width_pair_sigma_um": 0.0,
                             "contact_sigma_ohm": 0.0, "contact_pair_sigma_ohm": 0.0,
                             "position_sigma_um": 0.0, "position_pair_sigma_um": 0.0,
                             "meff_sigma_frac": 0.0,
                             "meff_pair_sigma_frac": 0.0, "phase_sigma_deg": 0.0,
                             "phase_pair_sigma_deg": 0.0, "wire_bond_sigma_frac": 0.0,
                             "pad_capacitance_sigma_frac": 0.0,
                             "placement_sigma_mm": {"x": 0.0, "y": 0.0, "z": 0.0},
                             "placement_rotation_sigma_deg": 0.0},
             "holder": {"ripple_db": 0.0}}
#: chapter 2 glued near its design position (as tests/test_virtual_lab_physics.py does)
NEAR = {"fabrication": {"placement_sigma_mm": {"x": 0.05, "y": 0.2, "z": 0.05}}}


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def eq_3_3(freq_hz: np.ndarray) -> np.ndarray:
    """P / P0 of thesis eq. 3.3 as printed (normalised at 3.1 GHz; fine below 3.5 GHz)."""
    f_ghz = np.asarray(freq_hz, float) / 1e9
    return (-40 * 3.1 + 150) / (-40 * f_ghz + 150)


def line_ratio(world: World, device: str, freq_hz: np.ndarray) -> np.ndarray:
    """Power ratio from the generator's output to ``device``'s RF line (both switches set)."""
    sel, sp4t = world.instruments["source_sel"], world.instruments["sp4t"]
    port = next(p for p, name in world.rf["output_switch"]["ports"].items() if name == device)
    sel.state, sp4t.state = SMB_PORT, port
    return sel.ratio(SMB_PORT, freq_hz) * sp4t.ratio(port, freq_hz)


def sweep_v(world: World, device: str, freq_hz: np.ndarray, source_w: np.ndarray | float,
            pose: Pose) -> np.ndarray:
    """One tone at a time at each frequency, ``source_w`` at the generator (heating included)."""
    dev = world.sample.devices[device]
    f = np.asarray(freq_hz, float)
    p = np.broadcast_to(np.asarray(source_w, float), f.shape) * line_ratio(world, device, f)
    return np.array([world.sample.device_voltage_v(dev, f[i:i + 1], p[i:i + 1], pose, 0.0)
                     for i in range(len(f))])


def pose_at(world: World, z_offset_mm: float = 0.0) -> Pose:
    """The chip's pose with the stages adding ``z_offset_mm`` along the gradient."""
    return world.sample.pose({"z": z_offset_mm}, 0.0)


# --------------------------------------------------------------------------- Fig. 2.14


def fig_2_14(seed: int, overrides: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    world = World.from_file("chapter2.yaml", seed=seed, overrides=merged(NEAR, overrides or {}))
    f = np.arange(1.6e9, 3.0e9, 5e6)
    pose = pose_at(world)
    return {name: sweep_v(world, name, f, 0.1, pose)
            for name in ("synapse_p40", "synapse_0", "synapse_m40")}


def test_fig_2_14_double_diode_synapse() -> None:
    """Thesis 2.7.3 / Fig. 2.14 at 100 mW: dz = +-40 um give +-60 uV peaks "of the same
    amplitude", dz = 0 "a negligible amplitude", and each is "a single narrow peak with no
    additional background". Six fabricated chips (their bonds differ by ~25 %, so "the same"
    is held to 25 %)."""
    residuals, lobes = [], []
    for seed in (3, 5, 11, 2024, 1, 2):
        c = fig_2_14(seed)
        plus, minus, zero = c["synapse_p40"], c["synapse_m40"], c["synapse_0"]
        peak_p, peak_m = float(plus.max()), float(-minus.min())
        residual = float(np.max(np.abs(zero))) / peak_p
        k = int(np.argmax(plus))
        lobe = max(float(-plus[:k].min()), float(-plus[k:].min())) / peak_p
        print(f"\nseed {seed}: +40 um {peak_p * 1e6:.1f} uV, -40 um {-peak_m * 1e6:.1f} uV, "
              f"dz = 0 {100 * residual:.1f} % of the +40 um peak, side lobe {100 * lobe:.0f} %")
        for peak in (peak_p, peak_m):
            assert peak == pytest.approx(60e-6, rel=0.3)
        assert peak_p == pytest.approx(peak_m, rel=0.25)
        residuals.append(residual)
        lobes.append(lobe)
    # "negligible": what the pair's mismatch leaves is a few % of the +-40 um peaks
    assert max(residuals) < 0.1 and float(np.mean(residuals)) < 0.05
    # one peak: a difference of two antilorentzians dips by ~1/8 on each side, the 1/f
    # prefactor and the small symmetric part deepen the low one to ~20 %; no second peak
    assert max(lobes) < 0.3 and float(np.mean(lobes)) < 0.25


# --------------------------------------------------------------------------- table 3.1


def place_and_measure(world: World, name: str, p0_w: float = 0.2) -> tuple[float, np.ndarray]:
    """Algorithm 2 without the noise: the stage z where the chain's weights best match table 3.1
    (weights from V(f_i) with eq. 3.3's powers), and V_max (least squares) there. Returns
    (V_max, V(f_i))."""
    f = np.array(THESIS_FREQS_HZ)
    p = p0_w * eq_3_3(f)
    w = np.array(THESIS_WEIGHTS[name])
    # around the design position: the glue error (truth, for this physics check) taken out
    glue_mm = float(world.sample.placement_error_mm[2])
    shifts = -glue_mm + np.arange(-0.3, 0.3, 0.002)
    volts = [sweep_v(world, name, f, p, pose_at(world, dz_mm)) for dz_mm in shifts]
    loud = max(float(np.max(np.abs(v))) for v in volts)
    best: tuple[float, float, np.ndarray] | None = None
    for v in volts:  # where the chain's lines sit on the inputs (not far out of band)
        v_max = float(v @ w / (w @ w))
        if v_max <= 0 or np.max(np.abs(v)) < 0.3 * loud:
            continue
        misfit = float(np.sqrt(np.mean((v / v_max - w) ** 2)))
        if best is None or misfit < best[0]:
            best = (misfit, v_max, v)
    assert best is not None and best[0] < 0.15, best
    return best[1], best[2]


def test_table_3_1_chains_vmax_and_range_at_200_mw() -> None:
    """Section 4.3.2: V_max = 63.3 / 98.8 / 103.8 uV and (3.5.2, 4.6.2) a chain range (the
    largest |V| at the inputs, the design's V_range) of ~25 uV at 200 mW base power (eq. 3.3),
    for the table-3.1 chains of identical diodes: what the model's constants give."""
    world = World.from_file("thesis_bench.yaml", seed=SEED, overrides=IDENTICAL)
    for name, want in THESIS_VMAX_UV.items():
        v_max, v = place_and_measure(world, name)
        rng = float(np.max(np.abs(v)))
        print(f"\n{name}: V_max {v_max * 1e6:.1f} uV (thesis {want}), range at the inputs "
              f"{rng * 1e6:.1f} uV (thesis {THESIS_RANGE_UV}), V(f_i) {np.round(v * 1e6, 1)} uV")
        assert v_max * 1e6 == pytest.approx(want, rel=0.3)
        assert rng * 1e6 == pytest.approx(THESIS_RANGE_UV, rel=0.3)


def test_table_3_1_chains_vmax_with_fabrication_spread() -> None:
    """The same on fabricated chips (seed 2024, the virtual lab's, and four others): each
    chain's median V_max within 30 %; any one chip within the thesis's own spread (its
    measured chains needed rescaling by 1.75, 1 and 1.5 to match, thesis 3.6)."""
    ratios: dict[str, list[float]] = {name: [] for name in THESIS_VMAX_UV}
    for seed in (SEED, 1, 2, 3, 4):
        world = World.from_file("thesis_bench.yaml", seed=seed)
        for name, want in THESIS_VMAX_UV.items():
            ratios[name].append(1e6 * place_and_measure(world, name)[0] / want)
    for name, r in ratios.items():
        print(f"\n{name}: V_max / thesis over seeds {np.round(r, 2)}")
        assert float(np.median(r)) == pytest.approx(1.0, abs=0.3)
        assert all(1 / 1.75 < x < 1.75 for x in r)


# --------------------------------------------------------------------------- Fig. 3.8


SYNAPSE_70 = {"sample": {"devices": {"__replace__": True, "s70": {
    "origin_um": [0, 0], "synapses": [{"v_um": 0, "dz_um": 70}]}}},
    "rf": {"output_switch": {"switch": "sp4t", "ports": {"__replace__": True, 1: "s70",
                                                         4: "fsv"}}}}


def synapse_peak_vs_resonance(overrides: dict[str, Any] | None = None) -> tuple[np.ndarray, ...]:
    """Fig. 3.8b: the peak of a dz = 70 um synapse against its resonance frequency."""
    world = World.from_file("thesis_bench.yaml", seed=1,
                            overrides=merged(IDENTICAL, SYNAPSE_70, overrides or {}))
    dev = world.sample.devices["s70"]
    f = np.arange(1.2e9, 4.2e9, 10e6)
    ratio = line_ratio(world, "s70", f)
    fr, peak = [], []
    for z in np.arange(0.15, 1.1, 0.025):
        pose = Pose(0.0, 0.0, float(z), 0.0, 0.0)
        v = world.sample.response_v_per_w(dev, f, pose, 0.0) * ratio * 0.1
        fr.append(np.mean(world.sample.in_plane(pose, dev.index)[0]))  # in-plane field, Oe
        peak.append(v.max())
    return kittel_frequency_hz(np.array(fr)), np.array(peak)


def test_fig_3_8_synapse_amplitude_falls_with_frequency() -> None:
    """Thesis 3.5.2 / Fig. 3.8: the peak of a dz = 70 um synapse falls with its resonance
    frequency as the linear fit -40 f + 150 (f in GHz) that eq. 3.3 inverts: relative to 3.1
    GHz, x3.08 / 2.31 / 1.54 / 0.77 at 1.75 / 2.25 / 2.75 / 3.25 GHz, held within 20 %."""
    fr, peak = synapse_peak_vs_resonance()
    f = np.array(THESIS_FREQS_HZ)
    lab = np.interp(f, fr, peak) / np.interp(3.1e9, fr, peak)
    thesis = 1 / eq_3_3(f)
    print(f"\nFig. 3.8 relative peaks: lab {np.round(lab, 2)}, thesis {np.round(thesis, 2)}")
    np.testing.assert_allclose(lab, thesis, rtol=0.2)


# --------------------------------------------------------------------------- design vs lab


@pytest.mark.parametrize("blocks", [[[0, 1], [2, 3]], [[0], [1], [2], [3]], [[0, 1, 2, 3]],
                                    [[0], [1, 2], [3]], [[0, 1, 2], [3, 4, 5], [6, 7, 8]]])
def test_design_law_is_the_lab_circuit_law(blocks: list[list[int]]) -> None:
    """calibration.chain's c_j (design model) equals what sims.spindiode.chain_network (the
    lab's Kirchhoff circuit) gives for identical diodes, relative to the halved reference pair
    (thesis 3.5.1): c_j = 4 * (power share) * (DC weight) of one diode."""
    n = sum(len(b) for b in blocks)
    block_of = np.zeros(n, int)
    for b, members in enumerate(blocks):
        block_of[members] = b
    diode_block = np.repeat(block_of, 2)  # two diodes per synapse
    _, frac, weight = chain_network(np.full(2 * n, 100.0), diode_block)
    _, frac_ref, weight_ref = chain_network(np.full(2, 100.0), np.zeros(2, int))
    v_ref_per_emf = float(np.sum(frac_ref * weight_ref)) / 2  # pair voltage, halved
    lab = (frac * weight)[::2] / v_ref_per_emf
    np.testing.assert_allclose(synapse_factors(blocks), lab, rtol=1e-12)
    if n == 4:
        assert default_blocks(4) == [[0, 1], [2, 3]]


def test_design_model_predicts_the_lab_chain() -> None:
    """The chain design model (calibration.chain.chain_voltage_v, fed the reference devices'
    map) and the lab's chain agree within 3 % for identical diodes (issue 21: they differed
    by 2)."""
    # the circuit law alone: identical diodes, no heating, a field that does not change
    # along y (the chains sit up to 600 um beside the reference devices: thesis 3.6 lists
    # that non-uniformity among the causes of weight errors, not of the law)
    same = merged(IDENTICAL, {"material": {"power_shift_hz_per_w": 0.0},
                              "magnets": {"cross_yz_oe_per_mm": 0.0}})
    ref = World.from_file("thesis_bench.yaml", seed=1, overrides=merged(same, {
        "sample": {"devices": {"__replace__": True, "ref0": {
            "origin_um": [0, 0], "diodes": [{"v_um": 0, "u_um": -8}, {"v_um": 0, "u_um": 8}],
            "blocks": [[0, 1]]}}},
        "rf": {"output_switch": {"switch": "sp4t", "ports": {"__replace__": True, 1: "ref0",
                                                             4: "fsv"}}}}))
    lab = World.from_file("thesis_bench.yaml", seed=1, overrides=same)
    ref_dev = ref.sample.devices["ref0"]

    def v_ref(f_hz: np.ndarray, z_mm: np.ndarray) -> np.ndarray:
        """The reference map at 1 W: the pair's voltage halved (thesis 3.5.1)."""
        out = np.empty(len(f_hz))
        for i, (f, z) in enumerate(zip(f_hz, z_mm, strict=True)):
            fa = np.array([f])
            out[i] = ref.sample.response_v_per_w(ref_dev, fa, Pose(0.0, 0.0, float(z), 0.0, 0.0),
                                                 0.0)[0] / 2
        return out

    f = np.linspace(1.6e9, 3.4e9, 19)
    worst = 0.0
    for name in THESIS_WEIGHTS:
        dev = lab.sample.devices[name]
        syn = lab.config["sample"]["devices"][name]
        origin = 1e3 * lab.sample.design_placement_mm[2] + syn["origin_um"][1]
        z_um = [origin + s["v_um"] for s in syn["synapses"]]
        dz_um = [s["dz_um"] for s in syn["synapses"]]
        model = chain_voltage_v(v_ref, np.ones_like, f, z_um, dz_um, syn["blocks"])
        v_lab = lab.sample.response_v_per_w(dev, f, pose_at(lab), 0.0)
        ratio = float(v_lab @ model / (model @ model))
        resid = float(np.linalg.norm(v_lab - model) / np.linalg.norm(model))
        worst = max(worst, abs(ratio - 1), resid)
        print(f"\n{name}: lab / design model = {ratio:.4f}, relative residual {resid:.4f}")
    assert worst < 0.03


# --------------------------------------------------------------------------- source (4.5, 4.6.2)


def test_final_amplifier_below_compression_at_the_thesis_total() -> None:
    """Thesis 4.5.1: all four channels at their maxima, 83.3 mW in total, "below the
    compression point" (100 mW): compression under 0.25 dB there, 1 dB at 100 mW out."""
    world = World.from_file("thesis_bench.yaml", seed=SEED)
    vco = world.vco
    assert vco is not None

    def db_at_output(p_out_w: float) -> float:
        lo, hi = p_out_w, 10 * p_out_w  # linear output that gives p_out_w (bisection)
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mid * vco.compression(mid) < p_out_w else (lo, mid)
        return float(-10 * np.log10(vco.compression(lo)))

    at_total, at_p1db = db_at_output(83.3e-3), db_at_output(100e-3)
    print(f"\ncompression: {at_total:.3f} dB at 83.3 mW, {at_p1db:.3f} dB at 100 mW")
    assert at_p1db == pytest.approx(1.0, abs=0.01)
    assert at_total < 0.25


def test_source_noise_falls_with_power() -> None:
    """Thesis 4.6.2 / Fig. 4.7: power noise below 0.5 % and frequency noise below 0.005 %,
    both "scale down with the absolute value of delivered power"."""
    world = World.from_file("thesis_bench.yaml", seed=SEED)
    vco = world.vco
    assert vco is not None
    stats = []
    for amp_v in (1.75, 2.5, 5.5):  # just above threshold (~3 % of the maximum), mid, full
        t = world.clock.now_s()
        vco.tuning[0].set(t, 8.0)
        vco.amplifier[0].set(t, amp_v)
        world.clock.advance(60.0, "settle")
        draws = [vco.tones() for _ in range(400)]
        f = np.array([d[0][0] for d in draws])
        p = np.array([d[1][0] for d in draws])
        stats.append((p.mean(), p.std() / p.mean(), f.std() / f.mean()))
    for p, dp, df in stats:
        print(f"\n{1e3 * p:.2f} mW: power noise {100 * dp:.3f} %, frequency {100 * df:.5f} %")
    (p_lo, dp_lo, df_lo), _, (p_hi, dp_hi, df_hi) = stats
    assert p_lo < 0.25 * p_hi
    assert dp_hi < 0.5 * dp_lo and df_hi < 0.5 * df_lo
    assert all(dp < 0.005 and df < 5e-5 for _, dp, df in stats)


# --------------------------------------------------------------------------- 2.7.1 heating


def zero_crossing_hz(f: np.ndarray, v: np.ndarray) -> float:
    """Where the antisymmetric line crosses zero between its two lobes."""
    lo, hi = sorted((int(np.argmin(v)), int(np.argmax(v))))
    seg_f, seg_v = f[lo:hi + 1], v[lo:hi + 1]
    k = int(np.flatnonzero(np.diff(np.sign(seg_v)))[0])
    return float(seg_f[k] - seg_v[k] * (seg_f[k + 1] - seg_f[k]) / (seg_v[k + 1] - seg_v[k]))


def test_resonance_shifts_slightly_with_power() -> None:
    """Thesis 2.7.1 (after Fig. 2.9): a single 5x10 um diode's resonance moves slightly as the
    RF power rises (heating); a few MHz at 100 mW, a small fraction of the half width, and
    eight times less per diode in a 2x2 chain (thesis 3.4.1: chains stay linear)."""
    world = World.from_file("chapter2.yaml", seed=5, overrides=NEAR)
    pose = pose_at(world)
    f = np.arange(1.9e9, 2.5e9, 2e6)
    low = zero_crossing_hz(f, sweep_v(world, "diode", f, 1e-3, pose))
    high = zero_crossing_hz(f, sweep_v(world, "diode", f, 0.1, pose))
    shift = high - low
    print(f"\nsingle diode: f_r {low / 1e9:.4f} GHz at 1 mW, shift {shift / 1e6:+.2f} MHz at 100 mW")
    assert -15e6 < shift < -1e6
    # linearity at the antisymmetric peak survives (Fig. 2.9c): V(100 mW) = 100 V(1 mW)
    v1 = sweep_v(world, "diode", f, 1e-3, pose)
    v100 = sweep_v(world, "diode", f, 0.1, pose)
    k = int(np.argmax(np.abs(v1)))
    assert v100[k] == pytest.approx(100 * v1[k], rel=0.01)
