"""Thorlabs KDC101 (APT binary protocol) against a message definition written from the manual.

Issue 17 for the one binary driver: pyvisa-sim cannot express APT, and ``Kdc101Model`` (virtual
lab) and ``FakeKDC101`` (test_drivers_stages) were written alongside the driver, so neither
counts as independent. ``APT`` below is written from the Thorlabs "APT Controllers
Host-Controller Communications Protocol" (Kinesis-era issues: "Thorlabs Motion Controllers
Host-Controller Communications Protocol"); nothing here imports the driver's constants.
Section names are the document's headings; its messages are headed by their MGMSG_ names
under "Generic System Control Messages" (MGMSG_HW_*, MGMSG_MOD_*) and "Motor Control
Messages" (MGMSG_MOT_*). Cross-checked against public drivers that spell the same IDs and
layouts: yaq-project/thorlabs-apt-protocol (functions.py, parsing.py), AlexShkarin/pyLabLib
(devices/Thorlabs/kinesis.py), thorpy (message definitions), POSICS-II/thorlabs-apt-device.

``AptController`` is a byte-level controller driven by that table: it refuses (raises
``NotInManual``) any message that is not in the table, goes the wrong way, has the wrong
header form, length, destination or source byte, or a parameter outside the documented
values; it answers with messages packed from the same table. Every public method of
``ThorlabsKDC101`` is exercised on a linear and a rotary stage, and the encodings (position
counts, velocity units) are checked against scale factors derived from the manual. The last
tests misspell each message ID on the wire and require the exercise to fail.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import pytest

from drivers.base import DriverError, InstrumentError, InstrumentTimeout
from drivers.stages import ThorlabsKDC101

# --------------------------------------------------------------------------- the manual

# "Introduction" / "Message Header" / "Data Packet": every message starts with a 6-byte header,
# little-endian ("Intel") byte order. Header-only form: message ID (word), param1 (byte),
# param2 (byte), destination (byte), source (byte). With a data packet following: message ID
# (word), data packet length (word), destination | 0x80, source; then the data packet.
# "Format Specifiers": word = u16, short = i16, dword = u32, long = i32, char[n] = bytes.
# "Source and Destination" identifiers: 0x01 host controller (the PC), 0x11 rack controller,
# 0x21.. bays, 0x50 generic USB hardware unit (a single-channel K-Cube such as the KDC101).
HOST = 0x01
USB_UNIT = 0x50
HAS_DATA = 0x80
CHANNEL_1 = 0x01  # chan ident of the only channel of a single-channel K-Cube

TO_CTRL, TO_HOST = "host->controller", "controller->host"

# DC status block: MOT_GET_DCSTATUSUPDATE, and (DC servo controllers) MOT_MOVE_COMPLETED and
# MOT_MOVE_STOPPED carry the same 14 bytes. Byte 8-9 is "velocity" (word) and 10-11 was
# "reserved" in older issues, "motor current" (short) in Kinesis-era issues; yaq names them
# velocity + unused, thorpy velocity + None: all agree on position at offset 2 and status bits
# at offset 10 of the data, which is what matters. This table uses the Kinesis-era names.
DC_STATUS = (("chan_ident", "H"), ("position", "i"), ("velocity", "H"),
             ("motor_current", "h"), ("status_bits", "I"))

# Status bits (MOT_GET_DCSTATUSUPDATE, "status bits" table; P_MOT_SB_*; thormotion cites
# Issue 39 p. 126; pyLabLib kinesis.py status_bits agrees bit for bit).
SB_CW_HARDLIMIT = 0x00000001
SB_CCW_HARDLIMIT = 0x00000002
SB_INMOTION_CW = 0x00000010  # moving forward
SB_INMOTION_CCW = 0x00000020  # moving reverse
SB_JOGGING_CW = 0x00000040
SB_JOGGING_CCW = 0x00000080
SB_CONNECTED = 0x00000100
SB_HOMING = 0x00000200
SB_HOMED = 0x00000400
SB_POSITION_ERROR = 0x00004000  # "motion error": outside the trajectory margin
SB_OVERLOAD = 0x01000000  # motor current limit reached
SB_ENABLED = 0x80000000  # channel enabled


@dataclass(frozen=True)
class AptDef:
    """One message as the manual defines it."""

    name: str
    direction: str
    #: Data-packet fields (name, struct code) in order; ``None`` = header-only message.
    data: tuple[tuple[str, str], ...] | None
    #: Data-packet length the manual states (bytes); checked against ``data``.
    length: int = 0
    #: Header-only form: (meaning, allowed values) of param1 and param2.
    params: tuple[tuple[str, frozenset[int]], tuple[str, frozenset[int]]] = (
        ("unused", frozenset({0})), ("unused", frozenset({0})))
    #: The message may also be sent header-only (param1 = chan ident), using stored parameters.
    header_form_too: bool = False
    #: Where the manual defines it.
    source: str = ""

    @property
    def fmt(self) -> str:
        return "<" + "".join(code for _, code in self.data or ())


CHAN = ("chan ident", frozenset({CHANNEL_1}))
NONE = ("unused", frozenset({0}))

APT: dict[int, AptDef] = {
    0x0005: AptDef("MGMSG_HW_REQ_INFO", TO_CTRL, None,
                   source="Generic System Control Messages, MGMSG_HW_REQ_INFO: header only, "
                          "param1 = param2 = 0; answered with MGMSG_HW_GET_INFO"),
    0x0006: AptDef("MGMSG_HW_GET_INFO", TO_HOST,
                   (("serial_number", "I"), ("model_number", "8s"), ("type", "H"),
                    ("firmware_version", "4s"), ("notes", "48s"), ("empty", "12s"),
                    ("hw_version", "H"), ("mod_state", "H"), ("nchs", "H")), 84,
                   source="Generic System Control Messages, MGMSG_HW_GET_INFO: 84-byte packet; "
                          "firmware bytes = minor, interim, major, unused (pyLabLib reads "
                          "[14:17] reversed; yaq lumps notes+empty as 60s: same 84 bytes)"),
    0x0080: AptDef("MGMSG_HW_RESPONSE", TO_HOST, None,
                   source="Generic System Control Messages, MGMSG_HW_RESPONSE: header only, "
                          "sent by the controller on a fault"),
    0x0081: AptDef("MGMSG_HW_RICHRESPONSE", TO_HOST,
                   (("msg_ident", "H"), ("code", "H"), ("notes", "64s")), 68,
                   source="Generic System Control Messages, MGMSG_HW_RICHRESPONSE: 68-byte "
                          "packet: message the error is about, error code, 64-char text"),
    0x0210: AptDef("MGMSG_MOD_SET_CHANENABLESTATE", TO_CTRL, None,
                   params=(CHAN, ("enable state: 0x01 enable, 0x02 disable",
                                  frozenset({0x01, 0x02}))),
                   source="Generic System Control Messages, MGMSG_MOD_SET_CHANENABLESTATE: "
                          "header only, param1 chan ident, param2 enable state"),
    0x0411: AptDef("MGMSG_MOT_REQ_POSCOUNTER", TO_CTRL, None, params=(CHAN, NONE),
                   source="Motor Control Messages, MGMSG_MOT_REQ_POSCOUNTER: header only, "
                          "param1 chan ident; answered with MGMSG_MOT_GET_POSCOUNTER"),
    0x0412: AptDef("MGMSG_MOT_GET_POSCOUNTER", TO_HOST,
                   (("chan_ident", "H"), ("position", "i")), 6,
                   source="Motor Control Messages, MGMSG_MOT_SET/REQ/GET_POSCOUNTER: 6 bytes, "
                          "chan ident (word), position (long, encoder counts)"),
    0x0413: AptDef("MGMSG_MOT_SET_VELPARAMS", TO_CTRL,
                   (("chan_ident", "H"), ("min_velocity", "i"), ("acceleration", "i"),
                    ("max_velocity", "i")), 14,
                   source="Motor Control Messages, MGMSG_MOT_SET_VELPARAMS: 14 bytes, chan "
                          "ident, min velocity, acceleration, max velocity (longs, APT units)"),
    0x0414: AptDef("MGMSG_MOT_REQ_VELPARAMS", TO_CTRL, None, params=(CHAN, NONE),
                   source="Motor Control Messages, MGMSG_MOT_REQ_VELPARAMS: header only, "
                          "param1 chan ident; answered with MGMSG_MOT_GET_VELPARAMS"),
    0x0415: AptDef("MGMSG_MOT_GET_VELPARAMS", TO_HOST,
                   (("chan_ident", "H"), ("min_velocity", "i"), ("acceleration", "i"),
                    ("max_velocity", "i")), 14,
                   source="Motor Control Messages, MGMSG_MOT_GET_VELPARAMS: as SET_VELPARAMS"),
    0x0443: AptDef("MGMSG_MOT_MOVE_HOME", TO_CTRL, None, params=(CHAN, NONE),
                   source="Motor Control Messages, MGMSG_MOT_MOVE_HOME: header only, param1 "
                          "chan ident; MGMSG_MOT_MOVE_HOMED when done"),
    0x0444: AptDef("MGMSG_MOT_MOVE_HOMED", TO_HOST, None, params=(CHAN, NONE),
                   source="Motor Control Messages, MGMSG_MOT_MOVE_HOMED: header only, param1 "
                          "chan ident"),
    0x0453: AptDef("MGMSG_MOT_MOVE_ABSOLUTE", TO_CTRL,
                   (("chan_ident", "H"), ("absolute_position", "i")), 6,
                   params=(CHAN, NONE), header_form_too=True,
                   source="Motor Control Messages, MGMSG_MOT_MOVE_ABSOLUTE: header-only form "
                          "(param1 chan ident; moves to the stored MOVEABSPARAMS position) or "
                          "6-byte form: chan ident (word), absolute position (long, counts); "
                          "MGMSG_MOT_MOVE_COMPLETED when done"),
    0x0464: AptDef("MGMSG_MOT_MOVE_COMPLETED", TO_HOST, DC_STATUS, 14,
                   source="Motor Control Messages, MGMSG_MOT_MOVE_COMPLETED: 14-byte DC status "
                          "packet (yaq parses it with _parse_dcstatus)"),
    0x0465: AptDef("MGMSG_MOT_MOVE_STOP", TO_CTRL, None,
                   params=(CHAN, ("stop mode: 0x01 immediate, 0x02 profiled",
                                  frozenset({0x01, 0x02}))),
                   source="Motor Control Messages, MGMSG_MOT_MOVE_STOP: header only, param1 "
                          "chan ident, param2 stop mode; MGMSG_MOT_MOVE_STOPPED when done"),
    0x0466: AptDef("MGMSG_MOT_MOVE_STOPPED", TO_HOST, DC_STATUS, 14,
                   source="Motor Control Messages, MGMSG_MOT_MOVE_STOPPED: 14-byte DC status"),
    0x0490: AptDef("MGMSG_MOT_REQ_DCSTATUSUPDATE", TO_CTRL, None, params=(CHAN, NONE),
                   source="Motor Control Messages, MGMSG_MOT_REQ_DCSTATUSUPDATE (Kinesis-era "
                          "issues: MOT_REQ_USTATUSUPDATE, same ID): header only, param1 chan "
                          "ident; answered with MGMSG_MOT_GET_DCSTATUSUPDATE"),
    0x0491: AptDef("MGMSG_MOT_GET_DCSTATUSUPDATE", TO_HOST, DC_STATUS, 14,
                   source="Motor Control Messages, MGMSG_MOT_GET_DCSTATUSUPDATE: 14 bytes, "
                          "chan ident, position, velocity, motor current, status bits"),
    0x0492: AptDef("MGMSG_MOT_ACK_DCSTATUSUPDATE", TO_CTRL, None,
                   source="Motor Control Messages, MGMSG_MOT_ACK_DCSTATUSUPDATE: header only, "
                          "'server alive'; over USB it must be sent at least once a second: "
                          "after ~50 status-update messages (e.g. move completed) without one "
                          "the controller stops sending them. No response."),
}

#: Controller -> host messages that carry the DC status block, which the controller counts
#: towards the ~50 it sends without a "server alive" (MOT_ACK_DCSTATUSUPDATE).
STATUS_UPDATE_MESSAGES = {0x0464, 0x0466, 0x0491}
UNACKNOWLEDGED_STATUS_LIMIT = 50

# "Position, velocity and acceleration conversions" for the KDC101 (same document):
# sampling interval T = 2048 / 6e6 s; position = EncCnt x P; velocity = EncCnt x T x 65536 x V;
# acceleration = EncCnt x T^2 x 65536 x A. Encoder counts: Z8xx actuators 34554.96 per mm,
# PRM1-Z8 rotation mount 1919.6418578623391 per degree.
T_KDC101 = 2048 / 6e6
ENC_COUNTS = {"Z825B": 34554.96, "Z812B": 34554.96, "PRM1Z8": 1919.6418578623391}


def velocity_scale(stage: str) -> float:
    return ENC_COUNTS[stage] * T_KDC101 * 65536


def acceleration_scale(stage: str) -> float:
    return ENC_COUNTS[stage] * T_KDC101 ** 2 * 65536


def pack(msg_id: int, *values: Any, param1: int = 0, param2: int = 0) -> bytes:
    """A controller -> host message packed from the table (dest = host, source = USB unit)."""
    spec = APT[msg_id]
    assert spec.direction == TO_HOST, f"{spec.name} is not sent by the controller"
    if spec.data is None:
        return struct.pack("<HBBBB", msg_id, param1, param2, HOST, USB_UNIT)
    data = struct.pack(spec.fmt, *values)
    return struct.pack("<HHBB", msg_id, len(data), HOST | HAS_DATA, USB_UNIT) + data


# --------------------------------------------------------------------------- the controller


class NotInManual(AssertionError):
    """The driver sent something the manual's definition does not allow."""


