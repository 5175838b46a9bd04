"""Fast checks of hil/chip/twin.py against synthetic truth (written to kill mutmut's survivors,
scripts/mutation.sh): step responses of a recording backend, the closed-form response, a fit of
exact logistic traces with known gamma/sigma/offset, program-and-verify on an ideal chip with a
known synapse gain error, and the bookkeeping around them."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch

from hil.chip import twin
from hil.chip.backends import Backend, BackendSpec, Measurement, ModelBackend, make_backend
from hil.chip.twin import (
    TwinParameters,
    apply_twin,
    calibrate,
    calibration_errors,
    fit_step_responses,
    identify_parameters,
    logistic_response,
    program_and_verify,
    step_responses,
    twin_of,
)
from hil.config import ModelConfig
from hil.errors import ConfigError
from hil.network.model import DynamicalNetwork

CENTRE = 0.3
MC = ModelConfig(n_layers=2, n_hidden=8, tau_ns=5.0, S=1.0, S_in=2.5, b_in=0.4, w_clip_dt=0.9, b_clip_dt=0.2)


# --------------------------------------------------------------------------- step responses

class Recorder(Backend):
    """A chip that records every upload and answers each run with states that encode the call:
    sequence s of run r has state ``bias + 0.01 t + 0.1 m`` plus ``(-1)^s e`` (zero mean over
    an even batch), so averages can be checked exactly."""

    name = "recorder"

    def __init__(self, b_max: float = 0.2, offers_states: bool = True) -> None:
        super().__init__(BackendSpec(n_in=2, n_layers=2, n_hidden=3, dt_ns=1.0, w_max=1.0,
                                     b_max=b_max, offers_states=offers_states))
        self.layers: list[list[dict[str, np.ndarray]]] = []
        self.batches: list[tuple[int, ...]] = []

    def _upload(self, layers: list[dict[str, np.ndarray]]) -> float:
        self.layers.append(layers)
        return 0.5

    def _run(self, inputs: np.ndarray) -> Measurement:
        self.batches.append(inputs.shape)
        B, T, _ = inputs.shape
        b = float(self.layers[-1][0]["b"][0])
        base = b + 0.01 * np.arange(T)[:, None] + 0.1 * np.arange(self.spec.M)[None, :]
        sign = np.where(np.arange(B) % 2 == 0, 1.0, -1.0)[:, None, None]
        states = base[None] + 0.05 * sign * (B % 2 == 0)
        return Measurement(states[..., -3:], states, states, 0.25)

    def _describe(self) -> dict[str, Any]:
        return {}


def test_step_responses_upload_zero_weights_and_average_every_level() -> None:
    be = Recorder()
    biases, means = step_responses(be, levels=(-1.0, 0.5, 1.0), repeats=10, n_points=5, writes=4)
    np.testing.assert_allclose(biases, [-0.2, 0.1, 0.2])
    assert means.shape == (3, 5, 6)
    expect = biases[:, None, None] + 0.01 * np.arange(5)[None, :, None] + 0.1 * np.arange(6)[None, None, :]
    np.testing.assert_allclose(means, expect, atol=1e-12)
    # 10 repeats over 4 writes: 3, 3, 2, 2 sequences, the levels interleaved within each write
    assert [s[0] for s in be.batches] == [3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2]
    assert all(s[1:] == (5, 2) for s in be.batches)
    assert [float(up[0]["b"][0]) for up in be.layers] == pytest.approx([-0.2, 0.1, 0.2] * 4)
    for up in be.layers:
        assert [layer["W_ext"].shape for layer in up] == [(3, 2), (3, 3)]
        assert all(layer["W_int"].shape == (3, 3) for layer in up)
        for layer in up:
            assert not layer["W_ext"].any() and not layer["W_int"].any()
            assert layer["b"].shape == (3,) and (layer["b"] == layer["b"][0]).all()


def test_step_responses_limits_and_an_unbounded_bias_range() -> None:
    biases, means = step_responses(Recorder(b_max=math.inf), levels=(-1.0, 0.0, 0.5), repeats=1,
                                   n_points=2, writes=1)  # the smallest valid probe
    np.testing.assert_allclose(biases, [-1.0, 0.0, 0.5])  # no finite range: fractions of 1
    assert means.shape == (3, 2, 6)
    biases, _ = step_responses(Recorder(), levels=(1.0,), repeats=3, n_points=3, writes=3)
    np.testing.assert_allclose(biases, [0.2])
    be = Recorder()
    biases, means = step_responses(be)  # the defaults: 3 levels, 512 repeats in 8 writes, 60 points
    np.testing.assert_allclose(biases, [-0.2, 0.0, 0.2])
    assert means.shape == (3, 60, 6) and [s[0] for s in be.batches] == [64] * 24
    for kw in ({"writes": 0, "repeats": 4}, {"writes": 5, "repeats": 4}, {"n_points": 1}):
        with pytest.raises(ConfigError, match="^calibration: need writes >= 1"):
            step_responses(Recorder(), **{"repeats": 4, "writes": 2, "n_points": 3, **kw})
    with pytest.raises(twin.BackendError, match="recorder: calibration needs per-oscillator states"):
        step_responses(Recorder(offers_states=False))


# --------------------------------------------------------------------------- the closed form

def test_logistic_response_closed_form_and_its_r_to_zero_limit() -> None:
    t = torch.tensor([0.0, 0.5, 2.0, 7.0], dtype=torch.float64)
    def f64(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float64)

    x0, r, a = f64(0.3), f64(0.4), 0.9
    expect = 0.3 * torch.exp(0.4 * t) / (1 + 0.9 * 0.3 * (torch.exp(0.4 * t) - 1) / 0.4)
    torch.testing.assert_close(logistic_response(t, x0, r, f64(a)), expect)
    # r -> 0: x0 / (1 + a x0 t), for r exactly 0 and for r below the 1e-9 switch
    for r0 in (0.0, 5e-10, -5e-10):
        got = logistic_response(t, x0, f64(r0), f64(a))
        torch.testing.assert_close(got, 0.3 / (1 + 0.9 * 0.3 * t), rtol=1e-8, atol=1e-12)
    # r just above the switch uses expm1(rt) / r, which agrees with the limit to O(r t)
    got = logistic_response(t, x0, f64(2e-9), f64(a))
    torch.testing.assert_close(got, 0.3 / (1 + 0.9 * 0.3 * t), rtol=1e-7, atol=1e-12)
    # decaying (r < 0): settles at 0 with the exact shape
    got = logistic_response(t, x0, f64(-0.5), f64(0.2))
    expect = 0.3 * torch.exp(-0.5 * t) / (1 + 0.2 * 0.3 * (torch.exp(-0.5 * t) - 1) / -0.5)
    torch.testing.assert_close(got, expect)


# --------------------------------------------------------------------------- the fit

FIT_CFG = dataclasses.replace(MC, n_layers=1, n_hidden=6, S=0.7, q=0.2)
LEVELS = np.array([-0.15, 0.0, 0.15])


def traces(gamma: np.ndarray, sigma: np.ndarray, c: np.ndarray, x0: np.ndarray, cfg: ModelConfig = FIT_CFG,
           T: int = 60, dt: float = 1.0, levels: np.ndarray = LEVELS) -> np.ndarray:
    """Exact step responses (J, T, M) of oscillators with the given physics (module doc of twin)."""
    g, s, cc, x = (torch.as_tensor(v, dtype=torch.float64) for v in (gamma, sigma, c, x0))
    t = (torch.arange(1, T + 1, dtype=torch.float64) * dt).view(1, T, 1)
    drive = cfg.S * torch.as_tensor(levels, dtype=torch.float64).view(-1, 1, 1) + cc
    return logistic_response(t, x, s * drive - g, s * drive + g * cfg.q).numpy()


TRUE_G = np.array([0.17, 0.22, 0.2, 0.25, 0.15, 0.19])
TRUE_S = np.array([1.2, 0.85, 1.0, 0.9, 1.1, 0.95])
TRUE_C = np.array([0.42, 0.47, 0.38, 0.5, 0.44, 0.41])
TRUE_X0 = np.array([0.4, 0.35, 0.5, 0.45, 0.3, 0.55])


def test_fit_recovers_known_physics_from_exact_traces() -> None:
    """S = 0.7 and Q = 0.2 enter the drive model: a fit that drops either is far off."""
    means = traces(TRUE_G, TRUE_S, TRUE_C, TRUE_X0, dt=0.5)
    tp = fit_step_responses(LEVELS, means, FIT_CFG, dt_ns=0.5)
    np.testing.assert_allclose(tp.gamma_ghz, TRUE_G, rtol=1e-5)
    np.testing.assert_allclose(tp.sigma, TRUE_S, rtol=1e-5)
    np.testing.assert_allclose(tp.b_fixed, TRUE_C, atol=1e-6)
    np.testing.assert_allclose(tp.offset_ghz, TRUE_C - FIT_CFG.b_fixed_value, atol=1e-6)
    np.testing.assert_array_equal(tp.q, np.full(6, 0.2))
    assert tp.fit_rmse is not None and tp.fit_rmse.shape == (6,) and tp.fit_rmse.max() < 1e-6
    assert tp.source == "calibrated"
    assert tp.meta == {"levels_bias": LEVELS.tolist(), "n_points": 60, "unidentified": []}


def test_fit_rmse_is_the_residual_per_used_point() -> None:
    """Zero-mean +-e noise that the smooth response cannot follow: rmse ~ e, over the used
    traces only (here all three levels are used)."""
    means = traces(TRUE_G, TRUE_S, TRUE_C, TRUE_X0)
    e = 1e-3
    noisy = means + e * np.where(np.arange(60) % 2 == 0, 1.0, -1.0)[None, :, None]
    tp = fit_step_responses(LEVELS, noisy, FIT_CFG, dt_ns=1.0)
    assert tp.fit_rmse is not None
    np.testing.assert_allclose(tp.fit_rmse, e, rtol=0.05)
    np.testing.assert_allclose(tp.gamma_ghz, TRUE_G, rtol=0.01)


def test_fit_leaves_out_weak_traces_and_keeps_dead_oscillators_nominal() -> None:
    """Oscillator 0 settles low (< weak_signal) at the lowest level: that trace is corrupted
    and must be left out (its other two levels are strong). Oscillator 1 is below threshold
    at every level near zero: it keeps the nominal values and is listed as unidentified."""
    g, s, c = TRUE_G.copy(), TRUE_S.copy(), TRUE_C.copy()
    c[0] = 0.24  # settles at 0.055 at -0.15 (0.075 with the +0.02 below), 0.37 and 0.54 above
    c[1] = 0.1   # sigma (S b + c) < gamma at every level: decays to 0
    x0 = TRUE_X0.copy()
    x0[0], x0[1] = 0.9, 0.01  # oscillator 0 starts high: only the trace's end is weak
    means = traces(g, s, c, x0)
    settled = means[:, -60 // 8:].mean(1)
    assert settled[0, 0] + 0.02 < 0.15 <= min(settled[1, 0], settled[2, 0])
    assert means[0, 7:, 0].mean() + 0.02 > 0.15  # the mean past the start would count it strong
    assert means[1, :, 1].mean() < 0.02
    means[0, :, 0] += 0.02  # a noise-biased weak trace
    tp = fit_step_responses(LEVELS, means, FIT_CFG, dt_ns=1.0)
    assert tp.meta["unidentified"] == [1]
    nominal = (FIT_CFG.gamma, FIT_CFG.sigma, FIT_CFG.b_fixed_value)
    assert (tp.gamma_ghz[1], tp.sigma[1], tp.b_fixed[1]) == nominal
    assert tp.offset_ghz[1] == 0.0
    ok = [0, 2, 3, 4, 5]
    np.testing.assert_allclose(tp.gamma_ghz[ok], g[ok], rtol=1e-4)
    np.testing.assert_allclose(tp.sigma[ok], s[ok], rtol=1e-4)
    np.testing.assert_allclose(tp.b_fixed[ok], c[ok], atol=1e-5)
    assert tp.fit_rmse is not None and tp.fit_rmse[0] < 1e-6  # over the two used traces only


def test_fit_thresholds_are_parameters() -> None:
    """A raised min_signal declares every oscillator dead; a raised weak_signal (no oscillator
    with two strong levels) falls back to every trace, so the corrupted one biases the fit."""
    means = traces(TRUE_G, TRUE_S, TRUE_C, TRUE_X0)
    tp = fit_step_responses(LEVELS, means, FIT_CFG, dt_ns=1.0, min_signal=2.0)
    assert tp.meta["unidentified"] == list(range(6))
    np.testing.assert_array_equal(tp.gamma_ghz, np.full(6, FIT_CFG.gamma))
    c = TRUE_C.copy()
    c[0] = 0.24
    means = traces(TRUE_G, TRUE_S, c, TRUE_X0)
    means[0, :, 0] += 0.02
    tp = fit_step_responses(LEVELS, means, FIT_CFG, dt_ns=1.0, weak_signal=5.0)
    assert abs(tp.gamma_ghz[0] / TRUE_G[0] - 1) > 1e-3  # all three traces used
    np.testing.assert_allclose(tp.gamma_ghz[1:], TRUE_G[1:], rtol=1e-5)


def test_fit_judges_the_signal_at_the_level_nearest_zero() -> None:
    """Oscillator 0 starts at 0.01 and stays there at the lowest level (just below threshold)
    but grows at the others: it is identified (from the two strong traces), not dead."""
    g, s, c, x0 = TRUE_G[:2].copy(), TRUE_S[:2].copy(), TRUE_C[:2].copy(), TRUE_X0[:2].copy()
    g[0], s[0], c[0], x0[0] = 0.2, 1.0, 0.3, 0.01
    means = traces(g, s, c, x0)
    assert means[0, :, 0].mean() < 0.02 < means[1, :, 0].mean()
    tp = fit_step_responses(LEVELS, means, FIT_CFG, dt_ns=1.0)
    assert tp.meta["unidentified"] == []
    np.testing.assert_allclose(tp.gamma_ghz, g, rtol=1e-4)
    np.testing.assert_allclose(tp.sigma, s, rtol=1e-4)
    # the same probe with the levels in another order
    order = [2, 0, 1]
    tp = fit_step_responses(LEVELS[order], means[order], FIT_CFG, dt_ns=1.0)
    assert tp.meta["unidentified"] == []
    np.testing.assert_allclose(tp.gamma_ghz, g, rtol=1e-4)


def test_fit_from_far_off_nominal_values() -> None:
    """Chips 3x faster / 4x slower than nominal (gamma 0.6 and 0.05 against 0.2, sigma 0.4 to 3):
    the LM steps must be controlled to get there; every value recovered to 1e-6."""
    g, s = np.array([0.6, 0.05, 0.45]), np.array([2.5, 0.4, 3.0])
    c, x0 = np.array([0.4, 0.3, 0.25]), np.array([0.3, 0.5, 0.2])
    tp = fit_step_responses(LEVELS, traces(g, s, c, x0), FIT_CFG, dt_ns=1.0)
    np.testing.assert_allclose(tp.gamma_ghz, g, rtol=1e-6)
    np.testing.assert_allclose(tp.sigma, s, rtol=1e-6)
    np.testing.assert_allclose(tp.b_fixed, c, atol=1e-7)


def test_fit_iterations_are_needed_and_the_neuron_is_checked() -> None:
    means = traces(TRUE_G, TRUE_S, TRUE_C, TRUE_X0)
    tp = fit_step_responses(LEVELS, means, FIT_CFG, dt_ns=1.0, iters=0)  # the starting point
    np.testing.assert_allclose(tp.gamma_ghz, FIT_CFG.gamma)
    np.testing.assert_allclose(tp.sigma, FIT_CFG.sigma)
    np.testing.assert_allclose(tp.b_fixed, FIT_CFG.b_fixed_value)
    tp = fit_step_responses(LEVELS, means, FIT_CFG, dt_ns=1.0, iters=3)
    assert np.abs(tp.gamma_ghz / TRUE_G - 1).max() > 1e-4  # not converged in 3 steps
    with pytest.raises(ConfigError, match="^model.neuron: step-response.*'ctrnn'"):
        fit_step_responses(LEVELS, means, dataclasses.replace(FIT_CFG, neuron="ctrnn"), dt_ns=1.0)


def test_calibrate_probes_and_records_how() -> None:
    """A noiseless simulated chip at dt = 0.5 ns (the fit must use the chip's dt)."""
    mc = dataclasses.replace(MC, dt_ns=0.5, n_layers=1)
    be = make_backend("sim", mc, 1, CENTRE, 1,
                      ["cv_gamma=0.2", "cv_sigma=0.2", "offset_std=0.01", "weight_bits=null",
                       "program_noise=0", "synapse_gain_cv=0", "thermal_d_ghz=0", "readout_noise=0",
                       "drift_per_sqrt_s=0"])
    tp = calibrate(be, mc, levels=(-1.0, 0.0, 0.5), repeats=3, n_points=80, writes=3)
    err = calibration_errors(tp, be.describe()["parameters"]["current"])
    assert err["gamma_ghz"]["max_rel"] < 5e-3 and err["sigma"]["max_rel"] < 5e-3
    assert be.counters["uploads"] == 9 and be.counters["sequences"] == 9
    assert tp.meta["n_points"] == 80
    assert tp.meta["levels_bias"] == pytest.approx([-be.spec.b_max, 0.0, 0.5 * be.spec.b_max])
    assert {k: tp.meta[k] for k in ("repeats", "writes", "levels_fraction")} == {
        "repeats": 3, "writes": 3, "levels_fraction": [-1.0, 0.0, 0.5]}
    assert tp.meta["device_time_s_after"] == be.counters["device_time_s"] > 0


def test_calibrate_defaults() -> None:
    """The default probe: the three levels, 512 repeats in 8 writes, 60 points."""
    be = Recorder()
    tp = calibrate(be, dataclasses.replace(FIT_CFG, n_hidden=3, n_layers=2))
    assert {k: tp.meta[k] for k in ("repeats", "writes", "n_points", "levels_fraction")} == {
        "repeats": 512, "writes": 8, "n_points": 60, "levels_fraction": [-1.0, 0.0, 1.0]}
    assert be.counters["uploads"] == 24 and be.counters["sequences"] == 3 * 512


def test_calibration_errors_by_hand() -> None:
    tp = TwinParameters(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 1.0, 1.0, 9.0]), np.zeros(4),
                        np.zeros(4), np.array([0.1, 0.2, -0.3, 5.0]), meta={"unidentified": [3]})
    truth = {"gamma_ghz": [1.01, 2.0, 2.94, 1.0], "sigma": [1.0, 1.0, 0.5, 1.0],
             "offset_ghz": [0.1, 0.25, -0.2, 0.0]}
    err = calibration_errors(tp, truth)
    assert err["identified"] == 3 and err["unidentified"] == 1
    rel_g = np.abs(np.array([1 / 1.01, 1.0, 3 / 2.94]) - 1)
    assert err["gamma_ghz"]["max_rel"] == pytest.approx(rel_g.max())
    assert err["gamma_ghz"]["median_rel"] == pytest.approx(np.median(rel_g))
    assert err["gamma_ghz"]["within_2pct"] == pytest.approx(2 / 3)
    assert err["sigma"] == {"max_rel": 1.0, "median_rel": 0.0, "within_2pct": pytest.approx(2 / 3)}
    assert err["offset_ghz"]["max_abs"] == pytest.approx(0.1)
    assert err["offset_ghz"]["rms_abs"] == pytest.approx(math.sqrt((0 + 0.05 ** 2 + 0.1 ** 2) / 3))
    # no meta: every oscillator identified
    tp2 = TwinParameters(np.array([1.015]), np.array([0.985]), np.zeros(1), np.zeros(1), np.zeros(1))
    err = calibration_errors(tp2, {"gamma_ghz": [1.0], "sigma": [1.0], "offset_ghz": [0.0]})
    assert err["identified"] == 1 and err["unidentified"] == 0
    assert err["gamma_ghz"]["within_2pct"] == 1.0 and err["sigma"]["within_2pct"] == 1.0


