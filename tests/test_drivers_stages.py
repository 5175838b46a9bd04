"""Stage drivers: Newport SMC100 on pyvisa-sim, Thorlabs KDC101 against a byte-level APT fake.

pyvisa-sim cannot express the binary APT protocol, so ``FakeKDC101`` below decodes the
driver's messages byte by byte and answers as the controller would (Thorlabs APT
Communications Protocol), including unsolicited MOVE_COMPLETED messages and error reports.
"""

from __future__ import annotations

import struct
from functools import partial
from pathlib import Path

import pytest
from spy import open_spied as spy_open
from spy import sim_backend

from drivers.base import WALL_CLOCK, IdentityError, InstrumentError, InstrumentTimeout, LimitError
from drivers.recording import ExchangeLog, RecordingTransport
from drivers.stages import NewportSMC100, ThorlabsKDC101

LTA = {"stage": "LTA-HS"}
URS = {"stage": "URS100BCC"}


@pytest.fixture
def sim(tmp_path: Path) -> str:
    return sim_backend(tmp_path)


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch):
    monkeypatch.setattr(NewportSMC100, "POLL_S", 0.0)
    monkeypatch.setattr(ThorlabsKDC101, "POLL_S", 0.0)




# =========================================================================== SMC100 on sim


open_spied = partial(spy_open, NewportSMC100)


def test_smc100_move_and_read_back(sim):
    with NewportSMC100.open("ASRL1::INSTR", sim, options=LTA,
                            limits={"position_mm": [1, 40], "velocity_mm_s": [0, 2]}) as x:
        assert x.unit == "mm"
        x.move_abs_mm(12.5)
        assert x.position_mm == pytest.approx(12.5)
        x.move_rel_mm(-2.25)
        assert x.position_mm == pytest.approx(10.25)
        x.velocity_mm_s = 1.5
        assert x.velocity_mm_s == pytest.approx(1.5)
        x.home()
        assert x.error_state() == ""


def test_smc100_rotation_axis_in_degrees(sim):
    with NewportSMC100.open("ASRL4::INSTR", sim, options=URS,
                            limits={"position_deg": [-10, 10]}) as rot:
        rot.move_abs_deg(-7.5)
        rot.move_rel_deg(2.5)
        assert rot.position_deg == pytest.approx(-5.0)
        with pytest.raises(LimitError, match=r"rotary and works in deg; use the _deg calls"):
            rot.move_abs_mm(1.0)
        with pytest.raises(LimitError, match="rotary"):
            _ = rot.position_mm


def test_smc100_controller_limits_and_velocity_set_at_connect(sim):
    x, log = open_spied("ASRL1::INSTR", sim, options=LTA,
                        limits={"position_mm": [0, 30], "velocity_mm_s": [0, 0.5]})
    with x:
        commands = [e["command"] for e in log.entries]
        assert "1SL0.000000" in commands and "1SR30.000000" in commands
        assert "1VA0.500000" in commands  # the controller's 5 mm/s was capped
        assert float(x.query("1SR?")[3:]) == 30
        assert x.velocity_mm_s == pytest.approx(0.5)


def test_smc100_out_of_limit_requests_are_refused_before_sending(sim):
    x, log = open_spied("ASRL1::INSTR", sim, options=LTA,
                        limits={"position_mm": [5, 30], "velocity_mm_s": [0, 1]})
    with x:
        x.move_abs_mm(20)
        before = len(log.entries)
        with pytest.raises(LimitError, match=r"position_mm=31 mm refused \(allowed \[5, 30\] mm\)"):
            x.move_abs_mm(31)
        with pytest.raises(LimitError, match=r"position_mm=4 mm refused"):
            x.move_rel_mm(-16)
        with pytest.raises(LimitError, match="velocity_mm_s"):
            x.velocity_mm_s = 1.2
        with pytest.raises(LimitError, match="velocity must be > 0"):
            x.velocity_mm_s = 0
        with pytest.raises(LimitError, match="linear and works in mm"):
            x.move_abs_deg(3)
        # move_rel_mm reads the position first (1TP) and then refuses: nothing is moved
        assert [e["command"] for e in log.entries[before:]] == ["1TP"]


