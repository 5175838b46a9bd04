"""Chain geometry design (thesis 3.5.2, Algorithm 1) and weight extraction (thesis 3.6).

Model (per tone, from the reference map, thesis 3.5.2): a chain of N double-diode synapses,
synapse j centred at z_j (where the reference diode resonates at the input frequency f_j) with
its diodes at z_j -+ dz_j/2 (eq. 3.2 read as a difference, ERRATA), fed one tone of power
P(f) = P0 r(f) (eq. 3.3 fitted from the map):

    V_chain(f) = r(f) * sum_j c_j [V_ref(f, z_j - dz_j/2) - V_ref(f, z_j + dz_j/2)]
    c_j = 1 / (P_b^3 * sum_b' 1 / P_b')        (synapse j in block b of P_b synapses)

The circuit law (``synapse_factors``; the virtual lab's ``sims.spindiode.chain_network`` is
the same law, ``tests/test_thesis_anchors.py`` holds them equal): every diode is its emf
behind its resistance; the RF current divides by conductance inside a block, so a diode of a
block of P_b synapses (2 P_b diodes) dissipates P R / (4 P_b^2 R_chain), and the block's DC
voltage is the *mean* of its diodes' emfs, the chain's the sum over blocks (eq. 3.1,
Kirchhoff). V_ref is a reference device's voltage (two same-sign diodes in parallel, each
dissipating half) halved (thesis 3.5.1). So c_j = 1/N for N synapses in series and 1/8 for
the thesis's 2x2 chain: Algorithm 1's 1/N times eq. 3.2's printed 0.5 (two synapses averaged
in a block). Counting a block's synapses as summed (the 1/N alone) overestimates a 2x2 chain
by 2, which is what the lab measured before issue 21. It assumes the chain's resistance is
the reference device's (R = R_synapse for M = P, thesis 3.7), so the bonds transmit alike.

Algorithm 1 (the thesis stops after 4 passes; here 12 by default, as the strong overlap of
neighbouring lines needs more to converge; the own-synapse term carries the same P(f_i) c_j as the
neighbours, ERRATA; the minimiser is a bounded scalar search per synapse) sets dz_i so that
V_chain(f_i) = V_w=1 w_i, with V_w=1 = V_range / max|w| (the V_range constraint).

Weights of a measured chain (thesis 3.6): w_i = V(f_i) / V_max. The thesis normalises by a
hand-picked rescaling; here V_max is the least-squares scale sum(V w) / sum(w^2) (the same
choice as eq. 4.4's V_max), stated in the error table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from drivers.nanovoltmeter import differential_measurement

VRef = Callable[[np.ndarray, np.ndarray], np.ndarray]
#: thesis table 3.1: input frequencies and the three chains' target weights
THESIS_FREQS_HZ = (1.75e9, 2.25e9, 2.75e9, 3.25e9)
THESIS_WEIGHTS = {"chain0": (-0.1322, -0.3949, -0.2745, 0.3621),
                  "chain1": (-0.2338, 0.2530, -0.2336, 0.2327),
                  "chain2": (-0.2177, -0.1121, 0.2409, 0.1869)}


@dataclass
class ChainDesign:
    """One chain: where each synapse sits and its dz; what the model predicts for it."""

    name: str
    freq_hz: list[float]
    target_w: list[float]
    z_um: list[float]                 # synapse centres from the field zero (along the gradient)
    dz_um: list[float]
    v_range_v: float
    v_w1_v: float
    predicted_w: list[float] = field(default_factory=list)
    blocks: list[list[int]] = field(default_factory=list)

    def v_um(self) -> list[float]:
        """Synapse centres on the chip, from the first synapse (what the mask needs)."""
        return [round(z - self.z_um[0], 3) for z in self.z_um]

    def diodes(self) -> list[dict[str, float]]:
        """Every diode: synapse, sign (+1 the reference sign) and chip position v (um)."""
        out = []
        for i, (v, dz) in enumerate(zip(self.v_um(), self.dz_um, strict=True)):
            out.append({"synapse": i, "sign": 1, "v_um": round(v - dz / 2, 3)})
            out.append({"synapse": i, "sign": -1, "v_um": round(v + dz / 2, 3)})
        return out


def default_blocks(n: int) -> list[list[int]]:
    """Eq. 3.1's layout: sqrt(N) blocks in series of sqrt(N) synapses in parallel when N is a
    square, else every synapse in series."""
    half = int(round(np.sqrt(n)))
    if half * half == n:
        return [list(range(b * half, (b + 1) * half)) for b in range(half)]
    return [[i] for i in range(n)]


def synapse_factors(blocks: Sequence[Sequence[int]]) -> np.ndarray:
    """c_j of the module doc: what synapse j's V_ref difference counts for in the chain's
    voltage, for identical diodes (1/N in series, 1/8 for a 2x2 chain)."""
    sizes = [len(b) for b in blocks]
    inv_total = sum(1.0 / p for p in sizes)
    out = np.zeros(sum(sizes))
    for block, p in zip(blocks, sizes, strict=True):
        out[list(block)] = 1.0 / (p ** 3 * inv_total)
    return out


def chain_voltage_v(v_ref: VRef, rescale: Callable[[np.ndarray], np.ndarray], freq_hz: np.ndarray,
                    z_um: Sequence[float], dz_um: Sequence[float],
                    blocks: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """The model chain voltage at ``freq_hz`` (see the module doc), in the map's volts at P0.
    ``blocks``: the chain's layout (default ``default_blocks``)."""
    f = np.asarray(freq_hz, float)
    c = synapse_factors(default_blocks(len(z_um)) if not blocks else blocks)
    total = np.zeros_like(f)
    for cj, z, dz in zip(c, z_um, dz_um, strict=True):
        total += cj * (v_ref(f, np.full_like(f, 1e-3 * (z - dz / 2)))
                       - v_ref(f, np.full_like(f, 1e-3 * (z + dz / 2))))
    return total * np.asarray(rescale(f), float)


