"""Spin-diode physics (sims.spindiode): thesis eq. 2.9-2.13, eq. 3.1, the synapse, the field."""

from __future__ import annotations

import numpy as np
import pytest

from sims.spindiode import (
    MagnetArray,
    SpinDiodeMaterial,
    bond_transmission,
    chain_network,
    kittel_field_oe,
    kittel_frequency_hz,
    kittel_slope_hz_per_oe,
    lineshapes,
    linewidth_hz,
    rectified_voltage_v,
)

MAT = SpinDiodeMaterial()


def test_kittel_inverse_even_and_slope():
    fields = np.array([-250.0, -40.0, 5.0, 59.0, 140.0, 600.0])
    f = kittel_frequency_hz(fields)
    np.testing.assert_allclose(kittel_field_oe(f), np.abs(fields), rtol=1e-10)
    np.testing.assert_allclose(kittel_frequency_hz(-fields), f)
    h = 60.0
    numeric = (kittel_frequency_hz(h + 1e-3) - kittel_frequency_hz(h - 1e-3)) / 2e-3
    assert kittel_slope_hz_per_oe(h) == pytest.approx(numeric, rel=1e-6)
    # the thesis's "typical frequency dependence of 175 MHz/mT" (17.5 MHz/Oe), 3.4.2
    assert kittel_slope_hz_per_oe(h) == pytest.approx(17.5e6, rel=0.1)


def test_defaults_reproduce_the_chapter_3_spacings():
    """1.75/2.25/2.75/3.25 GHz synapses are 175/216/245 um apart at 140 Oe/mm (thesis 3.6)."""
    fields = kittel_field_oe(np.array([1.75e9, 2.25e9, 2.75e9, 3.25e9]))
    spacing_um = np.diff(fields) / 140.0 * 1e3
    np.testing.assert_allclose(spacing_um, [175, 216, 245], atol=15)


def test_linewidth_is_eq_2_10_and_lineshapes_have_their_symmetry():
    h = 59.0
    fr = float(kittel_frequency_hz(h))
    # at resonance eq. 2.10 reduces to alpha * gamma * (2H + M) / 2
    assert linewidth_hz(fr, h) == pytest.approx(0.01 * 2.9e6 * (2 * h + 9680) / 2)
    w = float(linewidth_hz(fr, h))
    d = np.linspace(-5 * w, 5 * w, 101)
    anti, sym = lineshapes(fr + d, fr, w)
    np.testing.assert_allclose(anti, -anti[::-1], atol=1e-15)
    np.testing.assert_allclose(sym, sym[::-1], atol=1e-15)
    a_peak, s_peak = lineshapes(fr - w, fr, w)
    assert (a_peak, s_peak) == pytest.approx((0.5, 0.5))
    assert lineshapes(fr, fr, w)[1] == pytest.approx(1.0)


def test_rectified_voltage_linear_in_power_sign_and_parts():
    h = 59.0
    f = np.linspace(1.6e9, 2.8e9, 301)
    v1 = rectified_voltage_v(f, h, 1e-3)
    np.testing.assert_allclose(rectified_voltage_v(f, h, 7e-3), 7 * v1, rtol=1e-12)
    np.testing.assert_allclose(rectified_voltage_v(f, h, 1e-3, sin2phi0=-1.0), -v1)
    anti, sym = rectified_voltage_v(f, h, 1e-3, parts=True)
    np.testing.assert_allclose(anti + sym, v1, rtol=1e-12)
    # the antisymmetric part changes sign at the Kittel resonance (eq. 2.11's minus sign:
    # negative below resonance for sin(2 Phi_0) = +1)
    fr = float(kittel_frequency_hz(h))
    assert rectified_voltage_v(fr - 50e6, h, 1e-3, parts=True)[0] < 0
    assert rectified_voltage_v(fr + 50e6, h, 1e-3, parts=True)[0] > 0
    assert abs(rectified_voltage_v(fr, h, 1e-3, parts=True)[0]) < 1e-18
    # the sensitivity is the antisymmetric peak per W near the reference frequency
    peak = np.max(np.abs(rectified_voltage_v(np.linspace(1.5e9, 2.5e9, 4001),
                                             kittel_field_oe(2e9), 1.0, phase_deg=0.0)))
    assert peak == pytest.approx(MAT.sensitivity_v_per_w, rel=0.1)


def test_peaks_shrink_with_frequency_and_damping():
    def peak(freq_hz: float, alpha: float) -> float:
        h = float(kittel_field_oe(freq_hz))
        f = np.linspace(freq_hz - 0.5e9, freq_hz + 0.5e9, 2001)
        return float(np.max(np.abs(rectified_voltage_v(f, h, 1e-3, alpha=alpha, phase_deg=0))))

    assert peak(3.25e9, 0.01) < 0.7 * peak(1.75e9, 0.01)
    # eq. 2.10: A_yy ~ 1/alpha (the wider line samples A_yy a little lower in frequency)
    assert peak(2e9, 0.02) == pytest.approx(peak(2e9, 0.01) / 2, rel=0.1)


