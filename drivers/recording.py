"""Record every exchange with every instrument; replay a recorded session to the drivers.

Recording wraps a driver's ``Transport`` in a ``RecordingTransport`` that appends one JSON
object per exchange to an ``ExchangeLog`` (a JSON-lines file opened in append mode and
flushed after every line, so a crash loses nothing already measured)::

    {"session": "3f2a...", "seq": 17, "instrument": "rf_source", "address": "GPIB0::28::INSTR",
     "op": "query", "command": "SOUR:FREQ?", "reply": "2000000000.000", "error": null,
     "message": null, "timeout_ms": 3000.0, "t_start": 1732611234.120431,
     "t_end": 1732611234.121902}

``op`` is one of ``write``, ``query``, ``write_raw`` (command = data as hex), ``read_raw``
(command = byte count, reply = hex), ``clear`` (device clear, after a failed exchange) and
``close``; ``error`` is ``"timeout"`` or
``"connection"`` when the exchange failed (``message`` then holds the text). Times are Unix
seconds; ``timeout_ms`` is the I/O timeout in force (the replay reports the same one).

Replay: ``ReplaySession(path).transport(name)`` gives a ``ReplayTransport`` that answers the
driver with the recorded replies, as long as the driver sends the recorded commands in the
recorded order (per instrument). The first different command raises ``ReplayDivergence``
showing the expected and the actual command; recorded timeouts are raised again as timeouts.

Imports nothing from the rest of the project.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from drivers.base import DriverError, Transport

T = TypeVar("T")

#: File name used for a run folder's instrument log.
LOG_NAME = "instrument_io.jsonl"


class ReplayDivergence(DriverError):
    """The replayed driver sent something other than what was recorded."""


class ExchangeLog:
    """Append-only JSON-lines log of one recording session (thread-safe).

    ``path=None`` keeps the entries in memory only (``entries``), which is handy as a spy.
    """

    def __init__(self, path: str | Path | None = None, *, session: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.session = session or uuid.uuid4().hex[:12]
        self.entries: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._seq = 0
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")

    def append(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            record = {"session": self.session, "seq": self._seq, **entry}
            self.entries.append(record)
            if self._fh is not None:
                self._fh.write(json.dumps(record) + "\n")
                self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> ExchangeLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RecordingTransport:
    """A ``Transport`` that passes everything to ``inner`` and logs each exchange."""

    def __init__(self, inner: Transport, log: ExchangeLog, instrument: str) -> None:
        self.inner = inner
        self.log = log
        self.instrument = instrument

    @property
    def address(self) -> str:
        return self.inner.address

    @property
    def timeout_ms(self) -> float:
        return self.inner.timeout_ms

    @timeout_ms.setter
    def timeout_ms(self, value: float) -> None:
        self.inner.timeout_ms = value

    def _exchange(self, op: str, command: str, fn: Callable[[], T],
                  show: Callable[[T], str | None] = lambda r: None) -> T:
        entry: dict[str, Any] = {"instrument": self.instrument, "address": self.address,
                                 "op": op, "command": command, "reply": None, "error": None,
                                 "message": None, "timeout_ms": self.inner.timeout_ms,
                                 "t_start": time.time()}
        try:
            result = fn()
        except TimeoutError as exc:
            entry.update(error="timeout", message=str(exc), t_end=time.time())
            self.log.append(entry)
            raise
        except ConnectionError as exc:
            entry.update(error="connection", message=str(exc), t_end=time.time())
            self.log.append(entry)
            raise
        entry.update(reply=show(result), t_end=time.time())
        self.log.append(entry)
        return result

    def write(self, command: str) -> None:
        self._exchange("write", command, lambda: self.inner.write(command))

    def query(self, command: str) -> str:
        return self._exchange("query", command, lambda: self.inner.query(command),
                              lambda reply: reply)

    def write_raw(self, data: bytes) -> None:
        self._exchange("write_raw", data.hex(), lambda: self.inner.write_raw(data))

    def read_raw(self, size: int) -> bytes:
        return self._exchange("read_raw", str(size), lambda: self.inner.read_raw(size),
                              lambda reply: reply.hex())

    def clear(self) -> None:
        """Device clear, where the inner transport has one (else ``ConnectionError``)."""
        inner = getattr(self.inner, "clear", None)
        if inner is None:
            raise ConnectionError("this transport has no device clear")
        self._exchange("clear", "", inner)

    def close(self) -> None:
        self._exchange("close", "", self.inner.close)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """All entries of a JSON-lines instrument log; a corrupt line is reported by number."""
    path = Path(path)
    entries = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entry["op"], entry["command"], entry["instrument"]  # noqa: B018
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not an instrument log entry ({exc})") from exc
            entries.append(entry)
    return entries


class ReplaySession:
    """A recorded session, served back per instrument by ``transport(instrument)``."""

    def __init__(self, path: str | Path, *, session: str | None = None) -> None:
        self.path = Path(path)
        entries = read_log(self.path)
        sessions = list(dict.fromkeys(e.get("session") for e in entries))
        if session is None:
            if len(sessions) > 1:
                raise ValueError(f"{self.path} holds {len(sessions)} sessions "
                                 f"({', '.join(map(str, sessions))}); choose one with session=")
            session = sessions[0] if sessions else None
        elif session not in sessions:
            raise ValueError(f"{self.path} has no session {session!r}; it holds "
                             f"{', '.join(map(str, sessions)) or 'none'}")
        self.session = session
        self._streams: dict[str, deque[dict[str, Any]]] = {}
        for entry in entries:
            if entry.get("session") == session:
                self._streams.setdefault(entry["instrument"], deque()).append(entry)

    @property
    def instruments(self) -> list[str]:
        return list(self._streams)

    def transport(self, instrument: str, address: str | None = None) -> ReplayTransport:
        if instrument not in self._streams:
            raise ReplayDivergence(f"replay of {self.path}: no exchanges recorded for "
                                   f"{instrument!r}; recorded: {', '.join(self._streams)}")
        stream = self._streams[instrument]
        recorded_address = stream[0].get("address", "?") if stream else "?"
        return ReplayTransport(self, instrument, stream, address or recorded_address)

    def remaining(self) -> dict[str, int]:
        """Exchanges not yet replayed, per instrument."""
        return {name: len(stream) for name, stream in self._streams.items() if stream}

    def assert_complete(self) -> None:
        """Raise if the replay stopped before the recording did."""
        left = {name: stream[0] for name, stream in self._streams.items() if stream}
        if left:
            first = "; ".join(f"{name}: next expected {e['op']} {e['command']!r} (#{e['seq']})"
                              for name, e in left.items())
            raise ReplayDivergence(f"replay of {self.path} ended early: {first}")


class ReplayTransport:
    """A ``Transport`` answering from a recording; any other command is a divergence."""

    def __init__(self, session: ReplaySession, instrument: str,
                 stream: deque[dict[str, Any]], address: str) -> None:
        self.session = session
        self.instrument = instrument
        self.address = address
        self._stream = stream
        self._timeout_ms = 3000.0

    @property
    def timeout_ms(self) -> float:
        return self._timeout_ms

    @timeout_ms.setter
    def timeout_ms(self, value: float) -> None:
        self._timeout_ms = float(value)

    def _next(self, op: str, command: str) -> dict[str, Any]:
        where = f"replay of {self.session.path}, {self.instrument}"
        if not self._stream:
            raise ReplayDivergence(f"{where}: diverged after the last recorded exchange\n"
                                   f"  expected: (end of recording)\n"
                                   f"  actual:   {op} {command!r}")
        entry = self._stream[0]
        if entry["op"] != op or entry["command"] != command:
            raise ReplayDivergence(f"{where}: diverged at exchange #{entry['seq']}\n"
                                   f"  expected: {entry['op']} {entry['command']!r}\n"
                                   f"  actual:   {op} {command!r}")
        self._stream.popleft()
        if entry.get("timeout_ms") is not None:
            self._timeout_ms = float(entry["timeout_ms"])  # as in force when recorded
        if entry.get("error") == "timeout":
            raise TimeoutError(entry.get("message") or "recorded timeout")
        if entry.get("error") == "connection":
            raise ConnectionError(entry.get("message") or "recorded connection error")
        return entry

    def write(self, command: str) -> None:
        self._next("write", command)

    def query(self, command: str) -> str:
        return str(self._next("query", command)["reply"])

    def write_raw(self, data: bytes) -> None:
        self._next("write_raw", data.hex())

    def read_raw(self, size: int) -> bytes:
        return bytes.fromhex(self._next("read_raw", str(size))["reply"])

    def clear(self) -> None:
        self._next("clear", "")

    def close(self) -> None:
        self._next("close", "")
