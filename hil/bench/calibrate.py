"""The calibration jobs: the procedures behind ``hil calibrate reference|field``, ``hil chain
design|measure``, ``hil position optimise`` and ``hil source calibrate``.

Each job takes plain typed arguments (a lab config path, plans and settings, the loaded design
and reference map) and a run folder, writes its files there (results, ``lab_time.json``,
figures) and returns a small result the command prints from; progress messages of long
measurements go to ``log`` as they happen. Arguments are checked by the caller before a run
folder or an instrument is opened. The reference sweep and the position optimisation resume
from their state files (``--resume``) when the settings are those they were started with.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hil.bench.lab import REFERENCE_SAMPLE, load_lab_config, load_reference_map, open_lab
from hil.errors import HilError
from hil.runs import RunFolder, save_figure

#: where a job's progress messages go (``print`` on the command line)
Log = Callable[[str], Any]

#: What a sweep was started with (checked on --resume) and the lab time it has used so far.
SWEEP_STATE = "sweep_state.json"
#: What a position optimisation was started with, each chain's optimum, and the lab time so far.
POSITION_STATE = "position_state.json"
#: The tracked inputs, one row each, appended as they are measured.
TRACKING_CSV = "tracking.csv"


def open_calibration_lab(lab_path: str | Path, overrides: dict[str, Any] | None,
                         record_to: Path | None) -> Any:
    """Open the lab of ``lab_path`` (instrument exchanges logged to ``record_to``, a run folder,
    unless None); ``overrides`` (virtual labs only) change its world, e.g. the reference sample
    or fabricated chains."""
    cfg = load_lab_config(lab_path)
    world = None
    if overrides:
        if cfg.virtual is None:
            raise HilError(f"{lab_path}: --reference-sample/--fabricate need a virtual lab")
        from sims.virtual_lab import World
        from sims.virtual_lab.config import deep_merge

        world = World.from_file(cfg.virtual.world, seed=cfg.virtual.seed,
                                overrides=deep_merge(dict(cfg.virtual.overrides), overrides))
    return open_lab(cfg, world=world, record_to=record_to)


def record_lab_time(run: RunFolder, command: str, lab_time_s: float, sessions: int = 1,
                    note: str = "") -> dict[str, Any]:
    """Record the lab time a command used in ``lab_time.json`` of its run folder; the record."""
    record = {"command": command, "lab_time_s": float(lab_time_s), "sessions": sessions,
              **({"note": note} if note else {})}
    run.write_json("lab_time.json", record)
    return record


def _progress(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="pt", dynamic_ncols=True)


# --------------------------------------------------------------------------- resumable state


def new_sweep(run: RunFolder, settings: dict[str, Any]) -> dict[str, Any]:
    """A fresh reference-sweep state (no lab time, no session), written to ``sweep_state.json``."""
    state = {"settings": settings, "lab_time_s": 0.0, "sessions": 0}
    run.write_json(SWEEP_STATE, state)
    return state


def check_resume(run: RunFolder, settings: dict[str, Any], state_file: str = SWEEP_STATE,
                 kind: str = "a reference sweep folder", noun: str = "sweep",
                 whole: str = "map") -> dict[str, Any]:
    """The stored state, if ``settings`` are those the sweep was started with; else stop."""
    path = run.file(state_file)
    if not path.exists():
        raise HilError(f"--resume {run.path}: no {state_file} (not {kind}?)")
    state = json.loads(path.read_text())
    stored = json.loads(json.dumps(state["settings"]))
    now = json.loads(json.dumps(settings))  # the same JSON types as the stored ones
    differ = [f"{key}: {_short(stored.get(key))} in the {noun}, {_short(now.get(key))} now"
              for key in sorted(set(stored) | set(now)) if stored.get(key) != now.get(key)]
    if differ:
        raise HilError(f"--resume {run.path}: settings differ from the {noun}'s, refusing to mix "
                       f"them in one {whole}: " + "; ".join(differ))
    return state


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _sha256(path: str | Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise HilError(f"{path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class ReferenceResult:
    """What a reference sweep session measured; ``fit``/``rescaling`` only once the map is
    complete."""

    lab_time: dict[str, Any]
    new_points: int
    saved_points: int
    total_points: int
    complete: bool
    fit: Any = None
    rescaling: dict[str, float] | None = None


def reference_sweep_settings(lab_path: str | Path, plan: Any, reference_sample: bool) -> dict[str, Any]:
    """Every measurement setting of a reference sweep (a ``calibration.reference.SweepPlan``),
    and the lab config's identity: what ``--resume`` must find unchanged."""
    return {"devices": plan.devices, "stage_z_mm": plan.stage_z_mm, "freq_hz": plan.freq_hz,
            "power_dbm": plan.power_dbm, "source_port": plan.source_port, "nplc": plan.nplc,
            "direction": plan.direction, "gradient_oe_per_mm": plan.gradient_oe_per_mm,
            "gamma_hz_per_oe": plan.gamma_hz_per_oe, "reference_sample": reference_sample,
            "lab_config_sha256": load_lab_config(lab_path).identity_hash()}


