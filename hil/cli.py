"""The ``hil`` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``register(subparsers)``; the module's
handler receives the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from hil import __version__
from hil.errors import HilError

# Modules that add subcommands, in the order they appear in ``hil --help``.
COMMAND_MODULES = (
    "hil.commands.train",
    "hil.commands.tune",
    "hil.commands.design",
    "hil.commands.analyse",
    "hil.commands.upload",
    "hil.commands.study",
    "hil.commands.calibrate",
    "hil.commands.conv",
    "hil.lab",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hil",
        description="Hardware-in-the-loop training for spintronic neural networks.",
    )
    parser.add_argument("--version", action="version", version=f"hil {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HilError as exc:
        print(f"hil {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hil {args.command}: interrupted; partial results are in the run folder.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
