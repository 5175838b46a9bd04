"""Motorised stages: Newport SMC100 (ASCII over RS-232) and Thorlabs KDC101 (APT binary).

The sample sits in a field gradient (thesis 2.6.2, 4.4, 4.7): x and y move the sample, z the
magnet array, and a rotation axis aligns the field (a few degrees). Every axis offers the same
calls with the unit in their names: ``position_mm``/``move_abs_mm``/``move_rel_mm``/
``velocity_mm_s`` on linear axes, the ``_deg`` forms on rotary ones; calling the wrong unit is
refused. Targets are checked against the soft limits and speeds against the speed limit before
anything is sent; a move that reports an error or outlives its timeout is stopped, and
closing the driver stops the axis.

Relative moves are sent as absolute moves to ``position + delta``: the limit check is then
exact, and a retried command cannot double a step.

Newport SMC100CC/PP, checked against the SMC100CC/PP User's Manual, "Command set" (one
entry per two-letter command) and "Communication parameters": RS-232 57600 baud 8N1
XON/XOFF, CR LF; every command is ``<address><two letters><value>`` and a query is the
command followed by ``?`` (``ID?``, ``VA?``, ``SL?``, ``SR?``) except ``TP``, ``TS``,
``TE`` and ``VE``, which only query. Used: ``OR`` home search, ``PA`` move absolute, ``TP``
tell position, ``TS`` positioner error (4 hex digits) and controller state (2 hex digits),
``TE`` last command error (one letter, ``@`` = none; reading clears it), ``ST`` stop,
``VA`` velocity, ``SL``/``SR`` negative/positive software limits (SL in [-1e12, 0], SR in
[0, 1e12]), ``VE`` controller version, ``ID?`` stage identifier. Any stage the controller
reports is accepted (see ``NewportSMC100``). PyMeasure's and the common open-source SMC100
drivers spell the commands the same way.

Thorlabs KDC101 (Thorlabs APT Controllers Host-Controller Communications Protocol): FTDI
serial at 115200 baud, RTS/CTS; little-endian messages of a 6-byte header, optionally
followed by data (header byte 4 = destination | 0x80 when data follow). Host = 0x01,
controller = 0x50, channel 1. Used: HW_REQ_INFO 0x0005 / HW_GET_INFO 0x0006,
MOD_SET_CHANENABLESTATE 0x0210, MOT_REQ_POSCOUNTER 0x0411 / GET 0x0412,
MOT_SET_VELPARAMS 0x0413, MOT_REQ_VELPARAMS 0x0414 / GET 0x0415, MOT_MOVE_HOME 0x0443 /
MOVE_HOMED 0x0444, MOT_MOVE_ABSOLUTE 0x0453, MOT_MOVE_COMPLETED 0x0464, MOT_MOVE_STOP 0x0465 /
MOVE_STOPPED 0x0466, MOT_REQ_DCSTATUSUPDATE 0x0490 / GET 0x0491 / ACK 0x0492 ("server
alive": over USB the controller stops sending status updates after ~50 without one; sent
after every status reply), HW_RESPONSE 0x0080 and
HW_RICHRESPONSE 0x0081 (errors reported by the controller). Scaling (same document, KDC101
table): Z8-series actuators 34554.96 counts/mm, velocity 772981.3692 per mm/s, acceleration
263.8443072 per mm/s^2; PRM1-Z8 rotation mount 1919.6418578623391 counts/deg, velocity
42941.66 per deg/s, acceleration 14.66 per deg/s^2.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from drivers.base import (
    IdentityError,
    Instrument,
    InstrumentError,
    InstrumentTimeout,
    LimitError,
    Limits,
    Option,
    OptionError,
    ProtocolError,
    Range,
    SerialSettings,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageModel:
    """What a stage can do, from its data sheet; APT scale factors for Thorlabs stages."""

    name: str
    unit: str  # "mm" (linear) or "deg" (rotary)
    travel: tuple[float, float]
    max_velocity: float  # unit/s
    counts_per_unit: float = 0.0
    velocity_scale: float = 0.0  # APT velocity units per (unit/s)
    acceleration_scale: float = 0.0  # APT acceleration units per (unit/s^2)


@dataclass(frozen=True)
class MotionState:
    moving: bool
    error: str  # "" when none
    description: str


class Stage(Instrument):
    """One motorised axis. Subclasses implement the protocol hooks at the bottom."""

    KIND = "stage"
    INTERFACES = ("ASRL",)
    STAGES: ClassVar[dict[str, StageModel]] = {}
    #: Seconds between status polls while waiting for a move to end. The polls and the move's
    #: timeout run on the driver's ``clock`` (``drivers.base.Clock``): the wall clock on a real
    #: bench, the simulated bench's own clock there (``hil.bench.lab`` passes it), so a move and its
    #: timeout cost lab time, not wall time.
    POLL_S: ClassVar[float] = 0.05

    @classmethod
    def stage_model(cls, options: dict[str, Any] | None = None) -> StageModel:
        opts = cls.validate_options(options)
        return cls.STAGES[opts["stage"]]

    @classmethod
    def hard_limits(cls, options: dict[str, Any] | None = None) -> Limits:
        stage = cls.stage_model(options)
        u = stage.unit
        return Limits({f"position_{u}": Range(*stage.travel, u),
                       f"velocity_{u}_s": Range(0.0, stage.max_velocity, f"{u}/s")})

    @property
    def stage(self) -> StageModel:
        """The stage on this axis: the one the controller reported at connect, else the
        configured one."""
        reported = getattr(self, "_reported_stage", None)
        return reported if reported is not None else self.stage_model(self.options)

    @property
    def unit(self) -> str:
        return self.stage.unit

    def _require(self, unit: str) -> None:
        if unit != self.unit:
            kind = "rotary" if self.unit == "deg" else "linear"
            raise LimitError(f"this axis ({self.stage.name}) is {kind} and works in "
                             f"{self.unit}; use the _{self.unit} calls; nothing was sent",
                             instrument=self.describe())

    # ---- public, unit-explicit API

    @property
    def position_mm(self) -> float:
        self._require("mm")
        return self._read_position()

    @property
    def position_deg(self) -> float:
        self._require("deg")
        return self._read_position()

    def move_abs_mm(self, position_mm: float, *, wait: bool = True,
                    timeout_s: float | None = None) -> None:
        self._require("mm")
        self._move_to(position_mm, wait, timeout_s)

    def move_abs_deg(self, position_deg: float, *, wait: bool = True,
                     timeout_s: float | None = None) -> None:
        self._require("deg")
        self._move_to(position_deg, wait, timeout_s)

    def move_rel_mm(self, delta_mm: float, *, wait: bool = True,
                    timeout_s: float | None = None) -> None:
        self._require("mm")
        self._move_by(delta_mm, wait, timeout_s)

    def move_rel_deg(self, delta_deg: float, *, wait: bool = True,
                     timeout_s: float | None = None) -> None:
        self._require("deg")
        self._move_by(delta_deg, wait, timeout_s)

    @property
    def velocity_mm_s(self) -> float:
        self._require("mm")
        return self._read_velocity()

    @velocity_mm_s.setter
    def velocity_mm_s(self, value: float) -> None:
        self._require("mm")
        self._set_velocity(value)

    @property
    def velocity_deg_s(self) -> float:
        self._require("deg")
        return self._read_velocity()

    @velocity_deg_s.setter
    def velocity_deg_s(self, value: float) -> None:
        self._require("deg")
        self._set_velocity(value)

    def home(self, *, timeout_s: float | None = None) -> None:
        """Home search; waits until the axis is referenced (stopped on error or timeout)."""
        self._send_home()
        self.wait_until_stopped(timeout_s or self.options["home_timeout_s"])
        self._after_home()

    def stop(self) -> None:
        """Stop any motion now."""
        self._send_stop()

    def error_state(self) -> str:
        """The controller's error description, "" when there is none."""
        return self._poll().error

    def wait_until_stopped(self, timeout_s: float, *,
                           sleep: Callable[[float], None] | None = None) -> None:
        """Poll until the axis stops; on an error or timeout stop it and raise.

        ``timeout_s`` is lab time on the driver's ``clock``, which also paces the polls;
        ``sleep`` replaces the clock's sleep between polls (the deadline stays on the clock).
        """
        pause = self.clock.sleep if sleep is None else sleep
        deadline = self.clock.now_s() + timeout_s
        try:
            while True:
                state = self._poll()
                if state.error:
                    raise InstrumentError(f"stage error during motion: {state.error}",
                                          instrument=self.describe())
                if not state.moving:
                    return
                if self.clock.now_s() > deadline:
                    raise InstrumentTimeout(f"still moving after {timeout_s:g} s "
                                            f"({state.description}); motion stopped",
                                            instrument=self.describe())
                pause(self.POLL_S)
        except BaseException:
            self._stop_after_failure()
            raise

    def safe_shutdown(self) -> None:
        """Stop the axis."""
        self._send_stop()

    def status(self) -> str:
        state = self._poll()
        text = state.error or state.description
        return f"{text}, {self._read_position():.4f} {self.unit} ({self.stage.name})"

    # ---- shared logic

    def _move_to(self, target: float, wait: bool, timeout_s: float | None) -> None:
        target = self.limits[f"position_{self.unit}"].check(
            f"position_{self.unit}", target, instrument=self.describe())
        self._send_move_abs(target)
        if wait:
            self.wait_until_stopped(timeout_s or self.options["move_timeout_s"])

    def _move_by(self, delta: float, wait: bool, timeout_s: float | None) -> None:
        if not isinstance(delta, int | float) or isinstance(delta, bool) or delta != delta:
            raise LimitError(f"relative step must be a number, got {delta!r}; nothing was sent",
                             instrument=self.describe())
        self._move_to(self._read_position() + delta, wait, timeout_s)

    def _set_velocity(self, value: float) -> None:
        value = self.limits[f"velocity_{self.unit}_s"].check(
            f"velocity_{self.unit}_s", value, instrument=self.describe())
        if value <= 0:
            raise LimitError("velocity must be > 0; nothing was sent", instrument=self.describe())
        self._send_velocity(value)

    def _stop_after_failure(self) -> None:
        try:
            self._send_stop()
        except Exception as exc:  # the original error matters more; report both
            log.error("%s: stop after a failed move also failed: %s", self.describe(), exc)

    # ---- protocol hooks

    def _read_position(self) -> float:
        raise NotImplementedError

    def _send_move_abs(self, target: float) -> None:
        raise NotImplementedError

    def _send_home(self) -> None:
        raise NotImplementedError

    def _after_home(self) -> None:
        """Called once the axis is referenced."""

    def _send_stop(self) -> None:
        raise NotImplementedError

    def _poll(self) -> MotionState:
        raise NotImplementedError

    def _read_velocity(self) -> float:
        raise NotImplementedError

    def _send_velocity(self, value: float) -> None:
        raise NotImplementedError


