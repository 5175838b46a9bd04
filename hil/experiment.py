"""Jobs that combine a task, a trainer and a run folder (shared by the CLI and the API)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hil import convergence, design_rules, plots
from hil.config import RunConfig, flatten, load_config
from hil.errors import ConfigError, HilError
from hil.runs import RunFolder, atomic_path, atomic_write, load_checkpoint, pid_alive, read_status
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


#: the resume point of ``hil train``, rewritten (atomically) at the end of every epoch and
#: removed once the run's results (``model.pt``, ``summary.json``, ...) are written
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "hil-train-checkpoint"


def train_run(cfg: RunConfig, folder: RunFolder, progress: bool = True,
              resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train every seed of ``cfg`` together; write config, metrics, results, summary, plots.

    Every epoch ends with ``checkpoint.pt`` (see :meth:`hil.train.Trainer.resume_state`);
    ``resume``, a checkpoint from :func:`check_resume`, continues that run in its own folder to
    the same final weights as an uninterrupted run."""
    torch.manual_seed(cfg.seeds[0])
    if resume is None:
        folder.write_config(cfg.to_dict())
    task = make_task(cfg.task, cfg.train.output_gain)
    K = len(cfg.seeds)
    config = plain(cfg.to_dict())

    def checkpoint(state: dict[str, Any]) -> None:
        folder.save_torch(CHECKPOINT_FILE, {"format": CHECKPOINT_FORMAT, "config": config,
                                            "trainer": state})

    trainer = Trainer([cfg.model] * K, [cfg.train] * K, cfg.seeds, task,
                      log=folder.append_metrics, progress=progress,
                      label=f"{cfg.task.name}/{cfg.model.neuron} x{K} seeds", hardware=cfg.hardware,
                      checkpoint=checkpoint)
    if resume is not None:
        resume_trainer(trainer, resume, folder)
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
    folder.file(CHECKPOINT_FILE).unlink(missing_ok=True)  # model.pt and the results are written
    return summary


def resume_trainer(trainer: Trainer, resume: dict[str, Any], folder: RunFolder) -> None:
    """Load a checkpoint's trainer state (one clear error when it does not fit the run) and drop
    the metrics of the epochs it will measure again."""
    try:
        trainer.load_resume_state(resume["trainer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise HilError(f"--resume {folder}: {CHECKPOINT_FILE} does not fit this run's settings "
                       f"({str(exc).splitlines()[0][:160]})") from None
    _trim_metrics(folder, trainer.start_epoch)


def _trim_metrics(folder: RunFolder, start_epoch: int) -> None:
    """Drop the records of epochs from ``start_epoch`` on from ``metrics.jsonl`` (written after the
    last checkpoint, before the run was killed): the resumed run writes them again."""
    path = folder.file("metrics.jsonl")
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("epoch"), int)
                and rec["epoch"] >= start_epoch):
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        atomic_write(path, "".join(keep))




def check_resume(path: str | Path, given: RunConfig | None = None) -> tuple[RunConfig, dict[str, Any]]:
    """``hil train --resume PATH``: the run's config and its checkpoint, or one clear
    :class:`HilError` (no such folder, no checkpoint, a finished or still running run, settings
    ``given`` on the command line that differ from the run's ``config.yaml``). Reads only: the
    folder is left as it was when the resume is refused."""
    p = Path(path)
    if not p.is_dir():
        raise HilError(f"--resume {p}: no such run folder")
    status = read_status(p)
    if status.get("status") == "complete":
        raise HilError(f"--resume {p}: the run is complete (model.pt and summary.json written); "
                       "nothing to resume")
    pid = status.get("pid")
    if (status.get("status") == "running" and isinstance(pid, int) and pid != os.getpid()
            and pid_alive(pid)):
        raise HilError(f"--resume {p}: the run is still running (pid {status['pid']}); stop it first")
    ckpt_path = p / CHECKPOINT_FILE
    if not ckpt_path.is_file():
        why = ("its training had finished (model.pt written)" if (p / "model.pt").is_file() else
               "no epoch had finished, or it is not a `hil train` run folder (off-chip training)")
        raise HilError(f"--resume {p}: no {CHECKPOINT_FILE} to continue from: {why}")
    if not (p / "config.yaml").is_file():
        raise HilError(f"--resume {p}: no config.yaml")
    stored = load_config(p / "config.yaml")
    if given is not None:
        a, b = flatten(plain(stored.to_dict())), flatten(plain(given.to_dict()))
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diff:
            shown = ", ".join(f"{k} (run: {a.get(k)!r}, now: {b.get(k)!r})" for k in diff)
            raise ConfigError("--resume", f"settings differ from {p / 'config.yaml'}: {shown}; resume "
                              "with the run's own settings (--resume alone uses them)", "command line")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt.get("format") != CHECKPOINT_FORMAT or not isinstance(ckpt.get("trainer"), dict):
        raise HilError(f"--resume {p}: {ckpt_path.name} is not a `hil train` checkpoint")
    return stored, ckpt


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
