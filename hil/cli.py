"""The ``hil`` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module exposing ``register(subparsers)``; the module's
handler receives the parsed arguments and returns an exit code.

Every way of ending the program makes the bench safe the same way: SIGTERM (``kill``, a job
scheduler) and SIGHUP (the terminal closed) raise ``Terminated``, a ``KeyboardInterrupt``, so
they take exactly the path of Ctrl-C: every open ``Lab`` and driver ``with`` block closes,
which switches RF off, sets DC outputs to 0, stops the stages and closes the instruments. A
second SIGTERM/SIGHUP during that shutdown is ignored, so it cannot cut the shutdown short.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import sys
from collections.abc import Iterator
from typing import Any

from hil import __version__
from hil.errors import HilError
from hil.termination import Terminated, install_termination_handlers
from sims.schema import ConfigError as SchemaConfigError

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
    "hil.commands.runs",
    "hil.commands.lab",
)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that knows whether it ends a command line: the parsers made by its
    sub-commands are of the same class (``add_subparsers(parser_class=...)``), so the leaves can
    be found without argparse's private attributes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.children: list[_Parser] = []
        self.is_leaf = True

    def add_subparsers(self, **kwargs: Any) -> Any:
        self.is_leaf = False
        action = super().add_subparsers(parser_class=_Parser, **kwargs)
        add_parser = action.add_parser

        def add(name: str, **kw: Any) -> _Parser:
            child = add_parser(name, **kw)
            self.children.append(child)
            return child

        action.add_parser = add  # the public method, wrapped to remember the child
        return action


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hil",
        description="Hardware-in-the-loop training for spintronic neural networks.",
    )
    parser.add_argument("--version", action="version", version=f"hil {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    _add_output_options(parser, top=True)
    for leaf in _leaf_parsers(parser):
        _add_output_options(leaf, top=False)
    return parser


def _leaf_parsers(parser: _Parser) -> Iterator[_Parser]:
    """The parsers that end a command line (``hil train``, ``hil lab check``, ...)."""
    for child in parser.children:
        yield from ([child] if child.is_leaf else _leaf_parsers(child))


def _add_output_options(p: argparse.ArgumentParser, top: bool) -> None:
    """-v, --log-level, --json and --log, accepted before or after the command's name."""
    from hil.logs import LEVELS
    from hil.viewers import VIEWERS

    def default(value: Any) -> Any:  # on a command, an absent option keeps the top level's value
        return value if top else argparse.SUPPRESS

    g = p.add_argument_group("output and logging")
    g.add_argument("-v", "--verbose", action="count", default=default(0),
                   help="show hil's debug messages, instrument traffic included, on the terminal "
                   "(they always go to hil.log in the run folder)")
    g.add_argument("--log-level", type=str.upper, choices=LEVELS, default=default(None),
                   help="lowest level of messages on the terminal (default WARNING)")
    g.add_argument("--json", action="store_true", default=default(False),
                   help="print one JSON object on stdout (command, exit code, run folder, summary); "
                   "the human-readable text goes to stderr")
    g.add_argument("--log", action="append", choices=VIEWERS, default=default(None), metavar="VIEWER",
                   help="also write every metric for a viewer: tensorboard (event files in "
                   "<run folder>/tensorboard; pip install 'hil[tensorboard]')")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    install_termination_handlers()
    from hil.logs import cli_session, console_level

    stdout = sys.stdout
    level = console_level(args.verbose, args.log_level)
    with cli_session(level, list(dict.fromkeys(args.log or []))) as folders:
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            rc = _dispatch(args)
    if args.json:
        print(json.dumps(_result(args, rc, folders), default=str), file=stdout, flush=True)
    return rc


def _result(args: argparse.Namespace, rc: int, folders: list[Any]) -> dict[str, Any]:
    """``--json``: what the command did, for scripts."""
    out: dict[str, Any] = {"command": args.command, "exit_code": rc}
    if getattr(args, "error", None):
        out["error"] = args.error
    folders = [f for f in folders if f.path.is_dir()]  # a folder of a refused run is removed
    if folders:
        out["run_folder"] = str(folders[0].path)
        for name in ("summary.json", "tune_summary.json"):
            path = folders[0].path / name
            if path.is_file():
                out["summary"] = json.loads(path.read_text())
                break
    return out


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command; errors the user can act on become one line on stderr (exit code 2).

    Every run folder the command opens records its status (``status.json``: running, then
    complete, failed or interrupted, with the reason); a folder made for a run that was refused
    before its work started is removed."""
    from hil.runs import finish, redact_secrets, tracked

    folders: list[Any] = []
    try:
        with tracked(folders):
            rc = _call(args)
            if rc:
                finish(folders, "failed", getattr(args, "failure", None) or f"exit code {rc}")
            return rc
    except (HilError, SchemaConfigError) as exc:  # also a world file's or a chip setting's
        return _fail(args, redact_secrets(str(exc)), exc)
    except ImportError as exc:  # an optional package: name the extra; anything else is a bug
        from hil.extras import hint

        extra = hint(exc)
        if extra is None:
            raise
        return _fail(args, extra, None)
    except KeyboardInterrupt as exc:
        how = signal.Signals(exc.signum).name if isinstance(exc, Terminated) else "interrupted"
        print(f"hil {args.command}: {how}; instruments made safe; partial results are in the "
              "run folder.", file=sys.stderr)
        _resume_hint(args, folders)
        return 128 + exc.signum if isinstance(exc, Terminated) else 130


def _resume_hint(args: argparse.Namespace, folders: list[Any]) -> None:
    """After an interrupted ``hil train``: how to continue it, or why it cannot be."""
    from hil.training.checkpoints import CHECKPOINT_FILE

    for folder in folders[:1]:  # the command's own run folder (an upload's sub-folder is not trained)
        if (folder.path / CHECKPOINT_FILE).is_file():
            print(f"hil {args.command}: the weights, optimiser and random state of the last finished "
                  f"epoch are in {folder.path / CHECKPOINT_FILE}; continue with: hil train --resume "
                  f"{folder.path}", file=sys.stderr)
        elif args.command == "train" and not getattr(args, "in_the_loop", False) and \
                not (folder.path / "model.pt").is_file():
            print(f"hil {args.command}: no epoch had finished: no checkpoint to resume from, "
                  "run it again", file=sys.stderr)


def _call(args: argparse.Namespace) -> int:
    """The command itself; an instrument's refusal (a driver ``LimitError``: a value outside its
    safety limits, refused before anything was sent) becomes a :class:`HilError`, since the
    drivers do not import hil."""
    from drivers.base import LimitError, OptionError
    from hil.viewers import check_viewers

    check_viewers(args.log or [])
    try:
        return int(args.func(args) or 0)
    except (LimitError, OptionError) as exc:
        raise HilError(f"instrument refused: {exc}") from exc


def _fail(args: argparse.Namespace, message: str, exc: BaseException | None) -> int:
    from hil.extras import hint

    extra = hint(exc) if exc is not None else None
    if extra and "pip install" not in message:
        message += f" ({extra})"
    args.error = message
    print(f"hil {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
