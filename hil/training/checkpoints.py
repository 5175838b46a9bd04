"""Checkpoints of training runs: ``model.pt`` and the per-epoch resume point
``checkpoint.pt`` (tensors and plain data, loadable with ``weights_only=True``), and
the checks before a run is resumed. Shared by off-chip and chip-in-the-loop training."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hil.config import RunConfig, flatten, load_config, update
from hil.errors import ConfigError, HilError
from hil.network.model import DynamicalNetwork
from hil.network.tasks import make_task
from hil.runs import RunFolder, atomic_path, atomic_write, load_checkpoint, pid_alive, read_status
from hil.training.train import Trainer, TrainResult


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


def load_run(folder: Path) -> tuple[Any, Any, Any]:
    """Rebuild a trained run's ``(config, task, network)`` from its folder (``model.pt`` loaded
    with ``weights_only=True``: a crafted file cannot run code)."""

    ckpt_path = folder / "model.pt"
    if not ckpt_path.is_file():
        raise HilError(f"{folder}: no model.pt; is this a folder written by hil train?")
    ckpt = load_checkpoint(ckpt_path)  # weights_only=True: a crafted file cannot run code
    missing = [k for k in ("config", "seeds", "n_in", "n_out", "input_centre", "state_dict")
               if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict):
        raise HilError(f"{ckpt_path}: not a checkpoint of hil train "
                       f"(missing {', '.join(missing) or 'config'})")
    cfg = update(RunConfig(), {k: v for k, v in ckpt["config"].items() if k != "preset"},
                 str(ckpt_path))
    task = make_task(cfg.task, cfg.train.output_gain)
    try:
        net = DynamicalNetwork([cfg.model] * len(ckpt["seeds"]), ckpt["n_in"], ckpt["n_out"],
                               ckpt["seeds"], ckpt["input_centre"])
        net.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HilError(f"{ckpt_path}: the weights do not fit the network of its config "
                       f"({first[:200]})") from None
    return cfg, task, net
