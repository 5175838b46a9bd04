"""Training throughput of the time-integration engines on the digits network (issue 3).

One run, one machine, every implementation interleaved round by round (so that a change of
machine load hits all of them alike). Each timed unit is one real training update of
:class:`hil.training.train.Trainer` (forward, loss, backward, gradient clipping, Adam, weight clipping)
on a fixed batch of the sequential-digits task, for ``K`` trials (seeds) at once:

* ``fast``        the fast engine, :class:`hil.network.engine.EulerScan` (native back end on CPU);
* ``fast-torch``  the same engine forced onto its torch back end (the GPU / no-compiler path);
* ``loop``        the straightforward autograd loop over points, sub-steps and layers
                  (:func:`hil.network.engine.scan_reference`);
* ``torchdiffeq`` ``torchdiffeq.odeint(method="euler", step_size=h)`` on the same ODE (state
                  and high-pass filter as one system, input held constant over each point, the
                  time looked up per step), gradients by autograd through the solver.

It prints a table: median wall time per update over the rounds (with min and max), throughput
in sample-steps per second (trials x batch x input points per second), speed-up of the fast
engine, peak memory of one update, and how far each implementation's loss and gradients are
from the fast engine's on the same parameters and batch.

    python benchmarks/bench_engine.py                  # the 3x32 digits network, 1 and 10 seeds
    python benchmarks/bench_engine.py --threads 1
    python benchmarks/bench_engine.py --seeds 1,2 --batch 8 --points 6 --hidden 4 --rounds 2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hil.config import RunConfig, load_config  # noqa: E402
from hil.network import engine  # noqa: E402
from hil.network.model import DynamicalNetwork, State  # noqa: E402
from hil.network.tasks import SequentialDigits  # noqa: E402
from hil.training.train import Trainer  # noqa: E402
from sims.neurons import NEURON_TYPES  # noqa: E402

IMPLS = ("fast", "fast-torch", "loop", "torchdiffeq")


# ---------------------------------------------------------------------------- torchdiffeq
def torchdiffeq_forward(net: DynamicalNetwork, u: torch.Tensor, state: State | None = None
                        ) -> tuple[torch.Tensor, State]:
    """:meth:`DynamicalNetwork.forward` by ``torchdiffeq.odeint`` with fixed-step Euler.

    The state ``x`` and the filtered output ``y`` form one ODE system; with the high-pass
    filter ``dy/dt = dx/dt - 2 pi f_cut y`` (whose Euler step is exactly the engine's
    ``y <- a y + x_{s+1} - x_s``), without it ``y = x``. The drive of input point ``t`` holds
    over ``[t dt, (t+1) dt)``: the right-hand side looks it up from the step's start time.
    The CTRNN (``dx/dt = -gamma x + I``, output ``tanh x``) is supported without the filter.
    """
    from torchdiffeq import odeint

    if net.kind not in ("spintronic", "ctrnn"):
        raise ValueError("the torchdiffeq baseline implements the spintronic and CTRNN neurons")
    if net.kind == "ctrnn" and net.highpass:
        raise ValueError("the torchdiffeq baseline has no high-pass filter for the CTRNN")
    B = u.shape[-3]
    if state is None:
        state = net.initial_state(B)
    C = net.constant_drive(u)
    Wr = net.scaled_recurrent()
    dyn = net.dynamics()
    T = C.shape[2]
    h, S = dyn.h, dyn.substeps
    gamma, q = dyn.gamma, dyn.q

    def point(t: torch.Tensor) -> int:
        return min(int(round(float(t) / h)) // S, T - 1)

    def rhs_x(t: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        drive = C[:, :, point(t)] + torch.bmm(y, Wr)
        if net.kind == "ctrnn":
            return -gamma * x + drive
        damping = gamma * x * (1 + q * x) if q is not None else gamma * x
        return -damping + drive * x * (1 - x)

    times = torch.arange(T + 1, dtype=torch.float64) * (S * h)
    opts = {"step_size": h}
    if dyn.a is not None:
        leak = (1 - dyn.a) / h  # 2 pi f_cut, per trial

        def func(t: torch.Tensor, z: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            fx = rhs_x(t, z[0], z[1])
            return fx, fx - leak * z[1]

        xs, ys = odeint(func, (state.x, state.y), times, method="euler", options=opts)
        xf, yf = xs[-1], ys[-1]
    else:
        xs = odeint(lambda t, x: rhs_x(t, x, net.output_of(x)), state.x, times, method="euler",
                    options=opts)
        xf = yf = xs[-1]
    return xs[1:].permute(1, 2, 0, 3), State(xf, yf)


# ---------------------------------------------------------------------------- setup
@dataclass
class Case:
    impl: str
    K: int
    trainer: Trainer
    x: torch.Tensor
    y: torch.Tensor
    times: list[float] = field(default_factory=list)
    peak_mb: float | None = None
    loss_diff: float | None = None
    grad_diff: float | None = None
    state_diff: float | None = None


def run_config(args: argparse.Namespace) -> RunConfig:
    cfg = load_config(preset="digits")
    cfg.model.neuron = args.neuron
    cfg.model.n_hidden = args.hidden
    cfg.model.n_layers = args.layers
    cfg.model.substeps = args.substeps
    # the implementations compared (and torchdiffeq's fixed-step Euler) integrate the same
    # recursion: explicit Euler unless asked otherwise (benchmarks/bench_integrators.py
    # compares the integrators themselves)
    cfg.model.integrator = args.integrator
    cfg.model.thermal_d_ghz = 0.0
    cfg.train.batch_size = args.batch
    return cfg


def make_case(impl: str, K: int, cfg: RunConfig, task: SequentialDigits, points: int) -> Case:
    tr = Trainer([cfg.model] * K, [cfg.train] * K, list(range(K)), task, progress=False)
    tr.net.engine = "reference" if impl == "loop" else "fast"
    if impl == "torchdiffeq":
        tr.net.forward = lambda u, state=None, net=tr.net: torchdiffeq_forward(net, u, state)
    data = task.splits["train"]
    g = torch.Generator().manual_seed(1234)
    idx = torch.stack([torch.randperm(len(data), generator=g)[: cfg.train.batch_size]
                       for _ in range(K)])  # the same batch for every implementation
    x = data.x[idx][:, :, -points:]  # with fewer points: the digit's bottom rows
    return Case(impl, K, tr, x, data.y[idx])


def native_setting(impl: str) -> bool:
    return impl != "fast-torch"


def update(case: Case) -> None:
    """One training update, the unit being timed."""
    engine.set_native(native_setting(case.impl))
    case.trainer._update(case.x, case.y, epoch=0)


def loss_and_grads(case: Case) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Per-trial loss, parameter gradients and states at the case's current parameters."""
    engine.set_native(native_setting(case.impl))
    net, task = case.trainer.net, case.trainer.task
    for p in net.trainable():
        p.grad = None
    xseq, _ = net(case.x)
    losses = task.loss(net.readout(xseq[:, :, -1:]), case.y)
    losses.sum().backward()
    return losses.detach(), [p.grad.detach().clone() for p in net.trainable()], xseq.detach()


