"""Model against chip: upload and evaluate, the sim-to-real report, and the mismatch study.

* :func:`evaluate_on_backend` / :func:`upload_and_evaluate`: put a trained network's parameters on
  chips (one per trial), measure the task there, and report the gap to the model.
* :func:`sim_to_real_report`: the same checkpoint on the model and on the chip: accuracy gap,
  per-layer state residuals, plots; written to a run folder.
* :func:`upload_run`: the job behind ``hil upload`` (optionally with program-and-verify).
* :func:`mismatch_study`: the job behind ``hil study mismatch``: for every mismatch level and
  seed, the ideal model, its weights uploaded as they are, off-chip fine-tuning on the
  calibrated twin, and chip-in-the-loop fine-tuning, all measured on the same chip.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hil.chip.backends import Backend, make_backend
from hil.chip.twin import apply_twin, calibrate, calibration_errors, program_and_verify, single_trial
from hil.config import RunConfig
from hil.errors import ConfigError
from hil.network.engine import record_engine
from hil.network.model import DynamicalNetwork
from hil.network.tasks import Task, make_task
from hil.plots import plt
from hil.runs import RunFolder
from hil.training.train import EVAL_CHUNK, Trainer, clone_cfg, lr_at, summarize

METHODS = ("ideal", "nominal_upload", "calibrated_offchip", "chip_in_loop", "chip_in_loop_calibrated")
METHOD_LABELS = {"ideal": "ideal model", "nominal_upload": "nominal weights uploaded",
                 "calibrated_offchip": "off-chip on calibrated twin",
                 "chip_in_loop": "chip-in-the-loop (nominal twin)",
                 "chip_in_loop_calibrated": "chip-in-the-loop (calibrated twin)"}


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def measured_features(net: DynamicalNetwork, backend: Backend, task: Task, split: str,
                      keep_states: bool = False) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Run ``split`` on ``backend`` (what is programmed there now) and return what the readout
    reads: the last layer's measured outputs (the last point only unless the task labels every
    step), ``(B, T', N)``, and, with ``keep_states``, the measured states per chunk."""
    data = task.splits[split]
    feats, states = [], []
    for i in range(0, len(data), EVAL_CHUNK):
        m = backend.run(data.x[i : i + EVAL_CHUNK])
        last = torch.as_tensor(m.outputs, dtype=net.W_out.dtype)
        feats.append(net.output_of(last if task.per_step else last[:, -1:]))
        if keep_states and m.states is not None:
            states.append(m.states)
    return torch.cat(feats), states


@torch.no_grad()
def evaluate_on_backend(net: DynamicalNetwork, k: int, backend: Backend, task: Task, split: str = "test",
                        upload: bool = True, keep_states: bool = False) -> dict[str, Any]:
    """Trial ``k``'s parameters on ``backend``: loss and metric of the digital readout applied to
    the measured last-layer states (and, with ``keep_states``, the measured states)."""
    data = task.splits[split]
    if upload:
        backend.upload(net.layer_weights(k))
    feats, states = measured_features(net, backend, task, split, keep_states)
    out = (feats @ net.W_out[k].T + net.b_out[k]).unsqueeze(0)
    res: dict[str, Any] = {"loss": float(task.loss(out, data.y)[0]),
                           "metric": float(task.metric(out, data.y)[0])}
    if keep_states:
        res["states"] = np.concatenate(states) if states else None
    return res


def refit_readout_on_chip(net: DynamicalNetwork, k: int, backend: Backend, task: Task, split: str = "train",
                          steps: int = 300, lr: float = 0.01, upload: bool = True) -> dict[str, Any]:
    """Measure ``split`` once on trial ``k``'s chip and refit the host-side readout
    (``W_out``, ``b_out``) to the measured last-layer states, starting from the present one.

    The chip's parameters stay as they are, so the device time is one upload and one pass
    over the split; the fit itself (full-batch Adam on the task's loss) runs on the host. The
    readout then reads the states this chip actually produces (its mismatch and offsets)
    rather than the twin's. Returns the split's loss before and after."""
    data = task.splits[split]
    if upload:
        backend.upload(net.layer_weights(k))
    y_feat = measured_features(net, backend, task, split)[0].unsqueeze(0)  # (1, B, T', N)
    W = net.W_out[k].detach().clone().requires_grad_(True)
    b = net.b_out[k].detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([W, b], lr=lr)

    def loss() -> torch.Tensor:
        return task.loss(y_feat @ W.T + b, data.y)[0]

    with torch.no_grad():
        before = float(loss())
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss().backward()
            opt.step()
    with torch.no_grad():
        after = float(loss())
    if after < before:  # never worse on the measured data than the readout it started from
        with torch.no_grad():
            net.W_out[k].copy_(W)
            net.b_out[k].copy_(b)
    return {"loss_before": before, "loss_after": min(after, before)}