@dataclass
class Sent:
    msg_id: int
    name: str
    raw: bytes
    param1: int = 0
    param2: int = 0
    fields: dict[str, Any] = field(default_factory=dict)


class AptController:
    """A KDC101 as the table describes it: checks every message, answers from the table."""

    address = "ASRL/dev/ttyUSB0::INSTR"

    def __init__(self, stage: str = "Z825B", *, position: float = 5.0,
                 polls_per_move: int = 3) -> None:
        self.timeout_ms = 100.0
        self.stage = stage
        self.counts = round(position * ENC_COUNTS[stage])
        self.target = self.counts
        self.polls_per_move = polls_per_move
        self.moving = 0  # status requests left that still report motion
        self.homing = False
        self.homed = False
        self.enabled = False
        self.fault_bits = 0
        # stored velocity parameters, APT units: 0 min, 1.5 unit/s^2, 2.6 unit/s max
        self.vel = (0, round(1.5 * acceleration_scale(stage)),
                    round(2.6 * velocity_scale(stage)))
        self.out = bytearray()
        self.received: list[Sent] = []
        self.answered: list[int] = []  # IDs of the messages this controller sent
        self.violations: list[str] = []
        self.unacknowledged = 0
        self.dropped = 0  # status updates withheld for want of a "server alive"
        self.reject_next_move: tuple[int, str] | None = None  # (code, text)
        self.fail_next_move = False  # answer with a bare HW_RESPONSE
        self.closed = False

    # -- checking what arrives

    def _refuse(self, raw: bytes, why: str) -> None:
        message = f"{raw.hex()}: {why}"
        self.violations.append(message)
        raise NotInManual(message)

    def decode(self, raw: bytes) -> Sent:
        if len(raw) < 6:
            self._refuse(raw, f"{len(raw)} bytes, shorter than the 6-byte header")
        msg_id, = struct.unpack_from("<H", raw)
        spec = APT.get(msg_id)
        if spec is None:
            self._refuse(raw, f"message ID 0x{msg_id:04X} is not in the manual's table")
        if spec.direction != TO_CTRL:
            self._refuse(raw, f"0x{msg_id:04X} is {spec.name}, which only the controller sends")
        dest, source = raw[4], raw[5]
        if source != HOST:
            self._refuse(raw, f"{spec.name}: source byte 0x{source:02X}, the host is 0x01")
        if dest & HAS_DATA:
            size, = struct.unpack_from("<H", raw, 2)
            if spec.data is None:
                self._refuse(raw, f"{spec.name} is header-only but came with a data packet")
            if dest & ~HAS_DATA != USB_UNIT:
                self._refuse(raw, f"{spec.name}: destination 0x{dest:02X}, expected "
                                  f"0x{USB_UNIT | HAS_DATA:02X} (USB unit | data follows)")
            if size != spec.length:
                self._refuse(raw, f"{spec.name}: data length field {size}, the manual's "
                                  f"packet is {spec.length} bytes")
            if len(raw) != 6 + size:
                self._refuse(raw, f"{spec.name}: {len(raw) - 6} data bytes sent, header says "
                                  f"{size}")
            values = struct.unpack(spec.fmt, raw[6:])
            fields = dict(zip((name for name, _ in spec.data), values, strict=True))
            if fields.get("chan_ident", CHANNEL_1) != CHANNEL_1:
                self._refuse(raw, f"{spec.name}: chan ident {fields['chan_ident']}, the "
                                  "KDC101 has channel 1 only")
            return Sent(msg_id, spec.name, raw, fields=fields)
        if spec.data is not None and not spec.header_form_too:
            self._refuse(raw, f"{spec.name} needs a {spec.length}-byte data packet "
                              "(destination byte | 0x80); got a header-only message")
        if dest != USB_UNIT:
            self._refuse(raw, f"{spec.name}: destination 0x{dest:02X}, the KDC101 is 0x50")
        if len(raw) != 6:
            self._refuse(raw, f"{spec.name}: header-only message of {len(raw)} bytes")
        for value, (meaning, allowed) in zip(raw[2:4], spec.params, strict=True):
            if value not in allowed:
                self._refuse(raw, f"{spec.name}: parameter {value:#04x} is not a {meaning} "
                                  f"(allowed: {sorted(allowed)})")
        return Sent(msg_id, spec.name, raw, raw[2], raw[3])

    # -- answering from the table

    def _send(self, msg_id: int, *values: Any, param1: int = 0) -> None:
        if msg_id in STATUS_UPDATE_MESSAGES:
            if self.unacknowledged >= UNACKNOWLEDGED_STATUS_LIMIT:
                self.dropped += 1  # the manual: it stops sending status updates
                return
            self.unacknowledged += 1
        self.out += pack(msg_id, *values, param1=param1)
        self.answered.append(msg_id)

    def status_bits(self) -> int:
        bits = SB_CONNECTED | self.fault_bits
        if self.enabled:
            bits |= SB_ENABLED
        if self.moving:
            if self.homing:
                bits |= SB_HOMING | SB_INMOTION_CCW
            else:
                bits |= SB_INMOTION_CW if self.target > self.counts else SB_INMOTION_CCW
        if self.homed:
            bits |= SB_HOMED
        return bits

    def _status(self, msg_id: int) -> None:
        self._send(msg_id, CHANNEL_1, self.counts, 0, 0, self.status_bits())

    def _start_motion(self, target: int, homing: bool) -> None:
        self.target, self.homing = target, homing
        self.moving = self.polls_per_move

    def write_raw(self, raw: bytes) -> None:
        sent = self.decode(bytes(raw))
        self.received.append(sent)
        fields, name = sent.fields, sent.name
        if name == "MGMSG_HW_REQ_INFO":
            self._send(0x0006, 27000123, b"KDC101\x00\x00", 16, bytes([7, 0, 3, 0]),
                       b"DC servo controller".ljust(48, b"\x00"), bytes(12), 1, 0, 1)
        elif name == "MGMSG_MOD_SET_CHANENABLESTATE":
            self.enabled = sent.param2 == 0x01
        elif name == "MGMSG_MOT_REQ_POSCOUNTER":
            self._send(0x0412, CHANNEL_1, self.counts)
        elif name == "MGMSG_MOT_REQ_VELPARAMS":
            self._send(0x0415, CHANNEL_1, *self.vel)
        elif name == "MGMSG_MOT_SET_VELPARAMS":
            self.vel = (fields["min_velocity"], fields["acceleration"], fields["max_velocity"])
        elif name in ("MGMSG_MOT_MOVE_HOME", "MGMSG_MOT_MOVE_ABSOLUTE"):
            if not self.enabled:
                self._refuse(raw, f"{name} sent while the channel is disabled")
            if name == "MGMSG_MOT_MOVE_HOME":
                self._start_motion(0, homing=True)
            elif self.fail_next_move:
                self.fail_next_move = False
                self._send(0x0080)
            elif self.reject_next_move is not None:
                code, text = self.reject_next_move
                self.reject_next_move = None
                self._send(0x0081, sent.msg_id, code, text.encode().ljust(64, b"\x00"))
            else:
                self._start_motion(fields.get("absolute_position", 0), homing=False)
        elif name == "MGMSG_MOT_MOVE_STOP":
            self.moving, self.target, self.homing = 0, self.counts, False
            self._status(0x0466)
        elif name == "MGMSG_MOT_REQ_DCSTATUSUPDATE":
            if self.moving:
                self.moving -= 1
                self.counts += (self.target - self.counts) // 2
                if not self.moving:
                    self.counts = self.target
                    if self.homing:
                        self.homing, self.homed = False, True
                        self._send(0x0444, param1=CHANNEL_1)  # unsolicited
                    else:
                        self._status(0x0464)  # unsolicited, before the status reply
            self._status(0x0491)
        elif name == "MGMSG_MOT_ACK_DCSTATUSUPDATE":
            self.unacknowledged = 0

    def read_raw(self, size: int) -> bytes:
        if len(self.out) < size:
            raise TimeoutError("VISA timeout")
        chunk, self.out = bytes(self.out[:size]), self.out[size:]
        return chunk

    def write(self, command: str) -> None:
        raise NotInManual(f"text command {command!r} sent to a binary APT controller")

    def query(self, command: str) -> str:
        raise NotInManual(f"text query {command!r} sent to a binary APT controller")

    def close(self) -> None:
        self.closed = True

    def sent(self, name: str) -> list[Sent]:
        return [s for s in self.received if s.name == name]


