"""What every simulated instrument shares: the byte-level bus side, text framing and SCPI.

``InstrumentModel`` is one instrument on the virtual bus: the VISA library hands it the bytes
the host writes (``receive``) and takes its replies (``take``). Every message costs bus time
on the world's clock (``io_s``; by default from the interface: GPIB, VXI-11, USB-TMC, raw
socket or a serial line at the instrument's baud rate).

``TextModel`` frames ASCII commands on a termination; ``ScpiModel`` adds IEEE 488.2/SCPI:
headers in short or long form, case-insensitive, with optional nodes (``[SOURce]:FREQuency``),
``;``-separated commands, numbers with units, ``*IDN?``, ``*CLS``, ``*RST``, ``*OPC?`` (which
waits, in lab time, for pending operations) and the ``SYSTem:ERRor?`` queue. A command the
instrument does not know queues -113 and, if it was a query, answers nothing: the host times
out, as on a real instrument.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from sims.virtual_lab.world import World

#: Lab seconds per message by interface when the world file gives no ``io_s``.
IO_S = {"GPIB": 1.0e-3, "TCPIP": 0.5e-3, "USB": 0.5e-3, "SOCKET": 1.0e-3}


class InstrumentModel:
    """Base of every simulated instrument: bus side, clock, seeded randomness, truth."""

    MODEL: ClassVar[str] = ""
    BAUD: ClassVar[int] = 0  # serial instruments
    TURNAROUND_S: ClassVar[float] = 0.0

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        self.world = world
        self.clock = world.clock
        self.name = name
        self.spec = spec
        self.address: str = spec["address"]
        self.out = bytearray()
        self._io_s = spec.get("io_s")

    # ---- randomness and truth

    def rng(self, purpose: str) -> Any:
        return self.world.rng(f"instrument:{self.name}:{purpose}")

    def truth(self) -> dict[str, Any]:
        """What is drawn for this unit and its hidden state (for tests and reports only)."""
        return {}

    # ---- bus

    def io_cost_s(self, nbytes: int) -> float:
        if self._io_s is not None:
            return float(self._io_s)
        if self.BAUD:
            return nbytes * 10.0 / self.BAUD + self.TURNAROUND_S
        kind = "SOCKET" if self.address.endswith("SOCKET") else self.address.split("::")[0]
        kind = kind.rstrip("0123456789")
        return IO_S.get(kind, 1.0e-3)

    def receive(self, data: bytes) -> None:
        """Bytes written by the host."""
        self.clock.advance(self.io_cost_s(len(data)), f"{self.name}: bus")
        self.handle_bytes(data)

    def handle_bytes(self, data: bytes) -> None:
        raise NotImplementedError

    def take(self, count: int, termchar: int | None) -> bytes:
        """Up to ``count`` bytes of pending output, stopping after ``termchar`` if given."""
        if termchar is not None:
            end = self.out.find(bytes([termchar]))
            if 0 <= end < count:
                count = end + 1
        chunk = bytes(self.out[:count])
        del self.out[:count]
        return chunk

    def clear(self) -> None:
        """Device clear: drop pending input and output."""
        self.out.clear()


class TextModel(InstrumentModel):
    """An ASCII instrument: commands end with a newline (CR stripped); replies get ``TERM``."""

    TERM: ClassVar[str] = "\n"

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        super().__init__(world, name, spec)
        self._pending = bytearray()

    def handle_bytes(self, data: bytes) -> None:
        self._pending += data
        while True:
            end = self._pending.find(b"\n")
            if end < 0:
                return
            line = self._pending[:end].decode("ascii", "replace").strip("\r").strip()
            del self._pending[:end + 1]
            if line:
                reply = self.handle(line)
                if reply is not None:
                    self.out += (reply + self.TERM).encode("ascii")

    def handle(self, command: str) -> str | None:
        raise NotImplementedError

    def clear(self) -> None:
        super().clear()
        self._pending.clear()


# --------------------------------------------------------------------------- SCPI


class ScpiError(Exception):
    """A command error to queue: ``code`` and message as the instrument reports them."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code},\"{message}\"")


def _mnemonic(token: str) -> str:
    suffix = token.endswith("#")
    word = token.rstrip("#")
    short = "".join(c for c in word if c.isupper() or c == "*")
    alts = {short.upper(), word.upper()}
    core = "(?:" + "|".join(sorted(map(re.escape, alts), key=len, reverse=True)) + ")"
    return core + (r"(\d*)" if suffix else "")


def compile_header(pattern: str) -> re.Pattern[str]:
    """``"[SOURce]:FREQuency[:CW]"`` -> a regex matching every legal spelling of the header.

    Upper-case letters are the short form, the whole word the long form; ``[...]`` nodes may
    be left out; ``#`` after a mnemonic captures a numeric suffix (``MARKer#``).
    """
    tokens = re.findall(r"(\[?):?([A-Za-z*]+#?)\]?", pattern)
    parts, required_seen = [], False
    for optional, word in tokens:
        sep = ":" if required_seen else ":?"
        node = sep + _mnemonic(word)
        if optional:
            parts.append(f"(?:{node})?")
        else:
            parts.append(node)
            required_seen = True
    return re.compile("^:?" + "".join(parts).removeprefix(":?") + "$", re.IGNORECASE)