# --------------------------------------------------------------------------- twin networks

def test_twin_of_reads_back_what_apply_twin_set() -> None:
    net = DynamicalNetwork([MC], 1, 2, [0], CENTRE)
    M = net.M
    rng = np.random.default_rng(1)
    tp = TwinParameters(0.2 * rng.uniform(0.8, 1.2, M), rng.uniform(0.8, 1.2, M), rng.uniform(0, 0.2, M),
                        MC.b_fixed_value + rng.normal(0, 0.01, M), np.zeros(M))
    apply_twin(net, 0, tp)
    got = twin_of(net, 0)
    np.testing.assert_allclose(got.gamma_ghz, tp.gamma_ghz, rtol=1e-6)
    np.testing.assert_allclose(got.sigma, tp.sigma, rtol=1e-6)
    np.testing.assert_allclose(got.q, tp.q, rtol=1e-6)
    np.testing.assert_allclose(got.b_fixed, tp.b_fixed, rtol=1e-6)
    np.testing.assert_allclose(got.offset_ghz, tp.b_fixed - MC.b_fixed_value, atol=1e-6)
    assert got.source == "model" and got.fit_rmse is None
    assert all(v.dtype == np.float64 for v in (got.gamma_ghz, got.sigma, got.q, got.b_fixed))
    for v in (got.gamma_ghz, got.sigma, got.q, got.b_fixed):  # copies: the network is untouched
        v[:] = -1.0
    assert float(net.gamma.min()) > 0 and float(net.sigma.min()) > 0 and float(net.b_fixed.min()) > 0
    assert float(net.q.min()) >= 0


