"""Analysis tools (seed 004) and design rules (paper eq. 9-11)."""

import numpy as np
import pytest
import torch

from hil.config import ModelConfig
from hil.network import analysis, design_rules


def test_pca_recovers_a_planar_trajectory():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 6, 50)
    basis = np.linalg.qr(rng.standard_normal((10, 2)))[0]  # orthonormal plane in 10-D
    plane = np.stack([np.cos(t), 0.5 * np.sin(t)], -1)  # (50, 2)
    traj = np.stack([plane @ basis.T + 0.001 * rng.standard_normal((50, 10)) for _ in range(3)])
    res = analysis.pca(traj, 3)
    assert res["projection"].shape == (3, 50, 3)
    assert res["explained"][:2].sum() > 0.999
    assert res["explained"][0] > res["explained"][1] > res["explained"][2]


def test_eigenvalues_of_a_rotation():
    th = 0.3
    w = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    ev = analysis.eigenvalues(w)
    assert np.allclose(np.abs(ev), 1.0)
    assert np.allclose(sorted(np.angle(ev)), [-th, th])


def test_plots_are_written(tmp_path):
    layers = [{"W_int": np.eye(4)[::-1], "W_ext": np.ones((4, 1)), "b": np.zeros(4)}]
    assert analysis.connectivity_plot(layers, tmp_path / "c.png").stat().st_size > 1000
    traj = np.random.default_rng(1).standard_normal((5, 20, 4))
    assert analysis.pca_plot(traj, np.arange(5), tmp_path / "p.png").stat().st_size > 1000


def test_flipflop_error_budget_classes_and_a_late_switch(tmp_path):
    from hil.network.tasks import flipflop_batch

    x, y = flipflop_batch(20, 100, 3, 0.05, 0.05, 2, 3, seed=4)
    perfect = analysis.flipflop_error_budget(y.copy(), x, y)
    assert perfect["miss_rate"] == 0.0 and perfect["within_tol"] == 1.0
    classes = perfect["classes"]
    assert sum(c["fraction_of_steps"] for c in classes.values()) == pytest.approx(1.0)
    # an output that follows the target one step late misses exactly the switch steps
    late = np.concatenate([np.zeros_like(y[:, :1]), y[:, :-1]], axis=1)
    b = analysis.flipflop_error_budget(late, x, y)
    assert b["classes"]["switch"]["miss_rate"] == 1.0
    for name, c in b["classes"].items():
        if name != "switch":
            assert c["miss_rate"] == 0.0, name
    assert sum(c["contribution"] for c in b["classes"].values()) == pytest.approx(b["miss_rate"])
    # an output that switches at the pulse instead of after the delay misses the pending steps
    early = np.zeros_like(y)
    for t in range(y.shape[1]):
        prev = early[:, t - 1] if t else 0.0
        early[:, t] = np.where(np.abs(x[:, t]) > 0.5, np.sign(x[:, t]), prev)
    e = analysis.flipflop_error_budget(early, x, y)
    assert e["classes"]["pulse seen, switch pending"]["miss_rate"] > 0.5
    assert analysis.error_budget_plot(b, tmp_path / "b.png").stat().st_size > 1000


def test_cumulative_drive_rule():
    cfg = ModelConfig(S=0.5, dt_ns=1.0)
    # I = S <|W|> sqrt(N) = 0.5 * 0.25 * sqrt(64) = 1
    assert design_rules.cumulative_drive(cfg, 0.25, 64) == pytest.approx(1.0)


def test_design_rule_warnings():
    cfg = ModelConfig(n_hidden=4, dt_ns=1.0, tau_ns=14.0, integrator="euler")
    tiny = [{"W_ext": torch.full((4, 4), 1e-4), "W_int": torch.full((4, 4), 1e-4),
             "b": torch.zeros(4)}]
    rep = design_rules.check(cfg, tiny)
    assert any("cumulative drive" in w for w in rep["warnings"])
    huge = [{"W_ext": torch.full((4, 4), 50.0), "W_int": torch.full((4, 4), 50.0),
             "b": torch.zeros(4)}]
    rep = design_rules.check(cfg, huge)
    assert any("explicit Euler may diverge" in w for w in rep["warnings"])
    rep = design_rules.check(ModelConfig(tau_ns=0.5, dt_ns=1.0, substeps=1, integrator="euler"))
    assert any("not shorter than the relaxation time" in w for w in rep["warnings"])
    assert any("gamma * h" in w for w in rep["warnings"])


def test_stability_warnings_are_for_euler_only():
    """The exponential Heun step is stable at any drive: the same huge weights and coarse step
    give no Euler-stability warning under it (its accuracy is what hil design's step error
    and every run's convergence check report)."""
    huge = [{"W_ext": torch.full((4, 4), 50.0), "W_int": torch.full((4, 4), 50.0),
             "b": torch.zeros(4)}]
    for cfg in (ModelConfig(n_hidden=4, tau_ns=14.0, integrator="expheun"),
                ModelConfig(tau_ns=0.5, dt_ns=1.0, substeps=1, integrator="expheun")):
        rep = design_rules.check(cfg, huge if cfg.n_hidden == 4 else None)
        assert not any("Euler" in w or "gamma * h" in w for w in rep["warnings"])
        assert rep["integrator"] == "expheun"
