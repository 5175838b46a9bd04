"""The digital twin: calibration, per-oscillator physics in the model, program-and-verify, monitoring."""

import numpy as np
import pytest
import torch

from hil.chip.backends import BackendError, ModelBackend, make_backend
from hil.chip.twin import (
    TwinMonitor,
    TwinParameters,
    apply_twin,
    calibrate,
    calibration_errors,
    logistic_response,
    program_and_verify,
    state_residual,
)
from hil.config import ModelConfig
from hil.errors import ConfigError
from hil.network.model import DynamicalNetwork

MC = ModelConfig(n_layers=2, n_hidden=8, tau_ns=5.0, S=1.0, S_in=2.5, b_in=0.4, w_clip_dt=0.9, b_clip_dt=0.2)
CENTRE = 0.3
QUIET = ["offset_std=0", "weight_bits=null", "program_noise=0", "synapse_gain_cv=0", "thermal_d_ghz=0",
         "readout_noise=0", "drift_per_sqrt_s=0", f"method={MC.scheme}", f"solver_substeps={MC.substeps}"]


def true_twin(backend) -> TwinParameters:
    cur = backend.describe()["parameters"]["current"]
    g, s, q, off = (np.array(cur[k]) for k in ("gamma_ghz", "sigma", "q", "offset_ghz"))
    return TwinParameters(g, s, q, MC.b_fixed_value + off, off, source="truth")


def net_with_weights(seed=0) -> DynamicalNetwork:
    net = DynamicalNetwork([MC], 1, 10, [seed], CENTRE)
    net.clip_parameters()
    return net


def test_logistic_response_solves_the_oscillator_equation():
    t = torch.linspace(0, 20, 2001, dtype=torch.float64)
    for r, a, x0 in ((0.3, 0.6, 0.2), (-0.1, 0.2, 0.6), (0.0, 0.4, 0.5)):
        x = torch.tensor(x0, dtype=torch.float64)
        h = float(t[1] - t[0])
        for _ in range(2000):  # fine Heun steps of dx/dt = r x - a x^2
            k1 = r * x - a * x * x
            xp = x + h * k1
            x = x + 0.5 * h * (k1 + r * xp - a * xp * xp)
        exact = logistic_response(t[-1:], torch.tensor(x0, dtype=torch.float64),
                                  torch.tensor(r, dtype=torch.float64), torch.tensor(a, dtype=torch.float64))
        assert float(exact) == pytest.approx(float(x), rel=1e-6)


def test_the_twin_with_the_chips_true_values_reproduces_the_chip():
    """Per-oscillator gamma, sigma and offsets in the model's buffers match the device's physics."""
    be = make_backend("sim", MC, 1, CENTRE, 3,
                      ["cv_gamma=0.3", "cv_sigma=0.3", "offset_std=0.02", *QUIET[1:]])
    net = net_with_weights()
    nominal = state_residual(net, 0, be, torch.rand(4, 20, 1))["rms"]
    apply_twin(net, 0, true_twin(be))
    res = state_residual(net, 0, be, torch.rand(4, 20, 1))
    assert res["rms"] < 1e-5 < 0.01 < nominal
    assert len(res["per_layer"]) == 2


def test_calibration_is_exact_without_noise():
    be = make_backend("sim", MC, 1, CENTRE, 1,
                      ["cv_gamma=0.2", "cv_sigma=0.2", "offset_std=0.01", *QUIET[1:7]])
    tp = calibrate(be, MC, repeats=4, writes=1)
    err = calibration_errors(tp, be.describe()["parameters"]["current"])
    assert err["gamma_ghz"]["max_rel"] < 0.005 and err["sigma"]["max_rel"] < 0.005
    assert err["offset_ghz"]["max_abs"] < 1e-3
    assert tp.meta["unidentified"] == [] and tp.source == "calibrated"


