"""Position optimisation in the field gradient (thesis 4.7, Algorithm 2, eq. 4.4).

For each chain: Optuna (TPE, seeded) proposes the stage z; at each trial the chain's voltages
for a set of inputs are measured, V_max is the least-squares scale (closed form), and the trial
scores the metric

    M = sqrt( mean_j (V_exp,j - V_max sum_i w_i P_ij)^2 ) / V_max

(eq. 4.4 read as an RMS, ERRATA: its 1/100 in front of the root makes it RMS/10; divided by
V_max here so chains of different strength compare). A first frequency sweep located against
the design model (``calibration.chain.place_chain``'s step 1) brings a chain glued ~1 mm off
within reach; Optuna then searches a narrow window. ``track`` re-optimises every N inputs of a
long run to follow drift and records M, z and V_max over time (thesis Fig. 4.8).

The inputs: ``measure`` is any callable ``(lab, inputs_mw) -> volts`` for an array of input
sets (rows: sets, columns: the chain's input frequencies); ``generator_one_hot`` is the
single-tone implementation with the precise generator (each set one tone), usable without
the multi-channel source.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from calibration.chain import ChainDesign, approach_z, measure_inputs_v

Measure = Callable[[Any, np.ndarray], np.ndarray]


def generator_one_hot(port: int, freq_hz: Sequence[float], *, n_avg: int = 4) -> Measure:
    """Inputs measured one tone at a time with the generator: a set must have one non-zero
    entry (its power in mW at that column's frequency)."""

    def measure(lab: Any, inputs_mw: np.ndarray) -> np.ndarray:
        out = []
        for row in np.atleast_2d(inputs_mw):
            (k,) = np.flatnonzero(row)
            out.append(measure_inputs_v(lab, port, [freq_hz[k]], [row[k]], n_avg=n_avg)[0])
        return np.array(out)

    return measure


def metric(v_exp: np.ndarray, inputs_mw: np.ndarray, target_w: Sequence[float],
           rescale_mw: np.ndarray | None = None) -> tuple[float, float]:
    """(M, V_max) of eq. 4.4 (module doc). ``rescale_mw``: per-input power that encodes x = 1
    (eq. 3.3), so an input's value is P / rescale."""
    x = np.atleast_2d(inputs_mw) / (1.0 if rescale_mw is None else np.asarray(rescale_mw))
    s = x @ np.asarray(target_w, float)
    v_max = float(v_exp @ s / (s @ s))
    if v_max <= 0:
        return float("inf"), v_max
    return float(np.sqrt(np.mean((v_exp - v_max * s) ** 2)) / v_max), v_max


@dataclass
class Optimisation:
    stage_z_mm: float
    v_max_v: float
    m: float
    trials: list[tuple[float, float]] = field(default_factory=list)


def optimise_z(lab: Any, design: ChainDesign, measure: Measure, inputs_mw: np.ndarray,
               rescale_mw: np.ndarray, z_lo_mm: float, z_hi_mm: float, *, n_trials: int = 25,
               seed: int = 0) -> Optimisation:
    """Algorithm 2 for one chain: Optuna over stage z in [z_lo, z_hi], V_max by least squares.

    The stage always approaches from below (``approach_z``). Returns the best trial, with the
    stage left there.
    """
    stage = lab["stage.z"]
    trials: list[tuple[float, float]] = []
    v_max_of: dict[int, float] = {}

    def objective(trial: optuna.Trial) -> float:
        z = trial.suggest_float("z_mm", z_lo_mm, z_hi_mm)
        approach_z(stage, z)
        m, v_max = metric(measure(lab, inputs_mw), inputs_mw, design.target_w, rescale_mw)
        trials.append((z, m))
        v_max_of[trial.number] = v_max
        return m if np.isfinite(m) else 1e9

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=n_trials)
    best = study.best_trial
    z_best = float(best.params["z_mm"])
    approach_z(stage, z_best)
    return Optimisation(z_best, v_max_of[best.number], float(best.value), trials)


