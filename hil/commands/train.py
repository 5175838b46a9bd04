"""``hil train``: off-chip training of the network on a task, several seeds at once."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from hil.config import TASKS, RunConfig, load_config, preset_names
from hil.runs import RunFolder
from sims.neurons import NEURON_TYPES


def add_config_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that build a network from a config."""
    p.add_argument("--config", help="YAML config file (sections model, task, train, seeds)")
    p.add_argument("--preset", help=f"named preset; one of: {', '.join(preset_names())}")
    p.add_argument("--task", help=" | ".join(TASKS))
    p.add_argument("--model", help="neuron type: " + " | ".join(NEURON_TYPES))
    p.add_argument("--seeds", help="seeds, e.g. 0-9 or 0,3,5")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any value, e.g. --set model.S=0.5 (repeatable)")
    p.add_argument("--runs-dir", default=None, help="parent folder of run folders (default: runs)")
    p.add_argument("--name", help="suffix for the run folder's name")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_config(args: argparse.Namespace, default_preset: str | None = None) -> RunConfig:
    overrides = list(args.overrides)
    if args.task:
        overrides.append(f"task.name={args.task}")
    if args.model:
        overrides.append(f"model.neuron={args.model}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    preset = args.preset or (None if args.config else default_preset)
    # --seeds is applied before validation: e.g. 0,0 (a seed counted twice) is refused
    return load_config(args.config, preset=preset, overrides=overrides, seeds=args.seeds)


def set_threads(threads: int | None) -> None:
    """``--threads N``: CPU threads for torch (N >= 1)."""
    from hil.errors import ConfigError

    if threads is None:
        return
    if threads < 1:
        raise ConfigError("--threads", f"must be an integer >= 1, got {threads}", "command line")
    torch.set_num_threads(threads)


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a network on a task (off-chip, several seeds at once)",
                       description="Train the dynamical network on a task. Writes a run folder "
                       "with the resolved config, per-epoch metrics, per-seed results, a summary "
                       "and plots. With --backend, the trained network is also uploaded to one chip "
                       "per seed and evaluated there; with --in-the-loop as well, it is trained "
                       "with the chip in the loop (forward on the chip, backward on the model).")
    add_config_args(p)
    add_backend_args(p)
    p.add_argument("--in-the-loop", action="store_true",
                   help="chip-in-the-loop training: forward pass on --backend, backward on the twin")
    p.add_argument("--twin", choices=("nominal", "calibrated"), default="calibrated",
                   help="the model used in the backward pass: nominal values, or calibrated on "
                   "each chip first (default)")
    p.add_argument("--resume", metavar="RUN_FOLDER",
                   help="continue an interrupted training run (off-chip or chip-in-the-loop) from its "
                   "last finished epoch (checkpoint.pt), to the same final weights as an uninterrupted "
                   "run (on the simulated chip too); takes the run's own config and chip settings "
                   "(settings given beside it must match)")
    p.add_argument("--estimator", default=None, metavar="SPEC",
                   help="chip-in-the-loop gradient estimator: physics (default: forward on the chip, "
                   "backward through the twin), twin:every=K (twin-only steps, a chip step every K "
                   "batches re-identifying the twin), spsa:c=C,n=N (model-free, N perturbation pairs "
                   "of size C per step); see hil.chip.estimators")
    p.add_argument("--device-budget", type=float, default=None, metavar="SECONDS",
                   help="chip-in-the-loop: stop each chip after this much training device time "
                   "(calibration, uploads and runs) and keep its best weights so far")
    p.add_argument("--curve-every", type=int, default=0, metavar="N",
                   help="chip-in-the-loop: measure the test split every N updates too, for the "
                   "accuracy-vs-device-time curve (device_time.png; not counted in the budget)")
    p.add_argument("--init", metavar="RUN_FOLDER",
                   help="start from the weights of a trained run with the same seeds (e.g. off-chip)")
    p.add_argument("--monitor-every", type=int, default=0, metavar="N",
                   help="every N steps compare twin and chip on a probe set; re-identify the twin "
                   "on drift (0: off)")
    p.add_argument("--monitor-ratio", type=float, default=1.5,
                   help="re-identify when the residual exceeds this times its value after calibration")
    p.set_defaults(func=run)