def reference_map_job(lab_path: str | Path, plan: Any, run: RunFolder, *, settings: dict[str, Any],
                      resume: bool = False, reference_sample: bool = False, record: bool = True,
                      max_points: int | None = None, field_calibration: Any = None,
                      field_calibration_path: str | Path | None = None,
                      device_offset_mm: float | None = None) -> ReferenceResult:
    """Measure (or, ``resume``, continue) the reference map ``V_ref(f, z)`` of ``plan`` into
    ``reference_map.csv``; once complete, fit Kittel (with the measured gradient of
    ``field_calibration``, when given) and the power rescaling: ``reference_fit.json`` and
    ``reference_map.png``. ``settings`` (:func:`reference_sweep_settings`) go to
    ``sweep_state.json``, with the lab time summed over the sessions."""
    from calibration.reference import measure_reference_map
    from hil.locks import BenchLock

    csv_path = run.file("reference_map.csv")
    total = len(plan.stage_z_mm) * len(plan.freq_hz) * len(plan.devices)
    with BenchLock(run.file(".lock"), f"run folder {run.path}"):
        state = check_resume(run, settings) if resume else new_sweep(run, settings)
        with open_calibration_lab(lab_path, REFERENCE_SAMPLE if reference_sample else None,
                                  run.path if record else None) as lab:
            bar = _progress(total)
            start_s = float(lab.clock.now_s())
            try:
                new = measure_reference_map(lab, plan, csv_path,
                                            progress=lambda i, n: bar.update(i - bar.n),
                                            max_points=max_points,
                                            lab_time_offset_s=float(state["lab_time_s"]))
            finally:
                bar.close()
                state["lab_time_s"] += float(lab.clock.now_s()) - start_s
                state["sessions"] += 1
                run.write_json(SWEEP_STATE, state)
    lab_time = record_lab_time(run, "calibrate reference", state["lab_time_s"], state["sessions"])
    m = load_reference_map(csv_path)
    saved = int(np.isfinite(m.device_grid_v).sum())
    if not m.complete:
        return ReferenceResult(lab_time, new, saved, total, False)
    if field_calibration is not None:
        fc = field_calibration
        m.use_field_calibration(fc.gradient_oe_per_mm, fc.gradient_sigma_oe_per_mm,
                                probe_stage_z0_mm=fc.stage_z0_mm, device_offset_mm=device_offset_mm,
                                source=f"field probe ({Path(field_calibration_path).resolve()})")
    fit = m.fit_kittel(gamma_hz_per_oe=plan.gamma_hz_per_oe)
    rescale = m.fit_power_rescaling()
    summary = {"kittel": fit.__dict__, "resonance_hz": m.resonance_hz().tolist(),
               "field_oe": m.field_oe().tolist(), "stage_z_mm": m.stage_z_mm.tolist(),
               "power_rescaling": rescale, "lab_time_s": state["lab_time_s"],
               "sessions": state["sessions"]}
    run.write_json("reference_fit.json", summary)
    plot_reference(m, run.file("reference_map.png"))
    return ReferenceResult(lab_time, new, saved, total, True, fit, rescale)


def plot_reference(m: Any, path: Path) -> None:
    """The map (mean reference diode over frequency and field) and its resonances with the
    fitted Kittel law."""
    from calibration.reference import kittel_hz
    from hil.plots import plt  # figures without pyplot: no backend switch

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    field = m.field_oe()
    order = np.argsort(field)
    mesh = a.pcolormesh(m.freq_hz / 1e9, field[order], 1e6 * m.v_ref[order], shading="nearest",
                        cmap="RdBu_r")
    fig.colorbar(mesh, ax=a, label="V_ref (uV)")
    a.set(xlabel="frequency (GHz)", ylabel="field (Oe)", title="reference diode (mean)")
    fr = m.resonance_hz()
    b.plot(field, fr / 1e9, "o")
    h = np.linspace(field.min(), field.max(), 200)
    b.plot(h, kittel_hz(h, m.kittel.meff_oe, m.gamma_hz_per_oe) / 1e9, "-")
    b.set(xlabel="field (Oe)", ylabel="resonance (GHz)", title=f"Kittel M_eff {m.kittel.meff_oe:.0f} Oe")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- chains


