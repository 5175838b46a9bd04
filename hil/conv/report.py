"""Report for the hybrid convolutional network (thesis ch. 4.9, Figs. 4.9 and 4.10).

A layer of K 2x2 kernels is computed in hardware (spin-diode chains read with a
nanovoltmeter), the rest of the network in software. This module compares the hardware
MAC outputs with the ideal software ones, draws the confusion matrices and convolved
maps, the lab time per image, and writes a small markdown summary.

Array conventions: MAC outputs are (N_images, K_kernels, H, W); the background mask is
boolean (N_images, H, W), true where the 2x2 input patch is all zero.
matplotlib is imported inside the plotting functions only; figures are drawn without pyplot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hil.config import flatten
from hil.runs import atomic_write as _atomic_write
from hil.runs import save_figure as _save_figure

_PANEL = "abcdefghijklmnopqrstuvwxyz"
_REFERENCE_PLAN = "Algorithm 3 as written"


def _pyplot() -> Any:
    """Figures without pyplot (no backend switch), see :mod:`hil.plots`."""
    from hil.plots import plt

    return plt


def _save(fig: Any, path: str | Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(fig, path, dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _check_mac(mac_hw: Any, mac_sw: Any, background: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and return (hw, sw, mask broadcast to (N, K, H, W))."""
    hw = np.asarray(mac_hw, dtype=float)
    sw = np.asarray(mac_sw, dtype=float)
    if hw.ndim != 4:
        raise ValueError(f"mac_hw must have shape (N_images, K_kernels, H, W); got shape {hw.shape}")
    if sw.shape != hw.shape:
        raise ValueError(f"mac_hw and mac_sw must have the same shape; got {hw.shape} and {sw.shape}")
    bg = np.asarray(background)
    if bg.dtype.kind not in "biu" or (bg.dtype.kind != "b" and not np.isin(bg, (0, 1)).all()):
        raise ValueError(f"background mask must be boolean (or 0/1 integers); got dtype {bg.dtype}")
    n, _, h, w = hw.shape
    if bg.shape != (n, h, w):
        raise ValueError(
            f"background mask must have shape (N_images, H, W) = {(n, h, w)} to match MAC shape "
            f"{hw.shape}; got {bg.shape}"
        )
    if not (np.isfinite(hw).all() and np.isfinite(sw).all()):
        raise ValueError("mac_hw and mac_sw must be finite (no NaN or inf)")
    mask = np.broadcast_to(bg.astype(bool)[:, None, :, :], hw.shape)
    return hw, sw, mask


def _group_stats(hw: np.ndarray, sw: np.ndarray, core: bool) -> dict[str, Any]:
    """count, mean/std/RMS of hw - sw; for core also relative RMS and least-squares fit hw = a sw + b."""
    err = hw - sw
    out: dict[str, Any] = {"count": int(err.size), "mean": None, "std": None, "rms": None}
    if core:
        out.update(rel_rms=None, slope=None, intercept=None)
    if err.size == 0:
        return out
    rms = float(np.sqrt(np.mean(err**2)))
    out.update(mean=float(err.mean()), std=float(err.std()), rms=rms)
    if core:
        sw_rms = float(np.sqrt(np.mean(sw**2)))
        out["rel_rms"] = rms / sw_rms if sw_rms > 0 else None
        var = float(np.mean((sw - sw.mean()) ** 2))
        if var > 0:
            slope = float(np.mean((sw - sw.mean()) * (hw - hw.mean())) / var)
            out["slope"] = slope
            out["intercept"] = float(hw.mean() - slope * sw.mean())
    return out


def mac_error_stats(mac_hw: np.ndarray, mac_sw: np.ndarray, patch_is_background: np.ndarray) -> dict:
    """Error statistics of hardware vs software MAC, per kernel and over all kernels.

    Returns ``{"kernel0": {"background": {...}, "core": {...}}, ..., "all": {...}}``. Each group
    holds ``count``, ``mean``, ``std`` (population) and ``rms`` of the error hw - sw; core groups
    also hold ``rel_rms`` (RMS error / RMS of the software core values) and the least-squares
    ``slope`` and ``intercept`` of hw = slope * sw + intercept. Statistics that are undefined
    (empty group, constant software values) are ``None``. All values are plain Python numbers.
    """
    hw, sw, mask = _check_mac(mac_hw, mac_sw, patch_is_background)
    out: dict[str, Any] = {}
    for k in range(hw.shape[1]):
        m = mask[:, k]
        out[f"kernel{k}"] = {
            "background": _group_stats(hw[:, k][m], sw[:, k][m], core=False),
            "core": _group_stats(hw[:, k][~m], sw[:, k][~m], core=True),
        }
    out["all"] = {
        "background": _group_stats(hw[mask], sw[mask], core=False),
        "core": _group_stats(hw[~mask], sw[~mask], core=True),
    }
    return out