# =========================================================================== Newport SMC100


#: ``TE`` error codes (SMC100 User's Manual).
SMC100_COMMAND_ERRORS = {
    "A": "Unknown message code or floating point controller address",
    "B": "Controller address not correct",
    "C": "Parameter missing or out of range",
    "D": "Command not allowed",
    "E": "Home sequence already started",
    "F": "ESP stage name unknown",
    "G": "Displacement out of limits",
    "H": "Command not allowed in NOT REFERENCED state",
    "I": "Command not allowed in CONFIGURATION state",
    "J": "Command not allowed in DISABLE state",
    "K": "Command not allowed in READY state",
    "L": "Command not allowed in HOMING state",
    "M": "Command not allowed in MOVING state",
    "N": "Current position out of software limit",
    "S": "Communication Time Out",
    "U": "Error during EEPROM access",
    "V": "Error during command execution",
    "W": "Command not allowed for PP version",
    "X": "Command not allowed for CC version",
}

#: ``TS`` positioner error bits.
SMC100_POSITIONER_ERRORS = {
    0x0200: "80 W output power exceeded",
    0x0100: "DC voltage too low",
    0x0080: "wrong ESP stage",
    0x0040: "homing time out",
    0x0020: "following error",
    0x0010: "short circuit detection",
    0x0008: "RMS current limit",
    0x0004: "peak current limit",
    0x0002: "positive end of run",
    0x0001: "negative end of run",
}