def test_smc100_instrument_error_is_raised_with_its_own_message(sim):
    with NewportSMC100.open("ASRL1::INSTR", sim, options=LTA) as x:
        with pytest.raises(InstrumentError, match=r"after '1PA99.000000': C - Parameter missing "
                                                  r"or out of range"):
            x.set("1PA99.000000")  # sent without the driver's soft-limit check


def test_smc100_wrong_stage_is_refused(sim):
    with pytest.raises(IdentityError, match=r"says stage 'URS100BCC' but the controller reports "
                                            r"'LTA-HS'"):
        NewportSMC100.open("ASRL1::INSTR", sim, options=URS)


def test_smc100_accepts_a_stage_it_has_no_table_for(sim):
    # A TRA25CC (0-25 mm, 0.4 mm/s) is not in the driver's table: it is accepted, its travel
    # and speed come from the controller's own SL/SR and VA.
    for options in ({"stage": "TRA25CC"}, {}):
        with NewportSMC100.open("ASRL5::INSTR", sim, options=options) as x:
            assert x.stage.name == "TRA25CC" and x.unit == "mm"
            assert (x.limits["position_mm"].min, x.limits["position_mm"].max) == (0.0, 25.0)
            assert x.limits["velocity_mm_s"].max == pytest.approx(0.4)
            x.move_abs_mm(12.0)
            assert x.position_mm == pytest.approx(12.0)
            with pytest.raises(LimitError, match=r"position_mm=30 mm refused"):
                x.move_abs_mm(30.0)


def test_smc100_config_limits_win_for_an_unknown_stage(sim):
    with NewportSMC100.open("ASRL5::INSTR", sim, options={"stage": "TRA25CC"},
                            limits={"position_mm": [2, 20], "velocity_mm_s": [0, 0.2]}) as x:
        assert (x.limits["position_mm"].min, x.limits["position_mm"].max) == (2.0, 20.0)
        assert x.limits["velocity_mm_s"].max == pytest.approx(0.2)
        assert float(x.query("1SR?")[3:]) == 20  # mirrored into the controller


def test_smc100_known_stage_reported_when_none_is_configured(sim):
    with NewportSMC100.open("ASRL1::INSTR", sim) as x:  # no stage option: LTA-HS reported
        assert x.stage.name == "LTA-HS"
        assert (x.limits["position_mm"].min, x.limits["position_mm"].max) == (0.0, 50.0)
    with pytest.raises(IdentityError, match=r"reports stage 'URS100BCC', which works in deg"):
        NewportSMC100.open("ASRL4::INSTR", sim)  # a rotation stage, used as a linear axis
    with pytest.raises(IdentityError, match=r"says stage 'TRA12CC' but the controller reports "
                                            r"'TRA25CC'"):
        NewportSMC100.open("ASRL5::INSTR", sim, options={"stage": "TRA12CC"})


def test_smc100_timeout(sim):
    with pytest.raises(InstrumentTimeout, match=r"Newport SMC100 at ASRL9::INSTR: no reply to "
                                                r"'1VE' within 50 ms"):
        NewportSMC100.open("ASRL9::INSTR", sim, options=LTA, timeout_ms=50)


class ScriptedSMC100:
    """A text transport whose TS reply follows a script, for motion-error paths."""

    address = "ASRL7::INSTR"

    def __init__(self, ts_replies: list[str]) -> None:
        self.ts_replies, self.sent, self.timeout_ms = ts_replies, [], 100.0

    def write(self, command: str) -> None:
        self.sent.append(command)

    def query(self, command: str) -> str:
        self.sent.append(command)
        replies = {"1VE": "1VE SMC_CC - Controller-driver version 3.0.1", "1ID?": "1IDLTA-HS",
                   "1TE": "1TE@", "1TP": "1TP10.000000", "1VA?": "1VA1.000000"}
        if command == "1TS":
            return self.ts_replies.pop(0) if len(self.ts_replies) > 1 else self.ts_replies[0]
        return replies[command]

    def write_raw(self, data: bytes) -> None:
        raise AssertionError("SMC100 is a text protocol")

    def read_raw(self, size: int) -> bytes:
        raise AssertionError("SMC100 is a text protocol")

    def close(self) -> None:
        self.sent.append("<close>")


