"""``hil calibrate reference``, ``hil chain design``, ``hil chain measure``, ``hil source calibrate``.

Each command that touches instruments takes a lab config (``lab_configs/virtual.yaml`` or a
real bench) and writes a run folder. On a virtual lab, ``--world`` swaps the sample (e.g. the
reference devices of ``REFERENCE_SAMPLE``) and ``chain measure --fabricate`` builds the designed
chains in the virtual world (world-file overrides; the calibration code never reads the truth).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from hil.errors import ConfigError, HilError
from hil.runs import RunFolder
from hil.runs import save_figure as _save_figure

#: three reference devices (two same-sign diodes in parallel, thesis Fig. 3.7c) on switch
#: ports 1-3: the virtual lab's reference sample (``--reference-sample``)
REFERENCE_SAMPLE: dict[str, Any] = {
    "sample": {"devices": {"__replace__": True, **{
        f"ref{i}": {"origin_um": [-450 + 450 * i, 0],
                    "diodes": [{"v_um": 0, "u_um": -8}, {"v_um": 0, "u_um": 8}],
                    "blocks": [[0, 1]]} for i in range(3)}}},
    "rf": {"output_switch": {"switch": "sp4t",
                             "ports": {1: "ref0", 2: "ref1", 3: "ref2", 4: "fsv"}}},
}


def _pairs(text: str, what: str) -> dict[str, float]:
    """``a=1,b=2`` -> {'a': 1.0, 'b': 2.0}."""
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(what, f"expected name=value[,name=value...], got {text!r}") from None
    return out


def _open(lab_path: str, overrides: dict[str, Any] | None, record_to: Path | None) -> Any:
    """Open the lab (instrument exchanges logged to ``record_to``, a run folder, unless None)."""
    from hil.lab import load_lab_config, open_lab

    cfg = load_lab_config(lab_path)
    world = None
    if overrides:
        if cfg.virtual is None:
            raise HilError(f"{lab_path}: --reference-sample/--fabricate need a virtual lab")
        from sims.virtual_lab import World
        from sims.virtual_lab.config import deep_merge

        world = World.from_file(cfg.virtual.world, seed=cfg.virtual.seed,
                                overrides=deep_merge(dict(cfg.virtual.overrides), overrides))
    return open_lab(cfg, world=world, record_to=record_to)


def _record(args: argparse.Namespace, run: RunFolder) -> Path | None:
    return None if args.no_record else run.path


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="pt", dynamic_ncols=True)


# --------------------------------------------------------------------------- reference

#: What a sweep was started with (checked on --resume) and the lab time it has used so far.
SWEEP_STATE = "sweep_state.json"


def _sweep_settings(args: argparse.Namespace, plan: Any) -> dict[str, Any]:
    """Every measurement setting of a reference sweep, and the lab config's identity."""
    from hil.lab import load_lab_config

    return {"devices": plan.devices, "stage_z_mm": plan.stage_z_mm, "freq_hz": plan.freq_hz,
            "power_dbm": plan.power_dbm, "source_port": plan.source_port, "nplc": plan.nplc,
            "direction": plan.direction, "gradient_oe_per_mm": plan.gradient_oe_per_mm,
            "gamma_hz_per_oe": plan.gamma_hz_per_oe, "reference_sample": args.reference_sample,
            "lab_config_sha256": load_lab_config(args.lab).identity_hash()}


def _new_sweep(run: RunFolder, settings: dict[str, Any]) -> dict[str, Any]:
    state = {"settings": settings, "lab_time_s": 0.0, "sessions": 0}
    run.write_json(SWEEP_STATE, state)
    return state