#: ``TS`` controller states.
SMC100_STATES = {
    0x0A: "NOT REFERENCED from reset", 0x0B: "NOT REFERENCED from HOMING",
    0x0C: "NOT REFERENCED from CONFIGURATION", 0x0D: "NOT REFERENCED from DISABLE",
    0x0E: "NOT REFERENCED from READY", 0x0F: "NOT REFERENCED from MOVING",
    0x10: "NOT REFERENCED ESP stage error", 0x11: "NOT REFERENCED from JOGGING",
    0x14: "CONFIGURATION", 0x1E: "HOMING commanded from RS-232-C",
    0x1F: "HOMING commanded by SMC-RC", 0x28: "MOVING", 0x32: "READY from HOMING",
    0x33: "READY from MOVING", 0x34: "READY from DISABLE", 0x35: "READY from JOGGING",
    0x3C: "DISABLE from READY", 0x3D: "DISABLE from MOVING", 0x3E: "DISABLE from JOGGING",
    0x46: "JOGGING from READY", 0x47: "JOGGING from DISABLE",
}
_SMC100_MOVING = {0x1E, 0x1F, 0x28, 0x46, 0x47}
_SMC100_READY = {0x32, 0x33, 0x34, 0x35}
_SMC100_DISABLED = {0x3C, 0x3D, 0x3E}