# --------------------------------------------------------------------------- program and verify

class GainChip(ModelBackend):
    """The ideal model as a chip whose every synapse is ``gain`` times what is uploaded."""

    def __init__(self, model: ModelConfig, gain: float, n_in: int = 1, b_offset: float = 0.0) -> None:
        super().__init__(model, n_in, CENTRE)
        self.gain, self.b_offset = gain, b_offset

    def _upload(self, layers: list[dict[str, np.ndarray]]) -> float:
        return super()._upload([{"W_ext": self.gain * layer["W_ext"], "W_int": self.gain * layer["W_int"],
                                 "b": layer["b"] + self.b_offset} for layer in layers])


PV_CFG = dataclasses.replace(MC, n_hidden=3, highpass=False, w_clip_dt=0.9)
PROBE = torch.rand(6, 12, 1, generator=torch.Generator().manual_seed(0))


def pv_net(seed: int = 3, n_in: int = 1) -> DynamicalNetwork:
    net = DynamicalNetwork([PV_CFG], n_in, 1, [seed], CENTRE)
    net.clip_parameters()
    return net


def test_identify_parameters_recovers_what_an_ideal_chip_runs() -> None:
    """The chip runs the network's weights times 0.5 (biases as they are): the fit, started
    from the network's weights, lands near the effective values (the one-point fit is not
    exact: the fit stops after 60 L-BFGS iterations)."""
    net = pv_net()
    be = GainChip(PV_CFG, 0.5)
    be.upload(net.layer_weights(0))
    m = be.run(PROBE)
    assert m.states is not None and m.filtered is not None
    eff = identify_parameters(net, 0, PROBE, m.states, m.filtered)
    err, size = [], []
    for li, layer in enumerate(net.layer_weights(0)):
        for key in ("W_ext", "W_int"):
            w = layer[key].numpy()
            np.testing.assert_array_equal(eff[li][key].numpy()[w == 0], 0.0)  # the mask holds
            err += (eff[li][key].numpy() - 0.5 * w)[w != 0].tolist()
            size += (0.5 * w)[w != 0].tolist()
        err += (eff[li]["b"].numpy() - layer["b"].numpy()).tolist()
    # measured: RMS error 0.03 against an RMS effective weight of 0.26 (worst 0.09, one neuron)
    assert np.sqrt(np.mean(np.square(err))) < 0.05 < 0.2 < np.sqrt(np.mean(np.square(size)))
    assert np.abs(err).max() < 0.12
    assert net.W_in.requires_grad  # the network itself is not touched