def _check_resume(run: RunFolder, settings: dict[str, Any]) -> dict[str, Any]:
    """The stored state, if ``settings`` are those the sweep was started with; else stop."""
    path = run.file(SWEEP_STATE)
    if not path.exists():
        raise HilError(f"--resume {run.path}: no {SWEEP_STATE} (not a reference sweep folder?)")
    state = json.loads(path.read_text())
    stored = json.loads(json.dumps(state["settings"]))
    now = json.loads(json.dumps(settings))  # the same JSON types as the stored ones
    differ = [f"{key}: {_short(stored.get(key))} in the sweep, {_short(now.get(key))} now"
              for key in sorted(set(stored) | set(now)) if stored.get(key) != now.get(key)]
    if differ:
        raise HilError(f"--resume {run.path}: settings differ from the sweep's, refusing to mix "
                       "them in one map: " + "; ".join(differ))
    return state


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_sweep(args: argparse.Namespace) -> None:
    """The sweep's ranges, refused in one line before any folder or instrument is opened."""
    import math

    for opt, v in (("--z-step", args.z_step), ("--f-step", args.f_step), ("--nplc", args.nplc)):
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(opt, f"must be a number > 0, got {v:g}", "command line")
    for lo_opt, lo, hi_opt, hi in (("--z-start", args.z_start, "--z-stop", args.z_stop),
                                   ("--f-start", args.f_start, "--f-stop", args.f_stop)):
        if not (math.isfinite(lo) and math.isfinite(hi) and hi >= lo):
            raise ConfigError(hi_opt, f"must be a number >= {lo_opt} ({lo:g}), got {hi:g}", "command line")
    n = (math.floor((args.z_stop - args.z_start) / args.z_step) + 1) * \
        (math.floor((args.f_stop - args.f_start) / args.f_step) + 1)
    if n > 10_000_000:
        raise ConfigError("--z-step", f"the sweep would have {n:.3g} points (at most 1e7); use "
                          "coarser --z-step/--f-step or narrower ranges", "command line")


def cmd_reference(args: argparse.Namespace) -> int:
    from calibration.reference import SweepPlan, measure_reference_map

    _check_sweep(args)
    devices = {k: int(v) for k, v in _pairs(args.devices, "--devices").items()}
    zs = np.round(np.arange(args.z_start, args.z_stop + 1e-9, args.z_step), 6)
    plan = SweepPlan(devices=devices, stage_z_mm=zs.tolist(),
                     freq_hz=np.round(np.arange(args.f_start, args.f_stop + 1, args.f_step)).tolist(),
                     power_dbm=args.power_dbm, source_port=args.source_port, nplc=args.nplc,
                     direction=args.direction, gradient_oe_per_mm=args.gradient,
                     gamma_hz_per_oe=args.gamma)
    settings = _sweep_settings(args, plan)
    if args.resume and not Path(args.resume).is_dir():
        raise HilError(f"--resume {args.resume}: no such run folder")
    run = RunFolder(Path(args.resume)) if args.resume else RunFolder.create("calibrate-reference")
    csv_path = run.file("reference_map.csv")
    print(f"run folder: {run}")
    total = len(plan.stage_z_mm) * len(plan.freq_hz) * len(devices)
    from hil.locks import BenchLock

    with BenchLock(run.file(".lock"), f"run folder {run.path}"):
        state = _check_resume(run, settings) if args.resume else _new_sweep(run, settings)
        with _open(args.lab, REFERENCE_SAMPLE if args.reference_sample else None,
                   _record(args, run)) as lab:
            bar = _progress(total)
            start_s = float(lab.clock.now_s())
            try:
                new = measure_reference_map(lab, plan, csv_path,
                                            progress=lambda i, n: bar.update(i - bar.n),
                                            max_points=args.max_points)
            finally:
                bar.close()
                state["lab_time_s"] += float(lab.clock.now_s()) - start_s
                state["sessions"] += 1
                run.write_json(SWEEP_STATE, state)
    print(f"lab time {state['lab_time_s']:.0f} s over {state['sessions']} session(s)")
    m = load_reference_map(csv_path)
    print(f"{new} new points, {int(np.isfinite(m.device_grid_v).sum())} of {total} saved")
    if not m.complete:
        print("map incomplete: run again with --resume", run.path)
        return 3
    fit = m.fit_kittel()
    rescale = m.fit_power_rescaling()
    summary = {"kittel": fit.__dict__, "resonance_hz": m.resonance_hz().tolist(),
               "field_oe": m.field_oe().tolist(), "stage_z_mm": m.stage_z_mm.tolist(),
               "power_rescaling": rescale}
    run.write_json("reference_fit.json", summary)
    _plot_reference(m, run.file("reference_map.png"))
    print(f"M_eff {fit.meff_oe:.0f} +- {fit.meff_sigma_oe:.0f} Oe, field zero at stage z "
          f"{fit.stage_z0_mm:.4f} mm; rescaling slope {rescale['slope_v_per_hz'] * 1e15:.3f} uV/GHz")
    return 0