#: Bounds the SMC100 takes for SL and SR ("SL: -1e12 to 0", "SR: 0 to 1e12", manual).
SMC100_SOFT_LIMIT_SPAN = 1e12


def _stage_key(name: str) -> str:
    return name.replace("-", "").replace("_", "").upper()


class NewportSMC100(Stage):
    """Newport SMC100CC/PP single-axis controller on a serial port (RS-485 address option).

    Any stage the controller reports is accepted. The ``stage`` option, when given, must match
    what the controller reports (``ID?``); ``""`` takes whichever stage is connected. Travel
    and speed limits: the data sheet for the stages in ``STAGES``, narrowed by the lab
    configuration; for any other stage, the configuration's limits or else the
    controller's own software limits (``SL?``/``SR?``) and velocity (``VA?``).
    """

    MODEL = "Newport SMC100"
    IDN_PATTERN = r"SMC(100)?_?(CC|PP)"
    # SMC100 User's Manual, "Communication parameters": 57600 baud, 8 data bits, 1 stop
    # bit, no parity, XON/XOFF; "Command syntax": every command and reply ends with CR LF.
    READ_TERMINATION = "\r\n"
    WRITE_TERMINATION = "\r\n"
    SERIAL = SerialSettings(57600, flow_control="xon_xoff")
    #: Data-sheet travel and speed of the stages used on the thesis bench.
    STAGES: ClassVar = {
        "LTA-HS": StageModel("LTA-HS", "mm", (0.0, 50.0), 5.0),
        "LTA-HL": StageModel("LTA-HL", "mm", (0.0, 25.0), 5.0),
        "URS100BCC": StageModel("URS100BCC", "deg", (-360.0, 360.0), 20.0),
    }
    OPTIONS: ClassVar = {
        "stage": Option(str, "", "stage model the controller must report ('' = any); "
                        "data-sheet limits known for " + ", ".join(STAGES)),
        "unit": Option(str, "", "mm or deg for a stage not in the driver's table "
                       "(default mm)", ("mm", "deg")),
        "controller_address": Option(int, 1, "RS-485 address (1-31)", tuple(range(1, 32))),
        "move_timeout_s": Option(float, 60.0, "longest a move may take (s)"),
        "home_timeout_s": Option(float, 120.0, "longest a home search may take (s)"),
    }

    @classmethod
    def known_stage(cls, name: str) -> StageModel | None:
        """The table entry for a stage name as configured or reported (e.g. "1IDLTA-HS")."""
        key = _stage_key(name)
        for stage_name, model in cls.STAGES.items():
            if key and (key == _stage_key(stage_name) or key.startswith(_stage_key(stage_name))):
                return model
        return None

    @classmethod
    def stage_model(cls, options: dict[str, Any] | None = None) -> StageModel:
        opts = cls.validate_options(options)
        known = cls.known_stage(opts["stage"])
        if known is not None:
            if opts["unit"] and opts["unit"] != known.unit:
                raise OptionError(f"option unit={opts['unit']!r} contradicts stage "
                                  f"{known.name}, which works in {known.unit}")
            return known
        span = SMC100_SOFT_LIMIT_SPAN
        return StageModel(opts["stage"] or "any stage", opts["unit"] or "mm", (-span, span),
                          span)

    def _cmd(self, code: str, value: str = "") -> str:
        return f"{self.options['controller_address']}{code}{value}"

    def _ask(self, code: str) -> str:
        """Query ``code`` (e.g. "TP", "VA?") and strip the echoed "<address><code>" prefix."""
        command = self._cmd(code)
        reply = self.query(command)
        prefix = self._cmd(code.rstrip("?"))
        if not reply.startswith(prefix):
            raise ProtocolError(f"unexpected reply {reply!r} to {command!r}",
                                instrument=self.describe(), command=command)
        return reply[len(prefix):].strip()

    def _number(self, code: str) -> float:
        text = self._ask(code)
        try:
            return float(text)
        except ValueError:
            raise ProtocolError(f"reply {text!r} to {self._cmd(code)!r} is not a number",
                                instrument=self.describe(), command=self._cmd(code)) from None

    def _identify(self) -> str:
        # VE: controller revision; ID?: stage identifier (manual, command set "VE", "ID")
        return f"{self._ask('VE')}; stage {self._ask('ID?')}"

    def _check_identity(self, identity: str) -> None:
        super()._check_identity(identity)
        stage_id = identity.split("; stage ", 1)[-1].strip()
        wanted = self.options["stage"]
        if wanted and _stage_key(wanted) not in _stage_key(stage_id):
            raise IdentityError(f"the lab configuration says stage {wanted!r} but the "
                                f"controller reports {stage_id!r}; a wrong stage model would "
                                "mean wrong units and limits", instrument=self.describe())
        configured = self.stage_model(self.options)
        known = self.known_stage(stage_id)
        if known is not None and known.unit != configured.unit:
            raise IdentityError(f"the controller reports stage {stage_id!r}, which works in "
                                f"{known.unit}, but the lab configuration uses this axis in "
                                f"{configured.unit} (options: stage, unit)",
                                instrument=self.describe())
        self._reported_stage = known if known is not None else StageModel(
            stage_id or configured.name, configured.unit, configured.travel,
            configured.max_velocity)

    def check_errors(self, after: str = "") -> None:
        code = self._ask("TE")[:1]  # TE: last command error, "@" = none (manual, "TE")
        if code and code != "@":
            message = SMC100_COMMAND_ERRORS.get(code, "unknown error code")
            where = f" after {after!r}" if after else ""
            raise InstrumentError(f"controller reported{where}: {code} - {message}",
                                  instrument=self.describe(), command=after or None)

    def drain_errors(self) -> list[str]:
        """Read ``TE`` once (it holds only the last error, and reading clears it)."""
        code = self._ask("TE")[:1]
        if code and code != "@":
            return [f"{code} - {SMC100_COMMAND_ERRORS.get(code, 'unknown error code')}"]
        return []

    def _configure(self) -> None:
        stale = self._ask("TE")[:1]  # reading TE clears it; an old error is not ours
        if stale not in ("", "@"):
            log.info("%s: cleared a stale command error %s", self.describe(), stale)
        self._take_stage_limits()
        if self._state() in _SMC100_READY:
            self._after_home()

    def _take_stage_limits(self) -> None:
        """Narrow the limits to the reported stage: its data sheet if the driver knows it,
        else the controller's SL/SR and VA for whatever the configuration left open."""
        stage, u = self.stage, self.unit
        pos, vel = f"position_{u}", f"velocity_{u}_s"
        if self.known_stage(stage.name) is not None:
            self._narrow_limit(pos, *stage.travel, f"the {stage.name} data sheet")
            self._narrow_limit(vel, 0.0, stage.max_velocity, f"the {stage.name} data sheet")
            return
        hard = self.hard_limits(self.options)
        if self.limits[pos] == hard[pos]:  # the configuration names no travel
            self._narrow_limit(pos, self._number("SL?"), self._number("SR?"),
                               "the controller's software limits SL/SR")
        if self.limits[vel] == hard[vel]:  # nor a speed
            self._narrow_limit(vel, 0.0, self._number("VA?"), "the controller's velocity VA")

    def _after_home(self) -> None:
        """Mirror the soft limits into the controller (SL/SR) and cap its velocity (VA).

        The controller takes SL in [-1e12, 0] and SR in [0, 1e12]; a soft limit on the other
        side of 0 is enforced by the driver alone, the controller then stops at 0.
        """
        position = self.limits[f"position_{self.unit}"]
        self.set(self._cmd("SL", f"{min(position.min, 0.0):.6f}"))
        self.set(self._cmd("SR", f"{max(position.max, 0.0):.6f}"))
        vmax = self.limits[f"velocity_{self.unit}_s"].max
        if self._read_velocity() > vmax:
            self._send_velocity(vmax)

    def _state(self) -> int:
        return self._ts()[1]

    def _ts(self) -> tuple[int, int]:
        text = self._ask("TS")
        try:
            return int(text[:4], 16), int(text[4:6], 16)
        except ValueError:
            raise ProtocolError(f"cannot decode TS reply {text!r}", instrument=self.describe(),
                                command=self._cmd("TS")) from None

    def _poll(self) -> MotionState:
        errors, state = self._ts()
        description = SMC100_STATES.get(state, f"state 0x{state:02X}")
        faults = [text for bit, text in SMC100_POSITIONER_ERRORS.items() if errors & bit]
        error = "; ".join(faults)
        if not error and state in _SMC100_DISABLED:
            error = f"controller went to {description}"
        return MotionState(state in _SMC100_MOVING, error, description)

    def _read_position(self) -> float:
        return self._number("TP")

    def _send_move_abs(self, target: float) -> None:
        self.set(self._cmd("PA", f"{target:.6f}"))

    def _send_home(self) -> None:
        # OR is accepted only in NOT REFERENCED; a READY axis is already referenced (a new
        # home search would need a controller reset, RS, which also drops its settings).
        if self._state() in _SMC100_READY:
            log.info("%s: already referenced; no home search needed", self.describe())
            return
        self.set(self._cmd("OR"))

    def _send_stop(self) -> None:
        self.write(self._cmd("ST"))

    def _read_velocity(self) -> float:
        return self._number("VA?")

    def _send_velocity(self, value: float) -> None:
        self.set(self._cmd("VA", f"{value:.6f}"))


