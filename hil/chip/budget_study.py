"""``hil study budget`` (issue 22): accuracy on the chip versus the device time spent to get it,
for several ways of spending it (gradient estimators), over seeds.

For each seed the network is trained off-chip on the ideal model (or taken from ``--init``).
Then, for each estimator, every seed gets a fresh chip drawn with its seed (the same chip for
every estimator: same mismatch, same noise streams), optionally the twin calibrated on it (that
device time counts), and chip-in-the-loop fine-tuning from the ideal weights with the estimator.
The test split is measured on the chip at the start, every ``curve_every`` updates and at every
epoch's end; those measurements are reporting and are not counted as device time.

``offchip`` is the limit of twin steps with no chip step at all: the calibrated twin fine-tuned
off-chip and uploaded once (device time: calibration and one upload); ``offchip+readout`` the
same, then the training split measured once on the chip and the host-side readout refitted to
those measurements (:func:`hil.chip.study.refit_readout_on_chip`). Any estimator's spec with ``+readout``
(``twin:every=3+readout``) gets the same refit after its fine-tuning.

The table gives per estimator the final accuracy (median and quartiles over seeds), the device
time spent, and the device time at which each seed first came within ``within`` (1 point) of
its ideal model's accuracy; the plot shows every estimator's curve (median over seeds).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hil.chip.backends import make_backend
from hil.chip.estimators import make_estimator
from hil.chip.study import evaluate_model, evaluate_on_backend, refit_readout_on_chip
from hil.chip.twin import calibrate
from hil.config import RunConfig
from hil.errors import ConfigError
from hil.network.engine import record_engine
from hil.network.tasks import make_task
from hil.runs import RunFolder
from hil.training.train import Trainer, clone_cfg, lr_at, summarize

OFFCHIP = "offchip"
#: the calibrated twin fine-tuned off-chip, uploaded once, the training split measured once on
#: the chip and the host-side readout refitted to what the chip measured
OFFCHIP_READOUT = "offchip+readout"
METHODS = (OFFCHIP, OFFCHIP_READOUT)


#: an estimator's spec with this suffix: after fine-tuning, the readout is refitted to one pass of
#: the training split on each chip (:func:`hil.chip.study.refit_readout_on_chip`)
READOUT_SUFFIX = "+readout"


def _split_refit(spec: str) -> tuple[str, bool]:
    if spec.endswith(READOUT_SUFFIX):
        return spec[: -len(READOUT_SUFFIX)], True
    return spec, False


def check_settings(estimators: Sequence[str], twin: str, finetune_epochs: int, curve_every: int,
                   level: float) -> None:
    """The study's settings, refused with one clear error before any folder or chip."""
    if not estimators:
        raise ConfigError("--estimators", "at least one estimator is needed")
    for spec in estimators:
        if spec not in METHODS:
            make_estimator(_split_refit(spec)[0])
    if len(set(estimators)) != len(estimators):
        raise ConfigError("--estimators", f"an estimator is listed twice: {list(estimators)}")
    if twin not in ("nominal", "calibrated"):
        raise ConfigError("--twin", f"unknown twin {twin!r}; allowed: nominal, calibrated")
    off = [m for m in METHODS if m in estimators]
    if off and twin != "calibrated":
        raise ConfigError(
            "--estimators", f"{off[0]} fine-tunes on the calibrated twin: use --twin calibrated"
        )
    if finetune_epochs < 1:
        raise ConfigError("--finetune-epochs", f"must be >= 1, got {finetune_epochs}")
    if curve_every < 0:
        raise ConfigError("--curve-every", f"must be >= 0, got {curve_every}")
    if not 0 <= level < 5:
        raise ConfigError("--level", f"a coefficient of variation in [0, 5), got {level}")


