"""Logging for the command line: the terminal, each run folder's ``hil.log``, metrics viewers.

Messages of hil's own packages (``hil``, ``drivers``, ``calibration``, ``sims``) down to DEBUG,
among them every instrument exchange the drivers log (``smb <- :FREQ 5e9``), go to ``hil.log``
in every run folder the command opens; the terminal shows WARNING and above, everything with
``-v`` (or the level of ``--log-level``). Other libraries log at WARNING and above only.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from hil.runs import RunFolder, add_folder_hook, redact_secrets

#: the packages whose loggers the command line opens down to DEBUG
PACKAGES = ("hil", "drivers", "calibration", "sims")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_NAME = "hil.log"


class RedactingFormatter(logging.Formatter):
    """A formatter that hides passwords of URLs (``postgresql://user:***@host/db``)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_secrets(super().format(record))


def console_level(verbose: int, log_level: str | None) -> int:
    """``--log-level`` if given, else DEBUG with ``-v``, else WARNING."""
    if log_level:
        return logging.getLevelName(log_level.upper())
    return logging.DEBUG if verbose else logging.WARNING


@contextmanager
def cli_session(level: int = logging.WARNING, viewers: Sequence[str] = ()) -> Iterator[list[RunFolder]]:
    """Install the command's log handlers and viewers for the duration of one command.

    Yields the list of run folders opened meanwhile (first: the command's own); every one gets a
    ``hil.log`` and the ``viewers`` sinks. Everything installed is removed on exit, so repeated
    commands in one process (tests, notebooks) do not stack handlers.
    """
    from hil.viewers import make_sinks

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    added: list[logging.Handler] = [console]
    root.addHandler(console)
    saved = {name: logging.getLogger(name).level for name in PACKAGES}
    for name in PACKAGES:
        logging.getLogger(name).setLevel(logging.DEBUG)
    folders: list[RunFolder] = []

    def attach(folder: RunFolder) -> None:
        folders.append(folder)
        handler = logging.FileHandler(folder.path / LOG_NAME, encoding="utf-8")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        added.append(handler)
        folder.sinks.extend(make_sinks(viewers, folder))

    remove = add_folder_hook(attach)
    try:
        yield folders
    finally:
        remove()
        for folder in folders:
            folder.close_sinks()
        for handler in added:
            root.removeHandler(handler)
            handler.close()
        for name, lv in saved.items():
            logging.getLogger(name).setLevel(lv)