def design_chain(name: str, v_ref: VRef, rescale: Callable[[np.ndarray], np.ndarray],
                 z_um: Sequence[float], freq_hz: Sequence[float], target_w: Sequence[float], *,
                 v_range_v: float, dz_max_um: float = 120.0, passes: int = 12,
                 grid_um: float = 1.0) -> ChainDesign:
    """Algorithm 1: dz of each synapse for the target weights, neighbours included.

    ``z_um``: each synapse's centre (the reference diode's resonance at its input frequency).
    ``z_um`` is rounded to the lithography grid ``grid_um`` and dz to twice it (both diodes on
    the grid); the predicted weights are those of the rounded design.
    """
    z_um = [float(np.round(z / grid_um) * grid_um) for z in z_um]
    f = np.asarray(freq_hz, float)
    w = np.asarray(target_w, float)
    v_w1 = v_range_v / float(np.max(np.abs(w)))
    n = len(f)
    dz = np.zeros(n)
    r = np.asarray(rescale(f), float)
    blocks = default_blocks(n)
    c = synapse_factors(blocks)  # the circuit law (module doc): 1/8 for 2x2, 1/N in series

    def v_syn(i: int, j: int, dz_j: float) -> float:
        fi = f[i:i + 1]
        return float((v_ref(fi, np.array([1e-3 * (z_um[j] - dz_j / 2)]))
                      - v_ref(fi, np.array([1e-3 * (z_um[j] + dz_j / 2)])))[0] * r[i] * c[j])

    for _ in range(passes):
        for i in range(n):
            neighbours = sum(v_syn(i, j, dz[j]) for j in range(n) if j != i)
            res = minimize_scalar(lambda d, i=i, nb=neighbours: (v_syn(i, i, d) + nb - v_w1 * w[i]) ** 2,
                                  bounds=(-dz_max_um, dz_max_um), method="bounded",
                                  options={"xatol": 0.01})
            dz[i] = float(res.x)
    dz = np.round(dz / (2 * grid_um)) * 2 * grid_um  # both diodes on the lithography grid
    design = ChainDesign(name, f.tolist(), w.tolist(), [float(z) for z in z_um], dz.tolist(),
                         float(v_range_v), float(v_w1))
    design.predicted_w = (chain_voltage_v(v_ref, rescale, f, z_um, dz, blocks) / v_w1).tolist()
    design.blocks = blocks
    return design