@torch.no_grad()
def evaluate_model(net: DynamicalNetwork, k: int, task: Task, split: str = "test",
                   keep_states: bool = False) -> dict[str, Any]:
    """Trial ``k`` on the model alone (same form as :func:`evaluate_on_backend`)."""
    one = single_trial(net, k)
    data = task.splits[split]
    outs, states = [], []
    for i in range(0, len(data), EVAL_CHUNK):
        xs, _ = one(data.x[i : i + EVAL_CHUNK])
        outs.append(one.readout(xs if task.per_step else xs[:, :, -1:]))
        if keep_states:
            states.append(xs[0].double().numpy())
    out = torch.cat(outs, 1)
    res: dict[str, Any] = {"loss": float(task.loss(out, data.y)[0]),
                           "metric": float(task.metric(out, data.y)[0])}
    if keep_states:
        res["states"] = np.concatenate(states)
    return res


def upload_and_evaluate(net: DynamicalNetwork, task: Task, backends: Sequence[Backend],
                        split: str = "test") -> list[dict[str, Any]]:
    """Per trial: the metric on the model, on the chip after uploading, and the gap (model - chip)."""
    if len(backends) != net.K:
        raise ConfigError("--backend", f"one backend per trial: {net.K} trials, {len(backends)} backends")
    rows = []
    for k, be in enumerate(backends):
        mod = evaluate_model(net, k, task, split)
        dev = evaluate_on_backend(net, k, be, task, split)
        rows.append({"seed": net.seeds[k], "trial": k, "model": mod["metric"], "device": dev["metric"],
                     "gap": mod["metric"] - dev["metric"], "model_loss": mod["loss"],
                     "device_loss": dev["loss"]})
    return rows


# ----------------------------------------------------------------------------- sim-to-real report

def sim_to_real_report(net: DynamicalNetwork, task: Task, backends: Sequence[Backend], folder: RunFolder,
                       split: str = "test", name: str = "sim_to_real", upload: bool = True) -> dict[str, Any]:
    """The same parameters evaluated on the model and on each trial's chip: metric gap, per-layer
    RMS state residuals, and plots (``<name>.png``, ``<name>_trajectories.png``);
    ``<name>.json`` holds the numbers. ``upload=False``: measure what is on the chips already
    (no second upload: device time, and a verified upload stays as verified)."""
    metric = task.metric_name
    rows = []
    traj = None
    for k, be in enumerate(backends):
        mod = evaluate_model(net, k, task, split, keep_states=True)
        dev = evaluate_on_backend(net, k, be, task, split, upload=upload, keep_states=True)
        row: dict[str, Any] = {"seed": net.seeds[k], "trial": k, f"model_{metric}": mod["metric"],
                               f"device_{metric}": dev["metric"], "gap": mod["metric"] - dev["metric"]}
        if dev["states"] is not None:
            d = dev["states"] - mod["states"]
            row["state_rms_per_layer"] = [float(np.sqrt((d[..., sl] ** 2).mean()))
                                          for sl in net.layer_slices()]
            if traj is None:
                traj = (mod["states"][0], dev["states"][0], net.seeds[k])
        rows.append(row)
    summary = {
        f"model_{metric}": summarize([r[f"model_{metric}"] for r in rows]),
        f"device_{metric}": summarize([r[f"device_{metric}"] for r in rows]),
        "gap": summarize([r["gap"] for r in rows]),
    }
    if all("state_rms_per_layer" in r for r in rows):
        per = np.array([r["state_rms_per_layer"] for r in rows])
        summary["state_rms_per_layer_median"] = np.median(per, 0).tolist()
    report = {"split": split, "metric": metric, "per_seed": rows, "summary": summary,
              "backends": [b.describe()["identity"] for b in backends]}
    folder.write_json(f"{name}.json", report)
    _plot_sim_to_real(rows, metric, net.L, folder.file(f"{name}.png"))
    if traj is not None:
        _plot_trajectories(*traj, net.L, net.N, net.configs[0].dt_ns, folder.file(f"{name}_trajectories.png"))
    return report


