"""The simulated oscillator-array chip: physics, non-idealities, seeding and reporting."""

import json
import math

import numpy as np
import pytest
import torch

from hil.config import ModelConfig
from hil.network.model import DynamicalNetwork
from sims.oscillator_device import DeviceConfig, DeviceConfigError, OscillatorArrayDevice

IDEAL = dict(cv_gamma=0.0, cv_sigma=0.0, offset_std=0.0, weight_bits=None, program_noise=0.0,
             synapse_gain_cv=0.0, thermal_d_ghz=0.0, readout_noise=0.0, drift_per_sqrt_s=0.0)
MC = ModelConfig(n_layers=2, n_hidden=6, tau_ns=5.0, S=1.0, S_in=2.5, b_in=0.4, w_clip_dt=0.9, b_clip_dt=0.2)


def cfg(**kw) -> DeviceConfig:
    base = dict(n_in=1, n_layers=2, n_hidden=6, tau_ns=5.0, S=1.0, S_in=2.5, b_in=0.4, input_centre=0.3,
                w_max=0.9, b_max=0.2)
    base.update(kw)
    return DeviceConfig(**base)


def zero_layers(c: DeviceConfig, b: float = 0.0):
    N = c.n_hidden
    return [{"W_ext": np.zeros((N, c.n_in if li == 0 else N)), "W_int": np.zeros((N, N)), "b": np.full(N, b)}
            for li in range(c.n_layers)]


def trained_like_net(seed: int = 0) -> DynamicalNetwork:
    net = DynamicalNetwork([MC], 1, 10, [seed], input_centre=0.3)
    net.clip_parameters()
    return net


def layers_of(net):
    return [{k: v.double().numpy() for k, v in lw.items()} for lw in net.layer_weights(0)]


def test_ideal_device_reproduces_the_model():
    """No mismatch, noise or drift, the model's integrator: the chip measures the model's states."""
    net = trained_like_net()
    dev = OscillatorArrayDevice(cfg(**IDEAL, method=MC.scheme, solver_substeps=MC.substeps), seed=3)
    dev.program(layers_of(net))
    u = torch.rand(5, 20, 1, generator=torch.Generator().manual_seed(0))
    r = dev.run(u.numpy())
    with torch.no_grad():
        xs, fin = net(u)
    np.testing.assert_allclose(r.states, xs[0].double().numpy(), atol=2e-5)
    np.testing.assert_allclose(r.filtered[:, -1], fin.y[0].double().numpy(), atol=2e-5)
    np.testing.assert_array_equal(r.outputs, r.states[..., 6:])


def test_heun_is_closer_to_the_ode_than_euler_at_the_same_step():
    net = trained_like_net(1)
    u = np.random.default_rng(0).random((4, 16, 1))
    out = {}
    for name, kw in {"ref": dict(method="heun", solver_substeps=64),
                     "heun": dict(method="heun", solver_substeps=4),
                     "euler": dict(method="euler", solver_substeps=4)}.items():
        d = OscillatorArrayDevice(cfg(**IDEAL, **kw), 0)
        d.program(layers_of(net))
        out[name] = d.run(u).states
    err_heun = np.abs(out["heun"] - out["ref"]).max()
    err_euler = np.abs(out["euler"] - out["ref"]).max()
    assert err_heun < err_euler / 5


def test_mismatch_draws_have_the_configured_mean_and_spread():
    c = cfg(n_layers=4, n_hidden=250, cv_gamma=0.2, cv_sigma=0.1, cv_q=0.0, offset_std=0.01)
    d = OscillatorArrayDevice(c, seed=7)
    for values, nominal, cv in ((d.gamma0, c.gamma, 0.2), (d.sigma0, 1.0, 0.1)):
        assert values.mean() == pytest.approx(nominal, rel=0.02)
        assert values.std() / values.mean() == pytest.approx(cv, rel=0.08)
        assert (values > 0).all()
    assert (d.q0 == 0).all()  # nominal Q = 0 stays 0
    assert d.offset0.std() == pytest.approx(0.01, rel=0.08)