@dataclass(frozen=True)
class ReferenceModel:
    """A complete reference map with its Kittel fit, interpolated ``V_ref(z, f)``, the power
    rescaling of eq. 3.3 (``rescale(f)``) and that fit's coefficients."""

    map: Any
    v_ref: Any
    rescale: Callable[[np.ndarray], np.ndarray]
    rescaling: dict[str, float]


def load_reference_model(map_csv: str | Path) -> ReferenceModel:
    """The model the chain commands design and place with; an incomplete map is refused."""
    from calibration.reference import rescaled_power

    m = load_reference_map(map_csv)
    if not m.complete:
        raise HilError(f"{map_csv}: the map is incomplete; resume hil calibrate reference first")
    m.fit_kittel()
    fit = m.fit_power_rescaling()

    def rescale(f: np.ndarray) -> np.ndarray:
        return rescaled_power(f, fit, 1.0)

    return ReferenceModel(m, m.interpolator(), rescale, fit)


def design_chain_set(model: ReferenceModel, freq_hz: Sequence[float],
                     weights: Mapping[str, Sequence[float]], dz_max_um: float) -> list[Any]:
    """Algorithm 1 for each chain of ``weights`` (inputs at ``freq_hz``), each synapse's
    diode at the map's resonance position; ``V_range`` is the rescaled peak of a 70 um synapse
    shared by the N synapses (thesis 3.5.2). ValueError when no design fits ``dz_max_um``."""
    from calibration.chain import design_chains

    z_um = 1e3 * model.map.z_for_resonance_mm(np.asarray(freq_hz, float))
    fit = model.rescaling
    v_range = (fit["slope_v_per_hz"] * 3.1e9 + fit["intercept_v"]) / len(freq_hz)
    return design_chains(model.v_ref, model.rescale, z_um, freq_hz, weights, v_range_v=v_range,
                         dz_max_um=dz_max_um)


@dataclass(frozen=True)
class ChainDesignResult:
    """Algorithm 1's chain designs, the file they are saved in, their figure, the lab time."""

    designs: list[Any]
    design_file: Path
    figure: Path
    lab_time: dict[str, Any]


def chain_design_job(model: ReferenceModel, designs: list[Any], map_csv: str | Path,
                     run: RunFolder) -> ChainDesignResult:
    """Write ``designs`` (of :func:`design_chain_set`) as ``chain_design.json`` with the map
    they came from, draw ``chain_design.png``; no lab time (no instrument is used)."""
    from calibration.chain import write_design

    path = write_design(run.file("chain_design.json"), designs,
                        {"reference_map": str(Path(map_csv).resolve()),
                         "power_rescaling": model.rescaling})
    figure = plot_design(model.map, designs, run.file("chain_design.png"))
    lab_time = record_lab_time(run, "chain design", 0.0, 0,
                               "a computation on the reference map: no instrument used")
    return ChainDesignResult(designs, path, figure, lab_time)


def plot_design(m: Any, designs: list[Any], path: Path) -> Path:
    """The design drawing, with the map's Kittel law giving each diode's resonance."""
    from calibration.reference import kittel_hz
    from hil.plots import chain_design

    def resonance_hz(z_um: np.ndarray) -> np.ndarray:
        field = np.abs(np.asarray(z_um, float)) * 1e-3 * m.gradient_oe_per_mm
        return kittel_hz(field, m.kittel.meff_oe, m.gamma_hz_per_oe)

    chain_design(designs, path, resonance_hz)
    return path


@dataclass(frozen=True)
class ChainMeasureSettings:
    """How the chains are placed and measured: base power P0 of eq. 3.3, stage z of the first
    sweep, the voltmeter's integration, readings per input, and (virtual lab) fabrication."""

    p0_mw: float = 30.0
    stage_ref_mm: float = 20.0
    nplc: float = 1.0
    n_avg: int = 32
    fabricate: bool = False