def design_chains(v_ref: VRef, rescale: Callable[[np.ndarray], np.ndarray], z_um: Sequence[float],
                  freq_hz: Sequence[float], weights: dict[str, Sequence[float]], *,
                  v_range_v: float, dz_max_um: float = 100.0, shrink: float = 0.95,
                  **layout: float) -> list[ChainDesign]:
    """Design every chain with one V_range (thesis 3.5.2: the same for all chains), starting
    at ``v_range_v`` and lowering it by ``shrink`` until no dz needs more than ``dz_max_um``
    and every layout check passes (diodes apart, spacing feasible for the lithography)."""
    v_range = v_range_v
    for _ in range(60):
        designs = [design_chain(name, v_ref, rescale, z_um, freq_hz, w, v_range_v=v_range,
                                dz_max_um=dz_max_um + 2.0) for name, w in weights.items()]
        ok = all(max(abs(x) for x in d.dz_um) <= dz_max_um and not layout_problems(d, **layout)
                 for d in designs)
        if ok:
            return designs
        v_range *= shrink
    raise ValueError(f"no feasible design with |dz| <= {dz_max_um:g} um down to V_range "
                     f"{v_range:.3g} V")


def layout_problems(design: ChainDesign, *, diode_extent_um: float = 11.0,
                    min_gap_um: float = 3.0, grid_um: float = 1.0) -> list[str]:
    """What stops this chain from being fabricated: overlapping diodes in a column (a synapse's
    two diodes sit side by side, so each sign is one column along v), gaps under the UV
    lithography's resolution, positions off the lithography grid."""
    problems = []
    diodes = design.diodes()
    for sign in (1, -1):
        col = sorted((d["v_um"], d["synapse"]) for d in diodes if d["sign"] == sign)
        for (v0, s0), (v1, s1) in zip(col, col[1:], strict=False):
            gap = v1 - v0 - diode_extent_um
            if gap < min_gap_um:
                problems.append(f"{design.name}: diodes of synapses {s0} and {s1} (sign {sign:+d}) "
                                f"are {v1 - v0:.1f} um apart: gap {gap:.1f} um < {min_gap_um:g} um")
    for d in diodes:
        if abs(d["v_um"] / grid_um - round(d["v_um"] / grid_um)) > 1e-6:
            problems.append(f"{design.name}: diode at {d['v_um']} um is off the {grid_um:g} um grid")
    order = np.argsort(design.z_um)
    if list(order) != list(range(len(order))):
        problems.append(f"{design.name}: synapse centres are not in increasing z")
    return problems


def write_design(path: str | Path, designs: Sequence[ChainDesign], meta: dict[str, Any]) -> Path:
    """The design file: JSON with units, per chain the synapses and every diode's position."""
    path = Path(path)
    chains = []
    for d in designs:
        chains.append({**asdict(d), "v_um": d.v_um(), "diodes": d.diodes(),
                       "spacing_um": np.diff(d.z_um).round(3).tolist(),
                       "layout_problems": layout_problems(d)})
    data = {"format": "hil chain design v1",
            "units": {"freq_hz": "Hz", "z_um": "um from the field zero along the gradient",
                      "v_um": "um on the chip along the gradient, from synapse 0",
                      "dz_um": "um, +: reference-sign diode at v - dz/2", "v_range_v": "V",
                      "v_w1_v": "V"},
            "meta": meta, "chains": chains}
    path.write_text(json.dumps(data, indent=2))
    return path


