"""Fast checks of hil/network/engine.py against known truth (written to kill mutmut's survivors,
scripts/mutation.sh): the fast engine's forward against a plain explicit loop of the module's
equations written out here, its adjoint against torch autograd of that loop (float64, tiny
networks), the no-grad path, the layer band, and the native back end's bookkeeping (dispatch,
build and cache, call sizes) with fake compilers and libraries where the real ones are not the
point."""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from hil.errors import ConfigError
from hil.network import engine
from hil.network.engine import Dynamics, EulerScan, band_mask, integrate, run_fast, run_reference
from sims.neurons import HELD_DRIVE_TYPES, NEURON_TYPES, drive_gain, held_drive_step

F64 = torch.float64


@pytest.fixture
def torch_backend():
    """The torch back end of the fast engine (the native one switched off for the test)."""
    previous = engine.set_native(False)
    yield
    engine.set_native(previous)


# --------------------------------------------------------------------------- a plain reference

Coefs = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None",
              "torch.Tensor | None"]


def plain_substep(dyn: Dynamics, ct: torch.Tensor, wr: torch.Tensor, x: torch.Tensor,
                  y: torch.Tensor, coefs: Coefs) -> tuple[torch.Tensor, torch.Tensor]:
    """One sub-step of one batch row: ``coefs`` = (gamma, Q, a, a_half, floor) of its trial."""
    gam, q, a, ah, fl = coefs
    if dyn.kind != "spintronic":
        q = None

    def o(v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(v) if dyn.kind == "ctrnn" else v

    def filt(xn: torch.Tensor, half: torch.Tensor | None) -> torch.Tensor:
        if a is None:
            return o(xn)
        return a * y + (1.0 if half is None else half) * (o(xn) - o(x))

    d0 = ct + y @ wr
    if dyn.scheme == "euler":
        f = -(gam * x * (1 + q * x) if q is not None else gam * x) + d0 * drive_gain(dyn.kind, x)
        if fl is not None:
            f = f + fl
        xn = x + dyn.h * f
        if dyn.kind in ("linear", "liquid", "quadratic"):
            xn = xn.clamp(0.0, 1.0)
        return xn, filt(xn, None)

    def step(d: torch.Tensor) -> torch.Tensor:
        return held_drive_step(dyn.kind, x, d, gam, dyn.h, q, torch, False, fl)[0]

    d1 = ct + filt(step(d0), ah) @ wr
    xn = step(0.5 * (d0 + d1))
    return xn, filt(xn, ah)


def plain_loop(C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor,
               dyn: Dynamics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module docstring's equations, one batch row and one trial at a time (dense ``Wr``,
    band applied by the caller): differentiable by autograd, independent of the engine's code."""
    K, B, T, M = C.shape

    def pick(t: torch.Tensor | None, k: int) -> torch.Tensor | None:
        return None if t is None else t[k, 0] if t.shape[-1] == M else t[k, 0, 0]

    seqs, xfs, yfs = [], [], []
    for k in range(K):
        coefs = (dyn.gamma[k, 0], pick(dyn.q, k), pick(dyn.a, k), pick(dyn.a_half, k),
                 pick(dyn.floor, k))
        rows, xr, yr = [], [], []
        for b in range(B):
            x, y = X0[k, b], Y0[k, b]
            pts = []
            for t in range(T):
                for _ in range(dyn.substeps):
                    x, y = plain_substep(dyn, C[k, b, t], Wr[k], x, y, coefs)  # type: ignore[arg-type]
                pts.append(x)
            rows.append(torch.stack(pts))
            xr.append(x)
            yr.append(y)
        seqs.append(torch.stack(rows))
        xfs.append(torch.stack(xr))
        yfs.append(torch.stack(yr))
    return torch.stack(seqs), torch.stack(xfs), torch.stack(yfs)


Problem = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Dynamics]


def problem(kind: str = "spintronic", scheme: str = "euler", *, K: int = 2, B: int = 3, T: int = 4,
            L: int = 2, N: int = 2, substeps: int = 2, q: bool = True, highpass: bool = True,
            half: bool = True, floor: bool = True, banded: bool = True, seed: int = 0,
            dtype: torch.dtype = F64) -> Problem:
    """A random tiny problem, every trial with its own coefficients (states in (0.1, 0.9))."""
    g = torch.Generator().manual_seed(seed)
    M = L * N

    def r(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=F64)

    C = r(K, B, T, M) * 2.5 - 0.5
    Wr = (r(K, M, M) - 0.5) * 1.6
    if banded:
        Wr = Wr * band_mask(M, N)
    X0 = r(K, B, M) * 0.8 + 0.1
    Y0 = r(K, B, M) * 0.4 - 0.2
    a = 1 - r(K, 1, 1) * 0.3 if highpass else None
    dyn = Dynamics(kind, 0.4, substeps, r(K, 1, M) * 0.6 + 0.1,
                   r(K, 1, M) * 0.8 if q else None, a, N if banded else None, scheme,
                   a.sqrt() * 0.9 if (a is not None and half and scheme == "expheun") else None,
                   r(K, 1, 1) * 0.05 + 0.01 if (floor and kind == "spintronic") else None)
    if dtype != F64:
        C, Wr, X0, Y0 = (t.to(dtype) for t in (C, Wr, X0, Y0))
    return C, Wr, X0, Y0, dyn


def weights(C: torch.Tensor, seed: int = 7) -> list[torch.Tensor]:
    """Random loss weights for ``(Xseq, X_final, Y_final)``."""
    K, B, T, M = C.shape
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=C.dtype) for s in ((K, B, T, M), (K, B, M), (K, B, M))]