def _plot_sim_to_real(rows: list[dict[str, Any]], metric: str, L: int, path: Path) -> None:
    has_states = all("state_rms_per_layer" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if has_states else 1, figsize=(9 if has_states else 4.5, 3.4),
                             squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [100 * r[f"model_{metric}"] for r in rows], 0.4, label="model")
    ax.bar(x + 0.2, [100 * r[f"device_{metric}"] for r in rows], 0.4, label="device")
    ax.set_xticks(x, [str(r["seed"]) for r in rows])
    ax.set_xlabel("seed")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    if has_states:
        ax = axes[0][1]
        for r in rows:
            ax.plot(range(L), r["state_rms_per_layer"], "o-", label=f"seed {r['seed']}")
        ax.set_xticks(range(L))
        ax.set_xlabel("layer")
        ax.set_ylabel("RMS state residual (device - model)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_trajectories(model: np.ndarray, device: np.ndarray, seed: int, L: int, N: int, dt_ns: float,
                       path: Path, neurons: int = 3) -> None:
    """One test input: a few neurons per layer, model dashed, device solid. ``(T, M)`` each."""
    fig, axes = plt.subplots(1, L, figsize=(4.2 * L, 3.2), squeeze=False)
    t = (np.arange(model.shape[0]) + 1) * dt_ns
    for li in range(L):
        ax = axes[0][li]
        for j in range(min(neurons, N)):
            i = li * N + j
            line, = ax.plot(t, device[:, i], lw=1.2, label=f"neuron {j} device")
            ax.plot(t, model[:, i], "--", color=line.get_color(), lw=1.0, label=f"neuron {j} model")
        ax.set_title(f"layer {li} (seed {seed})")
        ax.set_xlabel("time (ns)")
        ax.set_ylabel("x")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- hil upload

def upload_run(source: Path, backend: str, folder: RunFolder,
               device: list[str] | dict[str, Any] | None = None,
               verify: bool = False, tol: float = 0.01, max_iters: int = 3, calibrated_twin: bool = False,
               budget_repeats: int = 3) -> dict[str, Any]:
    """Load a trained run, upload every seed to its own chip (drawn with that seed), evaluate
    on the chip, report the gap and write the sim-to-real report. With ``verify``, program and
    verify each upload first (against the calibrated twin when ``calibrated_twin``). On the
    simulated chip, ``budget_repeats > 0`` adds the gap budget (:mod:`hil.chip.gap_budget`)."""
    from hil.training.checkpoints import load_run

    src = source if source.is_dir() else source.parent
    cfg, task, net = load_run(src)
    folder.write_config(cfg.to_dict())
    record_engine(folder, cfg.train.engine)
    folder.write_json("source.json", {"run_folder": str(src)})
    backends = [make_backend(backend, cfg.model, task.n_in, task.input_centre, s, device) for s in net.seeds]
    try:
        folder.write_json("backends.json", [b.describe() for b in backends])
        rows = upload_and_evaluate(net, task, backends)
        for r in rows:
            folder.append_metrics({"stage": "upload", **r})
        summary: dict[str, Any] = {"source": str(src), "backend": backend, "metric": task.metric_name,
                                   "per_seed": rows, "model": summarize([r["model"] for r in rows]),
                                   "device": summarize([r["device"] for r in rows]),
                                   "gap": summarize([r["gap"] for r in rows])}
        if verify:
            twin = net
            if calibrated_twin:
                twin = _copy_net(net)
                for k, be in enumerate(backends):
                    apply_twin(twin, k, calibrate(be, cfg.model))
            probe = task.splits["train"].x[:32]
            verified = []
            for k, be in enumerate(backends):
                rep = program_and_verify(twin, k, be, probe, tol=tol, max_iters=max_iters,
                                         log=lambda rec, s=net.seeds[k]: folder.append_metrics(
                                             {"stage": "verify", "seed": s, **rec}, "verify.jsonl"))
                np.savez(folder.file(f"verify_residuals_seed{net.seeds[k]}.npz"),
                         **{f"layer{li}_{key}": v for li, layer in enumerate(rep.residuals)
                            for key, v in layer.items()})
                dev = evaluate_on_backend(net, k, be, task, upload=False)
                verified.append({"seed": net.seeds[k], "converged": rep.converged,
                                 "iterations": len(rep.iterations) - 1,
                                 "max_abs_residual": [it["max_abs_residual"] for it in rep.iterations],
                                 "state_rms": [it["state_rms"] for it in rep.iterations],
                                 "device_after_verify": dev["metric"]})
            summary["verify"] = verified
            summary["device_after_verify"] = summarize([v["device_after_verify"] for v in verified])
        report = sim_to_real_report(net, task, backends, folder, upload=False)
        summary["sim_to_real"] = report["summary"]
        if backend == "sim" and budget_repeats > 0:
            from hil.chip.backends import parse_device_overrides
            from hil.chip.gap_budget import gap_budget, write_budget

            budget = gap_budget(net, task, parse_device_overrides(device), repeats=budget_repeats)
            write_budget(budget, folder)
            summary["gap_budget"] = {k: budget[k] for k in ("metric", "split", "n_seeds", "repeats",
                                                              "median_cost", "median_total_gap")}
        summary["device_counters"] = [b.describe()["counters"] for b in backends]
        folder.write_json("summary.json", summary)
        return summary
    finally:
        for be in backends:
            be.close()