def read_design(path: str | Path) -> list[ChainDesign]:
    data = json.loads(Path(path).read_text())
    keys = set(ChainDesign.__dataclass_fields__)
    return [ChainDesign(**{k: v for k, v in c.items() if k in keys}) for c in data["chains"]]


def virtual_lab_overrides(designs: Sequence[ChainDesign], placement_z_mm: float | None = None
                          ) -> dict[str, Any]:
    """A design as world-file overrides (``sample.devices.<chain>.synapses``): how the virtual
    lab fabricates it. ``placement_z_mm``: where the chip origin (synapse 0) is glued, by
    default at the first chain's synapse-0 design position."""
    z0 = designs[0].z_um[0] * 1e-3 if placement_z_mm is None else placement_z_mm
    devices = {d.name: {"synapses": [{"v_um": v, "dz_um": dz} for v, dz in zip(d.v_um(), d.dz_um,
                                                                               strict=True)],
                        "blocks": d.blocks} for d in designs}
    return {"sample": {"placement_mm": {"z": z0}, "devices": devices}}


# --------------------------------------------------------------------------- thesis 3.6


def extract_weights(v_at_inputs_v: Sequence[float], target_w: Sequence[float]) -> tuple[np.ndarray, float]:
    """Measured weights w_i = V(f_i) / V_max with the least-squares V_max (module doc)."""
    v = np.asarray(v_at_inputs_v, float)
    w = np.asarray(target_w, float)
    v_max = float(v @ w / (w @ w))
    return v / v_max, v_max


def error_table(rows: Sequence[dict[str, Any]]) -> tuple[str, dict[str, float]]:
    """Thesis table 3.1: per chain the theoretical and experimental weights, |dw| in % of
    w = 1 and dz; returns the text and the mean |dw| (%) per chain and overall."""
    lines, means, every = [], {}, []
    header = "".join(f"{'w' + str(i):>10}" for i in range(len(rows[0]["target_w"])))
    for r in rows:
        t, e = np.asarray(r["target_w"]), np.asarray(r["measured_w"])
        dw = 100 * np.abs(e - t)
        means[r["name"]] = float(dw.mean())
        every += dw.tolist()
        res = f" R={r['resistance_ohm']:.1f} Ohm" if r.get("resistance_ohm") else ""
        lines += [f"{r['name']}{res}  (V_max {1e6 * r['v_max_v']:.3f} uV){header}",
                  "  theoretical weights    " + "".join(f"{x:>10.4f}" for x in t),
                  "  experimental weights   " + "".join(f"{x:>10.4f}" for x in e),
                  "  dw (in % of w=1)       " + "".join(f"{x:>10.2f}" for x in dw),
                  "  dz (um)                " + "".join(f"{x:>10.0f}" for x in r["dz_um"])]
    means["overall"] = float(np.mean(every))
    lines.append("mean |dw| (% of w=1): " + ", ".join(f"{k} {v:.2f}" for k, v in means.items()))
    return "\n".join(lines), means


# --------------------------------------------------------------------------- measuring a chain


def approach_z(stage: Any, z_mm: float, overshoot_mm: float = 0.05) -> None:
    """Move stage z to ``z_mm`` always from below (no backlash reversal at the target)."""
    if "NOT REFERENCED" in stage.status():
        stage.home()
    if stage.position_mm > z_mm - 1e-4:
        stage.move_abs_mm(z_mm - overshoot_mm)
    stage.move_abs_mm(z_mm)


