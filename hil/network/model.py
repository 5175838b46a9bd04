"""The differentiable multilayer dynamical network (paper eq. 2-5, thesis eq. 6.1-6.2).

One :class:`DynamicalNetwork` holds ``K`` independent networks ("trials": seeds or
hyperparameter configurations) stacked on a leading dimension, so that ten seeds or a batch
of Optuna trials train in one job. Structure (neuron type, layers, width, time step) is shared;
every physical hyperparameter (tau, S, S_in, b_in, b_fixed, f_cut, densities) may differ.

Per layer ``l`` and neuron ``i`` (thesis eq. 6.1)::

    I_i = S * (W_ext^l y^{l-1} + W_int^l y^l + b^l)_i + b_fixed

with ``W_int`` zero on its diagonal, fixed random sparsity masks (buffers), the input
``y^{-1} = S_in * (u - centre) + b_in`` and ``y^l`` the high-pass-filtered output (eq. 5).
A Linear readout of the last layer follows (LogSoftmax is applied by the task's loss).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hil.config import HardwareConfig, ModelConfig
from hil.errors import ConfigError
from hil.network.engine import Dynamics, get_engine
from sims.neurons import TANH_OUTPUT_TYPES, rest_state

_STRUCTURAL = ("neuron", "n_layers", "n_hidden", "dt_ns", "substeps", "highpass", "scheme")


@dataclass
class State:
    """Network state between calls (for truncated BPTT): raw ``x`` and filtered ``y``."""

    x: torch.Tensor  # (K, B, M)
    y: torch.Tensor  # (K, B, M)

    def detach(self) -> State:
        return State(self.x.detach(), self.y.detach())


class DynamicalNetwork(nn.Module):
    """``K`` stacked multilayer networks of dynamical neurons with a linear readout."""

    def __init__(
        self,
        configs: list[ModelConfig],
        n_in: int,
        n_out: int,
        seeds: list[int],
        input_centre: float = 0.0,
    ) -> None:
        super().__init__()
        if len(configs) != len(seeds):
            raise ValueError("one config per seed is needed")
        c0 = configs[0]
        for c in configs[1:]:
            for key in _STRUCTURAL:
                if getattr(c, key) != getattr(c0, key):
                    raise ConfigError(f"model.{key}", "must be equal across trials run together")
        self.configs = configs
        self.kind = c0.neuron
        self.L, self.N, self.n_in, self.n_out = c0.n_layers, c0.n_hidden, n_in, n_out
        self.M = self.L * self.N
        self.K = len(configs)
        self.seeds = list(seeds)
        self.engine = "fast"
        K, M, N = self.K, self.M, self.N

        def per_trial(fn) -> torch.Tensor:
            return torch.tensor([float(fn(c)) for c in configs]).view(K, 1, 1)

        self.register_buffer("gamma", per_trial(lambda c: c.gamma).expand(K, 1, M).clone())
        self.register_buffer("q", per_trial(lambda c: c.q).expand(K, 1, M).clone())
        self.register_buffer("sigma", per_trial(lambda c: c.sigma).expand(K, 1, M).clone())
        self.register_buffer("b_fixed", per_trial(lambda c: c.b_fixed_value).expand(K, 1, M).clone())
        self.register_buffer("S", per_trial(lambda c: c.S))
        self.register_buffer("S_in", per_trial(lambda c: c.S_in))
        self.register_buffer("b_in", per_trial(lambda c: c.b_in))
        self.register_buffer("filter_a", per_trial(lambda c: 1 - 2 * math.pi * c.f_cut_ghz * c.h_ns))
        self.register_buffer("input_centre", torch.tensor(float(input_centre)))
        self.highpass = c0.highpass_on
        self.h = c0.h_ns
        self.substeps = c0.substeps
        self.scheme = c0.scheme

        W_in = torch.zeros(K, N, n_in)
        W_rec = torch.zeros(K, M, M)  # row: receiving neuron, column: sending neuron
        mask = torch.zeros(K, M, M)
        bias = torch.zeros(K, M)
        W_out = torch.zeros(K, n_out, N)
        b_out = torch.zeros(K, n_out)
        for k, (c, seed) in enumerate(zip(configs, seeds, strict=True)):
            g = torch.Generator().manual_seed(int(seed))
            W_in[k] = _uniform((N, n_in), c.init_scale / math.sqrt(n_in), g)
            for li in range(self.L):
                r = slice(li * N, (li + 1) * N)
                m_int = (torch.rand(N, N, generator=g) < c.density_intra).float()
                m_int.fill_diagonal_(0.0)
                mask[k, r, r] = m_int
                fan_in = max(1.0, c.density_intra * (N - 1))
                if li > 0:
                    p = slice((li - 1) * N, li * N)
                    mask[k, r, p] = (torch.rand(N, N, generator=g) < c.density_inter).float()
                    fan_in += max(1.0, c.density_inter * N)
                a = c.init_scale / math.sqrt(fan_in)
                W_rec[k] = torch.where(mask[k] > 0, _uniform((M, M), a, g), W_rec[k])
            bias[k] = _uniform((M,), 0.1 * c.b_clip_dt if c.b_clip_dt else 0.01, g)
            W_out[k] = _uniform((n_out, N), 1 / math.sqrt(N), g)
            b_out[k] = _uniform((n_out,), 1 / math.sqrt(N), g)
        self.register_buffer("mask", mask)
        self.W_in = nn.Parameter(W_in)
        self.W_rec = nn.Parameter(W_rec * mask)
        self.bias = nn.Parameter(bias)
        self.W_out = nn.Parameter(W_out)
        self.b_out = nn.Parameter(b_out)
        self.register_buffer("w_clip", per_trial(lambda c: c.w_clip or math.inf))
        self.register_buffer("b_clip", per_trial(lambda c: c.b_clip or math.inf).view(K, 1))
        x0 = torch.tensor([rest_state(self.kind, c.gamma, c.b_fixed_value, c.sigma, c.q)
                           for c in configs])
        self.register_buffer("x_rest", x0.view(K, 1, 1).expand(K, 1, M).clone())
        self._pass: dict[str, Any] | None = None  # a hardware-aware pass's draw (hardware_pass)

    # ------------------------------------------------------------------ structure helpers
    def layer_slices(self) -> list[slice]:
        return [slice(i * self.N, (i + 1) * self.N) for i in range(self.L)]

    def dynamics(self) -> Dynamics:
        has_q = bool((self.q != 0).any()) and self.kind == "spintronic"
        a, a_half = self._filter_coefficients()
        return Dynamics(
            kind=self.kind,
            h=self.h,
            substeps=self.substeps,
            gamma=(self._pass or {}).get("gamma", self.gamma),
            q=self.q if has_q else None,
            a=a,
            layer_size=self.N,  # Wr is the layer band: the engine skips the zero blocks
            scheme=self.scheme,
            a_half=a_half,
            floor=self._thermal_floor(),
        )

    def _thermal_floor(self) -> torch.Tensor | None:
        """``(K, 1, 1)`` thermal diffusion of the oscillators' power (``model.thermal_d_ghz``),
        or None when every trial has none."""
        v = [c.thermal_d_ghz for c in self.configs]
        if not any(v) or self.kind != "spintronic":  # the floor is the oscillator power's
            return None
        return torch.tensor(v).view(self.K, 1, 1).to(self.filter_a)

    def _filter_coefficients(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The high-pass filter's factors per step ``h`` (eq. 5, ``w = 2 pi f_cut``): Euler
        ``Y' = (1 - w h) Y + dX`` (as trained before), exponential Heun ``Y' = e^{-w h} Y +
        e^{-w h / 2} dX`` (exact decay, increment at mid-step: second order)."""
        if not self.highpass:
            return None, None
        wh = [2 * math.pi * c.f_cut_ghz * self.h for c in self.configs]
        if self.scheme == "euler":
            return torch.tensor([1 - v for v in wh]).view(self.K, 1, 1).to(self.filter_a), None
        a = torch.tensor([math.exp(-v) for v in wh], dtype=torch.float64)
        return a.view(self.K, 1, 1).to(self.filter_a), a.sqrt().view(self.K, 1, 1).to(self.filter_a)

    def initial_state(self, batch: int) -> State:
        x_rest = (self._pass or {}).get("x_rest", self.x_rest)
        x = x_rest.expand(self.K, batch, self.M).clone()
        if self.highpass:
            y = torch.zeros_like(x)
        else:
            y = torch.tanh(x) if self.kind in TANH_OUTPUT_TYPES else x.clone()
        return State(x, y)

    def output_of(self, x: torch.Tensor) -> torch.Tensor:
        """What a neuron sends on (its power, or tanh of the state for the CTRNN)."""
        return torch.tanh(x) if self.kind in TANH_OUTPUT_TYPES else x

    # ------------------------------------------------------------------ hardware-aware passes
    @contextlib.contextmanager
    def hardware_pass(self, hw: HardwareConfig | None, gens: list[torch.Generator]
                      ) -> Iterator[DynamicalNetwork]:
        """Within the block, forward passes and the readout see one fresh draw of the chip's
        non-idealities ``hw`` (per trial, from that trial's generator): quantised weights with
        a straight-through gradient, synapse gain and write errors, drive offsets, mismatch of
        gamma and sigma (each oscillator starting from its own rest state), readout noise."""
        if hw is None or not hw.active:
            yield self
            return
        self._pass = self._draw_pass(hw, gens)
        try:
            yield self
        finally:
            self._pass = None

    def _draw_pass(self, hw: HardwareConfig, gens: list[torch.Generator]) -> dict[str, Any]:
        K, M = self.K, self.M
        dev, dt = self.W_rec.device, self.W_rec.dtype

        def normal(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev, dt)

        def lognormal(cv: float) -> torch.Tensor:
            s = math.sqrt(math.log1p(cv * cv))
            return torch.exp(s * normal((1, M)) - 0.5 * s * s)

        def chip(w: torch.Tensor, vmax: torch.Tensor, synapse: bool) -> torch.Tensor:
            connected = (w != 0).to(dt)
            if hw.weight_bits is not None:
                step = vmax / (2 ** (hw.weight_bits - 1) - 1)
                q = torch.round(torch.maximum(torch.minimum(w, vmax), -vmax) / step) * step
                w = w + (q - w).detach()  # straight-through: the gradient of the identity
            if synapse and hw.synapse_gain_cv > 0:
                w = w * (1 + hw.synapse_gain_cv * normal(tuple(w.shape[1:])))
            if hw.program_noise > 0:
                w = w + hw.program_noise * vmax * normal(tuple(w.shape[1:])) * connected
            return w

        wmax = self.w_clip.view(K, 1, 1)
        p: dict[str, Any] = {
            "W_in": chip(self.W_in, wmax, True),
            "W_rec": chip(self.W_rec * self.mask, wmax, True),
            "bias": chip(self.bias, self.b_clip.view(K, 1), False),
            "gamma": self.gamma * lognormal(hw.cv_gamma) if hw.cv_gamma > 0 else self.gamma,
            "sigma": self.sigma * lognormal(hw.cv_sigma) if hw.cv_sigma > 0 else self.sigma,
            "offset": hw.offset_std * normal((1, M)) if hw.offset_std > 0 else None,
            "readout_noise": hw.readout_noise,
            "gens": gens,
        }
        if self.kind == "spintronic" and (hw.cv_gamma > 0 or hw.cv_sigma > 0 or hw.offset_std > 0):
            # each oscillator starts from its own rest state (eq. 6.4), as on the chip
            a = p["sigma"] * (self.b_fixed + (p["offset"] if p["offset"] is not None else 0))
            qg = p["gamma"] * self.q
            p["x_rest"] = torch.where(a > p["gamma"], (a - p["gamma"]) / (a + qg), torch.zeros_like(a))
        return p

    # ------------------------------------------------------------------ forward
    def constant_drive(self, u: torch.Tensor) -> torch.Tensor:
        """``C_t``: the drive that does not depend on the state, ``(K, B, T, M)``.

        ``u``: inputs ``(B, T, n_in)`` shared by all trials, or ``(K, B, T, n_in)``.
        """
        if u.dim() == 3:
            u = u.unsqueeze(0)
        K, N, M = self.K, self.N, self.M
        p = self._pass or {}
        sigma, bias, W_in = p.get("sigma", self.sigma), p.get("bias", self.bias), p.get("W_in", self.W_in)
        u_scaled = self.S_in.view(K, 1, 1, 1) * (u - self.input_centre) + self.b_in.view(K, 1, 1, 1)
        _, B, T, n_in = u_scaled.shape
        # sigma (S (W_in y_in + bias) + b_fixed): one product for the input layer plus a per-trial
        # constant, so that only the result is written at full size (K, B, T, M)
        S = self.S.view(K, 1, 1)
        fixed = self.b_fixed if p.get("offset") is None else self.b_fixed + p["offset"]
        const = sigma * (S * bias.view(K, 1, M) + fixed)  # (K, 1, M)
        w_in = W_in.transpose(1, 2) * (S * sigma[..., :N])  # (K, n_in, N)
        drive0 = torch.baddbmm(const[..., :N], u_scaled.reshape(K, B * T, n_in), w_in)
        rest = const[..., N:].view(K, 1, 1, M - N).expand(K, B, T, M - N)
        return torch.cat([drive0.view(K, B, T, N), rest], -1)

    def scaled_recurrent(self) -> torch.Tensor:
        """``Wr`` such that the state-dependent drive is ``Y @ Wr`` (K, M_send, M_recv)."""
        p = self._pass or {}
        W = p["W_rec"].transpose(1, 2) if "W_rec" in p else (self.W_rec * self.mask).transpose(1, 2)
        sigma = p.get("sigma", self.sigma)
        return W * self.S.view(self.K, 1, 1) * sigma.view(self.K, 1, self.M)

    def forward(
        self, u: torch.Tensor, state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        """Integrate the network over the input sequence.

        Returns the state of every neuron at the end of every input point, ``(K, B, T, M)``,
        and the final state (pass it back in to continue, as truncated BPTT does).
        """
        B = u.shape[-3]
        if state is None:
            state = self.initial_state(B)
        C = self.constant_drive(u)
        dyn = self.dynamics()
        run = get_engine(self.engine)  # hil.network.engine.ENGINES: "fast", "reference"
        xseq, xf, yf = run(C, self.scaled_recurrent(), state.x, state.y, dyn, self.layer_slices())
        return xseq, State(xf, yf)

    def readout(self, xseq: torch.Tensor) -> torch.Tensor:
        """Linear readout of the last layer: ``(K, B, T, M) -> (K, B, T, n_out)``."""
        states = xseq[..., self.M - self.N :]
        noise = (self._pass or {}).get("readout_noise", 0.0)
        if noise > 0:  # a hardware-aware pass: the measured states carry readout noise
            gens = self._pass["gens"]
            states = states + noise * torch.stack(
                [torch.randn(tuple(states.shape[1:]), generator=g) for g in gens]).to(states)
        last = self.output_of(states)
        return torch.matmul(last, self.W_out.transpose(1, 2).unsqueeze(1)) + self.b_out.view(
            self.K, 1, 1, self.n_out
        )

    # ------------------------------------------------------------------ training helpers
    @torch.no_grad()
    def clip_parameters(self) -> None:
        """Clip weights to ±w_clip and biases to ±b_clip (thesis 6.7.2), keep masks exact."""
        wc = self.w_clip
        self.W_in.copy_(torch.maximum(torch.minimum(self.W_in, wc), -wc))
        self.W_rec.copy_(torch.maximum(torch.minimum(self.W_rec, wc), -wc) * self.mask)
        bc = self.b_clip
        self.bias.copy_(torch.maximum(torch.minimum(self.bias, bc), -bc))

    def trainable(self) -> list[nn.Parameter]:
        return [self.W_in, self.W_rec, self.bias, self.W_out, self.b_out]

    def layer_weights(self, k: int = 0) -> list[dict[str, torch.Tensor]]:
        """Per-layer ``W_ext``, ``W_int`` and ``b`` of trial ``k`` (what gets uploaded)."""
        out = []
        sl = self.layer_slices()
        W = (self.W_rec * self.mask)[k].detach()
        for li, s in enumerate(sl):
            w_ext = self.W_in[k].detach() if li == 0 else W[s, sl[li - 1]]
            out.append({"W_ext": w_ext.clone(), "W_int": W[s, s].clone(),
                        "b": self.bias[k, s].detach().clone()})
        return out


def _uniform(shape: tuple[int, ...], a: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=g) * 2 - 1) * a