def test_seeded_draws_and_everything_drawn_is_reported():
    a, b, c = (OscillatorArrayDevice(cfg(), s) for s in (5, 5, 6))
    np.testing.assert_array_equal(a.gamma0, b.gamma0)
    assert not np.array_equal(a.gamma0, c.gamma0)
    d = a.describe()
    json.dumps(d)  # plain JSON
    np.testing.assert_array_equal(d["drawn"]["gamma_ghz"], a.gamma0)
    np.testing.assert_array_equal(d["drawn"]["sigma"], a.sigma0)
    np.testing.assert_array_equal(d["drawn"]["offset_ghz"], a.offset0)
    np.testing.assert_array_equal(d["drawn"]["synapse_gain_error"][1]["W_int"], a.synapse_gain[1]["W_int"])
    assert d["identity"]["seed"] == 5 and d["config"]["cv_gamma"] == 0.2
    assert d["noise_streams"]["mismatch"]["draws"] == 3 * 12
    # same seed, same calls: the same measurement, noise included
    u = np.zeros((3, 5, 1))
    for dev in (a, b):
        dev.program(zero_layers(dev.config, 0.1))
    np.testing.assert_array_equal(a.run(u).states, b.run(u).states)


def test_programming_resolution_gain_error_write_noise_and_clipping():
    c = cfg(**{**IDEAL, "weight_bits": 4, "synapse_gain_cv": 0.05})
    d = OscillatorArrayDevice(c, 0)
    layers = zero_layers(c)
    layers[0]["W_ext"][:, 0] = [0.1, -0.33, 5.0, 0.0, 0.45, -0.9]
    layers[1]["W_int"][0, 1] = 0.2
    d.program(layers)
    step = 0.9 / 7
    got = d.programmed()[0]["W_ext"][:, 0]
    gain = d.synapse_gain[0]["W_ext"][:, 0]
    q = np.round(np.clip([0.1, -0.33, 5.0, 0.0, 0.45, -0.9], -0.9, 0.9) / step) * step
    np.testing.assert_allclose(got, q * (1 + gain))
    assert got[3] == 0.0  # a disconnected synapse stays disconnected
    assert abs(got[2]) <= 0.9 * (1 + abs(gain[2])) + 1e-12  # clipped to the range
    # write noise: fresh at every upload, zero weights untouched
    d2 = OscillatorArrayDevice(cfg(**{**IDEAL, "program_noise": 0.01}), 0)
    d2.program(layers)
    w1 = d2.programmed()[1]["W_int"].copy()
    d2.program(layers)
    w2 = d2.programmed()[1]["W_int"]
    assert w1[0, 1] != w2[0, 1] and abs(w1[0, 1] - 0.2) < 0.05
    assert np.count_nonzero(w1) == 1 and np.count_nonzero(w2) == 1
    assert d2.describe()["write_error"][1]["W_int"][0][1] == pytest.approx(w2[0, 1] - 0.2)


def test_thermal_noise_of_the_power_spread_at_rest_and_floor_below_threshold():
    """dx = (f + D) dt + sqrt(2 D x) dW. At rest x* = 0.5 (b_fixed = 2 gamma) the relaxation rate
    is gamma, so the stationary variance is D x* / gamma; below threshold (f = -|r| x) the power
    does not vanish but fluctuates around the thermal floor D / |r|."""
    D = 1e-4
    c = cfg(**{**IDEAL, "thermal_d_ghz": D}, n_layers=1, n_hidden=50)
    d = OscillatorArrayDevice(c, 1)
    d.program(zero_layers(c))
    x = d.run(np.zeros((40, 60, 1))).states[:, 30:]  # after 30 ns = 6 relaxation times
    assert x.mean() == pytest.approx(0.5, abs=0.003)
    assert x.std() == pytest.approx(math.sqrt(D * 0.5 / c.gamma), rel=0.1)
    below = cfg(**{**IDEAL, "thermal_d_ghz": D}, n_layers=1, n_hidden=50, b_fixed=0.1)  # r = 0.1 - 0.2
    d = OscillatorArrayDevice(below, 1)
    d.program(zero_layers(below))
    x = d.run(np.zeros((40, 80, 1))).states[:, 60:]
    assert x.mean() == pytest.approx(D / 0.1, rel=0.15)
    assert (x >= 0).all()