def test_smc100_home_search_from_not_referenced():
    # connect, home check: NOT REFERENCED; then HOMING twice; then READY from HOMING
    fake = ScriptedSMC100(["1TS00000A", "1TS00000A", "1TS00001E", "1TS00001E", "1TS000032"])
    x = NewportSMC100(fake, options=LTA, limits={"position_mm": [2, 40],
                                                  "velocity_mm_s": [0, 0.5]})
    assert "1SL" not in " ".join(fake.sent)  # limits are mirrored only once referenced
    x.home()
    after = fake.sent[fake.sent.index("1OR"):]
    assert after[:2] == ["1OR", "1TE"]
    assert after.count("1TS") == 3
    assert ["1SL0.000000", "1TE", "1SR40.000000", "1TE", "1VA?", "1VA0.500000", "1TE"] == \
        after[-7:]


def test_smc100_following_error_during_a_move_stops_the_axis():
    fake = ScriptedSMC100(["1TS000033", "1TS000028", "1TS002028"])  # READY, MOVING, error
    x = NewportSMC100(fake, options=LTA)
    with pytest.raises(InstrumentError, match="stage error during motion: following error"):
        x.move_abs_mm(20)
    assert fake.sent[-1] == "1ST"


def test_smc100_move_timeout_stops_the_axis():
    fake = ScriptedSMC100(["1TS000033", "1TS000028"])  # then MOVING for ever
    x = NewportSMC100(fake, options=LTA)
    with pytest.raises(InstrumentTimeout, match=r"still moving after 0.05 s \(MOVING\); motion "
                                                r"stopped"):
        x.move_abs_mm(20, timeout_s=0.05)
    assert fake.sent[-1] == "1ST"
    x.close()
    assert fake.sent[-2:] == ["1ST", "<close>"]