def _kernel_names(kernel_names: list[str] | None, k: int) -> list[str]:
    if kernel_names is None:
        return [f"kernel {i}" for i in range(k)]
    names = [str(s) for s in kernel_names]
    if len(names) != k:
        raise ValueError(f"kernel_names has {len(names)} entries but the MAC arrays have {k} kernels")
    return names


def _kernel_colours(k: int) -> list[tuple[Any, Any]]:
    """(dark, light) colour pair per kernel from the tab20 colormap."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [(cmap((2 * i) % 20), cmap((2 * i + 1) % 20)) for i in range(k)]


def plot_mac_comparison(
    mac_hw: np.ndarray,
    mac_sw: np.ndarray,
    background: np.ndarray,
    path: str | Path,
    kernel_names: list[str] | None = None,
) -> Path:
    """Thesis Fig. 4.9: (a) hw vs sw MAC, (b) error vs sw MAC, (c..) error histograms per kernel.

    Histograms overlay the background error (light colour: voltmeter noise only) and the core
    error (dark colour: weight errors) of each kernel on the same bins.
    """
    hw, sw, mask = _check_mac(mac_hw, mac_sw, background)
    k = hw.shape[1]
    names = _kernel_names(kernel_names, k)
    colours = _kernel_colours(k)
    err = hw - sw
    plt = _pyplot()
    fig = plt.figure(figsize=(max(9.0, 3.4 * k), 7.6))
    gs = fig.add_gridspec(2, 2 * k)
    ax_a = fig.add_subplot(gs[0, :k])
    ax_b = fig.add_subplot(gs[0, k:])
    for i in range(k):
        dark = colours[i][0]
        ax_a.scatter(sw[:, i].ravel(), hw[:, i].ravel(), s=3, alpha=0.6, color=dark, label=names[i],
                     rasterized=True, linewidths=0)
        ax_b.scatter(sw[:, i].ravel(), err[:, i].ravel(), s=3, alpha=0.6, color=dark, label=names[i],
                     rasterized=True, linewidths=0)
    lo = float(min(sw.min(), hw.min()))
    hi = float(max(sw.max(), hw.max()))
    ax_a.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax_a.set_xlabel("software MAC")
    ax_a.set_ylabel("hardware MAC")
    ax_a.set_title("a) hardware vs software MAC")
    ax_a.legend(loc="upper left", fontsize=8, markerscale=3)
    ax_b.axhline(0.0, color="k", lw=1, ls="--")
    ax_b.set_xlabel("software MAC")
    ax_b.set_ylabel("error (hw - sw)")
    ax_b.set_title("b) error vs software MAC")
    ax_b.legend(loc="best", fontsize=8, markerscale=3)
    for ax in (ax_a, ax_b):
        ax.grid(alpha=0.3)
    for i in range(k):
        ax = fig.add_subplot(gs[1, 2 * i:2 * i + 2])
        e = err[:, i]
        m = mask[:, i]
        bins = np.histogram_bin_edges(e, bins=50)
        dark, light = colours[i]
        for sel, colour, label in ((m, light, "background"), (~m, dark, "core")):
            vals = e[sel]
            mean = f"{vals.mean():.3g}" if vals.size else "n/a"
            ax.hist(vals, bins=bins, color=colour, alpha=0.85, label=f"{label}: n={vals.size}, mean={mean}")
        ax.axvline(0.0, color="k", lw=0.8, ls="--")
        ax.set_xlabel("error (hw - sw)")
        ax.set_ylabel("count")
        ax.set_title(f"{_PANEL[(i + 2) % 26]}) {names[i]}")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


def _cell_text(v: float, integer: bool) -> str:
    return f"{int(round(v))}" if integer else f"{v:.1f}"


def plot_confusions(
    matrices: dict[str, np.ndarray],
    path: str | Path,
    class_names: list[str],
    accuracies: dict[str, float] | None = None,
) -> Path:
    """Side-by-side confusion matrices (thesis Fig. 4.10 a-b), rows = true label, columns = predicted.

    Cells show counts (one decimal when a matrix is not integer-valued, e.g. averaged over noise
    draws). Accuracies <= 1 are read as fractions and shown as percentages.
    """
    if not matrices:
        raise ValueError("matrices is empty: give at least one confusion matrix")
    c = len(class_names)
    mats = {}
    for name, mat in matrices.items():
        a = np.asarray(mat, dtype=float)
        if a.shape != (c, c):
            raise ValueError(
                f"confusion matrix {name!r} has shape {a.shape}; expected {(c, c)} for {c} classes"
            )
        mats[name] = a
    plt = _pyplot()
    side = max(3.6, 0.42 * c + 1.6)
    fig, axes = plt.subplots(1, len(mats), figsize=(side * len(mats), side + 0.4), squeeze=False)
    for j, (ax, (name, a)) in enumerate(zip(axes[0], mats.items(), strict=True)):
        ax.imshow(a, cmap="Blues", vmin=0.0, vmax=max(float(a.max()), 1e-12))
        integer = bool(np.allclose(a, np.round(a)))
        half = 0.5 * float(a.max())
        for r in range(c):
            for q in range(c):
                ax.text(q, r, _cell_text(a[r, q], integer), ha="center", va="center", fontsize=7,
                        color="white" if a[r, q] > half else "black")
        ax.set_xticks(range(c), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(c), class_names, fontsize=8)
        ax.set_xlabel("predicted label")
        ax.set_ylabel("true label")
        title = f"{_PANEL[j % 26]}) {name}"
        if accuracies is not None and name in accuracies:
            acc = float(accuracies[name])
            title += f" (acc {100 * acc if acc <= 1 else acc:.1f}%)"
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_convolved(image: np.ndarray, maps_sw: np.ndarray, maps_hw: np.ndarray, path: str | Path) -> Path:
    """Thesis Fig. 4.10 c-e for one image: input image, then per kernel sw map, hw map, hw - sw.

    ``image`` is (H_in, W_in); ``maps_sw`` and ``maps_hw`` are (K, H, W). Software and hardware
    maps of a row share one colour scale; the difference uses a diverging scale centred on zero.
    """
    img = np.asarray(image, dtype=float)
    sw = np.asarray(maps_sw, dtype=float)
    hw = np.asarray(maps_hw, dtype=float)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D (H_in, W_in); got shape {img.shape}")
    if sw.ndim != 3:
        raise ValueError(f"maps_sw must have shape (K_kernels, H, W); got shape {sw.shape}")
    if hw.shape != sw.shape:
        raise ValueError(f"maps_hw and maps_sw must have the same shape; got {hw.shape} and {sw.shape}")
    k = sw.shape[0]
    plt = _pyplot()
    fig = plt.figure(figsize=(13.0, 2.8 * k + 0.6))
    gs = fig.add_gridspec(k, 4)
    ax = fig.add_subplot(gs[:, 0])
    im = ax.imshow(img, cmap="gray")
    ax.set_title("input image")
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    diff = hw - sw
    for i in range(k):
        lo = float(min(sw[i].min(), hw[i].min()))
        hi = float(max(sw[i].max(), hw[i].max()))
        if hi <= lo:
            hi = lo + 1e-12
        for col, (data, label) in enumerate(((sw[i], "software"), (hw[i], "hardware")), start=1):
            ax = fig.add_subplot(gs[i, col])
            im = ax.imshow(data, cmap="viridis", vmin=lo, vmax=hi)
            ax.set_title(f"kernel {i}: {label}", fontsize=10)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        lim = float(np.abs(diff[i]).max()) or 1e-12
        ax = fig.add_subplot(gs[i, 3])
        im = ax.imshow(diff[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"kernel {i}: hw - sw", fontsize=10)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path)


def plot_lab_time(
    plans: dict[str, dict[str, float]],
    path: str | Path,
    title: str = "Lab time per image",
) -> Path:
    """One horizontal stacked bar per plan: seconds per image split by category.

    The total is written at the end of each bar, with the ratio to the reference plan: the plan
    named "Algorithm 3 as written" if present, else the first plan when there are exactly two.
    A minutes axis is added on top when a total exceeds 600 s.
    """
    if not plans:
        raise ValueError("plans is empty: give at least one plan")
    categories: list[str] = []
    for name, parts in plans.items():
        for cat, sec in parts.items():
            if not np.isfinite(sec) or sec < 0:
                raise ValueError(f"plan {name!r}: time for {cat!r} must be finite and >= 0; got {sec}")
            if cat not in categories:
                categories.append(cat)
    names = list(plans)
    totals = {n: float(sum(plans[n].values())) for n in names}
    if _REFERENCE_PLAN in plans:
        ref: str | None = _REFERENCE_PLAN
    elif len(names) == 2:
        ref = names[0]
    else:
        ref = None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10.0, 1.2 + 0.75 * len(names)))
    cmap = plt.get_cmap("tab10")
    y = np.arange(len(names))
    left = np.zeros(len(names))
    for c, cat in enumerate(categories):
        width = np.array([float(plans[n].get(cat, 0.0)) for n in names])
        ax.barh(y, width, left=left, color=cmap(c % 10), label=cat, height=0.6)
        left += width
    top = max(totals.values())
    for j, n in enumerate(names):
        text = f"{totals[n]:.1f} s"
        if totals[n] >= 60:
            text += f" ({totals[n] / 60:.1f} min)"
        if ref is not None and n == ref:
            text += "  [reference]"
        elif ref is not None and totals[ref] > 0:
            text += f"  = {totals[n] / totals[ref]:.3g}x {ref}"
        ax.text(totals[n] + 0.01 * max(top, 1e-12), j, text, va="center", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.6 * top if top > 0 else 1.0)
    ax.set_xlabel("lab time per image (s)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if top > 600:
        sec = ax.secondary_xaxis("top", functions=(lambda s: s / 60.0, lambda m: m * 60.0))
        sec.set_xlabel("minutes per image")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool | np.generic)


def _fmt(v: Any, cell: bool = True) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ") if cell else str(v)



def _table(d: dict) -> list[str]:
    """Markdown table: wide for a dict of dicts of scalars, key/value otherwise (nested keys dotted)."""
    if d and all(isinstance(v, dict) and v and all(_is_scalar(x) for x in v.values()) for v in d.values()):
        cols: list[str] = []
        for v in d.values():
            cols += [c for c in v if c not in cols]
        lines = ["| | " + " | ".join(_fmt(c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for k, v in d.items():
            lines.append(f"| {_fmt(k)} | " + " | ".join(_fmt(v.get(c, "")) for c in cols) + " |")
        return lines
    lines = ["| key | value |", "|---|---|"]
    lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in flatten(d).items()]
    return lines


def write_report_markdown(
    path: str | Path, sections: dict[str, str | dict | list], title: str = "Report"
) -> Path:
    """Write a markdown report: ``# title``, then ``## name`` per section in the given order.

    A string is written as is, a dict as a table (see ``_table``), a list as bullets, anything
    else as ``str(value)``. A directory ``path`` gets ``report.md`` inside it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "report.md"
    lines = [f"# {title}", ""]
    for name, body in sections.items():
        lines += [f"## {name}", ""]
        if isinstance(body, dict):
            lines += _table(body)
        elif isinstance(body, list | tuple):
            lines += [f"- {_fmt(x, cell=False)}" for x in body]
        else:
            lines.append(str(body).rstrip("\n"))
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, "\n".join(lines))
    return path