# =========================================================================== Thorlabs KDC101


HOST, CONTROLLER, CHANNEL = 0x01, 0x50, 0x01

MGMSG = {
    "HW_REQ_INFO": 0x0005, "HW_GET_INFO": 0x0006, "HW_RESPONSE": 0x0080,
    "HW_RICHRESPONSE": 0x0081, "MOD_SET_CHANENABLESTATE": 0x0210,
    "MOT_REQ_POSCOUNTER": 0x0411, "MOT_GET_POSCOUNTER": 0x0412,
    "MOT_SET_VELPARAMS": 0x0413, "MOT_REQ_VELPARAMS": 0x0414, "MOT_GET_VELPARAMS": 0x0415,
    "MOT_MOVE_HOME": 0x0443, "MOT_MOVE_HOMED": 0x0444, "MOT_MOVE_ABSOLUTE": 0x0453,
    "MOT_MOVE_COMPLETED": 0x0464, "MOT_MOVE_STOP": 0x0465, "MOT_MOVE_STOPPED": 0x0466,
    "MOT_REQ_DCSTATUSUPDATE": 0x0490, "MOT_GET_DCSTATUSUPDATE": 0x0491,
    "MOT_ACK_DCSTATUSUPDATE": 0x0492,
}
_NAMES = {v: k for k, v in MGMSG.items()}

