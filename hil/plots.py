"""Plots written to run folders.

Figures are drawn on :class:`matplotlib.figure.Figure` objects and saved directly, without
pyplot: nothing here selects or switches matplotlib's backend, so importing or calling hil in a
notebook leaves its inline plots alone, and no figure is kept in pyplot's global registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hil.runs import save_figure

if TYPE_CHECKING:
    from calibration.position import Tracking


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


def device_time_curves(curves: dict[str, list[dict[str, Any]]], metric: str, path: Path,
                       reference: float | None = None, title: str = "") -> Path:
    """Test metric versus the training device time, one colour per estimator (label): each
    seed's points thin, the median over seeds (on a common time grid) bold; ``reference``, e.g.
    the ideal model's median, as a dashed line, with the band 1 point below it. Left: the total
    device time (calibration included); right: the time spent after each seed's first point
    (what the estimator itself spent), on a log scale, so cheap estimators are told apart."""
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.2))
    cmap = plt.get_cmap("tab10")
    key = f"test_{metric}"
    for ax, relative in zip(axes, (False, True), strict=True):
        for i, (label, pts) in enumerate(curves.items()):
            color = cmap(i % 10)
            series = []
            for s in sorted({p["seed"] for p in pts}):
                rows = sorted((p for p in pts if p["seed"] == s),
                              key=lambda p: (p["train_device_time_s"], p.get("update", 0)))
                t = np.array([p["train_device_time_s"] for p in rows])
                v = np.array([100 * p[key] for p in rows])
                if relative:
                    t, v = t[1:] - t[0], v[1:]
                    keep = t > 0
                    t, v = t[keep], v[keep]
                if len(t):
                    series.append((t, v))
                    ax.plot(t, v, color=color, lw=0.6, alpha=0.35, marker="." if relative else None, ms=2)
            if not series:
                continue
            lo, hi = max(t[0] for t, _ in series), min(t[-1] for t, _ in series)
            if hi > lo:
                grid = np.geomspace(lo, hi, 60) if relative else np.linspace(lo, hi, 60)
                med = np.median([np.interp(grid, t, v) for t, v in series], axis=0)
                ax.plot(grid, med, color=color, lw=2, label=label)
            else:
                ax.plot([t[-1] for t, _ in series], [v[-1] for _, v in series], "o", color=color,
                        label=label)
        if reference is not None:
            ax.axhline(100 * reference, color="k", ls="--", lw=1, label="ideal model (median)")
            ax.axhspan(100 * reference - 1, 100 * reference, color="k", alpha=0.08, lw=0)
        if relative:
            ax.set_xscale("log")
            ax.set_xlabel("device time spent after the start (s, per chip)")
        else:
            ax.set_xlabel("training device time per chip, calibration included (s)")
        ax.set_ylabel(f"test {metric} on the chip (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a single point per seed leaves the right panel empty
            ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path

def chain_design(designs: list[Any], path: Path, resonance_hz: Any = None) -> Any:
    """One panel per chain (Algorithm 1's design): each synapse's two diodes along the field
    gradient, z in um from the field zero. The reference-sign diode (at z - dz/2) is a red
    triangle up, the other (z + dz/2) a blue triangle down, joined by a line; a cross marks
    the synapse centre at its input frequency. ``resonance_hz``: z (um) -> the reference
    diode's resonance (Hz), drawn as a curve with every diode on it at the frequency it
    resonates at; without it the diodes sit at their synapse's input frequency. ``designs``:
    objects with ``name``, ``z_um``, ``dz_um``, ``freq_hz``, ``target_w`` (``ChainDesign``).
    Returns the figure (saved to ``path``)."""
    n = len(designs)
    fig, axes = plt.subplots(n, 1, figsize=(9.0, 3.0 * n + 0.4), squeeze=False)
    for ax, d in zip(axes[:, 0], designs, strict=True):
        z = np.asarray(d.z_um, float)
        dz = np.asarray(d.dz_um, float)
        f = np.asarray(d.freq_hz, float)
        plus, minus = z - dz / 2, z + dz / 2
        if resonance_hz is not None:
            span = max(float(np.abs(dz).max()), 20.0)
            zz = np.linspace(min(plus.min(), minus.min()) - span, max(plus.max(), minus.max()) + span, 300)
            ax.plot(zz, np.asarray(resonance_hz(zz), float) / 1e9, color="0.6", lw=1,
                    label="reference diode resonance f_r(z)")
            f_plus = np.asarray(resonance_hz(plus), float)
            f_minus = np.asarray(resonance_hz(minus), float)
        else:
            f_plus = f_minus = f
        for j in range(len(z)):
            ax.plot([plus[j], minus[j]], [f_plus[j] / 1e9, f_minus[j] / 1e9], color="0.3", lw=0.8)
            ax.annotate(f"s{j}: {f[j] / 1e9:.3g} GHz\ndz {dz[j]:+.0f} um, w {d.target_w[j]:+.3f}",
                        (z[j], f[j] / 1e9), textcoords="offset points", xytext=(6, -22), fontsize=7)
            for zd, fd in ((plus[j], f_plus[j]), (minus[j], f_minus[j])):
                ax.annotate(f"{fd / 1e9:.3f}", (zd, fd / 1e9), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=6, color="0.35")
        ax.plot(plus, f_plus / 1e9, "^", color="tab:red", ms=7, label="diode, reference sign (z - dz/2)")
        ax.plot(minus, f_minus / 1e9, "v", color="tab:blue", ms=7, label="diode, opposite sign (z + dz/2)")
        ax.plot(z, f / 1e9, "x", color="k", ms=7, label="synapse centre at its input frequency")
        ax.set(xlabel="z along the gradient, from the field zero (um)", ylabel="frequency (GHz)",
               title=f"{d.name}: {len(z)} synapses")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return fig


def chain_weights(rows: list[dict[str, Any]], path: Path) -> Any:
    """Measured vs target weights, one panel per chain, with the identity line; each point is
    annotated with its error |dw| in % of w = 1 (thesis table 3.1), the title with the mean.
    ``rows``: dicts with ``name``, ``target_w``, ``measured_w`` (and ``v_max_v``). Returns the
    figure (saved to ``path``)."""
    n = len(rows)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        t = np.asarray(r["target_w"], float)
        e = np.asarray(r["measured_w"], float)
        dw = 100 * np.abs(e - t)
        lim = 1.15 * float(max(np.abs(t).max(), np.abs(e).max(), 1e-6))
        ax.plot([-lim, lim], [-lim, lim], "k--", lw=1, label="measured = target")
        ax.plot(t, e, "o", color="tab:blue", label="synapses")
        for i, (x, y, d) in enumerate(zip(t, e, dw, strict=True)):
            ax.annotate(f"w{i}: {d:.2f} %", (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
        vmax = f", V_max {1e6 * r['v_max_v']:.2f} uV" if r.get("v_max_v") is not None else ""
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xlabel="target weight",
               ylabel="measured weight", title=f"{r['name']}: mean |dw| {dw.mean():.2f} % of w = 1{vmax}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return fig


def source_calibration(cal: Any, path: Path) -> Any:
    """The source calibration per channel (thesis Fig. 4.5a-b): top row f(V_tuning), measured
    points and the interpolation used to invert it, the operating frequency marked; bottom
    row P(V_amplifier) in mW before the switches, measured points and the cubic fit over its
    fitted range. ``cal``: a ``calibration.source.SourceCalibration``. Returns the figure."""
    channels = sorted(cal.channels)
    n = len(channels)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 7.0), squeeze=False)
    for col, ch in enumerate(channels):
        c = cal.channels[ch]
        a, b = axes[0, col], axes[1, col]
        v, f = np.asarray(c.tuning_v, float), np.asarray(c.freq_hz, float)
        a.plot(v, f / 1e9, "o", ms=4, label="measured")
        ff = np.linspace(f[0], f[-1], 300)
        a.plot([cal.tuning_for(ch, x) for x in ff], ff / 1e9, "-", label="interpolation (PCHIP)")
        v_op = cal.tuning_for(ch, c.operating_freq_hz)
        a.plot([v_op], [c.operating_freq_hz / 1e9], "s", color="tab:red",
               label=f"operating {c.operating_freq_hz / 1e9:.3f} GHz at {v_op:.2f} V")
        a.set(xlabel="tuning voltage (V)", ylabel="frequency (GHz)", title=f"channel {ch}: f(V)")
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
        va = np.asarray(c.amplifier_v, float)
        p_mw = 10 ** (np.asarray(c.power_dbm, float) / 10)
        b.plot(va, p_mw, "o", ms=4, label="measured")
        if c.poly_mw:
            vv = np.linspace(c.fit_lo_v, c.fit_hi_v, 200)
            b.plot(vv, np.polyval(c.poly_mw, vv), "-",
                   label=f"cubic fit {c.fit_lo_v:.1f}-{c.fit_hi_v:.1f} V")
        b.set(xlabel="amplifier voltage (V)", ylabel="power before the switches (mW)",
              title=f"channel {ch}: P(V) at {c.operating_freq_hz / 1e9:.3f} GHz")
        b.legend(fontsize=7)
        b.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return fig


def position_tracking(tracks: dict[str, Tracking], path: str | Path) -> Path:
    """Thesis Fig. 4.8, Algorithm 2 following drift over a long run: three panels sharing the
    input axis, one line per chain in each. Top: the metric M per input (``input_index``,
    ``input_m``) with a dashed grey line at each re-optimisation; middle: the optimal stage z
    relative to the chain's first optimum, in um; bottom: V_max in uV at each optimisation.
    ``tracks``: chain name -> ``calibration.position.Tracking``. Returns ``path``."""
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for name, t in tracks.items():
        a.plot(t.input_index, t.input_m, ".-", label=name)
        b.plot(t.optimised_at, 1e3 * (np.array(t.z_mm) - t.z_mm[0]), "o-", label=name)
        c.plot(t.optimised_at, 1e6 * np.array(t.v_max_v), "o-", label=name)
        for i in t.optimised_at:
            a.axvline(i, ls="--", lw=0.5, color="gray")
    a.set(ylabel="|V - V_max w.x| / V_max", title="metric per input (optimisations dashed)")
    b.set(ylabel="optimal z - first (um)")
    c.set(ylabel="V_max (uV)", xlabel="input")
    a.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
