"""``hil study``: studies that compare the model with chips (``hil study mismatch``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hil.commands.train import add_config_args, resolve_config
from hil.runs import RunFolder


def register(sub: Any) -> None:
    p = sub.add_parser("study",
                       help="studies of the model against chips (mismatch sweep, device-time budget)")
    ssub = p.add_subparsers(dest="study", metavar="STUDY")
    ssub.required = True
    m = ssub.add_parser(
        "mismatch", help="accuracy versus device mismatch: ideal, uploaded, calibrated twin, in the loop",
        description="Sweep the mismatch of the simulated chips (coefficient of variation of every "
        "oscillator's gamma and sigma) and report, over the seeds: the ideal model's accuracy, its "
        "weights uploaded as they are, off-chip fine-tuning on the calibrated twin, and "
        "chip-in-the-loop fine-tuning with the nominal and the calibrated twin. Table and plot in "
        "the run folder.")
    add_config_args(m)
    m.add_argument("--levels", default="0,0.1,0.2,0.3",
                   help="mismatch levels, coefficients of variation (default 0,0.1,0.2,0.3)")
    m.add_argument("--finetune-epochs", type=int, default=5, help="epochs of each fine-tuning")
    m.add_argument("--finetune-lr", type=float, default=None, help="fine-tuning lr0 (default train.lr0 / 2)")
    m.add_argument("--loop-lr", type=float, default=None,
                   help="lr0 of chip-in-the-loop fine-tuning (default: the training schedule's final "
                   "rate / 3; noisy chip gradients need a smaller step than off-chip fine-tuning)")
    m.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    m.add_argument("--budget-repeats", type=int, default=2, metavar="N",
                   help="gap budget of the uploaded weights at every level (integrator, quantisation, "
                   "noise, offsets, mismatch): measurements per noisy figure; 0 skips it (default 2)")
    m.add_argument("--device", action="append", default=[], metavar="KEY=VALUE",
                   help="other simulated-chip settings, e.g. --device thermal_d_ghz=0.01 (repeatable)")
    add_calibration_args(m)
    m.set_defaults(func=run_mismatch)
    register_budget(ssub)


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    """The twin calibration's settings, shared by the studies (defaults: hil.chip.twin's
    DEFAULT_WRITES and DEFAULT_REPEATS, read when the command runs, not at start-up)."""
    p.add_argument("--calibration-writes", type=int, default=None, metavar="N",
                   help="twin calibration: uploads averaged per probe level, against write errors; "
                   "each upload costs the chip's programming time (default 8)")
    p.add_argument("--calibration-repeats", type=int, default=None, metavar="N",
                   help="twin calibration: repeated runs averaged per upload, against noise (default 512)")


def calibration_settings(args: argparse.Namespace) -> dict[str, int]:
    """``--calibration-writes`` and ``--calibration-repeats`` as :func:`hil.chip.twin.calibrate`'s
    keywords (its defaults where not given), refused before any folder or chip when not positive."""
    from hil.chip.twin import DEFAULT_REPEATS, DEFAULT_WRITES
    from hil.errors import ConfigError

    out = {"writes": DEFAULT_WRITES if args.calibration_writes is None else args.calibration_writes,
           "repeats": DEFAULT_REPEATS if args.calibration_repeats is None else args.calibration_repeats}
    for key, v in out.items():
        if v < 1:
            raise ConfigError(f"--calibration-{key}", f"must be >= 1, got {v}", "command line")
    return out


def run_mismatch(args: argparse.Namespace) -> int:
    from hil.chip.backends import parse_device_overrides
    from hil.chip.study import METHODS
    from hil.commands.train import set_threads
    from hil.errors import ConfigError
    from hil.jobs import mismatch_study

    set_threads(args.threads)
    cfg = resolve_config(args, default_preset="digits")
    try:
        levels = [float(v) for v in args.levels.split(",") if v.strip()]
    except ValueError:
        raise ConfigError("--levels", f"cannot read {args.levels!r}; use e.g. 0,0.1,0.2,0.3",
                          "command line") from None
    if not levels:
        raise ConfigError("--levels", "at least one level is needed", "command line")
    methods = METHODS if args.methods is None else tuple(m.strip() for m in args.methods.split(","))
    folder = RunFolder.create("study-mismatch", args.runs_dir, args.name or cfg.task.name)
    print(f"run folder: {folder}", file=sys.stderr)
    s = mismatch_study(cfg, levels, folder, finetune_epochs=args.finetune_epochs,
                       finetune_lr=args.finetune_lr, loop_lr=args.loop_lr,
                       methods=methods, device=parse_device_overrides(args.device),
                       progress=not args.no_progress, budget_repeats=args.budget_repeats,
                       calibration=calibration_settings(args))
    print()
    print(folder.file("mismatch_study.md").read_text())
    print(f"{s['seconds']:.0f} s")
    print(f"run folder: {folder}")
    return 0


def register_budget(ssub: Any) -> None:
    b = ssub.add_parser(
        "budget", help="accuracy on the chip versus device time, per gradient estimator (issue 22)",
        description="Train off-chip on the ideal model (or take --init), then fine-tune on one chip "
        "per seed with each estimator, measuring the test split along the way; report accuracy versus "
        "the training device time (calibration, uploads, runs), the device time each estimator needs "
        "to come within 1 point of the ideal model, and a plot of every estimator's curve.")
    add_config_args(b)
    b.add_argument("--estimators", default="offchip,physics,twin:every=10,spsa:c=0.02/n=2",
                   help="comma-separated estimators; separate an estimator's own settings with '/' "
                   "(e.g. spsa:c=0.02/n=2); 'offchip' = calibrated twin fine-tuned off-chip, uploaded "
                   "once; any of them + '+readout' (e.g. twin:every=3+readout) then refits the readout "
                   "to one pass of the training split on the chip "
                   "(default: offchip,physics,twin:every=10,spsa:c=0.02/n=2)")
    b.add_argument("--level", type=float, default=0.2, help="mismatch (cv of gamma and sigma; default 0.2)")
    b.add_argument("--backend", default="sim", help="sim (default) or lab:<lab config> (virtual clock)")
    b.add_argument("--twin", choices=("nominal", "calibrated"), default="calibrated",
                   help="twin for the backward pass (calibration time counts)")
    b.add_argument("--finetune-epochs", type=int, default=5, help="epochs of each fine-tuning (default 5)")
    b.add_argument("--loop-lr", type=float, default=None,
                   help="lr0 in the loop (default: the training schedule's final rate / 3)")
    b.add_argument("--finetune-lr", type=float, default=None, help="lr0 of offchip (default train.lr0 / 2)")
    b.add_argument("--curve-every", type=int, default=3, metavar="N",
                   help="measure the test split every N updates as well as every epoch (default 3)")
    b.add_argument("--init", metavar="RUN_FOLDER", default=None,
                   help="take the ideal weights from this trained run (same seeds) instead of training")
    b.add_argument("--device", action="append", default=[], metavar="KEY=VALUE",
                   help="other simulated-chip settings (repeatable)")
    add_calibration_args(b)
    b.set_defaults(func=run_budget)


def run_budget(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hil.chip.backends import parse_device_overrides
    from hil.commands.train import set_threads
    from hil.errors import ConfigError
    from hil.jobs import budget_study
    from hil.training.checkpoints import load_run

    set_threads(args.threads)
    cfg = resolve_config(args, default_preset="digits")
    specs = [e.strip().replace("/", ",") for e in args.estimators.split(",") if e.strip()]
    if not specs:
        raise ConfigError("--estimators", "at least one estimator is needed", "command line")
    from hil.chip.budget_study import check_settings

    check_settings(specs, args.twin, args.finetune_epochs, args.curve_every, args.level)
    calibration = calibration_settings(args)
    init_state = None
    if args.init:
        p = Path(args.init)
        _, _, src = load_run(p if p.is_dir() else p.parent)
        if list(src.seeds) != list(cfg.seeds):
            raise ConfigError("--init", f"the run has seeds {list(src.seeds)}, the study {cfg.seeds}",
                              "command line")
        init_state = src.state_dict()
    folder = RunFolder.create("study-budget", args.runs_dir, args.name or cfg.task.name)
    print(f"run folder: {folder}", file=sys.stderr)
    s = budget_study(cfg, folder, specs, level=args.level, backend=args.backend,
                     device=parse_device_overrides(args.device), twin=args.twin,
                     finetune_epochs=args.finetune_epochs, loop_lr=args.loop_lr, finetune_lr=args.finetune_lr,
                     curve_every=args.curve_every, init_state=init_state, progress=not args.no_progress,
                     calibration=calibration)
    print()
    print(folder.file("budget_study.md").read_text())
    print(f"{s['seconds']:.0f} s")
    print(f"run folder: {folder}")
    return 0