#: DC status bits (P_MOT_SB_*).
APT_MOVING_BITS = 0x00000010 | 0x00000020 | 0x00000040 | 0x00000080 | 0x00000200
APT_HOMED = 0x00000400
APT_FAULT_BITS = {
    0x00004000: "position error (outside the trajectory margin)",
    0x00020000: "over-temperature",
    0x00040000: "bus voltage fault",
    0x00080000: "commutation error",
    0x01000000: "motor overload",
    0x02000000: "encoder fault",
    0x04000000: "over-current",
    0x08000000: "bus current fault",
    0x40000000: "controller error",
}


def apt_short(msg_id: int, param1: int = 0, param2: int = 0) -> bytes:
    """A header-only APT message from host to controller."""
    return struct.pack("<HBBBB", msg_id, param1, param2, CONTROLLER, HOST)


def apt_long(msg_id: int, data: bytes) -> bytes:
    """An APT message with a data packet (destination byte | 0x80)."""
    return struct.pack("<HHBB", msg_id, len(data), CONTROLLER | 0x80, HOST) + data


def apt_label(msg_id: int) -> str:
    return f"MGMSG_{_NAMES.get(msg_id, 'UNKNOWN')} (0x{msg_id:04X})"


@dataclass(frozen=True)
class AptMessage:
    msg_id: int
    param1: int
    param2: int
    data: bytes