def test_program_and_verify_corrects_a_known_gain_and_reports_unreachable_weights() -> None:
    """Gain 0.8: every weight needs 1.25x its target uploaded; those above 0.72 (0.9 / 1.25)
    cannot be reached within w_max = 0.9 and are left out of the tolerance (seed 5: one of
    each sign)."""
    net = pv_net(5)
    target = net.layer_weights(0)
    be = GainChip(PV_CFG, 0.8)
    log: list[dict[str, Any]] = []
    rep = program_and_verify(net, 0, be, PROBE, tol=0.01, max_iters=4, log=log.append)
    assert rep.converged and log == rep.iterations
    assert [r["iteration"] for r in rep.iterations] == list(range(len(rep.iterations)))
    first, last = rep.iterations[0], rep.iterations[-1]
    assert first["max_abs_residual"] > 0.05 and first["unreachable"] == 0
    assert first["unreachable_max_abs_residual"] == 0.0
    assert last["max_abs_residual"] <= 0.01 < first["max_abs_residual"]
    assert last["state_rms"] < first["state_rms"]
    w_max = be.spec.w_max
    big = [np.abs(target[li][key].numpy()) > w_max / 1.25 + 0.02
           for li in range(2) for key in ("W_ext", "W_int")]
    n_big = int(sum(int(b.sum()) for b in big))
    assert n_big >= 2 and last["unreachable"] >= n_big
    assert last["unreachable_max_abs_residual"] > 0.01
    for li in range(2):
        for key in ("W_ext", "W_int"):
            t = target[li][key].numpy()
            up = rep.uploaded[li][key]
            np.testing.assert_array_equal(up[t == 0], 0.0)  # masked synapses stay zero
            assert np.abs(up).max() <= w_max + 1e-12
            small = (np.abs(t) < w_max / 1.25 - 0.02) & (t != 0)
            np.testing.assert_allclose(up[small], t[small] / 0.8, atol=0.06)
            far = np.abs(t) > w_max / 1.25 + 0.02
            np.testing.assert_allclose(up[far], np.sign(t[far]) * w_max)
            np.testing.assert_allclose(rep.residuals[li][key][small], 0.0, atol=0.01)
    assert set(first["parameters"]) == {f"layer{li}.{k}" for li in range(2) for k in ("W_ext", "W_int", "b")}