def budget_study(
    cfg: RunConfig,
    folder: RunFolder,
    estimators: Sequence[str],
    level: float = 0.2,
    backend: str = "sim",
    device: dict[str, Any] | None = None,
    twin: str = "calibrated",
    finetune_epochs: int = 5,
    loop_lr: float | None = None,
    finetune_lr: float | None = None,
    curve_every: int = 3,
    within: float = 0.01,
    init_state: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the study (module docstring); write ``budget_study.json``, ``.csv``, ``.md``, ``.png``."""
    from hil.chip.chip_in_loop import ChipInTheLoopTrainer, TwinTrainer, load_parameters

    check_settings(estimators, twin, finetune_epochs, curve_every, level)
    device = dict(device or {})
    for key in ("cv_gamma", "cv_sigma"):
        if key in device:
            raise ConfigError(f"device.{key}", "is set by the study's --level")
    chip = {**device, "cv_gamma": level, "cv_sigma": level}
    folder.write_config(cfg.to_dict())
    record_engine(folder, cfg.train.engine)
    t_start = time.perf_counter()
    task = make_task(cfg.task, cfg.train.output_gain)
    metric = task.metric_name
    K = len(cfg.seeds)

    ideal = Trainer(
        [cfg.model] * K, [cfg.train] * K, cfg.seeds, task, progress=progress, label="ideal off-chip",
        hardware=cfg.hardware,
    )
    if init_state is not None:
        load_parameters(ideal.net, init_state)
    else:
        ideal.fit()
    net = ideal.net
    from hil.training.checkpoints import checkpoint_data

    # the ideal weights as a run folder's model.pt: another study can start from them (--init)
    folder.save_torch("model.pt", checkpoint_data(net, cfg))
    ideal_state = {k: v.clone() for k, v in net.state_dict().items()}
    ideal_acc = [evaluate_model(net, k, task)["metric"] for k in range(K)]
    if loop_lr is None:
        loop_lr = (
            float(lr_at(torch.tensor(cfg.train.lr0), torch.tensor(cfg.train.lr_decay), cfg.train.epochs)) / 3
        )
    ft_loop = clone_cfg(cfg.train, epochs=finetune_epochs, lr0=loop_lr)
    ft_off = clone_cfg(
        cfg.train, epochs=finetune_epochs, lr0=finetune_lr if finetune_lr is not None else cfg.train.lr0 / 2
    )
    curves: dict[str, list[dict[str, Any]]] = {}
    finals: dict[str, list[dict[str, Any]]] = {}
    for spec in estimators:
        backends = [
            make_backend(backend, cfg.model, task.n_in, task.input_centre, s, chip) for s in cfg.seeds
        ]
        pts: list[dict[str, Any]] = []
        try:
            twins = (
                [calibrate(be, cfg.model, **(calibration or {})) for be in backends]
                if twin == "calibrated"
                else None
            )
            if spec in METHODS:
                res = TwinTrainer(
                    [cfg.model] * K,
                    [ft_off] * K,
                    cfg.seeds,
                    task,
                    twins=twins,
                    init=ideal_state,
                    progress=progress,
                    label=f"{spec}",
                    hardware=cfg.hardware,
                ).fit()
                rows = []
                for k, be in enumerate(backends):
                    calibrated = be.counters["device_time_s"]
                    start = _start_metric(net, k, be, task)  # reporting: its device time is not counted
                    reporting = be.counters["device_time_s"] - calibrated
                    be.upload(res.net.layer_weights(k))
                    if spec == OFFCHIP_READOUT:  # one pass over the training split, readout refitted
                        refit_readout_on_chip(res.net, k, be, task, upload=False)
                    spent = be.counters["device_time_s"] - reporting
                    acc = evaluate_on_backend(res.net, k, be, task, upload=False)["metric"]
                    pts.append(
                        {
                            "seed": cfg.seeds[k],
                            "update": 0,
                            "train_device_time_s": calibrated,
                            f"test_{metric}": start,
                        }
                    )
                    pts.append(
                        {
                            "seed": cfg.seeds[k],
                            "update": 1,
                            "train_device_time_s": spent,
                            f"test_{metric}": acc,
                        }
                    )
                    rows.append(
                        {
                            "seed": cfg.seeds[k],
                            f"test_{metric}": acc,
                            "train_device_time_s": spent,
                            "status": res.final[k]["status"],
                        }
                    )
                finals[spec] = rows
            else:
                base, refit = _split_refit(spec)
                tr = ChipInTheLoopTrainer(
                    [cfg.model] * K,
                    [ft_loop] * K,
                    cfg.seeds,
                    task,
                    backends,
                    twins=twins,
                    init=ideal_state,
                    progress=progress,
                    label=spec,
                    estimator=base,
                    curve_every=curve_every,
                )
                # the starting point: the ideal weights on the chip, at the device time spent so far
                with tr.loop.measuring_test():
                    start = [_start_metric(net, k, be, task) for k, be in enumerate(backends)]
                for k in range(K):
                    pts.append(
                        {
                            "seed": cfg.seeds[k],
                            "update": 0,
                            "train_device_time_s": tr.loop.train_time_s(k),
                            f"test_{metric}": start[k],
                        }
                    )
                res = tr.fit()
                if refit:  # the training split once on each chip, the readout refitted to it
                    for k, be in enumerate(backends):
                        refit_readout_on_chip(tr.loop.twin, k, be, task)
                        with tr.loop.measuring_test():
                            acc = evaluate_on_backend(tr.loop.twin, k, be, task, upload=False)["metric"]
                        res.final[k][f"test_{metric}"] = acc
                        tr.curve_record(k, res.final[k]["epoch"], acc, readout_refit=True)
                pts += tr.curve
                finals[spec] = [
                    {
                        "seed": cfg.seeds[k],
                        f"test_{metric}": res.final[k][f"test_{metric}"],
                        "train_device_time_s": tr.loop.train_time_s(k),
                        "status": res.final[k]["status"],
                        "chip_steps": tr.loop.chip_steps,
                        "twin_steps": tr.loop.twin_steps,
                        **{
                            f"estimator_{a}": b
                            for a, b in tr.loop.estimator.report().items()
                            if a != "estimator"
                        },
                    }
                    for k in range(K)
                ]
        finally:
            for be in backends:
                be.close()
        curves[spec] = pts
        for p in pts:
            folder.append_metrics({"estimator": spec, **p})
    table = budget_table(curves, finals, ideal_acc, cfg.seeds, metric, within)
    summary = {
        "metric": metric,
        "level": level,
        "backend": backend,
        "twin": twin,
        "seeds": cfg.seeds,
        "estimators": list(estimators),
        "finetune_epochs": finetune_epochs,
        "loop_lr": loop_lr,
        "finetune_lr": ft_off.lr0,
        "calibration": dict(calibration or {}),
        "curve_every": curve_every,
        "within_points": 100 * within,
        "ideal": summarize(ideal_acc),
        "ideal_per_seed": ideal_acc,
        "table": table,
        "curves": curves,
        "finals": finals,
        "seconds": time.perf_counter() - t_start,
    }
    folder.write_json("budget_study.json", summary)
    _write(table, summary, folder)
    from hil import plots

    plots.device_time_curves(
        curves,
        metric,
        folder.file("budget_study.png"),
        reference=float(np.median(ideal_acc)),
        title=f"{cfg.task.name}, mismatch {100 * level:g} %, {K} seeds ({backend})",
    )
    return summary


@torch.no_grad()
def _start_metric(net, k: int, be, task) -> float:
    return float(evaluate_on_backend(net, k, be, task)["metric"])


def time_to_reach(points: list[dict[str, Any]], target: float, metric: str) -> float | None:
    """The device time of the first point at or above ``target`` (None: never)."""
    for p in sorted(points, key=lambda p: (p["train_device_time_s"], p["update"])):
        if p[f"test_{metric}"] >= target - 1e-12:
            return float(p["train_device_time_s"])
    return None


def budget_table(
    curves: dict[str, list[dict[str, Any]]],
    finals: dict[str, list[dict[str, Any]]],
    ideal: list[float],
    seeds: Sequence[int],
    metric: str,
    within: float,
) -> list[dict[str, Any]]:
    """One row per estimator: final metric and device time over seeds, and time to come within
    ``within`` of each seed's ideal accuracy (median over the seeds that did, and how many)."""
    rows = []
    for spec, pts in curves.items():
        fin = finals[spec]
        reach = [
            time_to_reach([p for p in pts if p["seed"] == s], ideal[k] - within, metric)
            for k, s in enumerate(seeds)
        ]
        got = [t for t in reach if t is not None]
        rows.append(
            {
                "estimator": spec,
                "final": summarize([f[f"test_{metric}"] for f in fin]),
                "device_time_s": summarize([f["train_device_time_s"] for f in fin]),
                "reached": len(got),
                "n": len(seeds),
                "time_to_within_s": float(np.median(got)) if len(got) * 2 > len(seeds) else None,
                "time_to_within_per_seed": reach,
                "gap_to_ideal_points": float(
                    100 * np.median([ideal[k] - f[f"test_{metric}"] for k, f in enumerate(fin)])
                ),
            }
        )
    return rows


def table_markdown(table: list[dict[str, Any]], metric: str) -> list[str]:
    """The table of :func:`budget_table` as Markdown lines (header and one row per estimator)."""
    lines = [
        f"| estimator | final {metric} median (IQR) | gap to ideal (points) | device time per chip (s) "
        "| seeds within | time to within (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        f, d = r["final"], r["device_time_s"]
        ttw = f"{r['time_to_within_s']:.3f}" if r["time_to_within_s"] is not None else "not reached"
        lines.append(
            f"| {r['estimator']} | {100 * f['median']:.2f} % ({100 * f['q25']:.2f}-{100 * f['q75']:.2f}) "
            f"| {r['gap_to_ideal_points']:+.2f} | {d['median']:.3f} | {r['reached']}/{r['n']} | {ttw} |"
        )
    return lines


def _write(table: list[dict[str, Any]], summary: dict[str, Any], folder: RunFolder) -> None:
    metric = summary["metric"]
    with open(folder.file("budget_study.csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "estimator",
                f"median_{metric}",
                "q25",
                "q75",
                "median_device_time_s",
                "reached_within",
                "n",
                "median_time_to_within_s",
                "median_gap_points",
            ]
        )
        for r in table:
            w.writerow(
                [
                    r["estimator"],
                    r["final"]["median"],
                    r["final"]["q25"],
                    r["final"]["q75"],
                    r["device_time_s"]["median"],
                    r["reached"],
                    r["n"],
                    r["time_to_within_s"],
                    r["gap_to_ideal_points"],
                ]
            )
    ideal = summary["ideal"]
    lines = [
        f"Budget study: {metric} on the chip vs training device time, mismatch "
        f"{100 * summary['level']:g} %, backend {summary['backend']}, {summary['twin']} twin, "
        f"seeds {summary['seeds']}",
        f"Ideal model: median {100 * ideal['median']:.2f} % (quartiles {100 * ideal['q25']:.2f}-"
        f"{100 * ideal['q75']:.2f}). 'Within' = within {summary['within_points']:g} point of each "
        "seed's ideal accuracy; time to within = median over the seeds when more than half got there.",
        "",
        *table_markdown(table, metric),
    ]
    Path(folder.file("budget_study.md")).write_text("\n".join(lines) + "\n", encoding="utf-8")