class ThorlabsKDC101(Stage):
    """Thorlabs KDC101 K-Cube DC servo controller with a Z8-series actuator or PRM1-Z8."""

    MODEL = "Thorlabs KDC101"
    IDN_PATTERN = r"^Thorlabs,KDC101,"
    READ_TERMINATION = None  # binary protocol
    WRITE_TERMINATION = ""
    SERIAL = SerialSettings(115200, flow_control="rts_cts")
    STAGES: ClassVar = {
        "Z825B": StageModel("Z825B", "mm", (0.0, 25.0), 2.6, 34554.96, 772981.3692,
                            263.8443072),
        "Z812B": StageModel("Z812B", "mm", (0.0, 12.0), 2.6, 34554.96, 772981.3692,
                            263.8443072),
        "PRM1Z8": StageModel("PRM1Z8", "deg", (-360.0, 360.0), 25.0, 1919.6418578623391,
                             42941.66, 14.66),
    }
    OPTIONS: ClassVar = {
        "stage": Option(str, "Z825B", "actuator or rotation mount on this controller",
                        tuple(STAGES)),
        "move_timeout_s": Option(float, 60.0, "longest a move may take (s)"),
        "home_timeout_s": Option(float, 120.0, "longest a home search may take (s)"),
    }
    MAX_MESSAGES = 50  # unsolicited messages tolerated while waiting for a reply

    # ---- messages

    def _send(self, message: bytes) -> None:
        msg_id = struct.unpack_from("<H", message)[0]
        self.write_raw(message, apt_label(msg_id))

    def _read_message(self, waiting_for: str) -> AptMessage:
        header = self.read_raw(6, waiting_for)
        msg_id, = struct.unpack_from("<H", header)
        if header[4] & 0x80:
            size, = struct.unpack_from("<H", header, 2)
            data = self.read_raw(size, waiting_for) if size else b""
            return AptMessage(msg_id, 0, 0, data)
        return AptMessage(msg_id, header[2], header[3], b"")

    def _raise_if_error(self, message: AptMessage, after: str) -> None:
        if message.msg_id == MGMSG["HW_RICHRESPONSE"]:
            ref, code = struct.unpack_from("<HH", message.data)
            notes = message.data[4:68].split(b"\x00", 1)[0].decode("ascii", "replace").strip()
            raise InstrumentError(f"controller reported error {code} about {apt_label(ref)}: "
                                  f"{notes}", instrument=self.describe(), command=after)
        if message.msg_id == MGMSG["HW_RESPONSE"]:
            raise InstrumentError("controller reported an error (HW_RESPONSE)",
                                  instrument=self.describe(), command=after)

    def _request(self, message: bytes, reply_id: int) -> AptMessage:
        """Send ``message`` and return the reply ``reply_id``; errors raised, others skipped."""
        self._send(message)
        label = apt_label(struct.unpack_from("<H", message)[0])
        for _ in range(self.MAX_MESSAGES):
            reply = self._read_message(label)
            try:
                self._raise_if_error(reply, label)
            except InstrumentError:
                self._drain_until(reply_id, label)
                raise
            if reply.msg_id == reply_id:
                return reply
            log.debug("%s: skipped %s while waiting for %s", self.describe(),
                      apt_label(reply.msg_id), apt_label(reply_id))
        raise ProtocolError(f"no {apt_label(reply_id)} among {self.MAX_MESSAGES} messages",
                            instrument=self.describe(), command=label)

    def _drain_until(self, reply_id: int, label: str) -> None:
        """After an error message, read on to the reply that was asked for, so that it is not
        taken for the answer to the next request (a stale status would hide a new fault); a
        controller that sends none ends the drain at the read timeout."""
        for _ in range(self.MAX_MESSAGES):
            try:
                if self._read_message(label).msg_id == reply_id:
                    return
            except InstrumentTimeout:
                return

    def _status(self) -> tuple[int, int]:
        """(position in counts, status bits) from a DC status update."""
        reply = self._request(apt_short(MGMSG["MOT_REQ_DCSTATUSUPDATE"], CHANNEL),
                              MGMSG["MOT_GET_DCSTATUSUPDATE"])
        _, position, _, _, bits = struct.unpack_from("<HiHhI", reply.data)
        self._send(apt_short(MGMSG["MOT_ACK_DCSTATUSUPDATE"]))  # "server alive"
        return position, bits

    # ---- Instrument

    def _identify(self) -> str:
        reply = self._request(apt_short(MGMSG["HW_REQ_INFO"]), MGMSG["HW_GET_INFO"])
        serial, model, _, fw = struct.unpack_from("<I8sH4s", reply.data)
        name = model.split(b"\x00", 1)[0].decode("ascii", "replace")
        return f"Thorlabs,{name},{serial},fw {fw[2]}.{fw[1]}.{fw[0]}"

    def check_errors(self, after: str = "") -> None:
        _, bits = self._status()
        faults = [text for bit, text in APT_FAULT_BITS.items() if bits & bit]
        if faults:
            raise InstrumentError("controller status reports " + "; ".join(faults),
                                  instrument=self.describe(), command=after or None)

    def _configure(self) -> None:
        self._send(apt_short(MGMSG["MOD_SET_CHANENABLESTATE"], CHANNEL, 0x01))
        self.check_errors(after=apt_label(MGMSG["MOD_SET_CHANENABLESTATE"]))
        vmax = self.limits[f"velocity_{self.unit}_s"].max
        if self._read_velocity() > vmax:
            self._send_velocity(vmax)

    def _counts(self, value: float) -> int:
        counts = round(value * self.stage.counts_per_unit)
        if not -2**31 <= counts < 2**31:
            raise LimitError(f"{value:g} {self.unit} does not fit the position counter",
                             instrument=self.describe())
        return counts

    def _read_position(self) -> float:
        reply = self._request(apt_short(MGMSG["MOT_REQ_POSCOUNTER"], CHANNEL),
                              MGMSG["MOT_GET_POSCOUNTER"])
        _, counts = struct.unpack_from("<Hi", reply.data)
        return counts / self.stage.counts_per_unit

    def _send_move_abs(self, target: float) -> None:
        self._send(apt_long(MGMSG["MOT_MOVE_ABSOLUTE"],
                            struct.pack("<Hi", CHANNEL, self._counts(target))))
        self.check_errors(after=apt_label(MGMSG["MOT_MOVE_ABSOLUTE"]))

    def _send_home(self) -> None:
        self._send(apt_short(MGMSG["MOT_MOVE_HOME"], CHANNEL))
        self.check_errors(after=apt_label(MGMSG["MOT_MOVE_HOME"]))

    def _after_home(self) -> None:
        _, bits = self._status()
        if not bits & APT_HOMED:
            raise InstrumentError("home search ended but the axis does not report homed",
                                  instrument=self.describe())

    def _send_stop(self) -> None:
        self._send(apt_short(MGMSG["MOT_MOVE_STOP"], CHANNEL, 0x02))  # 0x02 = profiled stop

    def _poll(self) -> MotionState:
        _, bits = self._status()
        faults = [text for bit, text in APT_FAULT_BITS.items() if bits & bit]
        moving = bool(bits & APT_MOVING_BITS)
        description = ("moving" if moving else "stopped") + (
            ", homed" if bits & APT_HOMED else ", not homed")
        return MotionState(moving, "; ".join(faults), description)

    def _velocity_params(self) -> tuple[int, int, int]:
        reply = self._request(apt_short(MGMSG["MOT_REQ_VELPARAMS"], CHANNEL),
                              MGMSG["MOT_GET_VELPARAMS"])
        _, vmin, accel, vmax = struct.unpack_from("<Hiii", reply.data)
        return vmin, accel, vmax

    def _read_velocity(self) -> float:
        return self._velocity_params()[2] / self.stage.velocity_scale

    def _send_velocity(self, value: float) -> None:
        vmin, accel, _ = self._velocity_params()
        vmax = round(value * self.stage.velocity_scale)
        self._send(apt_long(MGMSG["MOT_SET_VELPARAMS"],
                            struct.pack("<Hiii", CHANNEL, vmin, accel, vmax)))
        self.check_errors(after=apt_label(MGMSG["MOT_SET_VELPARAMS"]))