_UNITS = {"HZ": 1.0, "KHZ": 1e3, "MHZ": 1e6, "GHZ": 1e9, "DBM": 1.0, "DB": 1.0, "V": 1.0,
          "MV": 1e-3, "UV": 1e-6, "A": 1.0, "MA": 1e-3, "UA": 1e-6, "S": 1.0, "MS": 1e-3,
          "PCT": 1.0, "PLC": 1.0}
_NUMBER = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*$")


def parse_number(text: str) -> float:
    """A SCPI number, optionally with a unit (``2.2GHz``, ``-10 dBm``); -224 otherwise."""
    match = _NUMBER.match(text)
    if match is None:
        raise ScpiError(-224, "Illegal parameter value")
    unit = match.group(2).upper()
    if unit and unit not in _UNITS:
        raise ScpiError(-131, "Invalid suffix")
    return float(match.group(1)) * (_UNITS[unit] if unit else 1.0)


def parse_bool(text: str) -> bool:
    word = text.strip().upper()
    if word in ("ON", "1"):
        return True
    if word in ("OFF", "0"):
        return False
    raise ScpiError(-224, "Illegal parameter value")


Handler = Callable[[str, bool, tuple[str, ...]], "str | None"]


class ScpiModel(TextModel):
    """SCPI instrument: routing table, error queue, common commands, ``*OPC?`` waits."""

    IDN: ClassVar[str] = ""
    NO_ERROR: ClassVar[str] = '0,"No error"'
    ERROR_QUEUE_SIZE: ClassVar[int] = 10

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        super().__init__(world, name, spec)
        self.errors: deque[str] = deque()
        self.busy_until_s = 0.0
        self.routes: list[tuple[re.Pattern[str], Handler]] = []
        self.route("*IDN", lambda a, q, g: self.IDN.format(**self.spec) if q else self._no_set())
        self.route("*CLS", lambda a, q, g: self.errors.clear())
        self.route("*RST", lambda a, q, g: self.reset())
        self.route("*OPC", self._opc)
        self.route("*WAI", lambda a, q, g: self.wait_pending())
        self.route("SYSTem:ERRor[:NEXT]", self._error_query)

    def route(self, pattern: str, handler: Handler) -> None:
        self.routes.append((compile_header(pattern), handler))

    def reset(self) -> None:
        """``*RST``: the instrument's default state (models override)."""

    def push_error(self, code: int, message: str) -> None:
        if len(self.errors) < self.ERROR_QUEUE_SIZE:
            self.errors.append(f"{code},\"{message}\"")
        else:
            self.errors[-1] = '-350,"Queue overflow"'

    def wait_pending(self) -> None:
        self.clock.advance_to(self.busy_until_s, f"{self.name}: settling")

    def busy_for(self, seconds: float) -> None:
        """An operation that completes ``seconds`` from now (``*OPC?`` will wait for it)."""
        self.busy_until_s = max(self.busy_until_s, self.clock.now_s() + seconds)

    def _opc(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        self.wait_pending()
        return "1" if query else None

    def _error_query(self, args: str, query: bool, groups: tuple[str, ...]) -> str:
        if not query:
            raise ScpiError(-113, "Undefined header")
        return self.errors.popleft() if self.errors else self.NO_ERROR

    @staticmethod
    def _no_set() -> None:
        raise ScpiError(-113, "Undefined header")

    def handle(self, command: str) -> str | None:
        replies = []
        for part in command.split(";"):
            part = part.strip()
            if not part:
                continue
            header, _, args = part.partition(" ")
            query = header.endswith("?")
            header = header.rstrip("?")
            for regex, handler in self.routes:
                match = regex.match(header)
                if match is not None:
                    try:
                        reply = handler(args.strip(), query, match.groups())
                    except ScpiError as exc:
                        self.push_error(exc.code, exc.message)
                        reply = None
                    if query and reply is not None:
                        replies.append(str(reply))
                    break
            else:
                self.push_error(-113, "Undefined header")
        return ";".join(replies) if replies else None

    # ---- helpers for handlers

    @staticmethod
    def number_in(args: str, lo: float, hi: float) -> float:
        if not args:
            raise ScpiError(-109, "Missing parameter")
        value = parse_number(args)
        if not lo <= value <= hi:
            raise ScpiError(-222, "Data out of range")
        return value

    def setting(self, args: str, query: bool, get: Callable[[], str],
                put: Callable[[str], None]) -> str | None:
        """A query/set pair: ``get()`` formats the value, ``put(args)`` validates and sets it."""
        if query:
            return get()
        if not args:
            raise ScpiError(-109, "Missing parameter")
        put(args)
        return None
