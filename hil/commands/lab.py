"""``hil lab check CONFIG``: open every instrument of a lab configuration and say who answered."""

from __future__ import annotations

import argparse
from typing import Any

from hil.bench.lab import check_lab, load_lab_config


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def run_check(args: argparse.Namespace) -> int:
    """``hil lab check CONFIG``: exit 0 if every instrument answered, 1 otherwise."""
    config = load_lab_config(args.config)
    results = check_lab(config)
    rows = [["ROLE", "INSTRUMENT", "MODEL", "IDENTITY", "ADDRESS", "STATUS"]]
    for r in results:
        rows.append([",".join(r.roles) or "-", r.instrument, r.model, r.identity or "-",
                     r.address, ("OK: " if r.ok else "") + r.status])
    print(f"{config.source}: {config.name or 'lab'}")
    if config.virtual is not None:
        seed = "world default" if config.virtual.seed is None else config.virtual.seed
        print(f"virtual lab: world {config.virtual.world}, seed {seed}")
    print(_table(rows))
    failed = [r.instrument for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} instrument(s) failed: {', '.join(failed)}")
        return 1
    print(f"all {len(results)} instrument(s) answered")
    return 0


def register(sub: Any) -> None:
    """Add ``hil lab check CONFIG`` to the ``hil`` command line."""
    p = sub.add_parser("lab", help="lab configuration: check the instruments of a bench")
    actions = p.add_subparsers(dest="lab_command", metavar="ACTION")
    actions.required = True
    check = actions.add_parser(
        "check", help="open every instrument of CONFIG, print role, model, identity, address "
                      "and status; exit code 1 if any fails")
    check.add_argument("config", help="lab configuration YAML (e.g. lab_configs/sim.yaml)")
    check.set_defaults(func=run_check)
