"""``hil tune``: Optuna search over the paper's hyperparameters."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any

from hil.commands.train import add_config_args, resolve_config
from hil.errors import ConfigError
from hil.runs import RunFolder


def register(sub: Any) -> None:
    p = sub.add_parser(
        "tune", help="Optuna hyperparameter search (tau, lr0, decay, densities, S, S_in, b_in)",
        description="Search hyperparameters with Optuna. The study is stored in an SQLite file "
        "in the run folder unless --storage names a shared database; run the same command "
        "again with --resume RUN_FOLDER (or the same --storage and --study-name) to continue "
        "a killed search.")
    add_config_args(p)
    p.add_argument("--n-trials", type=int, default=40,
                   help="total trials in the study (with several workers it may be exceeded by "
                   "up to (workers - 1) x batch, since each checks the count before asking)")
    p.add_argument("--batch", type=int, default=4, help="trials trained together per job")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--storage", help="SQLAlchemy URL of a shared study database, e.g. "
                   "postgresql://user@host/db or sqlite:///path.db")
    p.add_argument("--study-name", default="hil", help="study name inside the storage")
    p.add_argument("--resume", metavar="RUN_FOLDER", help="continue the study of a run folder")
    p.add_argument("--objective", choices=("val", "test"), default="val",
                   help="score on a validation part of the training half (default) or on test "
                   "as the paper did")
    p.add_argument("--space", action="append", metavar="KEY=LOW:HIGH[:log]",
                   help="change or add a search dimension, e.g. model.S=0.2:1.5:log")
    p.add_argument("--seeds-per-trial", type=int, default=1, metavar="N",
                   help="train every trial with the config's first N seeds and score it on the "
                   "median over them (a diverged seed counts as 0); fixed per study")
    p.add_argument("--prune-warmup", type=int, default=5, metavar="EPOCHS",
                   help="epochs a trial runs before the median pruner may stop it (default 5; "
                   "raise it for slow starters such as the CTRNN)")
    p.add_argument("--sampler-seed", type=int, default=0)
    p.set_defaults(func=run)


def _worker_entry(kwargs: dict[str, Any]) -> None:
    from hil.tune import worker

    worker(**kwargs)


def run(args: argparse.Namespace) -> int:
    from hil import tune

    cfg = resolve_config(args, default_preset="digits")
    if args.objective == "val" and cfg.task.val_fraction == 0:
        cfg.task.val_fraction = 0.2
    if args.n_trials < 1 or args.batch < 1 or args.workers < 1:
        raise ConfigError("--n-trials/--batch/--workers", "must be >= 1", "command line")
    if args.prune_warmup < 0:
        raise ConfigError("--prune-warmup", f"must be >= 0, got {args.prune_warmup}",
                          "command line")
    space = tune.parse_space(args.space)
    if args.resume:
        folder = RunFolder(Path(args.resume))
        if not folder.file("study.db").exists() and not args.storage:
            raise ConfigError("--resume", f"no study.db in {args.resume}", "command line")
    else:
        folder = RunFolder.create("tune", args.runs_dir, args.name or cfg.task.name)
        folder.write_config(cfg.to_dict())
        folder.write_json("search_space.json", {k: repr(v) for k, v in space.items()})
    storage = args.storage or f"sqlite:///{(folder.path / 'study.db').resolve()}"
    print(f"run folder: {folder}\nstudy: {args.study_name} in {storage}", file=sys.stderr)
    study = tune.open_study(storage, args.study_name, args.sampler_seed,
                            prune_warmup=args.prune_warmup)
    tune.check_seeds_per_trial(study, cfg, args.seeds_per_trial)
    n_requeued = tune.recover_stale(study)
    if n_requeued:
        print(f"resumed: {n_requeued} trial(s) of a killed worker queued again", file=sys.stderr)
    kwargs = dict(base=cfg, storage=storage, study_name=args.study_name, n_trials=args.n_trials,
                  batch=args.batch, objective=args.objective, space=space,
                  progress=not args.no_progress, seeds_per_trial=args.seeds_per_trial,
                  prune_warmup=args.prune_warmup)
    if args.workers == 1:
        tune.worker(seed=args.sampler_seed, threads=args.threads, **kwargs)
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker_entry,
                             args=({**kwargs, "seed": args.sampler_seed + i, "threads": 1,
                                    "progress": False},))
                 for i in range(args.workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            print(f"{len(bad)} worker(s) exited with errors: {bad}", file=sys.stderr)
            return 1
    report = tune.write_report(study, cfg, folder.path)
    folder.write_json("tune_summary.json", report)
    print(json.dumps(report, indent=2, default=str))
    if "best_trial" in report:
        print(f"best config: {folder.file('best.yaml')}  (hil train --config that file)")
    print(f"run folder: {folder}")
    return 0