class FakeClock:
    """Lab time that passes only when someone sleeps on it."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self.t_s = start_s

    def now_s(self) -> float:
        return self.t_s

    def sleep(self, seconds: float) -> None:
        self.t_s += seconds


def test_a_driver_waits_on_the_wall_clock_unless_given_another():
    assert NewportSMC100(ScriptedSMC100(["1TS000033"]), options=LTA).clock is WALL_CLOCK


def test_smc100_polls_and_times_out_on_the_clock_it_was_opened_with(mocker, monkeypatch):
    monkeypatch.setattr(NewportSMC100, "POLL_S", 0.5)
    wall_sleep = mocker.patch("drivers.base.time.sleep")
    wall_now = mocker.spy(WALL_CLOCK, "now_s")
    clock = FakeClock()
    sleep, now = mocker.spy(clock, "sleep"), mocker.spy(clock, "now_s")
    fake = ScriptedSMC100(["1TS000033", "1TS000028"])  # READY, then MOVING for ever
    x = NewportSMC100(fake, options=LTA, clock=clock)
    assert x.clock is clock
    with pytest.raises(InstrumentTimeout, match=r"still moving after 30 s"):
        x.move_abs_mm(20, timeout_s=30)
    # a poll every 0.5 s of the fake clock's time until it is past the 30 s deadline
    assert sleep.call_count == 61 and {c.args for c in sleep.call_args_list} == {(0.5,)}
    assert clock.t_s == pytest.approx(1030.5) and now.call_count == 1 + 62  # deadline, checks
    assert fake.sent[-1] == "1ST"  # stopped after the timeout
    wall_sleep.assert_not_called()
    wall_now.assert_not_called()


def test_an_explicit_sleep_still_replaces_the_clocks_between_polls(mocker):
    clock = FakeClock()
    clock_sleep = mocker.spy(clock, "sleep")
    pauses: list[float] = []

    def pause(seconds: float) -> None:  # the caller's own wait; lab time passes all the same
        pauses.append(seconds)
        clock.t_s += 1.0

    x = NewportSMC100(ScriptedSMC100(["1TS000033", "1TS000028"]), options=LTA, clock=clock)
    with pytest.raises(InstrumentTimeout):
        x.wait_until_stopped(2.5, sleep=pause)
    assert len(pauses) == 3 and clock_sleep.call_count == 0  # the deadline is the clock's


# =========================================================================== KDC101 APT fake


COUNTS_PER_MM = 34554.96


class FakeKDC101:
    """Byte-level model of a KDC101 with a Z825B: decodes APT messages, queues replies."""

    address = "ASRL/dev/ttyUSB0::INSTR"

    def __init__(self, *, position_mm: float = 5.0, polls_per_move: int = 2) -> None:
        self.timeout_ms = 100.0
        self.out = bytearray()
        self.received: list[tuple[int, bytes]] = []
        self.counts = round(position_mm * COUNTS_PER_MM)
        self.target = self.counts
        self.moving_polls = 0
        self.polls_per_move = polls_per_move
        self.homing = False
        self.homed = False
        self.enabled = False
        self.fault_bits = 0
        self.vel = (0, 263844, round(2.6 * 772981.3692))  # min, accel, max (device units)
        self.mute = False
        self.reject_next_move: str | None = None
        self.move_forever = False
        self.closed = False

    # -- helpers to build replies
    def _short(self, msg_id: int, p1: int = 1, p2: int = 0) -> None:
        self.out += struct.pack("<HBBBB", msg_id, p1, p2, 0x01, 0x50)

    def _long(self, msg_id: int, data: bytes) -> None:
        self.out += struct.pack("<HHBB", msg_id, len(data), 0x01 | 0x80, 0x50) + data

    def _status_data(self) -> bytes:
        bits = 0x80000000 | 0x00000100 | self.fault_bits
        if self.moving_polls:
            bits |= 0x00000200 if self.homing else 0x00000010
        if self.homed:
            bits |= 0x00000400
        return struct.pack("<HiHhI", 1, self.counts, 0, 0, bits)

    # -- Transport
    def write(self, command: str) -> None:
        raise AssertionError("KDC101 is a binary protocol")

    def query(self, command: str) -> str:
        raise AssertionError("KDC101 is a binary protocol")

    def write_raw(self, data: bytes) -> None:
        msg_id, = struct.unpack_from("<H", data)
        has_data = bool(data[4] & 0x80)
        assert data[4] & 0x7F == 0x50 and data[5] == 0x01, "wrong destination/source bytes"
        if has_data:
            size, = struct.unpack_from("<H", data, 2)
            assert len(data) == 6 + size, "data length field does not match"
        else:
            assert len(data) == 6
        payload = data[6:]
        self.received.append((msg_id, bytes(data)))
        if msg_id == 0x0005:  # HW_REQ_INFO
            info = struct.pack("<I8sH4s60sHHH", 27000123, b"KDC101\x00\x00", 16,
                               bytes([7, 0, 3, 0]), bytes(60), 1, 0, 1)
            self._long(0x0006, info)
        elif msg_id == 0x0210:  # MOD_SET_CHANENABLESTATE
            self.enabled = data[3] == 0x01
        elif msg_id == 0x0414:  # MOT_REQ_VELPARAMS
            self._long(0x0415, struct.pack("<Hiii", 1, *self.vel))
        elif msg_id == 0x0413:  # MOT_SET_VELPARAMS
            _, vmin, accel, vmax = struct.unpack("<Hiii", payload)
            self.vel = (vmin, accel, vmax)
        elif msg_id == 0x0411:  # MOT_REQ_POSCOUNTER
            self._long(0x0412, struct.pack("<Hi", 1, self.counts))
        elif msg_id == 0x0453:  # MOT_MOVE_ABSOLUTE
            if self.reject_next_move:
                notes = self.reject_next_move.encode().ljust(64, b"\x00")
                self._long(0x0081, struct.pack("<HH", 0x0453, 42) + notes)
                self.reject_next_move = None
                return
            _, self.target = struct.unpack("<Hi", payload)
            self.moving_polls = 10**9 if self.move_forever else self.polls_per_move
        elif msg_id == 0x0443:  # MOT_MOVE_HOME
            self.homing, self.target = True, 0
            self.moving_polls = self.polls_per_move
        elif msg_id == 0x0465:  # MOT_MOVE_STOP
            self.moving_polls = 0
            self.target = self.counts
            self._long(0x0466, self._status_data())
        elif msg_id == 0x0490:  # MOT_REQ_DCSTATUSUPDATE
            if self.moving_polls:
                self.moving_polls -= 1
                self.counts += (self.target - self.counts) // 2
                if not self.moving_polls:
                    self.counts = self.target
                    if self.homing:
                        self.homing, self.homed = False, True
                        self._short(0x0444)  # MOVE_HOMED, unsolicited
                    else:
                        self._long(0x0464, self._status_data())  # MOVE_COMPLETED, unsolicited
            self._long(0x0491, self._status_data())

    def read_raw(self, size: int) -> bytes:
        if self.mute or len(self.out) < size:
            raise TimeoutError("VISA timeout")
        chunk, self.out = bytes(self.out[:size]), self.out[size:]
        return chunk

    def close(self) -> None:
        self.closed = True

    def sent_ids(self) -> list[int]:
        return [msg_id for msg_id, _ in self.received]


def kdc(fake: FakeKDC101, **kwargs) -> ThorlabsKDC101:
    kwargs.setdefault("options", {"stage": "Z825B"})
    return ThorlabsKDC101(fake, **kwargs)


def test_kdc101_identity_enable_and_velocity_cap_at_connect():
    fake = FakeKDC101()
    stage = kdc(fake, limits={"velocity_mm_s": [0, 1.0]})
    assert stage.identity == "Thorlabs,KDC101,27000123,fw 3.0.7"
    assert fake.enabled
    assert fake.vel[2] == round(1.0 * 772981.3692)  # MOT_SET_VELPARAMS with the capped max
    assert stage.velocity_mm_s == pytest.approx(1.0, abs=1e-6)
    assert fake.sent_ids()[:2] == [0x0005, 0x0210]


def test_kdc101_move_bytes_position_and_unsolicited_messages():
    fake = FakeKDC101(position_mm=5.0)
    stage = kdc(fake)
    assert stage.position_mm == pytest.approx(5.0, abs=1 / COUNTS_PER_MM)
    stage.move_abs_mm(12.0)
    counts = round(12.0 * COUNTS_PER_MM)
    move = [raw for msg_id, raw in fake.received if msg_id == 0x0453][0]
    # header: id 0x0453, 6 data bytes, dest 0x50|0x80, source 0x01; data: channel 1, position
    assert move == bytes([0x53, 0x04, 0x06, 0x00, 0xD0, 0x01, 0x01, 0x00]) + \
        struct.pack("<i", counts)
    assert stage.position_mm == pytest.approx(12.0, abs=1 / COUNTS_PER_MM)
    stage.move_rel_mm(-3.5)
    assert stage.position_mm == pytest.approx(8.5, abs=1 / COUNTS_PER_MM)
    stage.home()
    assert stage.position_mm == 0.0 and fake.homed


def test_kdc101_rotation_mount_in_degrees():
    fake = FakeKDC101(position_mm=0.0)
    rot = kdc(fake, options={"stage": "PRM1Z8"}, limits={"position_deg": [-10, 10]})
    rot.move_abs_deg(7.5)
    _, raw = [m for m in fake.received if m[0] == 0x0453][0]
    assert struct.unpack_from("<i", raw, 8)[0] == round(7.5 * 1919.6418578623391)
    assert rot.position_deg == pytest.approx(7.5, abs=1e-3)
    with pytest.raises(LimitError, match="rotary"):
        rot.move_rel_mm(1)


def test_kdc101_out_of_limit_requests_are_refused_before_sending():
    fake = FakeKDC101()
    stage = kdc(fake, limits={"position_mm": [2, 23], "velocity_mm_s": [0, 1]})
    before = len(fake.received)
    with pytest.raises(LimitError, match=r"position_mm=24 mm refused \(allowed \[2, 23\] mm\)"):
        stage.move_abs_mm(24)
    with pytest.raises(LimitError, match="velocity_mm_s"):
        stage.velocity_mm_s = 2.0
    with pytest.raises(LimitError, match="position_mm"):
        stage.move_abs_mm(float("nan"))
    assert fake.received[before:] == []


def test_kdc101_config_cannot_loosen_the_stage_travel():
    with pytest.raises(LimitError, match=r"beyond what the instrument can do.*\[0, 25\] mm"):
        kdc(FakeKDC101(), limits={"position_mm": [0, 30]})


def test_kdc101_controller_error_is_raised_with_its_own_message():
    fake = FakeKDC101()
    stage = kdc(fake)
    fake.reject_next_move = "Move rejected: axis not enabled"
    with pytest.raises(InstrumentError, match=r"controller reported error 42 about "
                                              r"MGMSG_MOT_MOVE_ABSOLUTE \(0x0453\): Move rejected: "
                                              r"axis not enabled"):
        stage.move_abs_mm(10)


def test_kdc101_fault_during_motion_stops_the_axis():
    fake = FakeKDC101()
    stage = kdc(fake)
    fake.move_forever = True
    original = fake.write_raw

    def write_raw(data: bytes) -> None:
        original(data)
        if struct.unpack_from("<H", data)[0] == 0x0490 and fake.moving_polls:
            fake.fault_bits = 0x01000000  # motor overload appears during the move

    fake.write_raw = write_raw  # type: ignore[method-assign]
    with pytest.raises(InstrumentError, match="stage error during motion: motor overload"):
        stage.move_abs_mm(20)
    assert fake.sent_ids()[-1] == 0x0465  # MOVE_STOP


def test_kdc101_move_timeout_stops_the_axis():
    fake = FakeKDC101()
    stage = kdc(fake)
    fake.move_forever = True
    with pytest.raises(InstrumentTimeout, match=r"still moving after 0.02 s"):
        stage.move_abs_mm(20, timeout_s=0.02)
    stop = [raw for msg_id, raw in fake.received if msg_id == 0x0465][-1]
    assert stop == bytes([0x65, 0x04, 0x01, 0x02, 0x50, 0x01])  # channel 1, profiled stop


def test_kdc101_opened_with_a_clock_polls_and_times_out_on_it(mocker, monkeypatch):
    monkeypatch.setattr(ThorlabsKDC101, "POLL_S", 0.25)
    clock = FakeClock()
    sleep = mocker.spy(clock, "sleep")
    fake = FakeKDC101()
    stage = kdc(fake, clock=clock)
    fake.move_forever = True
    with pytest.raises(InstrumentTimeout, match=r"still moving after 7 s"):
        stage.move_abs_mm(20, timeout_s=7)
    assert sleep.call_count == 29 and clock.t_s == pytest.approx(1007.25)


def test_kdc101_timeout_names_instrument_and_message():
    fake = FakeKDC101()
    fake.mute = True
    with pytest.raises(InstrumentTimeout, match=r"stage.x \(Thorlabs KDC101 at ASRL/dev/ttyUSB0::"
                                                r"INSTR\): no reply to 'MGMSG_HW_REQ_INFO "
                                                r"\(0x0005\)'"):
        kdc(fake, name="stage.x")
    assert fake.closed


def test_kdc101_close_and_exceptions_stop_the_axis():
    fake = FakeKDC101()
    with pytest.raises(KeyboardInterrupt):
        with kdc(fake):
            raise KeyboardInterrupt
    assert fake.sent_ids()[-1] == 0x0465 and fake.closed


def test_kdc101_through_a_recording_transport_keeps_bytes():
    fake = FakeKDC101()
    log = ExchangeLog()
    stage = kdc(RecordingTransport(fake, log, "x"))  # type: ignore[arg-type]
    stage.move_abs_mm(1.0)
    ops = {e["op"] for e in log.entries}
    assert ops == {"write_raw", "read_raw"}
    first = log.entries[0]
    assert first["command"] == "050000005001"  # HW_REQ_INFO as hex