@dataclass(frozen=True)
class ChainMeasureResult:
    """Each chain's measured weights against its design (rows and the printed table), the mean
    absolute weight error per chain in percent, the figure and the lab time."""

    rows: list[dict[str, Any]]
    table: str
    mean_abs_dw_pct: dict[str, float]
    figure: Path | None
    lab_time: dict[str, Any]


def chain_measure_job(lab_path: str | Path, designs: list[Any], model: ReferenceModel,
                      ports: Mapping[str, int], run: RunFolder, settings: ChainMeasureSettings, *,
                      record: bool = True, log: Log = print) -> ChainMeasureResult:
    """Place each designed chain of ``ports`` (name -> output-switch port) and measure its
    weights: ``weights.json``, ``table_3_1.txt``, one metrics row per chain and
    ``chain_weights.png``."""
    from calibration.chain import (
        error_table,
        extract_weights,
        measure_inputs_v,
        place_chain,
        virtual_lab_overrides,
    )

    s = settings
    overrides = virtual_lab_overrides(designs) if s.fabricate else None
    rows = []
    with open_calibration_lab(lab_path, overrides, run.path if record else None) as lab:
        start_s = float(lab.clock.now_s())
        lab["voltmeter"].configure_voltage(nplc=s.nplc)
        for d in (d for d in designs if d.name in ports):
            placed = place_chain(lab, ports[d.name], d, model.v_ref, model.rescale, s.p0_mw,
                                 stage_ref_mm=s.stage_ref_mm, progress=log)
            v = measure_inputs_v(lab, ports[d.name], d.freq_hz,
                                 s.p0_mw * model.rescale(np.asarray(d.freq_hz)), n_avg=s.n_avg)
            w, v_max = extract_weights(v, d.target_w)
            row = {"name": d.name, "target_w": d.target_w, "measured_w": w.tolist(),
                   "v_max_v": v_max, "dz_um": d.dz_um, "v_inputs_v": v.tolist(),
                   "stage_z_mm": placed["stage_z_mm"]}
            rows.append(row)
            run.append_metrics(row)
        lab_time_s = float(lab.clock.now_s()) - start_s
    text, means = error_table(rows)
    run.write_json("weights.json", {"chains": rows, "mean_abs_dw_pct": means,
                                    "lab_time_s": lab_time_s})
    run.write_text("table_3_1.txt", text + "\n")
    figure = None
    if rows:
        from hil.plots import chain_weights

        figure = run.file("chain_weights.png")
        chain_weights(rows, figure)
    lab_time = record_lab_time(run, "chain measure", lab_time_s)
    return ChainMeasureResult(rows, text, means, figure, lab_time)


# --------------------------------------------------------------------------- position


@dataclass(frozen=True)
class PositionSettings:
    """Every option of a position optimisation (in the order ``position_state.json`` keeps
    them): placement as :class:`ChainMeasureSettings`, the Optuna window and trials, the
    seed of the tracked one-hot inputs, and the tracking (inputs, re-optimisation period, lab
    time per input, trials of each re-optimisation)."""

    p0_mw: float = 30.0
    stage_ref_mm: float = 20.0
    nplc: float = 1.0
    fabricate: bool = False
    window_mm: float = 0.04
    trials: int = 25
    n_avg: int = 4
    seed: int = 0
    track_inputs: int = 0
    every: int = 10
    wait_s: float = 360.0
    reopt_trials: int = 12


@dataclass(frozen=True)
class PositionResult:
    """Each chain's optimum position in the field gradient (Algorithm 2), the figure and the lab
    time."""

    chains: dict[str, Any]
    figure: Path | None
    lab_time: dict[str, Any]


def position_state_settings(lab_path: str | Path, design_json: str | Path, map_csv: str | Path,
                            ports: Mapping[str, int], settings: PositionSettings) -> dict[str, Any]:
    """Every setting of a position optimisation (checked on --resume): the design and map by
    content, the bench by the lab config's identity."""
    return {"design_sha256": _sha256(design_json), "map_sha256": _sha256(map_csv),
            "ports": dict(ports), **asdict(settings),
            "lab_config_sha256": load_lab_config(lab_path).identity_hash()}


