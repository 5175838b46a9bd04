"""``hil conv train`` / ``hil conv deploy``: the hybrid convolutional network (thesis ch. 4).

``train``: noise-aware software training of the hybrid convolutional network.

Trains the network of Fig. 4.1 with eq. 4.3 noise on the MAC output and writes a run folder:
``config.yaml``, per-epoch ``metrics.jsonl``, ``model.pt``, ``kernels.json`` (the weight file of
``hil chain design --weights``), ``final.json`` (clean and noisy test accuracy on the whole test
set and on the first 100 test images, as thesis 4.9), ``training.png`` and ``kernels.png``.

``deploy``: the trained kernels to chains on a bench and inference on the first test images
(``hil.conv.hybrid``): reference map, source calibration, Algorithm 1 designs, (virtual)
fabrication, placement by Algorithm 2, then the measurement plan and/or Algorithm 3 as
written, with the report of thesis 4.9 and the lab time per image of each plan.

``report``: ``report.md`` of a deploy run folder written again from its files
(``hil.conv.report.deploy_report``: accuracies in percent with 95 % Wilson intervals, the
settings, the total lab time and its breakdown, clipped inputs, chain weight errors).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hil.errors import ConfigError
from hil.runs import RunFolder

#: default epochs per dataset: the thesis's 10 on FashionMNIST's 60000 images (~9400 Adam steps);
#: on the 898 training digits (15 steps an epoch) 100 epochs reach the plateau (clean ~95 %,
#: noisy ~91 % on the test half; 10 epochs: ~89 % / ~84 %, 200 epochs: no better)
DEFAULT_EPOCHS = {"digits": 100, "fashion-mnist": 10}


def _check(args: argparse.Namespace) -> None:
    """Raise ConfigError on out-of-range arguments (before anything is written)."""
    if not np.isfinite(args.noise) or args.noise < 0:
        raise ConfigError("--noise", f"must be >= 0 (eq. 4.3 noise level n_l), got {args.noise}",
                          "command line")
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS.get(args.dataset, 10)
    if args.epochs < 1:
        raise ConfigError("--epochs", f"must be >= 1, got {args.epochs}", "command line")
    if not np.isfinite(args.lr) or args.lr <= 0:
        raise ConfigError("--lr", f"must be > 0, got {args.lr}", "command line")
    if args.batch_size < 1:
        raise ConfigError("--batch-size", f"must be >= 1, got {args.batch_size}", "command line")
    if not np.isfinite(args.eval_noise) or args.eval_noise < 0:
        raise ConfigError("--eval-noise", f"must be >= 0, got {args.eval_noise}", "command line")
    if args.weight_decay < 0:
        raise ConfigError("--weight-decay", f"must be >= 0, got {args.weight_decay}", "command line")
    for key, value in (("--noisy-repeats", args.noisy_repeats),
                       ("--noisy-repeats-all", args.noisy_repeats_all)):
        if value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}", "command line")
    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads", f"must be >= 1, got {args.threads}", "command line")
    if args.dataset == "fashion-mnist" and not args.data_dir:
        raise ConfigError("--data-dir", "fashion-mnist needs --data-dir DIR holding the user-supplied IDX "
                          "files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                          "t10k-labels-idx1-ubyte, optionally .gz); nothing is downloaded", "command line")


def cmd_train(args: argparse.Namespace) -> int:
    from hil.conv.images import load_images
    from hil.conv.jobs import FIRST_N  # the first 100 test images of thesis 4.9
    from hil.jobs import ConvTrainSettings, train_conv_job

    _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    split = load_images(args.dataset, args.data_dir)
    settings = ConvTrainSettings(noise=args.noise, epochs=args.epochs, lr=args.lr,
                                 batch_size=args.batch_size, weight_decay=args.weight_decay,
                                 seed=args.seed, noisy_repeats=args.noisy_repeats,
                                 noisy_repeats_all=args.noisy_repeats_all, eval_noise=args.eval_noise,
                                 data_dir=args.data_dir)
    run = RunFolder.create("conv-train", name=args.dataset)
    print(f"run folder: {run}")
    config = {k: v for k, v in vars(args).items() if k not in ("func", "command", "what")}

    def on_epoch(rec: dict[str, Any]) -> None:
        print(f"epoch {rec['epoch']:3d}/{args.epochs}: loss {rec['train_loss']:.4f}, train "
              f"{100 * rec['train_acc']:.2f} %, test clean {100 * rec['test_acc']:.2f} %, noisy "
              f"{100 * rec['test_acc_noisy']:.2f} % ({rec['seconds']:.1f} s)", flush=True)

    res = train_conv_job(split, settings, run, config=config, on_epoch=on_epoch)
    a, f = res.results["all"], res.results[f"first{FIRST_N}"]
    print(f"test ({a['n']} images): clean {100 * a['clean_acc']:.2f} %, noisy (n_l {res.eval_noise:g}, "
          f"{a['noisy_passes_per_image']} passes) {100 * a['noisy_acc']:.2f} %")
    print(f"first {f['n']} test images: clean {100 * f['clean_acc']:.2f} %, noisy "
          f"({f['noisy_passes_per_image']} passes) {100 * f['noisy_acc']:.2f} %, noisy majority vote "
          f"{100 * f['noisy_majority_acc']:.2f} %")
    print(f"kernels for hil chain design --weights: {res.kernels_file}")
    return 0


def _chain_map(text: str | None, what: str) -> dict[str, int] | None:
    """``chain0=1,chain1=2`` -> {"chain0": 1, "chain1": 2} (whole numbers only)."""
    if not text:
        return None
    from hil.commands.calibrate import _pairs

    pairs = _pairs(text, what)
    if not all(float(v).is_integer() for v in pairs.values()):
        raise ConfigError(what, f"expected whole numbers, got {text!r}")
    return {k: int(v) for k, v in pairs.items()}


def cmd_deploy(args: argparse.Namespace) -> int:
    from hil.conv.hybrid import DeployConfig, model_path_of
    from hil.jobs import deploy

    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    cfg = DeployConfig(lab=args.lab, n_images=args.images, plans=plans,
                       algorithm3_images=args.algorithm3_images, every=args.every, n_avg=args.n_avg,
                       nplc=args.nplc, eps=args.eps, noisy_repeats=args.noisy_repeats, seed=args.seed,
                       map_csv=args.map, source_cal=args.source_cal, group_um=args.group_um,
                       ports=_chain_map(args.ports, "--ports"),
                       voltmeter_channels=_chain_map(args.voltmeter_channels, "--voltmeter-channels"))
    cfg.check()
    if not Path(args.lab).exists():
        raise ConfigError("lab", f"{args.lab} does not exist")
    model_path_of(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = RunFolder.create("conv-deploy")
    print(f"run folder: {run}")
    results = deploy(args.model, cfg, run)
    sw = results["software"]
    print(f"software {100 * sw['accuracy']:.1f} %, noisy software {100 * sw['noisy_accuracy']:.2f} % "
          f"({sw['noisy_repeats']} passes per image)")
    for name, p in results["plans"].items():
        print(f"{name}: hardware {100 * p['accuracy']:.1f} % on {p['images']} images, "
              f"{p['lab_s_per_image']:.0f} s of lab time per image")
    if "speedup" in results:
        print(f"measurement plan vs Algorithm 3 as written: {results['speedup']['lab_time']:.1f}x less "
              "lab time")
    from hil.conv.report import deploy_report

    deploy_report(run.path, _test_images(args.model, int(results["n_images"])))
    print(f"report: {run.file('report.md')}")
    return 0


def _test_images(model: str, n: int) -> np.ndarray:
    """The first ``n`` test images (N, H, W) of the dataset the model was trained on."""
    from hil.conv.hybrid import dataset_of, model_path_of
    from hil.conv.images import load_images
    from hil.conv.network import load_model

    path = model_path_of(model)
    _, meta = load_model(path)
    dataset, data_dir = dataset_of(path, meta)
    return load_images(dataset, data_dir).x_test[:n, 0].numpy()


def cmd_report(args: argparse.Namespace) -> int:
    """``hil conv report RUN_FOLDER``: write a deploy run's report.md again from its files."""
    import yaml

    from hil.conv.report import deploy_report
    from hil.errors import HilError

    run = Path(args.run_folder)
    if not (run / "results.json").exists():
        raise HilError(f"{run}: no results.json (not a finished hil conv deploy run folder?)")
    images = None
    model = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("model") \
        if (run / "config.yaml").exists() else None
    if model and Path(model).exists():
        n = int(json.loads((run / "results.json").read_text())["n_images"])
        images = _test_images(model, n)
    else:
        print("model not found: the hardware's effective weights are left out")
    print(f"report: {deploy_report(run, images)}")
    return 0


