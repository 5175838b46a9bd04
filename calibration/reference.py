"""Reference-diode map (thesis 3.5.1): V_ref(f, z) measured through the drivers, resumable.

The sweep measures several reference devices (two diodes of the same sign in parallel, ~50 Ohm,
thesis Fig. 3.7c) over frequency (1-5 GHz) and stage z (a field of about +-250 Oe in the
~140 Oe/mm gradient). Every point is appended to a CSV file as soon as it is measured (one
row: device, stage z, frequency, power, voltage, lab time) next to a JSON sidecar with units
and metadata, so a killed sweep resumes where it stopped without re-measuring saved points.

From the saved points, ``ReferenceMap`` averages the devices (divided by the two diodes in
parallel, thesis 3.5.1), interpolates V_ref(f, z), finds the resonance frequency at each z, fits
eq. 2.9 (Kittel) for the effective magnetisation and the field zero, and fits the power
rescaling of eq. 3.3 from the map (thesis Fig. 3.8) instead of hard-coding it.

What the Kittel fit can and cannot tell (issue 21, item 4): the map sees the field only as
``gradient x (z0 - stage z)``, and at the map's fields (|H| <= ~250 Oe << M_eff ~ 10 kOe) eq. 2.9
is f^2 = gamma^2 (H^2 + H M_eff) ~ gamma^2 H M_eff: the map constrains mostly gamma^2 M_eff
(times the gradient), hardly gamma and M_eff apart (the H^2 term is ~2 % of f^2 at 250 Oe).
So the gradient is taken from a measurement when there is one (``use_field_calibration``: the
Hall-probe scan of ``calibration.field``), M_eff is reported for a *stated* gamma with its
uncertainty (fit and gradient), together with how it moves with gamma (dM_eff/dgamma, M_eff at
2.8 and 2.9 MHz/Oe, ~ M_eff gamma^-2) and a fit with gamma free that shows the degeneracy.

Coordinates: ``stage_z_mm`` is what the z stage reads; ``z_mm`` is the device's position in the
gradient relative to the field zero, ``z_mm = direction * (stage_z_mm - stage_z0_mm)``, where
``direction`` is the bench frame (-1 when the stage moves the magnet array, as in
``lab_configs/virtual.yaml``); the field is then ``gradient_oe_per_mm * z_mm``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import curve_fit

CSV_COLUMNS = ("device", "stage_z_mm", "freq_hz", "power_dbm", "voltage_v", "offset_v", "lab_time_s")
UNITS = {"device": "switch port label", "stage_z_mm": "mm", "freq_hz": "Hz", "power_dbm": "dBm",
         "voltage_v": "V (RF on minus RF off)", "offset_v": "V (RF off)",
         "lab_time_s": "s (since the sweep started, summed over resumed sessions)"}
#: gamma/2pi of Permalloy (documented default, ERRATA "not given"), the gradient (thesis 2.6.2)
GAMMA_HZ_PER_OE = 2.9e6
GRADIENT_OE_PER_MM = 140.0


@dataclass
class SweepPlan:
    """What to measure: devices (name -> output-switch port), the grid, the RF level."""

    devices: dict[str, int]
    stage_z_mm: Sequence[float]
    freq_hz: Sequence[float]
    power_dbm: float = 16.0
    source_port: int | None = 2          # source selector port of the precise generator
    nplc: float = 1.0
    n_off: int = 2                       # RF-off readings per (device, z) for the offset
    diodes_per_device: int = 2           # thesis 3.5.1: divide by the diodes in parallel
    direction: float = -1.0              # z_mm = direction * (stage_z_mm - stage_z0_mm)
    gradient_oe_per_mm: float = GRADIENT_OE_PER_MM
    gamma_hz_per_oe: float = GAMMA_HZ_PER_OE
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {"format": "hil reference map v1", "columns": list(CSV_COLUMNS), "units": UNITS,
                "devices": self.devices, "stage_z_mm": [float(z) for z in self.stage_z_mm],
                "freq_hz": [float(f) for f in self.freq_hz], "power_dbm": self.power_dbm,
                "source_port": self.source_port, "nplc": self.nplc, "n_off": self.n_off,
                "diodes_per_device": self.diodes_per_device, "direction": self.direction,
                "gradient_oe_per_mm": self.gradient_oe_per_mm,
                "gamma_hz_per_oe": self.gamma_hz_per_oe, **self.extra}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> SweepPlan:
        known = {"devices", "stage_z_mm", "freq_hz", "power_dbm", "source_port", "nplc", "n_off",
                 "diodes_per_device", "direction", "gradient_oe_per_mm", "gamma_hz_per_oe"}
        extra = {k: v for k, v in meta.items() if k not in known | {"format", "columns", "units"}}
        return cls(**{k: meta[k] for k in known if k in meta}, extra=extra)


def sidecar_path(csv_path: Path) -> Path:
    return csv_path.with_suffix(".json")


def read_points(csv_path: Path) -> list[dict[str, Any]]:
    """Saved rows (a torn last line from a killed writer is ignored)."""
    if not csv_path.exists():
        return []
    rows = []
    with csv_path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                rows.append({"device": row["device"],
                             **{k: float(row[k]) for k in CSV_COLUMNS if k != "device"}})
            except (TypeError, ValueError):
                continue
    return rows


def _drop_torn_line(csv_path: Path) -> None:
    """A writer killed mid-line leaves a last line without its newline: cut it off."""
    if not csv_path.exists():
        return
    data = csv_path.read_bytes()
    if data and not data.endswith(b"\n"):
        csv_path.write_bytes(data[:data.rfind(b"\n") + 1])


def _key(device: str, stage_z_mm: float, freq_hz: float) -> tuple[str, int, int]:
    return device, round(stage_z_mm * 1e6), round(freq_hz)  # nm and Hz resolution


def measure_reference_map(lab: Any, plan: SweepPlan, csv_path: str | Path, *,
                          progress: Callable[[int, int], None] | None = None,
                          max_points: int | None = None, lab_time_offset_s: float = 0.0) -> int:
    """Measure (or resume) the map into ``csv_path``; returns the number of new points.

    ``lab`` gives drivers by role (``rf_source``, ``voltmeter``, ``switch``, ``stage.z``,
    optionally ``source_switch``) and ``sleep``. Stage z moves in increasing order only
    (no backlash reversal). RF is off on every exit path. ``max_points`` stops after that many
    new points (for interrupted-sweep tests and dry runs). The ``lab_time_s`` column is the
    sweep's lab time: ``lab_time_offset_s`` (what earlier sessions of a resumed sweep used)
    plus the time since this session started, so it keeps rising across resumes.
    """
    csv_path = Path(csv_path)
    meta_path = sidecar_path(csv_path)
    meta = plan.metadata()
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        for key in ("devices", "stage_z_mm", "freq_hz", "power_dbm", "direction"):
            if old.get(key) != meta[key]:
                raise ValueError(f"{csv_path} was measured with another {key} ({old.get(key)!r}); "
                                 "use a new file or the same plan to resume")
    else:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(meta, indent=2))
    _drop_torn_line(csv_path)
    done = {_key(r["device"], r["stage_z_mm"], r["freq_hz"]) for r in read_points(csv_path)}
    zs = sorted(float(z) for z in plan.stage_z_mm)
    total = len(zs) * len(plan.devices) * len(plan.freq_hz)
    rf, nvm, switch, stage = lab["rf_source"], lab["voltmeter"], lab["switch"], lab["stage.z"]
    new = 0
    session_start_s = float(lab.clock.now_s())
    fresh = not csv_path.exists() or csv_path.stat().st_size == 0
    try:
        rf.output_off()
        nvm.configure_voltage(nplc=plan.nplc)
        if plan.source_port is not None:
            lab["source_switch"].port = plan.source_port
        if "NOT REFERENCED" in stage.status():
            stage.home()
        with csv_path.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if fresh:
                writer.writerow(CSV_COLUMNS)
            for z in zs:
                todo = {d: [f for f in plan.freq_hz if _key(d, z, f) not in done]
                        for d in plan.devices}
                if not any(todo.values()):
                    continue
                stage.move_abs_mm(z)
                for device, port in plan.devices.items():
                    if not todo[device]:
                        continue
                    switch.port = port
                    rf.output_off()
                    offset_v = float(np.mean([nvm.read_voltage_v() for _ in range(plan.n_off)]))
                    rf.apply(float(todo[device][0]), plan.power_dbm)
                    rf.output_on()
                    for f in todo[device]:
                        if max_points is not None and new >= max_points:
                            return new
                        rf.freq_hz = float(f)
                        v = nvm.read_voltage_v() - offset_v
                        writer.writerow([device, repr(z), repr(float(f)), repr(plan.power_dbm),
                                         repr(v), repr(offset_v),
                                         repr(lab_time_offset_s + float(lab.clock.now_s())
                                              - session_start_s)])
                        fh.flush()
                        new += 1
                        if progress is not None:
                            progress(len(done) + new, total)
                    rf.output_off()
    finally:
        rf.output_off()
    return new


# --------------------------------------------------------------------------- the model


def kittel_hz(field_oe: np.ndarray | float, meff_oe: float, gamma_hz_per_oe: float) -> np.ndarray:
    """eq. 2.9: f = gamma/2pi sqrt(H (H + M_eff)), H the in-plane field magnitude."""
    h = np.abs(np.asarray(field_oe, float))
    return gamma_hz_per_oe * np.sqrt(h * (h + meff_oe))


def resonance_from_curve(freq_hz: np.ndarray, v: np.ndarray) -> float | None:
    """Resonance of an antisymmetric line (eq. 2.11): the zero crossing between its two lobes."""
    lo, hi = int(np.argmin(v)), int(np.argmax(v))
    if min(lo, hi) == 0 or max(lo, hi) == len(v) - 1 or v[hi] <= 0 or v[lo] >= 0:
        return None
    a, b = sorted((lo, hi))
    seg_f, seg_v = freq_hz[a:b + 1], v[a:b + 1]
    for k in range(len(seg_v) - 1):
        if seg_v[k] == 0:
            return float(seg_f[k])
        if np.sign(seg_v[k]) != np.sign(seg_v[k + 1]):
            t = seg_v[k] / (seg_v[k] - seg_v[k + 1])
            return float(seg_f[k] + t * (seg_f[k + 1] - seg_f[k]))
    return None


#: gamma/2pi values M_eff is always also reported at: Fig. 2.2's slope (2.8 MHz/Oe) and the
#: documented default (2.9 MHz/Oe, ERRATA "not given").
REPORT_GAMMAS_HZ_PER_OE = (2.8e6, 2.9e6)

KITTEL_NOTE = ("at fields of +-250 Oe, f^2 = gamma^2 (H^2 + H M_eff) ~ gamma^2 H M_eff: the map "
               "constrains mostly gamma^2 M_eff, not gamma and M_eff separately; M_eff is given "
               "for the stated gamma (meff_at_gamma_oe and dmeff_dgamma show how it moves, "
               "gamma_free the fit with gamma left free)")


@dataclass
class KittelFit:
    """The Kittel fit of the map (eq. 2.9) for a stated gamma; see the module doc.

    ``meff_sigma_oe`` is the total 1-sigma (fit and gradient uncertainty in quadrature); the
    gamma dependence is not in it: it is ``dmeff_dgamma_oe_per_hz_per_oe`` (Oe per Hz/Oe) and
    ``meff_at_gamma_oe`` ({gamma/2pi in Hz/Oe: M_eff in Oe}).
    """

    meff_oe: float
    stage_z0_mm: float
    meff_sigma_oe: float
    n_points: int
    gamma_hz_per_oe: float = 0.0
    gradient_oe_per_mm: float = 0.0
    gradient_sigma_oe_per_mm: float = 0.0
    gradient_source: str = ""
    meff_fit_sigma_oe: float = 0.0
    meff_gradient_sigma_oe: float = 0.0
    stage_z0_sigma_mm: float = 0.0
    stage_z0_fixed: bool = False
    probe_stage_z0_mm: float | None = None
    dmeff_dgamma_oe_per_hz_per_oe: float = 0.0
    meff_at_gamma_oe: dict[str, float] = field(default_factory=dict)
    gamma2_meff_hz2_per_oe: float = 0.0
    gamma2_meff_rel_sigma: float = 0.0
    gamma_free: dict[str, float] | None = None
    note: str = KITTEL_NOTE


class ReferenceMap:
    """The averaged reference diode V_ref(f, z) (thesis 3.5.1) and what is fitted from it."""

    def __init__(self, plan: SweepPlan, rows: Iterable[dict[str, Any]]) -> None:
        self.plan = plan
        self.freq_hz = np.array(sorted(float(f) for f in plan.freq_hz))
        self.stage_z_mm = np.array(sorted(float(z) for z in plan.stage_z_mm))
        devices = list(plan.devices)
        grid = np.full((len(devices), len(self.stage_z_mm), len(self.freq_hz)), np.nan)
        zi = {round(z * 1e6): i for i, z in enumerate(self.stage_z_mm)}
        fi = {round(f): i for i, f in enumerate(self.freq_hz)}
        for r in rows:
            k = (devices.index(r["device"]), zi[round(r["stage_z_mm"] * 1e6)], fi[round(r["freq_hz"])])
            grid[k] = r["voltage_v"]
        self.device_grid_v = grid / plan.diodes_per_device
        self.complete = bool(np.all(np.isfinite(grid)))
        #: the field model: assumed from the plan until ``use_field_calibration``
        self.gradient_oe_per_mm = float(plan.gradient_oe_per_mm)
        self.gradient_sigma_oe_per_mm = 0.0
        self.gradient_source = "assumed (sweep plan)"
        self.gamma_hz_per_oe = float(plan.gamma_hz_per_oe)
        self.fixed_stage_z0_mm: float | None = None
        self.probe_stage_z0_mm: float | None = None
        #: the reference diode: mean of the devices (thesis Fig. 3.7, red)
        counts = np.isfinite(self.device_grid_v).sum(axis=0)
        sums = np.nansum(self.device_grid_v, axis=0)
        self.v_ref = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        self.kittel: KittelFit | None = None

    @classmethod
    def load(cls, csv_path: str | Path) -> ReferenceMap:
        csv_path = Path(csv_path)
        plan = SweepPlan.from_metadata(json.loads(sidecar_path(csv_path).read_text()))
        return cls(plan, read_points(csv_path))

    # ---- resonance and Kittel (eq. 2.9)

    def resonance_hz(self) -> np.ndarray:
        """Resonance frequency at each stage z (NaN where no full line is in the band)."""
        out = [resonance_from_curve(self.freq_hz, row) for row in self.v_ref]
        return np.array([np.nan if f is None else f for f in out])

    def use_field_calibration(self, gradient_oe_per_mm: float, gradient_sigma_oe_per_mm: float,
                              *, probe_stage_z0_mm: float | None = None,
                              device_offset_mm: float | None = None,
                              source: str = "field probe") -> None:
        """Use a measured gradient (e.g. ``calibration.field.FieldCalibration``) from now on.

        ``probe_stage_z0_mm``: the stage z of the field zero at the probe (kept for the report).
        With ``device_offset_mm`` (stage z of the devices' field zero minus the probe's, known
        from the holder) the Kittel fit holds the field zero there instead of fitting it.
        """
        for name, value in (("gradient_oe_per_mm", gradient_oe_per_mm),
                            ("gradient_sigma_oe_per_mm", gradient_sigma_oe_per_mm)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if gradient_oe_per_mm == 0:
            raise ValueError("gradient_oe_per_mm must be > 0")
        if device_offset_mm is not None and probe_stage_z0_mm is None:
            raise ValueError("device_offset_mm needs probe_stage_z0_mm (the probe's field zero)")
        self.gradient_oe_per_mm = float(gradient_oe_per_mm)
        self.gradient_sigma_oe_per_mm = float(gradient_sigma_oe_per_mm)
        self.gradient_source = source
        self.probe_stage_z0_mm = None if probe_stage_z0_mm is None else float(probe_stage_z0_mm)
        self.fixed_stage_z0_mm = (None if device_offset_mm is None
                                  else float(probe_stage_z0_mm) + float(device_offset_mm))
        self.kittel = None

    def _kittel_points(self) -> tuple[np.ndarray, np.ndarray]:
        fr = self.resonance_hz()
        ok = np.isfinite(fr)
        z, f = self.stage_z_mm[ok], fr[ok]
        if len(z) < 4:
            raise ValueError(f"only {len(z)} resonances in the band; widen the z or f range")
        return z, f

    def _fit(self, z: np.ndarray, f: np.ndarray, gradient: float, gamma: float | None,
             p0: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """curve_fit of eq. 2.9 over (M_eff[, z0][, gamma]): z0 unless held, gamma if None."""
        z0_fixed = self.fixed_stage_z0_mm

        def model(zz: np.ndarray, *p: float) -> np.ndarray:
            meff = p[0]
            z0 = z0_fixed if z0_fixed is not None else p[1]
            g = gamma if gamma is not None else p[-1]
            return kittel_hz(gradient * (z0 - zz), meff, g)

        import warnings

        from scipy.optimize import OptimizeWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            popt, pcov = curve_fit(model, z, f, p0=list(p0), maxfev=20000)
        return popt, pcov

    def fit_kittel(self, min_field_oe: float = 40.0, max_field_oe: float = 320.0,
                   gamma_hz_per_oe: float | None = None) -> KittelFit:
        """Fit eq. 2.9 with H = G |z0 - z|: M_eff for a stated gamma, and the field zero.

        ``gamma_hz_per_oe`` (default: the plan's) is the stated gamma/2pi; G is the measured
        gradient after ``use_field_calibration``, else the plan's assumed one. Fields below
        ``min_field_oe`` (residual in-plane fields, unsaturated film) and above
        ``max_field_oe`` (gradient no longer linear) are left out of the final fit. At these
        fields the map constrains mostly gamma^2 M_eff (see the module doc): the result gives
        M_eff at the stated gamma, dM_eff/dgamma, M_eff at 2.8 and 2.9 MHz/Oe, and a fit with
        gamma free. The stated gamma is kept (``gamma_hz_per_oe``) for the interpolation and
        ``z_for_resonance_mm``, which then agree with this fit.
        """
        gamma = self.gamma_hz_per_oe if gamma_hz_per_oe is None else float(gamma_hz_per_oe)
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma_hz_per_oe must be > 0, got {gamma_hz_per_oe!r}")
        z, f = self._kittel_points()
        g = self.gradient_oe_per_mm
        held = self.fixed_stage_z0_mm is not None
        z0_guess = self.fixed_stage_z0_mm if held else float(z[int(np.argmin(f))])
        p0 = [8000.0] if held else [8000.0, z0_guess]
        popt, _ = self._fit(z, f, g, gamma, p0)
        z0 = self.fixed_stage_z0_mm if held else float(popt[1])
        h = np.abs(g * (z0 - z))
        keep = (h > min_field_oe) & (h < max_field_oe)
        zk, fk = z[keep], f[keep]
        if len(zk) < len(p0) + 2:
            raise ValueError(f"only {len(zk)} resonances between {min_field_oe:g} and "
                             f"{max_field_oe:g} Oe; widen the z range")
        popt, pcov = self._fit(zk, fk, g, gamma, popt)
        meff = float(popt[0])
        z0 = self.fixed_stage_z0_mm if held else float(popt[1])

        def meff_for(gradient: float, gam: float) -> float:
            return float(self._fit(zk, fk, gradient, gam, popt)[0][0])

        sg = self.gradient_sigma_oe_per_mm
        meff_g = (abs(meff_for(g + sg, gamma) - meff_for(g - sg, gamma)) / 2 if sg > 0 else 0.0)
        fit_sigma = float(math.sqrt(pcov[0, 0]))
        dg = 1e-3 * gamma
        dmeff = (meff_for(g, gamma + dg) - meff_for(g, gamma - dg)) / (2 * dg)
        at_gamma = {f"{gm:.6g}": meff_for(g, gm)
                    for gm in sorted({*REPORT_GAMMAS_HZ_PER_OE, gamma})}
        total = math.hypot(fit_sigma, meff_g)
        free = None
        try:  # gamma free as well: how little the map says about gamma and M_eff apart
            pf, cf = self._fit(zk, fk, g, None, [*popt, gamma])
            if np.all(np.isfinite(cf)):
                free = {"gamma_hz_per_oe": float(pf[-1]),
                        "gamma_sigma_hz_per_oe": float(math.sqrt(cf[-1, -1])),
                        "meff_oe": float(pf[0]), "meff_sigma_oe": float(math.sqrt(cf[0, 0])),
                        "correlation": float(cf[0, -1] / math.sqrt(cf[0, 0] * cf[-1, -1]))}
        except RuntimeError:  # no convergence: the degeneracy itself
            free = None
        self.gamma_hz_per_oe = gamma
        self.kittel = KittelFit(
            meff, float(z0), total, int(keep.sum()), gamma_hz_per_oe=gamma,
            gradient_oe_per_mm=g, gradient_sigma_oe_per_mm=sg,
            gradient_source=self.gradient_source, meff_fit_sigma_oe=fit_sigma,
            meff_gradient_sigma_oe=float(meff_g),
            stage_z0_sigma_mm=0.0 if held else float(math.sqrt(pcov[1, 1])),
            stage_z0_fixed=held, probe_stage_z0_mm=self.probe_stage_z0_mm,
            dmeff_dgamma_oe_per_hz_per_oe=float(dmeff), meff_at_gamma_oe=at_gamma,
            gamma2_meff_hz2_per_oe=gamma ** 2 * meff, gamma2_meff_rel_sigma=total / meff,
            gamma_free=free)
        return self.kittel

    def z_mm(self) -> np.ndarray:
        """Each grid row's position in the gradient from the field zero (needs the Kittel fit)."""
        if self.kittel is None:
            self.fit_kittel()
        assert self.kittel is not None
        return self.plan.direction * (self.stage_z_mm - self.kittel.stage_z0_mm)

    def field_oe(self) -> np.ndarray:
        return self.gradient_oe_per_mm * self.z_mm()

    # ---- interpolation V_ref(f, z)

    def interpolator(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """V_ref(freq_hz, z_mm) of one diode, interpolated in the measured grid (thesis 3.5.1).

        Between two measured z rows the curves are blended at the same detuning from the
        fitted resonance (eq. 2.9), not at the same frequency: a row spacing of tens of Oe then
        still moves the line smoothly, where a plain bilinear blend would smear it.
        """
        z = self.z_mm()
        order = np.argsort(z)
        zg, rows = z[order], self.v_ref[order]
        assert self.kittel is not None
        meff, g, gamma = self.kittel.meff_oe, self.gradient_oe_per_mm, self.gamma_hz_per_oe
        fr_rows = kittel_hz(g * zg, meff, gamma)
        fgrid = self.freq_hz

        def v_ref(freq_hz: np.ndarray, z_mm: np.ndarray) -> np.ndarray:
            f, zz = np.broadcast_arrays(np.asarray(freq_hz, float), np.asarray(z_mm, float))
            shape = f.shape
            f, zz = f.ravel(), zz.ravel()
            out = np.zeros_like(f)
            inside = (zz >= zg[0]) & (zz <= zg[-1])
            k = np.clip(np.searchsorted(zg, zz, side="right") - 1, 0, len(zg) - 2)
            t = (zz - zg[k]) / (zg[k + 1] - zg[k])
            fr = kittel_hz(g * zz, meff, gamma)
            for kk in np.unique(k[inside]):
                m = inside & (k == kk)
                lo = np.interp(f[m] - fr[m] + fr_rows[kk], fgrid, rows[kk], left=0.0, right=0.0)
                hi = np.interp(f[m] - fr[m] + fr_rows[kk + 1], fgrid, rows[kk + 1], left=0.0,
                               right=0.0)
                out[m] = (1 - t[m]) * lo + t[m] * hi
            return out.reshape(shape)

        return v_ref

    def z_for_resonance_mm(self, freq_hz: float | np.ndarray, sign: float = 1.0) -> np.ndarray:
        """The z (on the ``sign`` side of the field zero) where the diode resonates at ``freq_hz``:
        the inverse of the fitted Kittel law (eq. 2.9)."""
        if self.kittel is None:
            self.fit_kittel()
        assert self.kittel is not None
        f = np.asarray(freq_hz, float) / self.gamma_hz_per_oe
        m = self.kittel.meff_oe
        h = (-m + np.sqrt(m * m + 4 * f * f)) / 2
        return sign * h / self.gradient_oe_per_mm

    # ---- power rescaling (eq. 3.3, Fig. 3.8)

    def fit_power_rescaling(self, dz_um: float = 70.0, fit_range_hz: tuple[float, float] = (1.5e9, 3.5e9),
                            ) -> dict[str, float]:
        """Fit the synapse peak height vs resonance frequency linearly (thesis Fig. 3.8b).

        For each resonance frequency in ``fit_range_hz`` the synapse of ``dz_um`` (eq. 3.2 read
        as a difference, ERRATA) is placed there and its peak is read from the interpolated
        map. Returns ``slope_v_per_hz`` and ``intercept_v``: V_peak(f) = slope f + intercept.
        ERRATA: the printed fit diverges at 3.75 GHz; the default range stops at 3.5 GHz.
        """
        v_ref = self.interpolator()
        f_res = np.linspace(fit_range_hz[0], fit_range_hz[1], 17)
        freqs = np.linspace(self.freq_hz[0], self.freq_hz[-1], 801)
        peaks = []
        for fr in f_res:
            z = float(self.z_for_resonance_mm(fr))
            v = synapse_v(v_ref, freqs, z, dz_um)
            peaks.append(float(np.max(np.abs(v))))
        slope, intercept = np.polyfit(f_res, peaks, 1)
        return {"slope_v_per_hz": float(slope), "intercept_v": float(intercept), "dz_um": dz_um,
                "fit_lo_hz": fit_range_hz[0], "fit_hi_hz": fit_range_hz[1]}


def synapse_v(v_ref: Callable[[np.ndarray, np.ndarray], np.ndarray], freq_hz: np.ndarray,
              z_mm: float | np.ndarray, dz_um: float | np.ndarray) -> np.ndarray:
    """eq. 3.2 read as a difference (ERRATA): the reference-sign diode at z - dz/2, the opposite
    one at z + dz/2, so dz > 0 gives a positive peak in a field rising with z."""
    half = 0.5e-3 * np.asarray(dz_um, float)
    z = np.asarray(z_mm, float)
    return v_ref(freq_hz, z - half) - v_ref(freq_hz, z + half)


def rescaled_power(freq_hz: float | np.ndarray, fit: dict[str, float], p0: float,
                   f_norm_hz: float = 3.1e9) -> np.ndarray:
    """eq. 3.3 with the fitted line: P = P0 V_peak(f_norm) / V_peak(f) (same units as ``p0``)."""
    lo, hi = fit["fit_lo_hz"], fit["fit_hi_hz"]
    f = np.clip(np.asarray(freq_hz, float), lo, hi)
    line = fit["slope_v_per_hz"] * f + fit["intercept_v"]
    return p0 * (fit["slope_v_per_hz"] * f_norm_hz + fit["intercept_v"]) / line