def test_program_and_verify_stops_after_max_iters() -> None:
    net = pv_net()
    rep = program_and_verify(net, 0, GainChip(PV_CFG, 0.8), PROBE, tol=0.0, max_iters=1)
    assert rep.converged is False and len(rep.iterations) == 2
    rep = program_and_verify(net, 0, GainChip(PV_CFG, 1.0), PROBE, tol=0.01, max_iters=3)
    assert rep.converged and len(rep.iterations) == 1  # an exact chip: nothing to correct
    assert rep.iterations[0]["state_rms"] < 1e-5
    for li, layer in enumerate(net.layer_weights(0)):  # nothing corrected: the target uploaded
        for key, v in layer.items():
            np.testing.assert_array_equal(rep.uploaded[li][key], v.double().numpy())
    assert rep.to_dict() == {"converged": True, "iterations": rep.iterations}
    # the identification's own integrator: one Euler step per point misreads an exact chip
    rep = program_and_verify(net, 0, GainChip(PV_CFG, 1.0), PROBE, tol=0.01, max_iters=0, substeps=1)
    assert not rep.converged and len(rep.iterations) == 1
    assert rep.iterations[0]["max_abs_residual"] > 0.03  # measured 0.076
    # the statistics are over the synapses that exist (and every bias)
    stats = rep.iterations[0]["parameters"]
    for li, layer in enumerate(net.layer_weights(0)):
        for key, v in layer.items():
            sel = rep.residuals[li][key][v.numpy() != 0] if key != "b" else rep.residuals[li][key]
            assert stats[f"layer{li}.{key}"]["rms"] == pytest.approx(float(np.sqrt((sel ** 2).mean())))
            assert stats[f"layer{li}.{key}"]["max_abs"] == pytest.approx(float(np.abs(sel).max()))