def _copy_net(net: DynamicalNetwork) -> DynamicalNetwork:
    c = DynamicalNetwork(net.configs, net.n_in, net.n_out, net.seeds, float(net.input_centre))
    c.load_state_dict(net.state_dict())
    c.engine = net.engine
    return c


# ----------------------------------------------------------------------------- mismatch study

def mismatch_study(cfg: RunConfig, levels: Sequence[float], folder: RunFolder, finetune_epochs: int = 5,
                   finetune_lr: float | None = None, methods: Sequence[str] = METHODS,
                   loop_lr: float | None = None,
                   device: dict[str, Any] | None = None, calibration: dict[str, Any] | None = None,
                   progress: bool = True, budget_repeats: int = 2) -> dict[str, Any]:
    """Sweep the mismatch (coefficient of variation of gamma_i and sigma_i) over ``levels``.

    For each seed, the network is trained off-chip on the ideal model (``cfg.train.epochs``).
    Then for each level and seed, on one chip drawn with that seed: the ideal weights uploaded
    as they are; the twin calibrated and the network fine-tuned off-chip on it for
    ``finetune_epochs`` and uploaded; chip-in-the-loop fine-tuning for ``finetune_epochs`` with
    the nominal twin, and with the calibrated twin, in the backward pass. ``calibration``:
    keyword arguments of :func:`hil.chip.twin.calibrate`; its errors against the simulated chips'
    true values go to ``calibration.jsonl``. Fine-tuning starts from
    the ideal weights: off-chip with learning rate ``finetune_lr`` (default: half of
    ``train.lr0``), in the loop with ``loop_lr`` (default: a third of the training schedule's
    final rate). The loop's gradients carry the chip's noise, and a fresh Adam moves every weight
    by about its rate at the first steps: on digits (seeds 0-2) in-the-loop fine-tuning at
    ``lr0 / 2`` = 0.0088 lost 2.2 points at 0 % mismatch and ended 9 points below off-chip
    fine-tuning at 20 %; at 0.002 it lost 0.6 and ended 1.8 below.
    With ``budget_repeats > 0`` every level also gets the gap budget of the uploaded ideal
    weights (:mod:`hil.chip.gap_budget`: integrator, quantisation, noise, offsets, mismatch, ...;
    ``gap_budget_cvNN.*``), so the table says where each method breaks down and why.
    Results are appended to ``metrics.jsonl`` as they come; ``mismatch_study.json``, ``.csv``,
    ``.md`` and ``.png`` hold the table and plot."""
    from hil.chip.chip_in_loop import ChipInTheLoopTrainer, TwinTrainer

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError("--methods", f"unknown {unknown}; allowed: {', '.join(METHODS)}")
    if finetune_epochs < 1:
        raise ConfigError("--finetune-epochs", "must be >= 1")
    if budget_repeats < 0:
        raise ConfigError("--budget-repeats", f"must be >= 0, got {budget_repeats}")
    for lv in levels:
        if not (0 <= lv < 5):
            raise ConfigError("--levels",
                              f"mismatch levels are coefficients of variation in [0, 5), got {lv}")
    device = dict(device or {})
    for key in ("cv_gamma", "cv_sigma"):
        if key in device:
            raise ConfigError(f"device.{key}", "is set by the study's --levels")
    folder.write_config(cfg.to_dict())
    record_engine(folder, cfg.train.engine)
    t_start = time.perf_counter()
    task = make_task(cfg.task, cfg.train.output_gain)
    K = len(cfg.seeds)
    metric = task.metric_name
    ideal = Trainer([cfg.model] * K, [cfg.train] * K, cfg.seeds, task, progress=progress,
                    label="ideal off-chip", hardware=cfg.hardware).fit()
    net = ideal.net
    ideal_state = {k: v.clone() for k, v in net.state_dict().items()}
    ideal_acc = [evaluate_model(net, k, task)["metric"] for k in range(K)]
    ft = clone_cfg(cfg.train, epochs=finetune_epochs,
                   lr0=finetune_lr if finetune_lr is not None else cfg.train.lr0 / 2)
    if loop_lr is None:
        loop_lr = float(lr_at(torch.tensor(cfg.train.lr0), torch.tensor(cfg.train.lr_decay),
                              cfg.train.epochs)) / 3
    if not (ft.lr0 > 0 and loop_lr > 0):
        raise ConfigError("--finetune-lr/--loop-lr", f"must be > 0, got {ft.lr0} and {loop_lr}")
    ft_loop = clone_cfg(ft, lr0=loop_lr)
    results: list[dict[str, Any]] = []
    budgets: dict[str, dict[str, Any]] = {}

    def record(level: float, method: str, k: int, value: float, **extra: Any) -> None:
        rec = {"level": level, "method": method, "seed": cfg.seeds[k], metric: value, **extra}
        results.append(rec)
        folder.append_metrics(rec)

    for lv in levels:
        backends = [make_backend("sim", cfg.model, task.n_in, task.input_centre, s,
                                 {**device, "cv_gamma": lv, "cv_sigma": lv}) for s in cfg.seeds]
        try:
            if "ideal" in methods:
                for k in range(K):
                    record(lv, "ideal", k, ideal_acc[k])
            if "nominal_upload" in methods:
                for k, row in enumerate(upload_and_evaluate(net, task, backends)):
                    record(lv, "nominal_upload", k, row["device"])
            if budget_repeats > 0:
                from hil.chip.gap_budget import gap_budget, write_budget

                budget = gap_budget(net, task, {**device, "cv_gamma": lv, "cv_sigma": lv},
                                    repeats=budget_repeats)
                write_budget(budget, folder, f"gap_budget_cv{round(100 * lv):02d}")
                budgets[f"{lv:g}"] = {"median_cost": budget["median_cost"],
                                      "median_total_gap": budget["median_total_gap"]}
            twins = None
            if any(m in methods for m in ("calibrated_offchip", "chip_in_loop_calibrated")):
                twins = [calibrate(be, cfg.model, **(calibration or {})) for be in backends]
                for k, (be, tp) in enumerate(zip(backends, twins, strict=True)):
                    err = calibration_errors(tp, be.describe()["parameters"]["current"])
                    folder.append_metrics({"level": lv, "seed": cfg.seeds[k], "calibration": err,
                                           "unidentified": tp.meta["unidentified"]}, "calibration.jsonl")
            if "calibrated_offchip" in methods:
                res = TwinTrainer([cfg.model] * K, [ft] * K, cfg.seeds, task, twins=twins, init=ideal_state,
                                  progress=progress, label=f"cv {lv:.2f} off-chip on calibrated twin",
                                  hardware=cfg.hardware).fit()
                for k, be in enumerate(backends):
                    record(lv, "calibrated_offchip", k, evaluate_on_backend(res.net, k, be, task)["metric"],
                           twin_model=res.final[k][f"test_{metric}"])
            for method, tw in (("chip_in_loop", None), ("chip_in_loop_calibrated", twins)):
                if method not in methods:
                    continue
                before = [be.counters["device_time_s"] for be in backends]
                tr = ChipInTheLoopTrainer([cfg.model] * K, [ft_loop] * K, cfg.seeds, task, backends, twins=tw,
                                          init=ideal_state, progress=progress,
                                          label=f"cv {lv:.2f} {method}")
                res = tr.fit()
                for k, be in enumerate(backends):
                    record(lv, method, k, res.final[k][f"test_{metric}"], status=res.final[k]["status"],
                           device_time_s=be.counters["device_time_s"] - before[k],
                           device_runs=be.counters["runs"])
        finally:
            for be in backends:
                be.close()
    table = study_table(results, metric, levels, [m for m in METHODS if m in methods])
    summary = {"metric": metric, "levels": list(levels), "seeds": cfg.seeds,
               "finetune_epochs": finetune_epochs, "finetune_lr": ft.lr0, "loop_lr": loop_lr,
               "epochs": cfg.train.epochs,
               "table": table, "gap_budget": budgets, "budget_repeats": budget_repeats,
               "seconds": time.perf_counter() - t_start, "results": results}
    folder.write_json("mismatch_study.json", summary)
    _write_table(table, metric, folder, budgets)
    _plot_study(table, metric, folder.file("mismatch_study.png"))
    return summary


