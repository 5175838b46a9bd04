"""The pieces every driver is built from.

- ``Transport``: the thin interface a driver talks through (``write``, ``query``, ``write_raw``,
  ``read_raw``, ``timeout_ms``, ``close``). ``VisaTransport`` puts it over a pyvisa resource;
  ``drivers.recording`` wraps it to record a session and replaces it to replay one.
- ``Range`` and ``Limits``: hard limits of an instrument, which a lab configuration may only
  tighten. Every request is checked against them *before* anything is sent.
- ``Setting``: one instrument setting declared like a row of the manual's command table
  (query, set command, unit, limit), so a driver reads like its manual.
- ``Instrument``: identity check against the expected model, ``write``/``query`` wrappers that
  turn timeouts into errors naming the instrument and the command, error check after every
  set, ``safe_shutdown()`` on close and on any exception inside a ``with`` block. After a
  failed exchange (a timeout, a broken link) the instrument's error queue is read at once
  (``drain_errors``) and what it held is reported with the command that caused it, so the
  error is not blamed on the next, valid command.
- ``Clock``: lab time for every wait and timeout of a driver (``now_s``, ``sleep``).
  ``WALL_CLOCK`` is a real bench's; a simulated bench passes its own clock at open time
  (``open(..., clock=...)``), so a stage's poll interval and its timeout both run in lab time.

Imports nothing from the rest of the project.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, Self, TypeVar, runtime_checkable

log = logging.getLogger(__name__)

T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class DriverError(Exception):
    """Base class of every error raised by a driver.

    ``instrument`` names the instrument (name, model and address) and ``command`` the command
    that was being sent, when there was one.
    """

    def __init__(self, message: str, *, instrument: str = "", command: str | None = None) -> None:
        self.instrument = instrument
        self.command = command
        super().__init__(f"{instrument}: {message}" if instrument else message)


class LimitError(DriverError, ValueError):
    """A request is outside the allowed range; it was refused before anything was sent."""


class OptionError(DriverError, ValueError):
    """A driver option is unknown or of the wrong type."""


class IdentityError(DriverError):
    """The instrument at the address is not the configured model."""


class InstrumentError(DriverError):
    """The instrument reported an error; the message is the instrument's own."""


class InstrumentTimeout(DriverError, TimeoutError):
    """The instrument did not answer (or did not finish) in time."""


class ProtocolError(DriverError):
    """The instrument answered something the driver cannot interpret."""


# --------------------------------------------------------------------------- clock


@runtime_checkable
class Clock(Protocol):
    """Lab time in seconds: what a driver's waits and timeouts run on.

    ``now_s`` is monotonic (only differences matter); ``sleep`` lets ``seconds`` of lab time
    pass. A simulated bench's clock (``sims.virtual_lab.VirtualClock``) has both methods and
    fits without importing anything from here.
    """

    def now_s(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class WallClock:
    """A real bench's clock: ``time.monotonic`` and ``time.sleep``."""

    @staticmethod
    def now_s() -> float:
        return time.monotonic()

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)


#: The default clock of every driver.
WALL_CLOCK: Clock = WallClock()