def grads(fn: Any, C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor,
          dyn: Dynamics, w: list[torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    ins = [t.clone().requires_grad_() for t in (C, Wr, X0, Y0)]
    outs = fn(*ins, dyn)
    loss = sum((o * wi).sum() for o, wi in zip(outs, w, strict=True))
    return tuple(o.detach() for o in outs), torch.autograd.grad(loss, ins)


def on_band(g: tuple[torch.Tensor, ...], dyn: Dynamics) -> tuple[torch.Tensor, ...]:
    """Gradients with the weight gradient kept on the layer band only (the fast engine gives
    zero outside it, the plain loop's dense product does not)."""
    if dyn.layer_size is None:
        return g
    M = g[1].shape[-1]
    return (g[0], g[1] * band_mask(M, dyn.layer_size), *g[2:])


CASES = [(kind, "euler") for kind in NEURON_TYPES] + [(kind, "expheun") for kind in HELD_DRIVE_TYPES]


# --------------------------------------------------------------------------- forward and adjoint

@pytest.mark.parametrize(("kind", "scheme"), CASES)
@pytest.mark.parametrize("highpass", [True, False])
def test_fast_engine_is_the_plain_loop_forward_and_adjoint(kind: str, scheme: str, highpass: bool,
                                                          torch_backend: None) -> None:
    C, Wr, X0, Y0, dyn = problem(kind, scheme, highpass=highpass, seed=len(kind))
    w = weights(C)
    out_p, g_p = grads(plain_loop, C, Wr, X0, Y0, dyn, w)
    out_f, g_f = grads(EulerScan.apply, C, Wr, X0, Y0, dyn, w)
    for a, b in zip(out_f, out_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    for i, (a, b) in enumerate(zip(g_f, on_band(g_p, dyn), strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"gradient {i}")
    # the no-grad forward (two state buffers, nothing stored) gives the same states
    with torch.no_grad():
        plain = integrate(C, Wr, X0, Y0, dyn, store=False)
    for a, b in zip(plain[:3], out_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert plain[3] == ()
    # the reference engine (per-layer blocks) agrees too, and all of it did move
    sl = [slice(0, 2), slice(2, 4)]
    out_r, g_r = grads(lambda *a: run_reference(*a, sl), C, Wr, X0, Y0, dyn, w)
    for a, b in zip(out_r + g_r, out_p + g_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert out_p[0].std() > 0.05
    if kind in ("linear", "liquid", "quadratic"):  # the clip is reached and has zero gradient
        assert ((out_p[0] == 0) | (out_p[0] == 1)).any()


@pytest.mark.parametrize(("kind", "scheme"), [("spintronic", "euler"), ("ctrnn", "euler"),
                                              ("spintronic", "expheun"), ("ctrnn", "expheun")])
def test_adjoint_against_finite_differences(kind: str, scheme: str, torch_backend: None) -> None:
    """The hand-written backward against central differences of the forward, entry by entry
    of a few weights and inputs (truth that needs no autograd at all)."""
    C, Wr, X0, Y0, dyn = problem(kind, scheme, K=1, B=2, T=3, seed=3)
    w = weights(C)

    def loss(C_: torch.Tensor, Wr_: torch.Tensor, X0_: torch.Tensor, Y0_: torch.Tensor) -> float:
        with torch.no_grad():
            outs = integrate(C_, Wr_, X0_, Y0_, dyn)[:3]
        return float(sum((o * wi).sum() for o, wi in zip(outs, w, strict=True)))

    _, g = grads(EulerScan.apply, C, Wr, X0, Y0, dyn, w)
    ins = [C, Wr, X0, Y0]
    eps = 1e-6
    for which, idx in [(0, (0, 1, 2, 3)), (0, (0, 0, 0, 0)), (1, (0, 0, 1)), (1, (0, 3, 2)),
                       (1, (0, 2, 3)), (1, (0, 2, 0)), (2, (0, 1, 2)), (3, (0, 0, 3))]:
        plus = [t.clone() for t in ins]
        minus = [t.clone() for t in ins]
        plus[which][idx] += eps
        minus[which][idx] -= eps
        fd = (loss(*plus) - loss(*minus)) / (2 * eps)
        assert g[which][idx].item() == pytest.approx(fd, rel=1e-6, abs=1e-8), (which, idx)


def test_gradients_of_unused_outputs_count_as_zero(torch_backend: None) -> None:
    """Only ``X_final`` or only ``Y_final`` in the loss: the other outputs' gradients are None
    in the backward and act as zeros (checked against the full loss with zero weights)."""
    for scheme in ("euler", "expheun"):
        C, Wr, X0, Y0, dyn = problem("spintronic", scheme, seed=5)
        for used in (1, 2):
            ins = [t.clone().requires_grad_() for t in (C, Wr, X0, Y0)]
            outs = EulerScan.apply(*ins, dyn)
            g_one = torch.autograd.grad(outs[used].sum(), ins)
            w = [torch.zeros(1, dtype=F64)] * 3
            w[used] = torch.ones(1, dtype=F64)
            _, g_all = grads(plain_loop, C, Wr, X0, Y0, dyn, w)
            for a, b in zip(g_one, on_band(g_all, dyn), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_run_fast_uses_the_adjoint_only_when_gradients_are_wanted(torch_backend: None) -> None:
    C, Wr, X0, Y0, dyn = problem(seed=2)
    sl = [slice(0, 2), slice(2, 4)]
    ref = plain_loop(C, Wr, X0, Y0, dyn)
    for needs in ((True, False), (False, True)):  # either of C and Wr asks for gradients
        c, wr = C.clone().requires_grad_(needs[0]), Wr.clone().requires_grad_(needs[1])
        outs = run_fast(c, wr, X0, Y0, dyn, sl)
        assert all(o.grad_fn is not None for o in outs)
        outs[0].sum().backward()
        assert (c.grad is not None) == needs[0] and (wr.grad is not None) == needs[1]
        for a, b in zip(outs, ref, strict=True):
            torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-13)
    outs = run_fast(C, Wr, X0, Y0, dyn, sl)  # nothing wants gradients
    assert all(o.grad_fn is None and not o.requires_grad for o in outs)
    with torch.no_grad():
        outs = run_fast(C.clone().requires_grad_(), Wr.clone().requires_grad_(), X0, Y0, dyn, sl)
    assert all(o.grad_fn is None for o in outs)
    for a, b in zip(outs, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_run_fast_without_gradients_stores_nothing(monkeypatch: pytest.MonkeyPatch,
                                                  torch_backend: None) -> None:
    """The forward-only path asks :func:`integrate` for no saved tensors (memory: a training
    batch's every sub-step); the gradient path does not go through it at all."""
    calls: list[bool] = []
    real = engine.integrate

    def spy(*args: Any, **kw: Any) -> Any:
        calls.append(kw.get("store", False))
        return real(*args, **kw)

    monkeypatch.setattr(engine, "integrate", spy)
    C, Wr, X0, Y0, dyn = problem(seed=2)
    sl = [slice(0, 2), slice(2, 4)]
    run_fast(C, Wr, X0, Y0, dyn, sl)
    with torch.no_grad():
        run_fast(C.clone().requires_grad_(), Wr, X0, Y0, dyn, sl)
    assert calls == [False, False]
    run_fast(C.clone().requires_grad_(), Wr, X0, Y0, dyn, sl)
    assert calls == [False, False]


def test_broadcast_initial_state_and_coefficients(torch_backend: None) -> None:
    """``X0``/``Y0`` of one trial and one row broadcast over ``(K, B)``; the inputs are not
    written to."""
    for scheme in ("euler", "expheun"):
        C, Wr, X0, Y0, dyn = problem("spintronic", scheme, K=2, B=3, seed=9)
        x0, y0 = X0[:1, :1].clone(), Y0[:1, :1].clone()
        keep = [t.clone() for t in (C, Wr, x0, y0)]
        got = integrate(C, Wr, x0, y0, dyn, store=True)[:3]
        want = plain_loop(C, Wr, x0.expand_as(X0), y0.expand_as(Y0), dyn)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        for a, b in zip((C, Wr, x0, y0), keep, strict=True):
            assert torch.equal(a, b)


def test_float32_runs_in_float32(torch_backend: None) -> None:
    C, Wr, X0, Y0, dyn = problem("spintronic", "euler", dtype=torch.float32, seed=4)
    dyn = dataclasses.replace(dyn, gamma=dyn.gamma.float(), q=dyn.q.float(), a=dyn.a.float(),
                              floor=dyn.floor.float())
    outs = integrate(C, Wr, X0, Y0, dyn)[:3]
    assert all(o.dtype == torch.float32 for o in outs)
    ref = plain_loop(*(t.double() for t in (C, Wr, X0, Y0)), problem("spintronic", "euler", seed=4)[4])
    for a, b in zip(outs, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- layer band

def test_band_mask_is_the_sending_and_the_next_layer() -> None:
    assert torch.equal(band_mask(3, None), torch.ones(3, 3, dtype=torch.bool))
    m = band_mask(6, 2)
    layer = torch.tensor([0, 0, 1, 1, 2, 2])
    for s in range(6):
        for r in range(6):
            assert bool(m[s, r]) == ((layer[r] - layer[s]).item() in (0, 1))
    assert m.dtype == torch.bool and m.shape == (6, 6) and m.device.type == "cpu"
    assert band_mask(5, 2, torch.device("cpu"))[2, 4]  # a short last layer
    assert not band_mask(5, 2)[4, 2] and not band_mask(5, 2)[0, 4]


def off_band_runs(scheme: str, seed: int) -> tuple[Any, ...]:
    """The engine on a 3-layer problem, once as drawn and once with 3.0 added to every recurrent
    entry outside the layer band: both runs' outputs must be equal and the off-band gradient zero
    (checked here). Returns the problem, the noisy matrix and both runs' outputs and gradients."""
    C, Wr, X0, Y0, dyn = problem("spintronic", scheme, L=3, N=2, seed=seed)
    band = band_mask(6, 2)
    noisy = Wr + (~band) * 3.0
    w = weights(C)
    out_a, g_a = grads(EulerScan.apply, C, Wr, X0, Y0, dyn, w)
    out_b, g_b = grads(EulerScan.apply, C, noisy, X0, Y0, dyn, w)
    for a, b in zip(out_a, out_b, strict=True):
        assert torch.equal(a, b)
    assert (g_b[1][:, ~band] == 0).all()
    return C, Wr, X0, Y0, dyn, w, band, noisy, out_a, g_a, g_b


@pytest.mark.parametrize("scheme", engine.SCHEMES)
def test_entries_outside_the_band_neither_act_nor_learn(scheme: str, torch_backend: None) -> None:
    C, Wr, X0, Y0, dyn, w, band, noisy, out_a, g_a, g_b = off_band_runs(scheme, seed=11)
    assert (g_b[1][:, band] != 0).any()
    torch.testing.assert_close(g_a[1], g_b[1], rtol=0, atol=1e-14)
    with torch.no_grad():  # the forward-only path ignores them as well
        assert torch.equal(integrate(C, noisy, X0, Y0, dyn)[0], out_a[0])
    # dense (no layer_size): the same entries do act
    dense = dataclasses.replace(dyn, layer_size=None)
    assert not torch.equal(integrate(C, noisy, X0, Y0, dense)[0], out_a[0])


# --------------------------------------------------------------------------- small helpers

def test_gain_helpers_and_outputs() -> None:
    x = torch.linspace(-0.5, 1.5, 9, dtype=F64)
    assert torch.equal(engine._gain("ctrnn", x), torch.ones_like(x))
    assert torch.equal(engine._gain("linear", x), torch.ones_like(x))
    assert torch.equal(engine._gain("spintronic", x), x * (1 - x))
    assert engine._gain_dx("linear", x) is None and engine._gain_dx("ctrnn", x) is None
    torch.testing.assert_close(engine._gain_dx("quadratic", x), 2 * x)
    ctr = Dynamics("ctrnn", 0.1, 1, torch.ones(1, 1, 1), None, None)
    spin = Dynamics("spintronic", 0.1, 1, torch.ones(1, 1, 1), None, None)
    torch.testing.assert_close(engine._out(ctr, x), torch.tanh(x))
    assert torch.equal(engine._out(spin, x), x)
    torch.testing.assert_close(engine._out_dx(ctr, x), 1 - torch.tanh(x) ** 2)
    assert engine._out_dx(spin, x) is None
    y, xo = torch.full_like(x, 0.5), x * 0.5
    assert torch.equal(engine._filter(spin, y, x, xo), x)  # no filter: the output itself
    a = torch.tensor(0.8, dtype=F64)
    filt = dataclasses.replace(ctr, a=a)
    torch.testing.assert_close(engine._filter(filt, y, x, xo), a * y + torch.tanh(x) - torch.tanh(xo))
    half = dataclasses.replace(filt, scheme="expheun", a_half=torch.tensor(0.3, dtype=F64))
    torch.testing.assert_close(engine._filter(half, y, x, xo),
                               a * y + 0.3 * (torch.tanh(x) - torch.tanh(xo)))


def test_exact_step_is_the_held_drive_step_of_sims_neurons() -> None:
    x = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    D = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    dyn = Dynamics("spintronic", 0.3, 1, torch.full((1, 1, 3), 0.7, dtype=F64),
                   torch.full((1, 1, 3), 0.2, dtype=F64), None, scheme="expheun",
                   floor=torch.full((1, 1, 1), 0.01, dtype=F64))
    got = engine.exact_step(dyn, x, D, grads=True)
    want = held_drive_step("spintronic", x, D, dyn.gamma, 0.3, dyn.q, torch, True, dyn.floor)
    assert len(got) == 3
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert len(engine.exact_step(dyn, x, D)) == 1
    torch.testing.assert_close(engine.exact_step(dyn, x, D)[0], want[0])


def test_banded_zeroes_outside_the_band_only_with_a_layer_size() -> None:
    Wr = torch.ones(1, 4, 4, dtype=F64)
    dyn = Dynamics("spintronic", 0.1, 1, torch.ones(1, 1, 4), None, None, 2)
    assert torch.equal(engine._banded(Wr, dyn), band_mask(4, 2).to(F64)[None])
    assert engine._banded(Wr, dataclasses.replace(dyn, layer_size=None)) is Wr


def test_engine_registry_names_the_allowed_engines() -> None:
    assert engine.get_engine("fast") is run_fast and engine.get_engine("reference") is run_reference
    with pytest.raises(ConfigError) as err:
        engine.get_engine("rk4")
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert err.value.key == "train.engine" and err.value.source is None
    assert "'rk4'" in str(err.value) and "fast, reference" in str(err.value)


# --------------------------------------------------------------------------- native dispatch

def test_set_native_and_flush_return_the_previous_setting() -> None:
    first = engine.set_native(False)
    try:
        assert engine.set_native(True) is False
        assert engine.set_native(0) is True and engine._native_allowed[0] is False  # type: ignore[arg-type]
    finally:
        engine.set_native(first)
    first = engine.set_flush_subnormals(False)
    try:
        assert engine.set_flush_subnormals(True) is False
        assert engine.set_flush_subnormals(1) is True and engine._flush_subnormals[0] is True  # type: ignore[arg-type]
    finally:
        engine.set_flush_subnormals(first)


def test_native_is_chosen_only_for_cpu_float32_or_float64_of_one_dtype(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lib = object()
    monkeypatch.setattr(engine, "native_library", lambda: lib)
    previous = engine.set_native(True)
    try:
        d, f, h = torch.zeros(2, dtype=F64), torch.zeros(2), torch.zeros(2, dtype=torch.float16)
        assert engine._native_for(d, d, d) is lib and engine._native_for(f, f) is lib
        assert engine._native_for(h, h) is None
        assert engine._native_for(torch.zeros(2, dtype=torch.int64)) is None
        assert engine._native_for(d, f) is None and engine._native_for(f, d, f) is None
        assert engine._native_for(f, f, d) is None
        meta = torch.zeros(2, device="meta")
        assert engine._native_for(meta, meta) is None and engine._native_for(f, meta) is None
        engine.set_native(False)
        assert engine._native_for(d, d) is None
    finally:
        engine.set_native(previous)


def test_native_record_without_and_with_a_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_native_lib", [])
    monkeypatch.setattr(engine, "_native_info", {"compiler": "c 1", "flags": ["-O3"]})
    calls: list[int] = []

    def fake_library() -> object:
        calls.append(1)
        engine._native_lib.append("LIB")  # type: ignore[arg-type]
        return "LIB"

    monkeypatch.setattr(engine, "native_library", fake_library)
    previous = engine.set_native(True)
    try:
        rec = engine.native_record("reference")  # no build for the reference engine
        assert calls == [] and rec == {"name": "reference", "native": False, "native_allowed": True,
                                       "built": False, "compiler": "c 1", "flags": ["-O3"]}
        rec = engine.native_record("fast")  # built on demand for the fast engine
        assert calls == [1] and rec["native"] is True and rec["built"] is True
        assert engine.native_record("fast")["native"] is True and calls == [1]  # once
        engine.set_native(False)
        rec = engine.native_record("fast")
        assert rec["native"] is False and rec["native_allowed"] is False and rec["built"] is True
        engine._native_lib[:] = [None]
        engine.set_native(True)
        assert engine.native_record(None) == {"name": None, "native": False, "native_allowed": True,
                                             "built": True, "compiler": "c 1", "flags": ["-O3"]}
    finally:
        engine.set_native(previous)


def test_record_engine_writes_the_record(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    class Folder:
        def update_environment(self, **kw: Any) -> None:
            seen.append(kw)

    monkeypatch.setattr(engine, "native_record", lambda name: {"name": name, "x": 1})
    engine.record_engine(Folder(), "reference")  # type: ignore[arg-type]
    assert seen == [{"engine": {"name": "reference", "x": 1}}]


def test_native_library_is_built_once_and_a_failure_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_native_lib", [])
    monkeypatch.setattr(engine, "_native_info", {})
    monkeypatch.delenv("HIL_REQUIRE_NATIVE", raising=False)
    builds: list[int] = []

    def ok() -> str:
        builds.append(1)
        return "LIB"

    monkeypatch.setattr(engine, "_build_native", ok)
    assert engine.native_library() == "LIB" and engine.native_library() == "LIB" and builds == [1]

    def fail() -> str:
        builds.append(2)
        raise OSError("x" * 3000 + "the end")

    engine._native_lib.clear()
    monkeypatch.setattr(engine, "_build_native", fail)
    with pytest.warns(RuntimeWarning, match="^hil: native engine unavailable, using the torch engine"):
        assert engine.native_library() is None
    err = engine._native_info["error"]
    assert isinstance(err, str) and len(err) == 2000 and err.endswith("the end")
    assert engine.native_library() is None and builds == [1, 2]  # cached: no second try
    for value, raises in (("", False), ("0", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("HIL_REQUIRE_NATIVE", value)
        assert engine._require_native() is raises
        if raises:
            with pytest.raises(RuntimeError, match="HIL_REQUIRE_NATIVE is set.*the end"):
                engine.native_library()
        else:
            assert engine.native_library() is None
    monkeypatch.delenv("HIL_REQUIRE_NATIVE")
    assert engine._require_native() is False
    engine._native_info.clear()
    monkeypatch.setenv("HIL_REQUIRE_NATIVE", "1")
    with pytest.raises(RuntimeError, match="the build failed earlier"):
        engine.native_library()


# --------------------------------------------------------------------------- build and cache

def test_cache_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HIL_CACHE_DIR", str(tmp_path / "c"))
    assert engine._cache_dir() == tmp_path / "c"
    monkeypatch.setenv("HIL_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engine._cache_dir() == tmp_path / "xdg" / "hil"
    monkeypatch.delenv("HIL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert engine._cache_dir() == tmp_path / "home" / ".cache" / "hil"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert engine._cache_dir() == tmp_path / "home" / ".cache" / "hil"


def test_cpu_signature_reads_the_flags_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins
    import platform

    real_open = builtins.open
    cpuinfo = tmp_path / "cpuinfo"

    def fake_open(path: Any, *a: Any, **kw: Any) -> Any:
        if path == "/proc/cpuinfo":
            return real_open(cpuinfo, *a, **kw)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(platform, "machine", lambda: "m64")
    monkeypatch.setattr(platform, "processor", lambda: "proc")
    cpuinfo.write_text("processor : 0\nmodel name : X\nflags : a b c\nbugs : z\n")
    assert engine._cpu_signature() == "m64flags : a b c\n"
    cpuinfo.write_text("processor : 0\nFeatures : neon\n")
    assert engine._cpu_signature() == "m64Features : neon\n"
    cpuinfo.write_text("processor : 0\n")
    assert engine._cpu_signature() == "m64proc"
    cpuinfo.unlink()
    assert engine._cpu_signature() == "m64proc"


def test_compiler_choice_and_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    found = {"g++": None, "c++": "/bin/c++", "clang++": "/bin/clang++"}
    monkeypatch.setattr(engine.shutil, "which", lambda name: found[name])
    monkeypatch.setenv("CXX", "/opt/my-cxx")
    assert engine._compiler() == "/opt/my-cxx"
    monkeypatch.delenv("CXX")
    assert engine._compiler() == "/bin/c++"
    found["g++"] = "/bin/g++"
    assert engine._compiler() == "/bin/g++"
    found.update({"g++": None, "c++": None})
    assert engine._compiler() == "/bin/clang++"
    found["clang++"] = None
    with pytest.raises(RuntimeError, match=r"^no C\+\+ compiler found \(set CXX\)$"):
        engine._compiler()
    out = tmp_path / "out-cxx"
    out.write_text("#!/bin/sh\necho '  cxx 9.1  '\necho warn >&2\n")
    err = tmp_path / "err-cxx"
    err.write_text("#!/bin/sh\necho ' only stderr ' >&2\nexit 3\n")
    for p in (out, err):
        p.chmod(0o755)
    assert engine._compiler_version(str(out)) == "cxx 9.1"
    assert engine._compiler_version(str(err)) == "only stderr"
    with pytest.raises(RuntimeError, match="^cannot run the C\\+\\+ compiler '/no/such/cxx': ") as e:
        engine._compiler_version("/no/such/cxx")
    assert isinstance(e.value.__cause__, OSError)


def test_cache_key_is_a_length_prefixed_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "_cpu_signature", lambda: "cpu")
    key = engine._cache_key("g++", "v1", ["-O3", "-x"], b"src")
    h = hashlib.sha256()
    for part in (b"g++", b"v1", b"-O3\0-x\0-march=native", b"src", b"cpu"):
        h.update(len(part).to_bytes(8, "little") + part)
    assert key == h.hexdigest()[:20]
    # the prefix keeps the parts apart: moving a byte between two parts changes the key
    assert engine._cache_key("g+", "+v1", ["-O3", "-x"], b"src") != key
    monkeypatch.setattr(engine, "_cpu_signature", lambda: "other")
    assert engine._cache_key("g++", "v1", ["-O3", "-x"], b"src") != key


FAKE_CXX = """#!/bin/sh
# records its arguments (one a line, then ----); refuses -march=native when told to;
# "compiles" by copying a stand-in library
if [ "$1" = "--version" ]; then echo "fake-cxx 1.0"; echo "second line"; exit 0; fi
printf '%s\\n' "$@" >> "{log}"
echo ---- >> "{log}"
out=""
prev=""
for a in "$@"; do
  if [ "$a" = "-march=native" ] && [ -f "{no_march}" ]; then echo "no march here" >&2; exit 1; fi
  if [ "$prev" = "-o" ]; then out="$a"; fi
  prev="$a"
done
cp "{lib}" "$out"
"""


def compiler_calls(log: Path) -> list[list[str]]:
    """The fake compiler's argument lists, one per call (``--version`` calls not recorded)."""
    if not log.exists():
        return []
    return [c.strip("\n").split("\n") for c in log.read_text().split("----\n") if c.strip()]


@pytest.fixture
def fake_cxx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fake compiler that copies a stand-in shared library (one of Python's own extension
    modules: loadable by ctypes; :func:`engine._declare` is replaced, the layout check is
    tested in test_native_build.py)."""
    import _ctypes

    paths = {"log": tmp_path / "cxx.log", "no_march": tmp_path / "no_march",
             "lib": Path(_ctypes.__file__), "cxx": tmp_path / "fake-cxx",
             "cache": tmp_path / "cache" / "deep"}  # its parent does not exist yet
    paths["cxx"].write_text(FAKE_CXX.format(**{k: str(v) for k, v in paths.items()}))
    paths["cxx"].chmod(0o755)
    monkeypatch.setenv("CXX", str(paths["cxx"]))
    monkeypatch.setenv("HIL_CACHE_DIR", str(paths["cache"]))
    monkeypatch.delenv("HIL_CXXFLAGS", raising=False)
    declared: list[Any] = []
    monkeypatch.setattr(engine, "_declare", declared.append)
    monkeypatch.setattr(engine, "_native_info", {"stale": 1})
    return {**paths, "declared": declared}  # type: ignore[dict-item]


def test_build_compiles_once_per_key_and_records_the_flags(fake_cxx: dict[str, Any]) -> None:
    lib = engine._build_native()
    flags = engine._kernel_flags()
    calls = compiler_calls(fake_cxx["log"])
    assert len(calls) == 1
    args = calls[0]
    assert args[:-4] == flags and args[-4:-2] == ["-march=native", str(engine.KERNEL_SOURCE)]
    assert args[-2] == "-o" and Path(args[-1]).parent.parent == fake_cxx["cache"]
    built = list(fake_cxx["cache"].glob("engine-*.so"))
    assert len(built) == 1 and lib._name == str(built[0])
    assert fake_cxx["declared"] == [lib]  # type: ignore[comparison-overlap]
    assert len(built[0].stem) == len("engine-") + 20
    info = json.loads(built[0].with_suffix(".json").read_text())
    assert info == {"flags": [*flags, "-march=native"]}
    assert engine._native_info == {"compiler": "fake-cxx 1.0", "flags": [*flags, "-march=native"],
                                   "library": str(built[0])}
    assert sorted(p.name for p in fake_cxx["cache"].iterdir()) == sorted(
        [built[0].name, built[0].with_suffix(".json").name])  # no temporary folder left
    engine._build_native()  # cached: not compiled again
    assert len(compiler_calls(fake_cxx["log"])) == 1
    built[0].with_suffix(".json").unlink()  # a library cached before the record: its flags now
    engine._build_native()
    assert engine._native_info["flags"] == flags


def test_build_without_march_native(fake_cxx: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cxx["no_march"].write_text("")
    monkeypatch.setenv("HIL_CXXFLAGS", "-DX=1")
    engine._build_native()
    calls = compiler_calls(fake_cxx["log"])
    flags = engine._kernel_flags()
    assert flags[-1] == "-DX=1" and len(calls) == 2
    assert calls[0][:-3] == [*flags, "-march=native"] and calls[1][:-3] == flags
    built = next(fake_cxx["cache"].glob("engine-*.json"))
    assert json.loads(built.read_text()) == {"flags": flags}
    assert engine._native_info["flags"] == flags
    # a compiler that fails both ways: the error carries the tail of its messages
    fake_cxx["cxx"].write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then exit 0; fi\n"
                               "printf 'a%.0s' $(seq 1 2100) >&2; echo ' last words' >&2; exit 1\n")
    monkeypatch.setenv("HIL_CXXFLAGS", "-DX=2")
    with pytest.raises(RuntimeError, match="^compiling the native engine failed") as e:
        engine._build_native()
    msg = str(e.value)
    assert msg.endswith("last words\n") and len(msg.split(":\n", 1)[1]) == 2000
    assert f"({fake_cxx['cxx']})" in msg
    monkeypatch.setenv("HIL_CXXFLAGS", "-DX=3")
    fake_cxx["cxx"].write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then exit 0; fi\n"
                               "echo 'only stdout'; exit 1\n")
    with pytest.raises(RuntimeError, match="only stdout"):
        engine._build_native()


# --------------------------------------------------------------------------- native call sizes

class FakeLib:
    """Stands in for the kernel: records the ``hil_scan`` arguments, answers with a code."""

    def __init__(self, rows: int = 8, rc: int = 0) -> None:
        self.rows, self.rc = rows, rc
        self.calls: list[tuple[int, int, dict[str, Any]]] = []
        self.drives: list[list[float]] = []

    def hil_rows_per_tile(self, code: int) -> int:
        return self.rows * (2 - code)

    def hil_scan(self, code: int, backward: int, args: Any) -> int:
        a = args._obj
        self.calls.append((code, backward, {n: getattr(a, n) for n, _ in engine.HilScanArgs._fields_}))
        return self.rc

    def hil_neuron(self, *args: Any) -> int:
        self.calls.append((-1, -1, {"args": args}))
        kind = ctypes.c_double if args[0] == 1 else ctypes.c_float
        self.drives.append(list((kind * args[2]).from_address(args[4])))
        return self.rc


def test_native_call_sizes_and_coefficients() -> None:
    lib = FakeLib()
    C, Wr, X0, Y0, dyn = problem("spintronic", "euler", K=2, B=19, T=11, substeps=3, seed=1)
    call = engine._NativeCall(lib, C.shape, F64, dyn)  # type: ignore[arg-type]
    assert call.code == 1 and call.R == 8 and call.tiles == 3 and call.shape == (2, 19, 11, 4)
    block = 16 // 3
    assert call.checkpoints == (11 - 1) // block == 2
    assert call.sizes == dict(K=2, B=19, NT=11, M=4, substeps=3, layer_size=2, kind=0, has_q=True,
                              has_filter=True, nthreads=torch.get_num_threads(), block_points=5,
                              checkpoints=2, flush_subnormals=engine._flush_subnormals[0],
                              scheme=0, h=0.4)
    assert torch.equal(call.gamma, dyn.gamma.reshape(2, 4)) and call.gamma.is_contiguous()
    assert torch.equal(call.q, dyn.q.reshape(2, 4)) and torch.equal(call.a, dyn.a.reshape(2))
    assert call.ah is None and torch.equal(call.th, dyn.floor.reshape(2))
    f32 = engine._NativeCall(lib, torch.Size((1, 16, 2, 4)), torch.float32, dataclasses.replace(
        dyn, kind="ctrnn", q=None, a=None, floor=None, gamma=dyn.gamma[:1], layer_size=None,
        substeps=20))
    assert f32.code == 0 and f32.R == 16 and f32.tiles == 1 and f32.checkpoints == 1
    assert f32.gamma.dtype == torch.float32 and f32.q is None and f32.a is None and f32.th is None
    assert f32.sizes["layer_size"] == 4 and f32.sizes["kind"] == 1 and f32.sizes["block_points"] == 1
    assert f32.sizes["has_q"] is False and f32.sizes["has_filter"] is False
    eh = engine._NativeCall(lib, torch.Size((2, 8, 30, 4)), F64,
                            problem("spintronic", "expheun", K=2, substeps=1, seed=1)[4])
    assert eh.sizes["scheme"] == 1 and eh.sizes["block_points"] == 8 and eh.checkpoints == 3
    assert torch.equal(eh.ah, eh.a.sqrt() * 0.9)
    one = engine._NativeCall(lib, torch.Size((1, 1, 1, 4)), F64, dataclasses.replace(
        dyn, gamma=dyn.gamma[:1, :, :1], q=None, a=None, floor=None, substeps=1))
    assert one.checkpoints == 1 and one.gamma.shape == (1, 4) and (one.gamma == dyn.gamma[0, 0, 0]).all()
    for kind, code in (("linear", 2), ("liquid", 3), ("quadratic", 4)):
        d = dataclasses.replace(dyn, kind=kind, floor=None)
        assert engine._NativeCall(lib, C.shape, F64, d).sizes["kind"] == code  # type: ignore[arg-type]


def test_native_call_passes_named_tensors_and_checks_the_code() -> None:
    lib = FakeLib()
    C, Wr, X0, Y0, dyn = problem("spintronic", "euler", K=2, B=3, T=5, substeps=2, seed=1)
    call = engine._NativeCall(lib, C.shape, F64, dyn)  # type: ignore[arg-type]
    c, w, x0, y0 = call.inputs(C, Wr[:1], X0[:1, :1], Y0[:1])
    assert w.shape == (2, 4, 4) and x0.shape == (2, 3, 4) and y0.shape == (2, 3, 4)
    assert all(t.is_contiguous() for t in (c, w, x0, y0)) and c is C
    Xseq, Xf, Yf, Ycp = call.forward(c, w, x0, y0, store=True)
    assert Xseq.shape == (2, 3, 5, 4) and Xf.shape == Yf.shape == (2, 3, 4)
    assert Ycp.shape == (2, 1, call.checkpoints, 4, 8)
    code, backward, args = lib.calls[-1]
    assert (code, backward) == (1, 0)
    for name, t in (("C", c), ("W", w), ("X0", x0), ("Y0", y0), ("Xseq", Xseq), ("Xf", Xf),
                    ("Yf", Yf), ("Ycp", Ycp), ("gamma", call.gamma), ("q", call.q), ("a", call.a),
                    ("th", call.th)):
        assert args[name] == t.data_ptr(), name
    assert args["ah"] is None and args["gC"] is None and args["K"] == 2 and args["h"] == 0.4
    assert call.forward(c, w, x0, y0, store=False)[3] is None
    assert lib.calls[-1][2]["Ycp"] is None
    gX = torch.ones(1, dtype=F64)
    gC, gW, gX0, gY0 = call.backward(c, w, x0, y0, Xseq, Ycp, None, gX, None)
    assert gC.shape == (2, 3, 5, 4) and gW.shape == (2, 4, 4) and gX0.shape == gY0.shape == (2, 3, 4)
    code, backward, args = lib.calls[-1]
    assert (code, backward) == (1, 1) and args["gXseq"] is None and args["gYf"] is None
    assert args["WT"] is not None and args["WT"] != args["W"] and args["gWp"] is not None
    assert args["gC"] == gC.data_ptr() and args["gW"] == gW.data_ptr()
    assert args["gX0"] == gX0.data_ptr() and args["gY0"] == gY0.data_ptr()
    lib.rc = 3
    with pytest.raises(RuntimeError, match=r"^native Euler scan failed \(code 3\)"):
        call.forward(c, w, x0, y0, store=False)
    with pytest.raises(KeyError):
        call.run(False, {"Xfinal": Xf})
    with pytest.raises(AssertionError):
        call.run(False, {"Xf": Xf.float()})
    with pytest.raises(AssertionError):
        call.run(False, {"Xseq": Xseq.transpose(1, 2)})


def test_native_neuron_arguments_and_errors() -> None:
    lib = FakeLib()
    x = torch.linspace(0, 1, 5, dtype=F64)
    out = engine.native_neuron(lib, "ctrnn", x, torch.tensor(2.0), gamma=1.5, q=0.3, h=0.2, floor=0.01)  # type: ignore[arg-type]
    assert list(out) == ["gain", "out", "out_dx", "step", "step_dx", "step_dD"]
    assert all(t.shape == x.shape and t.dtype == F64 for t in out.values())
    assert lib.drives[-1] == [2.0] * 5
    args = lib.calls[-1][2]["args"]
    assert args[:3] == (1, 1, 5) and args[3] == x.data_ptr() and args[5:9] == (1.5, 0.3, 0.2, 0.01)
    assert [args[9][i] for i in range(6)] == [t.data_ptr() for t in out.values()]
    out = engine.native_neuron(lib, "quadratic", x.float())  # type: ignore[arg-type]
    assert list(out) == ["gain", "out", "out_dx"] and out["gain"].dtype == torch.float32
    assert lib.drives[-1] == [0.0] * 5
    args = lib.calls[-1][2]["args"]
    assert args[:3] == (0, 4, 5) and args[5:9] == (1.0, 0.0, 0.1, 0.0)
    for bad in (x.reshape(5, 1), x.to(torch.int64), x.to(torch.float16)):
        with pytest.raises(ValueError, match="^x must be a 1-D float32 or float64 tensor$"):
            engine.native_neuron(lib, "spintronic", bad)  # type: ignore[arg-type]
    lib.rc = 2
    with pytest.raises(RuntimeError, match="^hil_neuron failed \\(code 2\\) for kind 'linear'$"):
        engine.native_neuron(lib, "linear", x)  # type: ignore[arg-type]


def test_native_neuron_defaults_on_the_real_kernel(native_lib: ctypes.CDLL) -> None:
    """No drive means zero drive, and the defaults gamma=1, q=0, h=0.1, floor=0."""
    x = torch.linspace(0.05, 0.95, 7, dtype=F64)
    got = engine.native_neuron(native_lib, "spintronic", x[::1])
    want = held_drive_step("spintronic", x, torch.zeros_like(x), torch.tensor(1.0, dtype=F64), 0.1,
                           None, torch, True)
    for name, w in zip(("step", "step_dx", "step_dD"), want, strict=True):
        torch.testing.assert_close(got[name], w, rtol=1e-13, atol=1e-14)
    assert torch.equal(got["gain"], x * (1 - x))
    strided = torch.linspace(0.05, 0.95, 14, dtype=F64)[::2]  # not contiguous: copied first
    torch.testing.assert_close(engine.native_neuron(native_lib, "spintronic", strided)["gain"],
                               strided * (1 - strided))


@pytest.mark.parametrize(("kind", "scheme"), [("spintronic", "euler"), ("ctrnn", "expheun"),
                                              ("quadratic", "euler")])
def test_native_back_end_is_the_plain_loop(kind: str, scheme: str, native_lib: ctypes.CDLL) -> None:
    """The real kernel through the Python call layer: broadcast inputs, states and gradients
    against the plain loop; ``integrate``'s stored tensors are the contiguous, expanded ones."""
    previous = engine.set_native(True)
    try:
        C, Wr, X0, Y0, dyn = problem(kind, scheme, K=2, B=9, T=6, substeps=3, seed=13)
        x0, y0, wr = X0[:1], Y0[:, :1], Wr[:1]
        w = weights(C)
        out_n, g_n = grads(EulerScan.apply, C, wr.expand_as(Wr), x0.expand_as(X0), y0.expand_as(Y0), dyn, w)
        out_p, g_p = grads(plain_loop, C, wr.expand_as(Wr), x0.expand_as(X0), y0.expand_as(Y0), dyn, w)
        for a, b in zip(out_n + g_n, out_p + on_band(g_p, dyn), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        Xseq, Xf, Yf, saved = integrate(C, wr, x0, y0, dyn, store=True)
        assert len(saved) == 6 and saved[1].shape == (2, 4, 4) and saved[2].shape == (2, 9, 4)
        assert saved[5].shape[0] == 2
        for a, b in zip((Xseq, Xf, Yf), out_p, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        assert integrate(C, wr, x0, y0, dyn)[3] == ()
    finally:
        engine.set_native(previous)


def test_native_weight_gradient_keeps_the_band(native_lib: ctypes.CDLL) -> None:
    previous = engine.set_native(True)
    try:
        C, Wr, X0, Y0, dyn, w, band, noisy, out_a, g_a, g_b = off_band_runs("euler", seed=21)
        out_p, g_p = grads(plain_loop, C, Wr, X0, Y0, dyn, w)
        torch.testing.assert_close(g_a[1], on_band(g_p, dyn)[1], rtol=1e-10, atol=1e-12)
    finally:
        engine.set_native(previous)



def test_a_freshly_declared_library_computes_as_the_shared_one(native_lib: ctypes.CDLL) -> None:
    """:func:`engine._declare` on a private handle of the kernel: its return codes, the neuron
    functions' float arguments and pointers, and a whole scan then work as on the shared one."""
    private = ctypes.CDLL(native_lib._name)
    engine._declare(private)
    x = torch.linspace(0.05, 0.95, 11, dtype=F64)
    D = torch.linspace(-1.0, 3.0, 11, dtype=F64)
    mine = engine.native_neuron(private, "spintronic", x, D, 1.3, 0.4, 0.35, 0.02)
    shared = engine.native_neuron(native_lib, "spintronic", x, D, 1.3, 0.4, 0.35, 0.02)
    for name in shared:
        assert torch.equal(mine[name], shared[name]), name
    assert mine["step"].std() > 0.01
    C, Wr, X0, Y0, dyn = problem("spintronic", "euler", seed=17)
    call = engine._NativeCall(private, C.shape, F64, dyn)
    assert call.R == 8
    got = call.forward(*call.inputs(C, Wr, X0, Y0), store=False)[:3]
    for a, b in zip(got, plain_loop(C, Wr, X0, Y0, dyn), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("scheme", "q", "floor", "half"), [("euler", False, False, False),
                                                            ("expheun", False, False, False),
                                                            ("expheun", True, True, False),
                                                            ("euler", True, False, True)])
def test_optional_coefficients_absent(scheme: str, q: bool, floor: bool, half: bool,
                                      torch_backend: None) -> None:
    """No non-linear damping, no thermal floor, a filter without its mid-step factor: each
    optional coefficient's absence is its neutral value (forward and adjoint, dense ``Wr``)."""
    C, Wr, X0, Y0, dyn = problem("spintronic", scheme, q=q, floor=floor, half=half, banded=False,
                                 seed=23)
    assert (dyn.q is None) != q and (dyn.floor is None) != floor and dyn.a_half is None
    w = weights(C)
    out_p, g_p = grads(plain_loop, C, Wr, X0, Y0, dyn, w)
    out_f, g_f = grads(EulerScan.apply, C, Wr, X0, Y0, dyn, w)
    for a, b in zip(out_f + g_f, out_p + g_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    sl = [slice(0, 2), slice(2, 4)]
    out_r, g_r = grads(lambda *a: run_reference(*a, sl), C, Wr, X0, Y0, dyn, w)
    for a, b in zip(out_r + g_r, out_p + g_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("substeps", [1, 3])
@pytest.mark.parametrize("scheme", engine.SCHEMES)
def test_sub_steps_per_input_point(scheme: str, substeps: int, torch_backend: None) -> None:
    """One and three sub-steps per input point: ``Xseq`` is the state after each point's last
    sub-step, and its gradient enters the adjoint there (not at other sub-steps)."""
    C, Wr, X0, Y0, dyn = problem("spintronic", scheme, T=3, substeps=substeps, seed=29 + substeps)
    w = weights(C)
    out_p, g_p = grads(plain_loop, C, Wr, X0, Y0, dyn, w)
    out_f, g_f = grads(EulerScan.apply, C, Wr, X0, Y0, dyn, w)
    for a, b in zip(out_f + g_f, out_p + on_band(g_p, dyn), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_library_of_the_same_size_but_other_fields_is_refused(
        native_lib: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same size, other fields (``K`` as a 32-bit int plus padding): refused by the offsets
    alone, so a stale library never reads a field at the wrong place."""
    fields = [("K", ctypes.c_int32), ("pad", ctypes.c_int32), *engine.HilScanArgs._fields_[1:]]

    class Other(ctypes.Structure):
        _fields_ = fields

    assert ctypes.sizeof(Other) == ctypes.sizeof(engine.HilScanArgs)
    monkeypatch.setattr(engine, "HilScanArgs", Other)
    with pytest.raises(RuntimeError, match=r"^the native library's HilScanArgs \(37 fields, "):
        engine._declare(ctypes.CDLL(native_lib._name))
