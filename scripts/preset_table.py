"""Recompute the README's preset table ("Presets and what they measured") at full size.

Trains every preset as it ships on the seeds the table quotes (10; ``flipflop`` 3), and prints
each row's test metric under the training integrator and under a converged solution of the same
ODE beside the README's figures; exits 1 when a figure moved by more than ``--tolerance`` points.
Minutes to an hour per preset on a 2-core CPU (``flipflop`` ~65 min): a benchmark, not a test;
``tests/test_preset_claims.py`` checks each recipe at reduced size in CI.

    .venv/bin/python scripts/preset_table.py [--presets digits,sine_square] [--runs-dir runs]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hil.api import train  # noqa: E402
from hil.config import load_config  # noqa: E402

SEEDS = {"flipflop": list(range(3))}
ROW = re.compile(r"^\| `(?P<preset>\w+)` \|[^|]*\| (?P<trained>[\d.]+) % \| (?P<converged>[\d.]+) %")


def readme_rows() -> dict[str, tuple[float, float]]:
    """The README's preset table: preset -> (in training, converged), in percent."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Presets and what they measured", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            rows[m["preset"]] = (float(m["trained"]), float(m["converged"]))
    return rows


def main() -> int:
    quoted = readme_rows()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default=",".join(quoted), help="comma-separated (default: every row)")
    p.add_argument("--runs-dir", default="runs", help="where the run folders go")
    p.add_argument("--tolerance", type=float, default=1.0, help="points a figure may move")
    args = p.parse_args()
    out = ["| preset | seeds | in training | converged ODE | README | moved (points) | wall time |",
           "|---|---|---|---|---|---|---|"]
    moved_too_far = []
    for preset in args.presets.split(","):
        seeds = SEEDS.get(preset, list(range(10)))
        t0 = time.perf_counter()
        s = train(load_config(preset=preset, seeds=seeds), runs_dir=args.runs_dir).summary
        wall = time.perf_counter() - t0
        trained = 100 * s["test"]["median"]
        converged = 100 * s["convergence"]["test_reference"]["median"]
        ref = quoted.get(preset)
        moved = None if ref is None else max(abs(trained - ref[0]), abs(converged - ref[1]))
        if moved is not None and moved > args.tolerance:
            moved_too_far.append(preset)
        out.append(f"| `{preset}` | {len(seeds)} | {trained:.2f} % | {converged:.2f} % | "
                   + (f"{ref[0]:.2f} / {ref[1]:.2f} % | {moved:.2f}" if ref else "- | -")
                   + f" | {wall / 60:.1f} min |")
        print(out[-1], flush=True)
    print("\n".join(out))
    if moved_too_far:
        print(f"moved by more than {args.tolerance} points: {', '.join(moved_too_far)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
