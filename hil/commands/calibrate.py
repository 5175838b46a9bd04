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

The procedures are the jobs of :mod:`hil.bench.calibrate` (imported from :mod:`hil.jobs`);
this module parses and checks the arguments (before any run folder or instrument is opened),
calls the job and prints its result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from hil.bench.lab import REFERENCE_SAMPLE  # noqa: F401  (library; re-exported)
from hil.errors import ConfigError, HilError
from hil.runs import RunFolder


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


def _print_lab_time(record: dict[str, Any]) -> None:
    """Print the lab time of a ``lab_time.json`` record (its sessions and note, if any)."""
    lab_time_s, sessions, note = record["lab_time_s"], record["sessions"], record.get("note", "")
    hours = lab_time_s / 3600
    over = f" over {sessions} session(s)" if sessions != 1 else ""
    print(f"lab time {lab_time_s:.0f} s ({hours:.2f} h){over}" + (f"; {note}" if note else ""))


def _resume_folder(resume: str | None, kind: str) -> RunFolder:
    """The run folder to continue (``--resume``), refused if missing; else a new one."""
    if resume and not Path(resume).is_dir():
        raise HilError(f"--resume {resume}: no such run folder")
    return RunFolder(Path(resume)) if resume else RunFolder.create(kind)


# --------------------------------------------------------------------------- reference


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
    from calibration.reference import SweepPlan
    from hil.jobs import reference_map_job, reference_sweep_settings

    _check_sweep(args)
    field_cal = _load_field_calibration(args)
    devices = {k: int(v) for k, v in _pairs(args.devices, "--devices").items()}
    zs = np.round(np.arange(args.z_start, args.z_stop + 1e-9, args.z_step), 6)
    plan = SweepPlan(devices=devices, stage_z_mm=zs.tolist(),
                     freq_hz=np.round(np.arange(args.f_start, args.f_stop + 1, args.f_step)).tolist(),
                     power_dbm=args.power_dbm, source_port=args.source_port, nplc=args.nplc,
                     direction=args.direction, gradient_oe_per_mm=args.gradient,
                     gamma_hz_per_oe=args.gamma)
    settings = reference_sweep_settings(args.lab, plan, args.reference_sample)
    run = _resume_folder(args.resume, "calibrate-reference")
    print(f"run folder: {run}")
    res = reference_map_job(args.lab, plan, run, settings=settings, resume=bool(args.resume),
                            reference_sample=args.reference_sample, record=not args.no_record,
                            max_points=args.max_points, field_calibration=field_cal,
                            field_calibration_path=args.field_calibration,
                            device_offset_mm=args.device_offset_mm)
    _print_lab_time(res.lab_time)
    print(f"{res.new_points} new points, {res.saved_points} of {res.total_points} saved")
    if not res.complete:
        print("map incomplete: run again with --resume", run.path)
        return 3
    _print_kittel(res.fit)
    print(f"rescaling slope {res.rescaling['slope_v_per_hz'] * 1e15:.3f} uV/GHz")
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


# --------------------------------------------------------------------------- chains


def cmd_chain_design(args: argparse.Namespace) -> int:
    from calibration.chain import THESIS_FREQS_HZ, THESIS_WEIGHTS
    from hil.jobs import chain_design_job, design_chain_set, load_reference_model

    model = load_reference_model(args.map)
    if args.weights:
        spec = json.loads(Path(args.weights).read_text())
        freqs, weights = spec["freq_hz"], spec["weights"]
    else:
        freqs, weights = list(THESIS_FREQS_HZ), {k: list(v) for k, v in THESIS_WEIGHTS.items()}
    designs = design_chain_set(model, freqs, weights, args.dz_max_um)
    res = chain_design_job(model, designs, args.map, RunFolder.create("chain-design"))
    for d in res.designs:
        print(f"{d.name}: v {d.v_um()} um, dz {d.dz_um} um, predicted w {np.round(d.predicted_w, 4)}")
    print(f"design file: {res.design_file}")
    print(f"figure: {res.figure}")
    _print_lab_time(res.lab_time)
    return 0


