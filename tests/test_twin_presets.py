"""Twin calibration where the presets live (issue 23).

``tests/test_twin.py`` calibrates at S = 1 and Q = 0, where the twin's drive model cannot tell a
missing ``S`` or a wrong-signed ``Q`` term from the right one. Here the simulated chips take the
``digits`` preset's values (S = 0.843, tau, bias range b_clip, integration) and a harder corner
(S = 0.5, Q = 0.3), with 20 % mismatch of gamma and sigma, and the identified gamma_i, sigma_i
are checked against each chip's true values (``describe()["parameters"]["current"]``).

The claim (tests/test_twin.py, issue 16's Done-when; ``calibration_errors``' ``within_2pct``):
every identified oscillator within 2 % at the default chip's noise. Measured (seeds 0-4,
16 oscillators, default 512 repeats): at the digits preset's S, max 1.5 % (gamma) and 1.4 %
(sigma), so 2 % is tested there. At S = 0.5 the bias levels span half the drive and the fit is
noise limited: max 1.4-2.3 % over seeds 0-4 (2.25 % gamma at seed 0; 1.1 % with 4x the repeats),
so there the default calibration does NOT hold 2 % on every chip; the test asserts 3 % and a
median below 1 % (measured at most 0.74 %). It is the smaller S, not Q, that costs precision:
seed 0 at S = 0.5, Q = 0 gives 2.33 %; at S = 0.843, Q = 0.3, 1.50 %.

The chips have 1 layer of 16 oscillators: with every weight at zero each oscillator is probed
alone, so the layer structure of the preset (3 x 32) adds run time, not coverage
(``test_full_digits_preset_chip_within_2_percent``, slow, runs all 96).
"""

import dataclasses

import numpy as np
import pytest

from calibration.reference import GAMMA_HZ_PER_OE, GRADIENT_OE_PER_MM, ReferenceMap, SweepPlan, kittel_hz
from hil.chip.backends import make_backend
from hil.chip.twin import calibrate, calibration_errors
from hil.config import ModelConfig, load_config

CENTRE = 0.3
# the chip without noise or programming error: what is left is mismatch and static offsets
NOISELESS = ["cv_gamma=0.2", "cv_sigma=0.2", "offset_std=0.01", "weight_bits=null", "program_noise=0",
             "synapse_gain_cv=0", "thermal_d_ghz=0", "readout_noise=0", "drift_per_sqrt_s=0"]


def digits_model(**changes) -> ModelConfig:
    mc = load_config(preset="digits").model
    assert mc.S == pytest.approx(0.843) and mc.q == 0.0  # the values this file is about
    return dataclasses.replace(mc, **{"n_layers": 1, "n_hidden": 16, **changes})


def calibrated(mc: ModelConfig, seed: int, device=None, **kw) -> dict:
    be = make_backend("sim", mc, 1, CENTRE, seed, device)
    tp = calibrate(be, mc, **kw)
    truth = be.describe()["parameters"]["current"]
    assert np.allclose(truth["q"], mc.q)  # Q is held at its nominal value by the fit
    # there was mismatch to identify: the nominal values are far off
    assert np.abs(np.asarray(truth["gamma_ghz"]) * mc.tau_ns - 1).max() > 0.1
    assert np.abs(np.asarray(truth["sigma"]) / mc.sigma - 1).max() > 0.1
    return calibration_errors(tp, truth)


CORNERS = {"digits_S": {}, "S0.5_Q0.3": {"S": 0.5, "q": 0.3}}


@pytest.mark.parametrize("corner", CORNERS)
def test_calibration_is_exact_on_a_noiseless_chip_at_the_presets_values(corner):
    """Without noise the step responses are the twin's closed form: the fit is exact (measured
    max relative error < 1e-6 at both corners). A twin that drops S from the drive makes sigma
    15.7 % (S = 0.843) or 50 % (S = 0.5) wrong; one with the sign of Q flipped makes gamma
    86 % wrong at Q = 0.3 (measured, issue 23)."""
    err = calibrated(digits_model(**CORNERS[corner]), 0, NOISELESS, repeats=4, writes=1)
    assert err["identified"] == 16
    assert err["gamma_ghz"]["max_rel"] < 1e-4, err
    assert err["sigma"]["max_rel"] < 1e-4, err
    assert err["offset_ghz"]["max_abs"] < 1e-5, err