# --------------------------------------------------------------------------- limits


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Range:
    """A closed interval ``[min, max]`` with its unit; the unit is data, not a docstring."""

    min: float
    max: float
    unit: str

    def __post_init__(self) -> None:
        if not (_is_number(self.min) and _is_number(self.max)):
            raise TypeError(f"Range bounds must be numbers, got {self.min!r}, {self.max!r}")
        if math.isnan(self.min) or math.isnan(self.max) or self.min > self.max:
            raise ValueError(f"empty or invalid range [{self.min}, {self.max}]")

    def __contains__(self, value: object) -> bool:
        return _is_number(value) and self.min <= value <= self.max  # type: ignore[operator]

    def __str__(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"[{self.min:g}, {self.max:g}]{unit}"

    def check(self, what: str, value: Any, *, instrument: str = "") -> float:
        """Return ``value`` as a float if it lies in the range; otherwise raise ``LimitError``."""
        if not _is_number(value) or math.isnan(value):
            raise LimitError(f"{what} must be a number in {self}, got {value!r}",
                             instrument=instrument)
        if value not in self:
            unit = f" {self.unit}" if self.unit else ""
            raise LimitError(f"{what}={value:g}{unit} refused (allowed {self}); nothing was sent",
                             instrument=instrument)
        return float(value)

    def tightened(self, lo: float | None, hi: float | None, *, what: str = "") -> Range:
        """A narrower range; raise ``LimitError`` if the request would widen this one."""
        lo = self.min if lo is None else lo
        hi = self.max if hi is None else hi
        if lo < self.min or hi > self.max:
            raise LimitError(f"{what} [{lo:g}, {hi:g}] is beyond what the instrument can do; "
                             f"allowed within {self}")
        if lo > hi:
            raise LimitError(f"{what} [{lo:g}, {hi:g}] is empty (min > max)")
        return Range(float(lo), float(hi), self.unit)


def parse_limit_spec(spec: Any, what: str) -> tuple[float | None, float | None]:
    """Read a limit as written in a config: ``[min, max]`` or ``{min: .., max: ..}``.

    Either bound may be left out of the mapping form (``{max: 10}``); numbers only.
    """
    if isinstance(spec, Range):
        return spec.min, spec.max
    if isinstance(spec, list | tuple) and len(spec) == 2:
        lo, hi = spec
    elif isinstance(spec, Mapping) and spec and set(spec) <= {"min", "max"}:
        lo, hi = spec.get("min"), spec.get("max")
    else:
        raise LimitError(f"{what} must be [min, max] or a mapping with min and/or max, "
                         f"got {spec!r}")
    for bound in (lo, hi):
        if bound is not None and (not _is_number(bound) or not math.isfinite(bound)):
            raise LimitError(f"{what} bounds must be finite numbers, got {spec!r}")
    return lo, hi


class Limits(Mapping[str, Range]):
    """The limits in force on one instrument: its hard limits, possibly tightened.

    There is deliberately no way to widen a range: ``tightened`` refuses bounds outside the
    current ones, so a lab configuration can only make a driver stricter.
    """

    def __init__(self, ranges: Mapping[str, Range]) -> None:
        self._ranges = dict(ranges)

    def __getitem__(self, key: str) -> Range:
        try:
            return self._ranges[key]
        except KeyError:
            raise KeyError(f"no limit named {key!r}; known: {', '.join(self._ranges)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._ranges)

    def __len__(self) -> int:
        return len(self._ranges)

    def __repr__(self) -> str:
        return "Limits(" + ", ".join(f"{k}={v}" for k, v in self._ranges.items()) + ")"

    def tightened(self, requested: Mapping[str, Any] | None) -> Limits:
        """Apply requested ``{name: [min, max]}`` limits; unknown names and widening refused."""
        ranges = dict(self._ranges)
        for name, spec in (requested or {}).items():
            if name not in ranges:
                allowed = ", ".join(f"{k} {v}" for k, v in ranges.items()) or "none"
                raise LimitError(f"unknown limit {name!r}; allowed: {allowed}")
            lo, hi = parse_limit_spec(spec, name)
            ranges[name] = ranges[name].tightened(lo, hi, what=name)
        return Limits(ranges)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """A driver option a lab configuration may set (for example the stage model)."""

    type: type
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None

    def validate(self, name: str, value: Any) -> Any:
        ok = isinstance(value, self.type) and not (self.type is not bool and isinstance(value,
                                                                                        bool))
        if self.type is float and _is_number(value):
            value, ok = float(value), True
        if not ok:
            raise OptionError(f"option {name} must be of type {self.type.__name__}, "
                              f"got {value!r}")
        if self.choices is not None and value not in self.choices and value != self.default:
            raise OptionError(f"option {name}={value!r} not allowed; choose one of "
                              f"{', '.join(map(str, self.choices))}")
        return value


# --------------------------------------------------------------------------- transport


@runtime_checkable
class Transport(Protocol):
    """What a driver talks to: a pyvisa resource, a recorder around one, or a replay.

    Text methods carry one message without its termination; ``read_raw`` returns exactly
    ``size`` bytes. Timeouts raise ``TimeoutError``, other link failures ``ConnectionError``.
    """

    address: str

    @property
    def timeout_ms(self) -> float: ...

    @timeout_ms.setter
    def timeout_ms(self, value: float) -> None: ...

    def write(self, command: str) -> None: ...

    def query(self, command: str) -> str: ...

    def write_raw(self, data: bytes) -> None: ...

    def read_raw(self, size: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SerialSettings:
    """Serial line settings of an ASRL instrument (from its manual)."""

    baud_rate: int
    data_bits: int = 8
    stop_bits: float = 1
    parity: str = "none"  # none | odd | even
    flow_control: str = "none"  # none | xon_xoff | rts_cts


class VisaTransport:
    """``Transport`` over an open pyvisa message-based resource."""

    def __init__(self, resource: Any, address: str) -> None:
        self._res = resource
        self.address = address

    @property
    def timeout_ms(self) -> float:
        return float(self._res.timeout)

    @timeout_ms.setter
    def timeout_ms(self, value: float) -> None:
        self._res.timeout = value

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        import pyvisa

        try:
            return fn(*args)
        except pyvisa.errors.VisaIOError as exc:
            if exc.error_code == pyvisa.constants.StatusCode.error_timeout:
                raise TimeoutError(f"VISA timeout after {self.timeout_ms:g} ms") from exc
            raise ConnectionError(f"VISA error: {exc.description}") from exc

    def write(self, command: str) -> None:
        self._call(self._res.write, command)

    def query(self, command: str) -> str:
        return self._call(self._res.query, command).strip()

    def write_raw(self, data: bytes) -> None:
        self._call(self._res.write_raw, data)

    def read_raw(self, size: int) -> bytes:
        return bytes(self._call(self._res.read_bytes, size))

    def clear(self) -> None:
        """Device clear (IEEE 488.2 / VISA viClear): drops a late reply still in flight."""
        self._call(self._res.clear)

    def close(self) -> None:
        self._call(self._res.close)


def _lock_exclusive(res: Any, address: str) -> None:
    """Take the VISA exclusive lock (viLock) where the resource supports it, so another
    program's session cannot send to it; a resource already locked is refused."""
    import pyvisa

    try:
        res.lock_excl(timeout=0)
    except pyvisa.errors.VisaIOError as exc:
        if exc.error_code == pyvisa.constants.StatusCode.error_resource_locked:
            res.close()
            raise ConnectionError(f"{address} is locked by another program (VISA exclusive "
                                  "lock); nothing was sent") from exc
        log.debug("%s: no VISA exclusive lock (%s)", address, exc.description)
    except (NotImplementedError, AttributeError) as exc:  # backends without locking
        log.debug("%s: no VISA exclusive lock (%s)", address, exc)


def open_visa(address: str, backend: str = "", *, read_termination: str | None,
              write_termination: str, timeout_ms: float,
              serial: SerialSettings | None = None) -> VisaTransport:
    """Open ``address`` with the pyvisa ``backend`` ("" = system VISA, "@py", "file@sim").

    ``read_termination=None`` opens the resource for binary messages (no termination
    character ends a read). Serial settings apply to ASRL addresses only.
    """
    import pyvisa
    from pyvisa import constants

    try:
        rm = pyvisa.ResourceManager(backend) if backend else pyvisa.ResourceManager()
        res = rm.open_resource(address)
    except (pyvisa.errors.VisaIOError, OSError, ValueError) as exc:
        where = f" with VISA backend {backend!r}" if backend else ""
        raise ConnectionError(f"cannot open {address}{where}: {exc}") from exc
    _lock_exclusive(res, address)
    res.timeout = timeout_ms
    res.write_termination = write_termination
    res.read_termination = read_termination
    if serial is not None and address.upper().startswith("ASRL"):
        res.baud_rate = serial.baud_rate
        res.data_bits = serial.data_bits
        res.stop_bits = {1: constants.StopBits.one, 1.5: constants.StopBits.one_and_a_half,
                         2: constants.StopBits.two}[serial.stop_bits]
        res.parity = getattr(constants.Parity, serial.parity)
        res.flow_control = {"none": constants.ControlFlow.none,
                            "xon_xoff": constants.ControlFlow.xon_xoff,
                            "rts_cts": constants.ControlFlow.rts_cts}[serial.flow_control]
        if read_termination is None:
            res.end_input = constants.SerialTermination.none
    return VisaTransport(res, address)


# --------------------------------------------------------------------------- settings


def parse_bool(reply: str) -> bool:
    """SCPI boolean reply ("1", "0", "ON", "OFF") to bool."""
    text = reply.strip().upper()
    if text in ("1", "ON", "+1"):
        return True
    if text in ("0", "OFF", "+0"):
        return False
    raise ValueError(f"not a boolean reply: {reply!r}")


ON_OFF: Mapping[Any, str] = {True: "ON", False: "OFF"}


class Setting(Generic[T]):
    """One instrument setting, declared as the manual's command table gives it.

    ``get_cmd`` queries it, ``set_cmd`` (a ``str.format`` pattern with one field) sets it.
    Numbers are formatted with ``fmt`` first and the *formatted* value is checked against the
    instrument's ``limit`` range, so rounding can never slip past a limit. ``choices`` maps
    allowed Python values to their command words; anything else is refused before sending.
    """

    def __init__(self, get_cmd: str | None, set_cmd: str | None, *, doc: str, unit: str = "",
                 limit: str | None = None, fmt: str = "{:.6f}",
                 parse: Callable[[str], Any] = float,
                 choices: Mapping[Any, str] | None = None) -> None:
        self.get_cmd = get_cmd
        self.set_cmd = set_cmd
        self.unit = unit
        self.limit = limit
        self.fmt = fmt
        self.parse = parse
        self.choices = choices
        self.name = ""
        self.__doc__ = f"{doc} ({unit})" if unit else doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Instrument | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        if self.get_cmd is None:
            raise AttributeError(f"{self.name} cannot be read back")
        reply = obj.query(self.get_cmd)
        try:
            return self.parse(reply)
        except (ValueError, KeyError) as exc:
            raise ProtocolError(f"cannot read {self.name} from reply {reply!r}",
                                instrument=obj.describe(), command=self.get_cmd) from exc

    def __set__(self, obj: Instrument, value: Any) -> None:
        if self.set_cmd is None:
            raise AttributeError(f"{self.name} is read-only")
        obj.set(self.command_for(obj, value))

    def command_for(self, obj: Instrument, value: Any) -> str:
        """The exact command that would set ``value``; raises ``LimitError`` if refused."""
        assert self.set_cmd is not None
        if self.choices is not None:
            for key, word in self.choices.items():
                if value is key or (type(value) is type(key) and value == key):
                    return self.set_cmd.format(word)
            allowed = ", ".join(repr(k) for k in self.choices)
            raise LimitError(f"{self.name}={value!r} refused; allowed: {allowed}; "
                             "nothing was sent", instrument=obj.describe())
        if not _is_number(value) or not math.isfinite(value):
            raise LimitError(f"{self.name} must be a finite number, got {value!r}; "
                             "nothing was sent", instrument=obj.describe())
        try:
            text = self.fmt.format(value)
        except (ValueError, TypeError):
            raise LimitError(f"{self.name} must be given as {self.fmt!r} allows (an integer?), "
                             f"got {value!r}; nothing was sent", instrument=obj.describe()) from None
        if self.limit is not None:
            obj.limits[self.limit].check(self.name, float(text), instrument=obj.describe())
        return self.set_cmd.format(text)


# --------------------------------------------------------------------------- instruments


class Instrument:
    """Base of every driver: identity, checked writes and queries, limits, safe shutdown.

    Subclasses set the class attributes below and implement ``_identify``, ``check_errors``,
    ``safe_shutdown`` and (optionally) ``_configure`` (run once at connect, after the
    identity check; this is where an instrument's own protective limits are set).

    ``clock`` is what every wait and timeout of the driver runs on: the wall clock unless
    another is given at open time (a simulated bench's clock, a fake in tests).
    """

    MODEL: ClassVar[str] = ""
    KIND: ClassVar[str] = ""
    #: Regular expression the identity string must contain (searched, case-insensitive).
    IDN_PATTERN: ClassVar[str] = ""
    HARD_LIMITS: ClassVar[Mapping[str, Range]] = {}
    OPTIONS: ClassVar[Mapping[str, Option]] = {}
    #: VISA interface types this instrument can be reached through.
    INTERFACES: ClassVar[tuple[str, ...]] = ("GPIB", "USB", "TCPIP")
    READ_TERMINATION: ClassVar[str | None] = "\n"
    WRITE_TERMINATION: ClassVar[str] = "\n"
    SERIAL: ClassVar[SerialSettings | None] = None
    DEFAULT_TIMEOUT_MS: ClassVar[float] = 3000.0

    def __init__(self, transport: Transport, *, name: str | None = None,
                 limits: Mapping[str, Any] | None = None,
                 options: Mapping[str, Any] | None = None, clock: Clock | None = None) -> None:
        self.transport = transport
        self.name = name or self.MODEL
        self.clock: Clock = WALL_CLOCK if clock is None else clock
        self.identity = ""
        self._closed = False
        try:
            self.options = self.validate_options(options)
            self.limits = self.hard_limits(self.options).tightened(limits)
        except DriverError as exc:
            self._close_transport()
            raise type(exc)(str(exc), instrument=self.describe()) from None
        try:
            self.identity = self._identify()
            self._check_identity(self.identity)
        except BaseException:
            self._close_transport()  # never drive an unknown instrument
            raise
        try:
            self._configure()
        except BaseException as exc:
            try:
                self.close()  # half-configured: make it safe before giving up
            except Exception as close_exc:
                exc.add_note(f"while making {self.describe()} safe: {close_exc}")
            raise

    # ---- construction helpers

    @classmethod
    def validate_options(cls, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults completed and types checked; unknown options refused."""
        given = dict(options or {})
        unknown = set(given) - set(cls.OPTIONS)
        if unknown:
            allowed = ", ".join(cls.OPTIONS) or "none"
            raise OptionError(f"unknown option {sorted(unknown)[0]!r}; allowed: {allowed}")
        return {k: opt.validate(k, given[k]) if k in given else opt.default
                for k, opt in cls.OPTIONS.items()}

    @classmethod
    def hard_limits(cls, options: Mapping[str, Any] | None = None) -> Limits:
        """What the instrument can do (may depend on options, e.g. the stage model)."""
        return Limits(cls.HARD_LIMITS)

    @classmethod
    def open_transport(cls, address: str, backend: str = "",
                       timeout_ms: float | None = None) -> VisaTransport:
        """Open the VISA resource with this instrument's terminations and serial settings."""
        return open_visa(address, backend, read_termination=cls.READ_TERMINATION,
                         write_termination=cls.WRITE_TERMINATION,
                         timeout_ms=timeout_ms or cls.DEFAULT_TIMEOUT_MS, serial=cls.SERIAL)

    @classmethod
    def open(cls, address: str, backend: str = "", *, timeout_ms: float | None = None,
             **kwargs: Any) -> Self:
        """Open the address and connect (identity check, protective limits); ``kwargs`` go to
        the constructor (``name``, ``limits``, ``options``, ``clock``)."""
        return cls(cls.open_transport(address, backend, timeout_ms), **kwargs)

    # ---- identity

    def describe(self) -> str:
        """``name (model at address)``, used in every error message."""
        address = getattr(self.transport, "address", "?")
        if self.name and self.name != self.MODEL:
            return f"{self.name} ({self.MODEL} at {address})"
        return f"{self.MODEL} at {address}"

    def _identify(self) -> str:
        raise NotImplementedError

    def _check_identity(self, identity: str) -> None:
        if not re.search(self.IDN_PATTERN, identity, re.IGNORECASE):
            raise IdentityError(
                f"expected a {self.MODEL} (identity matching {self.IDN_PATTERN!r}) but the "
                f"instrument answered {identity!r}; check the address and the driver in the "
                "lab configuration", instrument=self.describe())

    def _configure(self) -> None:
        """Put the instrument in a known state and set its own protective limits."""

    def _narrow_limit(self, name: str, lo: float, hi: float, source: str) -> None:
        """Intersect limit ``name`` with ``[lo, hi]``, what ``source`` (the installed
        hardware, the controller's own settings) allows; an empty result is refused."""
        current = self.limits[name]
        new_lo, new_hi = max(current.min, lo), min(current.max, hi)
        if new_lo > new_hi:
            raise LimitError(f"{name} {current} lies outside what {source} allows "
                             f"[{lo:g}, {hi:g}]; fix the lab configuration",
                             instrument=self.describe())
        if (new_lo, new_hi) != (current.min, current.max):
            log.info("%s: %s narrowed to [%g, %g] (%s)", self.describe(), name, new_lo, new_hi,
                     source)
            self.limits = Limits({**self.limits, name: Range(new_lo, new_hi, current.unit)})

    # ---- I/O

    def _io(self, op: str, command: str, fn: Callable[[], T]) -> T:
        if getattr(self, "_interrupted", False):
            self._resynchronise()
        try:
            return fn()
        except KeyboardInterrupt:
            # Ctrl-C, SIGTERM or SIGHUP between a query's write and its read: the reply may
            # still arrive and would be taken for the answer to the next command (seen: the
            # shutdown's *OPC? read a stale '0,"No error"' and RF stayed on). The next
            # exchange first clears the instrument's output.
            self._interrupted = True
            raise
        except TimeoutError as exc:
            timeout = getattr(self.transport, "timeout_ms", float("nan"))
            reported = self._errors_after_failure()
            raise InstrumentTimeout(
                f"no reply to {command!r} within {timeout:g} ms ({op}){reported}; check that "
                "the instrument is on and that the address, termination and command are right",
                instrument=self.describe(), command=command) from exc
        except ConnectionError as exc:
            reported = self._errors_after_failure()
            raise DriverError(f"{op} {command!r} failed: {exc}{reported}",
                              instrument=self.describe(), command=command) from exc

    def _resynchronise(self) -> None:
        """After an interrupted exchange: a device clear where the transport has one (drops a
        reply still in flight), before anything else is sent. Never raises."""
        self._interrupted = False
        clear = getattr(self.transport, "clear", None)
        if clear is None:
            return
        try:
            clear()
            log.debug("%s: device clear after an interrupted exchange", self.describe())
        except Exception as exc:  # not every interface has a device clear
            log.debug("%s: device clear failed: %s", self.describe(), exc)

    def _errors_after_failure(self) -> str:
        """Read the error queue after a failed exchange: "" or "; the instrument reported: ...".

        A device clear comes first where the transport has one, so that a late reply to the
        failed command is not taken for an answer to the error query. Never raises: the
        failed exchange is the error being reported.
        """
        if getattr(self, "_draining", False):
            return ""
        self._draining = True
        try:
            clear = getattr(self.transport, "clear", None)
            if clear is not None:
                try:
                    clear()
                except Exception as exc:  # not every interface has a device clear
                    log.debug("%s: device clear failed: %s", self.describe(), exc)
            errors = self.drain_errors()
        except Exception as exc:  # the link may be gone altogether
            log.warning("%s: could not read the error queue after a failed exchange: %s",
                        self.describe(), exc)
            return ""
        finally:
            self._draining = False
        return "; the instrument reported: " + "; ".join(errors) if errors else ""

    def drain_errors(self) -> list[str]:
        """Empty the instrument's error queue and return what it held (no exception for the
        errors themselves); instruments without a queue return []."""
        return []

    def write(self, command: str) -> None:
        """Send a command (no error check; use ``set`` for settings)."""
        log.debug("%s <- %s", self.name, command)
        self._io("write", command, lambda: self.transport.write(command))

    def query(self, command: str) -> str:
        """Send a query and return the reply without its termination."""
        reply = self._io("query", command, lambda: self.transport.query(command))
        log.debug("%s <- %s -> %s", self.name, command, reply)
        return reply

    def write_raw(self, data: bytes, label: str) -> None:
        """Send a binary message; ``label`` names it in errors (e.g. the message name)."""
        log.debug("%s <- %s %s", self.name, label, data.hex())
        self._io("write", label, lambda: self.transport.write_raw(data))

    def read_raw(self, size: int, label: str) -> bytes:
        """Read exactly ``size`` bytes of a binary reply to ``label``."""
        return self._io("read", label, lambda: self.transport.read_raw(size))

    def query_float(self, command: str) -> float:
        """Query a number; an unreadable reply is a ``ProtocolError`` naming the command."""
        reply = self.query(command)
        try:
            return float(reply.split(",")[0])
        except ValueError:
            raise ProtocolError(f"reply {reply!r} is not a number", instrument=self.describe(),
                                command=command) from None

    def set(self, command: str) -> None:
        """Send a setting and check the instrument's error state right after."""
        self.write(command)
        self.check_errors(after=command)

    def check_errors(self, after: str = "") -> None:
        """Raise ``InstrumentError`` with the instrument's own message if it reports errors."""
        raise NotImplementedError

    @property
    def timeout_ms(self) -> float:
        return float(self.transport.timeout_ms)

    @timeout_ms.setter
    def timeout_ms(self, value: float) -> None:
        self.transport.timeout_ms = value

    # ---- state for humans

    def status(self) -> str:
        """One line for ``hil lab check``; drivers add what matters (output state, position)."""
        return "ok"

    # ---- safety

    def safe_shutdown(self) -> None:
        """Leave the instrument safe (outputs off, motion stopped). Must be idempotent."""
        raise NotImplementedError

    def _close_transport(self) -> None:
        try:
            self.transport.close()
        except Exception as exc:  # the link may already be gone; nothing more to do
            log.warning("%s: closing the connection failed: %s", self.describe(), exc)

    def close(self) -> None:
        """Make the instrument safe, then release the connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.safe_shutdown()
        finally:
            self._close_transport()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_exc:  # keep the original error; report the second one
            exc.add_note(f"while making {self.describe()} safe: {close_exc}")
            log.error("%s: safe shutdown after an error failed: %s", self.describe(),
                      close_exc)


# --------------------------------------------------------------------------- SCPI


_SCPI_ERROR = re.compile(r"^\s*([+-]?\d+)")
#: A whole error-queue entry: ``<code>,"<message>"`` (SCPI-99 Vol. 2, 21.8.8 SYSTem:ERRor).
_SCPI_ERROR_REPLY = re.compile(r'^\s*[+-]?\d+\s*,\s*".*"')


class ScpiInstrument(Instrument):
    """An IEEE 488.2 / SCPI instrument: ``*IDN?``, ``*CLS``, ``*OPC?``, ``SYST:ERR?``."""

    ERROR_QUERY: ClassVar[str] = "SYST:ERR?"
    MAX_ERRORS: ClassVar[int] = 20

    def _identify(self) -> str:
        return self.query("*IDN?")

    def _configure(self) -> None:
        self.write("*CLS")

    def drain_errors(self) -> list[str]:
        errors: list[str] = []
        for _ in range(self.MAX_ERRORS):
            reply = self.query(self.ERROR_QUERY)
            if _SCPI_ERROR_REPLY.match(reply) is None:  # not an error entry: a stale reply?
                errors.append(f"(unexpected reply {reply!r} to {self.ERROR_QUERY})")
                break
            if int(_SCPI_ERROR.match(reply).group(1)) == 0:  # type: ignore[union-attr]
                break
            errors.append(reply)
        return errors

    def check_errors(self, after: str = "") -> None:
        errors: list[str] = []
        for _ in range(self.MAX_ERRORS):
            reply = self.query(self.ERROR_QUERY)
            match = _SCPI_ERROR.match(reply)
            if match is None:
                raise ProtocolError(f"unexpected reply {reply!r} to {self.ERROR_QUERY}",
                                    instrument=self.describe(), command=after or None)
            if int(match.group(1)) == 0:
                break
            errors.append(reply)
        else:
            errors.append(f"(more errors; queue not empty after {self.MAX_ERRORS} reads)")
        if errors:
            where = f" after {after!r}" if after else ""
            raise InstrumentError(f"instrument reported{where}: " + "; ".join(errors),
                                  instrument=self.describe(), command=after or None)

    def report_errors(self, after: str = "") -> None:
        """Empty the error queue into the log without raising (used by safe shutdowns, whose
        own success is verified by reading the state back, not by the queue)."""
        try:
            self.check_errors(after=after)
        except InstrumentError as exc:
            log.warning("%s", exc)

    def wait_complete(self) -> None:
        """Block until pending operations finish (``*OPC?``)."""
        reply = self.query("*OPC?")
        if reply.strip().lstrip("+") != "1":
            raise ProtocolError(f"unexpected reply {reply!r} to *OPC?",
                                instrument=self.describe(), command="*OPC?")
