"""What flush-to-zero in the native kernel buys: forward + backward of a trained network with
the kernel's default (subnormals flushed to 0) against the same kernel in the caller's
floating-point mode (subnormals computed, as a plain implementation does), in one run.

A spintronic neuron without drive decays towards its fixed point x = 0, and its adjoint with
it. Without the high-pass filter (the flip-flop preset) trained networks have such neurons;
in float32 their values cross into the subnormal range, where x86 cores take a microcode
assist on every operation. The network is first trained for ``--warmup-epochs`` with the
default kernel (untimed) so that it has them; then both modes run on the same parameters and
batch, interleaved round by round.

    python benchmarks/bench_subnormals.py                      # flip-flop preset, 1 seed
    python benchmarks/bench_subnormals.py --seeds 3 --rounds 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hil.config import load_config  # noqa: E402
from hil.network import engine  # noqa: E402
from hil.network.tasks import make_task  # noqa: E402
from hil.training.train import Trainer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flipflop")
    p.add_argument("--seeds", type=int, default=1, help="trials trained at once")
    p.add_argument("--warmup-epochs", type=int, default=30, help="untimed training first")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def forward_backward(tr: Trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One training pass without the optimiser step (the parameters stay as they are)."""
    for p in tr.net.trainable():
        p.grad = None
    xseq, _ = tr.net(x)
    out = tr.net.readout(xseq if tr.task.per_step else xseq[:, :, -1:])
    tr.task.loss(out, y).sum().backward()
    return xseq.detach()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if engine.native_library() is None:
        raise SystemExit("the native kernel is not available (no C++ compiler): nothing to measure")
    cfg = load_config(preset=args.preset)
    cfg.train.epochs = args.warmup_epochs
    task = make_task(cfg.task, cfg.train.output_gain)
    seeds = list(range(args.seeds))
    tr = Trainer([cfg.model] * args.seeds, [cfg.train] * args.seeds, seeds, task, progress=False)
    t0 = time.perf_counter()
    if args.warmup_epochs > 0:
        tr.fit()
    warm_s = time.perf_counter() - t0
    data = task.splits["train"]
    n = min(len(data), cfg.train.batch_size)
    x, y = data.x[:n].unsqueeze(0).expand(args.seeds, *data.x[:n].shape), data.y[:n]
    y = y.unsqueeze(0).expand(args.seeds, *y.shape)
    times: dict[str, list[float]] = {"flush": [], "subnormal": []}
    states: dict[str, torch.Tensor] = {}
    previous = engine.set_flush_subnormals(True)
    try:
        for r in range(args.rounds + 1):  # round 0: warm-up, not timed
            for mode in times:
                engine.set_flush_subnormals(mode == "flush")
                t0 = time.perf_counter()
                states[mode] = forward_backward(tr, x, y)
                if r > 0:
                    times[mode].append(time.perf_counter() - t0)
    finally:
        engine.set_flush_subnormals(previous)
    tiny = torch.finfo(states["subnormal"].dtype).tiny
    sub = states["subnormal"]
    med = {m: statistics.median(t) * 1000 for m, t in times.items()}
    res = {
        "preset": args.preset, "seeds": args.seeds, "batch": n, "warmup_epochs": args.warmup_epochs,
        "warmup_s": warm_s, "rounds": args.rounds, "threads": args.threads,
        "median_ms": med, "min_ms": {m: min(t) * 1000 for m, t in times.items()},
        "max_ms": {m: max(t) * 1000 for m, t in times.items()},
        "slowdown_without_flush": med["subnormal"] / med["flush"],
        "subnormal_state_fraction": ((sub != 0) & (sub.abs() < tiny)).float().mean().item(),
        "zero_state_fraction_with_flush": (states["flush"] == 0).float().mean().item(),
        "max_state_diff": (states["flush"] - sub).abs().max().item(),
    }
    print(f"{args.preset}: {args.seeds} seed(s), batch {n}, after {args.warmup_epochs} training "
          f"epochs ({warm_s:.1f} s); forward + backward, {args.rounds} rounds, interleaved, "
          f"{args.threads} thread(s)")
    for m in times:
        print(f"  {m:<10} median {med[m]:8.1f} ms  (min {res['min_ms'][m]:.1f}, max "
              f"{res['max_ms'][m]:.1f})")
    print(f"  without flush-to-zero: {res['slowdown_without_flush']:.1f}x the time; "
          f"{100 * res['subnormal_state_fraction']:.2f} % of the states are subnormal there "
          f"(flushed: {100 * res['zero_state_fraction_with_flush']:.2f} % exact zeros); "
          f"largest state difference {res['max_state_diff']:.2g}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