# --------------------------------------------------------------------------- the deploy report

#: two-sided 95 % normal quantile
_Z95 = 1.959963984540054
_PLAN_TITLES = {"planned": "measurement plan", "algorithm3": "Algorithm 3 as written"}


def wilson_interval(p: float, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval (95 % by default) of a proportion ``p`` observed on ``n`` trials,
    as fractions. ``p`` may be a mean of per-trial probabilities (noisy software: the mean
    over its passes); the interval then counts the images as the trials."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a fraction in [0, 1], got {p}")
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def accuracy_rows(accuracies: dict[str, tuple[float, int]]) -> dict[str, dict[str, Any]]:
    """``{name: (accuracy fraction, images)}`` -> a table in percent with the 95 % Wilson
    interval of each (:func:`wilson_interval`)."""
    out = {}
    for name, (acc, n) in accuracies.items():
        lo, hi = wilson_interval(float(acc), int(n))
        out[name] = {"accuracy (%)": f"{100 * float(acc):.1f}",
                     "95 % CI (%)": f"{100 * lo:.1f} - {100 * hi:.1f}", "images": int(n)}
    return out


def effective_weights(mac_hw: np.ndarray, patches: np.ndarray, measured: np.ndarray | None = None
                      ) -> np.ndarray | None:
    """The weights each hardware kernel acted with: least squares of its MAC outputs
    (N, K, H, W) on the input patches (N, H, W, n_inputs), over the measured patches (all when
    ``measured`` is None). (K, n_inputs), or None when the patches do not determine them."""
    hw = np.asarray(mac_hw, float)
    p = np.asarray(patches, float)
    sel = np.ones(p.shape[:3], bool) if measured is None else np.asarray(measured, bool)
    a = p[sel]                                             # (M, n_inputs)
    if a.shape[0] < a.shape[1] or np.linalg.matrix_rank(a) < a.shape[1]:
        return None
    b = hw.transpose(0, 2, 3, 1)[sel]                      # (M, K)
    return np.linalg.lstsq(a, b, rcond=None)[0].T


