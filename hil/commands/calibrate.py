"""``hil calibrate reference``, ``hil calibrate field``, ``hil chain design``, ``hil chain measure``,
``hil position optimise``, ``hil source calibrate``.

Each command that touches instruments takes a lab config (``lab_configs/virtual.yaml`` or a
real bench) and writes a run folder. Every command prints the lab time it used and records it
in its run folder (``lab_time.json``, and in its result file); a resumed reference sweep adds
to the lab time of its earlier sessions. On a virtual lab, ``--world`` swaps the sample (e.g. the
reference devices of ``REFERENCE_SAMPLE``) and ``chain measure --fabricate`` builds the designed
chains in the virtual world (world-file overrides; the calibration code never reads the truth).

Pictures: ``chain design`` draws ``chain_design.png`` (each chain's diodes along the gradient),
``chain measure`` ``chain_weights.png`` (measured vs target weights), ``source calibrate``
``source_calibration.png`` (f(V) and P(V) per channel). ``position optimise`` saves each
chain's optimum and each tracked input as it goes and continues with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from hil.bench.lab import REFERENCE_SAMPLE, load_reference_map  # noqa: F401  (library; re-exported)
from hil.errors import ConfigError, HilError
from hil.runs import RunFolder
from hil.runs import save_figure as _save_figure


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
    from hil.bench.lab import load_lab_config, open_lab

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


def _lab_time(run: RunFolder, command: str, lab_time_s: float, sessions: int = 1,
              note: str = "") -> dict[str, Any]:
    """Print the lab time a command used and record it in ``lab_time.json`` of its run folder."""
    record = {"command": command, "lab_time_s": float(lab_time_s), "sessions": sessions,
              **({"note": note} if note else {})}
    run.write_json("lab_time.json", record)
    hours = lab_time_s / 3600
    over = f" over {sessions} session(s)" if sessions != 1 else ""
    print(f"lab time {lab_time_s:.0f} s ({hours:.2f} h){over}" + (f"; {note}" if note else ""))
    return record


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="pt", dynamic_ncols=True)


# --------------------------------------------------------------------------- reference

#: What a sweep was started with (checked on --resume) and the lab time it has used so far.
SWEEP_STATE = "sweep_state.json"


def _sweep_settings(args: argparse.Namespace, plan: Any) -> dict[str, Any]:
    """Every measurement setting of a reference sweep, and the lab config's identity."""
    from hil.bench.lab import load_lab_config

    return {"devices": plan.devices, "stage_z_mm": plan.stage_z_mm, "freq_hz": plan.freq_hz,
            "power_dbm": plan.power_dbm, "source_port": plan.source_port, "nplc": plan.nplc,
            "direction": plan.direction, "gradient_oe_per_mm": plan.gradient_oe_per_mm,
            "gamma_hz_per_oe": plan.gamma_hz_per_oe, "reference_sample": args.reference_sample,
            "lab_config_sha256": load_lab_config(args.lab).identity_hash()}


def _new_sweep(run: RunFolder, settings: dict[str, Any]) -> dict[str, Any]:
    state = {"settings": settings, "lab_time_s": 0.0, "sessions": 0}
    run.write_json(SWEEP_STATE, state)
    return state


