"""Focused checks of drivers/base.py written to kill mutmut's survivors (scripts/mutation.sh):
range edges, limit specs, options, the pyvisa transport and opener, SCPI error queues."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest

import drivers.base as base
from drivers.base import (
    DriverError,
    InstrumentError,
    InstrumentTimeout,
    LimitError,
    Limits,
    Option,
    OptionError,
    ProtocolError,
    Range,
    ScpiInstrument,
    SerialSettings,
    Setting,
    VisaTransport,
    open_visa,
    parse_bool,
    parse_limit_spec,
)

pyvisa = pytest.importorskip("pyvisa")


# --------------------------------------------------------------------------- limits


def test_range_edges_are_inside_and_invalid_ranges_refused() -> None:
    r = Range(-1.0, 2.0, "V")
    assert -1.0 in r and 2.0 in r and 0.5 in r
    assert -1.0000001 not in r and 2.0000001 not in r
    assert True not in r and "1" not in r  # bools and text are not numbers
    assert Range(3.0, 3.0, "A").min == 3.0  # a single point is a valid range
    with pytest.raises(ValueError):
        Range(2.0, 1.0, "V")
    with pytest.raises(ValueError):
        Range(math.nan, 1.0, "V")
    with pytest.raises(ValueError):
        Range(0.0, math.nan, "V")
    with pytest.raises(TypeError):
        Range(0, "1", "V")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Range("0", 1, "V")  # type: ignore[arg-type]
    assert str(r) == "[-1, 2] V" and str(Range(0, 1, "")) == "[0, 1]"


def test_range_check_returns_float_and_refuses_nan_bool_and_outside() -> None:
    r = Range(0, 10, "Hz")
    value = r.check("f", 10)
    assert value == 10.0 and isinstance(value, float)
    assert r.check("f", 0) == 0.0
    for bad in (math.nan, True, "5", None, 10.5, -0.1):
        with pytest.raises(LimitError):
            r.check("f", bad)


def test_range_tightened_keeps_unit_and_open_bounds() -> None:
    r = Range(-5.0, 5.0, "mm")
    assert r.tightened(None, None) == r
    assert r.tightened(-5.0, 5.0) == r  # the same bounds are not a widening
    assert r.tightened(-1, None) == Range(-1.0, 5.0, "mm")
    assert r.tightened(None, 1) == Range(-5.0, 1.0, "mm")
    assert r.tightened(2, 2) == Range(2.0, 2.0, "mm")
    for lo, hi in ((-5.1, 0), (0, 5.1), (3, 2)):
        with pytest.raises(LimitError):
            r.tightened(lo, hi)


@pytest.mark.parametrize("spec, expected", [
    ([1, 2], (1, 2)), ((1, 2), (1, 2)), ({"min": 1}, (1, None)), ({"max": 2}, (None, 2)),
    ({"min": 1, "max": 2}, (1, 2)), (Range(1, 2, "V"), (1, 2)),
])
def test_limit_spec_forms(spec: Any, expected: tuple) -> None:
    assert parse_limit_spec(spec, "x") == expected


@pytest.mark.parametrize("spec", [[1, 2, 3], [1], {}, {"min": 1, "low": 0}, "1,2", [math.inf, 1],
                                  [0, math.nan], [True, 1], {"max": "2"}])
def test_limit_spec_refused(spec: Any) -> None:
    with pytest.raises(LimitError):
        parse_limit_spec(spec, "x")


def test_limits_mapping_and_tightening() -> None:
    limits = Limits({"a": Range(0, 10, "V"), "b": Range(-1, 1, "A")})
    assert list(limits) == ["a", "b"] and len(limits) == 2
    assert repr(limits) == "Limits(a=[0, 10] V, b=[-1, 1] A)"
    with pytest.raises(KeyError, match="known: a, b"):
        limits["c"]
    tight = limits.tightened({"a": [1, 2]})
    assert tight["a"] == Range(1.0, 2.0, "V") and tight["b"] == limits["b"]
    assert limits["a"] == Range(0, 10, "V")  # the original is untouched
    assert limits.tightened(None)["a"] == limits["a"]
    with pytest.raises(LimitError, match="allowed: a"):
        limits.tightened({"c": [0, 1]})
    with pytest.raises(LimitError, match="allowed: none"):
        Limits({}).tightened({"c": [0, 1]})


# --------------------------------------------------------------------------- options


def test_option_types_choices_and_default() -> None:
    speed = Option(float, 1.0, "speed")
    assert speed.validate("s", 2) == 2.0 and isinstance(speed.validate("s", 2), float)
    with pytest.raises(OptionError):
        speed.validate("s", True)
    with pytest.raises(OptionError):
        speed.validate("s", "2")
    count = Option(int, 1, "count")
    assert count.validate("c", 3) == 3
    with pytest.raises(OptionError):
        count.validate("c", True)  # a bool is not an int here
    with pytest.raises(OptionError):
        count.validate("c", 3.0)
    flag = Option(bool, False, "flag")
    assert flag.validate("f", True) is True
    model = Option(str, "auto", "model", choices=("a", "b"))
    assert model.validate("m", "a") == "a"
    assert model.validate("m", "auto") == "auto"  # the default is always allowed
    with pytest.raises(OptionError, match="choose one of a, b"):
        model.validate("m", "c")


# --------------------------------------------------------------------------- transport


class FakeResource:
    """A pyvisa message-based resource: records calls, fails on demand."""

    def __init__(self) -> None:
        self.timeout = 2000
        self.calls: list[tuple] = []
        self.fail: Exception | None = None
        self.lock_error: BaseException | None = None

    def _do(self, name: str, *args: Any) -> Any:
        self.calls.append((name, *args))
        if self.fail is not None:
            raise self.fail
        return {"query": "  reply \n", "read_bytes": bytearray(b"\x01\x02")}.get(name)

    def write(self, command: str) -> None:
        return self._do("write", command)

    def query(self, command: str) -> str:
        return self._do("query", command)

    def write_raw(self, data: bytes) -> None:
        return self._do("write_raw", data)

    def read_bytes(self, size: int) -> bytearray:
        return self._do("read_bytes", size)

    def clear(self) -> None:
        return self._do("clear")

    def close(self) -> None:
        self.calls.append(("close",))

    def lock_excl(self, timeout: int) -> None:
        self.calls.append(("lock_excl", timeout))
        if self.lock_error is not None:
            raise self.lock_error


def visa_error(code: Any) -> Exception:
    return pyvisa.errors.VisaIOError(code)


def test_visa_transport_passes_calls_and_maps_errors() -> None:
    res = FakeResource()
    t = VisaTransport(res, "GPIB0::1::INSTR")
    assert t.address == "GPIB0::1::INSTR"
    assert t.timeout_ms == 2000.0 and isinstance(t.timeout_ms, float)
    t.timeout_ms = 500
    assert res.timeout == 500
    t.write("A")
    assert t.query("B?") == "reply"
    t.write_raw(b"\x00")
    assert t.read_raw(2) == b"\x01\x02" and isinstance(t.read_raw(2), bytes)
    t.clear()
    t.close()
    assert res.calls[:5] == [("write", "A"), ("query", "B?"), ("write_raw", b"\x00"),
                             ("read_bytes", 2), ("read_bytes", 2)]
    assert res.calls[5:] == [("clear",), ("close",)]
    res.fail = visa_error(pyvisa.constants.StatusCode.error_timeout)
    with pytest.raises(TimeoutError, match="after 500 ms"):
        t.query("B?")
    res.fail = visa_error(pyvisa.constants.StatusCode.error_connection_lost)
    with pytest.raises(ConnectionError, match="VISA error") as info:
        t.write("A")
    assert not isinstance(info.value, TimeoutError)


def test_exclusive_lock_refuses_a_locked_resource_only() -> None:
    res = FakeResource()
    base._lock_exclusive(res, "X")
    assert res.calls == [("lock_excl", 0)]
    res.lock_error = visa_error(pyvisa.constants.StatusCode.error_resource_locked)
    with pytest.raises(ConnectionError, match="locked by another program"):
        base._lock_exclusive(res, "X")
    assert res.calls[-1] == ("close",)
    for harmless in (visa_error(pyvisa.constants.StatusCode.error_nonsupported_operation),
                     NotImplementedError(), AttributeError()):
        res = FakeResource()
        res.lock_error = harmless
        base._lock_exclusive(res, "X")  # no lock on this backend: carry on, nothing closed
        assert ("close",) not in res.calls


class FakeManager:
    opened: list[tuple] = []
    resource: FakeResource | None = None
    fail: Exception | None = None
    lock_error: Exception | None = None

    def __init__(self, *backend: str) -> None:
        FakeManager.opened.append(backend)

    def open_resource(self, address: str) -> FakeResource:
        if FakeManager.fail is not None:
            raise FakeManager.fail
        FakeManager.resource = FakeResource()
        FakeManager.resource.address = address
        FakeManager.resource.lock_error = FakeManager.lock_error
        return FakeManager.resource


@pytest.fixture
def manager(monkeypatch: pytest.MonkeyPatch) -> type[FakeManager]:
    FakeManager.opened, FakeManager.resource, FakeManager.fail, FakeManager.lock_error = [], None, None, None
    monkeypatch.setattr(pyvisa, "ResourceManager", FakeManager)
    return FakeManager


def test_open_visa_sets_terminations_timeout_and_lock(manager: type[FakeManager]) -> None:
    t = open_visa("GPIB0::3::INSTR", read_termination="\n", write_termination="\r\n", timeout_ms=750)
    res = manager.resource
    assert manager.opened == [()] and t.address == "GPIB0::3::INSTR" and t._res is res
    assert res.address == "GPIB0::3::INSTR"
    assert (res.timeout, res.read_termination, res.write_termination) == (750, "\n", "\r\n")
    assert res.calls == [("lock_excl", 0)]
    assert not hasattr(res, "baud_rate")  # not a serial address
    open_visa("GPIB0::3::INSTR", "@py", read_termination="\n", write_termination="\n", timeout_ms=1,
              serial=SerialSettings(9600))
    assert manager.opened[-1] == ("@py",) and not hasattr(manager.resource, "baud_rate")


def test_open_visa_applies_serial_settings(manager: type[FakeManager]) -> None:
    c = pyvisa.constants
    open_visa("asrl7::INSTR", read_termination=None, write_termination="\n", timeout_ms=1,
              serial=SerialSettings(57600, data_bits=7, stop_bits=2, parity="odd", flow_control="rts_cts"))
    res = manager.resource
    assert (res.baud_rate, res.data_bits, res.stop_bits) == (57600, 7, c.StopBits.two)
    assert (res.parity, res.flow_control) == (c.Parity.odd, c.ControlFlow.rts_cts)
    assert res.end_input == c.SerialTermination.none
    for stop, want in ((1, c.StopBits.one), (1.5, c.StopBits.one_and_a_half)):
        for flow, want_flow in (("none", c.ControlFlow.none), ("xon_xoff", c.ControlFlow.xon_xoff)):
            open_visa("ASRL1::INSTR", read_termination="\r", write_termination="\r", timeout_ms=1,
                      serial=SerialSettings(9600, stop_bits=stop, flow_control=flow))
            res = manager.resource
            assert (res.stop_bits, res.flow_control, res.parity) == (want, want_flow, c.Parity.none)
            assert not hasattr(res, "end_input")  # a text termination ends reads


@pytest.mark.parametrize("error", [OSError("no such device"), ValueError("bad address")])
def test_open_visa_reports_what_could_not_be_opened(manager: type[FakeManager], error: Exception) -> None:
    manager.fail = error
    with pytest.raises(ConnectionError, match=r"cannot open X with VISA backend '@sim'"):
        open_visa("X", "@sim", read_termination="\n", write_termination="\n", timeout_ms=1)
    with pytest.raises(ConnectionError, match=r"cannot open X: "):
        open_visa("X", read_termination="\n", write_termination="\n", timeout_ms=1)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("reply, value", [("1", True), (" on ", True), ("+1", True), ("0", False),
                                          ("OFF\n", False), ("+0", False)])
def test_parse_bool(reply: str, value: bool) -> None:
    assert parse_bool(reply) is value


@pytest.mark.parametrize("reply", ["2", "", "yes", "-1"])
def test_parse_bool_refuses(reply: str) -> None:
    with pytest.raises(ValueError):
        parse_bool(reply)


class Table:
    """A transport answering from a table; ``SYST:ERR?`` answers pop from a list."""

    address = "GPIB0::9::INSTR"

    def __init__(self, **replies: Any) -> None:
        self.replies = {"*IDN?": "ACME,W2,1", "SYST:ERR?": [], "*OPC?": "1", **replies}
        self.sent: list[str] = []
        self.timeout_ms = 100.0
        self.closed = 0

    def write(self, command: str) -> None:
        self.sent.append(command)

    def query(self, command: str) -> str:
        self.sent.append(command)
        value = self.replies[command]
        if isinstance(value, list):
            return value.pop(0) if value else '0,"No error"'
        if isinstance(value, Exception):
            raise value
        return value

    def write_raw(self, data: bytes) -> None:
        self.sent.append(data.hex())

    def read_raw(self, size: int) -> bytes:
        return b"\x07" * size

    def close(self) -> None:
        self.closed += 1


class W2(ScpiInstrument):
    MODEL = "ACME W2"
    IDN_PATTERN = r"^acme,w2,"  # searched case-insensitively
    HARD_LIMITS = {"level_v": Range(-1.0, 1.0, "V"), "freq_hz": Range(0, 100, "Hz")}
    OPTIONS = {"model": Option(str, "x", "model", choices=("x", "y"))}
    MAX_ERRORS = 3
    level_v = Setting("LEV?", "LEV {}", unit="V", limit="level_v", fmt="{:.1f}", doc="level")
    count = Setting(None, "CNT {}", fmt="{:d}", doc="count")
    name_ro = Setting("NAME?", None, parse=str, doc="name")
    on = Setting("ON?", "ON {}", parse=parse_bool, choices={True: "1", False: "0"}, doc="on")

    def safe_shutdown(self) -> None:
        self.write("OFF")


def w2(**replies: Any) -> tuple[W2, Table]:
    t = Table(**replies)
    return W2(t, name="w"), t


def test_setting_rounds_before_the_limit_check_and_refuses_non_numbers() -> None:
    w, t = w2()
    w.level_v = 0.96  # formats to "1.0": inside
    assert t.sent[-2:] == ["LEV 1.0", "SYST:ERR?"]
    with pytest.raises(LimitError):
        w.level_v = 1.06  # formats to "1.1": outside, although 1.06 itself is close
    for bad in (math.inf, math.nan, "1", True):
        with pytest.raises(LimitError):
            W2.level_v.command_for(w, bad)
    assert W2.count.command_for(w, 3) == "CNT 3"
    with pytest.raises(LimitError, match="integer"):
        W2.count.command_for(w, 2.5)
    with pytest.raises(AttributeError, match="cannot be read back"):
        _ = w.count
    with pytest.raises(AttributeError, match="read-only"):
        w.name_ro = "z"
    assert W2.level_v.__doc__ == "level (V)" and W2.count.__doc__ == "count"
    assert W2.level_v.name == "level_v" and W2.__dict__["level_v"] is W2.level_v


def test_choice_settings_match_type_and_identity() -> None:
    w, _ = w2(**{"ON?": "ON"})
    assert W2.on.command_for(w, True) == "ON 1" and W2.on.command_for(w, False) == "ON 0"
    for bad in (1, 0, "1"):  # 1 == True, but not the same value for the instrument
        with pytest.raises(LimitError, match="allowed: True, False"):
            W2.on.command_for(w, bad)
    assert w.on is True


def test_setting_unreadable_reply_is_a_protocol_error() -> None:
    w, _ = w2(**{"LEV?": "abc", "ON?": "maybe"})
    with pytest.raises(ProtocolError, match="level_v") as info:
        _ = w.level_v
    assert info.value.command == "LEV?"
    with pytest.raises(ProtocolError):
        _ = w.on


# --------------------------------------------------------------------------- instruments


def test_connect_validates_options_and_limits_and_closes_on_refusal() -> None:
    t = Table()
    w = W2(t, options={"model": "y"}, limits={"level_v": [-0.5, 0.5]})
    assert w.options == {"model": "y"} and w.limits["level_v"] == Range(-0.5, 0.5, "V")
    assert t.sent == ["*IDN?", "*CLS"] and w.identity == "ACME,W2,1"
    assert w.name == "ACME W2" and w.describe() == "ACME W2 at GPIB0::9::INSTR"
    assert W2.validate_options(None) == {"model": "x"}
    for kwargs, error in (({"options": {"speed": 1}}, OptionError), ({"limits": {"level_v": [0, 2]}},
                                                                     LimitError)):
        t = Table()
        with pytest.raises(error) as info:
            W2(t, name="bench", **kwargs)
        assert t.closed == 1 and t.sent == []  # refused before anything was sent
        assert "bench (ACME W2 at GPIB0::9::INSTR)" in str(info.value)
    t = Table(**{"*IDN?": "OTHER,W2"})
    with pytest.raises(base.IdentityError):
        W2(t)
    assert t.closed == 1


def test_narrow_limit_intersects_and_refuses_empty() -> None:
    w, _ = w2()
    w._narrow_limit("freq_hz", 10, 200, "the amplifier")
    assert w.limits["freq_hz"] == Range(10, 100, "Hz")
    w._narrow_limit("freq_hz", 0, 100, "the amplifier")  # wider: unchanged
    assert w.limits["freq_hz"] == Range(10, 100, "Hz")
    w._narrow_limit("freq_hz", 10, 10, "x")  # a single point is allowed
    assert w.limits["freq_hz"] == Range(10, 10, "Hz")
    assert w.limits["level_v"] == Range(-1.0, 1.0, "V")
    with pytest.raises(LimitError, match="fix the lab configuration"):
        w._narrow_limit("freq_hz", 20, 30, "x")


def test_io_errors_name_the_command_and_report_the_error_queue() -> None:
    w, t = w2()
    t.replies["X?"] = TimeoutError("late")
    t.replies["SYST:ERR?"] = ['-113,"Undefined header"']
    with pytest.raises(InstrumentTimeout, match=r"no reply to 'X\?' within 100 ms \(query\); the instrument "
                                                r"reported: -113") as info:
        w.query("X?")
    assert info.value.command == "X?"
    t.replies["Y?"] = ConnectionError("cable")
    with pytest.raises(DriverError, match=r"query 'Y\?' failed: cable$"):
        w.query("Y?")


def test_error_queue_reading_stops_at_zero_or_a_stale_reply() -> None:
    w, t = w2()
    t.replies["SYST:ERR?"] = ['-100,"a"', '+5,"b"', '0,"No error"', '-1,"never read"']
    assert w.drain_errors() == ['-100,"a"', '+5,"b"']
    t.replies["SYST:ERR?"] = ["1.234"]
    assert w.drain_errors() == ["(unexpected reply '1.234' to SYST:ERR?)"]
    t.replies["SYST:ERR?"] = ['-1,"e"'] * 5
    assert len(w.drain_errors()) == W2.MAX_ERRORS


def test_check_errors_reports_all_and_a_full_queue() -> None:
    w, t = w2()
    w.check_errors()
    t.replies["SYST:ERR?"] = ['-100,"a"', '-200,"b"']
    with pytest.raises(InstrumentError, match=r"reported after 'CMD': -100,\"a\"; -200,\"b\"") as info:
        w.check_errors(after="CMD")
    assert info.value.command == "CMD"
    t.replies["SYST:ERR?"] = ['-1,"e"'] * 5
    with pytest.raises(InstrumentError, match="queue not empty after 3 reads"):
        w.check_errors()
    t.replies["SYST:ERR?"] = ["garbage"]
    with pytest.raises(ProtocolError):
        w.check_errors()
    t.replies["SYST:ERR?"] = ['-1,"e"']
    w.report_errors()  # logged, not raised


def test_wait_complete_and_query_float_and_raw_io() -> None:
    w, t = w2(**{"V?": "1.5,2", "N?": "volts"})
    w.wait_complete()
    t.replies["*OPC?"] = "+1"
    w.wait_complete()
    t.replies["*OPC?"] = "0"
    with pytest.raises(ProtocolError):
        w.wait_complete()
    assert w.query_float("V?") == 1.5
    with pytest.raises(ProtocolError) as info:
        w.query_float("N?")
    assert info.value.command == "N?"
    w.write_raw(b"\x0a\x0b", "MSG")
    assert t.sent[-1] == "0a0b" and w.read_raw(3, "MSG") == b"\x07\x07\x07"
    assert w.timeout_ms == 100.0
    w.timeout_ms = 250
    assert t.timeout_ms == 250 and w.status() == "ok"


def test_close_shuts_down_once_then_closes_the_link() -> None:
    w, t = w2()
    with w:
        pass
    assert t.sent[-1] == "OFF" and t.closed == 1
    w.close()
    assert t.closed == 1 and t.sent.count("OFF") == 1
    w, t = w2()
    with pytest.raises(RuntimeError), w:
        raise RuntimeError("boom")
    assert t.closed == 1 and t.sent[-1] == "OFF"


# --------------------------------------------------------------------------- error details


def test_driver_error_names_instrument_and_command() -> None:
    plain = DriverError("m")
    assert (str(plain), plain.instrument, plain.command) == ("m", "", None)
    named = DriverError("m", instrument="dev", command="C")
    assert (str(named), named.instrument, named.command) == ("dev: m", "dev", "C")


NAME = "w (ACME W2 at GPIB0::9::INSTR)"


def test_every_refusal_names_the_instrument() -> None:
    w, t = w2(**{"LEV?": "abc", "N?": "volts"})
    cases = [
        (lambda: W2.on.command_for(w, 2), LimitError, None),
        (lambda: W2.level_v.command_for(w, math.inf), LimitError, None),
        (lambda: W2.count.command_for(w, 2.5), LimitError, None),
        (lambda: W2.level_v.command_for(w, 5.0), LimitError, None),
        (lambda: w.level_v, ProtocolError, "LEV?"),
        (lambda: w.query_float("N?"), ProtocolError, "N?"),
        (lambda: w._narrow_limit("freq_hz", 200, 300, "x"), LimitError, None),
    ]
    for action, error, command in cases:
        with pytest.raises(error) as info:
            action()
        assert info.value.instrument == NAME and info.value.command == command
        assert str(info.value).startswith(NAME + ": ")
    t.replies["*OPC?"] = "0"
    with pytest.raises(ProtocolError) as info:
        w.wait_complete()
    assert (info.value.instrument, info.value.command) == (NAME, "*OPC?")
    t.replies["SYST:ERR?"] = ["garbage"]
    with pytest.raises(ProtocolError) as info:
        w.check_errors(after="SET 1")
    assert (info.value.instrument, info.value.command) == (NAME, "SET 1")
    assert "unexpected reply 'garbage' to SYST:ERR?" in str(info.value)
    t.replies["SYST:ERR?"] = ["garbage"]
    with pytest.raises(ProtocolError) as info:
        w.check_errors()
    assert info.value.command is None
    t.replies["SYST:ERR?"] = ['-1,"e"']
    with pytest.raises(InstrumentError) as info:
        w.check_errors()
    assert info.value.command is None and str(info.value) == NAME + ': instrument reported: -1,"e"'
    t.replies["*IDN?"] = "OTHER"
    with pytest.raises(base.IdentityError) as info:
        W2(Table(**{"*IDN?": "OTHER"}), name="w")
    assert info.value.instrument == NAME


def test_refusal_at_connect_keeps_the_message() -> None:
    with pytest.raises(LimitError) as info:
        W2(Table(), limits={"level_v": [0, 2]})
    assert str(info.value).startswith("ACME W2 at GPIB0::9::INSTR: level_v [0, 2] is beyond")


class NoClock(W2):
    def _configure(self) -> None:
        raise RuntimeError("configure failed")

    def safe_shutdown(self) -> None:
        raise OSError("shutdown failed")


def test_clock_identity_and_failed_configure() -> None:
    w, _ = w2()
    assert w.clock is base.WALL_CLOCK and w._closed is False
    fake = SimpleNamespace(now_s=lambda: 1.0, sleep=lambda s: None)
    assert W2(Table(), clock=fake).clock is fake
    t = Table()
    with pytest.raises(RuntimeError) as info:
        NoClock(t)
    assert t.closed == 1
    assert info.value.__notes__ == ["while making ACME W2 at GPIB0::9::INSTR safe: shutdown failed"]


class Clearable(Table):
    def __init__(self, **replies: Any) -> None:
        super().__init__(**replies)
        self.clears = 0

    def clear(self) -> None:
        self.clears += 1
        self.sent.append("<clear>")


def test_failed_exchange_clears_then_reads_the_queue_once() -> None:
    t = Clearable()
    w = W2(t)
    t.replies["X?"] = TimeoutError()
    t.replies["SYST:ERR?"] = TimeoutError()  # the queue read fails too: no recursion, no raise
    with pytest.raises(InstrumentTimeout) as info:
        w.query("X?")
    assert str(info.value).endswith("(query); check that the instrument is on and that the address, "
                                    "termination and command are right")
    assert t.sent[-3:] == ["X?", "<clear>", "SYST:ERR?"] and t.clears == 1
    assert w._draining is False
    t.replies["SYST:ERR?"] = ['-5,"late"']
    t.replies["X?"] = ConnectionError("gone")
    with pytest.raises(DriverError, match="the instrument reported: -5") as info:
        w.query("X?")
    assert t.clears == 2 and info.value.command == "X?" and info.value.instrument == W2.MODEL + " at "  \
        + Table.address
    t.write_raw = lambda data: (_ for _ in ()).throw(TimeoutError())  # type: ignore[method-assign]
    with pytest.raises(InstrumentTimeout, match=r"no reply to 'BIN' within 100 ms \(write\)") as info:
        w.write_raw(b"\x00", "BIN")
    assert info.value.command == "BIN"
    t.read_raw = lambda size: (_ for _ in ()).throw(TimeoutError())  # type: ignore[method-assign]
    with pytest.raises(InstrumentTimeout, match=r"no reply to 'BIN' within 100 ms \(read\)"):
        w.read_raw(1, "BIN")


class NoTimeout(Table):
    def __getattribute__(self, name: str) -> Any:
        if name == "timeout_ms":
            raise AttributeError(name)
        return super().__getattribute__(name)


def test_timeout_without_a_transport_timeout_and_no_address() -> None:
    t = NoTimeout()
    w = W2(t)
    t.replies["X?"] = TimeoutError()
    with pytest.raises(InstrumentTimeout, match="within nan ms"):
        w.query("X?")
    del Table.address  # a transport without an address
    try:
        assert w.describe() == "ACME W2 at ?"
    finally:
        Table.address = "GPIB0::9::INSTR"


def test_interrupted_exchange_clears_once_before_the_next() -> None:
    t = Clearable(**{"A?": "1"})
    w = W2(t)
    assert w.query("A?") == "1" and t.clears == 0  # no interruption: no device clear
    w._interrupted = True
    assert w.query("A?") == "1" and w.query("A?") == "1"
    assert t.clears == 1 and t.sent[-3:] == ["<clear>", "A?", "A?"]


def test_report_errors_logs_without_a_command(monkeypatch: pytest.MonkeyPatch) -> None:
    logged: list[str] = []
    monkeypatch.setattr(base.log, "warning", lambda fmt, *args: logged.append(fmt % args))
    w, t = w2()
    t.replies["SYST:ERR?"] = ['-1,"e"']
    w.report_errors()
    assert logged == [NAME + ': instrument reported: -1,"e"']
    t.replies["SYST:ERR?"] = ['-1,"e"']
    w.report_errors(after="C")
    assert "reported after 'C'" in logged[-1]


def test_setting_defaults_and_fields() -> None:
    s = Setting("G?", "S {}", doc="d")
    assert (s.get_cmd, s.set_cmd, s.unit, s.limit, s.fmt, s.parse, s.choices, s.name) == (
        "G?", "S {}", "", None, "{:.6f}", float, None, "")
    assert s.__doc__ == "d"
    w, _ = w2()
    assert s.command_for(w, 1.5) == "S 1.500000"
    assert W2.on.choices == {True: "1", False: "0"} and W2.level_v.limit == "level_v"
    assert W2.level_v.get_cmd == "LEV?" and W2.level_v.set_cmd == "LEV {}" and W2.level_v.unit == "V"


def test_open_visa_refuses_a_locked_address(manager: type[FakeManager]) -> None:
    manager.lock_error = visa_error(pyvisa.constants.StatusCode.error_resource_locked)
    with pytest.raises(ConnectionError, match=r"^GPIB0::4::INSTR is locked by another program"):
        open_visa("GPIB0::4::INSTR", read_termination="\n", write_termination="\n", timeout_ms=1)


def test_refusal_messages_say_what_was_wrong() -> None:
    with pytest.raises(ValueError, match="not a boolean reply: 'maybe'"):
        parse_bool("maybe")
    w, t = w2(**{"N?": "volts"})
    with pytest.raises(ProtocolError, match="reply 'volts' is not a number"):
        w.query_float("N?")
    with pytest.raises(LimitError, match="level_v must be a finite number, got inf; nothing was sent"):
        W2.level_v.command_for(w, math.inf)
    for reply in ("0", "X1"):  # only "1" (or "+1") completes
        t.replies["*OPC?"] = reply
        with pytest.raises(ProtocolError, match=f"unexpected reply '{reply}' to \\*OPC\\?"):
            w.wait_complete()
    t.replies["X?"] = TimeoutError()
    with pytest.raises(InstrumentTimeout) as info:
        w.query("X?")
    assert info.value.instrument == NAME


def test_choices_match_equal_values_that_are_not_the_same_object() -> None:
    class Box(W2):
        mode = Setting("M?", "M {}", choices={"fast": "F", 2: "TWO"}, doc="mode")
        level = Setting("L?", "L {}", limit="level_v", fmt="{:.1f}", doc="level")

    w = Box(Table(), name="w")
    fast = "".join(["fa", "st"])  # equal to "fast", but another object
    assert fast == "fast"
    assert Box.mode.command_for(w, fast) == "M F"
    assert Box.mode.command_for(w, int("2")) == "M TWO"
    with pytest.raises(LimitError):
        Box.mode.command_for(w, 2.0)  # equal, but a float is not the int choice
    assert Box.mode.name == "mode" and Box.level.name == "level"
    with pytest.raises(LimitError):
        Box.level.command_for(w, 3.0)  # the limit is kept: outside level_v
    assert Box.level.command_for(w, 0.5) == "L 0.5"


def test_hard_limits_get_the_validated_options() -> None:
    class Sized(W2):
        OPTIONS = {"size": Option(float, 1.0, "size")}

        @classmethod
        def hard_limits(cls, options: Any = None) -> Limits:
            return Limits({"x_mm": Range(0, options["size"], "mm")})

    assert Sized(Table(), options={"size": 4}).limits["x_mm"] == Range(0, 4.0, "mm")
    assert Sized(Table()).limits["x_mm"] == Range(0, 1.0, "mm")


def test_an_interrupted_exchange_without_device_clear_goes_on() -> None:
    w, t = w2(**{"A?": "1"})
    w._interrupted = True
    assert w.query("A?") == "1" and w._interrupted is False