def measure_inputs_v(lab: Any, port: int, freq_hz: Sequence[float], power_mw: Sequence[float], *,
                     n_avg: int = 8, source_port: int | None = 2) -> np.ndarray:
    """The chain's voltage for one tone at each input frequency (generator, RF on minus off,
    ``n_avg`` times; thesis 2.6.1). RF is off on every exit path."""
    rf, nvm = lab["rf_source"], lab["voltmeter"]
    try:
        if source_port is not None:
            lab["source_switch"].port = source_port
        lab["switch"].port = port
        out = []
        for f, p in zip(freq_hz, power_mw, strict=True):
            rf.output_off()
            rf.apply(float(f), float(10 * np.log10(p)))
            out.append(differential_measurement(rf, nvm, n_avg, sleep=lab.sleep).mean_v)
    finally:
        rf.output_off()
    return np.array(out)


def weight_metric(v: np.ndarray, target_w: Sequence[float]) -> tuple[float, float]:
    """(misfit, V_max): RMS of V - V_max w relative to V_max (eq. 4.4 with one-hot inputs and the
    least-squares V_max); infinite when the profile has the wrong sign."""
    w = np.asarray(target_w, float)
    _, v_max = extract_weights(v, w)
    if v_max <= 0:
        return float("inf"), v_max
    return float(np.sqrt(np.mean((v / v_max - w) ** 2))), v_max


def measure_profile_v(lab: Any, port: int, freq_hz: Sequence[float], power_mw: Sequence[float], *,
                      source_port: int | None = 2, n_off: int = 2) -> np.ndarray:
    """A frequency sweep of one device (RF-on readings minus the RF-off offset), RF off after."""
    rf, nvm = lab["rf_source"], lab["voltmeter"]
    try:
        if source_port is not None:
            lab["source_switch"].port = source_port
        lab["switch"].port = port
        rf.output_off()
        offset = float(np.mean([nvm.read_voltage_v() for _ in range(n_off)]))
        rf.apply(float(freq_hz[0]), float(10 * np.log10(power_mw[0])))
        rf.output_on()
        out = []
        for f, p in zip(freq_hz, power_mw, strict=True):
            rf.apply(float(f), float(10 * np.log10(p)))
            out.append(nvm.read_voltage_v() - offset)
    finally:
        rf.output_off()
    return np.array(out)


def locate_chain(v_measured: np.ndarray, freq_hz: np.ndarray, design: ChainDesign, v_ref: VRef,
                 rescale: Callable[[np.ndarray], np.ndarray], *, span_mm: float = 2.5,
                 step_mm: float = 0.005) -> tuple[float, float]:
    """Where the chain sits: the shift dz (mm, along the gradient) of the whole chain from its
    design position whose model profile best fits the measured one (least-squares scale).
    Returns (shift_mm, relative residual)."""
    shifts = np.arange(-span_mm, span_mm + 1e-9, step_mm)
    f = np.broadcast_to(np.asarray(freq_hz, float), (len(shifts), len(freq_hz)))
    model = np.zeros(f.shape)
    c = synapse_factors(design.blocks or default_blocks(len(design.z_um)))
    for cj, z, dz in zip(c, design.z_um, design.dz_um, strict=True):  # all shifts at once
        zc = 1e-3 * z + shifts[:, None] + np.zeros_like(f)
        model += cj * (v_ref(f, zc - 0.5e-3 * dz) - v_ref(f, zc + 0.5e-3 * dz))
    model *= np.asarray(rescale(np.asarray(freq_hz, float)), float)
    mm = np.einsum("ij,ij->i", model, model)
    scale = model @ v_measured / np.where(mm > 0, mm, 1.0)
    res = np.linalg.norm(v_measured - scale[:, None] * model, axis=1) / np.linalg.norm(v_measured)
    res[(mm <= 0) | (scale <= 0)] = np.inf
    k = int(np.argmin(res))
    return float(shifts[k]), float(res[k])