class Misspelling:
    """Passes messages on with one message ID replaced, as a typo in the driver would."""

    def __init__(self, inner: AptController, right: int, wrong: int) -> None:
        self.inner, self.right, self.wrong = inner, right, wrong
        self.address = inner.address

    @property
    def timeout_ms(self) -> float:
        return self.inner.timeout_ms

    @timeout_ms.setter
    def timeout_ms(self, value: float) -> None:
        self.inner.timeout_ms = value

    def write_raw(self, raw: bytes) -> None:
        if struct.unpack_from("<H", raw)[0] == self.right:
            raw = struct.pack("<H", self.wrong) + raw[2:]
        self.inner.write_raw(raw)

    def read_raw(self, size: int) -> bytes:
        return self.inner.read_raw(size)

    def write(self, command: str) -> None:
        self.inner.write(command)

    def query(self, command: str) -> str:
        return self.inner.query(command)

    def close(self) -> None:
        self.inner.close()


# --------------------------------------------------------------------------- exercises


@pytest.fixture(autouse=True)
def fast_polling(monkeypatch):
    monkeypatch.setattr(ThorlabsKDC101, "POLL_S", 0.0)


def _linear(transport: Any) -> None:
    """Every public call on a Z825B: connect (identify, enable, velocity cap), home, velocity,
    absolute and relative moves, position, errors, status, stop without waiting, close."""
    with ThorlabsKDC101(transport, options={"stage": "Z825B"},
                        limits={"position_mm": [0, 24], "velocity_mm_s": [0, 1.0]}) as x:
        assert x.identity == "Thorlabs,KDC101,27000123,fw 3.0.7"
        x.home()
        assert x.position_mm == 0.0
        x.velocity_mm_s = 0.8
        assert x.velocity_mm_s == pytest.approx(0.8, abs=2 / velocity_scale("Z825B"))
        x.move_abs_mm(12.5)
        assert x.position_mm == pytest.approx(12.5, abs=1 / ENC_COUNTS["Z825B"])
        x.move_rel_mm(-2.5)
        assert x.position_mm == pytest.approx(10.0, abs=1 / ENC_COUNTS["Z825B"])
        assert x.error_state() == ""
        x.check_errors()
        assert x.drain_errors() == []
        x.move_abs_mm(20.0, wait=False)
        x.stop()  # the one status poll after the move command saw it half way: 15 mm
        assert x.status() == "stopped, homed, 15.0000 mm (Z825B)"
        x.safe_shutdown()


