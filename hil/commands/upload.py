"""``hil upload``: put a trained run on chips, evaluate there, report the gap to the model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hil.runs import RunFolder


def register(sub: Any) -> None:
    p = sub.add_parser(
        "upload", help="upload a trained run to chips and report the model-to-chip gap",
        description="Load a run folder written by hil train, upload every seed's weights to its own "
        "chip (a simulated chip is drawn with the seed), evaluate the test split on the chip and on "
        "the model, and write the sim-to-real report (accuracy gap, per-layer state residuals, "
        "plots) to a new run folder. --verify adds program-and-verify after the upload.")
    p.add_argument("run_folder", help="a run folder written by hil train (holds model.pt)")
    from hil.commands.train import add_backend_args

    add_backend_args(p)
    p.set_defaults(backend="sim")
    p.add_argument("--no-budget", dest="budget", action="store_false",
                   help="skip the gap budget (simulated chips: the gap split into integrator, "
                   "quantisation, noise, programming, offsets, mismatch, drift)")
    p.add_argument("--budget-repeats", type=int, default=3, metavar="N",
                   help="measurements per noisy figure of the gap budget (mean and standard error)")
    p.add_argument("--verify", action="store_true",
                   help="program and verify: probe, compare with the model, correct, re-upload")
    p.add_argument("--tol", type=float, default=0.01, help="verify: tolerance per parameter (absolute)")
    p.add_argument("--max-iters", type=int, default=3, help="verify: most corrections")
    p.add_argument("--calibrated-twin", action="store_true",
                   help="verify against a twin calibrated on each chip instead of the nominal model")
    p.add_argument("--runs-dir", default=None, help="parent folder of run folders (default: runs)")
    p.add_argument("--name", help="suffix for the run folder's name")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hil.commands.train import set_threads
    from hil.errors import ConfigError
    from hil.jobs import upload_run

    set_threads(args.threads)
    if args.tol <= 0:
        raise ConfigError("--tol", f"must be > 0, got {args.tol}", "command line")
    if args.max_iters < 0:
        raise ConfigError("--max-iters", f"must be >= 0, got {args.max_iters}", "command line")
    if args.budget_repeats < 1:
        raise ConfigError("--budget-repeats", f"must be >= 1, got {args.budget_repeats}", "command line")
    from hil.training.checkpoints import load_run

    load_run(Path(args.run_folder))  # a bad run folder stops here, before any chip is opened
    folder = RunFolder.create("upload", args.runs_dir, args.name or args.backend)
    print(f"run folder: {folder}", file=sys.stderr)
    s = upload_run(Path(args.run_folder), args.backend, folder, args.device, verify=args.verify,
                   tol=args.tol, max_iters=args.max_iters, calibrated_twin=args.calibrated_twin,
                   budget_repeats=args.budget_repeats if args.budget else 0)
    m = s["metric"]
    gaps = ", ".join(f"{100 * r['gap']:.1f}" for r in s["per_seed"])
    print(f"\nmodel {m}: median {100 * s['model']['median']:.2f} %; on the {args.backend} chips: median "
          f"{100 * s['device']['median']:.2f} %; gap median {100 * s['gap']['median']:.2f} points "
          f"(per seed: {gaps})")
    if "verify" in s:
        for v in s["verify"]:
            print(f"verify seed {v['seed']}: converged={v['converged']} after {v['iterations']} corrections, "
                  f"max residual per iteration {[round(x, 4) for x in v['max_abs_residual']]}, "
                  f"device {m} {100 * v['device_after_verify']:.2f} %")
    if "gap_budget" in s:
        from hil.chip.gap_budget import format_budget

        print(format_budget(s["gap_budget"]))
    print(f"run folder: {folder}")
    return 0