def test_calibration_within_2_percent_at_the_digits_preset():
    """The claim at the digits preset's values (S = 0.843), default chip: 20 % mismatch, thermal
    and readout noise, 8-bit weights, write errors, offsets and drift. Measured on seed 0: max
    1.53 % (gamma), 1.16 % (sigma), medians 0.27 % / 0.21 %."""
    err = calibrated(digits_model(), 0)
    assert err["identified"] >= 15
    for key in ("gamma_ghz", "sigma"):
        assert err[key]["max_rel"] < 0.02, (key, err[key])
        assert err[key]["within_2pct"] == 1.0
    assert err["offset_ghz"]["max_abs"] < 0.005  # measured 0.0021 GHz


def test_calibration_at_half_the_gain_and_nonlinear_damping():
    """S = 0.5, Q = 0.3, default chip. Measured on seed 0: max 2.25 % (gamma), 1.94 % (sigma),
    medians 0.49 % / 0.45 %: noise limited (see the module docstring), so 3 % here."""
    err = calibrated(digits_model(S=0.5, q=0.3), 0)
    assert err["identified"] >= 15
    for key in ("gamma_ghz", "sigma"):
        assert err[key]["max_rel"] < 0.03, (key, err[key])
        assert err[key]["median_rel"] < 0.01, (key, err[key])
    assert err["offset_ghz"]["max_abs"] < 0.005  # measured 0.0020 GHz


@pytest.mark.slow
def test_full_digits_preset_chip_within_2_percent():
    """All 96 oscillators of the digits preset (3 x 32) on the default chip (~10 s). Measured on
    seed 0: max 1.38 % (gamma), 1.45 % (sigma), one oscillator below threshold (unidentified)."""
    mc = load_config(preset="digits").model
    err = calibrated(mc, 0)
    assert err["identified"] >= 94
    for key in ("gamma_ghz", "sigma"):
        assert err[key]["max_rel"] < 0.02, (key, err[key])


# --------------------------------------------------------------------------- the Kittel refit

def test_kittel_refit_uses_both_field_signs(mocker):
    """The reference map's Kittel fit (eq. 2.9, ``ReferenceMap.fit_kittel``) must use both sides
    of the field zero. Resonances are made from the Kittel law in a gradient that is not quite
    linear, H = G u (1 + kappa u) with kappa = 0.02 / mm (the field 4.6 % stronger on one side
    than on the other at 2.3 mm): the two sides' errors cancel to first order. Measured: both
    sides give M_eff 9673 Oe for the true 9680 (0.07 %); either side alone 10160 or 9185 Oe
    (5 % off)."""
    z0, meff, kappa = 20.137, 9680.0, 0.02
    stage = np.round(np.arange(17.5, 22.81, 0.1), 4)  # +-2.6 mm around the field zero
    u = z0 - stage
    fr = kittel_hz(GRADIENT_OE_PER_MM * u * (1 + kappa * u), meff, GAMMA_HZ_PER_OE)
    m = ReferenceMap(SweepPlan(devices={"ref": 1}, stage_z_mm=list(stage), freq_hz=[1e9, 5e9]), [])
    mocker.patch.object(m, "resonance_hz", return_value=fr)  # the measured resonances
    fit = m.fit_kittel()
    h = np.abs(GRADIENT_OE_PER_MM * (fit.stage_z0_mm - stage))
    in_range = (h > 40) & (h < 320)
    assert fit.n_points == in_range.sum() == 40
    assert ((stage < fit.stage_z0_mm) & in_range).sum() == ((stage > fit.stage_z0_mm) & in_range).sum()
    assert abs(fit.meff_oe / meff - 1) < 0.005, fit  # one side alone: 5 % off
    assert abs(fit.stage_z0_mm - z0) < 0.05, fit  # measured 0.026 mm