def compare(cases: list[Case]) -> None:
    """Loss and gradients of every implementation against the fast engine's, on identical
    parameters and batch (before any update)."""
    by_k: dict[int, list[Case]] = {}
    for c in cases:
        by_k.setdefault(c.K, []).append(c)
    for group in by_k.values():
        results = {c.impl: loss_and_grads(c) for c in group}
        ref_loss, ref_grads, ref_x = results["fast"] if "fast" in results else results[group[0].impl]
        for c in group:
            loss, grads, x = results[c.impl]
            c.state_diff = float((x - ref_x).abs().max())
            c.loss_diff = float(((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30)).max())
            c.grad_diff = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))
                              for g, r in zip(grads, ref_grads, strict=True))


# ---------------------------------------------------------------------------- memory
_libc: ctypes.CDLL | None = None


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_memory_mb(fn: Callable[[], None]) -> float | None:
    """Peak memory one call of ``fn`` adds on top of what was live before it: the peak resident
    set (VmHWM, reset through /proc/self/clear_refs) above the resident set after freeing
    (gc, malloc_trim). Linux only; None elsewhere."""
    global _libc
    gc.collect()
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _status_mb("VmRSS")
    fn()
    peak = _status_mb("VmHWM")
    return None if base is None or peak is None else peak - base


