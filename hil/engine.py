"""Time-integration engines for the multilayer dynamical network.

Both engines integrate the same coupled ODE system with explicit Euler, all layers updated
simultaneously from the state at the start of each step (the plain Euler method of the
whole network's ODE)::

    I_s     = C_t + Y_s @ Wr                      # drive of every neuron, all layers at once
    F_s     = -gamma X_s (1 + Q X_s) + I_s g(X_s) # g(x) = x(1-x) for the spintronic neuron
    X_{s+1} = X_s + h F_s                         # clipped to [0, 1] for the eq. 5.12 types
    Y_{s+1} = a Y_s + o(X_{s+1}) - o(X_s)         # high-pass filter (eq. 5), a = 1 - 2 pi f_cut h
    Y_{s+1} = o(X_{s+1})                          # ... or no filter

``C_t`` holds everything that does not depend on the state during input point ``t`` (input
weights times the scaled input, trainable and fixed biases, amplification ``S`` and drive
coefficient ``sigma``), ``Wr`` the block matrix of all intra-layer (diagonal blocks) and
inter-layer (sub-diagonal blocks) weights, already scaled. ``o`` is the identity, or tanh for
the CTRNN.

* :func:`scan_reference` is a straightforward autograd loop over time, sub-steps and layers.
  It is the correctness reference and the benchmark's baseline.
* :class:`EulerScan` is the fast engine: one batched matrix product per Euler step for all
  layers and all trials, pre-allocated state buffers, and a hand-written backward pass (the
  adjoint of the Euler recursion) whose weight gradient is a single product over all steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sims.neurons import CLIPPED_TYPES, TANH_OUTPUT_TYPES


@dataclass(frozen=True)
class Dynamics:
    """Constants of the integration (tensors broadcast against ``(K, B, M)``)."""

    kind: str
    h: float  # Euler step (ns)
    substeps: int
    gamma: torch.Tensor  # (K, 1, M)
    q: torch.Tensor | None  # (K, 1, M) or None when Q = 0 everywhere
    a: torch.Tensor | None  # (K, 1, 1) filter decay per step, None: no filter

    @property
    def clipped(self) -> bool:
        return self.kind in CLIPPED_TYPES

    @property
    def tanh_out(self) -> bool:
        return self.kind in TANH_OUTPUT_TYPES


def _gain(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "spintronic":
        return x * (1 - x)
    if kind in ("ctrnn", "linear"):
        return torch.ones_like(x)
    if kind == "liquid":
        return x
    return x * x  # quadratic


def _gain_dx(kind: str, x: torch.Tensor) -> torch.Tensor | None:
    if kind == "spintronic":
        return 1 - 2 * x
    if kind in ("ctrnn", "linear"):
        return None
    if kind == "liquid":
        return torch.ones_like(x)
    return 2 * x


def _damping(dyn: Dynamics, x: torch.Tensor) -> torch.Tensor:
    if dyn.q is not None and dyn.kind == "spintronic":
        return dyn.gamma * x * (1 + dyn.q * x)
    return dyn.gamma * x


def _out(dyn: Dynamics, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) if dyn.tanh_out else x


def scan_reference(
    C: torch.Tensor,
    Wr_blocks: list[list[torch.Tensor | None]],
    X0: list[torch.Tensor],
    Y0: list[torch.Tensor],
    dyn: Dynamics,
    layer_slices: list[slice],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain autograd loop: for each input point, each Euler sub-step, each layer.

    ``Wr_blocks[l][m]`` maps layer ``m``'s output to layer ``l``'s drive (``None`` when absent).
    Returns ``(Xseq (K,B,T,M), X_final, Y_final)`` like :class:`EulerScan`.
    """
    L = len(layer_slices)
    xs, ys = list(X0), list(Y0)
    T = C.shape[2]
    out = []
    for t in range(T):
        for _ in range(dyn.substeps):
            new_x, new_y = [], []
            for li, sl in enumerate(layer_slices):
                drive = C[:, :, t, sl]
                for m in range(L):
                    w = Wr_blocks[li][m]
                    if w is not None:
                        drive = drive + torch.bmm(ys[m], w)
                gam = dyn.gamma[..., sl]
                x = xs[li]
                if dyn.q is not None and dyn.kind == "spintronic":
                    damp = gam * x * (1 + dyn.q[..., sl] * x)
                else:
                    damp = gam * x
                f = -damp + drive * _gain(dyn.kind, x)
                xn = x + dyn.h * f
                if dyn.clipped:
                    xn = torch.clamp(xn, 0.0, 1.0)
                if dyn.a is not None:
                    yn = dyn.a * ys[li] + _out(dyn, xn) - _out(dyn, x)
                else:
                    yn = _out(dyn, xn)
                new_x.append(xn)
                new_y.append(yn)
            xs, ys = new_x, new_y
        out.append(torch.cat(xs, dim=-1))
    return torch.stack(out, dim=2), torch.cat(xs, -1), torch.cat(ys, -1)