def weight_error_rows(targets: dict[str, list[float]], weights: dict[str, list[float]]
                      ) -> dict[str, dict[str, Any]]:
    """Per chain: mean and largest |w - target| in % of w = 1 (thesis table 3.1) and in % of
    the chain's largest |target|; plus an ``all`` row over every synapse."""
    out: dict[str, dict[str, Any]] = {}
    every, every_rel = [], []
    for name, t in targets.items():
        if name not in weights:
            continue
        t_arr, w_arr = np.asarray(t, float), np.asarray(weights[name], float)
        dw = np.abs(w_arr - t_arr)
        rel = dw / max(float(np.abs(t_arr).max()), 1e-12)
        every += dw.tolist()
        every_rel += rel.tolist()
        out[name] = {"mean |dw| (% of w=1)": round(100 * float(dw.mean()), 2),
                     "max |dw| (% of w=1)": round(100 * float(dw.max()), 2),
                     "mean |dw| (% of max |w|)": round(100 * float(rel.mean()), 2),
                     "weights": "[" + ", ".join(f"{x:+.4f}" for x in w_arr) + "]",
                     "targets": "[" + ", ".join(f"{x:+.4f}" for x in t_arr) + "]"}
    if every:
        out["all"] = {"mean |dw| (% of w=1)": round(100 * float(np.mean(every)), 2),
                      "max |dw| (% of w=1)": round(100 * float(np.max(every)), 2),
                      "mean |dw| (% of max |w|)": round(100 * float(np.mean(every_rel)), 2),
                      "weights": "", "targets": ""}
    return out


