"""``hil analyse``: connectivity, eigenvalues and PCA of a trained run (seed 004 tools)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hil.runs import atomic_write
from hil.training.checkpoints import load_run

__all__ = ["load_run", "register", "run"]  # load_run lives in hil.runs (run folders)


def register(sub: Any) -> None:
    p = sub.add_parser("analyse", help="connectivity, eigenvalue and PCA plots of a trained run")
    p.add_argument("run_folder", help="a run folder written by hil train (holds model.pt)")
    p.add_argument("--seed", type=int, default=None, help="which seed (default: the first)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hil.network import analysis

    folder = Path(args.run_folder)
    cfg, task, net = load_run(folder)
    k = 0 if args.seed is None else net.seeds.index(args.seed)
    layers = [{n: t.numpy() for n, t in lw.items()} for lw in net.layer_weights(k)]
    analysis.connectivity_plot(layers, folder / f"connectivity_seed{net.seeds[k]}.png")
    test = task.splits["test"]
    n = min(len(test), 200)
    with torch.no_grad():
        xseq, _ = net(test.x[:n])
    traj = xseq[k].numpy()
    colour = test.y[:n].numpy() if test.y.dim() == 1 else None
    report = {"seed": net.seeds[k], "layers": []}
    for li, sl in enumerate(net.layer_slices()):
        res = analysis.pca(traj[..., sl], 3)
        ev = analysis.eigenvalues(layers[li]["W_int"])
        report["layers"].append({"layer": li, "pca_explained": res["explained"].tolist(),
                                 "max_abs_eigenvalue": float(np.abs(ev).max())})
        analysis.pca_plot(traj[..., sl], colour, folder / f"pca_layer{li}_seed{net.seeds[k]}.png",
                          f"layer {li}")
    if task.error_budget_title is not None:
        # where the misses are, on the whole test split (the trajectories above if they cover it)
        with torch.no_grad():
            full = xseq if n == len(test) else net(test.x)[0]
            out = net.readout(full)[k].numpy()
        budget = task.error_budget(out, test.x.numpy(), test.y.numpy())
        if budget is not None:
            report["error_budget"] = budget
            analysis.error_budget_plot(budget, folder / f"error_budget_seed{net.seeds[k]}.png",
                                       f"{task.error_budget_title}, seed {net.seeds[k]}")
    atomic_write(folder / f"analysis_seed{net.seeds[k]}.json", json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"plots written to {folder}")
    return 0