def integrate(
    C: torch.Tensor,
    Wr: torch.Tensor,
    X0: torch.Tensor,
    Y0: torch.Tensor,
    dyn: Dynamics,
    store: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The fast forward loop. With ``store`` it keeps every step's state, drive and filtered
    output for the backward pass; without, it keeps only the current state (evaluation).

    Returns ``(Xseq, X_final, Y_final, saved)``.
    """
    K, B, T, M = C.shape
    n = T * dyn.substeps
    if store:
        Xs = C.new_empty((n + 1, K, B, M))
        Ds = C.new_empty((n, K, B, M))
        Ys = C.new_empty((n, K, B, M))
    else:
        Xs = C.new_empty((2, K, B, M))
        Ds = C.new_empty((1, K, B, M))
        Xseq_buf = C.new_empty((T, K, B, M))
    Xs[0].copy_(X0)
    Y = Y0.clone()
    h = dyn.h
    neg_gamma = -dyn.gamma
    s = 0
    for t in range(T):
        Ct = C[:, :, t]
        for _ in range(dyn.substeps):
            i, j = (s, s + 1) if store else (s % 2, (s + 1) % 2)
            X = Xs[i]
            if store:
                Ys[s].copy_(Y)
            D = torch.baddbmm(Ct, Y, Wr, out=Ds[s] if store else Ds[0])
            if dyn.q is not None and dyn.kind == "spintronic":
                F = X * (1 + dyn.q * X) * neg_gamma
            else:
                F = X * neg_gamma
            F.addcmul_(D, _gain(dyn.kind, X))
            Xn = torch.add(X, F, alpha=h, out=Xs[j])
            if dyn.clipped:
                Xn.clamp_(0.0, 1.0)
            if dyn.a is not None:
                if dyn.tanh_out:
                    Y.mul_(dyn.a).add_(torch.tanh(Xn)).sub_(torch.tanh(X))
                elif dyn.clipped:
                    Y.mul_(dyn.a).add_(Xn).sub_(X)
                else:
                    Y.mul_(dyn.a).add_(F, alpha=h)
            else:
                Y = torch.tanh(Xn) if dyn.tanh_out else Xn.clone()
            s += 1
        if not store:
            Xseq_buf[t].copy_(Xs[s % 2])
    if store:
        Xseq = Xs[dyn.substeps :: dyn.substeps].permute(1, 2, 0, 3).contiguous()
        return Xseq, Xs[n].clone(), Y, (Xs, Ds, Ys)
    return Xseq_buf.permute(1, 2, 0, 3).contiguous(), Xs[n % 2].clone(), Y, ()


class EulerScan(torch.autograd.Function):
    """Fast forward and hand-written backward of the Euler recursion (see module docstring).

    Inputs: ``C (K,B,T,M)``, ``Wr (K,M,M)`` (drive = ``Y @ Wr``), ``X0, Y0 (K,B,M)`` and a
    :class:`Dynamics`. Outputs: ``Xseq (K,B,T,M)`` (state at the end of every input point),
    ``X_final``, ``Y_final``.
    """

    @staticmethod
    def forward(ctx, C, Wr, X0, Y0, dyn: Dynamics):  # type: ignore[override]
        Xseq, Xf, Yf, saved = integrate(C, Wr, X0, Y0, dyn, store=True)
        ctx.save_for_backward(*saved, Wr)
        ctx.dyn = dyn
        ctx.shape = tuple(C.shape)
        return Xseq, Xf, Yf

    @staticmethod
    def backward(ctx, gXseq, gXfin, gYfin):  # type: ignore[override]
        Xs, Ds, Ys, Wr = ctx.saved_tensors
        dyn: Dynamics = ctx.dyn
        K, B, T, M = ctx.shape
        n = T * dyn.substeps
        h = dyn.h
        WrT = Wr.transpose(1, 2)
        gX = gXfin.clone() if gXfin is not None else Xs.new_zeros((K, B, M))
        gY = gYfin.clone() if gYfin is not None else Xs.new_zeros((K, B, M))
        gDs = Xs.new_empty((n, K, B, M))
        neg_gamma = -dyn.gamma
        for s in range(n - 1, -1, -1):
            if gXseq is not None and (s + 1) % dyn.substeps == 0:
                gX.add_(gXseq[:, :, (s + 1) // dyn.substeps - 1])
            X, D = Xs[s], Ds[s]
            Xn = Xs[s + 1]
            # dL/dX_{s+1} in full: direct, plus through Y_{s+1} = ... + o(X_{s+1})
            if dyn.tanh_out:
                gXn = gX.addcmul(1 - torch.tanh(Xn) ** 2, gY)
            else:
                gXn = gX + gY
            if dyn.clipped:
                gXn = gXn * ((Xn > 0) & (Xn < 1))
            gF = gXn * h
            gD = torch.mul(gF, _gain(dyn.kind, X), out=gDs[s])
            # dF/dX = -gamma (1 + 2 Q X) + D g'(X)
            if dyn.q is not None and dyn.kind == "spintronic":
                dFdX = (1 + 2 * dyn.q * X) * neg_gamma
            else:
                dFdX = neg_gamma.expand_as(X)
            gdx = _gain_dx(dyn.kind, X)
            if gdx is not None:
                dFdX = dFdX + D * gdx
            gX = gXn.addcmul_(gF, dFdX)
            if dyn.a is not None:
                if dyn.tanh_out:
                    gX.addcmul_(1 - torch.tanh(X) ** 2, gY, value=-1.0)
                else:
                    gX.sub_(gY)
                gY = torch.baddbmm(gY * dyn.a, gD, WrT)
            else:
                gY = torch.bmm(gD, WrT)
        # weight gradient: sum over steps of Y_s^T gD_s, as one product
        gWr = torch.einsum("skbi,skbj->kij", Ys, gDs)
        gC = gDs.view(T, dyn.substeps, K, B, M).sum(1).permute(1, 2, 0, 3)
        return gC, gWr, gX, gY, None