def test_readout_noise_is_added_to_measurements_only():
    c = cfg(**{**IDEAL, "readout_noise": 0.02})
    d = OscillatorArrayDevice(c, 0)
    d.program(zero_layers(c, 0.1))
    r1, r2 = d.run(np.zeros((20, 10, 1))), d.run(np.zeros((20, 10, 1)))
    diff = r1.states - r2.states  # the same deterministic dynamics underneath
    assert diff.std() == pytest.approx(0.02 * math.sqrt(2), rel=0.1)


def test_drift_follows_device_time_and_device_time_is_counted():
    c = cfg(drift_per_sqrt_s=0.05, call_overhead_s=0.5, program_overhead_s=0.0, relax_ns=100.0)
    d = OscillatorArrayDevice(c, 2)
    d.program(zero_layers(c))
    g0 = d.gamma.copy()
    r = d.run(np.zeros((10, 8, 1)))
    assert r.device_time_s == pytest.approx(0.5 + 10 * (8 * 1.0 + 100.0) * 1e-9)
    assert d.describe()["counters"]["device_time_s"] == pytest.approx(r.device_time_s)
    for _ in range(40):
        d.run(np.zeros((1, 2, 1)))
    rel = np.log(d.gamma / g0)
    assert rel.std() == pytest.approx(0.05 * math.sqrt(d.device_time_s), rel=0.35)
    np.testing.assert_array_equal(d.describe()["drawn"]["gamma_ghz"], d.gamma0)  # the draw is kept
    still = OscillatorArrayDevice(cfg(drift_per_sqrt_s=0.0), 2)
    still.program(zero_layers(c))
    still.run(np.zeros((2, 3, 1)))
    np.testing.assert_array_equal(still.gamma, still.gamma0)


def test_each_sequence_starts_from_the_oscillators_own_rest_state():
    c = cfg(**{**IDEAL, "cv_gamma": 0.3, "cv_sigma": 0.3, "offset_std": 0.02})
    d = OscillatorArrayDevice(c, 4)
    d.program(zero_layers(c))
    x = d.run(np.zeros((2, 30, 1))).states
    np.testing.assert_allclose(x[0, -1], d.rest_states(), atol=1e-6)
    assert np.std(d.rest_states()) > 0.01


@pytest.mark.parametrize("key, value, words", [
    ("cv_gamma", -0.1, "cv_gamma: must be a number >= 0"),
    ("solver_substeps", 0, "solver_substeps: must be an integer >= 1"),
    ("method", "rk4", "method: unknown method 'rk4'; allowed: expheun, heun, euler or null"),
    ("weight_bits", 1, "weight_bits: must be an integer in [2, 32]"),
    ("tau_ns", 0.0, "tau_ns: must be a positive number"),
])
def test_bad_settings_name_the_key(key, value, words):
    with pytest.raises(DeviceConfigError, match=words.replace("[", r"\[").replace("]", r"\]")) as e:
        OscillatorArrayDevice(cfg(**{key: value}), 0)
    assert e.value.key == key


def test_bad_programming_and_inputs_are_refused():
    c = cfg()
    d = OscillatorArrayDevice(c, 0)
    with pytest.raises(RuntimeError, match="program"):
        d.run(np.zeros((1, 2, 1)))
    layers = zero_layers(c)
    layers[1]["W_int"][2, 2] = 0.1
    with pytest.raises(ValueError, match=r"layers\[1\].W_int: the diagonal must be zero"):
        d.program(layers)
    with pytest.raises(ValueError, match=r"layers\[0\].b: expected shape"):
        d.program([{**zero_layers(c)[0], "b": np.zeros(3)}, zero_layers(c)[1]])
    d.program(zero_layers(c))
    with pytest.raises(ValueError, match="inputs: expected shape"):
        d.run(np.zeros((2, 3, 2)))
