"""``hil tune``: Optuna search over the paper's hyperparameters."""

from __future__ import annotations

import argparse
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
        "a killed search; a study refuses workers with another base config, search space or "
        "objective.")
    add_config_args(p)
    p.add_argument("--n-trials", type=int, default=40,
                   help="finished trials (complete, pruned or failed) in the study; a killed "
                   "trial queued again counts once (with several workers it may be exceeded by "
                   "up to (workers - 1) x batch, since each checks the count before asking)")
    p.add_argument("--batch", type=int, default=4, help="trials trained together per job")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--storage", metavar="URL", help="shared study storage: a SQLAlchemy URL, e.g. "
                   "postgresql://user@host/db (password from PGPASSWORD or ~/.pgpass; needs the "
                   "postgres extra) or sqlite:///path.db, or journal:PATH (an Optuna journal file on "
                   "a filesystem the machines share, no database server needed)")
    p.add_argument("--study-name", default="hil", help="study name inside the storage")
    p.add_argument("--resume", metavar="RUN_FOLDER", help="continue the study of a run folder")
    p.add_argument("--report", metavar="STUDY", help="train nothing: write the report (trials.csv, "
                   "best.yaml, plots) of study STUDY in --storage (or of --resume's study.db) to "
                   "a new run folder, e.g. after the last task of a scheduler array")
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
    p.add_argument("--sampler-seed", type=int, default=0,
                   help="mixed with each worker's identity (host, pid, the scheduler's job and "
                   "task ids), so no two workers draw the same trials; recorded per trial")
    p.add_argument("--heartbeat", type=int, default=10,  # hil.training.tune.HEARTBEAT_S
                   metavar="SECONDS", help="seconds between the heartbeats a worker records for "
                   "its running trials in a database storage (default %(default)s)")
    p.add_argument("--grace-period", type=int, default=60,  # hil.training.tune.GRACE_S
                   metavar="SECONDS", help="a trial without a heartbeat for this long (its worker "
                   "was killed, on any machine) is failed and queued again, once (default "
                   "%(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hil.jobs import run_search
    from hil.training import tune

    if args.report:
        return _report(args)
    from hil.commands.train import set_threads
    from hil.config import check_memory
    from hil.network.engine import record_engine

    set_threads(args.threads)
    cfg = resolve_config(args, default_preset="digits")
    if args.objective == "val" and cfg.task.val_fraction == 0:
        cfg.task.val_fraction = 0.2
    for opt, v in (("--n-trials", args.n_trials), ("--batch", args.batch), ("--workers", args.workers),
                   ("--seeds-per-trial", args.seeds_per_trial)):
        if v < 1:
            raise ConfigError(opt, f"must be an integer >= 1, got {v}", "command line")
    check_memory(cfg, n_parallel=args.batch * args.seeds_per_trial, source="--batch")
    space = tune.parse_space(args.space)
    if args.storage:
        tune.storage_url(args.storage)  # a bad URL or a missing driver stops before any folder
    if args.resume:
        folder = RunFolder(Path(args.resume))
        if not args.storage:
            tune.check_study_file(folder.file("study.db"))
    else:
        folder = RunFolder.create("tune", args.runs_dir, args.name or cfg.task.name)
        folder.write_config(cfg.to_dict())
        record_engine(folder, cfg.train.engine)
        folder.write_json("search_space.json", {k: repr(v) for k, v in space.items()})
    print(f"run folder: {folder}", file=sys.stderr)
    report = run_search(
        cfg, folder.path, storage=args.storage, study_name=args.study_name,
        n_trials=args.n_trials, batch=args.batch, workers=args.workers, objective=args.objective,
        space=space, seeds_per_trial=args.seeds_per_trial, prune_warmup=args.prune_warmup,
        sampler_seed=args.sampler_seed, threads=args.threads, progress=not args.no_progress,
        heartbeat=args.heartbeat, grace_period=args.grace_period, resume=bool(args.resume))
    folder.write_json("tune_summary.json", report)
    _print_report(report, folder)
    return 0


def _report(args: argparse.Namespace) -> int:
    """``--report STUDY``: the report of a (shared) study, nothing trained."""
    from hil.training import tune

    if args.resume:
        folder = RunFolder(Path(args.resume))
        storage = args.storage or f"sqlite:///{folder.file('study.db').resolve()}"
    elif args.storage:
        folder = RunFolder.create("tune-report", args.runs_dir, args.name or args.report)
        storage = args.storage
    else:
        raise ConfigError("--report", "needs --storage URL (or --resume RUN_FOLDER) holding the study",
                          "command line")
    print(f"run folder: {folder}\nstudy: {args.report} in {tune.redact(storage)}", file=sys.stderr)
    given = args.config or args.preset or args.overrides or args.task or args.model
    base = resolve_config(args, default_preset="digits") if given else None
    report = tune.report_study(storage, args.report, folder.path, base=base)
    folder.write_json("tune_summary.json", report)
    _print_report(report, folder)
    return 0


def _print_report(report: dict[str, Any], folder: RunFolder) -> None:
    c = report["trials"]
    print(f"trials: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed")
    if "best_trial" in report:
        print(f"best trial {report['best_trial']}: objective {report['best_value']:.4f}")
        for k, v in report["best_params"].items():
            print(f"  {k} = {v:.6g}" if isinstance(v, float) else f"  {k} = {v}")
        print(f"best config: {folder.file('best.yaml')}  (hil train --config that file)")
    print(f"report: {folder.file('tune_summary.json')}")
    print(f"run folder: {folder}")