def position_job(lab_path: str | Path, designs: list[Any], model: ReferenceModel,
                 ports: Mapping[str, int], run: RunFolder, settings: PositionSettings, *,
                 state_settings: dict[str, Any], resume: bool = False, record: bool = True,
                 log: Log = print) -> PositionResult:
    """Algorithm 2 per chain, then (``track_inputs``) a long run re-optimised every N inputs.

    Resumable: each chain's optimum goes to ``position_state.json`` when found and each tracked
    input to ``tracking.csv`` when measured; ``resume`` (same ``state_settings``, of
    :func:`position_state_settings`) skips the chains already optimised and continues each
    track after its last saved input, re-optimising there first. The lab time adds up over the
    sessions. Writes ``positions.json`` and ``position_tracking.png``.
    """
    from calibration.chain import place_chain, virtual_lab_overrides
    from calibration.position import (
        Tracking,
        append_track_row,
        generator_one_hot,
        optimise_z,
        read_track_rows,
        track,
    )
    from hil.locks import BenchLock
    from hil.plots import position_tracking

    s = settings
    overrides = virtual_lab_overrides(designs) if s.fabricate else None
    chosen = [d for d in designs if d.name in ports]
    rng = np.random.default_rng(s.seed)  # the run's one-hot inputs, drawn chain by chain
    tones = {d.name: rng.integers(0, len(d.freq_hz), s.track_inputs) for d in chosen} \
        if s.track_inputs else {}
    csv_path = run.file(TRACKING_CSV)
    with BenchLock(run.file(".lock"), f"run folder {run.path}"):
        if resume:
            state = check_resume(run, state_settings, POSITION_STATE, "a position optimisation folder",
                                 "run", "run")
        else:
            state = {"settings": state_settings, "lab_time_s": 0.0, "sessions": 0, "chains": {}}
            run.write_json(POSITION_STATE, state)
        before_s, session = float(state["lab_time_s"]), int(state["sessions"]) + 1
        saved = read_track_rows(csv_path)
        with open_calibration_lab(lab_path, overrides, run.path if record else None) as lab:
            start_s = float(lab.clock.now_s())

            def save_state() -> None:
                state["lab_time_s"] = before_s + float(lab.clock.now_s()) - start_s
                state["sessions"] = session
                run.write_json(POSITION_STATE, state)

            try:
                lab["voltmeter"].configure_voltage(nplc=s.nplc)
                for d in chosen:
                    p_x1 = s.p0_mw * model.rescale(np.asarray(d.freq_hz))  # x = 1 (eq. 3.3)
                    inputs = np.diag(p_x1)
                    measure = generator_one_hot(ports[d.name], d.freq_hz, n_avg=s.n_avg)
                    if d.name not in state["chains"]:
                        placed = place_chain(lab, ports[d.name], d, model.v_ref, model.rescale, s.p0_mw,
                                             stage_ref_mm=s.stage_ref_mm, fine_span_mm=0.0,
                                             progress=log)
                        z0 = placed["stage_z_mm"]
                        opt = optimise_z(lab, d, measure, inputs, p_x1, z0 - s.window_mm,
                                         z0 + s.window_mm, n_trials=s.trials, seed=s.seed)
                        log(f"{d.name}: stage z {opt.stage_z_mm:.4f} mm, V_max "
                            f"{opt.v_max_v * 1e6:.3f} uV, M {opt.m:.4f}")
                        state["chains"][d.name] = {"stage_z_mm": opt.stage_z_mm, "v_max_v": opt.v_max_v,
                                                   "m": opt.m, "trials": opt.trials,
                                                   "profile_stage_z_mm": z0, "session": session}
                        run.append_metrics({"chain": d.name, **state["chains"][d.name]})
                        save_state()
                    have = saved.setdefault(d.name, [])
                    if len(have) >= s.track_inputs:
                        continue
                    if have:
                        log(f"{d.name}: resuming the track at input {len(have)} of {s.track_inputs}")
                    run_inputs = np.zeros((s.track_inputs, len(d.freq_hz)))
                    run_inputs[np.arange(s.track_inputs), tones[d.name]] = 1.0

                    def keep(row: dict[str, Any], name: str = d.name, have: list = have) -> None:
                        full = {"chain": name, "tone": int(tones[name][row["input"]]), "session": session,
                                **row}
                        append_track_row(csv_path, full)
                        have.append(full)

                    track(lab, d, measure, inputs, run_inputs * p_x1, p_x1,
                          have[-1]["z_mm"] if have else state["chains"][d.name]["stage_z_mm"],
                          every=s.every, n_trials=s.reopt_trials,
                          between=lambda i: lab.sleep(s.wait_s), seed=s.seed, start=len(have),
                          lab_time_offset_s=before_s - start_s, on_input=keep)
            finally:
                save_state()
    tracks = {name: Tracking.from_rows(rows) for name, rows in saved.items() if rows}
    run.write_json("positions.json", {"chains": state["chains"],
                                      "tracking": {k: v.__dict__ for k, v in tracks.items()},
                                      "run_inputs_tone": {k: v.tolist() for k, v in tones.items()},
                                      "lab_time_s": state["lab_time_s"], "sessions": state["sessions"]})
    figure = position_tracking(tracks, run.file("position_tracking.png")) if tracks else None
    lab_time = record_lab_time(run, "position optimise", state["lab_time_s"], state["sessions"])
    return PositionResult(state["chains"], figure, lab_time)