def _plot_reference(m: Any, path: Path) -> None:
    from hil.plots import plt  # figures without pyplot: no backend switch

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    field = m.field_oe()
    order = np.argsort(field)
    mesh = a.pcolormesh(m.freq_hz / 1e9, field[order], 1e6 * m.v_ref[order], shading="nearest",
                        cmap="RdBu_r")
    fig.colorbar(mesh, ax=a, label="V_ref (uV)")
    a.set(xlabel="frequency (GHz)", ylabel="field (Oe)", title="reference diode (mean)")
    fr = m.resonance_hz()
    b.plot(field, fr / 1e9, "o")
    from calibration.reference import kittel_hz

    h = np.linspace(field.min(), field.max(), 200)
    b.plot(h, kittel_hz(h, m.kittel.meff_oe, m.plan.gamma_hz_per_oe) / 1e9, "-")
    b.set(xlabel="field (Oe)", ylabel="resonance (GHz)", title=f"Kittel M_eff {m.kittel.meff_oe:.0f} Oe")
    fig.tight_layout()
    _save_figure(fig, path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- chains


def load_reference_map(map_csv: str | Path) -> Any:
    """The reference map of ``map_csv`` (and its sidecar); a missing, corrupt or foreign file
    is one :class:`HilError` naming it, not a traceback."""
    from calibration.reference import ReferenceMap, sidecar_path

    try:
        return ReferenceMap.load(map_csv)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HilError(f"{map_csv}: not a readable reference map (with its sidecar "
                       f"{sidecar_path(Path(map_csv)).name}): {first[:200]}") from None


def _model(map_csv: str) -> tuple[Any, Any, Any, dict[str, float]]:
    from calibration.reference import rescaled_power

    m = load_reference_map(map_csv)
    if not m.complete:
        raise HilError(f"{map_csv}: the map is incomplete; resume hil calibrate reference first")
    m.fit_kittel()
    fit = m.fit_power_rescaling()

    def rescale(f: np.ndarray) -> np.ndarray:
        return rescaled_power(f, fit, 1.0)

    return m, m.interpolator(), rescale, fit


def cmd_chain_design(args: argparse.Namespace) -> int:
    from calibration.chain import THESIS_FREQS_HZ, THESIS_WEIGHTS, design_chains, write_design

    m, v_ref, rescale, fit = _model(args.map)
    if args.weights:
        spec = json.loads(Path(args.weights).read_text())
        freqs, weights = spec["freq_hz"], spec["weights"]
    else:
        freqs, weights = list(THESIS_FREQS_HZ), {k: list(v) for k, v in THESIS_WEIGHTS.items()}
    z_um = 1e3 * m.z_for_resonance_mm(np.asarray(freqs, float))
    n = len(freqs)
    # V_range: the rescaled peak of a 70 um synapse shared by N synapses (thesis 3.5.2)
    v_range = (fit["slope_v_per_hz"] * 3.1e9 + fit["intercept_v"]) / n
    designs = design_chains(v_ref, rescale, z_um, freqs, weights, v_range_v=v_range,
                            dz_max_um=args.dz_max_um)
    run = RunFolder.create("chain-design")
    path = write_design(run.file("chain_design.json"), designs,
                        {"reference_map": str(Path(args.map).resolve()), "power_rescaling": fit})
    for d in designs:
        print(f"{d.name}: v {d.v_um()} um, dz {d.dz_um} um, predicted w {np.round(d.predicted_w, 4)}")
    print(f"design file: {path}")
    return 0


def cmd_chain_measure(args: argparse.Namespace) -> int:
    from calibration.chain import (
        error_table,
        extract_weights,
        measure_inputs_v,
        place_chain,
        read_design,
        virtual_lab_overrides,
    )

    designs = read_design(args.design)
    _, v_ref, rescale, _ = _model(args.map)
    ports = {k: int(v) for k, v in _pairs(args.ports, "--ports").items()}
    run = RunFolder.create("chain-measure")
    print(f"run folder: {run}")
    overrides = virtual_lab_overrides(designs) if args.fabricate else None
    rows = []
    with _open(args.lab, overrides, _record(args, run)) as lab:
        lab["voltmeter"].configure_voltage(nplc=args.nplc)
        for d in (d for d in designs if d.name in ports):
            placed = place_chain(lab, ports[d.name], d, v_ref, rescale, args.p0_mw,
                                 stage_ref_mm=args.stage_ref_mm, progress=print)
            v = measure_inputs_v(lab, ports[d.name], d.freq_hz,
                                 args.p0_mw * rescale(np.asarray(d.freq_hz)), n_avg=args.n_avg)
            w, v_max = extract_weights(v, d.target_w)
            row = {"name": d.name, "target_w": d.target_w, "measured_w": w.tolist(),
                   "v_max_v": v_max, "dz_um": d.dz_um, "v_inputs_v": v.tolist(),
                   "stage_z_mm": placed["stage_z_mm"]}
            rows.append(row)
            run.append_metrics(row)
    text, means = error_table(rows)
    run.write_json("weights.json", {"chains": rows, "mean_abs_dw_pct": means})
    run.write_text("table_3_1.txt", text + "\n")
    print(text)
    return 0


# --------------------------------------------------------------------------- position


def cmd_position(args: argparse.Namespace) -> int:
    from calibration.chain import place_chain, read_design, virtual_lab_overrides
    from calibration.position import generator_one_hot, optimise_z, plot_tracking, track

    designs = read_design(args.design)
    _, v_ref, rescale, _ = _model(args.map)
    ports = {k: int(v) for k, v in _pairs(args.ports, "--ports").items()}
    run = RunFolder.create("position-optimise")
    print(f"run folder: {run}")
    overrides = virtual_lab_overrides(designs) if args.fabricate else None
    rng = np.random.default_rng(args.seed)
    results, tracks = {}, {}
    with _open(args.lab, overrides, _record(args, run)) as lab:
        lab["voltmeter"].configure_voltage(nplc=args.nplc)
        for d in (d for d in designs if d.name in ports):
            p_x1 = args.p0_mw * rescale(np.asarray(d.freq_hz))  # power encoding x = 1 (eq. 3.3)
            inputs = np.diag(p_x1)
            placed = place_chain(lab, ports[d.name], d, v_ref, rescale, args.p0_mw,
                                 stage_ref_mm=args.stage_ref_mm, fine_span_mm=0.0, progress=print)
            measure = generator_one_hot(ports[d.name], d.freq_hz, n_avg=args.n_avg)
            z0 = placed["stage_z_mm"]
            opt = optimise_z(lab, d, measure, inputs, p_x1, z0 - args.window_mm, z0 + args.window_mm,
                             n_trials=args.trials, seed=args.seed)
            print(f"{d.name}: stage z {opt.stage_z_mm:.4f} mm, V_max {opt.v_max_v * 1e6:.3f} uV, "
                  f"M {opt.m:.4f}")
            results[d.name] = {"stage_z_mm": opt.stage_z_mm, "v_max_v": opt.v_max_v, "m": opt.m,
                               "trials": opt.trials, "profile_stage_z_mm": z0}
            run.append_metrics({"chain": d.name, **results[d.name]})
            if args.track_inputs:
                run_inputs = np.zeros((args.track_inputs, len(d.freq_hz)))
                run_inputs[np.arange(args.track_inputs),
                           rng.integers(0, len(d.freq_hz), args.track_inputs)] = 1.0
                tracks[d.name] = track(lab, d, measure, inputs, run_inputs * p_x1, p_x1,
                                       opt.stage_z_mm, every=args.every,
                                       between=lambda i: lab.sleep(args.wait_s), seed=args.seed)
    run.write_json("positions.json", {"chains": results,
                                      "tracking": {k: v.__dict__ for k, v in tracks.items()}})
    if tracks:
        print(f"figure: {plot_tracking(tracks, run.file('position_tracking.png'))}")
    return 0


# --------------------------------------------------------------------------- source


def cmd_source(args: argparse.Namespace) -> int:
    from calibration.source import SourceWiring, calibrate_source

    ops = {int(k): v for k, v in _pairs(args.channels, "--channels").items()}
    run = RunFolder.create("source-calibrate")
    print(f"run folder: {run}")
    with _open(args.lab, None, _record(args, run)) as lab:
        cal = calibrate_source(lab, ops, SourceWiring(amplifier_role=args.amplifier), progress=print)
    path = cal.save(run.file("source_calibration.json"))
    for ch, c in cal.channels.items():
        print(f"channel {ch}: {c.freq_hz[0] / 1e9:.3f}-{c.freq_hz[-1] / 1e9:.3f} GHz, tuning "
              f"{cal.tuning_for(ch, c.operating_freq_hz):.3f} V at {c.operating_freq_hz / 1e9:.3f} GHz")
    print(f"calibration file: {path}")
    return 0


def _chain_bench_args(p: argparse.ArgumentParser, verb: str) -> None:
    """What ``chain measure`` and ``position optimise`` both take: the lab, the design and its
    map, the chains' switch ports, the power and the first stage position, the voltmeter's
    integration, and the virtual-lab and recording switches."""
    p.add_argument("lab", help="lab config")
    p.add_argument("--design", required=True, help="chain_design.json of hil chain design")
    p.add_argument("--map", required=True, help="the reference map the design used")
    p.add_argument("--ports", default="chain0=1,chain1=2,chain2=3",
                   help=f"chains to {verb} as name=output-switch-port,...")
    p.add_argument("--p0-mw", type=float, default=30.0, help="base power P0 of eq. 3.3 (mW)")
    p.add_argument("--stage-ref-mm", type=float, default=20.0, help="stage z of the first sweep")
    p.add_argument("--nplc", type=float, default=1.0)
    p.add_argument("--fabricate", action="store_true",
                   help="virtual lab only: fabricate the design in the virtual world first")
    p.add_argument("--no-record", action="store_true",
                   help="do not log every instrument exchange to the run folder")


def register(sub: Any) -> None:
    cal = sub.add_parser("calibrate", help="calibration measurements (reference diode map)")
    csub = cal.add_subparsers(dest="what", metavar="WHAT", required=True)
    ref = csub.add_parser("reference", help="reference-diode map V_ref(f, z), Kittel fit, eq. 3.3")
    ref.add_argument("lab", help="lab config (e.g. lab_configs/virtual.yaml)")
    ref.add_argument("--devices", default="ref0=1,ref1=2,ref2=3",
                     help="reference devices as name=output-switch-port,...")
    ref.add_argument("--z-start", type=float, default=17.5, help="stage z start (mm)")
    ref.add_argument("--z-stop", type=float, default=22.5, help="stage z stop (mm)")
    ref.add_argument("--z-step", type=float, default=0.1, help="stage z step (mm)")
    ref.add_argument("--f-start", type=float, default=1.0e9, help="frequency start (Hz)")
    ref.add_argument("--f-stop", type=float, default=5.0e9, help="frequency stop (Hz)")
    ref.add_argument("--f-step", type=float, default=25e6, help="frequency step (Hz)")
    ref.add_argument("--power-dbm", type=float, default=16.0)
    ref.add_argument("--source-port", type=int, default=2, help="source-selector port of the generator")
    ref.add_argument("--nplc", type=float, default=1.0)
    ref.add_argument("--direction", type=float, default=-1.0,
                     help="sample motion per stage mm along the gradient (-1: stage moves the magnets)")
    ref.add_argument("--gradient", type=float, default=140.0, help="field gradient (Oe/mm)")
    ref.add_argument("--gamma", type=float, default=2.9e6, help="gamma/2pi (Hz/Oe)")
    ref.add_argument("--resume", metavar="RUN_FOLDER", help="continue an interrupted sweep")
    ref.add_argument("--max-points", type=int, default=None, help="stop after this many new points")
    ref.add_argument("--reference-sample", action="store_true",
                     help="virtual lab only: put three reference devices on switch ports 1-3")
    ref.add_argument("--no-record", action="store_true",
                     help="do not log every instrument exchange to the run folder")
    ref.set_defaults(func=cmd_reference)

    chain = sub.add_parser("chain", help="chain geometry design (Algorithm 1) and measurement")
    chsub = chain.add_subparsers(dest="what", metavar="WHAT", required=True)
    des = chsub.add_parser("design", help="dz of each synapse for target weights; a design file")
    des.add_argument("--map", required=True, help="reference_map.csv of hil calibrate reference")
    des.add_argument("--weights", help="JSON {freq_hz: [...], weights: {chain: [...]}} "
                     "(default: thesis table 3.1)")
    des.add_argument("--dz-max-um", type=float, default=100.0)
    des.set_defaults(func=cmd_chain_design)
    mea = chsub.add_parser("measure", help="place and measure designed chains; table 3.1")
    _chain_bench_args(mea, "measure")
    mea.add_argument("--n-avg", type=int, default=32)
    mea.set_defaults(func=cmd_chain_measure)

    pos = sub.add_parser("position", help="position optimisation in the gradient (thesis 4.7)")
    psub = pos.add_subparsers(dest="what", metavar="WHAT", required=True)
    po = psub.add_parser("optimise", help="Optuna over each chain's z, V_max by least squares")
    _chain_bench_args(po, "optimise")
    po.add_argument("--window-mm", type=float, default=0.04, help="Optuna window around the profile fit")
    po.add_argument("--trials", type=int, default=25, help="Optuna trials (Algorithm 2: 25)")
    po.add_argument("--n-avg", type=int, default=4)
    po.add_argument("--seed", type=int, default=0)
    po.add_argument("--track-inputs", type=int, default=0,
                    help="then process this many (one-hot, seeded) inputs, re-optimising --every")
    po.add_argument("--every", type=int, default=10, help="re-optimise every N inputs (thesis: 10)")
    po.add_argument("--wait-s", type=float, default=360.0, help="lab time per input (thesis: ~6 min)")
    po.set_defaults(func=cmd_position)

    src = sub.add_parser("source", help="multi-channel source calibration (thesis 4.5.2)")
    ssub = src.add_subparsers(dest="what", metavar="WHAT", required=True)
    sc = ssub.add_parser("calibrate", help="tuning->frequency, amplifier->power, switch attenuation")
    sc.add_argument("lab", help="lab config")
    sc.add_argument("--channels", default="1=1.75e9,2=2.25e9,3=2.75e9,4=3.25e9",
                    help="channel=operating frequency (Hz),...")
    sc.add_argument("--amplifier", default="vco_amp", help="role or instrument of the amplifier supply")
    sc.add_argument("--no-record", action="store_true",
                     help="do not log every instrument exchange to the run folder")
    sc.set_defaults(func=cmd_source)