def place_chain(lab: Any, port: int, design: ChainDesign, v_ref: VRef,
                rescale: Callable[[np.ndarray], np.ndarray], p0_mw: float, *,
                stage_ref_mm: float, direction: float = -1.0,
                profile_freq_hz: Sequence[float] | None = None, fine_step_mm: float = 0.004,
                fine_span_mm: float = 0.03, n_avg_fine: int = 4, max_profile_mw: float = 50.0,
                search_mm: float = 1.5, search_step_mm: float = 0.25,
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Bring the chain to its design position (thesis 3.6: "manually optimised the position").

    1. A frequency sweep at ``stage_ref_mm`` located against the model profile (``locate_chain``)
       gives the glue error; the stage moves to compensate it, and the sweep is repeated there
       until the chain is within 20 um of its design position (up to 4 sweeps). When the first
       sweep does not fit the model (relative residual over 0.5: glued so far off that every
       line is out of the band, and only the 1/df^2 tails of the double diodes are left), the
       stage first looks for the chain: sweeps every ``search_step_mm`` within
       ``+-search_mm`` of ``stage_ref_mm`` and starts from the loudest.
    2. A fine scan of the weight misfit at the input frequencies (``weight_metric``) around
       that point; a parabola through the minimum gives the stage z.
    """
    stage = lab["stage.z"]
    say = progress or (lambda text: None)
    f = np.asarray(profile_freq_hz if profile_freq_hz is not None
                   else np.arange(1.5e9, 3.5e9 + 1, 25e6), float)
    p_profile = p0_mw * np.asarray(rescale(f))
    p_profile *= min(1.0, max_profile_mw / float(p_profile.max()))  # shape kept, level capped
    z_start = stage_ref_mm
    for attempt in range(4):  # far off, the chain's lines leave the band: locate again closer
        approach_z(stage, z_start)
        v = measure_profile_v(lab, port, f, p_profile)
        shift_mm, res = locate_chain(v, f, design, v_ref, rescale)
        if attempt == 0 and res > 0.5 and search_mm > 0:
            loudest = (float(np.sqrt(np.mean(v ** 2))), z_start)
            for z in np.arange(stage_ref_mm - search_mm, stage_ref_mm + search_mm + 1e-9,
                               search_step_mm):
                approach_z(stage, float(z))
                rms = float(np.sqrt(np.mean(measure_profile_v(lab, port, f, p_profile) ** 2)))
                loudest = max(loudest, (rms, float(z)))
            z_start = loudest[1]
            say(f"{design.name}: no line in the band (residual {res:.2f}); loudest at stage z "
                f"{z_start:.3f} mm")
            approach_z(stage, z_start)
            v = measure_profile_v(lab, port, f, p_profile)
            shift_mm, res = locate_chain(v, f, design, v_ref, rescale)
        z_start -= shift_mm / direction
        say(f"{design.name}: profile says {1e3 * shift_mm:+.0f} um from design (residual "
            f"{res:.2f}); stage z {z_start:.3f} mm")
        if abs(shift_mm) < 0.02:
            break
    power_mw = p0_mw * np.asarray(rescale(np.asarray(design.freq_hz)))
    fine = []
    for z in np.arange(z_start - fine_span_mm, z_start + fine_span_mm + 1e-9, fine_step_mm):
        approach_z(stage, float(z))
        vi = measure_inputs_v(lab, port, design.freq_hz, power_mw, n_avg=n_avg_fine)
        fine.append((float(z), weight_metric(vi, design.target_w)[0]))
    zs, ms = np.array(fine).T
    k = int(np.argmin(ms))
    lo, hi = max(k - 2, 0), min(k + 3, len(zs))
    z_fit = float(zs[k])
    if hi - lo >= 3:  # parabola through the minimum's neighbourhood
        a, b, _ = np.polyfit(zs[lo:hi], ms[lo:hi], 2)
        if a > 0:
            z_fit = float(np.clip(-b / (2 * a), zs[lo], zs[hi - 1]))
    approach_z(stage, z_fit)
    say(f"{design.name}: best stage z {z_fit:.4f} mm")
    return {"stage_z_mm": z_fit, "profile_shift_mm": shift_mm, "profile_residual": res,
            "fine": fine}