def _check_resume(run: RunFolder, settings: dict[str, Any], state_file: str = SWEEP_STATE,
                  kind: str = "a reference sweep folder", noun: str = "sweep",
                  whole: str = "map") -> dict[str, Any]:
    """The stored state, if ``settings`` are those the sweep was started with; else stop."""
    path = run.file(state_file)
    if not path.exists():
        raise HilError(f"--resume {run.path}: no {state_file} (not {kind}?)")
    state = json.loads(path.read_text())
    stored = json.loads(json.dumps(state["settings"]))
    now = json.loads(json.dumps(settings))  # the same JSON types as the stored ones
    differ = [f"{key}: {_short(stored.get(key))} in the {noun}, {_short(now.get(key))} now"
              for key in sorted(set(stored) | set(now)) if stored.get(key) != now.get(key)]
    if differ:
        raise HilError(f"--resume {run.path}: settings differ from the {noun}'s, refusing to mix "
                       f"them in one {whole}: " + "; ".join(differ))
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
    field_cal = _load_field_calibration(args)
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
                                            max_points=args.max_points,
                                            lab_time_offset_s=float(state["lab_time_s"]))
            finally:
                bar.close()
                state["lab_time_s"] += float(lab.clock.now_s()) - start_s
                state["sessions"] += 1
                run.write_json(SWEEP_STATE, state)
    _lab_time(run, "calibrate reference", state["lab_time_s"], state["sessions"])
    m = load_reference_map(csv_path)
    print(f"{new} new points, {int(np.isfinite(m.device_grid_v).sum())} of {total} saved")
    if not m.complete:
        print("map incomplete: run again with --resume", run.path)
        return 3
    if field_cal is not None:
        m.use_field_calibration(field_cal.gradient_oe_per_mm, field_cal.gradient_sigma_oe_per_mm,
                                probe_stage_z0_mm=field_cal.stage_z0_mm,
                                device_offset_mm=args.device_offset_mm,
                                source=f"field probe ({Path(args.field_calibration).resolve()})")
    fit = m.fit_kittel(gamma_hz_per_oe=args.gamma)
    rescale = m.fit_power_rescaling()
    summary = {"kittel": fit.__dict__, "resonance_hz": m.resonance_hz().tolist(),
               "field_oe": m.field_oe().tolist(), "stage_z_mm": m.stage_z_mm.tolist(),
               "power_rescaling": rescale, "lab_time_s": state["lab_time_s"],
               "sessions": state["sessions"]}
    run.write_json("reference_fit.json", summary)
    _plot_reference(m, run.file("reference_map.png"))
    _print_kittel(fit)
    print(f"rescaling slope {rescale['slope_v_per_hz'] * 1e15:.3f} uV/GHz")
    return 0


def _load_field_calibration(args: argparse.Namespace) -> Any:
    """``--field-calibration``: the measured gradient (and, with ``--device-offset-mm``, the
    field zero) of ``hil calibrate field`` instead of the assumed ``--gradient``; read and
    checked before anything is measured."""
    if args.device_offset_mm is not None and not args.field_calibration:
        raise ConfigError("--device-offset-mm", "needs --field-calibration (the probe's field "
                          "zero it is an offset from)", "command line")
    if not args.field_calibration:
        return None
    from calibration.field import FieldCalibration

    try:
        return FieldCalibration.load(args.field_calibration)
    except (OSError, ValueError, TypeError) as exc:
        raise HilError(f"--field-calibration {args.field_calibration}: {exc}") from None


