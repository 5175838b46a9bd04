"""Analysis of trained recurrent networks (seed 004, Jarne): connectivity matrices, their
eigenvalue spectra, and SVD/PCA of hidden-state trajectories (the flip-flop "cube")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hil.plots import plt
from hil.runs import save_figure as _save_figure


def eigenvalues(w: np.ndarray) -> np.ndarray:
    return np.linalg.eigvals(np.asarray(w, dtype=float))


def pca(traj: np.ndarray, n_components: int = 3) -> dict[str, np.ndarray]:
    """PCA by SVD of trajectories ``(B, T, M)`` pooled over time: projections, explained
    variance ratios and components."""
    flat = traj.reshape(-1, traj.shape[-1]).astype(float)
    centred = flat - flat.mean(0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    var = s**2 / max(1, flat.shape[0] - 1)
    ratio = var / var.sum() if var.sum() > 0 else var
    proj = centred @ vt[:n_components].T
    return {"projection": proj.reshape(traj.shape[0], traj.shape[1], -1),
            "explained": ratio[:n_components], "singular_values": s,
            "components": vt[:n_components]}


def connectivity_plot(layers: list[dict[str, Any]], path: Path) -> Path:
    """Each layer's W_int (and W_ext) as an image, and W_int's eigenvalues in the plane."""
    L = len(layers)
    fig, axes = plt.subplots(3, L, figsize=(3.6 * L, 10), squeeze=False)
    for li, lw in enumerate(layers):
        for row, key in enumerate(("W_int", "W_ext")):
            w = np.asarray(lw[key])
            lim = float(np.abs(w).max()) or 1.0
            im = axes[row][li].imshow(w, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            axes[row][li].set_title(f"layer {li} {key}")
            fig.colorbar(im, ax=axes[row][li], fraction=0.046)
        ev = eigenvalues(np.asarray(lw["W_int"]))
        ax = axes[2][li]
        ax.scatter(ev.real, ev.imag, s=12)
        r = float(np.abs(ev).max()) if ev.size else 1.0
        th = np.linspace(0, 2 * np.pi, 200)
        ax.plot(r * np.cos(th), r * np.sin(th), "k:", lw=0.8, label=f"|λ|max = {r:.3f}")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_aspect("equal")
        ax.set_title(f"layer {li} eigenvalues of W_int")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def pca_plot(traj: np.ndarray, colour: np.ndarray | None, path: Path, title: str = "") -> Path:
    """Trajectories in the space of the first three principal components."""
    res = pca(traj, 3)
    p = res["projection"]
    fig = plt.figure(figsize=(10, 4.5))
    ax = fig.add_subplot(1, 2, 1, projection="3d")
    cmap = plt.get_cmap("tab10")
    for b in range(min(p.shape[0], 20)):
        c = cmap(int(colour[b]) % 10) if colour is not None else None
        ax.plot(p[b, :, 0], p[b, :, 1], p[b, :, 2] if p.shape[2] > 2 else 0 * p[b, :, 0],
                lw=0.8, color=c)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_zlabel("PC3")
    ax.set_title(title or "hidden-state trajectories")
    ax2 = fig.add_subplot(1, 2, 2)
    s = res["singular_values"]
    ax2.semilogy(np.arange(1, len(s) + 1), s**2 / (s**2).sum(), "o-", ms=3)
    ax2.set_xlabel("component")
    ax2.set_ylabel("explained variance ratio")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def flipflop_error_budget(out: np.ndarray, x: np.ndarray, y: np.ndarray,
                          tol: float = 0.2) -> dict[str, Any]:
    """Where a flip-flop network's misses are (``out``, ``x``, ``y``: ``(B, T, bits)``).

    Every output step falls in exactly one class: the step at which the target switches
    (``switch``), the one after, the next six (``settling``), the steps before a channel's
    first switch (initial 0: quiet, or its first pulse seen and the switch pending), the steps
    after an opposite pulse before the delayed switch (``pulse seen, switch pending``), a hold
    within 8 steps of a pulse of the same sign (the pulse must be ignored), and quiet holds.
    For each: the fraction of all steps it is, its miss rate (output further than ``tol``
    from the target) and its share of the total miss rate, which sums to the overall one.
    """
    miss = np.abs(out - y) > tol
    T = y.shape[1]
    since = np.zeros(y.shape, dtype=int)
    for t in range(1, T):
        since[:, t] = np.where(y[:, t] == y[:, t - 1], since[:, t - 1] + 1, 0)
    # sign of the channel's most recent pulse point within the last 8 steps (0: none)
    sign = np.where(np.abs(x) > 0.5, np.sign(x), 0.0)
    last = np.zeros(y.shape)
    for t in range(T):
        win = sign[:, max(0, t - 8) : t + 1]
        idx = np.where(win != 0, np.arange(win.shape[1])[None, :, None], -1).max(axis=1)
        last[:, t] = np.where(idx >= 0, np.take_along_axis(win, np.maximum(idx, 0)[:, None], 1)[:, 0], 0)
    holding = y != 0
    settled = holding & (since >= 8)
    classes = {
        "switch": holding & (since == 0),
        "switch+1": holding & (since == 1),
        "settling (2-7 steps)": holding & (since >= 2) & (since < 8),
        "initial 0, quiet": ~holding & (last == 0),
        "initial 0, first pulse pending": ~holding & (last != 0),
        "pulse seen, switch pending": settled & (last != 0) & (last != y),
        "hold, same-sign pulse": settled & (last == y),
        "hold, quiet": settled & (last == 0),
    }
    total = float(miss.mean())
    rows = {}
    for name, m in classes.items():
        frac = float(m.mean())
        rate = float(miss[m].mean()) if m.any() else 0.0
        rows[name] = {"fraction_of_steps": frac, "miss_rate": rate,
                      "contribution": float((miss & m).mean())}
    return {"tolerance": tol, "miss_rate": total, "within_tol": 1.0 - total, "classes": rows}


def error_budget_plot(budget: dict[str, Any], path: Path, title: str = "") -> Path:
    """Bar chart of each class's contribution to the miss rate, with its miss rate."""
    names = list(budget["classes"])
    contrib = [budget["classes"][n]["contribution"] * 100 for n in names]
    rate = [budget["classes"][n]["miss_rate"] * 100 for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    bars = ax.barh(names[::-1], contrib[::-1], color="tab:red")
    for b, r, f in zip(bars, rate[::-1], [budget["classes"][n]["fraction_of_steps"] * 100
                                           for n in names][::-1], strict=True):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2,
                f"  {r:.1f} % missed of {f:.1f} % of steps", va="center", fontsize=8)
    ax.set_xlabel(f"share of all steps missed (%), total {budget['miss_rate'] * 100:.2f} %")
    ax.set_title(title or f"where the misses are (|output - target| > {budget['tolerance']})")
    ax.set_xlim(0, max(contrib) * 1.9 + 0.1)
    fig.tight_layout()
    _save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path