# --------------------------------------------------------------------------- source


@dataclass(frozen=True)
class CalibrationResult:
    """A fitted calibration (RF source, field probe), the file it is saved in, its figure and
    the lab time the measurement took."""

    calibration: Any
    calibration_file: Path
    figure: Path
    lab_time: dict[str, Any]


def source_job(lab_path: str | Path, channels: Mapping[int, float], run: RunFolder, *,
               amplifier_role: str = "vco_amp", record: bool = True, log: Log = print) -> CalibrationResult:
    """Calibrate the multi-channel source (thesis 4.5.2) at each channel's operating frequency
    (``channels``: channel -> Hz): ``source_calibration.json`` and ``source_calibration.png``."""
    from calibration.source import SourceWiring, calibrate_source
    from hil.plots import source_calibration

    with open_calibration_lab(lab_path, None, run.path if record else None) as lab:
        start_s = float(lab.clock.now_s())
        cal = calibrate_source(lab, dict(channels), SourceWiring(amplifier_role=amplifier_role),
                               progress=log)
        lab_time_s = float(lab.clock.now_s()) - start_s
    path = cal.save(run.file("source_calibration.json"))
    figure = run.file("source_calibration.png")
    source_calibration(cal, figure)
    lab_time = record_lab_time(run, "source calibrate", lab_time_s)
    return CalibrationResult(cal, path, figure, lab_time)


# --------------------------------------------------------------------------- field probe


def field_job(lab_path: str | Path, plan: Any, run: RunFolder, *, accuracy_frac: float,
              zero_uncertainty_oe: float, record: bool = True) -> CalibrationResult:
    """Hall-probe scan through the gradient (a checked ``calibration.field.FieldScanPlan``):
    the gradient and the field zero, measured; ``field_profile.csv``,
    ``field_calibration.json`` and ``field_profile.png``."""
    from calibration.field import calibrate_field

    with open_calibration_lab(lab_path, None, run.path if record else None) as lab:
        start_s = float(lab.clock.now_s())
        cal = calibrate_field(lab, plan, run.file("field_profile.csv"), accuracy_frac=accuracy_frac,
                              zero_uncertainty_oe=zero_uncertainty_oe)
        cal.lab_time_s = float(lab.clock.now_s()) - start_s
    path = cal.save(run.file("field_calibration.json"))
    figure = run.file("field_profile.png")
    plot_field(cal, figure)
    lab_time = record_lab_time(run, "calibrate field", cal.lab_time_s)
    return CalibrationResult(cal, path, figure, lab_time)


def plot_field(cal: Any, path: Path) -> None:
    """The probe's field over stage z with the linear gradient through the field zero, and
    what is left beyond it."""
    from hil.plots import plt

    z = np.array([p["stage_z_mm"] for p in cal.points])
    h = np.array([p["field_oe"] for p in cal.points])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(z, h, "o", label="probe")
    zz = np.linspace(z.min(), z.max(), 200)
    a.plot(zz, cal.slope_oe_per_mm * (zz - cal.stage_z0_mm), "-",
           label=f"{cal.slope_oe_per_mm:.2f} Oe/mm through z0")
    a.axvline(cal.stage_z0_mm, color="0.6", lw=0.8)
    a.set(xlabel="stage z (mm)", ylabel="field (Oe)", title="field at the Hall probe")
    a.legend()
    b.plot(z, h - cal.slope_oe_per_mm * (z - cal.stage_z0_mm), "o")
    b.set(xlabel="stage z (mm)", ylabel="field - linear (Oe)",
          title="beyond the linear gradient")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
