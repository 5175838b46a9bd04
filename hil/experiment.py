"""Jobs that combine a task, a trainer and a run folder (shared by the CLI and the API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hil import convergence, design_rules, plots
from hil.config import RunConfig
from hil.runs import RunFolder, atomic_path
from hil.tasks import make_task
from hil.train import Trainer, TrainResult, summarize


def checkpoint_data(net, cfg: RunConfig) -> dict[str, Any]:
    """What ``model.pt`` holds: tensors and plain Python data only (dicts, lists, str, int,
    float, bool, None), so that it loads with ``torch.load(weights_only=True)``."""
    return {"config": plain(cfg.to_dict()), "seeds": [int(s) for s in net.seeds],
            "n_in": int(net.n_in), "n_out": int(net.n_out),
            "input_centre": float(net.input_centre),
            "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}


def plain(obj: Any) -> Any:
    """``obj`` as plain Python data: numpy scalars and arrays, tuples and paths converted; any
    other object is refused (it would need pickling to store)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (tensors and plain data only)")


def save_checkpoint(result: TrainResult, cfg: RunConfig, path) -> None:
    """Write ``model.pt`` atomically (a full disk leaves the previous file, never a truncated one)."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint_data(result.net, cfg), tmp)


def train_run(cfg: RunConfig, folder: RunFolder, progress: bool = True) -> dict[str, Any]:
    """Train every seed of ``cfg`` together; write config, metrics, results, summary, plots."""
    torch.manual_seed(cfg.seeds[0])
    folder.write_config(cfg.to_dict())
    task = make_task(cfg.task, cfg.train.output_gain)
    K = len(cfg.seeds)
    trainer = Trainer([cfg.model] * K, [cfg.train] * K, cfg.seeds, task,
                      log=folder.append_metrics, progress=progress,
                      label=f"{cfg.task.name}/{cfg.model.neuron} x{K} seeds", hardware=cfg.hardware)
    result = trainer.fit()
    metric = task.metric_name
    ok = [f for f in result.final if f["status"] != "failed"]
    failed = [f["seed"] for f in result.final if f["status"] == "failed"]
    rules = design_rules.check(cfg.model, result.net.layer_weights(0))
    summary = {
        "task": cfg.task.name, "model": cfg.model.neuron, "metric": metric,
        "test": summarize([f[f"test_{metric}"] for f in ok]),
        "failed_seeds": failed,
        "rolled_back_seeds": [f["seed"] for f in result.final if f["rollbacks"]],
        "train_seconds": result.seconds,
        "design_rules": rules,
    }
    if "val" in task.splits:
        summary["val"] = summarize([f[f"val_{metric}"] for f in ok])
    summary["convergence"] = _convergence(result, task)
    folder.write_json("final.json", result.final)
    folder.write_json("summary.json", summary)
    save_checkpoint(result, cfg, folder.file("model.pt"))
    plots.accuracy_curves(result.history, metric, folder.file("accuracy.png"))
    _trajectory_plot(result, task, cfg, folder)
    return summary


def _convergence(result: TrainResult, task) -> dict[str, Any]:
    """Test metric of the final weights under a converged solution of the same ODE, beside the
    training integrator's (seeds that failed are left out of the summaries)."""
    rep = convergence.reference_check(result.net, task, "test")
    ok = [k for k, f in enumerate(result.final) if f["status"] != "failed"]
    rep["seeds"] = list(result.net.seeds)
    rep["test_reference"] = summarize([rep["reference"]["metric"][k] for k in ok])
    rep["test_trained"] = summarize([rep["trained"]["metric"][k] for k in ok])
    if ok:
        gaps = [rep["gap_points"][k] for k in ok]
        rep["worst_gap_points"] = max(gaps, key=abs)
        rep["median_gap_points"] = float(np.median(gaps))
    return rep


@torch.no_grad()
def _trajectory_plot(result: TrainResult, task, cfg: RunConfig, folder: RunFolder) -> None:
    test = task.splits["test"]
    if task.per_step:
        idx = [0]
    else:
        y = test.y.numpy()
        idx = [int(np.nonzero(y == c)[0][0]) for c in np.unique(y)[:4]]
        idx += [int(np.nonzero(y == y[idx[0]])[0][1])]  # a second input of the first class
    xseq, _ = result.net(test.x[idx])
    labels = test.y[idx].numpy() if not task.per_step else np.array(["series"])
    plots.trajectories(xseq[0].numpy(), labels, cfg.model.n_layers, cfg.model.n_hidden,
                       cfg.model.dt_ns, folder.file("trajectories.png"))
