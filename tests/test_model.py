"""Network structure: masks, clipping, gradients, seeding, state handling."""

import pytest
import torch

from hil.config import ModelConfig
from hil.network.model import DynamicalNetwork


def test_masks_zero_diagonal_and_density():
    cfg = ModelConfig(n_hidden=64, density_inter=0.3, density_intra=0.6)
    net = DynamicalNetwork([cfg], 1, 10, [0])
    N = 64
    for li, sl in enumerate(net.layer_slices()):
        intra = net.mask[0, sl, sl]
        assert torch.all(torch.diagonal(intra) == 0)
        assert intra.sum() / (N * N - N) == pytest.approx(0.6, abs=0.04)
        if li > 0:
            inter = net.mask[0, sl, net.layer_slices()[li - 1]]
            assert inter.mean() == pytest.approx(0.3, abs=0.04)
    # no connections skipping a layer or going backwards
    allowed = torch.zeros(3 * N, 3 * N)
    for li, sl in enumerate(net.layer_slices()):
        allowed[sl, sl] = 1
        if li:
            allowed[sl, net.layer_slices()[li - 1]] = 1
    assert torch.all(net.mask[0][allowed == 0] == 0)
    assert torch.all(net.W_rec[0][net.mask[0] == 0] == 0)


def test_masked_weights_stay_zero_after_training_step():
    net = DynamicalNetwork([ModelConfig(n_hidden=8)], 1, 10, [0])
    xseq, _ = net(torch.rand(4, 5, 1))
    net.readout(xseq).sum().backward()
    with torch.no_grad():
        net.W_rec -= 0.1 * net.W_rec.grad
    net.clip_parameters()
    assert torch.all(net.W_rec[net.mask == 0] == 0)


def test_clipping_scaled_by_input_time_step():
    cfg = ModelConfig(n_hidden=4, dt_ns=2.0, w_clip_dt=0.25, b_clip_dt=0.15)
    net = DynamicalNetwork([cfg], 1, 2, [0])
    with torch.no_grad():
        net.W_rec.fill_(5.0)
        net.W_in.fill_(-5.0)
        net.bias.fill_(3.0)
    net.clip_parameters()
    assert float(net.W_in.detach().min()) == pytest.approx(-0.125)
    assert float(net.W_rec.detach().max()) == pytest.approx(0.125)
    assert float(net.bias.detach().max()) == pytest.approx(0.075)
    assert torch.all(net.W_rec[net.mask == 0] == 0)


def test_clipping_off():
    net = DynamicalNetwork([ModelConfig(n_hidden=4, w_clip_dt=None, b_clip_dt=None)], 1, 2, [0])
    with torch.no_grad():
        net.bias.fill_(3.0)
    net.clip_parameters()
    assert float(net.bias.detach().max()) == 3.0


@pytest.mark.parametrize("neuron", ["spintronic", "ctrnn"])
def test_gradient_reaches_every_trainable_parameter(neuron):
    net = DynamicalNetwork([ModelConfig(neuron=neuron, n_hidden=6)], 1, 10, [0])
    xseq, _ = net(torch.rand(5, 12, 1))
    torch.nn.functional.cross_entropy(net.readout(xseq)[0, :, -1], torch.arange(5)).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    # every layer's intra- and inter-layer weights get gradient
    g = net.W_rec.grad[0]
    for li, sl in enumerate(net.layer_slices()):
        assert g[sl, sl].abs().sum() > 0
        if li:
            assert g[sl, net.layer_slices()[li - 1]].abs().sum() > 0


def test_same_seed_same_network_and_output():
    a = DynamicalNetwork([ModelConfig(n_hidden=6)], 1, 10, [7])
    b = DynamicalNetwork([ModelConfig(n_hidden=6)], 1, 10, [7])
    c = DynamicalNetwork([ModelConfig(n_hidden=6)], 1, 10, [8])
    u = torch.rand(2, 6, 1)
    assert torch.equal(a(u)[0], b(u)[0])
    assert not torch.equal(a.W_rec, c.W_rec)


def test_stacked_trials_equal_separate_networks():
    cfgs = [ModelConfig(n_hidden=5), ModelConfig(n_hidden=5, S=0.8, tau_ns=6.0)]
    both = DynamicalNetwork(cfgs, 1, 3, [1, 2])
    one = DynamicalNetwork(cfgs[1:], 1, 3, [2])
    u = torch.rand(3, 7, 1)
    assert torch.allclose(both(u)[0][1], one(u)[0][0], atol=1e-6)


def test_state_carries_over_between_calls():
    net = DynamicalNetwork([ModelConfig(n_hidden=4)], 1, 2, [0])
    u = torch.rand(2, 10, 1)
    full, _ = net(u)
    first, st = net(u[:, :4])
    second, _ = net(u[:, 4:], st)
    assert torch.allclose(torch.cat([first, second], 2), full, atol=1e-6)


def test_rest_state_is_kept_without_input():
    net = DynamicalNetwork([ModelConfig(n_hidden=4)], 1, 2, [0])
    with torch.no_grad():
        net.W_in.zero_()
        net.bias.zero_()
    xseq, _ = net(torch.full((1, 30, 1), net.input_centre.item()))
    assert torch.allclose(xseq, torch.full_like(xseq, 0.5), atol=1e-6)


def test_structure_must_match_across_trials():
    from hil.errors import ConfigError

    with pytest.raises(ConfigError, match="model.n_hidden"):
        DynamicalNetwork([ModelConfig(n_hidden=4), ModelConfig(n_hidden=5)], 1, 2, [0, 1])