def study_table(results: list[dict[str, Any]], metric: str, levels: Sequence[float],
                methods: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for lv in levels:
        row: dict[str, Any] = {"level": lv}
        for m in methods:
            vals = [r[metric] for r in results if r["level"] == lv and r["method"] == m]
            row[m] = summarize(vals) if vals else None
        rows.append(row)
    return rows


def _write_table(table: list[dict[str, Any]], metric: str, folder: RunFolder,
                 budgets: dict[str, dict[str, Any]] | None = None) -> None:
    methods = [k for k in table[0] if k != "level"]
    with open(folder.file("mismatch_study.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mismatch_cv"] + [f"{m}_{s}" for m in methods for s in ("median", "q25", "q75", "n")])
        for row in table:
            w.writerow([row["level"]] + [row[m][s] if row[m] else "" for m in methods
                                         for s in ("median", "q25", "q75", "n")])
    lines = ["| mismatch (cv of gamma, sigma) | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
             "|---" * (len(methods) + 1) + "|"]
    for row in table:
        cells = [f"{100 * row[m]['median']:.1f} [{100 * row[m]['q25']:.1f}-{100 * row[m]['q75']:.1f}]"
                 if row[m] else "-" for m in methods]
        lines.append(f"| {100 * row['level']:.0f} % | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Test {metric} (%), median [quartiles] over seeds.")
    if budgets:
        lines += ["", "Gap budget of the uploaded ideal weights (points lost, median over seeds; "
                  "gap_budget_cvNN.* per seed, with standard errors):", ""]
        levels = list(budgets)
        lines.append("| factor | " + " | ".join(f"{100 * float(lv):.0f} %" for lv in levels) + " |")
        lines.append("|---" * (len(levels) + 1) + "|")
        for factor in budgets[levels[0]]["median_cost"]:
            lines.append(f"| {factor} | " + " | ".join(
                f"{100 * budgets[lv]['median_cost'][factor]:+.2f}" for lv in levels) + " |")
        lines.append("| total (model - chip) | " + " | ".join(
            f"{100 * budgets[lv]['median_total_gap']:+.2f}" for lv in levels) + " |")
    folder.file("mismatch_study.md").write_text("\n".join(lines) + "\n")


def _plot_study(table: list[dict[str, Any]], metric: str, path: Path) -> None:
    methods = [k for k in table[0] if k != "level"]
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.array([100 * r["level"] for r in table])
    for m in methods:
        med = np.array([100 * r[m]["median"] for r in table])
        lo = np.array([100 * r[m]["q25"] for r in table])
        hi = np.array([100 * r[m]["q75"] for r in table])
        ax.plot(x, med, "o-", label=METHOD_LABELS[m])
        ax.fill_between(x, lo, hi, alpha=0.15)
    ax.set_xlabel("mismatch: coefficient of variation of gamma_i and sigma_i (%)")
    ax.set_ylabel(f"test {metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
