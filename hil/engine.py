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
the CTRNN. With :attr:`Dynamics.layer_size` set, ``Wr`` is read as that layer band only
(layer ``l`` receives from layers ``l-1`` and ``l``): entries outside it are ignored and get
zero gradient, which is what the model's connection masks make them anyway.

* :func:`scan_reference` is a straightforward autograd loop over time, sub-steps and layers.
  It is the correctness reference and the benchmark's baseline.
* :class:`EulerScan` is the fast engine: one call runs the whole time loop forward, one call
  runs its adjoint (hand-written backward). It has two back ends, chosen per call:

  - **native** (CPU, float32/float64): a small C++ kernel, compiled on first use with the
    system C++ compiler (``-O3 -march=native``, a few seconds, cached under
    ``~/.cache/hil``; ``HIL_CACHE_DIR`` moves it, ``HIL_NATIVE=0`` or :func:`set_native`
    turns it off). Its work unit is a tile of 16 (float32) or 8 (float64) batch rows of one
    trial, integrated over the whole sequence with its state in L1 cache, every operation one
    SIMD vector across the rows. Tiles are independent, so trials and batch rows spread over
    ``torch.get_num_threads()`` threads with no synchronisation inside the time loop. The
    drive product skips the zero blocks (layer band). The adjoint walks back block by block
    (16 sub-steps): it recomputes a block's sub-steps from checkpoints (the per-point states
    the forward returns anyway, and the filtered output at each block start) instead of
    storing every sub-step, and folds the block into the weight gradient with a
    register-blocked product. Weight-gradient partials are per tile and summed in a fixed
    order, so results do not depend on the thread count or on which trials run together.
    Workers run with flush-to-zero (subnormal values become 0; the caller's mode is restored):
    undriven spintronic neurons decay towards x = 0 and would otherwise spend most of the
    time in microcode assists (:func:`set_flush_subnormals`, ``benchmarks/bench_subnormals.py``).
    In float32, tanh (the CTRNN's output) is computed on whole vectors (a few ulp from libm).
  - **torch** (GPU, other dtypes, or no compiler): the same recursion as a few batched tensor
    operations per step, with pre-allocated buffers and a hand-written backward whose weight
    gradient is one batched product over all steps.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from hil import config
from sims.neurons import (
    CLIPPED_TYPES,
    HELD_DRIVE_TYPES,
    PSI_COEF,
    TANH_OUTPUT_TYPES,
    Z_CAP,
    Z_SERIES,
    held_drive_step,
)

#: Integration schemes of a sub-step. ``euler``: explicit Euler of the whole network (first
#: order, stable only while drive x step < ~2). ``expheun``: exponential Heun (second order,
#: stable at any step): each neuron's own equation solved exactly at a drive held over the
#: sub-step, that drive the mean of the step's start and of a predicted end.
SCHEMES = ("euler", "expheun")
#: Neuron types with a closed-form step at held drive (logistic equation; linear ODE).
EXPHEUN_KINDS = HELD_DRIVE_TYPES
assert (SCHEMES, EXPHEUN_KINDS) == (config.SCHEMES, config.EXPHEUN_KINDS)


@dataclass(frozen=True)
class Dynamics:
    """Constants of the integration (tensors broadcast against ``(K, B, M)``)."""

    kind: str
    h: float  # Euler step (ns)
    substeps: int
    gamma: torch.Tensor  # (K, 1, M)
    q: torch.Tensor | None  # (K, 1, M) or None when Q = 0 everywhere
    a: torch.Tensor | None  # (K, 1, 1) filter decay per step, None: no filter
    layer_size: int | None = None  # N: Wr is the layer band (see module docstring); None: dense
    scheme: str = "euler"  # one of SCHEMES: how a sub-step is integrated (see module docstring)
    # expheun's filter: Y' = a Y + a_half (o(X') - o(X)); None: 1 (Euler's filter has no factor)
    a_half: torch.Tensor | None = None
    # (K, 1, 1) thermal floor D_th of the spintronic neuron (expheun only); None: none
    floor: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown integration scheme {self.scheme!r}; allowed: {', '.join(SCHEMES)}")
        if self.scheme == "expheun" and self.kind not in EXPHEUN_KINDS:
            raise ValueError(f"scheme 'expheun' is defined for {', '.join(EXPHEUN_KINDS)} neurons, "
                             f"not {self.kind!r}; use 'euler'")
        if self.floor is not None and self.kind != "spintronic":
            raise ValueError("a thermal floor is for spintronic neurons (the power's thermal drift)")

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


def _out(dyn: Dynamics, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) if dyn.tanh_out else x


def exact_step(dyn: Dynamics, x: torch.Tensor, D: torch.Tensor, grads: bool = False
               ) -> tuple[torch.Tensor, ...]:
    """One sub-step of each neuron's own equation solved exactly at the held drive ``D``
    (:func:`sims.neurons.held_drive_step`, the chip's definition); with ``grads`` also
    ``dx'/dx`` and ``dx'/dD``. The native kernel's ``phi`` computes the same formulas."""
    return held_drive_step(dyn.kind, x, D, dyn.gamma, dyn.h, dyn.q, torch, grads, dyn.floor)


def band_mask(M: int, layer_size: int | None, device: torch.device | None = None) -> torch.Tensor:
    """``(M_send, M_recv)`` bool: where ``Wr`` may be non-zero (all of it when ``layer_size``
    is None)."""
    if layer_size is None:
        return torch.ones(M, M, dtype=torch.bool, device=device)
    layer = torch.arange(M, device=device) // layer_size
    d = layer.view(1, M) - layer.view(M, 1)  # receiving layer minus sending layer
    return (d == 0) | (d == 1)


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

    def drives(t: int, yy: list[torch.Tensor]) -> list[torch.Tensor]:
        res = []
        for li, sl in enumerate(layer_slices):
            drive = C[:, :, t, sl]
            for m in range(L):
                w = Wr_blocks[li][m]
                if w is not None:
                    drive = drive + torch.bmm(yy[m], w)
            res.append(drive)
        return res

    def sub(dd: Dynamics, sl: slice) -> Dynamics:
        return Dynamics(dd.kind, dd.h, dd.substeps, dd.gamma[..., sl],
                        None if dd.q is None else dd.q[..., sl], dd.a, None, dd.scheme, dd.a_half,
                        dd.floor)

    def filt(y: torch.Tensor, xn: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if dyn.a is None:
            return _out(dyn, xn)
        inc = _out(dyn, xn) - _out(dyn, x)
        return dyn.a * y + (inc if dyn.a_half is None else dyn.a_half * inc)

    if dyn.scheme == "expheun":
        subs = [sub(dyn, sl) for sl in layer_slices]
        for t in range(T):
            for _ in range(dyn.substeps):
                d0 = drives(t, ys)
                xp = [exact_step(subs[li], xs[li], d0[li])[0] for li in range(L)]
                yp = [filt(ys[li], xp[li], xs[li]) for li in range(L)]
                d1 = drives(t, yp)
                xn = [exact_step(subs[li], xs[li], 0.5 * (d0[li] + d1[li]))[0] for li in range(L)]
                ys = [filt(ys[li], xn[li], xs[li]) for li in range(L)]
                xs = xn
            out.append(torch.cat(xs, dim=-1))
        return torch.stack(out, dim=2), torch.cat(xs, -1), torch.cat(ys, -1)

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
                if dyn.floor is not None:
                    f = f + dyn.floor
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


# ---------------------------------------------------------------------------- native back end
_NATIVE_SOURCE = r"""
// Native Euler scan of hil's multilayer dynamical network (forward and adjoint).
// Work unit: a tile of R batch rows of one trial, integrated over the whole sequence with its
// state in L1; tiles are independent, so threads never synchronise inside the time loop.
// Tile buffers are neuron-major [M][R]: each operation is one SIMD vector over the R rows
// (GCC/Clang vector extensions, 64 bytes: 16 float or 8 double lanes).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace {

enum { SPIN = 0, CTRNN = 1, LINEAR = 2, LIQUID = 3, QUAD = 4 };

template <class T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(64))); };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(64))); };
template <class T> using V = typename Vec<T>::type;
template <class T> constexpr int RW = 64 / sizeof(T);  // rows per tile

template <class T> struct Job {
  int64_t K, B, NT, M, S, nb, tpk, kind, has_q, has_filter, nthreads, ftz;
  int64_t gslots, ncp;  // input points per adjoint block, Y checkpoints per tile
  int64_t scheme;       // 0: explicit Euler, 1: exponential Heun (see the Python docstring)
  T h;
  const T *C, *W, *WT, *X0, *Y0, *gamma, *q, *a, *ah;  // ah: expheun's filter increment factor
  const T* th;  // expheun: thermal floor per trial (null: none)
  T *Xseq, *Xf, *Yf, *Ycp;  // Ycp: Y at adjoint block starts, tile layout (K, tpk, ncp, M, R)
  const T *gXseq, *gXf, *gYf;
  T *gC, *gWp, *gW, *gX0, *gY0;
};

// 64-byte aligned scratch memory of one worker thread
template <class T> struct Scratch {
  T* p = nullptr;
  size_t n = 0;
  T* get(size_t want) {
    if (want > n) {
      std::free(p);
      n = (want + 63) & ~size_t(63);
      p = static_cast<T*>(std::aligned_alloc(64, n * sizeof(T)));
      if (!p) throw std::bad_alloc();
    }
    return p;
  }
  ~Scratch() { std::free(p); }
};

// In-register transpose of R vectors of R lanes (AVX-512), else through memory.
#define HIL_INLINE inline __attribute__((always_inline))
template <class T> HIL_INLINE void transpose(V<T>* r) {
  constexpr int R = RW<T>;
  T tmp[R][R];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < R; ++j) tmp[j][i] = r[i][j];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < R; ++j) r[i][j] = tmp[i][j];
}
#if defined(__AVX512F__)
template <> HIL_INLINE void transpose<float>(V<float>* rv) {
  __m512* r = reinterpret_cast<__m512*>(rv);
  __m512 t[16], u[16], v[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    u[4 * k + 0] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    u[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    u[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    u[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {
    v[m] = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x88);
    v[4 + m] = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xDD);
    v[8 + m] = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x88);
    v[12 + m] = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xDD);
  }
  for (int m = 0; m < 4; ++m) {
    r[m] = _mm512_shuffle_f32x4(v[m], v[8 + m], 0x88);
    r[8 + m] = _mm512_shuffle_f32x4(v[m], v[8 + m], 0xDD);
    r[4 + m] = _mm512_shuffle_f32x4(v[4 + m], v[12 + m], 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(v[4 + m], v[12 + m], 0xDD);
  }
}
template <> HIL_INLINE void transpose<double>(V<double>* rv) {
  __m512d* r = reinterpret_cast<__m512d*>(rv);
  __m512d t[8], v[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm512_unpacklo_pd(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_pd(r[2 * k], r[2 * k + 1]);
  }
  for (int m = 0; m < 2; ++m) {
    v[m] = _mm512_shuffle_f64x2(t[m], t[2 + m], 0x88);
    v[2 + m] = _mm512_shuffle_f64x2(t[m], t[2 + m], 0xDD);
    v[4 + m] = _mm512_shuffle_f64x2(t[4 + m], t[6 + m], 0x88);
    v[6 + m] = _mm512_shuffle_f64x2(t[4 + m], t[6 + m], 0xDD);
  }
  for (int m = 0; m < 2; ++m) {
    r[m] = _mm512_shuffle_f64x2(v[m], v[4 + m], 0x88);
    r[4 + m] = _mm512_shuffle_f64x2(v[m], v[4 + m], 0xDD);
    r[2 + m] = _mm512_shuffle_f64x2(v[2 + m], v[6 + m], 0x88);
    r[6 + m] = _mm512_shuffle_f64x2(v[2 + m], v[6 + m], 0xDD);
  }
}
#endif

enum Pad { REPEAT, ZERO };
// tile [M][R] from rows [0, nr) of a row-major slice (row stride rs); the missing rows repeat
// the last one (states: padding rows stay finite) or are zero (gradients); ADD accumulates
template <class T, Pad PAD, bool ADD>
void load_tile(T* dst, const T* src, int64_t rs, int nr, int64_t M) {
  constexpr int R = RW<T>;
  V<T>* d = reinterpret_cast<V<T>*>(dst);
  int64_t i0 = 0;
  for (; i0 + R <= M; i0 += R) {
    V<T> r[R];
    for (int k = 0; k < R; ++k) {
      if (PAD == ZERO && k >= nr) {
        r[k] = V<T>{};
      } else {
        std::memcpy(&r[k], src + (int64_t)std::min(k, nr - 1) * rs + i0, sizeof(V<T>));
      }
    }
    transpose<T>(r);
    for (int k = 0; k < R; ++k) {
      if (ADD) d[i0 + k] += r[k];
      else d[i0 + k] = r[k];
    }
  }
  for (int64_t i = i0; i < M; ++i)
    for (int k = 0; k < R; ++k) {
      const T x = (PAD == ZERO && k >= nr) ? T(0) : src[(int64_t)std::min(k, nr - 1) * rs + i];
      if (ADD) dst[i * R + k] += x;
      else dst[i * R + k] = x;
    }
}
template <class T> void store_tile(T* dst, const T* src, int64_t rs, int nr, int64_t M) {
  constexpr int R = RW<T>;
  const V<T>* s = reinterpret_cast<const V<T>*>(src);
  int64_t i0 = 0;
  for (; i0 + R <= M; i0 += R) {
    V<T> r[R];
    for (int k = 0; k < R; ++k) r[k] = s[i0 + k];
    transpose<T>(r);
    for (int k = 0; k < nr; ++k) std::memcpy(dst + k * rs + i0, &r[k], sizeof(V<T>));
  }
  for (int64_t i = i0; i < M; ++i)
    for (int k = 0; k < nr; ++k) dst[k * rs + i] = src[i * R + k];
}

// out[d0+o] = bs * base[d0+o] + sum_{s in [s0,s1)} A[s*M + d0+o] * src[s]  (vectors over rows)
template <class T, int NO>
inline void mv_chunk(const T* __restrict A, int64_t M, const V<T>* __restrict src, int64_t s0,
                     int64_t s1, const V<T>* base, T bs, V<T>* out, int64_t d0) {
  V<T> acc[NO];
  _Pragma("GCC unroll 16") for (int o = 0; o < NO; ++o) acc[o] = base ? bs * base[d0 + o] : V<T>{};
  for (int64_t s = s0; s < s1; ++s) {
    const V<T> v = src[s];
    const T* __restrict w = A + s * M + d0;
    _Pragma("GCC unroll 16") for (int o = 0; o < NO; ++o) acc[o] += w[o] * v;
  }
  _Pragma("GCC unroll 16") for (int o = 0; o < NO; ++o) out[d0 + o] = acc[o];
}

constexpr int NOB = 8;  // outputs per register block

// drive product restricted to the layer band: receivers of layer l read layers l-1 and l
// (fwd, A = Wr[send][recv]); the transpose (A = Wr^T[recv][send]) for the adjoint
template <class T>
void band_mv(const T* A, int64_t M, int64_t nb, bool fwd, const V<T>* src, const V<T>* base,
             T bs, V<T>* out) {
  for (int64_t l = 0; l * nb < M; ++l) {
    const int64_t d_hi = std::min(M, (l + 1) * nb);
    const int64_t s0 = fwd ? std::max<int64_t>(0, (l - 1) * nb) : l * nb;
    const int64_t s1 = std::min(M, fwd ? (l + 1) * nb : (l + 2) * nb);
    int64_t d = l * nb;
    for (; d + NOB <= d_hi; d += NOB) mv_chunk<T, NOB>(A, M, src, s0, s1, base, bs, out, d);
    switch (d_hi - d) {
      case 1: mv_chunk<T, 1>(A, M, src, s0, s1, base, bs, out, d); break;
      case 2: mv_chunk<T, 2>(A, M, src, s0, s1, base, bs, out, d); break;
      case 3: mv_chunk<T, 3>(A, M, src, s0, s1, base, bs, out, d); break;
      case 4: mv_chunk<T, 4>(A, M, src, s0, s1, base, bs, out, d); break;
      case 5: mv_chunk<T, 5>(A, M, src, s0, s1, base, bs, out, d); break;
      case 6: mv_chunk<T, 6>(A, M, src, s0, s1, base, bs, out, d); break;
      case 7: mv_chunk<T, 7>(A, M, src, s0, s1, base, bs, out, d); break;
      default: break;
    }
  }
}

// Weight gradient of the stashed steps: gW[j][i] += sum_k Y_k[j] gD_k[i], k = (step c, row r).
// Y is stashed in tile layout [c][M][R], gD transposed to rows [c*R + r][M], so that a register
// block of NJ senders x NV vectors of receivers accumulates straight into gW's rows.
template <class T, int NJ, int NV>
void gw_micro(const T* __restrict Yb, const T* __restrict Gt, int64_t M, int64_t Lc, int64_t j0,
              int64_t i0, T* __restrict gW) {
  constexpr int R = RW<T>;
  V<T> acc[NJ][NV];
  _Pragma("GCC unroll 16") for (int a = 0; a < NJ; ++a)
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v)
      std::memcpy(&acc[a][v], gW + (j0 + a) * M + i0 + v * R, sizeof(V<T>));
  for (int64_t c = 0; c < Lc; ++c) {
    const T* yc = Yb + (c * M + j0) * R;
    for (int r = 0; r < R; ++r) {
      const T* g = Gt + (c * R + r) * M + i0;
      V<T> gv[NV];
      _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) std::memcpy(&gv[v], g + v * R, sizeof(V<T>));
      _Pragma("GCC unroll 16") for (int a = 0; a < NJ; ++a) {
        const T y = yc[a * R + r];
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v) acc[a][v] += y * gv[v];
      }
    }
  }
  _Pragma("GCC unroll 16") for (int a = 0; a < NJ; ++a)
    _Pragma("GCC unroll 4") for (int v = 0; v < NV; ++v)
      std::memcpy(gW + (j0 + a) * M + i0 + v * R, &acc[a][v], sizeof(V<T>));
}

constexpr int NJB = 12;  // senders per register block

template <class T, int NV>
void gw_cols(const T* Yb, const T* Gt, int64_t M, int64_t Lc, int64_t s0, int64_t s1, int64_t i0,
             T* gW) {
  int64_t j = s0;
  for (; j + NJB <= s1; j += NJB) gw_micro<T, NJB, NV>(Yb, Gt, M, Lc, j, i0, gW);
  switch (s1 - j) {
    case 1: gw_micro<T, 1, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 2: gw_micro<T, 2, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 3: gw_micro<T, 3, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 4: gw_micro<T, 4, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 5: gw_micro<T, 5, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 6: gw_micro<T, 6, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 7: gw_micro<T, 7, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 8: gw_micro<T, 8, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 9: gw_micro<T, 9, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 10: gw_micro<T, 10, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    case 11: gw_micro<T, 11, NV>(Yb, Gt, M, Lc, j, i0, gW); break;
    default: break;
  }
}

// the whole layer band of gW from Lc stashed steps
template <class T>
void gw_flush(const T* Yb, const T* Gt, int64_t Lc, T* gW, int64_t M, int64_t nb) {
  constexpr int R = RW<T>;
  for (int64_t l = 0; l * nb < M; ++l) {
    const int64_t i1 = std::min(M, (l + 1) * nb);
    const int64_t s0 = std::max<int64_t>(0, (l - 1) * nb), s1 = std::min(M, (l + 1) * nb);
    int64_t i = l * nb;
    for (; i + 2 * R <= i1; i += 2 * R) gw_cols<T, 2>(Yb, Gt, M, Lc, s0, s1, i, gW);
    for (; i + R <= i1; i += R) gw_cols<T, 1>(Yb, Gt, M, Lc, s0, s1, i, gW);
    for (; i < i1; ++i)  // receivers left over from the vectors
      for (int64_t j = s0; j < s1; ++j) {
        T acc = 0;
        for (int64_t c = 0; c < Lc; ++c)
          for (int r = 0; r < R; ++r) acc += Yb[(c * M + j) * R + r] * Gt[(c * R + r) * M + i];
        gW[j * M + i] += acc;
      }
  }
}

// gD (tile [M][R]) -> rows [r][M] of the stash; padding rows are zero
template <class T> void stash_rows(T* dst, const T* src, int nr, int64_t M) {
  constexpr int R = RW<T>;
  const V<T>* s = reinterpret_cast<const V<T>*>(src);
  int64_t i0 = 0;
  for (; i0 + R <= M; i0 += R) {
    V<T> r[R];
    for (int k = 0; k < R; ++k) r[k] = s[i0 + k];
    transpose<T>(r);
    for (int k = 0; k < R; ++k) {
      if (k >= nr) r[k] = V<T>{};
      std::memcpy(dst + k * M + i0, &r[k], sizeof(V<T>));
    }
  }
  for (int64_t i = i0; i < M; ++i)
    for (int k = 0; k < R; ++k) dst[k * M + i] = k < nr ? src[i * R + k] : T(0);
}

// exp of a vector. double: libm per lane. float: all lanes at once, e^y = 2^n exp(r),
// n = round(y / ln 2), |r| <= ln2 / 2, exp(r) by its degree-7 Taylor polynomial (relative error
// < 1e-8); valid for |y| <= 87 (the callers cap their arguments).
template <class T> inline V<T> vexp(V<T> y) {
  for (int r = 0; r < RW<T>; ++r) y[r] = std::exp(y[r]);
  return y;
}
template <> inline V<float> vexp<float>(V<float> y) {
  typedef int32_t VI __attribute__((vector_size(64)));
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to integer
  const V<float> n = (y * 1.44269504088896341f + magic) - magic;
  const V<float> r = (y - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  V<float> p = 1.0f / 5040 + r * 0.0f;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V<float> scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
// tanh of a vector. double: libm per lane (the exact path the float64 tests compare with).
template <class T> inline V<T> vtanh(V<T> x) {
  for (int r = 0; r < RW<T>; ++r) x[r] = std::tanh(x[r]);
  return x;
}
// float: all 16 lanes at once (libm's scalar tanh made the CTRNN 4x slower to train than the
// spintronic network). |x| < 1/8: odd Taylor series to x^7 (relative error < 2e-9); else
// tanh|x| = (1 - e) / (1 + e), e = exp(-2|x|) (vexp); |x| is capped at 9, where tanh is 1 in
// float. Error against libm: a few ulp; NaN stays NaN.
template <> inline V<float> vtanh<float>(V<float> x) {
  const V<float> zero = {};
  const V<float> ax = x < zero ? -x : x;
  const V<float> e = vexp<float>(-2 * (ax > 9 ? zero + 9 : ax));
  const V<float> big = (1 - e) / (1 + e);
  const V<float> x2 = ax * ax;
  const V<float> small =
      ax * (1 + x2 * (-1.0f / 3 + x2 * (2.0f / 15 + x2 * (-17.0f / 315))));
  const V<float> t = ax < 0.125f ? small : big;
  return x < zero ? -t : t;
}

// ---- exponential Heun: each neuron's own equation solved exactly at a held drive D ----
// constants defined once in sims/neurons.py, prepended as macros when the kernel is built
constexpr double Z_CAP = HIL_Z_CAP, Z_SERIES = HIL_Z_SERIES;
// psi1(z) = (1 - e^-z) / z = sum a_n (-z)^n, a_n = 1 / (n+1)!, and its derivative (|z| < 0.5)
constexpr double PSI_A[10] = HIL_PSI_A;
template <class T> HIL_INLINE void psi1_series(V<T> z, V<T>& p, V<T>& dp) {
  const V<T> w = -z, zero = {};
  p = zero + T(PSI_A[9]);
  dp = zero + T(9 * PSI_A[9]);
  for (int n = 8; n >= 0; --n) {
    p = p * w + T(PSI_A[n]);
    if (n >= 1) dp = dp * w + T(n * PSI_A[n]);
  }
  dp = -dp;
}
// one sub-step at held drive D; with G, also dx'/dx (dx) and dx'/dD (dD).
// SPIN: dx/dt = r x - c x^2, r = D - g, c = D + g Q: x' = x / (F + c x psi), F = e^{-r h},
// psi = (1 - F) / r. CTRNN: x' = x E + D W, E = e^{-g h}, W = (1 - E) / g (per neuron: cE, cW).
// dy/dt = r y - c y^2 over h: y' = y / (F + c y psi), F = e^{-r h}, psi = (1 - F) / r; with G
// also dy'/dy, dy'/dr, dy'/dc (as sims.neurons._logistic)
template <bool G, class T>
HIL_INLINE V<T> logistic(V<T> y, V<T> r, V<T> c, T h, V<T>* dy, V<T>* dr, V<T>* dc) {
  const V<T> zero = {}, one = zero + 1, cap = zero + T(Z_CAP);
  const V<T> zr = r * h;
  V<T> z = zr > cap ? cap : zr;
  z = z < -cap ? -cap : z;
  const V<T> az = z < zero ? -z : z;
  const auto small = az < T(Z_SERIES);
  V<T> ps, dps;
  psi1_series<T>(small ? z : zero, ps, dps);
  const V<T> F = small ? 1 - z * ps : vexp<T>(-z);  // see _logistic: no cancellation
  const V<T> zb = small ? one : z;
  const V<T> psi1 = small ? ps : (1 - F) / zb;
  const V<T> psi = h * psi1;
  const V<T> den = F + c * y * psi;
  const V<T> yn = y / den;
  if constexpr (G) {
    const V<T> psir = (h * h) * (small ? dps : (F - psi1) / zb);
    const V<T> Fr = h * (small ? -(ps + z * dps) : -F);  // dF/dr of F as computed
    const V<T> azr = zr < zero ? -zr : zr;
    const V<T> inside = azr < T(Z_CAP) ? one : zero;
    const V<T> q = -yn / den;
    *dy = F / (den * den);
    *dr = q * inside * (c * y * psir + Fr);
    *dc = q * (y * psi);
  }
  return yn;
}
template <class T> HIL_INLINE V<T> vsqrt(V<T> x) {
  for (int r = 0; r < RW<T>; ++r) x[r] = std::sqrt(x[r]);
  return x;
}
#if defined(__AVX512F__)  // one instruction, the same correctly rounded result
#define HIL_VSQRT512(T, REG, SQRT)                              \
  template <> HIL_INLINE V<T> vsqrt<T>(V<T> x) {              \
    REG v;                                                      \
    std::memcpy(&v, &x, sizeof(v));                             \
    v = SQRT(v);                                                \
    std::memcpy(&x, &v, sizeof(v));                             \
    return x;                                                   \
  }
HIL_VSQRT512(float, __m512, _mm512_sqrt_ps)
HIL_VSQRT512(double, __m512d, _mm512_sqrt_pd)
#endif
// one sub-step at held drive D; with G, also dx'/dx (dx) and dx'/dD (dD).
// SPIN: dx/dt = th + r x - c x^2, r = D - g, c = D + g Q, th the thermal floor: the logistic
// step of y = x - b around a root b of the right-hand side (sims.neurons.held_drive_step).
// CTRNN: x' = x E + D W, E = e^{-g h}, W = (1 - E) / g (per neuron: cE, cW).
template <int KIND, bool G, class T>
HIL_INLINE V<T> phi(V<T> x, V<T> D, T g, T gq, T h, T cE, T cW, T th, V<T>* dx = nullptr,
                    V<T>* dD = nullptr) {
  if constexpr (KIND == CTRNN) {
    if constexpr (G) {
      *dx = V<T>{} + cE;
      *dD = V<T>{} + cW;
    }
    return x * cE + D * cW;
  } else {
    const V<T> zero = {}, one = zero + 1;
    const V<T> r = D - g, c = D + gq;
    V<T> dy, dr, dc;
    if (th == T(0)) {
      const V<T> xn = logistic<G, T>(x, r, c, h, &dy, &dr, &dc);
      if constexpr (G) {
        *dx = dy;
        *dD = dr + dc;
      }
      return xn;
    }
    const V<T> s = vsqrt<T>(r * r + 4 * th * c);
    const V<T> sg = r >= zero ? one : -one;
    const V<T> ars = r * sg + s;
    const V<T> b = -2 * th * sg / ars;
    const V<T> xn = logistic<G, T>(x - b, sg * s, c, h, &dy, &dr, &dc) + b;
    if constexpr (G) {
      const V<T> ds = (r + 2 * th) / s;
      const V<T> db = 2 * th * sg * (sg + ds) / (ars * ars);
      *dx = dy;
      *dD = db * (1 - dy) + dr * sg * ds + dc;
    }
    return xn;
  }
}
// o'(x): the output's derivative (tanh for the CTRNN, else 1)
template <int KIND, class T> HIL_INLINE V<T> out_dx(V<T> x) {
  if constexpr (KIND == CTRNN) {
    const V<T> th = vtanh<T>(x);
    return 1 - th * th;
  } else {
    return V<T>{} + 1;
  }
}
template <int KIND, class T> HIL_INLINE V<T> out_of(V<T> x) {
  if constexpr (KIND == CTRNN) return vtanh<T>(x);
  else return x;
}

// predictor: Xp = Phi(X, D0), Yp = filter(Y, Xp, X)
template <int KIND, bool FILT, class T>
void eh_pred(const V<T>* X, const V<T>* Y, const V<T>* D0, V<T>* Xp, V<T>* Yp, const T* gam,
             const T* q, const T* cE, const T* cW, T a, T ah, T h, T th, int64_t M) {
  for (int64_t i = 0; i < M; ++i) {
    const T g = gam[i], gq = q ? g * q[i] : T(0);
    const V<T> x = X[i];
    const V<T> xp = phi<KIND, false, T>(x, D0[i], g, gq, h, cE ? cE[i] : T(0), cW ? cW[i] : T(0), th);
    if constexpr (FILT) Yp[i] = a * Y[i] + ah * (out_of<KIND, T>(xp) - out_of<KIND, T>(x));
    else Yp[i] = out_of<KIND, T>(xp);
    Xp[i] = xp;
  }
}
// corrector: Dm = (D0 + D1) / 2 (written over D1), Xo = Phi(X, Dm), Yo = filter(Y, Xo, X);
// the outputs may alias X and Y
template <int KIND, bool FILT, class T>
void eh_corr(const V<T>* X, const V<T>* Y, const V<T>* D0, V<T>* Dm, V<T>* Xo, V<T>* Yo,
             const T* gam, const T* q, const T* cE, const T* cW, T a, T ah, T h, T th, int64_t M) {
  for (int64_t i = 0; i < M; ++i) {
    const T g = gam[i], gq = q ? g * q[i] : T(0);
    const V<T> x = X[i], dm = T(0.5) * (D0[i] + Dm[i]);
    Dm[i] = dm;
    const V<T> xn = phi<KIND, false, T>(x, dm, g, gq, h, cE ? cE[i] : T(0), cW ? cW[i] : T(0), th);
    if constexpr (FILT) Yo[i] = a * Y[i] + ah * (out_of<KIND, T>(xn) - out_of<KIND, T>(x));
    else Yo[i] = out_of<KIND, T>(xn);
    Xo[i] = xn;
  }
}
// adjoint, first half: gX holds dL/dX_{s+1} (direct part), gY = dL/dY_{s+1}. Writes
// gD1 = dL/dD1 and leaves in gX the part of dL/dX_s found so far.
template <int KIND, bool FILT, class T>
void eh_bwd1(const V<T>* X, const V<T>* Xn, const V<T>* Dm, V<T>* gX, const V<T>* gY, V<T>* gD1,
             const T* gam, const T* q, const T* cE, const T* cW, T ah, T h, T th, int64_t M) {
  for (int64_t i = 0; i < M; ++i) {
    const T g = gam[i], gq = q ? g * q[i] : T(0);
    const V<T> x = X[i], gy = FILT ? ah * gY[i] : gY[i];
    const V<T> gxn = gX[i] + (KIND == CTRNN ? out_dx<KIND, T>(Xn[i]) * gy : gy);
    V<T> gxs = {};
    if constexpr (FILT) gxs = -(KIND == CTRNN ? out_dx<KIND, T>(x) * gy : gy);
    V<T> dx, dD;
    phi<KIND, true, T>(x, Dm[i], g, gq, h, cE ? cE[i] : T(0), cW ? cW[i] : T(0), th, &dx, &dD);
    gX[i] = gxs + dx * gxn;
    gD1[i] = T(0.5) * (dD * gxn);
  }
}
// adjoint, second half, after gYp = dL/dYp = D1's transposed product: writes gD0 = dL/dD0,
// completes gX = dL/dX_s except through D0, and base = gY + gYp (the filter's carry, times a)
template <int KIND, bool FILT, class T>
void eh_bwd2(const V<T>* X, const V<T>* Xp, const V<T>* D0, V<T>* gX, const V<T>* gY,
             const V<T>* gYp, const V<T>* gD1, V<T>* gD0, V<T>* base, const T* gam, const T* q,
             const T* cE, const T* cW, T ah, T h, T th, int64_t M) {
  for (int64_t i = 0; i < M; ++i) {
    const T g = gam[i], gq = q ? g * q[i] : T(0);
    const V<T> x = X[i], gyp = FILT ? ah * gYp[i] : gYp[i];
    const V<T> gxp = KIND == CTRNN ? out_dx<KIND, T>(Xp[i]) * gyp : gyp;
    V<T> gxs = gX[i];
    if constexpr (FILT) {
      gxs -= KIND == CTRNN ? out_dx<KIND, T>(x) * gyp : gyp;
      base[i] = gY[i] + gYp[i];
    }
    V<T> dx, dD;
    phi<KIND, true, T>(x, D0[i], g, gq, h, cE ? cE[i] : T(0), cW ? cW[i] : T(0), th, &dx, &dD);
    gX[i] = gxs + dx * gxp;
    gD0[i] = gD1[i] + dD * gxp;
  }
}

template <int KIND, class T> inline V<T> gain(V<T> x) {
  if constexpr (KIND == SPIN) return x * (1 - x);
  else if constexpr (KIND == CTRNN || KIND == LINEAR) return x * 0 + 1;
  else if constexpr (KIND == LIQUID) return x;
  else return x * x;
}

// one Euler step given the drive D: (X, Y) -> (Xo, Yo); the outputs may alias the inputs
template <int KIND, bool FILT, class T>
void elem_fwd(const V<T>* X, const V<T>* Y, const V<T>* __restrict D, V<T>* Xo, V<T>* Yo,
              const T* gam, const T* q, T a, T h, T th, int64_t M) {
  constexpr bool CLIP = KIND == LINEAR || KIND == LIQUID || KIND == QUAD;
  const V<T> zero = {}, one = zero + 1;
  for (int64_t i = 0; i < M; ++i) {
    const T g = gam[i];
    const V<T> x = X[i];
    V<T> damp;
    if (KIND == SPIN && q) damp = g * x * (1 + q[i] * x);
    else damp = g * x;
    V<T> f;
    if constexpr (KIND == CTRNN || KIND == LINEAR) f = -damp + D[i];
    else f = -damp + D[i] * gain<KIND, T>(x);
    if (KIND == SPIN && th != T(0)) f += th;  // the thermal floor (its derivative is 0)
    V<T> xn = x + h * f;
    if constexpr (CLIP) {
      xn = xn < zero ? zero : xn;
      xn = xn > one ? one : xn;
    }
    if constexpr (KIND == CTRNN) {
      if constexpr (FILT) Yo[i] = a * Y[i] + vtanh<T>(xn) - vtanh<T>(x);
      else Yo[i] = vtanh<T>(xn);
    } else {
      if constexpr (FILT) Yo[i] = a * Y[i] + xn - x;
      else Yo[i] = xn;
    }
    Xo[i] = xn;
  }
}

// adjoint of one Euler step: gX holds dL/dX_{s+1} (direct part) and becomes dL/dX_s;
// gY = dL/dY_{s+1}; gD = dL/dD_s is written
template <int KIND, bool FILT, class T>
void elem_bwd(const V<T>* __restrict X, const V<T>* __restrict Xn, const V<T>* __restrict D,
              V<T>* __restrict gX, const V<T>* __restrict gY, V<T>* __restrict gD, const T* gam,
              const T* q, T h, int64_t M) {
  constexpr bool CLIP = KIND == LINEAR || KIND == LIQUID || KIND == QUAD;
  const V<T> zero = {}, one = zero + 1;
  for (int64_t i = 0; i < M; ++i) {
    const T g = gam[i];
    const V<T> x = X[i], xn = Xn[i], gy = gY[i];
    V<T> gxn;
    if constexpr (KIND == CTRNN) {
      const V<T> th = vtanh<T>(xn);
      gxn = gX[i] + (1 - th * th) * gy;
    } else {
      gxn = gX[i] + gy;
    }
    if constexpr (CLIP) gxn = gxn * ((xn > zero) & (xn < one) ? one : zero);
    const V<T> gf = gxn * h;
    if constexpr (KIND == CTRNN || KIND == LINEAR) gD[i] = gf;
    else gD[i] = gf * gain<KIND, T>(x);
    V<T> dfdx;
    if (KIND == SPIN && q) dfdx = (1 + 2 * q[i] * x) * (-g);
    else dfdx = zero - g;
    if constexpr (KIND == SPIN) dfdx = dfdx + D[i] * (1 - 2 * x);
    else if constexpr (KIND == LIQUID) dfdx = dfdx + D[i];
    else if constexpr (KIND == QUAD) dfdx = dfdx + D[i] * (2 * x);
    V<T> gxs = gxn + gf * dfdx;
    if constexpr (FILT) {
      if constexpr (KIND == CTRNN) {
        const V<T> th = vtanh<T>(x);
        gxs -= (1 - th * th) * gy;
      } else {
        gxs -= gy;
      }
    }
    gX[i] = gxs;
  }
}

template <class T> struct Ctx {
  const Job<T>* j;
  int64_t k, b0, nr;
  const T *W, *WT, *gam, *q;
  const T *cE = nullptr, *cW = nullptr;  // CTRNN exponential Heun: e^{-g h}, (1 - e^{-g h}) / g
  std::vector<T> ew;
  T a, ah, th;
  void set(const Job<T>& jb, int64_t tile) {
    j = &jb;
    k = tile / jb.tpk;
    b0 = (tile % jb.tpk) * RW<T>;
    nr = std::min<int64_t>(RW<T>, jb.B - b0);
    W = jb.W + k * jb.M * jb.M;
    WT = jb.WT ? jb.WT + k * jb.M * jb.M : nullptr;
    gam = jb.gamma + k * jb.M;
    q = jb.has_q ? jb.q + k * jb.M : nullptr;
    a = jb.has_filter ? jb.a[k] : T(0);
    ah = jb.has_filter && jb.ah ? jb.ah[k] : T(1);
    th = jb.th ? jb.th[k] : T(0);
    if (jb.scheme == 1 && jb.kind == CTRNN) {
      ew.resize(2 * jb.M);
      for (int64_t i = 0; i < jb.M; ++i) {
        ew[i] = std::exp(-gam[i] * jb.h);
        ew[jb.M + i] = (1 - ew[i]) / gam[i];
      }
      cE = ew.data();
      cW = ew.data() + jb.M;
    }
  }
  int64_t row(int64_t t) const { return ((k * j->B + b0) * j->NT + t) * j->M; }  // (K,B,T,M)
  int64_t srow() const { return (k * j->B + b0) * j->M; }                         // (K,B,M)
};

template <class T> void step_fwd(const Ctx<T>& c, const V<T>* X, const V<T>* Y, const V<T>* Ct,
                                 V<T>* D, V<T>* Xo, V<T>* Yo) {
  const Job<T>& jb = *c.j;
  band_mv<T>(c.W, jb.M, jb.nb, true, Y, Ct, T(1), D);
  const int64_t M = jb.M;
#define HIL_FWD(KD)                                                                     \
  if (jb.has_filter) elem_fwd<KD, true, T>(X, Y, D, Xo, Yo, c.gam, c.q, c.a, jb.h, c.th, M); \
  else elem_fwd<KD, false, T>(X, Y, D, Xo, Yo, c.gam, c.q, c.a, jb.h, c.th, M);
  switch (jb.kind) {
    case SPIN: HIL_FWD(SPIN) break;
    case CTRNN: HIL_FWD(CTRNN) break;
    case LINEAR: HIL_FWD(LINEAR) break;
    case LIQUID: HIL_FWD(LIQUID) break;
    default: HIL_FWD(QUAD) break;
  }
#undef HIL_FWD
}

template <class T> void step_bwd(const Ctx<T>& c, const V<T>* X, const V<T>* Xn, const V<T>* D,
                                 V<T>* gX, const V<T>* gY, V<T>* gD) {
  const Job<T>& jb = *c.j;
  const int64_t M = jb.M;
#define HIL_BWD(KD)                                                                   \
  if (jb.has_filter) elem_bwd<KD, true, T>(X, Xn, D, gX, gY, gD, c.gam, c.q, jb.h, M); \
  else elem_bwd<KD, false, T>(X, Xn, D, gX, gY, gD, c.gam, c.q, jb.h, M);
  switch (jb.kind) {
    case SPIN: HIL_BWD(SPIN) break;
    case CTRNN: HIL_BWD(CTRNN) break;
    case LINEAR: HIL_BWD(LINEAR) break;
    case LIQUID: HIL_BWD(LIQUID) break;
    default: HIL_BWD(QUAD) break;
  }
#undef HIL_BWD
}

// one exponential-Heun sub-step: (X, Y) -> (Xo, Yo), which may alias X, Y. Leaves the drive
// D0, the mean drive Dm and the predicted Xp, Yp in their buffers (the adjoint's recomputation).
template <class T> void step_fwd_eh(const Ctx<T>& c, const V<T>* X, const V<T>* Y, const V<T>* Ct,
                                    V<T>* D0, V<T>* Dm, V<T>* Xp, V<T>* Yp, V<T>* Xo, V<T>* Yo) {
  const Job<T>& jb = *c.j;
  const int64_t M = jb.M;
  band_mv<T>(c.W, M, jb.nb, true, Y, Ct, T(1), D0);
#define HIL_EH(KD, F)                                                                        \
  eh_pred<KD, F, T>(X, Y, D0, Xp, Yp, c.gam, c.q, c.cE, c.cW, c.a, c.ah, jb.h, c.th, M);              \
  band_mv<T>(c.W, M, jb.nb, true, Yp, Ct, T(1), Dm);                                         \
  eh_corr<KD, F, T>(X, Y, D0, Dm, Xo, Yo, c.gam, c.q, c.cE, c.cW, c.a, c.ah, jb.h, c.th, M);
  if (jb.kind == CTRNN) {
    if (jb.has_filter) { HIL_EH(CTRNN, true) } else { HIL_EH(CTRNN, false) }
  } else {
    if (jb.has_filter) { HIL_EH(SPIN, true) } else { HIL_EH(SPIN, false) }
  }
#undef HIL_EH
}

// adjoint of one exponential-Heun sub-step: gX = dL/dX_{s+1} (direct part) becomes dL/dX_s,
// gY = dL/dY_{s+1}; writes gD0, gD1 and gYo = dL/dY_s. gYp and base are scratch.
template <class T> void step_bwd_eh(const Ctx<T>& c, const V<T>* X, const V<T>* Xn, const V<T>* D0,
                                    const V<T>* Dm, const V<T>* Xp, V<T>* gX, const V<T>* gY,
                                    V<T>* gD0, V<T>* gD1, V<T>* gYp, V<T>* base, V<T>* gYo) {
  const Job<T>& jb = *c.j;
  const int64_t M = jb.M;
#define HIL_EHB(KD, F)                                                                          \
  eh_bwd1<KD, F, T>(X, Xn, Dm, gX, gY, gD1, c.gam, c.q, c.cE, c.cW, c.ah, jb.h, c.th, M);                \
  band_mv<T>(c.WT, M, jb.nb, false, gD1, nullptr, T(0), gYp);                                   \
  eh_bwd2<KD, F, T>(X, Xp, D0, gX, gY, gYp, gD1, gD0, base, c.gam, c.q, c.cE, c.cW, c.ah, jb.h, c.th, M);\
  band_mv<T>(c.WT, M, jb.nb, false, gD0, F ? base : nullptr, c.a, gYo);
  if (jb.kind == CTRNN) {
    if (jb.has_filter) { HIL_EHB(CTRNN, true) } else { HIL_EHB(CTRNN, false) }
  } else {
    if (jb.has_filter) { HIL_EHB(SPIN, true) } else { HIL_EHB(SPIN, false) }
  }
#undef HIL_EHB
}

template <class T> void fwd_tile(const Job<T>& jb, int64_t tile, Scratch<T>& sc) {
  constexpr int R = RW<T>;
  const int64_t M = jb.M, TM = jb.NT * M, MR = M * R;
  T* p = sc.get(7 * MR);
  T *X = p, *Y = p + MR, *D = p + 2 * MR, *Ct = p + 3 * MR;
  T *Dm = p + 4 * MR, *Xp = p + 5 * MR, *Yp = p + 6 * MR;  // exponential Heun only
  auto v = [](T* x) { return reinterpret_cast<V<T>*>(x); };
  Ctx<T> c;
  c.set(jb, tile);
  load_tile<T, REPEAT, false>(X, jb.X0 + c.srow(), M, c.nr, M);
  load_tile<T, REPEAT, false>(Y, jb.Y0 + c.srow(), M, c.nr, M);
  for (int64_t t = 0; t < jb.NT; ++t) {
    load_tile<T, REPEAT, false>(Ct, jb.C + c.row(t), TM, c.nr, M);
    if (jb.scheme == 1)
      for (int64_t s = 0; s < jb.S; ++s)
        step_fwd_eh<T>(c, v(X), v(Y), v(Ct), v(D), v(Dm), v(Xp), v(Yp), v(X), v(Y));
    else
      for (int64_t s = 0; s < jb.S; ++s) step_fwd<T>(c, v(X), v(Y), v(Ct), v(D), v(X), v(Y));
    store_tile(jb.Xseq + c.row(t), X, TM, c.nr, M);
    // checkpoint of Y where an adjoint block starts (X's is Xseq itself)
    if (jb.Ycp && (t + 1) % jb.gslots == 0 && t + 1 < jb.NT)
      std::memcpy(jb.Ycp + (tile * jb.ncp + (t + 1) / jb.gslots - 1) * MR, Y, MR * sizeof(T));
  }
  store_tile(jb.Xf + c.srow(), X, M, c.nr, M);
  store_tile(jb.Yf + c.srow(), Y, M, c.nr, M);
}

// Adjoint of one tile, block by block backwards in time. A block is G input points (G*S
// sub-steps, the weight-gradient stash): its sub-steps are recomputed from the checkpoint at
// its start (X from Xseq, Y from Ycp), then walked backwards, then folded into gW.
template <class T> void bwd_tile(const Job<T>& jb, int64_t tile, Scratch<T>& sc) {
  constexpr int R = RW<T>;  // rows per tile
  const int64_t M = jb.M, S = jb.S, TM = jb.NT * M, MR = M * R;
  const int64_t G = jb.gslots, GS = G * S;
  // scratch: gX gY gYn gCt gD | C of the block's points (G) | X_0..X_GS | D_0..D_{GS-1} |
  // Y stash [GS][M][R] | gD stash [GS*R][M]
  T* p = sc.get((5 + G + 1) * MR + 4 * GS * MR);
  auto v = [](T* x) { return reinterpret_cast<V<T>*>(x); };
  auto cv = [](const T* x) { return reinterpret_cast<const V<T>*>(x); };
  V<T> *gX = v(p), *gY = v(p + MR), *gYn = v(p + 2 * MR), *gCt = v(p + 3 * MR), *gD = v(p + 4 * MR);
  T* Cb = p + 5 * MR;
  T* Xst = Cb + G * MR;
  T* Dst = Xst + (GS + 1) * MR;
  T* Yb = Dst + GS * MR;
  T* Gb = Yb + GS * MR;
  Ctx<T> c;
  c.set(jb, tile);
  T* gWt = jb.gWp + tile * M * M;
  std::fill(gWt, gWt + M * M, T(0));
  std::fill(p, p + 2 * MR, T(0));
  if (jb.gXf) load_tile<T, ZERO, false>(reinterpret_cast<T*>(gX), jb.gXf + c.srow(), M, c.nr, M);
  if (jb.gYf) load_tile<T, ZERO, false>(reinterpret_cast<T*>(gY), jb.gYf + c.srow(), M, c.nr, M);
  for (int64_t t0 = ((jb.NT - 1) / G) * G; t0 >= 0; t0 -= G) {
    const int64_t np = std::min(G, jb.NT - t0), ns = np * S;
    if (t0) {
      load_tile<T, REPEAT, false>(Xst, jb.Xseq + c.row(t0 - 1), TM, c.nr, M);
      std::memcpy(Yb, jb.Ycp + (tile * jb.ncp + t0 / G - 1) * MR, MR * sizeof(T));
    } else {
      load_tile<T, REPEAT, false>(Xst, jb.X0 + c.srow(), M, c.nr, M);
      load_tile<T, REPEAT, false>(Yb, jb.Y0 + c.srow(), M, c.nr, M);
    }
    for (int64_t q = 0; q < np; ++q) {
      T* Ct = Cb + q * MR;
      load_tile<T, REPEAT, false>(Ct, jb.C + c.row(t0 + q), TM, c.nr, M);
      for (int64_t s = 0; s < S; ++s) {
        const int64_t k = q * S + s;
        T* ynext = k + 1 < ns ? Yb + (k + 1) * MR : reinterpret_cast<T*>(gYn);  // last: unused
        step_fwd<T>(c, cv(Xst + k * MR), cv(Yb + k * MR), cv(Ct), v(Dst + k * MR),
                    v(Xst + (k + 1) * MR), v(ynext));
      }
    }
    for (int64_t q = np - 1; q >= 0; --q) {
      if (jb.gXseq)
        load_tile<T, ZERO, true>(reinterpret_cast<T*>(gX), jb.gXseq + c.row(t0 + q), TM, c.nr, M);
      for (int64_t s = S - 1; s >= 0; --s) {
        const int64_t k = q * S + s;
        step_bwd<T>(c, cv(Xst + k * MR), v(Xst + (k + 1) * MR), v(Dst + k * MR), gX, gY, gD);
        stash_rows(Gb + k * MR, reinterpret_cast<const T*>(gD), c.nr, M);
        if (s == S - 1)
          for (int64_t i = 0; i < M; ++i) gCt[i] = gD[i];
        else
          for (int64_t i = 0; i < M; ++i) gCt[i] += gD[i];
        band_mv<T>(c.WT, M, jb.nb, false, gD, jb.has_filter ? gY : nullptr, c.a, gYn);
        std::swap(gY, gYn);
      }
      store_tile(jb.gC + c.row(t0 + q), reinterpret_cast<T*>(gCt), TM, c.nr, M);
    }
    gw_flush<T>(Yb, Gb, ns, gWt, M, jb.nb);
  }
  store_tile(jb.gX0 + c.srow(), reinterpret_cast<T*>(gX), M, c.nr, M);
  store_tile(jb.gY0 + c.srow(), reinterpret_cast<T*>(gY), M, c.nr, M);
}

// Adjoint of one tile for the exponential Heun scheme, organised as bwd_tile. Per sub-step the
// recomputation keeps X, D0, Dm, Xp and both filtered outputs the drives were computed from
// (Y and the predicted Yp: two weight-gradient entries per sub-step, with gD0 and gD1).
template <class T> void bwd_tile_eh(const Job<T>& jb, int64_t tile, Scratch<T>& sc) {
  constexpr int R = RW<T>;
  const int64_t M = jb.M, S = jb.S, TM = jb.NT * M, MR = M * R;
  const int64_t G = jb.gslots, GS = G * S;
  // scratch: gX gY gYn gCt gD0 gD1 gYp base | C of the block's points (G) | X_0..X_GS |
  // D0, Dm, Xp (GS each) | Y stash [2 GS][M][R] | gD stash [2 GS * R][M]
  T* p = sc.get((9 + G) * MR + 8 * GS * MR);
  auto v = [](T* x) { return reinterpret_cast<V<T>*>(x); };
  V<T> *gX = v(p), *gY = v(p + MR), *gYn = v(p + 2 * MR), *gCt = v(p + 3 * MR);
  V<T> *gD0 = v(p + 4 * MR), *gD1 = v(p + 5 * MR), *gYp = v(p + 6 * MR), *base = v(p + 7 * MR);
  T* Cb = p + 8 * MR;
  T* Xst = Cb + G * MR;
  T* D0st = Xst + (GS + 1) * MR;
  T* Dmst = D0st + GS * MR;
  T* Xpst = Dmst + GS * MR;
  T* Yb = Xpst + GS * MR;
  T* Gb = Yb + 2 * GS * MR;
  Ctx<T> c;
  c.set(jb, tile);
  T* gWt = jb.gWp + tile * M * M;
  std::fill(gWt, gWt + M * M, T(0));
  std::fill(p, p + 2 * MR, T(0));
  if (jb.gXf) load_tile<T, ZERO, false>(reinterpret_cast<T*>(gX), jb.gXf + c.srow(), M, c.nr, M);
  if (jb.gYf) load_tile<T, ZERO, false>(reinterpret_cast<T*>(gY), jb.gYf + c.srow(), M, c.nr, M);
  for (int64_t t0 = ((jb.NT - 1) / G) * G; t0 >= 0; t0 -= G) {
    const int64_t np = std::min(G, jb.NT - t0), ns = np * S;
    if (t0) {
      load_tile<T, REPEAT, false>(Xst, jb.Xseq + c.row(t0 - 1), TM, c.nr, M);
      std::memcpy(Yb, jb.Ycp + (tile * jb.ncp + t0 / G - 1) * MR, MR * sizeof(T));
    } else {
      load_tile<T, REPEAT, false>(Xst, jb.X0 + c.srow(), M, c.nr, M);
      load_tile<T, REPEAT, false>(Yb, jb.Y0 + c.srow(), M, c.nr, M);
    }
    for (int64_t q = 0; q < np; ++q) {
      T* Ct = Cb + q * MR;
      load_tile<T, REPEAT, false>(Ct, jb.C + c.row(t0 + q), TM, c.nr, M);
      for (int64_t s = 0; s < S; ++s) {
        const int64_t k = q * S + s;
        T* ynext = k + 1 < ns ? Yb + 2 * (k + 1) * MR : reinterpret_cast<T*>(gYn);  // last: unused
        step_fwd_eh<T>(c, v(Xst + k * MR), v(Yb + 2 * k * MR), v(Ct), v(D0st + k * MR),
                       v(Dmst + k * MR), v(Xpst + k * MR), v(Yb + (2 * k + 1) * MR),
                       v(Xst + (k + 1) * MR), v(ynext));
      }
    }
    for (int64_t q = np - 1; q >= 0; --q) {
      if (jb.gXseq)
        load_tile<T, ZERO, true>(reinterpret_cast<T*>(gX), jb.gXseq + c.row(t0 + q), TM, c.nr, M);
      for (int64_t s = S - 1; s >= 0; --s) {
        const int64_t k = q * S + s;
        step_bwd_eh<T>(c, v(Xst + k * MR), v(Xst + (k + 1) * MR), v(D0st + k * MR),
                       v(Dmst + k * MR), v(Xpst + k * MR), gX, gY, gD0, gD1, gYp, base, gYn);
        stash_rows(Gb + 2 * k * MR, reinterpret_cast<const T*>(gD0), c.nr, M);
        stash_rows(Gb + (2 * k + 1) * MR, reinterpret_cast<const T*>(gD1), c.nr, M);
        if (s == S - 1)
          for (int64_t i = 0; i < M; ++i) gCt[i] = gD0[i] + gD1[i];
        else
          for (int64_t i = 0; i < M; ++i) gCt[i] += gD0[i] + gD1[i];
        std::swap(gY, gYn);
      }
      store_tile(jb.gC + c.row(t0 + q), reinterpret_cast<T*>(gCt), TM, c.nr, M);
    }
    gw_flush<T>(Yb, Gb, 2 * ns, gWt, M, jb.nb);
  }
  store_tile(jb.gX0 + c.srow(), reinterpret_cast<T*>(gX), M, c.nr, M);
  store_tile(jb.gY0 + c.srow(), reinterpret_cast<T*>(gY), M, c.nr, M);
}

// Flush-to-zero and denormals-are-zero for the life of a worker, the caller's mode restored
// after. A spintronic neuron without drive decays towards its fixed point x = 0 and the
// adjoint decays with it: in subnormal range every operation on them takes a microcode
// assist; this made the flip-flop network (no filter) train 9x slower. Values below
// 1.2e-38 (float) or 2.2e-308 (double) become 0, far below anything the model resolves.
struct FlushDenormals {
#if defined(__SSE__) || defined(__x86_64__)
  unsigned int saved = _mm_getcsr();
  explicit FlushDenormals(bool on) {
    if (on) _mm_setcsr(saved | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
  }
  ~FlushDenormals() { _mm_setcsr(saved); }
#else
  explicit FlushDenormals(bool) {}
#endif
};

template <class T> int run(const Job<T>& jb, bool backward) {
  const int64_t ntiles = jb.K * jb.tpk;
  std::atomic<int64_t> next{0};
  std::atomic<int> failed{0};
  auto worker = [&]() {
    FlushDenormals ftz(jb.ftz != 0);
    try {
      Scratch<T> sc;
      for (int64_t tile; (tile = next.fetch_add(1)) < ntiles;) {
        if (backward && jb.scheme == 1) bwd_tile_eh(jb, tile, sc);
        else if (backward) bwd_tile(jb, tile, sc);
        else fwd_tile(jb, tile, sc);
      }
    } catch (...) {
      failed = 1;
    }
  };
  const int64_t nt = std::max<int64_t>(1, std::min(jb.nthreads, ntiles));
  std::vector<std::thread> pool;
  try {
    for (int64_t i = 1; i < nt; ++i) pool.emplace_back(worker);
  } catch (...) {  // fewer threads than asked: the ones running share all the tiles
  }
  worker();
  for (auto& th : pool) th.join();
  if (failed) return 1;
  if (backward) {  // weight gradient: tile partials summed in a fixed order (deterministic)
    const int64_t MM = jb.M * jb.M;
    for (int64_t k = 0; k < jb.K; ++k) {
      T* out = jb.gW + k * MM;
      std::fill(out, out + MM, T(0));
      for (int64_t tb = 0; tb < jb.tpk; ++tb) {
        const T* part = jb.gWp + (k * jb.tpk + tb) * MM;
        for (int64_t e = 0; e < MM; ++e) out[e] += part[e];
      }
    }
  }
  return 0;
}

template <class T> int entry(int backward, const int64_t* ia, const double* da, void* const* pa) {
  Job<T> jb;
  jb.K = ia[0]; jb.B = ia[1]; jb.NT = ia[2]; jb.M = ia[3]; jb.S = ia[4]; jb.nb = ia[5];
  jb.kind = ia[6]; jb.has_q = ia[7]; jb.has_filter = ia[8]; jb.nthreads = ia[9];
  jb.tpk = (jb.B + RW<T> - 1) / RW<T>;
  jb.gslots = ia[10];
  jb.ncp = ia[11];
  jb.ftz = ia[12];
  jb.scheme = ia[13];
  jb.h = (T)da[0];
  jb.C = (const T*)pa[0]; jb.W = (const T*)pa[1]; jb.WT = (const T*)pa[2];
  jb.X0 = (const T*)pa[3]; jb.Y0 = (const T*)pa[4]; jb.gamma = (const T*)pa[5];
  jb.q = (const T*)pa[6]; jb.a = (const T*)pa[7];
  jb.Xseq = (T*)pa[8]; jb.Xf = (T*)pa[9]; jb.Yf = (T*)pa[10]; jb.Ycp = (T*)pa[11];
  jb.gXseq = (const T*)pa[12]; jb.gXf = (const T*)pa[13]; jb.gYf = (const T*)pa[14];
  jb.gC = (T*)pa[15]; jb.gWp = (T*)pa[16]; jb.gW = (T*)pa[17]; jb.gX0 = (T*)pa[18];
  jb.gY0 = (T*)pa[19];
  jb.ah = (const T*)pa[20];
  jb.th = (const T*)pa[21];
  return run(jb, backward != 0);
}

}  // namespace

extern "C" {
// dtype: 0 float32, 1 float64; ia, da, pa: sizes and flags, step, data pointers (see entry()).
// Returns 0 on success.
int hil_scan(int dtype, int backward, const int64_t* ia, const double* da, void* const* pa) {
  return dtype == 0 ? entry<float>(backward, ia, da, pa) : entry<double>(backward, ia, da, pa);
}
int hil_rows_per_tile(int dtype) { return dtype == 0 ? RW<float> : RW<double>; }
}
"""

_NATIVE_SCHEMES = ("euler", "expheun")
_KIND_CODE = {"spintronic": 0, "ctrnn": 1, "linear": 2, "liquid": 3, "quadratic": 4}
_STASH_STEPS = {"euler": 16, "expheun": 8}  # sub-steps per weight-gradient product (cache-sized)
_native_lock = threading.Lock()
_native_lib: list[ctypes.CDLL | None] = []  # empty: not tried yet
_native_allowed = [os.environ.get("HIL_NATIVE", "1") != "0"]
_flush_subnormals = [True]


def _cache_dir() -> Path:
    if os.environ.get("HIL_CACHE_DIR"):
        return Path(os.environ["HIL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hil"


def _cpu_signature() -> str:
    """Identifies the instruction set, so that a ``-march=native`` build is never reused on a
    different CPU (a shared home directory, a container image)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return platform.machine() + line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _kernel_source() -> str:
    """The kernel with the closed-form step's constants of :mod:`sims.neurons` prepended."""
    coef = ", ".join(repr(c) for c in PSI_COEF)
    return (f"#define HIL_Z_CAP {Z_CAP!r}\n#define HIL_Z_SERIES {Z_SERIES!r}\n"
            f"#define HIL_PSI_A {{{coef}}}\n" + _NATIVE_SOURCE)


def _build_native() -> ctypes.CDLL:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno"]
    source = _kernel_source()
    key = hashlib.sha256("\0".join([source, cxx, *flags, _cpu_signature()]).encode())
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib_path = out_dir / f"engine-{key.hexdigest()[:20]}.so"
    if not lib_path.exists():
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src = Path(tmp) / "engine.cpp"
            src.write_text(source)
            tmp_lib = Path(tmp) / "engine.so"
            err = ""
            for arch in (["-march=native"], []):  # some compilers or CPUs lack -march=native
                res = subprocess.run([cxx, *flags, *arch, str(src), "-o", str(tmp_lib)],
                                     capture_output=True, text=True)
                if res.returncode == 0:
                    break
                err = res.stderr[-2000:]
            else:
                raise RuntimeError(f"compiling the native engine failed: {err}")
            os.replace(tmp_lib, lib_path)  # atomic: concurrent builds are harmless
    lib = ctypes.CDLL(str(lib_path))  # ctypes releases the GIL during the calls
    lib.hil_scan.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_void_p]
    lib.hil_scan.restype = ctypes.c_int
    lib.hil_rows_per_tile.argtypes = [ctypes.c_int]
    lib.hil_rows_per_tile.restype = ctypes.c_int
    return lib


def native_library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None when it cannot be built; the torch
    back end then runs, after one warning saying why."""
    if not _native_lib:
        with _native_lock:
            if not _native_lib:
                lib = None
                try:
                    lib = _build_native()
                except Exception as e:  # noqa: BLE001 - any failure means: fall back
                    warnings.warn(f"hil: native engine unavailable, using the torch engine ({e})",
                                  RuntimeWarning, stacklevel=3)
                _native_lib.append(lib)
    return _native_lib[0]


def set_native(enabled: bool) -> bool:
    """Allow (default) or forbid the native back end in this process; returns the previous
    setting. Forbidding it runs the torch back end everywhere (benchmarks, debugging)."""
    previous = _native_allowed[0]
    _native_allowed[0] = bool(enabled)
    return previous


def set_flush_subnormals(enabled: bool) -> bool:
    """Run the native kernel with flush-to-zero (default) or with the caller's floating-point
    mode; returns the previous setting. Off only to measure what it buys
    (``benchmarks/bench_subnormals.py``)."""
    previous = _flush_subnormals[0]
    _flush_subnormals[0] = bool(enabled)
    return previous


def _native_for(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The native kernel if it can run on these tensors (CPU, one float dtype), else None."""
    if not _native_allowed[0]:
        return None
    t0 = tensors[0]
    if t0.device.type != "cpu" or t0.dtype not in (torch.float32, torch.float64):
        return None
    if any(t.dtype != t0.dtype or t.device != t0.device for t in tensors[1:]):
        return None
    return native_library()


_P = 22  # pointer slots of hil_scan (see entry() in the kernel)


class _NativeCall:
    """One kernel configuration: sizes, flags and the per-trial coefficients, as the kernel
    wants them (contiguous, in the state's dtype)."""

    def __init__(self, lib: ctypes.CDLL, shape: torch.Size, dtype: torch.dtype, dyn: Dynamics) -> None:
        K, B, T, M = shape
        self.lib = lib
        self.code = 0 if dtype == torch.float32 else 1
        self.R = lib.hil_rows_per_tile(self.code)  # batch rows per tile
        self.tiles = (B + self.R - 1) // self.R  # tiles per trial
        self.shape = (K, B, T, M)
        self.gamma = dyn.gamma.to(dtype).expand(K, 1, M).reshape(K, M).contiguous()
        self.q = None if dyn.q is None else dyn.q.to(dtype).expand(K, 1, M).reshape(K, M).contiguous()
        self.a = None if dyn.a is None else dyn.a.to(dtype).expand(K, 1, 1).reshape(K).contiguous()
        self.ah = (None if dyn.a is None or dyn.a_half is None
                   else dyn.a_half.to(dtype).expand(K, 1, 1).reshape(K).contiguous())
        self.th = None if dyn.floor is None else dyn.floor.to(dtype).expand(K, 1, 1).reshape(K).contiguous()
        block = max(1, _STASH_STEPS[dyn.scheme] // dyn.substeps)  # input points per adjoint block
        self.checkpoints = max(1, (T - 1) // block)  # Y at the block starts after the first
        ints = [K, B, T, M, dyn.substeps, dyn.layer_size or M, _KIND_CODE[dyn.kind],
                self.q is not None, self.a is not None, torch.get_num_threads(), block,
                self.checkpoints, _flush_subnormals[0], SCHEMES.index(dyn.scheme)]
        self.ints = (ctypes.c_int64 * len(ints))(*ints)
        self.reals = (ctypes.c_double * 1)(dyn.h)

    def inputs(self, C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        K, B, T, M = self.shape
        return (C.contiguous(), Wr.expand(K, M, M).contiguous(), X0.expand(K, B, M).contiguous(),
                Y0.expand(K, B, M).contiguous())

    def run(self, backward: bool, slots: dict[int, torch.Tensor | None]) -> None:
        ptrs = (ctypes.c_void_p * _P)()
        for i, t in ((5, self.gamma), (6, self.q), (7, self.a), (20, self.ah), (21, self.th),
                     *slots.items()):
            if t is not None:
                assert t.is_contiguous() and t.dtype == self.gamma.dtype
                ptrs[i] = t.data_ptr()
        rc = self.lib.hil_scan(self.code, int(backward), self.ints, self.reals, ptrs)
        if rc != 0:
            raise RuntimeError(f"native Euler scan failed (code {rc}): out of memory or threads")

    def forward(self, C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor,
                store: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(Xseq, X_final, Y_final, Ycp)``; ``Ycp``, the filtered output where the adjoint's
        blocks start (kernel tile layout), is the checkpoint it needs besides ``Xseq``."""
        K, B, T, M = self.shape
        Xseq = C.new_empty((K, B, T, M))
        Xf, Yf = C.new_empty((K, B, M)), C.new_empty((K, B, M))
        Ycp = C.new_empty((K, self.tiles, self.checkpoints, M, self.R)) if store else None
        self.run(False, {0: C, 1: Wr, 3: X0, 4: Y0, 8: Xseq, 9: Xf, 10: Yf, 11: Ycp})
        return Xseq, Xf, Yf, Ycp

    def backward(self, C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor,
                 Xseq: torch.Tensor, Ycp: torch.Tensor, gXseq: torch.Tensor | None,
                 gXf: torch.Tensor | None, gYf: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of ``(C, Wr, X0, Y0)``; a None output gradient counts as zero."""
        K, B, T, M = self.shape
        gC = C.new_empty((K, B, T, M))
        gW_parts = C.new_empty((K * self.tiles, M, M))  # per tile, summed by the kernel
        gW = C.new_empty((K, M, M))
        gX0, gY0 = C.new_empty((K, B, M)), C.new_empty((K, B, M))

        def dense(g: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
            return None if g is None else g.to(C.dtype).expand(shape).contiguous()

        self.run(True, {0: C, 1: Wr, 2: Wr.transpose(1, 2).contiguous(), 3: X0, 4: Y0, 8: Xseq,
                        11: Ycp, 12: dense(gXseq, (K, B, T, M)), 13: dense(gXf, (K, B, M)),
                        14: dense(gYf, (K, B, M)), 15: gC, 16: gW_parts, 17: gW, 18: gX0, 19: gY0})
        return gC, gW, gX0, gY0


# ---------------------------------------------------------------------------- torch back end
def _torch_forward(
    C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor, dyn: Dynamics, store: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Batched tensor operations per step (any device and dtype). With ``store`` it keeps every
    step's state, drive and filtered output for :func:`_torch_backward`."""
    K, B, T, M = C.shape
    n = T * dyn.substeps
    if store:
        Xs = C.new_empty((n + 1, K, B, M))
        Ds = C.new_empty((n, K, B, M))
        Ys = C.new_empty((K, n, B, M))  # trial-major: the weight gradient is then one bmm
    else:
        Xs = C.new_empty((2, K, B, M))
        Ds = C.new_empty((1, K, B, M))
    Xseq = C.new_empty((K, B, T, M))
    Xs[0].copy_(X0)
    Y = Y0.expand(K, B, M).clone()
    h = dyn.h
    neg_gamma = -dyn.gamma
    s = 0
    for t in range(T):
        Ct = C[:, :, t]
        for _ in range(dyn.substeps):
            i, j = (s, s + 1) if store else (s % 2, (s + 1) % 2)
            X = Xs[i]
            if store:
                Ys[:, s].copy_(Y)
            D = torch.baddbmm(Ct, Y, Wr, out=Ds[s] if store else Ds[0])
            if dyn.q is not None and dyn.kind == "spintronic":
                F = X * (1 + dyn.q * X) * neg_gamma
            else:
                F = X * neg_gamma
            F.addcmul_(D, _gain(dyn.kind, X))
            if dyn.floor is not None:
                F.add_(dyn.floor)
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
        Xseq[:, :, t].copy_(Xs[s if store else s % 2])
    Xf = Xs[n if store else n % 2].clone()
    return Xseq, Xf, Y, ((Xs, Ds, Ys) if store else ())


def _torch_backward(
    dyn: Dynamics, shape: tuple[int, int, int, int], Wr: torch.Tensor, Xs: torch.Tensor,
    Ds: torch.Tensor, Ys: torch.Tensor, gXseq: torch.Tensor | None, gXfin: torch.Tensor | None,
    gYfin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adjoint of the Euler recursion, step by step backwards."""
    K, B, T, M = shape
    n = T * dyn.substeps
    h = dyn.h
    WrT = Wr.transpose(1, 2)
    gX = gXfin.expand(K, B, M).clone() if gXfin is not None else Xs.new_zeros((K, B, M))
    gY = gYfin.expand(K, B, M).clone() if gYfin is not None else Xs.new_zeros((K, B, M))
    gDs = Xs.new_empty((K, n, B, M))
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
        gD = torch.mul(gF, _gain(dyn.kind, X), out=gDs[:, s])
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
    # weight gradient: sum over steps and rows of Y_s^T gD_s, one product per trial
    gWr = torch.bmm(Ys.view(K, n * B, M).transpose(1, 2), gDs.view(K, n * B, M))
    gC = gDs.view(K, T, dyn.substeps, B, M).sum(2).permute(0, 2, 1, 3)
    return gC, gWr, gX, gY


def _filter(dyn: Dynamics, Y: torch.Tensor, Xn: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Filtered output after a sub-step from ``X`` to ``Xn`` (eq. 5), or the plain output."""
    if dyn.a is None:
        return _out(dyn, Xn)
    inc = _out(dyn, Xn) - _out(dyn, X)
    return dyn.a * Y + (inc if dyn.a_half is None else dyn.a_half * inc)


def _out_dx(dyn: Dynamics, x: torch.Tensor) -> torch.Tensor | None:
    """``o'(x)``: None for the identity."""
    return 1 - torch.tanh(x) ** 2 if dyn.tanh_out else None


def _torch_forward_eh(
    C: torch.Tensor, Wr: torch.Tensor, X0: torch.Tensor, Y0: torch.Tensor, dyn: Dynamics, store: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Exponential Heun (``scheme='expheun'``) as batched tensor operations per sub-step. With
    ``store`` it keeps what :func:`_torch_backward_eh` needs: per sub-step the start state, both
    drives, the predicted state, and both filtered outputs the drives were computed from."""
    K, B, T, M = C.shape
    n = T * dyn.substeps
    X = X0.expand(K, B, M).clone()
    Y = Y0.expand(K, B, M).clone()
    Xseq = C.new_empty((K, B, T, M))
    if store:
        Xs = C.new_empty((n + 1, K, B, M))
        D0s, Dms, Xps = (C.new_empty((n, K, B, M)) for _ in range(3))
        Ys = C.new_empty((K, 2, n, B, M))  # [0]: Y_s, [1]: predicted Y (weight gradient: one bmm)
        Xs[0].copy_(X)
    s = 0
    for t in range(T):
        Ct = C[:, :, t]
        for _ in range(dyn.substeps):
            D0 = torch.baddbmm(Ct, Y, Wr)
            Xp = exact_step(dyn, X, D0)[0]
            Yp = _filter(dyn, Y, Xp, X)
            Dm = 0.5 * (D0 + torch.baddbmm(Ct, Yp, Wr))
            Xn = exact_step(dyn, X, Dm)[0]
            if store:
                D0s[s].copy_(D0)
                Dms[s].copy_(Dm)
                Xps[s].copy_(Xp)
                Ys[:, 0, s].copy_(Y)
                Ys[:, 1, s].copy_(Yp)
                Xs[s + 1].copy_(Xn)
            Y = _filter(dyn, Y, Xn, X)
            X = Xn
            s += 1
        Xseq[:, :, t].copy_(X)
    return Xseq, X.clone(), Y, ((Xs, D0s, Dms, Xps, Ys) if store else ())


def _torch_backward_eh(
    dyn: Dynamics, shape: tuple[int, int, int, int], Wr: torch.Tensor, Xs: torch.Tensor,
    D0s: torch.Tensor, Dms: torch.Tensor, Xps: torch.Tensor, Ys: torch.Tensor,
    gXseq: torch.Tensor | None, gXfin: torch.Tensor | None, gYfin: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adjoint of :func:`_torch_forward_eh`, sub-step by sub-step backwards."""
    K, B, T, M = shape
    n = T * dyn.substeps
    WrT = Wr.transpose(1, 2)
    gX = gXfin.expand(K, B, M).clone() if gXfin is not None else Xs.new_zeros((K, B, M))
    gY = gYfin.expand(K, B, M).clone() if gYfin is not None else Xs.new_zeros((K, B, M))
    gDs = Xs.new_empty((K, 2, n, B, M))  # [0]: dL/dD0, [1]: dL/dD1 (the predicted drive)
    a = dyn.a
    ah = dyn.a_half if a is not None and dyn.a_half is not None else 1.0
    for s in range(n - 1, -1, -1):
        if gXseq is not None and (s + 1) % dyn.substeps == 0:
            gX = gX + gXseq[:, :, (s + 1) // dyn.substeps - 1]
        X, Xn, Xp = Xs[s], Xs[s + 1], Xps[s]
        ox = _out_dx(dyn, X)
        # Y_{s+1} = a Y_s + ah (o(X_{s+1}) - o(X_s))  (or o(X_{s+1}))
        oxn = _out_dx(dyn, Xn)
        gYh = ah * gY
        gXn = gX + (gYh if oxn is None else oxn * gYh)
        gYs = a * gY if a is not None else torch.zeros_like(gY)
        gXs = -(gYh if ox is None else ox * gYh) if a is not None else torch.zeros_like(gY)
        # X_{s+1} = Phi(X_s, Dm)
        _, dx_m, dD_m = exact_step(dyn, X, Dms[s], grads=True)
        gXs = gXs + dx_m * gXn
        gDm = dD_m * gXn
        gD1 = 0.5 * gDm
        gDs[:, 1, s] = gD1
        # D1 = C + Yp Wr;  Yp = a Y_s + o(Xp) - o(X_s)  (or o(Xp))
        gYp = torch.bmm(gD1, WrT)
        oxp = _out_dx(dyn, Xp)
        gYph = ah * gYp
        gXp = gYph if oxp is None else oxp * gYph
        if a is not None:
            gYs = gYs + a * gYp
            gXs = gXs - (gYph if ox is None else ox * gYph)
        # Xp = Phi(X_s, D0)
        _, dx_0, dD_0 = exact_step(dyn, X, D0s[s], grads=True)
        gXs = gXs + dx_0 * gXp
        gD0 = 0.5 * gDm + dD_0 * gXp
        gDs[:, 0, s] = gD0
        # D0 = C + Y_s Wr
        gY = torch.baddbmm(gYs, gD0, WrT)
        gX = gXs
    gWr = torch.bmm(Ys.view(K, 2 * n * B, M).transpose(1, 2), gDs.view(K, 2 * n * B, M))
    gC = gDs.sum(1).view(K, T, dyn.substeps, B, M).sum(2).permute(0, 2, 1, 3)
    return gC, gWr, gX, gY


def _banded(Wr: torch.Tensor, dyn: Dynamics) -> torch.Tensor:
    """``Wr`` with the entries outside the layer band zeroed (torch back end)."""
    if dyn.layer_size is None:
        return Wr
    return Wr * band_mask(Wr.shape[-1], dyn.layer_size, Wr.device)


# ---------------------------------------------------------------------------- entry points
def integrate(
    C: torch.Tensor,
    Wr: torch.Tensor,
    X0: torch.Tensor,
    Y0: torch.Tensor,
    dyn: Dynamics,
    store: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The fast forward loop, without autograd. With ``store`` it also returns what the
    backward pass needs (back-end specific); without, it keeps only the current state.

    Returns ``(Xseq, X_final, Y_final, saved)``.
    """
    lib = _native_for(C, Wr, X0, Y0) if dyn.scheme in _NATIVE_SCHEMES else None
    if lib is not None:
        call = _NativeCall(lib, C.shape, C.dtype, dyn)
        C, Wr, X0, Y0 = call.inputs(C, Wr, X0, Y0)
        Xseq, Xf, Yf, Ycp = call.forward(C, Wr, X0, Y0, store)
        return Xseq, Xf, Yf, ((C, Wr, X0, Y0, Xseq, Ycp) if store else ())
    fwd = _torch_forward_eh if dyn.scheme == "expheun" else _torch_forward
    return fwd(C, _banded(Wr, dyn), X0, Y0, dyn, store)


class EulerScan(torch.autograd.Function):
    """Fast forward and hand-written backward of the Euler recursion (see module docstring).

    Inputs: ``C (K,B,T,M)``, ``Wr (K,M,M)`` (drive = ``Y @ Wr``), ``X0, Y0 (K,B,M)`` and a
    :class:`Dynamics`. Outputs: ``Xseq (K,B,T,M)`` (state at the end of every input point),
    ``X_final``, ``Y_final``.
    """

    @staticmethod
    def forward(ctx, C, Wr, X0, Y0, dyn: Dynamics):  # type: ignore[override]
        ctx.set_materialize_grads(False)  # unused outputs cost nothing in the backward
        ctx.dyn = dyn
        ctx.shape = tuple(C.shape)
        lib = _native_for(C, Wr, X0, Y0) if dyn.scheme in _NATIVE_SCHEMES else None
        ctx.native = lib is not None
        if lib is not None:
            ctx.call = call = _NativeCall(lib, C.shape, C.dtype, dyn)
            C, Wr, X0, Y0 = call.inputs(C, Wr, X0, Y0)
            Xseq, Xf, Yf, Ycp = call.forward(C, Wr, X0, Y0, store=True)
            ctx.save_for_backward(C, Wr, X0, Y0, Xseq, Ycp)
        else:
            Wb = _banded(Wr, dyn)
            fwd = _torch_forward_eh if dyn.scheme == "expheun" else _torch_forward
            Xseq, Xf, Yf, saved = fwd(C, Wb, X0, Y0, dyn, store=True)
            ctx.save_for_backward(Wb, *saved)
        return Xseq, Xf, Yf

    @staticmethod
    @once_differentiable
    def backward(ctx, gXseq, gXfin, gYfin):  # type: ignore[override]
        if ctx.native:
            gC, gWr, gX, gY = ctx.call.backward(*ctx.saved_tensors, gXseq, gXfin, gYfin)
        else:
            Wb, *saved = ctx.saved_tensors
            bwd = _torch_backward_eh if ctx.dyn.scheme == "expheun" else _torch_backward
            gC, gWr, gX, gY = bwd(ctx.dyn, ctx.shape, Wb, *saved, gXseq, gXfin, gYfin)
            if ctx.dyn.layer_size is not None:
                gWr = gWr * band_mask(gWr.shape[-1], ctx.dyn.layer_size, gWr.device)
        return gC, gWr, gX, gY, None