@dataclass
class Tracking:
    """A long run: M per input, and z / V_max per (re-)optimisation (thesis Fig. 4.8)."""

    input_index: list[int] = field(default_factory=list)
    input_m: list[float] = field(default_factory=list)
    lab_time_s: list[float] = field(default_factory=list)
    optimised_at: list[int] = field(default_factory=list)
    z_mm: list[float] = field(default_factory=list)
    v_max_v: list[float] = field(default_factory=list)

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> Tracking:
        """The tracking of saved rows (``read_track_rows``, one chain, in input order)."""
        out = cls()
        for r in rows:
            if r["optimised"]:
                out.optimised_at.append(int(r["input"]))
                out.z_mm.append(float(r["z_mm"]))
                out.v_max_v.append(float(r["v_max_v"]))
            out.input_index.append(int(r["input"]))
            out.input_m.append(float(r["m"]))
            out.lab_time_s.append(float(r["lab_time_s"]))
        return out


#: one row per tracked input, appended as it is measured (``--resume`` reads them back)
TRACK_COLUMNS = ("chain", "input", "tone", "m", "lab_time_s", "z_mm", "v_max_v", "optimised", "session")


def append_track_row(path: str | Path, row: dict[str, Any]) -> None:
    """Append one input's record to the tracking CSV (header first) and flush it to disk."""
    import os

    path = Path(path)
    fresh = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if fresh:
            writer.writerow(TRACK_COLUMNS)
        writer.writerow([row["chain"]] + [repr(int(row[k])) if k in ("input", "tone", "optimised", "session")
                                          else repr(float(row[k])) for k in TRACK_COLUMNS[1:]])
        fh.flush()
        os.fsync(fh.fileno())


def read_track_rows(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Saved rows per chain, in input order; a torn last line (a killed writer) is cut off."""
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])
    out: dict[str, list[dict[str, Any]]] = {}
    with path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            try:
                row = {"chain": r["chain"], **{k: int(r[k]) for k in ("input", "tone", "session")},
                       "optimised": bool(int(r["optimised"])),
                       **{k: float(r[k]) for k in ("m", "lab_time_s", "z_mm", "v_max_v")}}
            except (TypeError, ValueError, KeyError):
                continue
            out.setdefault(row["chain"], []).append(row)
    for rows in out.values():
        rows.sort(key=lambda r: r["input"])
    return out


def track(lab: Any, design: ChainDesign, measure: Measure, calibration_inputs_mw: np.ndarray,
          run_inputs_mw: np.ndarray, rescale_mw: np.ndarray, z_start_mm: float, *, every: int = 10,
          window_mm: float = 0.015, n_trials: int = 12, seed: int = 0,
          between: Callable[[int], None] | None = None, start: int = 0,
          lab_time_offset_s: float = 0.0,
          on_input: Callable[[dict[str, Any]], None] | None = None) -> Tracking:
    """Process ``run_inputs_mw`` one set at a time, re-optimising z every ``every`` inputs in a
    window of +-``window_mm`` around the last optimum (thesis 4.7: every ten images).
    ``between(i)`` runs after input ``i`` (e.g. the rest of the network's work, or waiting).

    Resuming: ``start`` skips the inputs before it (done in an earlier session) and
    re-optimises at ``start`` whatever ``every`` says (the bench may have drifted meanwhile),
    from ``z_start_mm`` (the last optimum). ``on_input(row)`` gets each input's record as soon
    as it is measured (input, m, lab_time_s, z_mm, v_max_v, optimised); lab times are
    ``lab_time_offset_s`` + the lab clock. The returned tracking holds this session's inputs.
    """
    out = Tracking()
    z = z_start_mm
    rows = np.atleast_2d(run_inputs_mw)
    for i in range(start, len(rows)):
        row = rows[i]
        optimised = i % every == 0 or i == start
        if optimised:
            opt = optimise_z(lab, design, measure, calibration_inputs_mw, rescale_mw, z - window_mm,
                             z + window_mm, n_trials=n_trials, seed=seed + i)
            z = opt.stage_z_mm
            out.optimised_at.append(i)
            out.z_mm.append(z)
            out.v_max_v.append(opt.v_max_v)
        v = measure(lab, row[None, :])
        s = float(row / rescale_mw @ np.asarray(design.target_w))
        v_max = out.v_max_v[-1]
        out.input_index.append(i)
        out.input_m.append(float(abs(v[0] - v_max * s) / v_max))
        out.lab_time_s.append(lab_time_offset_s + float(lab.clock.now_s()))
        if on_input is not None:
            on_input({"input": i, "m": out.input_m[-1], "lab_time_s": out.lab_time_s[-1],
                      "z_mm": z, "v_max_v": v_max, "optimised": optimised})
        if between is not None:
            between(i)
    return out
