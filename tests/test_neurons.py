"""Neuron physics and Euler integration against analytic and scipy solutions."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from hil.config import ModelConfig
from hil.network.engine import Dynamics, integrate
from sims import neurons


def test_single_euler_step_matches_the_rhs():
    x0, I, gamma, h = 0.3, 0.8, 0.2, 0.1
    C = torch.full((1, 1, 1, 1), I, dtype=torch.float64)
    dyn = Dynamics("spintronic", h, 1, torch.full((1, 1, 1), gamma, dtype=torch.float64),
                   None, None)
    x1, _, _, _ = integrate(C, torch.zeros(1, 1, 1, dtype=torch.float64),
                            torch.full((1, 1, 1), x0, dtype=torch.float64),
                            torch.zeros(1, 1, 1, dtype=torch.float64), dyn)
    assert float(x1) == pytest.approx(x0 + h * (-gamma * x0 + I * x0 * (1 - x0)), abs=1e-15)


def logistic(t, x0, I, gamma):
    """Analytic solution of dx/dt = (I - gamma) x - I x^2."""
    r = I - gamma
    K = r / I
    return K / (1 + (K / x0 - 1) * math.exp(-r * t))


@pytest.mark.parametrize("substeps", [50, 400])
def test_euler_converges_to_analytic_solution(substeps):
    x0, I, gamma, T = 0.1, 0.9, 0.15, 20.0
    h = 1.0 / substeps
    C = torch.full((1, 1, int(T), 1), I, dtype=torch.float64)
    dyn = Dynamics("spintronic", h, substeps, torch.full((1, 1, 1), gamma, dtype=torch.float64),
                   None, None)
    xseq, _, _, _ = integrate(C, torch.zeros(1, 1, 1, dtype=torch.float64),
                              torch.full((1, 1, 1), x0, dtype=torch.float64),
                              torch.zeros(1, 1, 1, dtype=torch.float64), dyn)
    exact = np.array([logistic(t + 1.0, x0, I, gamma) for t in range(int(T))])
    err = np.abs(xseq.flatten().numpy() - exact).max()
    assert err < 0.5 * h  # first-order method
    assert err > 0  # it is Euler, not the exact solution


def test_non_linear_damping_against_scipy():
    gamma, q, sigma, I, x0 = 0.3, 0.5, 1.3, 0.7, 0.2
    sol = solve_ivp(lambda t, x: neurons.drift("spintronic", x, I, gamma, sigma, q), (0, 10),
                    [x0], rtol=1e-10, atol=1e-12, t_eval=[10.0])
    h = 1e-3
    x = x0
    for _ in range(10_000):
        x = x + h * neurons.drift("spintronic", x, I, gamma, sigma, q)
    assert x == pytest.approx(sol.y[0, -1], abs=1e-3)


@pytest.mark.parametrize("kind", neurons.NEURON_TYPES)
def test_rest_state_is_a_fixed_point(kind):
    cfg = ModelConfig(neuron=kind)
    x = neurons.rest_state(kind, cfg.gamma, cfg.b_fixed_value)
    assert neurons.drift(kind, x, cfg.b_fixed_value, cfg.gamma) == pytest.approx(0.0, abs=1e-12)


def test_spintronic_rest_at_half_with_b_fixed_two_gamma():
    assert neurons.rest_state("spintronic", 0.07, 0.14) == pytest.approx(0.5)


def test_drift_derivative_matches_finite_difference():
    for kind in neurons.NEURON_TYPES:
        x, I, g, s, q = 0.37, 0.6, 0.2, 1.1, 0.3
        eps = 1e-6
        fd = (neurons.drift(kind, x + eps, I, g, s, q) - neurons.drift(kind, x - eps, I, g, s, q))
        assert neurons.drift_dx(kind, x, I, g, s, q) == pytest.approx(fd / (2 * eps), rel=1e-6)


def test_unknown_neuron_type():
    with pytest.raises(ValueError, match="unknown neuron type"):
        neurons.check_type("memristor")
