"""The shared driver machinery: limits that only tighten, settings, I/O errors, safe close."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.base import (
    DriverError,
    InstrumentError,
    InstrumentTimeout,
    LimitError,
    Limits,
    OptionError,
    Range,
    ScpiInstrument,
    Setting,
    parse_limit_spec,
)
from drivers.registry import DRIVERS, driver_class, hard_limits


class TableTransport:
    """Answers queries from a table; records everything; can fail on demand."""

    address = "GPIB0::5::INSTR"

    def __init__(self, replies: dict[str, str]) -> None:
        self.replies, self.sent, self.timeout_ms = dict(replies), [], 1000.0
        self.fail_with: Exception | None = None

    def write(self, command: str) -> None:
        self.sent.append(command)
        if self.fail_with is not None:
            raise self.fail_with

    def query(self, command: str) -> str:
        self.sent.append(command)
        if self.fail_with is not None:
            raise self.fail_with
        value = self.replies[command]
        if command == "SYST:ERR?" and isinstance(value, list):
            return value.pop(0) if value else '0,"No error"'
        return value

    def write_raw(self, data: bytes) -> None:
        raise NotImplementedError

    def read_raw(self, size: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        self.sent.append("<close>")


class Widget(ScpiInstrument):
    MODEL = "ACME W1"
    KIND = "widget"
    IDN_PATTERN = r"^ACME,W1,"
    HARD_LIMITS = {"level_v": Range(-1.0, 1.0, "V")}
    level_v = Setting("LEV?", "LEV {}", unit="V", limit="level_v", fmt="{:.3f}", doc="level")
    mode = Setting("MODE?", "MODE {}", choices={"fast": "FAST", "slow": "SLOW"},
                   parse=lambda r: r.lower(), doc="mode")

    def safe_shutdown(self) -> None:
        self.write("OFF")


def widget(**replies: str) -> tuple[Widget, TableTransport]:
    table = {"*IDN?": "ACME,W1,123,1.0", "SYST:ERR?": '0,"No error"', "LEV?": "0.250",
             "MODE?": "FAST"}
    table.update(replies)
    transport = TableTransport(table)
    return Widget(transport, name="w"), transport


# --------------------------------------------------------------------------- limits


def test_range_check_and_message():
    r = Range(-1, 2.5, "V")
    assert r.check("v", 2.5) == 2.5
    with pytest.raises(LimitError, match=r"v=3 V refused \(allowed \[-1, 2.5\] V\); nothing "
                                         r"was sent"):
        r.check("v", 3)
    for bad in (float("nan"), "1", None, True):
        with pytest.raises(LimitError):
            r.check("v", bad)
    with pytest.raises(ValueError):
        Range(2, 1, "V")


def test_limits_only_tighten():
    hard = Limits({"power_dbm": Range(-145, 30, "dBm"), "freq_hz": Range(9e3, 6e9, "Hz")})
    tight = hard.tightened({"power_dbm": [-40, 10], "freq_hz": {"max": 3.2e9}})
    assert tight["power_dbm"] == Range(-40, 10, "dBm")
    assert tight["freq_hz"] == Range(9e3, 3.2e9, "Hz")
    assert hard["power_dbm"] == Range(-145, 30, "dBm")  # the original is unchanged
    with pytest.raises(LimitError, match=r"beyond what the instrument can do; allowed within "
                                         r"\[-40, 10\] dBm"):
        tight.tightened({"power_dbm": [-40, 12]})  # cannot loosen an already tightened limit
    with pytest.raises(LimitError, match="unknown limit 'power_mw'; allowed: power_dbm"):
        hard.tightened({"power_mw": [0, 1]})
    with pytest.raises(LimitError, match="empty"):
        hard.tightened({"power_dbm": {"min": 5, "max": 0}})


@pytest.mark.parametrize("spec", ["10", [1], [1, 2, 3], {"lo": 1}, {}, [1, "x"],
                                  [float("inf"), 1]])
def test_limit_spec_must_be_min_max(spec):
    with pytest.raises(LimitError, match="p"):
        parse_limit_spec(spec, "p")


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(lo=finite, hi=finite, new_lo=finite, new_hi=finite)
def test_tightening_never_widens(lo, hi, new_lo, new_hi):
    if lo > hi:
        lo, hi = hi, lo
    base = Range(lo, hi, "u")
    try:
        result = base.tightened(new_lo, new_hi)
    except LimitError:
        assert new_lo < lo or new_hi > hi or new_lo > new_hi
    else:
        assert lo <= result.min <= result.max <= hi


# --------------------------------------------------------------------------- settings


def test_setting_formats_checks_then_sends_and_checks_errors():
    w, t = widget()
    w.level_v = 0.5
    assert t.sent[-2:] == ["LEV 0.500", "SYST:ERR?"]
    assert w.level_v == 0.25
    w.mode = "slow"
    assert t.sent[-2:] == ["MODE SLOW", "SYST:ERR?"]
    assert w.mode == "fast"
    before = len(t.sent)
    with pytest.raises(LimitError, match=r"level_v=1.001 V refused"):
        w.level_v = 1.0006  # formatted to 1.001 before the check
    with pytest.raises(LimitError, match="allowed: 'fast', 'slow'"):
        w.mode = "FAST"
    assert t.sent[before:] == []
    assert Widget.level_v.unit == "V" and "level (V)" in Widget.level_v.__doc__


def test_instrument_errors_are_collected_from_the_queue():
    w, t = widget()
    t.replies["SYST:ERR?"] = ['-222,"Data out of range"', '-221,"Settings conflict"']
    with pytest.raises(InstrumentError) as info:
        w.level_v = 0.1
    assert str(info.value) == ('w (ACME W1 at GPIB0::5::INSTR): instrument reported after '
                               '\'LEV 0.100\': -222,"Data out of range"; -221,"Settings conflict"')
    assert info.value.command == "LEV 0.100"


def test_transport_timeouts_and_link_errors_name_instrument_and_command():
    w, t = widget()
    t.fail_with = TimeoutError("VISA timeout")
    with pytest.raises(InstrumentTimeout, match=r"w \(ACME W1 at GPIB0::5::INSTR\): no reply to "
                                                r"'LEV\?' within 1000 ms"):
        _ = w.level_v
    t.fail_with = ConnectionError("VISA error: resource not found")
    with pytest.raises(DriverError, match=r"write 'LEV 0.100' failed: VISA error"):
        w.level_v = 0.1


def test_an_interrupted_query_does_not_desynchronise_the_next_exchange():
    """Ctrl-C/SIGTERM between a query's write and its read leaves the reply in the instrument's
    output queue; the shutdown that follows must not read it as the answer to its own query:
    the next exchange starts with a device clear (seen on the virtual lab: the shutdown's
    *OPC? read a stale error-queue reply and RF stayed on)."""

    class Buffered(TableTransport):
        def __init__(self, replies):
            super().__init__(replies)
            self.pending: list[str] = []
            self.interrupt_next_read = False

        def query(self, command):
            self.sent.append(command)
            self.pending.append(self.replies[command])
            if self.interrupt_next_read:
                self.interrupt_next_read = False
                raise KeyboardInterrupt
            return self.pending.pop(0)

        def clear(self):
            self.sent.append("<clear>")
            self.pending.clear()

    t = Buffered({"*IDN?": "ACME,W1,123,1.0", "SYST:ERR?": '0,"No error"', "LEV?": "0.250",
                  "MODE?": "FAST"})
    w = Widget(t, name="w")
    t.interrupt_next_read = True
    with pytest.raises(KeyboardInterrupt):
        _ = w.level_v
    assert w.mode == "fast"  # not the stale "0.250"
    assert t.sent[-2:] == ["<clear>", "MODE?"]


def test_identity_mismatch_sends_nothing_else():
    t = TableTransport({"*IDN?": "OTHER,THING,1,1"})
    with pytest.raises(DriverError, match=r"expected a ACME W1 .* answered 'OTHER,THING,1,1'"):
        Widget(t)
    assert t.sent == ["*IDN?", "<close>"]


def test_options_are_validated():
    with pytest.raises(OptionError, match="unknown option 'speed'; allowed: none"):
        Widget.validate_options({"speed": 1})


# --------------------------------------------------------------------------- safe close


def test_with_block_makes_safe_on_exception_and_keeps_the_error():
    w, t = widget()
    with pytest.raises(KeyError, match="bug"):
        with w:
            raise KeyError("bug")
    assert t.sent[-2:] == ["OFF", "<close>"]


def test_failing_shutdown_is_added_to_the_original_error():
    w, t = widget()
    with pytest.raises(ValueError) as info:
        with w:
            t.fail_with = TimeoutError("dead")
            raise ValueError("measurement failed")
    assert any("while making w (ACME W1 at GPIB0::5::INSTR) safe" in n
               for n in info.value.__notes__)
    assert t.sent[-1] == "<close>"  # the connection is released even so


def test_close_is_idempotent_and_reports_a_failed_shutdown():
    w, t = widget()
    t.fail_with = TimeoutError("dead")
    with pytest.raises(InstrumentTimeout, match="'OFF'"):
        w.close()
    w.close()
    assert t.sent.count("<close>") == 1


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_driver_with_limits():
    for name, cls in DRIVERS.items():
        assert cls.MODEL and cls.KIND and cls.IDN_PATTERN, name
        assert len(hard_limits(name)) >= 1, name
        for limit, rng in hard_limits(name).items():
            assert rng.unit or limit == "port", (name, limit)
    assert hard_limits("thorlabs_kdc101", {"stage": "PRM1Z8"})["position_deg"].unit == "deg"
    with pytest.raises(KeyError, match="unknown driver 'nope'; known: rs_smb100a"):
        driver_class("nope")
