"""Motorised stages: Newport SMC100 (ASCII) and Thorlabs KDC101 (APT binary) on one motion model.

``Axis``: trapezoidal moves (speed and acceleration from the stage's data sheet or the
controller's velocity setting), so a move costs ``d / v + v / a`` of lab time; backlash: the
load lags the encoder by ``backlash / 2`` against the last direction of travel, so approaching
a point from the other side lands a few um away while the controller reports the same
position (the difference is in ``truth()``). Every move nudges the sample (``on_move``).

The host's wait for a move is what lets lab time pass. The first status poll (SMC100 ``TS``,
KDC101 ``MOT_REQ_DCSTATUSUPDATE``) after a move starts reports it moving, as a real controller
does (hosts poll right after a move to check it started, or for errors); a further poll of the
same move means the host is waiting for it, and advances the clock to the end of the move
(nothing else can happen meanwhile). A position query during the move reports where the
trajectory is. Two axes started without waiting move in parallel.

SMC100 (User's Manual, command set; see ``drivers.stages``): ``VE``, ``ID?``, ``TS``, ``TE``,
``TP``, ``OR``, ``PA``, ``PR``, ``ST``, ``VA``, ``SL``, ``SR``; power-up state NOT
REFERENCED (``PA`` refused with error H until ``OR``); soft limits refuse with G.

KDC101 (APT protocol): HW_REQ_INFO, MOD_SET_CHANENABLESTATE, MOT_REQ_POSCOUNTER,
MOT_SET/REQ_VELPARAMS, MOT_MOVE_HOME (MOVE_HOMED sent when done), MOT_MOVE_ABSOLUTE
(MOVE_COMPLETED sent when done), MOT_MOVE_STOP (MOVE_STOPPED), MOT_REQ_DCSTATUSUPDATE; a move
on a disabled channel answers HW_RICHRESPONSE.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sims.virtual_lab.clock import VirtualClock
from sims.virtual_lab.scpi import InstrumentModel, TextModel

if TYPE_CHECKING:
    from sims.virtual_lab.world import World


@dataclass(frozen=True)
class StageSpec:
    """Data-sheet values of one stage (APT scale factors for Thorlabs stages)."""

    unit: str
    travel: tuple[float, float]
    max_velocity: float
    acceleration: float
    counts_per_unit: float = 0.0
    velocity_scale: float = 0.0
    acceleration_scale: float = 0.0


STAGES: dict[str, StageSpec] = {
    "LTA-HS": StageSpec("mm", (0.0, 50.0), 5.0, 20.0),
    "LTA-HL": StageSpec("mm", (0.0, 25.0), 5.0, 20.0),
    "URS100BCC": StageSpec("deg", (-360.0, 360.0), 20.0, 80.0),
    "TRA25CC": StageSpec("mm", (0.0, 25.0), 0.4, 1.6),  # not in the SMC100 driver's table
    "Z825B": StageSpec("mm", (0.0, 25.0), 2.6, 4.0, 34554.96, 772981.3692, 263.8443072),
    "Z812B": StageSpec("mm", (0.0, 12.0), 2.6, 4.0, 34554.96, 772981.3692, 263.8443072),
    "PRM1Z8": StageSpec("deg", (-360.0, 360.0), 25.0, 25.0, 1919.6418578623391, 42941.66,
                        14.66),
}


class Axis:
    """Trapezoidal motion of one axis on the virtual clock, with backlash."""

    def __init__(self, clock: VirtualClock, name: str, stage: StageSpec, *, position: float,
                 acceleration: float, backlash: float,
                 on_move: Callable[[float], None] | None = None) -> None:
        self.clock = clock
        self.name = name
        self.stage = stage
        self.velocity = stage.max_velocity
        self.acceleration = acceleration
        self.backlash = backlash
        self.on_move = on_move
        self.direction = 1.0
        self._p0 = self._p1 = float(position)
        self._t0 = self._t1 = clock.now_s()
        self._v = self.velocity
        self._polled = False

    def duration_s(self, distance: float, velocity: float) -> float:
        a = self.acceleration
        if distance <= 0:
            return 0.0
        if distance >= velocity ** 2 / a:
            return distance / velocity + velocity / a
        return 2.0 * math.sqrt(distance / a)

    @property
    def end_s(self) -> float:
        return self._t1

    def moving(self, t_s: float | None = None) -> bool:
        return (self.clock.now_s() if t_s is None else t_s) < self._t1

    def position(self, t_s: float | None = None) -> float:
        """Encoder position along the trajectory at ``t_s`` (default now)."""
        t = self.clock.now_s() if t_s is None else t_s
        if t >= self._t1:
            return self._p1
        d = abs(self._p1 - self._p0)
        a, v, tau, total = self.acceleration, self._v, t - self._t0, self._t1 - self._t0
        if d >= v * v / a:
            t_acc = v / a
            if tau < t_acc:
                s = a * tau * tau / 2
            elif tau < total - t_acc:
                s = v * v / (2 * a) + v * (tau - t_acc)
            else:
                s = d - a * (total - tau) ** 2 / 2
        else:
            s = a * tau * tau / 2 if tau < total / 2 else d - a * (total - tau) ** 2 / 2
        return self._p0 + math.copysign(s, self._p1 - self._p0)

    def physical(self, t_s: float | None = None) -> float:
        """Where the load really is: the encoder position minus half the backlash."""
        return self.position(t_s) - self.direction * self.backlash / 2

    def move_to(self, target: float, velocity: float | None = None, extra_s: float = 0.0) -> None:
        now = self.clock.now_s()
        start = self.position(now)
        lo, hi = self.stage.travel
        target = min(max(target, lo), hi)
        distance = target - start
        if distance:
            self.direction = math.copysign(1.0, distance)
        self._v = velocity or self.velocity
        self._p0, self._p1, self._t0 = start, target, now
        self._t1 = now + self.duration_s(abs(distance), self._v) + extra_s
        self._polled = False
        if self.on_move is not None and distance:
            self.on_move(abs(distance))

    def stop(self) -> None:
        here = self.position()
        self._p0 = self._p1 = here
        self._t1 = self._t0 = self.clock.now_s()

    def wait(self) -> None:
        """The host is blocked until the move ends: lab time passes."""
        self.clock.advance_to(self._t1, f"{self.name}: motion")

    def poll(self) -> None:
        """A status poll: the first one of a move sees it moving, a further one waits for it."""
        if self.moving():
            if self._polled:
                self.wait()
            self._polled = True


def _make_axis(world: World, name: str, spec: dict[str, Any]) -> Axis:
    stage = STAGES[spec["stage"]]
    lo, hi = stage.travel
    power_on = spec["power_on"] if spec["power_on"] is not None else (
        (lo + hi) / 2 if stage.unit == "mm" else 0.0)
    return Axis(world.clock, name, stage, position=power_on,
                acceleration=spec["acceleration"] or stage.acceleration,
                backlash=float(spec["backlash"]),
                on_move=lambda distance: world.stage_moved(name, distance))


# =========================================================================== SMC100

_SMC = re.compile(r"^(\d{1,2})([A-Za-z]{2})(\?)?(.*)$")
NOT_REFERENCED, HOMING, MOVING, READY_HOMING, READY_MOVING = 0x0A, 0x1E, 0x28, 0x32, 0x33
NOT_REFERENCED_STOPPED = 0x0B


class Smc100Model(TextModel):
    MODEL = "newport_smc100"
    TERM = "\r\n"
    BAUD = 57600
    TURNAROUND_S = 0.005
    HOME_SEARCH_S = 1.0

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        super().__init__(world, name, spec)
        self.stage = STAGES[spec["stage"]]
        self.addr = int(spec["controller_address"])
        self.axis = _make_axis(world, name, spec)
        self.state = READY_HOMING if spec["referenced"] else NOT_REFERENCED
        self.error = "@"
        self.sl, self.sr = self.stage.travel

    def _update(self) -> None:
        if self.state in (HOMING, MOVING) and not self.axis.moving():
            self.state = READY_HOMING if self.state == HOMING else READY_MOVING

    def handle(self, command: str) -> str | None:
        match = _SMC.match(command.strip())
        if match is None or int(match.group(1)) != self.addr:
            return None  # another controller's address, or noise on the line
        code, query, arg = match.group(2).upper(), bool(match.group(3)), match.group(4).strip()
        self._update()
        a = self.addr
        if code == "TS":
            self.axis.poll()
            self._update()
            return f"{a}TS0000{self.state:02X}"
        if code == "TP":
            return f"{a}TP{self.axis.position():.6f}"
        if code == "TE":
            error, self.error = self.error, "@"
            return f"{a}TE{error}"
        if code == "VE":
            return f"{a}VE SMC_CC - Controller-driver version 3.0.1"
        if code == "ID" and query:
            return f"{a}ID{self.spec['stage']}"
        if code == "VA" and query:
            return f"{a}VA{self.axis.velocity:.6f}"
        if code == "SL" and query:
            return f"{a}SL{self.sl:.6f}"
        if code == "SR" and query:
            return f"{a}SR{self.sr:.6f}"
        handler = {"OR": self._home, "PA": self._move_abs, "PR": self._move_rel,
                   "ST": self._stop, "VA": self._velocity, "SL": self._soft_limit,
                   "SR": self._soft_limit}.get(code)
        if handler is None or query:
            self.error = "A"
            return None
        handler(code, arg)
        return None

    def _number(self, arg: str) -> float | None:
        try:
            value = float(arg)
        except ValueError:
            self.error = "C"
            return None
        return value if math.isfinite(value) else None

    def _home(self, code: str, arg: str) -> None:
        if self.state not in (NOT_REFERENCED, NOT_REFERENCED_STOPPED):
            self.error = "K"
            return
        self.state = HOMING
        self.axis.move_to(self.stage.travel[0] if self.stage.unit == "mm" else 0.0,
                          extra_s=self.HOME_SEARCH_S)

    def _move_abs(self, code: str, arg: str, base: float = 0.0) -> None:
        value = self._number(arg)
        if value is None:
            return
        if self.state in (NOT_REFERENCED, NOT_REFERENCED_STOPPED, HOMING):
            self.error = "H" if self.state != HOMING else "L"
            return
        target = base + value
        if not self.sl <= target <= self.sr or not (
                self.stage.travel[0] <= target <= self.stage.travel[1]):
            self.error = "G"
            return
        self.state = MOVING
        self.axis.move_to(target)

    def _move_rel(self, code: str, arg: str) -> None:
        self._move_abs(code, arg, base=self.axis.position())

    def _stop(self, code: str, arg: str) -> None:
        moving = self.axis.moving()
        self.axis.stop()
        if self.state == HOMING:
            self.state = NOT_REFERENCED_STOPPED
        elif moving:
            self.state = READY_MOVING

    def _velocity(self, code: str, arg: str) -> None:
        value = self._number(arg)
        if value is None or not 0 < value <= self.stage.max_velocity:
            self.error = "C"
            return
        self.axis.velocity = value

    def _soft_limit(self, code: str, arg: str) -> None:
        value = self._number(arg)
        if value is None or (code == "SL" and not -1e12 <= value <= 0) or (
                code == "SR" and not 0 <= value <= 1e12):
            self.error = "C"
            return
        if code == "SL":
            self.sl = value
        else:
            self.sr = value

    def truth(self) -> dict[str, Any]:
        return {"encoder": self.axis.position(), "physical": self.axis.physical(),
                "backlash": self.axis.backlash, "direction": self.axis.direction}


# =========================================================================== KDC101

HOST, CONTROLLER = 0x01, 0x50
HW_REQ_INFO, HW_GET_INFO, HW_RICHRESPONSE = 0x0005, 0x0006, 0x0081
MOD_SET_CHANENABLESTATE = 0x0210
MOT_REQ_POSCOUNTER, MOT_GET_POSCOUNTER = 0x0411, 0x0412
MOT_SET_VELPARAMS, MOT_REQ_VELPARAMS, MOT_GET_VELPARAMS = 0x0413, 0x0414, 0x0415
MOT_MOVE_HOME, MOT_MOVE_HOMED, MOT_MOVE_ABSOLUTE = 0x0443, 0x0444, 0x0453
MOT_MOVE_COMPLETED, MOT_MOVE_STOP, MOT_MOVE_STOPPED = 0x0464, 0x0465, 0x0466
MOT_REQ_DCSTATUSUPDATE, MOT_GET_DCSTATUSUPDATE = 0x0490, 0x0491


class Kdc101Model(InstrumentModel):
    MODEL = "thorlabs_kdc101"
    BAUD = 115200
    TURNAROUND_S = 0.002
    HOME_SEARCH_S = 1.0

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        super().__init__(world, name, spec)
        self.stage = STAGES[spec["stage"]]
        self.axis = _make_axis(world, name, spec)
        self.enabled = False
        self.homed = bool(spec["homed"])
        self.motion: str | None = None
        self._pending = bytearray()

    # ---- framing

    def _short(self, msg_id: int, p1: int = 1, p2: int = 0) -> None:
        self.out += struct.pack("<HBBBB", msg_id, p1, p2, HOST, CONTROLLER)

    def _long(self, msg_id: int, data: bytes) -> None:
        self.out += struct.pack("<HHBB", msg_id, len(data), HOST | 0x80, CONTROLLER) + data

    def handle_bytes(self, data: bytes) -> None:
        self._pending += data
        while len(self._pending) >= 6:
            msg_id, = struct.unpack_from("<H", self._pending)
            if self._pending[4] & 0x80:
                size, = struct.unpack_from("<H", self._pending, 2)
                if len(self._pending) < 6 + size:
                    return
                payload = bytes(self._pending[6:6 + size])
                p1 = p2 = 0
                del self._pending[:6 + size]
            else:
                payload = b""
                p1, p2 = self._pending[2], self._pending[3]
                del self._pending[:6]
            self._update()
            self._message(msg_id, p1, p2, payload)

    # ---- state

    def counts(self, value: float) -> int:
        return round(value * self.stage.counts_per_unit)

    def _status_data(self) -> bytes:
        bits = 0x00000100 | (0x80000000 if self.enabled else 0)
        if self.axis.moving():
            if self.motion == "home":
                bits |= 0x00000200
            else:
                bits |= 0x00000010 if self.axis.direction > 0 else 0x00000020
        if self.homed:
            bits |= 0x00000400
        velocity = round(self.axis.velocity * self.stage.velocity_scale / 2 ** 16) \
            if self.axis.moving() else 0
        return struct.pack("<HiHhI", 1, self.counts(self.axis.position()), velocity & 0xFFFF,
                           0, bits)

    def _update(self) -> None:
        """Send what the controller sends on its own when a move or home search ends."""
        if self.motion is not None and not self.axis.moving():
            if self.motion == "home":
                self.homed = True
                self._short(MOT_MOVE_HOMED, 1, 0)
            else:
                self._long(MOT_MOVE_COMPLETED, self._status_data())
            self.motion = None

    def _rich_error(self, about: int, code: int, text: str) -> None:
        self._long(HW_RICHRESPONSE, struct.pack("<HH", about, code)
                   + text.encode("ascii")[:64].ljust(64, b"\x00"))

    def _message(self, msg_id: int, p1: int, p2: int, data: bytes) -> None:
        if msg_id == HW_REQ_INFO:
            self._long(HW_GET_INFO, struct.pack("<I8sH4s60sHHH", int(self.spec["serial"]),
                                                b"KDC101\x00\x00", 16, bytes([7, 0, 3, 0]),
                                                bytes(60), 1, 0, 1))
        elif msg_id == MOD_SET_CHANENABLESTATE:
            self.enabled = p2 == 0x01
        elif msg_id == MOT_REQ_POSCOUNTER:
            self._long(MOT_GET_POSCOUNTER, struct.pack("<Hi", 1, self.counts(self.axis.position())))
        elif msg_id == MOT_REQ_VELPARAMS:
            s = self.stage
            self._long(MOT_GET_VELPARAMS, struct.pack(
                "<Hiii", 1, 0, round(self.axis.acceleration * s.acceleration_scale),
                round(self.axis.velocity * s.velocity_scale)))
        elif msg_id == MOT_SET_VELPARAMS and len(data) >= 14:
            _, _, accel, vmax = struct.unpack_from("<Hiii", data)
            if vmax > 0:
                self.axis.velocity = min(vmax / self.stage.velocity_scale,
                                         self.stage.max_velocity)
            if accel > 0:
                self.axis.acceleration = accel / self.stage.acceleration_scale
        elif msg_id == MOT_MOVE_HOME:
            if not self.enabled:
                self._rich_error(msg_id, 10, "channel disabled")
                return
            self.motion = "home"
            self.axis.move_to(self.stage.travel[0] if self.stage.unit == "mm" else 0.0,
                              extra_s=self.HOME_SEARCH_S)
        elif msg_id == MOT_MOVE_ABSOLUTE and len(data) >= 6:
            if not self.enabled:
                self._rich_error(msg_id, 10, "channel disabled")
                return
            _, counts = struct.unpack_from("<Hi", data)
            self.motion = "move"
            self.axis.move_to(counts / self.stage.counts_per_unit)
        elif msg_id == MOT_MOVE_STOP:
            self.axis.stop()
            self.motion = None
            self._long(MOT_MOVE_STOPPED, self._status_data())
        elif msg_id == MOT_REQ_DCSTATUSUPDATE:
            self.axis.poll()
            self._update()
            self._long(MOT_GET_DCSTATUSUPDATE, self._status_data())
        # anything else: the controller ignores messages it does not know

    def truth(self) -> dict[str, Any]:
        return {"encoder": self.axis.position(), "physical": self.axis.physical(),
                "backlash": self.axis.backlash, "direction": self.axis.direction,
                "homed": self.homed}