def _rotary(transport: Any) -> None:
    """The same calls in degrees on a PRM1-Z8."""
    with ThorlabsKDC101(transport, options={"stage": "PRM1Z8"},
                        limits={"position_deg": [-10, 10]}) as rot:
        rot.home()
        rot.velocity_deg_s = 5.0
        assert rot.velocity_deg_s == pytest.approx(5.0, abs=2 / velocity_scale("PRM1Z8"))
        rot.move_abs_deg(7.5)
        rot.move_rel_deg(-10.0)
        assert rot.position_deg == pytest.approx(-2.5, abs=1 / ENC_COUNTS["PRM1Z8"])
        assert rot.error_state() == ""
        rot.stop()
        assert "homed" in rot.status()


EXERCISES = {"Z825B": _linear, "PRM1Z8": _rotary}


def test_the_table_matches_the_manuals_lengths_and_forms():
    for msg_id, spec in APT.items():
        assert spec.name.startswith("MGMSG_") and spec.source, hex(msg_id)
        if spec.data is not None:
            assert struct.calcsize(spec.fmt) == spec.length, spec.name
    assert APT[0x0006].length == 84 and APT[0x0081].length == 68
    assert APT[0x0453].length == 6 and APT[0x0491].length == 14
    # the documented header layout, built independently of ``pack``
    assert pack(0x0444, param1=1) == bytes([0x44, 0x04, 0x01, 0x00, 0x01, 0x50])
    assert pack(0x0412, 1, -2)[:6] == bytes([0x12, 0x04, 0x06, 0x00, 0x81, 0x50])
    # the manual's conversion table values for Z8 actuators and the PRM1-Z8
    assert velocity_scale("Z825B") == pytest.approx(772981.3692, rel=1e-8)
    assert acceleration_scale("Z825B") == pytest.approx(263.8443072, rel=1e-8)
    assert velocity_scale("PRM1Z8") == pytest.approx(42941.66, rel=1e-6)
    assert acceleration_scale("PRM1Z8") == pytest.approx(14.66, rel=1e-3)


