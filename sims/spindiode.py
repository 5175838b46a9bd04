"""AMR spin-diode physics (thesis chapter 2, 3.4), as vectorised numpy functions.

Frame (used everywhere in ``sims``, named in ``lab_configs/virtual.yaml``): the magnet
array's gradient axis is **z** (vertical, thesis 2.6.2 and 3.4.2), the film lies in the
**yz** plane (thesis 2.3.2) and **x** is the film normal (thesis 3.6: "x, the direction
perpendicular to the sample"). Fields are in Oe, frequencies in Hz, powers in W, lengths in
mm unless the name says otherwise.

Equations implemented (thesis numbering):

- eq. 2.9, Kittel: ``f_r = (gamma/2pi) sqrt(|H| (|H| + M_eff))``. The magnetisation follows
  the in-plane field, so a reversed field gives the same resonance (the figure-2.8 branches).
- eq. 2.10, linewidth: ``dw = alpha w (2 w_H + w_M) / (w_r + w)`` (in Hz here), plus an
  optional extrinsic (inhomogeneous) part the thesis does not give (default 0).
- eq. 2.10/2.11, susceptibility prefactor ``A_yy / M_S = (H + M) / (alpha (f/gamma) (2H + M))``
  (in 1/Oe): it falls with frequency, which is why peaks shrink at high frequency (Fig. 2.8).
- eq. 2.11, rectified voltage: ``V = -k P (A_yy/A_0) sin(2 Phi_0) [L_a cos(phi) + L_s sin(phi)]``
  with the antisymmetric ``L_a = (f_r - f) dw / ((f_r - f)^2 + dw^2)`` and symmetric
  ``L_s = dw^2 / (...)`` Lorentzians. ``V`` is proportional to the power ``P`` dissipated in
  the diode (I h_rf ~ I^2, thesis after eq. 2.11), so it is linear in power and tones add
  (thesis 3.4.1): mixing products of distinct tones are AC and do not reach the DC port.

What the thesis never gives is a documented, configurable default (``SpinDiodeMaterial``):
gyromagnetic ratio, damping, the extrinsic linewidth and the rectification sensitivity. The
ratio ``Delta R I h_rf`` of eq. 2.11 is lumped into one sensitivity ``k`` (the antisymmetric
peak, in V per W dissipated, of a nominal diode at 2 GHz with ``alpha = 0.01``): a
first-principles Oersted-field estimate falls ~60x short of the measured microvolts (the Pt
cap's spin-orbit torque dominates), so the scale is taken from the thesis's measurements.

Which measurements (issue 21): the default ``k`` is anchored on the chain sample of chapters
3-4 (table 3.1 / section 4.3.2: V_max = 63.3 / 98.8 / 103.8 uV at 200 mW base power, a chain
range of ~25 uV), the sample the bench, the reference map and the network use. The chapter-2
sample (Fig. 2.14: +-60 uV at dz = +-40 um, 100 mW) cannot be held by the same ``k``: with the
circuit law below (a synapse in the 2x2 chain gives 1/8 of what it gives alone at the same
power) and the amplitude falling with frequency as Fig. 3.8 says, the thesis's own numbers
put the chain peaks ~3x under 25 uV if Fig. 2.14's sample had the chain sample's ``k``. The
two chips are different fabrication runs (Fig. 2.12c vs Fig. 3.9), so ``worlds/chapter2.yaml``
carries its own, fitted ``k`` (a documented per-sample factor, see that file).

Power-dependent resonance (thesis 2.7.1, after Fig. 2.9: "a shift of the resonance frequency
as the input RF power increases ... observed preferentially in small devices where the
density of AC current is higher, increasing heating"): Joule heating lowers M_s, so f_r moves
by ``power_shift_hz_per_w`` per W dissipated in the diode (all tones together: heating does
not care about frequency). A few MHz at the highest single-diode powers (~2 % of the half
width): at the antisymmetric peak it is second order (V stays linear in power, Fig. 2.9c),
near the zero crossing it shows as the thesis's "slight non-linearity". In a chain every
diode dissipates 1/8 of the chain's power, so chains stay linear (thesis 3.4.1, Fig. 3.2).

Chains (thesis 3.3, 3.4.4, eq. 3.1): a chain is blocks in series, each block diodes in
parallel. Every diode is a Thevenin source (its rectified emf behind its resistance): a block's
DC voltage is the conductance-weighted mean of its diodes' emfs and the chain's is the sum over
blocks (Kirchhoff). The RF current divides in a block by conductance, so each diode dissipates
``P_chain (G_k / G_b^2) / R_chain``. A double-diode synapse (thesis 2.7.3) is two opposite-sign
diodes in one block at positions differing by ``dz``; its response is the *difference* of the
two shifted single-diode responses, as the ERRATA reads eq. 3.2.

What follows for identical diodes (the law ``calibration.chain`` writes for its design model,
``tests/test_thesis_anchors.py`` holds the two equal): relative to a reference device of two
same-sign diodes in parallel fed the same power, whose voltage is halved to a "single diode"
V_ref (thesis 3.5.1), a synapse in block ``b`` (``P_b`` synapses in parallel) of a chain
contributes ``(V_ref(z - dz/2) - V_ref(z + dz/2)) / (P_b^3 sum_b' 1/P_b')``: 1/N for N
synapses in series, 1/8 for the thesis's 2x2 chain (eq. 3.1), where eq. 3.2's printed 0.5
times the 1/N of Algorithm 1 gives the same 1/8.

Power transmission into a chain (thesis 3.5.1, 3.6): the wire bonds are a series inductance and
the pads a shunt capacitance between the 50 Ohm line and the chain's resistance.

The magnet array (thesis 2.6.2): ``H = -grad(phi)`` of a harmonic potential, so the modelled
field is curl- and divergence-free. In the (z, x) plane ``H_z - i H_x = F'(z + i x)`` with
``F'(w) = H_c + H_sat tanh(G w / H_sat) + c_2 w^2``: a gradient ``G`` (140 Oe/mm) that softens
far from the centre, a curvature ``c_2``, and through the analytic continuation a gradient
that varies along x (thesis 3.6). Small residual ``H_x``, ``H_y`` and a y-z cross term
``c_yz`` (``H_y += c_yz z``, ``H_z += c_yz y``) complete the non-uniformity.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]

#: Damping at which ``SpinDiodeMaterial.sensitivity_v_per_w`` is defined (the eq. 2.10
#: prefactor scales as 1/alpha, so a more damped film gives smaller peaks).
REFERENCE_ALPHA = 0.01
#: Frequency at which the sensitivity is defined.
REFERENCE_FREQ_HZ = 2.0e9
Z0_OHM = 50.0


@dataclass(frozen=True)
class SpinDiodeMaterial:
    """Permalloy/Pt film parameters; defaults and why.

    - ``meff_oe`` 9680: the thesis's Kittel fit (Fig. 2.8, "mu0 M_s of 9.68 kOe").
    - ``gamma_hz_per_oe`` 2.9e6: gamma/2pi; 2.9 MHz/Oe (g ~ 2.07, usual for Permalloy)
      reproduces the chapter-3 spacings 175/216/245 um of the 1.75-3.25 GHz synapses at
      140 Oe/mm (this model gives 174/216/257 um) and the ~175 MHz/mT slope.
    - ``alpha`` 0.01: Gilbert damping of 5 nm Permalloy capped with Pt (not given); gives a
      half width of ~143 MHz at 2.2 GHz, narrow enough for the thesis's 0.5 GHz spacing.
    - ``extrinsic_linewidth_hz`` 0: inhomogeneous broadening, not given.
    - ``sensitivity_v_per_w`` 2.5e-2: antisymmetric peak of a nominal diode per W dissipated
      in it at 2 GHz; fitted so that the table-3.1 chains on the bench, fed 200 mW base power
      through eq. 3.3, give V_max 63.3 / 98.8 / 103.8 uV (thesis 4.3.2) and a ~25 uV range
      (thesis 3.5.2, 4.6.2); ``tests/test_thesis_anchors.py`` holds them. (Fig. 2.14's chip:
      ``worlds/chapter2.yaml``, see the module doc.)
    - ``phase_deg`` 6: phase between RF current and magnetisation in eq. 2.11; small, since
      "the symmetric part ... is small in our samples" (thesis 2.4).
    - ``power_shift_hz_per_w`` -1.0e8: resonance shift per W dissipated in the diode
      (heating, thesis 2.7.1): -0.1 MHz per mW, ~-2.5 MHz for a single 5x10 um diode fed
      100 mW at the source (a quarter of it dissipated in the diode after the bench's losses).
    """

    meff_oe: float = 9680.0
    gamma_hz_per_oe: float = 2.9e6
    alpha: float = 0.01
    extrinsic_linewidth_hz: float = 0.0
    sensitivity_v_per_w: float = 2.5e-2
    phase_deg: float = 6.0
    power_shift_hz_per_w: float = -1.0e8


# --------------------------------------------------------------------------- eq. 2.9, 2.10


def kittel_frequency_hz(field_oe: ArrayLike, meff_oe: ArrayLike = 9680.0,
                        gamma_hz_per_oe: ArrayLike = 2.9e6) -> Array:
    """Resonance frequency for an in-plane field (eq. 2.9); even in the field."""
    h = np.abs(np.asarray(field_oe, dtype=float))
    return np.asarray(gamma_hz_per_oe) * np.sqrt(h * (h + np.asarray(meff_oe)))


def kittel_field_oe(freq_hz: ArrayLike, meff_oe: ArrayLike = 9680.0,
                    gamma_hz_per_oe: ArrayLike = 2.9e6) -> Array:
    """The (positive) in-plane field that resonates at ``freq_hz``: eq. 2.9 inverted."""
    r = np.asarray(freq_hz, dtype=float) / np.asarray(gamma_hz_per_oe)
    m = np.asarray(meff_oe, dtype=float)
    return (-m + np.sqrt(m * m + 4.0 * r * r)) / 2.0


def kittel_slope_hz_per_oe(field_oe: ArrayLike, meff_oe: ArrayLike = 9680.0,
                           gamma_hz_per_oe: ArrayLike = 2.9e6) -> Array:
    """d f_r / d|H| (the thesis's "175 MHz/mT" is 17.5 MHz/Oe near 60 Oe)."""
    h = np.abs(np.asarray(field_oe, dtype=float))
    m = np.asarray(meff_oe)
    return np.asarray(gamma_hz_per_oe) * (2 * h + m) / (2 * np.sqrt(h * (h + m)))


def linewidth_hz(freq_hz: ArrayLike, field_oe: ArrayLike, meff_oe: ArrayLike = 9680.0,
                 gamma_hz_per_oe: ArrayLike = 2.9e6, alpha: ArrayLike = 0.01,
                 extrinsic_hz: ArrayLike = 0.0) -> Array:
    """Half width of the lineshape (eq. 2.10: ``alpha f (2 f_H + f_M) / (f_r + f)``) in Hz."""
    f = np.asarray(freq_hz, dtype=float)
    h = np.abs(np.asarray(field_oe, dtype=float))
    g = np.asarray(gamma_hz_per_oe)
    fr = kittel_frequency_hz(h, meff_oe, g)
    return np.asarray(alpha) * f * g * (2 * h + np.asarray(meff_oe)) / (fr + f) + extrinsic_hz


def susceptibility_prefactor(freq_hz: ArrayLike, field_oe: ArrayLike,
                             meff_oe: ArrayLike = 9680.0, gamma_hz_per_oe: ArrayLike = 2.9e6,
                             alpha: ArrayLike = 0.01) -> Array:
    """``A_yy / M_S`` of eq. 2.10 in 1/Oe: ``(H + M) / (alpha (f / gamma) (2H + M))``."""
    f = np.asarray(freq_hz, dtype=float)
    h = np.abs(np.asarray(field_oe, dtype=float))
    m = np.asarray(meff_oe)
    return (h + m) / (np.asarray(alpha) * (f / np.asarray(gamma_hz_per_oe)) * (2 * h + m))


def lineshapes(freq_hz: ArrayLike, resonance_hz: ArrayLike,
               width_hz: ArrayLike) -> tuple[Array, Array]:
    """(antisymmetric, symmetric) Lorentzians of eq. 2.10 in the drive frequency.

    The antisymmetric one peaks at +-1/2 one half width away from resonance; the symmetric one
    is 1 at resonance.
    """
    x = np.asarray(resonance_hz, dtype=float) - np.asarray(freq_hz, dtype=float)
    w = np.asarray(width_hz, dtype=float)
    d = x * x + w * w
    return x * w / d, w * w / d


def rectified_voltage_v(freq_hz: ArrayLike, field_oe: ArrayLike, power_w: ArrayLike, *,
                        sin2phi0: ArrayLike = 1.0, phase_deg: ArrayLike | None = None,
                        meff_oe: ArrayLike | None = None, alpha: ArrayLike | None = None,
                        drive_scale: ArrayLike = 1.0,
                        resonance_shift_hz: ArrayLike = 0.0,
                        material: SpinDiodeMaterial = SpinDiodeMaterial(),
                        parts: bool = False) -> Array | tuple[Array, Array]:
    """DC emf of one diode dissipating ``power_w`` at ``freq_hz`` in an in-plane field (eq. 2.11).

    ``sin2phi0`` is the sign and size of the AMR angular factor (+-1 for a current at +-45
    degrees to the field, the design of thesis 2.5.1). ``drive_scale`` multiplies the emf for a
    diode that differs from the nominal one (width, film resistance; see ``sims.virtual_lab``).
    ``meff_oe``, ``alpha`` and ``phase_deg`` override the material per diode (arrays allowed).
    ``resonance_shift_hz`` moves the resonance (the heating shift of thesis 2.7.1, computed by
    the caller from the dissipated power: ``material.power_shift_hz_per_w * P_dissipated``;
    this function keeps V exactly linear in ``power_w`` so tones can be added).
    With ``parts=True`` returns (antisymmetric part, symmetric part) separately.
    """
    meff = material.meff_oe if meff_oe is None else meff_oe
    damping = material.alpha if alpha is None else alpha
    phase = np.deg2rad(material.phase_deg if phase_deg is None else phase_deg)
    g = material.gamma_hz_per_oe
    fr = kittel_frequency_hz(field_oe, meff, g) + np.asarray(resonance_shift_hz, dtype=float)
    width = linewidth_hz(freq_hz, field_oe, meff, g, damping, material.extrinsic_linewidth_hz)
    anti, sym = lineshapes(freq_hz, fr, width)
    ref = _reference_prefactor(material)
    scale = (-2.0 * material.sensitivity_v_per_w * np.asarray(power_w, dtype=float)
             * np.asarray(drive_scale) * np.asarray(sin2phi0)
             * susceptibility_prefactor(freq_hz, field_oe, meff, g, damping) / ref)
    if parts:
        return scale * anti * np.cos(phase), scale * sym * np.sin(phase)
    return scale * (anti * np.cos(phase) + sym * np.sin(phase))


@lru_cache(maxsize=64)
def _reference_prefactor(material: SpinDiodeMaterial) -> float:
    """eq. 2.10 prefactor at which ``sensitivity_v_per_w`` is defined (2 GHz, alpha 0.01)."""
    g = material.gamma_hz_per_oe
    return float(susceptibility_prefactor(
        REFERENCE_FREQ_HZ, kittel_field_oe(REFERENCE_FREQ_HZ, material.meff_oe, g),
        material.meff_oe, g, REFERENCE_ALPHA))


# --------------------------------------------------------------------------- chains (3.4.4)


def chain_network(resistance_ohm: ArrayLike, block: ArrayLike) -> tuple[float, Array, Array]:
    """Series of parallel blocks (eq. 3.1): ``(R_chain, power_fraction, dc_weight)`` per diode.

    ``block[k]`` is the block diode ``k`` belongs to. ``power_fraction`` sums to 1 (the share of
    the chain's RF power each diode dissipates); the chain's DC voltage is
    ``sum(dc_weight * emf)``.
    """
    r = np.asarray(resistance_ohm, dtype=float)
    b = np.asarray(block, dtype=int)
    g = 1.0 / r
    g_block = np.bincount(b, weights=g)
    r_chain = float(np.sum(1.0 / g_block[g_block > 0]))
    gb = g_block[b]
    return r_chain, (g / gb**2) / r_chain, g / gb


def bond_transmission(freq_hz: ArrayLike, load_ohm: float, inductance_h: float,
                      capacitance_f: float = 0.0, z0_ohm: float = Z0_OHM) -> Array:
    """Share of the available power that reaches a resistive load behind a series wire-bond
    inductance and a shunt pad capacitance (1 for a matched load without parasitics)."""
    w = 2 * np.pi * np.asarray(freq_hz, dtype=float)
    zp = load_ohm / (1 + 1j * w * capacitance_f * load_ohm)
    total = z0_ohm + 1j * w * inductance_h + zp
    return 4 * z0_ohm * np.abs(zp) ** 2 / (load_ohm * np.abs(total) ** 2)


# --------------------------------------------------------------------------- field (2.6.2)


@dataclass(frozen=True)
class MagnetArray:
    """The four-magnet gradient array of thesis 2.6.2 in its own frame (mm, Oe).

    Defaults: the measured 140 Oe/mm gradient (13.87 uT/um in 3.4.2), zero field at the
    centre (thesis 3.5.1 scans -250..+250 Oe), a gradient that softens by < 1 % within
    +-2 mm (``saturation_oe``), and residuals of a few Oe (thesis 2.6.2: the Hy left after the
    compensating magnet; 3.6: "small" non-uniform Hx, Hy).
    """

    gradient_oe_per_mm: float = 140.0
    center_field_oe: float = 0.0
    saturation_oe: float = 2000.0
    curvature_oe_per_mm2: float = 1.0
    residual_x_oe: float = 2.0
    residual_y_oe: float = 3.0
    cross_yz_oe_per_mm: float = 0.5

    def field_oe(self, x_mm: ArrayLike, y_mm: ArrayLike,
                 z_mm: ArrayLike) -> tuple[Array, Array, Array]:
        """(H_x, H_y, H_z) at points given in the magnet frame."""
        x = np.asarray(x_mm, dtype=float)
        y = np.asarray(y_mm, dtype=float)
        z = np.asarray(z_mm, dtype=float)
        w = z + 1j * x
        sat = self.saturation_oe
        fprime = (self.center_field_oe + sat * np.tanh(self.gradient_oe_per_mm * w / sat)
                  + self.curvature_oe_per_mm2 * w * w)
        hz = fprime.real + self.cross_yz_oe_per_mm * y
        hx = -fprime.imag + self.residual_x_oe
        hy = self.residual_y_oe + self.cross_yz_oe_per_mm * z
        return hx, hy, hz


# --------------------------------------------------------------------------- units


def dbm_to_w(power_dbm: ArrayLike) -> Array:
    return 1e-3 * 10.0 ** (np.asarray(power_dbm, dtype=float) / 10.0)


def w_to_dbm(power_w: ArrayLike) -> Array:
    p = np.maximum(np.asarray(power_w, dtype=float), 1e-30)
    return 10.0 * np.log10(p / 1e-3)


def db_to_ratio(loss_db: ArrayLike) -> Array:
    """Power ratio of a loss in dB (the ERRATA's reading of the ~L1034 correction: dB add)."""
    return 10.0 ** (-np.asarray(loss_db, dtype=float) / 10.0)