def test_program_and_verify_defaults_and_a_chip_without_states() -> None:
    """Gain 0.3 (two inputs): the residual shrinks by 0.7 per correction, so the default 3
    corrections and tolerance 0.01 end unconverged after 4 rounds (measured 0.63 -> 0.10)."""
    probe = torch.rand(6, 12, 2, generator=torch.Generator().manual_seed(1))
    rep = program_and_verify(pv_net(n_in=2), 0, GainChip(PV_CFG, 0.3, n_in=2), probe)
    assert not rep.converged and len(rep.iterations) == 4
    res = [r["max_abs_residual"] for r in rep.iterations]
    assert res[0] > 0.4 and 0.01 < res[-1] < 0.5 * res[0]
    with pytest.raises(twin.BackendError, match="recorder: program-and-verify needs per-oscillator states"):
        program_and_verify(pv_net(), 0, Recorder(offers_states=False), PROBE)


def test_program_and_verify_corrects_a_bias_whose_target_is_zero() -> None:
    """Every bias is checked, a zero one too: a chip adding 0.02 to every bias gets 0.02 less
    uploaded, also where the intended bias is exactly 0."""
    net = pv_net()
    with torch.no_grad():
        net.bias[0, 0] = 0.0
    rep = program_and_verify(net, 0, GainChip(PV_CFG, 1.0, b_offset=0.02), PROBE, tol=0.005, max_iters=3)
    assert rep.converged and rep.iterations[0]["max_abs_residual"] > 0.015
    assert rep.uploaded[0]["b"][0] == pytest.approx(-0.02, abs=0.005)
    layer1 = net.bias[0, 3:].detach().double().numpy()
    np.testing.assert_allclose(rep.uploaded[1]["b"], layer1 - 0.02, atol=0.005)


def test_stats_per_layer_and_empty_selections() -> None:
    res = [{"W_ext": np.array([[0.3, -0.4]]), "b": np.array([0.1, -0.2])}]
    masks = [{"W_ext": np.array([[True, True]]), "b": np.array([False, False])}]
    out = twin._stats(res, masks)
    assert out["layer0.W_ext"] == {"rms": pytest.approx(math.sqrt(0.125)), "max_abs": pytest.approx(0.4)}
    assert out["layer0.b"] == {"rms": 0.0, "max_abs": 0.0}
    assert list(out) == ["layer0.W_ext", "layer0.b"]