@pytest.mark.parametrize("stage", list(EXERCISES))
def test_every_kdc101_message_is_in_the_manual_definition(stage):
    ctl = AptController(stage, position=5.0 if stage == "Z825B" else 0.0)
    EXERCISES[stage](ctl)
    assert ctl.violations == [] and ctl.closed
    # the exercise sends every host -> controller message in the table ...
    sent = {s.msg_id for s in ctl.received}
    never = sorted(spec.name for i, spec in APT.items() if spec.direction == TO_CTRL
                   and i not in sent)
    assert never == [], f"the driver never sent {never}"
    assert sent <= set(APT)
    # ... and the driver read every status/data reply kind the controller has
    assert set(ctl.answered) == {0x0006, 0x0412, 0x0415, 0x0444, 0x0464, 0x0466, 0x0491}
    assert ctl.dropped == 0
    # connect order: identify, enable channel 1, then the status check
    assert [s.name for s in ctl.received[:3]] == [
        "MGMSG_HW_REQ_INFO", "MGMSG_MOD_SET_CHANENABLESTATE", "MGMSG_MOT_REQ_DCSTATUSUPDATE"]
    assert ctl.received[1].param2 == 0x01  # enable, not disable
    # every stop is profiled (0x02), and closing stops the axis last
    assert {s.param2 for s in ctl.sent("MGMSG_MOT_MOVE_STOP")} == {0x02}
    assert ctl.received[-1].name == "MGMSG_MOT_MOVE_STOP"