def cmd_chain_measure(args: argparse.Namespace) -> int:
    from calibration.chain import read_design
    from hil.jobs import ChainMeasureSettings, chain_measure_job, load_reference_model

    designs = read_design(args.design)
    model = load_reference_model(args.map)
    ports = {k: int(v) for k, v in _pairs(args.ports, "--ports").items()}
    settings = ChainMeasureSettings(p0_mw=args.p0_mw, stage_ref_mm=args.stage_ref_mm, nplc=args.nplc,
                                    n_avg=args.n_avg, fabricate=args.fabricate)
    run = RunFolder.create("chain-measure")
    print(f"run folder: {run}")
    res = chain_measure_job(args.lab, designs, model, ports, run, settings,
                            record=not args.no_record, log=print)
    print(res.table)
    if res.figure is not None:
        print(f"figure: {res.figure}")
    _print_lab_time(res.lab_time)
    return 0


# --------------------------------------------------------------------------- position


def cmd_position(args: argparse.Namespace) -> int:
    """Algorithm 2 per chain, then (``--track-inputs``) a long run re-optimised every N inputs;
    ``--resume RUN_FOLDER`` (same settings) continues it (see :func:`hil.jobs.position_job`)."""
    from calibration.chain import read_design
    from hil.jobs import PositionSettings, load_reference_model, position_job, position_state_settings

    designs = read_design(args.design)
    model = load_reference_model(args.map)
    ports = {k: int(v) for k, v in _pairs(args.ports, "--ports").items()}
    settings = PositionSettings(p0_mw=args.p0_mw, stage_ref_mm=args.stage_ref_mm, nplc=args.nplc,
                                fabricate=args.fabricate, window_mm=args.window_mm, trials=args.trials,
                                n_avg=args.n_avg, seed=args.seed, track_inputs=args.track_inputs,
                                every=args.every, wait_s=args.wait_s, reopt_trials=args.reopt_trials)
    state_settings = position_state_settings(args.lab, args.design, args.map, ports, settings)
    run = _resume_folder(args.resume, "position-optimise")
    print(f"run folder: {run}")
    res = position_job(args.lab, designs, model, ports, run, settings, state_settings=state_settings,
                       resume=bool(args.resume), record=not args.no_record, log=print)
    if res.figure is not None:
        print(f"figure: {res.figure}")
    _print_lab_time(res.lab_time)
    return 0


# --------------------------------------------------------------------------- source


def cmd_source(args: argparse.Namespace) -> int:
    from hil.jobs import source_job

    ops = {int(k): v for k, v in _pairs(args.channels, "--channels").items()}
    run = RunFolder.create("source-calibrate")
    print(f"run folder: {run}")
    res = source_job(args.lab, ops, run, amplifier_role=args.amplifier, record=not args.no_record,
                     log=print)
    cal = res.calibration
    for ch, c in cal.channels.items():
        print(f"channel {ch}: {c.freq_hz[0] / 1e9:.3f}-{c.freq_hz[-1] / 1e9:.3f} GHz, tuning "
              f"{cal.tuning_for(ch, c.operating_freq_hz):.3f} V at {c.operating_freq_hz / 1e9:.3f} GHz")
    print(f"calibration file: {res.calibration_file}")
    print(f"figure: {res.figure}")
    _print_lab_time(res.lab_time)
    return 0


# --------------------------------------------------------------------------- field probe


def cmd_field(args: argparse.Namespace) -> int:
    """Hall-probe scan through the gradient: the gradient and the field zero, measured."""
    import math

    from calibration.field import FieldScanPlan
    from hil.jobs import field_job

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
    res = field_job(args.lab, plan, run, accuracy_frac=args.accuracy_frac,
                    zero_uncertainty_oe=args.zero_uncertainty_oe, record=not args.no_record)
    cal, path = res.calibration, res.calibration_file
    trend = "falls" if cal.direction < 0 else "rises"
    print(f"gradient {cal.gradient_oe_per_mm:.3f} +- {cal.gradient_sigma_oe_per_mm:.3f} Oe/mm "
          f"(fit {cal.slope_sigma_fit_oe_per_mm:.3f}, probe accuracy "
          f"{100 * cal.accuracy_frac:.2g} %); the field {trend} with stage z")
    print(f"field zero at the probe: stage z {cal.stage_z0_mm:.4f} mm +- "
          f"{1e3 * cal.stage_z0_sigma_mm:.1f} um; residual {cal.residual_rms_oe:.3f} Oe rms over "
          f"{cal.n_points} points")
    print(f"calibration file: {path} (hil calibrate reference --field-calibration {path})")
    _print_lab_time(res.lab_time)
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