def test_calibration_recovers_gamma_and_sigma_within_2_percent_at_default_noise():
    """Done-when criterion, small: every identified oscillator within 2 % (default chip, 20 %
    mismatch, thermal and readout noise, programming errors and drift)."""
    be = make_backend("sim", MC, 1, CENTRE, 2)
    tp = calibrate(be, MC)
    truth = be.describe()["parameters"]["current"]
    ok = np.setdiff1d(np.arange(16), tp.meta["unidentified"])
    assert len(ok) >= 15
    for key in ("gamma_ghz", "sigma"):
        rel = np.abs(getattr(tp, key)[ok] / np.asarray(truth[key])[ok] - 1)
        assert rel.max() < 0.02, (key, rel.max())
    nominal = TwinParameters.nominal(MC)
    assert np.abs(nominal.gamma_ghz / np.asarray(truth["gamma_ghz"]) - 1).max() > 0.1  # there was mismatch


def test_calibration_needs_states_and_the_oscillator_equation():
    class NoStates(ModelBackend):
        def __init__(self):
            super().__init__(MC, 1, CENTRE)
            from dataclasses import replace

            self.spec = replace(self.spec, offers_states=False)

    with pytest.raises(BackendError, match="per-oscillator states"):
        calibrate(NoStates(), MC)
    ctrnn = ModelConfig(neuron="ctrnn", n_layers=2, n_hidden=8)
    with pytest.raises(ConfigError, match="model.neuron"):
        calibrate(make_backend("model", ctrnn, 1, 0.0, 0), ctrnn, repeats=2, writes=1)
    with pytest.raises(ConfigError, match="twin: has 3 oscillators"):
        apply_twin(net_with_weights(), 0, TwinParameters(*(np.ones(3),) * 5))


def test_program_and_verify_corrects_static_programming_errors():
    """A chip whose synapses are 10 % off: the loop identifies and corrects them."""
    be = make_backend("sim", MC, 1, CENTRE, 0, [*QUIET[2:], "synapse_gain_cv=0.1"])
    net = net_with_weights(4)
    apply_twin(net, 0, true_twin(be))
    probe = torch.rand(16, 24, 1, generator=torch.Generator().manual_seed(0))
    log = []
    rep = program_and_verify(net, 0, be, probe, tol=0.01, max_iters=4, log=log.append)
    first, last = rep.iterations[0], rep.iterations[-1]
    assert first["max_abs_residual"] > 0.02  # the gain errors were seen
    assert rep.converged and last["max_abs_residual"] <= 0.01
    assert last["state_rms"] < first["state_rms"]
    assert len(log) == len(rep.iterations) >= 2
    assert "layer1.W_int" in first["parameters"]
    # what ended on the chip is closer to what was intended than a plain upload gets
    prog, target = be.device.programmed(), net.layer_weights(0)
    for li, key in ((0, "W_int"), (1, "W_ext"), (1, "W_int")):
        t = target[li][key].double().numpy()
        plain = np.sqrt(((t * be.device.synapse_gain[li][key]) ** 2).mean())
        after = np.sqrt(((prog[li][key] - t) ** 2).mean())
        assert after < 0.7 * plain, (li, key, after, plain)


def test_monitor_recalibrates_only_when_the_chip_has_changed():
    be = make_backend("sim", MC, 1, CENTRE, 5, ["drift_per_sqrt_s=0"])
    net = net_with_weights()
    apply_twin(net, 0, calibrate(be, MC, repeats=64, writes=2))
    events = []
    mon = TwinMonitor(probe=torch.rand(8, 20, 1), every=1, ratio=1.5, on_event=events.append,
                      calibration={"repeats": 64, "writes": 2})
    mon.check(net, [be], 1)
    mon.check(net, [be], 2)
    assert [e["event"] for e in events] == ["twin_check", "twin_check"] and mon.recalibrations == 0
    be.device.gamma = be.device.gamma * 0.8  # an abrupt change of the chip
    rec = mon.check(net, [be], 3)[0]
    assert rec["event"] == "twin_recalibrated" and rec["residual_after"] < rec["threshold"] < rec["residual"]
    np.testing.assert_allclose(net.gamma[0, 0].numpy(), be.device.gamma, rtol=0.05)
    with pytest.raises(ConfigError, match="--monitor-ratio"):
        TwinMonitor(probe=torch.zeros(1, 2, 1), ratio=1.0)