def test_kdc101_parameter_encodings_follow_the_manuals_scaling():
    counts = ENC_COUNTS["Z825B"]
    ctl = AptController("Z825B", position=5.0)
    vmin, accel, _ = ctl.vel
    _linear(ctl)
    moves = [s.fields["absolute_position"] for s in ctl.sent("MGMSG_MOT_MOVE_ABSOLUTE")]
    at_12_5 = round(12.5 * counts)
    assert moves == [at_12_5, round((at_12_5 / counts - 2.5) * counts), round(20.0 * counts)]
    assert all(s.raw[:6] == bytes([0x53, 0x04, 0x06, 0x00, 0xD0, 0x01])
               for s in ctl.sent("MGMSG_MOT_MOVE_ABSOLUTE"))
    assert ctl.sent("MGMSG_MOT_MOVE_ABSOLUTE")[0].raw[6:] == struct.pack("<Hi", 1, at_12_5)
    velocities = ctl.sent("MGMSG_MOT_SET_VELPARAMS")
    # 1.0 mm/s: the lab limit, capped at connect; then the 0.8 mm/s asked for
    for sent, wanted in zip(velocities, (1.0, 0.8), strict=True):
        assert abs(sent.fields["max_velocity"] - wanted * velocity_scale("Z825B")) <= 1
        # min velocity and acceleration are passed on as the controller reported them
        assert (sent.fields["min_velocity"], sent.fields["acceleration"]) == (vmin, accel)

    rot = AptController("PRM1Z8", position=0.0)
    _rotary(rot)
    moves = [s.fields["absolute_position"] for s in rot.sent("MGMSG_MOT_MOVE_ABSOLUTE")]
    deg = ENC_COUNTS["PRM1Z8"]
    assert moves == [round(7.5 * deg), round((round(7.5 * deg) / deg - 10.0) * deg)]
    assert moves[1] < 0  # a negative target is a signed little-endian long
    vmax = rot.sent("MGMSG_MOT_SET_VELPARAMS")[-1].fields["max_velocity"]
    assert abs(vmax - 5.0 * velocity_scale("PRM1Z8")) <= 1