def _reference_map_lab_time_s(path: Path) -> float | None:
    """The lab time of a reference map measured in the run (its ``lab_time_s`` column)."""
    import csv

    if not path.exists():
        return None
    with path.open(newline="") as fh:
        times = [float(r["lab_time_s"]) for r in csv.DictReader(fh) if r.get("lab_time_s")]
    return max(times) if times else None


def _hours(s: float) -> str:
    return f"{s:.0f} s ({s / 3600:.2f} h)"


def lab_time_sections(results: dict[str, Any], reference_map_s: float | None = None
                      ) -> dict[str, Any]:
    """The total lab time and its breakdown: the reference map (a separate session), the
    calibration and placement before inference, each plan; then each plan by operation kind."""
    plans = results["plans"]
    total_plans = {k: float(v["lab_s_per_image"]) * int(v["images"]) for k, v in plans.items()}
    session = float(results.get("lab_time_total_s", sum(total_plans.values())))
    parts: dict[str, float] = {}
    if reference_map_s is not None:
        parts["reference map (its own session)"] = reference_map_s
    parts["source calibration, settling, placement"] = max(0.0, session - sum(total_plans.values()))
    for k, s in total_plans.items():
        parts[f"inference, {_PLAN_TITLES.get(k, k)} ({plans[k]['images']} image(s))"] = s
    total = sum(parts.values())
    table = {name: {"lab time (s)": f"{s:.0f}", "lab time (h)": f"{s / 3600:.3f}",
                    "share (%)": f"{100 * s / total:.1f}" if total > 0 else None}
             for name, s in parts.items()}
    table["total"] = {"lab time (s)": f"{total:.0f}", "lab time (h)": f"{total / 3600:.3f}",
                      "share (%)": "100.0"}
    out: dict[str, Any] = {f"Lab time: {_hours(total)} in total": table}
    for k, v in plans.items():
        n = int(v["images"])
        kinds = dict(sorted(v["time_s_per_image"].items(), key=lambda kv: -kv[1]))
        plan_total = sum(kinds.values()) * n
        out[f"Lab time by operation kind, {_PLAN_TITLES.get(k, k)} ({n} image(s), "
            f"{_hours(plan_total)})"] = {
            kind: {"total (s)": f"{s * n:.1f}", "per image (s)": f"{s:.2f}",
                   "share (%)": f"{100 * s * n / plan_total:.1f}" if plan_total > 0 else None}
            for kind, s in kinds.items()}
    return out