# ---------------------------------------------------------------------------- report
def table(cases: list[Case], batch: int, points: int) -> list[dict[str, Any]]:
    rows = []
    med = {(c.impl, c.K): statistics.median(c.times) for c in cases}
    for c in cases:
        m = med[(c.impl, c.K)]
        row: dict[str, Any] = {
            "impl": c.impl, "seeds": c.K, "median_ms": 1e3 * m, "min_ms": 1e3 * min(c.times),
            "max_ms": 1e3 * max(c.times), "sample_steps_per_s": c.K * batch * points / m,
            "peak_mb": c.peak_mb, "loss_rel_diff": c.loss_diff, "grad_rel_diff": c.grad_diff,
            "state_diff": c.state_diff,
            "rounds": len(c.times),
        }
        fast = med.get(("fast", c.K))
        row["fast_speedup"] = m / fast if fast else None
        rows.append(row)
    return rows


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    print(header)
    cols = (f"{'implementation':<12} {'seeds':>5} {'median ms':>10} {'min ms':>9} {'max ms':>9} "
            f"{'sample-steps/s':>15} {'fast x':>7} {'peak MB':>8} {'loss rel.diff':>13} "
            f"{'grad rel.diff':>13} {'state diff':>10}")
    print(cols)
    print("-" * len(cols))
    for r in rows:
        print(f"{r['impl']:<12} {r['seeds']:>5} {r['median_ms']:>10.1f} {r['min_ms']:>9.1f} "
              f"{r['max_ms']:>9.1f} {r['sample_steps_per_s']:>15,.0f} "
              f"{fmt(r['fast_speedup'], '.1f'):>7} {fmt(r['peak_mb'], '.0f'):>8} "
              f"{fmt(r['loss_rel_diff'], '.1e'):>13} {fmt(r['grad_rel_diff'], '.1e'):>13} "
              f"{fmt(r['state_diff'], '.1e'):>10}")
    ks = sorted({r["seeds"] for r in rows})
    if len(ks) > 1:
        lo, hi = ks[0], ks[-1]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            a = next((r for r in rows if r["impl"] == impl and r["seeds"] == lo), None)
            b = next((r for r in rows if r["impl"] == impl and r["seeds"] == hi), None)
            if a and b:
                print(f"{impl}: {hi} seeds at once take {b['median_ms'] / a['median_ms']:.2f}x the "
                      f"wall time of {lo} (per seed: {b['median_ms'] / hi:.1f} ms vs "
                      f"{a['median_ms'] / lo:.1f} ms)")


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,10", help="trial counts to run at once (default 1,10)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--rounds", type=int, default=5, help="timed updates per implementation")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--batch", type=int, default=120)
    p.add_argument("--points", type=int, default=64, help="input points per sample (max 64)")
    p.add_argument("--neuron", default="spintronic", choices=NEURON_TYPES,
                   help="neuron type (default spintronic; ctrnn exercises the tanh output)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--substeps", type=int, default=4)
    p.add_argument("--integrator", default="euler", choices=engine.SCHEMES,
                   help="integration scheme (torchdiffeq's baseline is Euler: compare it with euler)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"unknown implementation {i!r}; allowed: {', '.join(IMPLS)}")
    ks = [int(k) for k in args.seeds.split(",")]
    if not 1 <= args.points <= 64:
        raise SystemExit("--points must be within 1..64")
    cfg = run_config(args)
    task = SequentialDigits(cfg.task)
    info = machine()
    native = engine.native_library() is not None
    cases = [make_case(i, k, cfg, task, args.points) for k in ks for i in impls]
    compare(cases)
    for c in cases:  # warm-up (first-call costs: kernel build, allocator, caches)
        update(c)
    for _ in range(args.rounds):
        for c in cases:
            t0 = time.perf_counter()
            update(c)
            c.times.append(time.perf_counter() - t0)
    if not args.no_memory:
        for c in cases:
            c.peak_mb = peak_memory_mb(lambda c=c: update(c))
    engine.set_native(True)
    rows = table(cases, args.batch, args.points)
    info["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    m = cfg.model
    header = (f"digits network {m.n_layers}x{m.n_hidden} {m.neuron}, batch {args.batch}, "
              f"{args.points} input points x {m.substeps} Euler sub-steps, training update = "
              f"forward + backward + Adam; {args.rounds} rounds, interleaved\n"
              f"CPU: {info['cpu']}, {info['cores']} cores; torch {info['torch']} "
              f"with {info['torch_threads']} threads, native kernel: {'yes' if native else 'no'}, "
              f"load average {info['load_avg']} -> {info['load_avg_end']}")
    print_table(rows, header)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows},
                                              indent=1))
    return rows


if __name__ == "__main__":
    main()
