"""Hardware-aware off-chip training (issue 16): the chip's non-idealities drawn in every
training pass, never in evaluation; quantisation with a straight-through gradient."""

import pytest
import torch

from hil.config import ConfigError, HardwareConfig, ModelConfig, TaskConfig, load_config
from hil.network.model import DynamicalNetwork
from hil.network.tasks import make_task
from hil.training.train import Trainer

MC = ModelConfig(n_layers=2, n_hidden=6, tau_ns=5.0, S=0.8, S_in=2.5, w_clip_dt=0.9, b_clip_dt=0.2,
                 substeps=2)


def _net(K=1, seeds=None):
    net = DynamicalNetwork([MC] * K, 1, 3, seeds or list(range(K)), 0.3)
    net.clip_parameters()
    return net


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_inactive_hardware_changes_nothing():
    net = _net()
    u = torch.rand(4, 10, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = net(u)
        with net.hardware_pass(HardwareConfig(), _gens([0])):
            b, _ = net(u)
        with net.hardware_pass(None, _gens([0])):
            c, _ = net(u)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_quantised_pass_runs_the_quantised_weights_with_a_straight_through_gradient():
    net = _net()
    u = torch.rand(4, 10, 1, generator=torch.Generator().manual_seed(0))
    hw = HardwareConfig(weight_bits=3)
    with net.hardware_pass(hw, _gens([0])):
        xs, _ = net(u)
        xs.sum().backward()
    g_pass = [p.grad.clone() for p in (net.W_in, net.W_rec, net.bias)]
    # the same forward by hand: weights rounded to 3 bits over +-w_clip (+-b_clip for biases)
    ref = _net()
    with torch.no_grad():
        for p, vmax in ((ref.W_in, 0.9), (ref.W_rec, 0.9), (ref.bias, 0.2)):
            step = vmax / 3
            p.copy_(torch.round(p / step) * step)
    for p in ref.trainable():
        p.grad = None
    xr, _ = ref(u)
    xr.sum().backward()
    assert torch.allclose(xs, xr, atol=1e-6)
    assert not torch.allclose(xs, net(u)[0], atol=1e-3)  # quantisation mattered
    for g, p in zip(g_pass, (ref.W_in, ref.W_rec, ref.bias), strict=True):
        assert torch.allclose(g, p.grad * (ref.mask if p is ref.W_rec else 1), atol=1e-5)


def test_every_pass_draws_afresh_and_evaluation_is_nominal():
    net = _net()
    u = torch.rand(4, 10, 1, generator=torch.Generator().manual_seed(0))
    hw = HardwareConfig(program_noise=0.02, synapse_gain_cv=0.05, offset_std=0.01, cv_gamma=0.2,
                        cv_sigma=0.2)
    gens = _gens([5])
    with torch.no_grad():
        nominal, _ = net(u)
        with net.hardware_pass(hw, gens):
            a, _ = net(u)
        with net.hardware_pass(hw, gens):
            b, _ = net(u)
        after, _ = net(u)
    assert not torch.allclose(a, b) and not torch.allclose(a, nominal)
    assert torch.equal(nominal, after)
    # mismatch and offsets: each oscillator starts from its own rest state, not the nominal 0.5
    with torch.no_grad(), net.hardware_pass(HardwareConfig(cv_gamma=0.3), gens):
        x0 = net.initial_state(2).x
    assert x0.std() > 0.01 and torch.allclose(net.initial_state(2).x, torch.full_like(x0, 0.5))


def test_readout_noise_only_in_the_pass():
    net = _net()
    xs = torch.rand(1, 3, 5, net.M)
    with torch.no_grad():
        clean = net.readout(xs)
        with net.hardware_pass(HardwareConfig(readout_noise=0.1), _gens([0])):
            noisy = net.readout(xs)
    assert not torch.allclose(clean, noisy) and torch.equal(clean, net.readout(xs))


def test_a_seed_trains_the_same_alone_or_stacked_with_hardware_on():
    task = make_task(TaskConfig(name="digits"))
    for name in ("train", "test"):
        sp = task.splits[name]
        sp.x, sp.y = sp.x[:60], sp.y[:60]
    cfg = load_config(preset="digits", overrides=["model.n_layers=1", "model.n_hidden=4", "train.epochs=2",
                                                  "train.batch_size=30", "hardware.program_noise=0.01",
                                                  "hardware.weight_bits=6", "hardware.cv_gamma=0.1"])
    alone = Trainer([cfg.model], [cfg.train], [3], task, progress=False, hardware=cfg.hardware).fit()
    both = Trainer([cfg.model] * 2, [cfg.train] * 2, [1, 3], task, progress=False,
                   hardware=cfg.hardware).fit()
    assert torch.allclose(alone.net.W_rec[0], both.net.W_rec[1], atol=1e-6)
    plain = Trainer([cfg.model], [cfg.train], [3], task, progress=False).fit()
    assert not torch.allclose(alone.net.W_rec[0], plain.net.W_rec[0], atol=1e-4)


@pytest.mark.parametrize("override,key", [
    (["hardware.weight_bits=1"], "hardware.weight_bits"),
    (["hardware.cv_gamma=-0.1"], "hardware.cv_gamma"),
    (["hardware.weight_bits=8", "model.w_clip_dt=null"], "hardware.weight_bits"),
    (["hardware.noise=0.1"], "hardware.noise"),
])
def test_bad_hardware_settings_are_named(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(preset="digits", overrides=override)