def register(sub: Any) -> None:
    conv = sub.add_parser("conv", help="hybrid convolutional network (thesis ch. 4): noise-aware training")
    csub = conv.add_subparsers(dest="what", metavar="WHAT", required=True)
    tr = csub.add_parser("train", help="train the network of Fig. 4.1 with eq. 4.3 noise; kernels.json",
                         description="Noise-aware software training of the hybrid convolutional network "
                         "(three 2x2 hardware kernels, software bias/max-pool/ReLU/linear). Writes a run "
                         "folder with the model, the kernels as a hil chain design --weights file, final "
                         "accuracies and plots.")
    tr.add_argument("--dataset", default="digits",
                    help="digits (8x8, offline) | fashion-mnist (needs --data-dir)")
    tr.add_argument("--data-dir",
                    help="folder with the user-supplied FashionMNIST IDX files (optionally .gz)")
    tr.add_argument("--noise", type=float, default=0.5, help="noise level n_l of eq. 4.3 (default 0.5)")
    tr.add_argument("--epochs", type=int, default=None,
                    help="training epochs (default: 10 for fashion-mnist as the thesis, 100 for digits, "
                    "whose 898 training images give 15 steps an epoch; 10 epochs under-train it)")
    tr.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (thesis: 0.01)")
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    tr.add_argument("--seed", type=int, default=0, help="initial weights, shuffling and noise")
    tr.add_argument("--noisy-repeats", type=int, default=1000,
                    help="noisy passes per image on the first 100 test images (thesis 4.9: 1000)")
    tr.add_argument("--noisy-repeats-all", type=int, default=10,
                    help="noisy passes per image on the whole test set (default 10)")
    tr.add_argument("--eval-noise", type=float, default=0.5,
                    help="noise level of the noisy evaluation when training with --noise 0")
    tr.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    tr.set_defaults(func=cmd_train)

    de = csub.add_parser("deploy", help="kernels -> chains on a bench, hardware inference (thesis 4.8)",
                         description="Run the thesis's procedure on a lab: reference map (virtual lab: "
                         "measured on its reference sample), source calibration, chain designs, virtual "
                         "fabrication, placement, inference on the first test images with each plan.")
    de.add_argument("--model", required=True, help="run folder of hil conv train (or its model.pt)")
    de.add_argument("--lab", default="lab_configs/virtual.yaml", help="lab config")
    de.add_argument("--images", type=int, default=100, help="first N test images (thesis: 100)")
    de.add_argument("--plans", default="planned,algorithm3",
                    help="comma-separated: planned (the measurement plan), algorithm3 (as written)")
    de.add_argument("--algorithm3-images", type=int, default=None,
                    help="run Algorithm 3 on fewer images (default: all)")
    de.add_argument("--every", type=int, default=10, help="re-optimise positions every N images (thesis: 10)")
    de.add_argument("--n-avg", type=int, default=1, help="RF on/off pairs per reading (thesis: 1)")
    de.add_argument("--nplc", type=float, default=5.0, help="voltmeter integration (power-line cycles)")
    de.add_argument("--eps", type=float, default=2e-3,
                    help="source settled when its power is within eps of full scale")
    de.add_argument("--noisy-repeats", type=int, default=1000, help="noisy software passes per image")
    de.add_argument("--map", help="reference_map.csv (default: measured on the virtual lab)")
    de.add_argument("--source-cal", help="source_calibration.json (default: measured)")
    de.add_argument("--ports", help="output-switch port of each chain, e.g. chain0=1,chain1=1,chain2=3 "
                    "(two chains on one port: a splitter; default chain k on port k+1)")
    de.add_argument("--voltmeter-channels", help="voltmeter channel of each chain, e.g. chain1=2 (default 1)")
    de.add_argument("--group-um", type=float, default=3.0,
                    help="chains whose optimal z agree within this share one stage position")
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    de.set_defaults(func=cmd_deploy)

    rp = csub.add_parser("report", help="write a deploy run's report.md again from its files")
    rp.add_argument("run_folder", help="run folder of hil conv deploy")
    rp.set_defaults(func=cmd_report)
