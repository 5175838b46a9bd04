"""The jobs: what the ``hil`` commands and the Python API (:mod:`hil.api`) run, in one place.

Each job takes a validated config and a run folder and writes its results there:
:func:`train_run` (off-chip training, defined here), :func:`run_search` (the Optuna search),
:func:`train_in_the_loop_run`, :func:`upload_run`, :func:`mismatch_study`,
:func:`budget_study`, :func:`train_conv`, :func:`train_conv_job` and :func:`deploy`, and the
calibration jobs :func:`reference_map_job`, :func:`chain_design_job`, :func:`chain_measure_job`,
:func:`position_job`, :func:`source_job` and :func:`field_job` with what their commands prepare
for them (:func:`reference_sweep_settings`, :func:`load_reference_model`,
:func:`design_chain_set`, :class:`ChainMeasureSettings`, :class:`PositionSettings`,
:func:`position_state_settings`) (defined beside what they run, imported from here by the
commands and the API). Library modules never import this module: it sits on top of them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hil import plots
from hil.bench.calibrate import (
    ChainMeasureSettings,
    PositionSettings,
    chain_design_job,
    chain_measure_job,
    design_chain_set,
    field_job,
    load_reference_model,
    position_job,
    position_state_settings,
    reference_map_job,
    reference_sweep_settings,
    source_job,
)
from hil.chip.budget_study import budget_study
from hil.chip.chip_in_loop import train_in_the_loop_run
from hil.chip.study import mismatch_study, upload_run
from hil.config import RunConfig
from hil.conv.hybrid import deploy
from hil.conv.jobs import ConvTrainSettings, train_conv_job
from hil.conv.network import train_conv
from hil.network import design_rules
from hil.network.engine import record_engine
from hil.network.tasks import make_task
from hil.runs import RunFolder
from hil.training import convergence
from hil.training.checkpoints import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    check_resume,
    plain,
    resume_trainer,
    save_checkpoint,
)
from hil.training.train import Trainer, TrainResult, summarize
from hil.training.tune import run_search

__all__ = [
    'ChainMeasureSettings',
    'ConvTrainSettings',
    'PositionSettings',
    'budget_study',
    'chain_design_job',
    'chain_measure_job',
    'check_resume',
    'deploy',
    'design_chain_set',
    'field_job',
    'load_reference_model',
    'mismatch_study',
    'position_job',
    'position_state_settings',
    'reference_map_job',
    'reference_sweep_settings',
    'run_search',
    'source_job',
    'train_conv',
    'train_conv_job',
    'train_in_the_loop_run',
    'train_run',
    'upload_run',
]


def train_run(cfg: RunConfig, folder: RunFolder, progress: bool = True,
              resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train every seed of ``cfg`` together; write config, metrics, results, summary, plots.

    Every epoch ends with ``checkpoint.pt`` (see :meth:`hil.training.train.Trainer.resume_state`);
    ``resume``, a checkpoint from :func:`check_resume`, continues that run in its own folder to
    the same final weights as an uninterrupted run."""
    torch.manual_seed(cfg.seeds[0])
    if resume is None:
        folder.write_config(cfg.to_dict())
        record_engine(folder, cfg.train.engine)
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
