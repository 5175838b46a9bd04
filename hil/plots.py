"""Plots written to run folders.

Figures are drawn on :class:`matplotlib.figure.Figure` objects and saved directly, without
pyplot: nothing here selects or switches matplotlib's backend, so importing or calling hil in a
notebook leaves its inline plots alone, and no figure is kept in pyplot's global registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hil.runs import save_figure


class _Figures:
    """The part of ``matplotlib.pyplot`` the plotting code uses, without pyplot's global state
    (``plt.subplots``, ``plt.figure``, ``plt.close``, ``plt.get_cmap``)."""

    @staticmethod
    def figure(figsize: tuple[float, float] | None = None, **kwargs: Any) -> Any:
        from matplotlib.figure import Figure

        return Figure(figsize=figsize, **kwargs)

    def subplots(self, nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None,
                 **kwargs: Any) -> tuple[Any, Any]:
        fig_kw = {k: kwargs.pop(k) for k in ("dpi", "layout", "constrained_layout") if k in kwargs}
        fig = self.figure(figsize=figsize, **fig_kw)
        return fig, fig.subplots(nrows, ncols, **kwargs)

    @staticmethod
    def close(fig: Any = None) -> None:
        """Nothing to release: these figures are not registered anywhere."""

    @staticmethod
    def get_cmap(name: str) -> Any:
        import matplotlib

        return matplotlib.colormaps[name]


#: drop-in for ``matplotlib.pyplot`` in this package's plotting code
plt = _Figures()


def accuracy_curves(history: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """Train and test (and validation) metric per epoch for every seed, median in bold."""
    seeds = sorted({r["seed"] for r in history})
    splits = [s for s in ("train", "val", "test") if f"{s}_{metric}" in history[0]]
    fig, axes = plt.subplots(1, len(splits), figsize=(4.5 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        key = f"{split}_{metric}"
        curves = []
        for s in seeds:
            rows = [r for r in history if r["seed"] == s]
            ep = [r["epoch"] for r in rows]
            v = [100 * r[key] for r in rows]
            curves.append(v)
            ax.plot(ep, v, lw=0.8, alpha=0.5)
        n = min(len(c) for c in curves)
        ax.plot(range(n), np.median([c[:n] for c in curves], axis=0), "k", lw=2, label="median")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{split} {metric} (%)")
        ax.set_title(split)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def trajectories(xseq: np.ndarray, labels: np.ndarray, n_layers: int, n_hidden: int,
                 dt_ns: float, path: Path, neuron: int = 1) -> Path:
    """One neuron per layer for a few inputs, as paper Fig. 1(b-d). ``xseq``: (B, T, M)."""
    fig, axes = plt.subplots(1, n_layers, figsize=(4.2 * n_layers, 3.2), squeeze=False)
    t = (np.arange(xseq.shape[1]) + 1) * dt_ns
    for li in range(n_layers):
        ax = axes[0][li]
        for b in range(xseq.shape[0]):
            ax.plot(t, xseq[b, :, li * n_hidden + neuron], lw=1.2, label=f"label {labels[b]}")
        ax.set_title(f"layer {li}, neuron {neuron}")
        ax.set_xlabel("time (ns)")
        ax.set_ylabel("x (normalised power)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
