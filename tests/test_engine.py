"""The fast engine equals the straightforward autograd loop: states, losses and gradients,
on both of its back ends (native kernel and torch), for every neuron type and filter option."""

import dataclasses

import pytest
import torch

from hil.config import ModelConfig
from hil.network import engine
from hil.network.engine import Dynamics, EulerScan, band_mask, scan_reference
from hil.network.model import DynamicalNetwork
from sims.neurons import NEURON_TYPES

BACKENDS = ["native", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test on one back end of the fast engine (the native one must be buildable)."""
    if request.param == "native":
        request.getfixturevalue("native_lib")  # skips without a compiler, fails under HIL_REQUIRE_NATIVE=1
    previous = engine.set_native(request.param == "native")
    yield request.param
    engine.set_native(previous)


def _run(net, u, engine_name):
    net.engine = engine_name
    net.zero_grad()
    xseq, st = net(u)
    out = net.readout(xseq)
    loss = out[:, :, -1].sin().sum() + (xseq**2).mean() + 0.1 * st.x.sum() + 0.2 * st.y.sum()
    loss.backward()
    return loss.detach(), xseq.detach(), [p.grad.clone() for p in net.trainable()]


@pytest.mark.parametrize("integrator", engine.SCHEMES)
@pytest.mark.parametrize("kind", NEURON_TYPES)
@pytest.mark.parametrize("highpass", [True, False])
def test_fast_engine_matches_reference(kind, highpass, integrator, backend):
    if integrator == "expheun" and kind not in engine.EXPHEUN_KINDS:
        pytest.skip("no closed-form step for this neuron type")
    torch.manual_seed(0)
    cfgs = [ModelConfig(neuron=kind, highpass=highpass, n_hidden=6, integrator=integrator,
                        q=0.3 if kind == "spintronic" else 0.0, S_in=3.0),
            ModelConfig(neuron=kind, highpass=highpass, n_hidden=6, S=0.9, tau_ns=4.0,
                        substeps=4, S_in=2.0, integrator=integrator)]
    net = DynamicalNetwork(cfgs, 2, 3, [0, 1]).double()
    u = torch.rand(4, 9, 2, dtype=torch.float64)
    lf, xf, gf = _run(net, u, "fast")
    lr, xr, gr = _run(net, u, "reference")
    assert torch.allclose(lf, lr, rtol=1e-12, atol=1e-12)
    assert torch.allclose(xf, xr, atol=1e-12)
    for a, b in zip(gf, gr, strict=True):
        assert torch.allclose(a, b, atol=1e-11, rtol=1e-9)
    assert xf.std() > 0  # the dynamics did something


def test_float32_fast_engine_close_to_reference(backend):
    net = DynamicalNetwork([ModelConfig()], 1, 10, [3])
    u = torch.rand(8, 64, 1)
    lf, _, gf = _run(net, u, "fast")
    lr, _, gr = _run(net, u, "reference")
    assert torch.allclose(lf, lr, rtol=1e-5)
    for a, b in zip(gf, gr, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("highpass", [True, False])
def test_float32_ctrnn_close_to_reference(highpass, backend):
    """The native float32 kernel computes tanh with its own vectorised formula (libm's in
    float64): states and gradients stay within float32 rounding of the autograd loop, with
    states large enough that tanh is used over its whole range, saturated included."""
    torch.manual_seed(3)
    net = DynamicalNetwork([ModelConfig(neuron="ctrnn", highpass=highpass, n_hidden=12, S=2.0,
                                        S_in=3.0)], 1, 10, [3])
    u = torch.rand(8, 40, 1) * 3
    lf, xf, gf = _run(net, u, "fast")
    lr, xr, gr = _run(net, u, "reference")
    assert xr.abs().max() > 3 and xr.abs().min() < 0.1  # tanh saturated and linear
    assert torch.allclose(xf, xr, atol=1e-5 * xr.abs().max().item())
    assert torch.allclose(lf, lr, rtol=1e-5)
    for a, b in zip(gf, gr, strict=True):
        assert torch.allclose(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-3)
    if not highpass:  # the kernel's final output is its tanh of its final state: ulp-close
        net.engine = "fast"
        with torch.no_grad():
            _, st = net(torch.randn(64, 40, 1) * 4)
        assert st.x.abs().max() > 9 and (st.x.abs() < 0.125).any()  # both branches, the cap
        assert (st.y - torch.tanh(st.x)).abs().max() < 3e-7


def test_no_grad_path_equals_training_path(backend):
    net = DynamicalNetwork([ModelConfig(n_hidden=5)], 1, 10, [0])
    u = torch.rand(3, 10, 1)
    a, _ = net(u)
    with torch.no_grad():
        b, _ = net(u)
    assert torch.equal(a.detach(), b)


def _random_problem(K, B, T, L, N, substeps, kind="spintronic", highpass=True, q=True, seed=0,
                    layer_size=True, scheme="euler"):
    """Random inputs of :class:`EulerScan` (float64), states inside (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    M = L * N
    C = torch.rand(K, B, T, M, generator=g, dtype=torch.float64) * 2 - 0.5
    Wr = (torch.rand(K, M, M, generator=g, dtype=torch.float64) - 0.5) * 0.8
    if layer_size:
        Wr = Wr * band_mask(M, N)
    X0 = torch.rand(K, B, M, generator=g, dtype=torch.float64) * 0.8 + 0.1
    Y0 = torch.rand(K, B, M, generator=g, dtype=torch.float64) * 0.2
    gamma = torch.rand(K, 1, M, generator=g, dtype=torch.float64) * 0.2 + 0.05
    dyn = Dynamics(
        kind, 0.3 / substeps * 4, substeps, gamma,
        (torch.rand(K, 1, M, generator=g, dtype=torch.float64) * 0.5) if q else None,
        (1 - torch.rand(K, 1, 1, generator=g, dtype=torch.float64) * 0.1) if highpass else None,
        N if layer_size else None,
        scheme,
    )
    if scheme == "expheun" and highpass:  # the filter's mid-step factor, as the model sets it
        dyn = dataclasses.replace(dyn, a_half=dyn.a.sqrt())
    if kind == "spintronic":  # a thermal floor per trial (large, so that it matters)
        dyn = dataclasses.replace(dyn, floor=torch.rand(K, 1, 1, generator=g, dtype=torch.float64) * 0.02)
    return C, Wr, X0, Y0, dyn


def _grads_fast(C, Wr, X0, Y0, dyn, w):
    ins = [t.clone().requires_grad_() for t in (C, Wr, X0, Y0)]
    xs, xf, yf = EulerScan.apply(*ins, dyn)
    loss = (xs * w[0]).sum() + (xf * w[1]).sum() + (yf * w[2]).sum()
    return (xs, xf, yf), torch.autograd.grad(loss, ins)


def _grads_reference(C, Wr, X0, Y0, dyn, w, N):
    ins = [t.clone().requires_grad_() for t in (C, Wr, X0, Y0)]
    M = C.shape[-1]
    sl = [slice(i, min(i + N, M)) for i in range(0, M, N)]
    blocks = [[ins[1][:, s, r] for s in sl] for r in sl]
    xs, xf, yf = scan_reference(ins[0], blocks, [ins[2][..., s] for s in sl],
                                [ins[3][..., s] for s in sl], dyn, sl)
    loss = (xs * w[0]).sum() + (xf * w[1]).sum() + (yf * w[2]).sum()
    return (xs, xf, yf), torch.autograd.grad(loss, ins)


@pytest.mark.parametrize(
    "K,B,T,L,N,substeps",
    [(1, 1, 1, 1, 1, 1), (2, 7, 5, 2, 3, 3), (1, 17, 16, 3, 5, 4), (3, 9, 4, 3, 16, 1),
     (1, 16, 17, 2, 17, 2), (2, 33, 3, 1, 8, 5), (1, 3, 3, 2, 2, 20)],
)
@pytest.mark.parametrize("scheme", engine.SCHEMES)
def test_engine_shapes_against_reference(K, B, T, L, N, substeps, scheme, backend):
    """Tile padding (B not a multiple of the tile), adjoint blocks (T vs block length), layer
    sizes that do not fill the register blocks, one layer, one point, one sub-step."""
    C, Wr, X0, Y0, dyn = _random_problem(K, B, T, L, N, substeps, seed=K * 100 + T, scheme=scheme)
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(s, generator=g, dtype=torch.float64) for s in
         ((K, B, T, L * N), (K, B, L * N), (K, B, L * N))]
    out_f, grad_f = _grads_fast(C, Wr, X0, Y0, dyn, w)
    out_r, grad_r = _grads_reference(C, Wr, X0, Y0, dyn, w, N)
    for a, b in zip(out_f, out_r, strict=True):
        assert torch.allclose(a, b, atol=1e-13, rtol=0)
    band = band_mask(L * N, N)
    for i, (a, b) in enumerate(zip(grad_f, grad_r, strict=True)):
        if i == 1:  # the weight gradient lives on the band only (see below)
            a, b = a[:, band], b[:, band]
        assert torch.allclose(a, b, atol=1e-11, rtol=1e-11), i


@pytest.mark.parametrize("kind", NEURON_TYPES)
def test_dense_recurrent_matrix(kind, backend):
    """Without ``layer_size`` every neuron may drive every other one."""
    C, Wr, X0, Y0, dyn = _random_problem(2, 5, 6, 2, 4, 2, kind=kind, q=kind == "spintronic",
                                         layer_size=False)
    w = [torch.ones(1, dtype=torch.float64)] * 3
    out_f, grad_f = _grads_fast(C, Wr, X0, Y0, dyn, w)
    out_r, grad_r = _grads_reference(C, Wr, X0, Y0, dyn, w, 8)
    for a, b in zip(out_f + grad_f, out_r + grad_r, strict=True):
        assert torch.allclose(a, b, atol=1e-11, rtol=1e-11)


def test_entries_outside_the_layer_band_are_ignored(backend):
    """With ``layer_size`` the blocks outside the band do not act and get no gradient."""
    C, Wr, X0, Y0, dyn = _random_problem(1, 4, 5, 3, 3, 2)
    band = band_mask(9, 3)
    noisy = Wr + (~band) * 7.0
    w = [torch.ones(1, dtype=torch.float64)] * 3
    out_a, grad_a = _grads_fast(C, Wr, X0, Y0, dyn, w)
    out_b, grad_b = _grads_fast(C, noisy, X0, Y0, dyn, w)
    for a, b in zip(out_a, out_b, strict=True):
        assert torch.equal(a, b)
    assert torch.all(grad_b[1][:, ~band] == 0)
    assert torch.allclose(grad_a[1], grad_b[1], atol=1e-14)


def test_native_results_independent_of_threads_and_stacking(native_lib):
    """Trials are computed tile by tile and the weight gradient summed in a fixed order: the
    same trial gives bit-identical results alone or stacked, on any number of threads."""
    C, Wr, X0, Y0, dyn = _random_problem(3, 21, 7, 3, 6, 4)
    C, Wr, X0, Y0 = C.float(), Wr.float(), X0.float(), Y0.float()
    dyn = Dynamics(dyn.kind, dyn.h, dyn.substeps, dyn.gamma.float(), dyn.q.float(), dyn.a.float(),
                   dyn.layer_size)
    w = [torch.ones(1)] * 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads_fast(C, Wr, X0, Y0, dyn, w)
        torch.set_num_threads(2)
        two = _grads_fast(C, Wr, X0, Y0, dyn, w)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one[0] + one[1], two[0] + two[1], strict=True):
        assert torch.equal(a, b)
    k = 1
    dyn1 = Dynamics(dyn.kind, dyn.h, dyn.substeps, dyn.gamma[k:k + 1], dyn.q[k:k + 1],
                    dyn.a[k:k + 1], dyn.layer_size)
    alone = _grads_fast(C[k:k + 1], Wr[k:k + 1], X0[k:k + 1], Y0[k:k + 1], dyn1, w)
    for a, b in zip(alone[0] + alone[1], one[0] + one[1], strict=True):
        assert torch.equal(a[0], b[k])


