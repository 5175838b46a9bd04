"""One program per bench: exclusive locks on instrument addresses and on run folders.

``BenchLock(key, what)`` takes an exclusive ``flock`` on a lock file named after ``key`` (a
resource address, or a run folder's ``.lock``) and writes who holds it: pid, command line and
since when. A second program asking for the same key gets ``LockedError`` naming that holder,
before it has opened or sent anything. The operating system drops the lock when the holder
ends, however it ends (a crash or ``kill -9`` included), so a lock never outlives its program.

Within one program a key may be taken again (a count is kept): the lock is per program, as
the rule is "one program per bench", not one object per instrument.

Address locks live in ``$HIL_LOCK_DIR`` (default ``<temp dir>/hil-locks``), which every
program driving the bench must share (one machine).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from hil.errors import HilError

#: Lock files held by this program: path -> (open file, count).
_HELD: dict[Path, list[Any]] = {}


class LockedError(HilError):
    """Another program holds the lock; nothing was opened or sent."""


def lock_dir() -> Path:
    """Where address locks live: ``$HIL_LOCK_DIR`` or ``<temp dir>/hil-locks``."""
    return Path(os.environ.get("HIL_LOCK_DIR") or Path(tempfile.gettempdir()) / "hil-locks")


def address_lock_path(address: str) -> Path:
    """The lock file of a (canonical) resource address."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", address).strip("_") or "address"
    return lock_dir() / f"{name}.lock"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another program (holder unknown)"
    return (f"pid {info.get('pid', '?')} ({info.get('command', '?')}) since "
            f"{info.get('since', '?')}")


class BenchLock:
    """An exclusive, per-program lock on ``path``; ``what`` names it in messages."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._held = False

    def acquire(self) -> BenchLock:
        """Take the lock or raise ``LockedError`` naming the holder."""
        if self._held:
            return self
        held = _HELD.get(self.path)
        if held is not None:
            held[1] += 1
            self._held = True
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")  # noqa: SIM115 (kept open while the lock is held)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise LockedError(f"{self.what} is in use by {_holder(self.path)}; this program "
                              f"touched nothing (lock file {self.path})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv) or "python",
                             "since": dt.datetime.now().isoformat(timespec="seconds")}))
        fh.flush()
        _HELD[self.path] = [fh, 1]
        self._held = True
        return self

    def release(self) -> None:
        """Give the lock back (the file stays; an unlocked file means a free bench)."""
        if not self._held:
            return
        self._held = False
        held = _HELD.get(self.path)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.path]
            fh = held[0]
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def __enter__(self) -> BenchLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
