"""Cost and accuracy of the training integrators on the digits network (issue 16).

The shipped presets used to train through explicit Euler at 4 sub-steps per input point, and
learned to exploit its error. This benchmark measures, in one run on one machine, what a
converged integrator costs against that engine:

* time of one real training update of :class:`hil.training.train.Trainer` (forward, loss, backward,
  clipping, Adam) on a fixed batch of the digits preset, for ``K`` seeds at once, every
  integrator interleaved round by round (machine load hits all alike), native kernel;
* the integrator's error: mean and largest state difference from a converged solution of the
  same ODE (exponential Heun at 64 sub-steps per point) on the same parameters and batch.

    python benchmarks/bench_integrators.py                       # 10 seeds, 5 rounds
    python benchmarks/bench_integrators.py --seeds 1 --threads 1 --rounds 3
    python benchmarks/bench_integrators.py --schemes euler:4,expheun:2 --json out.json

The row marked ``baseline`` is the old engine (``euler:4``); ``ratio`` is each median time
over the baseline's.
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
from hil.network.tasks import SequentialDigits  # noqa: E402
from hil.training.convergence import step_error  # noqa: E402
from hil.training.train import Trainer  # noqa: E402

BASELINE = "euler:4"


def parse_schemes(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        name, _, n = item.strip().partition(":")
        if name not in engine.SCHEMES or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--schemes: {item!r} is not SCHEME:SUBSTEPS with SCHEME in "
                             f"{', '.join(engine.SCHEMES)}")
        out.append((name, int(n)))
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default=f"{BASELINE},expheun:2,expheun:3,euler:16",
                   help="SCHEME:SUBSTEPS list; the first is the baseline of the ratios")
    p.add_argument("--seeds", type=int, default=10, help="trials trained at once")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    schemes = parse_schemes(args.schemes)
    if engine.native_library() is None:
        print("note: native kernel unavailable; timing the torch back end", file=sys.stderr)
    cfg = load_config(preset="digits")
    task = SequentialDigits(cfg.task)
    data = task.splits["train"]
    K = args.seeds
    g = torch.Generator().manual_seed(1234)
    idx = torch.stack([torch.randperm(len(data), generator=g)[: cfg.train.batch_size] for _ in range(K)])
    x, y = data.x[idx], data.y[idx]
    trainers = []
    for name, n in schemes:
        cfg.model.integrator, cfg.model.substeps = name, n
        trainers.append(Trainer([cfg.model] * K, [cfg.train] * K, list(range(K)), task, progress=False))
    times: list[list[float]] = [[] for _ in schemes]
    errors = [step_error(tr.net, x[0]) for tr in trainers]  # before any update: same parameters
    for tr in trainers:  # warm-up: kernel build, allocator
        tr._update(x, y, epoch=0)
    for _ in range(args.rounds):
        for i, tr in enumerate(trainers):
            t0 = time.perf_counter()
            tr._update(x, y, epoch=0)
            times[i].append(time.perf_counter() - t0)
    base = statistics.median(times[0])
    rows = []
    for (name, n), ts, err in zip(schemes, times, errors, strict=True):
        med = statistics.median(ts)
        rows.append({"integrator": name, "substeps": n, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                     "ratio": med / base, "mean_abs_state_error": err["mean_abs_state_error"],
                     "max_abs_state_error": err["max_abs_state_error"]})
    print(f"digits preset network, {K} seed(s), batch {cfg.train.batch_size}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} thread(s); state error against expheun at 64 sub-steps")
    print(f"{'integrator':>12} {'substeps':>8} {'median s':>9} {'min s':>8} {'max s':>8} {'ratio':>6} "
          f"{'mean |dx|':>10} {'max |dx|':>9}")
    for i, r in enumerate(rows):
        print(f"{r['integrator']:>12} {r['substeps']:>8} {r['median_s']:>9.4f} {r['min_s']:>8.4f} "
              f"{r['max_s']:>8.4f} {r['ratio']:>6.2f} {r['mean_abs_state_error']:>10.2e} "
              f"{r['max_abs_state_error']:>9.2e}" + ("  baseline" if i == 0 else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