def test_long_moves_keep_the_controller_sending_status_updates():
    # a move polled 3 x 50 times: without a "server alive" (MOT_ACK_DCSTATUSUPDATE) the
    # controller stops sending status updates after ~50 of them (manual, ACK_DCSTATUSUPDATE)
    ctl = AptController("Z825B", polls_per_move=150)
    with ThorlabsKDC101(ctl, options={"stage": "Z825B"}) as x:
        x.move_abs_mm(20.0)
        assert x.position_mm == pytest.approx(20.0, abs=1 / ENC_COUNTS["Z825B"])
    assert ctl.dropped == 0 and ctl.violations == []


def test_controller_error_replies_from_the_manual_are_raised():
    ctl = AptController("Z825B")
    with ThorlabsKDC101(ctl, options={"stage": "Z825B"}) as x:
        ctl.reject_next_move = (42, "Move rejected: axis not homed")
        with pytest.raises(InstrumentError, match=r"error 42 about MGMSG_MOT_MOVE_ABSOLUTE "
                                                  r"\(0x0453\): Move rejected: axis not homed"):
            x.move_abs_mm(10.0)
    ctl = AptController("Z825B")
    with ThorlabsKDC101(ctl, options={"stage": "Z825B"}) as x:
        ctl.fail_next_move = True
        with pytest.raises(InstrumentError, match=r"HW_RESPONSE"):
            x.move_abs_mm(10.0)
    ctl = AptController("Z825B")
    with ThorlabsKDC101(ctl, options={"stage": "Z825B"}) as x:
        ctl.fault_bits = SB_OVERLOAD | SB_POSITION_ERROR
        assert x.error_state() == ("position error (outside the trajectory margin); "
                                   "motor overload")
        ctl.fault_bits = 0
        assert x.error_state() == ""


