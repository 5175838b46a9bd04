"""The fast engine equals the straightforward autograd loop: states, losses and gradients."""

import pytest
import torch

from hil.config import ModelConfig
from hil.model import DynamicalNetwork
from sims.neurons import NEURON_TYPES


def _run(net, u, engine):
    net.engine = engine
    net.zero_grad()
    xseq, st = net(u)
    out = net.readout(xseq)
    loss = out[:, :, -1].sin().sum() + (xseq**2).mean() + 0.1 * st.x.sum() + 0.2 * st.y.sum()
    loss.backward()
    return loss.detach(), xseq.detach(), [p.grad.clone() for p in net.trainable()]


@pytest.mark.parametrize("kind", NEURON_TYPES)
@pytest.mark.parametrize("highpass", [True, False])
def test_fast_engine_matches_reference(kind, highpass):
    torch.manual_seed(0)
    cfgs = [ModelConfig(neuron=kind, highpass=highpass, n_hidden=6,
                        q=0.3 if kind == "spintronic" else 0.0, S_in=3.0),
            ModelConfig(neuron=kind, highpass=highpass, n_hidden=6, S=0.9, tau_ns=4.0,
                        substeps=4, S_in=2.0)]
    net = DynamicalNetwork(cfgs, 2, 3, [0, 1]).double()
    u = torch.rand(4, 9, 2, dtype=torch.float64)
    lf, xf, gf = _run(net, u, "fast")
    lr, xr, gr = _run(net, u, "reference")
    assert torch.allclose(lf, lr, rtol=1e-12, atol=1e-12)
    assert torch.allclose(xf, xr, atol=1e-12)
    for a, b in zip(gf, gr, strict=True):
        assert torch.allclose(a, b, atol=1e-11, rtol=1e-9)
    assert xf.std() > 0  # the dynamics did something


def test_float32_fast_engine_close_to_reference():
    net = DynamicalNetwork([ModelConfig()], 1, 10, [3])
    u = torch.rand(8, 64, 1)
    lf, _, gf = _run(net, u, "fast")
    lr, _, gr = _run(net, u, "reference")
    assert torch.allclose(lf, lr, rtol=1e-5)
    for a, b in zip(gf, gr, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


def test_no_grad_path_equals_training_path():
    net = DynamicalNetwork([ModelConfig(n_hidden=5)], 1, 10, [0])
    u = torch.rand(3, 10, 1)
    a, _ = net(u)
    with torch.no_grad():
        b, _ = net(u)
    assert torch.equal(a.detach(), b)