def deploy_report(run_dir: str | Path, images: np.ndarray | None = None) -> Path:
    """``report.md`` of a ``hil conv deploy`` run folder, from its files: accuracies in
    percent with 95 % Wilson intervals, the settings, the total lab time and its breakdown
    (by phase, then by operation kind per plan), clipped inputs, chain weight errors (the
    design's, and the hardware's effective weights when ``images``, the first test images
    (N, H, W), are given), MAC errors and instrument operations."""
    import yaml

    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    plans = results["plans"]
    sw = results["software"]
    n = int(results["n_images"])
    acc = {"software": (sw["accuracy"], n),
           f"software, noisy (n_l {sw.get('noise', 'n/a')}, {sw.get('noisy_repeats', 'n/a')} passes "
           "per image)": (sw["noisy_accuracy"], n)}
    for k, p in plans.items():
        acc[f"hardware, {_PLAN_TITLES.get(k, k)}"] = (p["accuracy"], p["images"])
        if p["images"] != n:
            acc[f"software on the same {p['images']} image(s)"] = (p["software_accuracy_same_images"],
                                                                p["images"])
    sections: dict[str, Any] = {
        "Accuracy on the first test images (95 % Wilson score intervals over the images)":
            accuracy_rows(acc)}
    ref_s = _reference_map_lab_time_s(run_dir / "reference_map.csv") \
        if not (config.get("deploy") or {}).get("map_csv") else None
    sections.update(lab_time_sections(results, ref_s))
    sections["Clipped inputs (set to the nearest power the source can make)"] = {
        _PLAN_TITLES.get(k, k): {"clipped inputs": int(p.get("clipped_inputs", 0)),
                                 "per image": round(p.get("clipped_inputs", 0) / p["images"], 2)}
        for k, p in plans.items()}
    design_path = run_dir / "chain_design.json"
    if design_path.exists():
        chains = json.loads(design_path.read_text())["chains"]
        targets = {c["name"]: c["target_w"] for c in chains}
        sections["Chain weight errors of the design (Algorithm 1's predicted vs target weights)"] = \
            weight_error_rows(targets, {c["name"]: c["predicted_w"] for c in chains})
        if images is not None:
            from calibration.mac import patches_2x2

            for k, p in plans.items():
                npz = run_dir / f"mac_{k}.npz"
                if not npz.exists():
                    continue
                data = np.load(npz)
                count = int(p["images"])
                w = effective_weights(data["mac_hw"], patches_2x2(np.asarray(images)[:count]),
                                      data["measured"])
                if w is not None:
                    sections[f"Chain weight errors in hardware, {_PLAN_TITLES.get(k, k)} (effective "
                             "weights: least squares of the measured MAC on the input patches)"] = \
                        weight_error_rows(targets, {name: w[i].tolist()
                                                    for i, name in enumerate(targets) if i < len(w)})
    sections["MAC error on image cores (RMS of hardware - software, relative to the software RMS)"] = {
        _PLAN_TITLES.get(k, k): {name: round(st["core"]["rel_rms"], 3)
                                 for name, st in v["mac_stats"].items() if st["core"]["rel_rms"] is not None}
        for k, v in plans.items() if "mac_stats" in v}
    keep = ("supply commands", "stage moves", "switch changes", "voltmeter readings", "rf gate changes")
    sections["Instrument operations per image"] = {
        _PLAN_TITLES.get(k, k): {o: round(c, 1) for o, c in v["ops_per_image"].items()
                                 if o.split(" (")[0] in keep}
        for k, v in plans.items()}
    if "speedup" in results:
        sections["Measurement plan vs Algorithm 3 as written"] = {k: round(v, 2)
                                                                  for k, v in results["speedup"].items()}
    settings = {"model": config.get("model", results.get("model")),
                "dataset": config.get("dataset", results.get("dataset")),
                **{f"deploy.{k}": v for k, v in (config.get("deploy") or {}).items()},
                "software noise n_l": sw.get("noise"),
                "source settling tau (s)": (results.get("source") or {}).get("tau_s")}
    sections["Settings"] = settings
    sections["Files"] = ["results.json", "config.yaml", "confusion.png", "lab_time.png", "mac_<plan>.png",
                         "convolved_<plan>.png", "positions_<plan>.png", "mac_<plan>.npz",
                         "chain_design.json", "metrics.jsonl"]
    return write_report_markdown(run_dir / "report.md", sections,
                                 title="Hybrid convolutional network on spin-diode chains")
