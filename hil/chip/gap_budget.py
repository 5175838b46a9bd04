"""Where the model-to-chip gap comes from (issue 16): the same uploaded weights measured on
simulated chips that differ from a perfect one by one non-ideality at a time.

The perfect chip has every non-ideality off and the chip's converged integrator; its thermal
drift (the floor) is the model's own ``model.thermal_d_ghz``, without fluctuations: so
``model - perfect`` is what the training integrator's error costs. Each factor is then
switched on alone at the configured chip's value (same seed, same weights), and its cost is
``perfect - with that factor``. The configured chip (every factor on) gives the total gap;
what the single factors do not explain is reported as ``interaction``, so the rows add up to
the total by construction (a test checks that a chip with one factor on has no interaction).
Noisy measurements (thermal and readout noise, programming error, drift) are repeated and
given as mean with standard error.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from hil.chip.backends import SimulatedDeviceBackend, device_config
from hil.network.model import DynamicalNetwork
from hil.network.tasks import Task
from hil.plots import plt
from hil.runs import RunFolder

#: the chip settings each factor switches on (their "off" values are in PERFECT)
FACTORS: dict[str, tuple[str, ...]] = {
    "quantisation": ("weight_bits",),
    "thermal and readout noise": ("thermal_d_ghz", "thermal_fluctuations", "readout_noise"),
    "programming error and synapse gain": ("program_noise", "synapse_gain_cv"),
    "static offsets": ("offset_std",),
    "mismatch": ("cv_gamma", "cv_sigma", "cv_q"),
    "drift": ("drift_per_sqrt_s",),
}
PERFECT: dict[str, Any] = {"weight_bits": None, "thermal_d_ghz": 0.0, "thermal_fluctuations": False,
                           "readout_noise": 0.0,
                           "program_noise": 0.0, "synapse_gain_cv": 0.0, "offset_std": 0.0,
                           "cv_gamma": 0.0, "cv_sigma": 0.0, "cv_q": 0.0, "drift_per_sqrt_s": 0.0}
STOCHASTIC = ("thermal_d_ghz", "readout_noise", "program_noise", "drift_per_sqrt_s")


def _measure(net: DynamicalNetwork, k: int, task: Task, overrides: dict[str, Any], seed: int,
             repeats: int, split: str) -> tuple[float, float, int]:
    """Mean metric and its standard error over ``repeats`` uploads-and-runs (one when the chip
    has no noise: the figure is then exact)."""
    from hil.chip.study import evaluate_on_backend

    cfg = device_config(net.configs[k], net.n_in, float(net.input_centre), overrides)
    noisy = any(getattr(cfg, key) not in (0, 0.0, None) for key in STOCHASTIC) and (
        cfg.thermal_fluctuations or cfg.readout_noise or cfg.program_noise or cfg.drift_per_sqrt_s)
    n = repeats if noisy else 1
    be = SimulatedDeviceBackend(cfg, seed)
    try:
        vals = [evaluate_on_backend(net, k, be, task, split)["metric"] for _ in range(n)]
    finally:
        be.close()
    sem = float(np.std(vals, ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return float(np.mean(vals)), sem, n


def gap_budget(net: DynamicalNetwork, task: Task, device: dict[str, Any] | None = None,
               repeats: int = 3, split: str = "test", trials: list[int] | None = None) -> dict[str, Any]:
    """The budget of every trial of ``net`` (or of ``trials``) on chips drawn with its seed.
    ``device``: the configured chip's settings (overrides of the defaults), whose values the
    factors take."""
    from hil.chip.study import evaluate_model

    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    device = dict(device or {})
    rows = []
    for k in range(net.K) if trials is None else trials:
        seed = net.seeds[k]
        full = dataclasses.asdict(device_config(net.configs[k], net.n_in, float(net.input_centre), device))
        model = evaluate_model(net, k, task, split)["metric"]
        # the model's own physics: its thermal floor (if any), no fluctuation
        perfect = {**device, **PERFECT, "thermal_d_ghz": float(net.configs[k].thermal_d_ghz)}
        p_mean, p_sem, _ = _measure(net, k, task, perfect, seed, repeats, split)
        parts = [{"factor": "integrator (model vs perfect chip)", "cost": model - p_mean, "sem": p_sem,
                  "settings": {}}]
        for name, keys in FACTORS.items():
            settings = {key: full[key] for key in keys}
            if all(full[key] == perfect[key] for key in keys):
                parts.append({"factor": name, "cost": 0.0, "sem": 0.0, "settings": settings})
                continue
            m, s, _ = _measure(net, k, task, {**perfect, **settings}, seed, repeats, split)
            parts.append({"factor": name, "cost": p_mean - m, "sem": math.hypot(p_sem, s),
                          "settings": settings})
        chip, chip_sem, n = _measure(net, k, task, device, seed, repeats, split)
        total = model - chip
        explained = sum(p["cost"] for p in parts)
        parts.append({"factor": "interaction (not explained by single factors)",
                      "cost": total - explained, "sem": math.hypot(chip_sem, p_sem), "settings": {}})
        rows.append({"seed": seed, "model": model, "perfect_chip": p_mean, "chip": chip,
                     "chip_sem": chip_sem, "repeats": n, "total_gap": total, "parts": parts})
    factors = [p["factor"] for p in rows[0]["parts"]]
    median = {f: float(np.median([r["parts"][i]["cost"] for r in rows])) for i, f in enumerate(factors)}
    return {"split": split, "metric": task.metric_name, "repeats": repeats, "device": device,
            "n_seeds": len(rows), "per_seed": rows, "median_cost": median,
            "median_total_gap": float(np.median([r["total_gap"] for r in rows]))}


def write_budget(budget: dict[str, Any], folder: RunFolder, name: str = "gap_budget") -> None:
    """``<name>.json``, ``<name>.csv`` (a row per seed and factor) and ``<name>.png``."""
    folder.write_json(f"{name}.json", budget)
    with open(folder.file(f"{name}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "factor", "cost_points", "sem_points"])
        for r in budget["per_seed"]:
            for p in r["parts"]:
                w.writerow([r["seed"], p["factor"], f"{100 * p['cost']:.3f}", f"{100 * p['sem']:.3f}"])
            w.writerow([r["seed"], "total", f"{100 * r['total_gap']:.3f}", f"{100 * r['chip_sem']:.3f}"])
    _plot(budget, folder.file(f"{name}.png"))


def format_budget(budget: dict[str, Any]) -> str:
    """The median budget as a table for the terminal (points of the metric)."""
    lines = [f"gap budget ({budget['metric']}, {budget['split']}, median over "
             f"{budget['n_seeds']} seed(s), points):"]
    for f, v in budget["median_cost"].items():
        lines.append(f"  {f:<48} {100 * v:+7.2f}")
    lines.append(f"  {'total (model - configured chip)':<48} {100 * budget['median_total_gap']:+7.2f}")
    return "\n".join(lines)


def _plot(budget: dict[str, Any], path: Path) -> None:
    rows = budget["per_seed"]
    factors = [p["factor"] for p in rows[0]["parts"]] + ["total"]
    costs = np.array([[100 * p["cost"] for p in r["parts"]] + [100 * r["total_gap"]] for r in rows])
    sems = np.array([[100 * p["sem"] for p in r["parts"]] + [100 * r["chip_sem"]] for r in rows])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    y = np.arange(len(factors))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.barh(y + (i - (len(rows) - 1) / 2) * width, costs[i], width, xerr=sems[i],
                label=f"seed {r['seed']}", capsize=2)
    ax.set_yticks(y, factors, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel(f"{budget['metric']} lost (points)")
    ax.set_title("model-to-chip gap, one non-ideality at a time")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