def test_unused_outputs_need_no_gradient(backend):
    C, Wr, X0, Y0, dyn = _random_problem(1, 3, 4, 2, 3, 2)
    ins = [t.clone().requires_grad_() for t in (C, Wr, X0, Y0)]
    xs, _, _ = EulerScan.apply(*ins, dyn)
    xs[:, :, -1].sum().backward()
    ref = [t.clone().requires_grad_() for t in (C, Wr, X0, Y0)]
    xs_r, xf_r, yf_r = EulerScan.apply(*ref, dyn)
    (xs_r[:, :, -1].sum() + 0 * xf_r.sum() + 0 * yf_r.sum()).backward()
    for a, b in zip(ins, ref, strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-14)


def test_native_kernel_flushes_subnormals_and_restores_the_callers_mode(native_lib):
    """An undriven spintronic neuron decays towards x = 0: in float32 its state enters the
    subnormal range, where every operation is microcode-slow (the flip-flop network trained
    12x slower). The kernel runs with flush-to-zero: states below 1.2e-38 become exactly 0,
    while the caller's floating-point mode is left as it was."""
    K, B, T, M = 1, 16, 8, 4
    dyn = Dynamics(kind="spintronic", h=0.25, substeps=4, gamma=torch.ones(K, 1, M), q=None,
                   a=None)
    C, Wr = torch.zeros(K, B, T, M), torch.zeros(K, M, M)
    x0 = torch.full((K, B, M), 1e-36)
    previous = engine.set_native(False)
    try:
        ref, *_ = engine.integrate(C, Wr, x0, x0.clone(), dyn)
    finally:
        engine.set_native(True)
    fast, *_ = engine.integrate(C, Wr, x0, x0.clone(), dyn)
    engine.set_native(previous)
    tiny = torch.finfo(torch.float32).tiny
    assert ((ref > 0) & (ref < tiny)).any()  # the plain loop does produce subnormals here
    assert not ((fast > 0) & (fast < tiny)).any()  # the kernel never does
    assert torch.allclose(fast, ref, rtol=1e-5, atol=tiny)  # and agrees above them
    assert (torch.tensor([tiny]) * 0.5).item() > 0  # the caller still has subnormals
    previous = engine.set_flush_subnormals(False)  # the switch the benchmark compares with
    try:
        plain, *_ = engine.integrate(C, Wr, x0, x0.clone(), dyn)
    finally:
        engine.set_flush_subnormals(previous)
    assert torch.equal(plain, ref)