def synapse_v(freq_hz: np.ndarray, center_oe: float, dz_um: float, gradient: float = 140.0):
    """Two opposite diodes at z -+ dz/2 in parallel (thesis 2.7.3; eq. 3.2 as a difference)."""
    h_plus = center_oe - gradient * dz_um * 1e-3 / 2
    h_minus = center_oe + gradient * dz_um * 1e-3 / 2
    return 0.5 * (rectified_voltage_v(freq_hz, h_plus, 1e-3)
                  + rectified_voltage_v(freq_hz, h_minus, 1e-3, sin2phi0=-1.0))


def test_double_diode_synapse_peak_sign_and_linearity_in_dz():
    f = np.linspace(1.5e9, 3.0e9, 1501)
    h = 59.0
    assert np.max(np.abs(synapse_v(f, h, 0.0))) < 1e-15
    plus, minus = synapse_v(f, h, 40.0), synapse_v(f, h, -40.0)
    # one peak; the side lobes of a difference of antilorentzians are ~1/8 of it (plus a
    # little from the symmetric part), not a background
    assert plus.max() > 4 * abs(plus.min())
    assert minus.min() < -4 * minus.max()
    assert plus.max() == pytest.approx(-minus.min(), rel=0.05)
    small = [synapse_v(f, h, dz).max() for dz in (2.0, 4.0, 8.0)]
    assert small[1] / small[0] == pytest.approx(2.0, rel=0.02)
    assert small[2] / small[0] == pytest.approx(4.0, rel=0.05)
    # narrow peak, little background half a GHz away (thesis 3.4.3)
    fr = float(kittel_frequency_hz(h))
    off = synapse_v(np.array([fr + 0.5e9]), h, 40.0)[0]
    assert abs(off) < 0.1 * plus.max()


def test_chain_network_eq_3_1():
    # 2x2 mixed chain of 100 Ohm diodes pairs (8 diodes): R = M R_syn / P = R_syn = 50 Ohm
    r = np.full(8, 100.0)
    block = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    r_chain, frac, weight = chain_network(r, block)
    assert r_chain == pytest.approx(50.0)
    assert frac.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(weight, 0.25)
    # series of single diodes: every emf counts fully; parallel: the mean
    assert chain_network(r[:3], np.arange(3))[0] == pytest.approx(300.0)
    np.testing.assert_allclose(chain_network(r[:3], np.arange(3))[2], 1.0)
    # unequal diodes in a block: current divides by conductance
    _, frac, weight = chain_network(np.array([50.0, 100.0]), np.array([0, 0]))
    assert frac[0] == pytest.approx(2 * frac[1])
    assert weight == pytest.approx([2 / 3, 1 / 3])


def test_bond_transmission():
    f = np.linspace(0.5e9, 4e9, 50)
    np.testing.assert_allclose(bond_transmission(f, 50.0, 0.0, 0.0), 1.0)
    t = bond_transmission(f, 50.0, 3e-9, 0.0)
    assert np.all(t <= 1.0) and np.all(np.diff(t) < 0)
    assert bond_transmission(2e9, 100.0, 0.0)[()] == pytest.approx(1 - (1 / 3) ** 2)


def test_magnet_field_gradient_and_maxwell():
    mag = MagnetArray()
    hx, hy, hz = mag.field_oe(0.0, 0.0, 0.0)
    assert hz == pytest.approx(0.0) and hx == pytest.approx(2.0) and hy == pytest.approx(3.0)
    e = 1e-4
    grad = (mag.field_oe(0, 0, e)[2] - mag.field_oe(0, 0, -e)[2]) / (2 * e)
    assert grad == pytest.approx(140.0, rel=1e-4)
    # within +-2 mm the gradient softens by less than 1 %
    assert mag.field_oe(0, 0, 2.0)[2] == pytest.approx(280.0, rel=0.01)
    rng = np.random.default_rng(0)

    def d(point: np.ndarray, i: int, axis: int) -> float:
        step = np.zeros(3)
        step[axis] = e
        hi, lo = mag.field_oe(*(point + step)), mag.field_oe(*(point - step))
        return float((hi[i] - lo[i]) / (2 * e))

    for point in rng.uniform(-2, 2, (5, 3)):
        div = d(point, 0, 0) + d(point, 1, 1) + d(point, 2, 2)
        curl = (d(point, 2, 1) - d(point, 1, 2), d(point, 0, 2) - d(point, 2, 0),
                d(point, 1, 0) - d(point, 0, 1))
        assert abs(div) < 1e-5 and max(map(abs, curl)) < 1e-5


def test_resonance_shift_moves_the_line_and_keeps_it_linear_in_power():
    """Thesis 2.7.1: heating moves f_r (the caller gives the shift); V stays linear in P."""
    h = 59.0
    f = np.linspace(1.8e9, 2.6e9, 8001)
    fr = float(kittel_frequency_hz(h))
    anti = rectified_voltage_v(f, h, 1e-3, resonance_shift_hz=-5e6, parts=True)[0]
    crossing = f[np.argmin(np.abs(anti[(f > fr - 50e6) & (f < fr + 50e6)])) +
                 np.searchsorted(f, fr - 50e6)]
    assert crossing == pytest.approx(fr - 5e6, abs=2e5)
    np.testing.assert_allclose(rectified_voltage_v(f, h, 3e-3, resonance_shift_hz=-5e6),
                               3 * rectified_voltage_v(f, h, 1e-3, resonance_shift_hz=-5e6),
                               rtol=1e-12)
    assert MAT.power_shift_hz_per_w < 0  # heating lowers M_s, hence f_r