def test_after_an_error_reply_the_next_status_is_current():
    """After HW_RICHRESPONSE the reply to the status request sent with the move is read off, so
    the next status is current (it used to answer the next request and hide a new fault)."""
    ctl = AptController("Z825B")
    with ThorlabsKDC101(ctl, options={"stage": "Z825B"}) as x:
        ctl.reject_next_move = (42, "Move rejected")
        with pytest.raises(InstrumentError, match="error 42"):
            x.move_abs_mm(10.0)
        ctl.fault_bits = SB_OVERLOAD
        assert x.error_state() == "motor overload"


def test_a_fault_during_a_move_stops_the_axis_with_a_manual_stop():
    ctl = AptController("Z825B", polls_per_move=10)
    x = ThorlabsKDC101(ctl, options={"stage": "Z825B"})
    original = ctl.write_raw

    def write_raw(raw: bytes) -> None:
        original(raw)
        if raw[:2] == b"\x90\x04" and ctl.moving:
            ctl.fault_bits = SB_OVERLOAD

    ctl.write_raw = write_raw  # type: ignore[method-assign]
    with pytest.raises(InstrumentError, match="stage error during motion: motor overload"):
        x.move_abs_mm(20.0)
    assert ctl.received[-1].name == "MGMSG_MOT_MOVE_STOP" and ctl.violations == []
    x.close()


def _driver_ids() -> list[int]:
    return [i for i, spec in APT.items() if spec.direction == TO_CTRL]


@pytest.mark.parametrize("right", _driver_ids(), ids=lambda i: APT[i].name)
def test_a_misspelt_message_id_fails_the_definition_test(right):
    wrong = right + 1  # the neighbouring ID: unknown, or a controller -> host message
    ctl = AptController("Z825B")
    with pytest.raises((DriverError, AssertionError)) as failure:
        _linear(Misspelling(ctl, right, wrong))
    message = str(failure.value)
    assert f"0x{wrong:04X}" in message or f"{wrong & 0xFF:02x}{wrong >> 8:02x}" in message, \
        message
    assert ctl.violations, "the definition did not refuse the misspelt message"


def test_a_wrong_destination_byte_fails_the_definition_test():
    class WrongDestination(Misspelling):
        def write_raw(self, raw: bytes) -> None:
            self.inner.write_raw(raw[:4] + bytes([(raw[4] & HAS_DATA) | 0x11]) + raw[5:])

    ctl = AptController("Z825B")
    with pytest.raises(NotInManual, match=r"MGMSG_HW_REQ_INFO: destination 0x11"):
        ThorlabsKDC101(WrongDestination(ctl, 0, 0), options={"stage": "Z825B"})


def test_unanswered_request_is_a_timeout_naming_the_message():
    ctl = AptController("Z825B")
    x = ThorlabsKDC101(ctl, options={"stage": "Z825B"})
    ctl.unacknowledged = UNACKNOWLEDGED_STATUS_LIMIT  # the controller has gone quiet
    with pytest.raises(InstrumentTimeout, match=r"MGMSG_MOT_REQ_DCSTATUSUPDATE \(0x0490\)"):
        x.error_state()
    x.close()