def add_backend_args(p: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--device`` (shared by train, upload and study)."""
    from hil.chip.backends import BACKENDS, LAB_PREFIX

    def backend_name(value: str) -> str:
        if value in BACKENDS or (value.startswith(LAB_PREFIX) and len(value) > len(LAB_PREFIX)):
            return value
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from "
                                         f"{', '.join(sorted(BACKENDS))} or {LAB_PREFIX}<lab config>)")

    metavar = "{" + ",".join(sorted(BACKENDS)) + f",{LAB_PREFIX}PATH}}"
    p.add_argument("--backend", type=backend_name, metavar=metavar,
                   help="chip to use: sim (simulated oscillator array), model (the ideal model) or "
                   f"{LAB_PREFIX}<lab config> (the chip controller of a lab configuration, driver "
                   f"hil_oscillator_chip, or of its virtual world; e.g. {LAB_PREFIX}lab_configs/virtual.yaml"
                   ")")
    p.add_argument("--device", dest="device", action="append", default=[], metavar="KEY=VALUE",
                   help="simulated-chip setting, e.g. --device cv_gamma=0.3 (repeatable; see "
                   "sims.oscillator_device.DeviceConfig)")


def _gives_settings(args: argparse.Namespace) -> bool:
    """Whether the command line sets anything of the config (beside ``--resume``)."""
    return bool(args.config or args.preset or args.task or args.model or args.seeds
                or args.epochs is not None or args.overrides)


def run(args: argparse.Namespace) -> int:
    from hil.errors import ConfigError
    from hil.jobs import check_resume, train_run

    set_threads(args.threads)
    resume = getattr(args, "resume", None)
    if not resume:
        cfg, ckpt = resolve_config(args, default_preset="digits"), None
    else:  # the run's own config; refused (one line, exit 2) before the folder is touched
        given = resolve_config(args, default_preset="digits") if _gives_settings(args) else None
        cfg, ckpt = check_resume(resume, given)
        if ckpt.get("mode") == "chip-in-the-loop":
            return _resume_in_the_loop(args, cfg, ckpt)
        if getattr(args, "in_the_loop", False):
            raise ConfigError("--resume", f"{resume} is an off-chip training run (not chip-in-the-loop); "
                              "resume it without --in-the-loop", "command line")
    loop_only = [opt for opt, v in (("--estimator", getattr(args, "estimator", None)),
                                    ("--device-budget", getattr(args, "device_budget", None)),
                                    ("--curve-every", getattr(args, "curve_every", 0))) if v]
    if loop_only and not getattr(args, "in_the_loop", False):
        raise ConfigError(loop_only[0], "is a chip-in-the-loop setting: add --backend NAME --in-the-loop",
                          "command line")
    backend = getattr(args, "backend", None)
    if getattr(args, "in_the_loop", False) and not backend:
        raise ConfigError("--in-the-loop", "needs --backend NAME (the chip to train with)", "command line")
    if getattr(args, "init", None) and not getattr(args, "in_the_loop", False):
        raise ConfigError("--init", "only chip-in-the-loop training starts from a trained run: add "
                          "--backend NAME --in-the-loop (off-chip training always starts from a fresh "
                          "initialisation)", "command line")
    if getattr(args, "device", None) and not backend:
        raise ConfigError("--device", "device settings need --backend", "command line")
    if getattr(args, "in_the_loop", False):
        return _run_in_the_loop(args, cfg)
    if backend:  # the upload after training: its settings are checked before training starts
        from hil.chip.backends import check_backend
        from hil.config import TASKS

        n_in = TASKS[cfg.task.name].shape(cfg.task, cfg.train)[0]
        check_backend(backend, cfg.model, n_in, args.device)
    if ckpt is not None:
        from pathlib import Path

        folder = RunFolder(Path(resume))
        folder.set_status("running", resumed_from_epoch=int(ckpt["trainer"]["epoch"]))
        print(f"run folder: {folder} (resumed after epoch {ckpt['trainer']['epoch']} of "
              f"{cfg.train.epochs})", file=sys.stderr)
    else:
        folder = RunFolder.create("train", args.runs_dir, args.name or cfg.task.name)
        print(f"run folder: {folder}", file=sys.stderr)
        from hil.network import design_rules

        for w in design_rules.check(cfg.model)["warnings"]:
            print(f"warning (before training): {w}", file=sys.stderr)
    resumed = {"resume": ckpt} if ckpt is not None else {}
    summary = train_run(cfg, folder, progress=not args.no_progress, **resumed)
    s = summary["test"]
    metric = summary["metric"]
    if s.get("n", 0) and "median" in s:
        print(f"\n{cfg.task.name} / {cfg.model.neuron}: test {metric} over {s['n']} seed(s): "
              f"median {100 * s['median']:.2f} %, mean {100 * s['mean']:.2f} ± {100 * s['std']:.2f} %, "
              f"quartiles {100 * s['q25']:.2f}-{100 * s['q75']:.2f} %")
    else:
        print(f"\n{cfg.task.name} / {cfg.model.neuron}: every seed failed, no test {metric} to summarise "
              "(see metrics.jsonl and the warnings below)")
    conv = summary.get("convergence")
    if conv and conv["test_reference"].get("n", 0):
        r = conv["reference"]
        print(f"under a converged solution of the same ODE ({r['scheme']}, {r['substeps']} sub-steps "
              f"per point): median {100 * conv['test_reference']['median']:.2f} % "
              f"(training integrator {conv['trained']['scheme']}-{conv['trained']['substeps']}: "
              f"median {100 * conv['test_trained']['median']:.2f} %, worst seed's gap "
              f"{conv['worst_gap_points']:+.2f} points)")
    if conv and conv.get("warning"):
        print(f"warning: {conv['warning']}")
    if summary["failed_seeds"]:
        print(f"failed seeds (not in the summary): {summary['failed_seeds']}")
    for w in summary["design_rules"]["warnings"]:
        print(f"warning: {w}")
    if backend and s.get("n", 0):
        _upload_after_training(cfg, folder, backend, args.device)
    print(f"run folder: {folder}")
    if not s.get("n", 0):
        return _every_seed_failed(args, summary["failed_seeds"])
    return 0


def _every_seed_failed(args: argparse.Namespace, failed: Any) -> int:
    """Nothing trained: say so on stderr and in the exit code (1); the CLI records the reason in
    the run folder's status."""
    args.failure = f"every seed failed ({failed}); see metrics.jsonl"
    print(f"hil train: error: {args.failure}", file=sys.stderr)
    return 1


def _run_in_the_loop(args: argparse.Namespace, cfg: RunConfig) -> int:
    from pathlib import Path

    from hil.chip.chip_in_loop import check_loop_settings
    from hil.jobs import train_in_the_loop_run
    from hil.training.checkpoints import load_run

    if args.init:  # a missing, corrupt or unsafe checkpoint stops here, before any folder or chip
        p = Path(args.init)
        load_run(p if p.is_dir() else p.parent)
    # a wrong estimator, budget or curve setting stops here, before any folder or chip
    check_loop_settings(args.estimator, args.device_budget, args.curve_every, "command line")
    folder = RunFolder.create("train-in-the-loop", args.runs_dir, args.name or cfg.task.name)
    print(f"run folder: {folder}", file=sys.stderr)
    summary = train_in_the_loop_run(cfg, folder, args.backend, args.device, twin=args.twin, init=args.init,
                                    monitor_every=args.monitor_every, monitor_ratio=args.monitor_ratio,
                                    progress=not args.no_progress, estimator=args.estimator,
                                    device_budget_s=args.device_budget, curve_every=args.curve_every)
    return _loop_done(args, summary, folder)


def _resume_in_the_loop(args: argparse.Namespace, cfg: RunConfig, ckpt: dict[str, Any]) -> int:
    """``hil train --resume RUN`` of a chip-in-the-loop run: its own chip settings, which the
    command line may repeat but not change."""
    from pathlib import Path

    from hil.chip.chip_in_loop import LOOP_SETTINGS
    from hil.errors import ConfigError
    from hil.jobs import train_in_the_loop_run

    stored = ckpt.get("loop")
    if not isinstance(stored, dict) or set(stored) != set(LOOP_SETTINGS):
        raise ConfigError("--resume", f"{args.resume}: the checkpoint lacks the chip-in-the-loop settings",
                          "command line")
    given = {"backend": args.backend, "device": args.device or None, "estimator": args.estimator,
             "device_budget_s": args.device_budget, "curve_every": args.curve_every or None,
             "init": args.init, "monitor_every": args.monitor_every or None}
    differ = [f"{k} (run: {stored[k]!r}, now: {v!r})" for k, v in given.items()
              if v is not None and v != stored[k]]
    if differ:
        raise ConfigError("--resume", f"chip settings differ from the run's: {', '.join(differ)}; "
                          "resume with the run's own settings (--resume alone uses them)", "command line")
    folder = RunFolder(Path(args.resume))
    epoch = int(ckpt["trainer"]["epoch"])
    folder.set_status("running", resumed_from_epoch=epoch)
    print(f"run folder: {folder} (chip-in-the-loop, resumed after epoch {epoch} of {cfg.train.epochs})",
          file=sys.stderr)
    st = stored
    summary = train_in_the_loop_run(cfg, folder, st["backend"], st["device"], twin=st["twin"],
                                    init=st["init"],
                                    monitor_every=st["monitor_every"], monitor_ratio=st["monitor_ratio"],
                                    progress=not args.no_progress, estimator=st["estimator"],
                                    device_budget_s=st["device_budget_s"], curve_every=st["curve_every"],
                                    resume=ckpt)
    return _loop_done(args, summary, folder)


def _loop_done(args: argparse.Namespace, summary: dict[str, Any], folder: RunFolder) -> int:
    from hil.chip.chip_in_loop import print_summary

    s = summary.get("test_on_device", {})
    if not s.get("n", 0):
        rc = _every_seed_failed(args, summary.get("failed_seeds"))
        print(f"run folder: {folder}")
        return rc
    print_summary(summary, folder)
    return 0


def _upload_after_training(cfg: RunConfig, folder: RunFolder, backend: str, device: list[str]) -> None:
    """Upload the off-chip result to one chip per seed, evaluate, write the sim-to-real report."""
    from hil.jobs import upload_run

    sub = RunFolder(folder.path / "upload")
    summary = upload_run(folder.path, backend, sub, device)
    g = summary["gap"]
    print(f"uploaded to {backend}: device {summary['metric']} median "
          f"{100 * summary['device']['median']:.2f} %, gap to the model median {100 * g['median']:.2f} "
          f"points (report in {sub})")
