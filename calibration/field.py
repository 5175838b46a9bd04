"""Field calibration with a Hall probe: the gradient (Oe/mm) and the field zero, measured.

Why: the Kittel fit of the reference map (thesis eq. 2.9, 3.5.1) sees the field only through
``gradient x (stage z - z0)``; a gradient assumed at the value the bench was built with makes
M_eff circular (issue 21, item 4). Here the gaussmeter (role ``field_probe``, e.g.
``drivers.gaussmeter.LakeShore425``) reads the field while the z stage (role ``stage.z``)
steps through the gradient, and a polynomial fit gives

- ``slope_oe_per_mm``: dH/d(stage z) at the field zero, as the probe's axis reads it;
  ``gradient_oe_per_mm`` its magnitude and ``direction`` its sign (-1 when the stage moves the
  magnet array, the reference map's ``direction``),
- ``stage_z0_mm``: the stage z at which the field at the probe is zero,

each with a 1-sigma uncertainty: the covariance of the weighted fit, scaled by the reduced
chi-square, and for the gradient also the probe's calibration accuracy (``accuracy_frac``,
0.2 % of reading for the Model 425 in DC mode, counted here as one sigma), which no
number of readings averages away; for the zero also the probe's zero offset
(``zero_uncertainty_oe``; zero the probe in its zero-gauss chamber, ``ZPROBE``, to shrink it),
which shifts the zero by offset / gradient. The probe's zero is the holder's: the chip sits at its own
glue position, so the reference map still finds the devices' zero itself (or takes this one
plus a stated offset).

Every point is appended to a CSV as it is measured. The routine measures through drivers only
(``lab[role]``, ``lab.sleep``, ``lab.clock``); it never reads a simulator's state.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CSV_COLUMNS = ("stage_z_mm", "field_oe", "field_sem_oe", "n", "lab_time_s")


@dataclass
class FieldScanPlan:
    """Stage positions (mm), readings per position, waits, and the largest field expected."""

    stage_z_mm: Sequence[float]
    n_avg: int = 5
    settle_s: float = 0.5          # after each move, before the first reading
    read_interval_s: float = 0.2   # between readings (the 425 updates its reading ~10/s)
    max_field_oe: float = 350.0    # picks the probe's range (set_range_for_g)
    order: int = 3                 # polynomial order of the fit (1-3; 3 takes the softening)

    def check(self) -> None:
        """Refuse a plan that cannot give a fit with uncertainties, before anything moves."""
        zs = [float(z) for z in self.stage_z_mm]
        if not all(math.isfinite(z) for z in zs):
            raise ValueError(f"stage_z_mm must be finite numbers, got {self.stage_z_mm!r}")
        if self.order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {self.order!r}")
        if len(set(zs)) < self.order + 3:
            raise ValueError(f"need at least {self.order + 3} distinct stage positions for an "
                             f"order-{self.order} fit with uncertainties, got {len(set(zs))}")
        if isinstance(self.n_avg, bool) or not isinstance(self.n_avg, int) or self.n_avg < 2:
            raise ValueError(f"n_avg must be an integer >= 2 (a spread per point), got "
                             f"{self.n_avg!r}")
        for name in ("settle_s", "read_interval_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not (isinstance(self.max_field_oe, int | float) and self.max_field_oe > 0):
            raise ValueError(f"max_field_oe must be > 0, got {self.max_field_oe!r}")


@dataclass
class FieldPoint:
    stage_z_mm: float
    field_oe: float
    field_sem_oe: float
    n: int
    lab_time_s: float


@dataclass
class FieldCalibration:
    """What the probe scan gives (1-sigma uncertainties); see the module doc."""

    slope_oe_per_mm: float
    slope_sigma_oe_per_mm: float   # fit and probe accuracy together
    stage_z0_mm: float
    stage_z0_sigma_mm: float
    curvature_oe_per_mm2: float
    residual_rms_oe: float
    n_points: int
    order: int
    slope_sigma_fit_oe_per_mm: float = 0.0
    accuracy_frac: float = 0.0
    zero_uncertainty_oe: float = 0.0
    lab_time_s: float = 0.0
    points: list[dict[str, float]] = field(default_factory=list)

    @property
    def gradient_oe_per_mm(self) -> float:
        return abs(self.slope_oe_per_mm)

    @property
    def gradient_sigma_oe_per_mm(self) -> float:
        return self.slope_sigma_oe_per_mm

    @property
    def direction(self) -> float:
        """+1 if the field along the probe's axis rises with stage z, -1 if it falls."""
        return math.copysign(1.0, self.slope_oe_per_mm)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "hil field calibration v1", **asdict(self),
                "gradient_oe_per_mm": self.gradient_oe_per_mm,
                "gradient_sigma_oe_per_mm": self.gradient_sigma_oe_per_mm,
                "direction": self.direction,
                "units": {"slope_oe_per_mm": "Oe/mm", "stage_z0_mm": "mm",
                          "curvature_oe_per_mm2": "Oe/mm^2", "residual_rms_oe": "Oe",
                          "lab_time_s": "s"}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> FieldCalibration:
        """Read a saved calibration; a file of another kind is a ``ValueError`` naming it."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != "hil field calibration v1":
            raise ValueError(f"{path}: not a field calibration (hil calibrate field writes "
                             "field_calibration.json)")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def measure_field_profile(lab: Any, plan: FieldScanPlan, csv_path: str | Path | None = None, *,
                          progress: Callable[[int, int], None] | None = None
                          ) -> list[FieldPoint]:
    """Step stage z through ``plan.stage_z_mm`` (increasing: no backlash reversal) and read the
    probe ``n_avg`` times at each position; each point is appended to ``csv_path`` at once.

    ``lab`` gives ``field_probe`` and ``stage.z`` by role, ``sleep`` and ``clock``.
    """
    plan.check()
    probe, stage = lab["field_probe"], lab["stage.z"]
    zs = sorted({float(z) for z in plan.stage_z_mm})
    probe.set_range_for_g(plan.max_field_oe)  # 1 G = 1 Oe in air
    if "NOT REFERENCED" in stage.status():
        stage.home()
    writer = fh = None
    if csv_path is not None:
        csv_path = Path(csv_path)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        fh = csv_path.open("w", newline="")
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
    points: list[FieldPoint] = []
    start_s = float(lab.clock.now_s())
    try:
        for i, z in enumerate(zs):
            stage.move_abs_mm(z)
            lab.sleep(plan.settle_s)
            readings = []
            for k in range(plan.n_avg):
                if k:
                    lab.sleep(plan.read_interval_s)
                try:
                    readings.append(probe.field_oe())
                except Exception as exc:
                    exc.add_note(f"at stage z {z:g} mm: a field beyond the probe's range "
                                 f"({plan.max_field_oe:g} Oe asked for)? narrow the stage "
                                 "range or raise max_field_oe")
                    raise
            sem = float(np.std(readings, ddof=1) / math.sqrt(len(readings)))
            point = FieldPoint(z, float(np.mean(readings)), sem, len(readings),
                               float(lab.clock.now_s()) - start_s)
            points.append(point)
            if writer is not None and fh is not None:
                writer.writerow([repr(point.stage_z_mm), repr(point.field_oe),
                                 repr(point.field_sem_oe), point.n, repr(point.lab_time_s)])
                fh.flush()
            if progress is not None:
                progress(i + 1, len(zs))
    finally:
        if fh is not None:
            fh.close()
    return points


def fit_field_profile(points: Sequence[FieldPoint], order: int = 3, *,
                      resolution_oe: float = 0.01, accuracy_frac: float = 0.002,
                      zero_uncertainty_oe: float = 0.5) -> FieldCalibration:
    """Weighted polynomial fit H(stage z); the zero crossing and the slope there, with errors.

    Weights are 1 / (SEM^2 + resolution^2 / 12): a point read identically ``n`` times (the
    reading's last digit) is not given infinite weight. Uncertainties come from the fit's
    covariance scaled by the reduced chi-square, propagated to the root and its slope; the
    slope's also holds ``accuracy_frac`` of the probe's gain (a scale error moves the slope,
    not the zero), the zero's ``zero_uncertainty_oe`` / slope (an offset moves the zero).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    z = np.array([p.stage_z_mm for p in points], float)
    h = np.array([p.field_oe for p in points], float)
    sem = np.array([p.field_sem_oe for p in points], float)
    if len(z) < order + 3:
        raise ValueError(f"need at least {order + 3} points for an order-{order} fit with "
                         f"uncertainties, got {len(z)}")
    if not (h.min() < 0 < h.max()):
        raise ValueError(f"the field does not cross zero in the scanned range "
                         f"({h.min():.1f} to {h.max():.1f} Oe from stage z {z.min():g} to "
                         f"{z.max():g} mm): move the scan to include the field zero")
    zc = float(z.mean())  # centred: a well-conditioned fit
    sigma = np.sqrt(sem ** 2 + resolution_oe ** 2 / 12.0)
    coef, cov = np.polyfit(z - zc, h, order, w=1.0 / sigma, cov=True)
    poly = np.poly1d(coef)
    roots = [r.real for r in poly.roots if abs(r.imag) < 1e-12]
    inside = [r for r in roots if z.min() - zc <= r <= z.max() - zc]
    if not inside:
        raise ValueError("the fitted field has no zero inside the scanned range")
    u0 = min(inside, key=abs)

    def derived(c: np.ndarray) -> np.ndarray:
        """(root, slope at the root) for coefficients ``c`` (the root nearest ``u0``)."""
        p = np.poly1d(c)
        rs = [r.real for r in p.roots if abs(r.imag) < 1e-9]
        r = min(rs, key=lambda x: abs(x - u0))
        return np.array([r, p.deriv()(r)])

    base = derived(coef)
    jac = np.zeros((2, len(coef)))
    for k in range(len(coef)):
        step = 1e-6 * max(abs(coef[k]), 1e-3)
        c = coef.copy()
        c[k] += step
        jac[:, k] = (derived(c) - base) / step
    cov_d = jac @ cov @ jac.T
    resid = h - poly(z - zc)
    fit_sigma = float(math.sqrt(cov_d[1, 1]))
    return FieldCalibration(
        slope_oe_per_mm=float(base[1]),
        slope_sigma_oe_per_mm=float(math.hypot(fit_sigma, accuracy_frac * base[1])),
        stage_z0_mm=float(base[0] + zc),
        stage_z0_sigma_mm=float(math.hypot(math.sqrt(cov_d[0, 0]),
                                           zero_uncertainty_oe / abs(base[1]))),
        curvature_oe_per_mm2=float(poly.deriv(2)(base[0]) / 2) if order >= 2 else 0.0,
        residual_rms_oe=float(np.sqrt(np.mean(resid ** 2))), n_points=len(z), order=order,
        slope_sigma_fit_oe_per_mm=fit_sigma, accuracy_frac=float(accuracy_frac),
        zero_uncertainty_oe=float(zero_uncertainty_oe),
        lab_time_s=float(max((p.lab_time_s for p in points), default=0.0)),
        points=[asdict(p) for p in points])


def calibrate_field(lab: Any, plan: FieldScanPlan, csv_path: str | Path | None = None, *,
                    progress: Callable[[int, int], None] | None = None,
                    accuracy_frac: float = 0.002,
                    zero_uncertainty_oe: float = 0.5) -> FieldCalibration:
    """Measure the profile (``measure_field_profile``) and fit it (``fit_field_profile``)."""
    points = measure_field_profile(lab, plan, csv_path, progress=progress)
    return fit_field_profile(points, plan.order, accuracy_frac=accuracy_frac,
                             zero_uncertainty_oe=zero_uncertainty_oe)