def _print_kittel(fit: Any) -> None:
    print(f"Kittel (eq. 2.9) at gamma/2pi {fit.gamma_hz_per_oe / 1e6:.4g} MHz/Oe and gradient "
          f"{fit.gradient_oe_per_mm:.2f} +- {fit.gradient_sigma_oe_per_mm:.2f} Oe/mm "
          f"({fit.gradient_source}): M_eff {fit.meff_oe:.0f} +- {fit.meff_sigma_oe:.0f} Oe "
          f"(fit {fit.meff_fit_sigma_oe:.0f}, gradient {fit.meff_gradient_sigma_oe:.0f}); "
          f"field zero at stage z {fit.stage_z0_mm:.4f} mm"
          + (" (held: probe zero + offset)" if fit.stage_z0_fixed else ""))
    at = ", ".join(f"{float(g) / 1e6:.4g} MHz/Oe: {v:.0f} Oe"
                   for g, v in fit.meff_at_gamma_oe.items())
    print(f"M_eff moves with the assumed gamma: dM_eff/dgamma "
          f"{fit.dmeff_dgamma_oe_per_hz_per_oe * 1e6:.0f} Oe per MHz/Oe; M_eff at {at}")
    if fit.gamma_free is not None:
        gf = fit.gamma_free
        print(f"gamma free: gamma/2pi {gf['gamma_hz_per_oe'] / 1e6:.3f} +- "
              f"{gf['gamma_sigma_hz_per_oe'] / 1e6:.3f} MHz/Oe, M_eff {gf['meff_oe']:.0f} +- "
              f"{gf['meff_sigma_oe']:.0f} Oe (correlation {gf['correlation']:+.3f})")
    print(f"note: {fit.note}")


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
    b.plot(h, kittel_hz(h, m.kittel.meff_oe, m.gamma_hz_per_oe) / 1e9, "-")
    b.set(xlabel="field (Oe)", ylabel="resonance (GHz)", title=f"Kittel M_eff {m.kittel.meff_oe:.0f} Oe")
    fig.tight_layout()
    _save_figure(fig, path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- chains


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
    print(f"figure: {_plot_design(m, designs, run.file('chain_design.png'))}")
    _lab_time(run, "chain design", 0.0, 0, "a computation on the reference map: no instrument used")
    return 0


def _plot_design(m: Any, designs: list[Any], path: Path) -> Path:
    """The design drawing, with the map's Kittel law giving each diode's resonance."""
    from calibration.reference import kittel_hz
    from hil.plots import chain_design

    def resonance_hz(z_um: np.ndarray) -> np.ndarray:
        field = np.abs(np.asarray(z_um, float)) * 1e-3 * m.gradient_oe_per_mm
        return kittel_hz(field, m.kittel.meff_oe, m.gamma_hz_per_oe)

    chain_design(designs, path, resonance_hz)
    return path


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
        start_s = float(lab.clock.now_s())
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
        lab_time_s = float(lab.clock.now_s()) - start_s
    text, means = error_table(rows)
    run.write_json("weights.json", {"chains": rows, "mean_abs_dw_pct": means,
                                    "lab_time_s": lab_time_s})
    run.write_text("table_3_1.txt", text + "\n")
    print(text)
    if rows:
        from hil.plots import chain_weights

        chain_weights(rows, run.file("chain_weights.png"))
        print(f"figure: {run.file('chain_weights.png')}")
    _lab_time(run, "chain measure", lab_time_s)
    return 0


# --------------------------------------------------------------------------- position


#: What a position optimisation was started with, each chain's optimum, and the lab time so far.
POSITION_STATE = "position_state.json"
#: The tracked inputs, one row each, appended as they are measured.
TRACKING_CSV = "tracking.csv"


def _sha256(path: str) -> str:
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise HilError(f"{path}: {exc.strerror or exc}") from None


def _position_settings(args: argparse.Namespace, ports: dict[str, int]) -> dict[str, Any]:
    """Every setting of a position optimisation (checked on --resume): the design and map by
    content, the bench by the lab config's identity."""
    from hil.bench.lab import load_lab_config

    return {"design_sha256": _sha256(args.design), "map_sha256": _sha256(args.map), "ports": ports,
            "p0_mw": args.p0_mw, "stage_ref_mm": args.stage_ref_mm, "nplc": args.nplc,
            "fabricate": args.fabricate, "window_mm": args.window_mm, "trials": args.trials,
            "n_avg": args.n_avg, "seed": args.seed, "track_inputs": args.track_inputs,
            "every": args.every, "wait_s": args.wait_s, "reopt_trials": args.reopt_trials,
            "lab_config_sha256": load_lab_config(args.lab).identity_hash()}


def cmd_position(args: argparse.Namespace) -> int:
    """Algorithm 2 per chain, then (``--track-inputs``) a long run re-optimised every N inputs.

    Resumable: each chain's optimum goes to ``position_state.json`` when found and each tracked
    input to ``tracking.csv`` when measured; ``--resume RUN_FOLDER`` (same settings) skips the
    chains already optimised and continues each track after its last saved input, re-optimising
    there first. The lab time adds up over the sessions.
    """
    from calibration.chain import place_chain, read_design, virtual_lab_overrides
    from calibration.position import (
        Tracking,
        append_track_row,
        generator_one_hot,
        optimise_z,
        plot_tracking,
        read_track_rows,
        track,
    )
    from hil.locks import BenchLock

    designs = read_design(args.design)
    _, v_ref, rescale, _ = _model(args.map)
    ports = {k: int(v) for k, v in _pairs(args.ports, "--ports").items()}
    settings = _position_settings(args, ports)
    if args.resume and not Path(args.resume).is_dir():
        raise HilError(f"--resume {args.resume}: no such run folder")
    run = RunFolder(Path(args.resume)) if args.resume else RunFolder.create("position-optimise")
    print(f"run folder: {run}")
    overrides = virtual_lab_overrides(designs) if args.fabricate else None
    chosen = [d for d in designs if d.name in ports]
    rng = np.random.default_rng(args.seed)  # the run's one-hot inputs, drawn chain by chain
    tones = {d.name: rng.integers(0, len(d.freq_hz), args.track_inputs) for d in chosen} \
        if args.track_inputs else {}
    csv_path = run.file(TRACKING_CSV)
    with BenchLock(run.file(".lock"), f"run folder {run.path}"):
        if args.resume:
            state = _check_resume(run, settings, POSITION_STATE, "a position optimisation folder",
                                  "run", "run")
        else:
            state = {"settings": settings, "lab_time_s": 0.0, "sessions": 0, "chains": {}}
            run.write_json(POSITION_STATE, state)
        before_s, session = float(state["lab_time_s"]), int(state["sessions"]) + 1
        saved = read_track_rows(csv_path)
        with _open(args.lab, overrides, _record(args, run)) as lab:
            start_s = float(lab.clock.now_s())

            def save_state() -> None:
                state["lab_time_s"] = before_s + float(lab.clock.now_s()) - start_s
                state["sessions"] = session
                run.write_json(POSITION_STATE, state)

            try:
                lab["voltmeter"].configure_voltage(nplc=args.nplc)
                for d in chosen:
                    p_x1 = args.p0_mw * rescale(np.asarray(d.freq_hz))  # x = 1 (eq. 3.3)
                    inputs = np.diag(p_x1)
                    measure = generator_one_hot(ports[d.name], d.freq_hz, n_avg=args.n_avg)
                    if d.name not in state["chains"]:
                        placed = place_chain(lab, ports[d.name], d, v_ref, rescale, args.p0_mw,
                                             stage_ref_mm=args.stage_ref_mm, fine_span_mm=0.0,
                                             progress=print)
                        z0 = placed["stage_z_mm"]
                        opt = optimise_z(lab, d, measure, inputs, p_x1, z0 - args.window_mm,
                                         z0 + args.window_mm, n_trials=args.trials, seed=args.seed)
                        print(f"{d.name}: stage z {opt.stage_z_mm:.4f} mm, V_max "
                              f"{opt.v_max_v * 1e6:.3f} uV, M {opt.m:.4f}")
                        state["chains"][d.name] = {"stage_z_mm": opt.stage_z_mm, "v_max_v": opt.v_max_v,
                                                   "m": opt.m, "trials": opt.trials,
                                                   "profile_stage_z_mm": z0, "session": session}
                        run.append_metrics({"chain": d.name, **state["chains"][d.name]})
                        save_state()
                    have = saved.setdefault(d.name, [])
                    if len(have) >= args.track_inputs:
                        continue
                    if have:
                        print(f"{d.name}: resuming the track at input {len(have)} of {args.track_inputs}")
                    run_inputs = np.zeros((args.track_inputs, len(d.freq_hz)))
                    run_inputs[np.arange(args.track_inputs), tones[d.name]] = 1.0

                    def keep(row: dict[str, Any], name: str = d.name, have: list = have) -> None:
                        full = {"chain": name, "tone": int(tones[name][row["input"]]), "session": session,
                                **row}
                        append_track_row(csv_path, full)
                        have.append(full)

                    track(lab, d, measure, inputs, run_inputs * p_x1, p_x1,
                          have[-1]["z_mm"] if have else state["chains"][d.name]["stage_z_mm"],
                          every=args.every, n_trials=args.reopt_trials,
                          between=lambda i: lab.sleep(args.wait_s), seed=args.seed, start=len(have),
                          lab_time_offset_s=before_s - start_s, on_input=keep)
            finally:
                save_state()
    tracks = {name: Tracking.from_rows(rows) for name, rows in saved.items() if rows}
    run.write_json("positions.json", {"chains": state["chains"],
                                      "tracking": {k: v.__dict__ for k, v in tracks.items()},
                                      "run_inputs_tone": {k: v.tolist() for k, v in tones.items()},
                                      "lab_time_s": state["lab_time_s"], "sessions": state["sessions"]})
    if tracks:
        print(f"figure: {plot_tracking(tracks, run.file('position_tracking.png'))}")
    _lab_time(run, "position optimise", state["lab_time_s"], state["sessions"])
    return 0


# --------------------------------------------------------------------------- source


def cmd_source(args: argparse.Namespace) -> int:
    from calibration.source import SourceWiring, calibrate_source

    ops = {int(k): v for k, v in _pairs(args.channels, "--channels").items()}
    run = RunFolder.create("source-calibrate")
    print(f"run folder: {run}")
    with _open(args.lab, None, _record(args, run)) as lab:
        start_s = float(lab.clock.now_s())
        cal = calibrate_source(lab, ops, SourceWiring(amplifier_role=args.amplifier), progress=print)
        lab_time_s = float(lab.clock.now_s()) - start_s
    path = cal.save(run.file("source_calibration.json"))
    for ch, c in cal.channels.items():
        print(f"channel {ch}: {c.freq_hz[0] / 1e9:.3f}-{c.freq_hz[-1] / 1e9:.3f} GHz, tuning "
              f"{cal.tuning_for(ch, c.operating_freq_hz):.3f} V at {c.operating_freq_hz / 1e9:.3f} GHz")
    print(f"calibration file: {path}")
    from hil.plots import source_calibration

    source_calibration(cal, run.file("source_calibration.png"))
    print(f"figure: {run.file('source_calibration.png')}")
    _lab_time(run, "source calibrate", lab_time_s)
    return 0


# --------------------------------------------------------------------------- field probe


def cmd_field(args: argparse.Namespace) -> int:
    """Hall-probe scan through the gradient: the gradient and the field zero, measured."""
    import math

    from calibration.field import FieldScanPlan, calibrate_field

    for opt, v in (("--z-step", args.z_step), ("--max-field-oe", args.max_field_oe)):
        if not (math.isfinite(v) and v > 0):
            raise ConfigError(opt, f"must be a number > 0, got {v:g}", "command line")
    if not (math.isfinite(args.z_start) and math.isfinite(args.z_stop)
            and args.z_stop > args.z_start):
        raise ConfigError("--z-stop", f"must be a number > --z-start ({args.z_start:g}), got "
                          f"{args.z_stop:g}", "command line")
    zs = np.round(np.arange(args.z_start, args.z_stop + 1e-9, args.z_step), 6).tolist()
    plan = FieldScanPlan(stage_z_mm=zs, n_avg=args.n_avg, settle_s=args.settle_s,
                         max_field_oe=args.max_field_oe, order=args.order)
    try:
        plan.check()
    except ValueError as exc:
        raise ConfigError("--z-start/--z-stop/--z-step/--n-avg/--order", str(exc),
                          "command line") from None
    run = RunFolder.create("calibrate-field")
    print(f"run folder: {run}")
    with _open(args.lab, None, _record(args, run)) as lab:
        start_s = float(lab.clock.now_s())
        cal = calibrate_field(lab, plan, run.file("field_profile.csv"),
                              accuracy_frac=args.accuracy_frac,
                              zero_uncertainty_oe=args.zero_uncertainty_oe)
        cal.lab_time_s = float(lab.clock.now_s()) - start_s
    path = cal.save(run.file("field_calibration.json"))
    _plot_field(cal, run.file("field_profile.png"))
    trend = "falls" if cal.direction < 0 else "rises"
    print(f"gradient {cal.gradient_oe_per_mm:.3f} +- {cal.gradient_sigma_oe_per_mm:.3f} Oe/mm "
          f"(fit {cal.slope_sigma_fit_oe_per_mm:.3f}, probe accuracy "
          f"{100 * cal.accuracy_frac:.2g} %); the field {trend} with stage z")
    print(f"field zero at the probe: stage z {cal.stage_z0_mm:.4f} mm +- "
          f"{1e3 * cal.stage_z0_sigma_mm:.1f} um; residual {cal.residual_rms_oe:.3f} Oe rms over "
          f"{cal.n_points} points")
    print(f"calibration file: {path} (hil calibrate reference --field-calibration {path})")
    _lab_time(run, "calibrate field", cal.lab_time_s)
    return 0


def _plot_field(cal: Any, path: Path) -> None:
    from hil.plots import plt

    z = np.array([p["stage_z_mm"] for p in cal.points])
    h = np.array([p["field_oe"] for p in cal.points])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(z, h, "o", label="probe")
    zz = np.linspace(z.min(), z.max(), 200)
    a.plot(zz, cal.slope_oe_per_mm * (zz - cal.stage_z0_mm), "-",
           label=f"{cal.slope_oe_per_mm:.2f} Oe/mm through z0")
    a.axvline(cal.stage_z0_mm, color="0.6", lw=0.8)
    a.set(xlabel="stage z (mm)", ylabel="field (Oe)", title="field at the Hall probe")
    a.legend()
    b.plot(z, h - cal.slope_oe_per_mm * (z - cal.stage_z0_mm), "o")
    b.set(xlabel="stage z (mm)", ylabel="field - linear (Oe)",
          title="beyond the linear gradient")
    fig.tight_layout()
    _save_figure(fig, path, dpi=100)
    plt.close(fig)


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
    ref.add_argument("--gamma", type=float, default=2.9e6,
                     help="the stated gamma/2pi (Hz/Oe) M_eff is given for; the fit also "
                     "reports M_eff at 2.8 and 2.9 MHz/Oe and dM_eff/dgamma")
    ref.add_argument("--field-calibration", metavar="JSON",
                     help="field_calibration.json of hil calibrate field: use the measured "
                     "gradient (and its uncertainty) instead of --gradient in the fit")
    ref.add_argument("--device-offset-mm", type=float, default=None,
                     help="with --field-calibration: stage z of the devices' field zero minus "
                     "the probe's (from the holder); the fit then holds the zero there")
    ref.add_argument("--resume", metavar="RUN_FOLDER", help="continue an interrupted sweep")
    ref.add_argument("--max-points", type=int, default=None, help="stop after this many new points")
    ref.add_argument("--reference-sample", action="store_true",
                     help="virtual lab only: put three reference devices on switch ports 1-3")
    ref.add_argument("--no-record", action="store_true",
                     help="do not log every instrument exchange to the run folder")
    ref.set_defaults(func=cmd_reference)

    fld = csub.add_parser("field", help="Hall-probe scan: field gradient and field zero")
    fld.add_argument("lab", help="lab config with a field_probe role (e.g. lab_configs/virtual.yaml)")
    fld.add_argument("--z-start", type=float, default=18.5, help="stage z start (mm)")
    fld.add_argument("--z-stop", type=float, default=22.0, help="stage z stop (mm)")
    fld.add_argument("--z-step", type=float, default=0.25, help="stage z step (mm)")
    fld.add_argument("--n-avg", type=int, default=5, help="readings per position")
    fld.add_argument("--settle-s", type=float, default=0.5, help="wait after each move (s)")
    fld.add_argument("--max-field-oe", type=float, default=350.0,
                     help="largest field expected: picks the probe's range")
    fld.add_argument("--order", type=int, default=3, choices=(1, 2, 3),
                     help="polynomial order of the fit (3 takes the gradient's softening)")
    fld.add_argument("--accuracy-frac", type=float, default=0.002,
                     help="the probe's gain accuracy, added to the gradient's uncertainty "
                     "(Model 425: 0.2 %% of reading)")
    fld.add_argument("--zero-uncertainty-oe", type=float, default=0.5,
                     help="the probe's zero offset (Oe), added to the field zero's uncertainty "
                     "as offset/gradient; zero the probe in its chamber to shrink it")
    fld.add_argument("--no-record", action="store_true",
                     help="do not log every instrument exchange to the run folder")
    fld.set_defaults(func=cmd_field)

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
    po.add_argument("--reopt-trials", type=int, default=12,
                    help="Optuna trials of each re-optimisation while tracking")
    po.add_argument("--resume", metavar="RUN_FOLDER",
                    help="continue an interrupted optimisation / tracking (same settings)")
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
