"""Termination signals unwind like Ctrl-C, so every way of ending a program makes the bench safe.

SIGTERM (``kill``, a job scheduler) and SIGHUP (the terminal closed) raise :class:`Terminated`,
a ``KeyboardInterrupt``: every open ``Lab`` and driver ``with`` block closes (RF off, DC
outputs to 0, stages stopped). A second signal during that shutdown is ignored. Used by the
command line and by the search's worker processes."""

from __future__ import annotations

import signal
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwound like Ctrl-C, so the same safe shutdown runs."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _terminate(signum: int, frame: FrameType | None) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # let the shutdown finish
    raise Terminated(signum)


def install_termination_handlers() -> None:
    """SIGTERM and SIGHUP unwind the program like Ctrl-C (main thread only)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
