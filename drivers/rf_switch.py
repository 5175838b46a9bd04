"""Mini-Circuits RC-1SP4T-A18 four-way RF switch over Ethernet (Telnet, port 23).

Thesis 4.4: a 4-way switch sends the source to one of three chains or to the spectrum
analyser; thesis 2.6.1: a switch can also gate the RF for the on/off differential
measurement (``SwitchGate``).

Commands checked against the Mini-Circuits programming manual for its USB/Ethernet
controlled mechanical switch boxes (RC- series; "SCPI commands" chapter):

- ``:MN?`` -> ``MN=RC-1SP4T-A18`` (section "Get model name"), ``:SN?`` -> ``SN=<serial>``
  (section "Get serial number").
- ``:SP4T<sw>:STATE:<n>`` (section "Set SP4T switch state"): the switch is named by its
  letter, ``A`` on a box with one SP4T (``B`` on the RC-2SP4T); ``n`` = 1..4 connects COM to
  port n, 0 disconnects every port. The box answers ``1`` (success) or ``0`` (failure).
- ``:SP4T<sw>:STATE?`` (section "Get SP4T switch state") answers the port, 0..4.
- The same box also takes ``SETP=<mask>`` / ``SWPORT?`` (one bit per port, section "Set all
  switches" / "Get switch states"); QCoDeS' RC-SP4T driver uses these because the
  ``SP4T`` form needs firmware C8 or later. We send the ``:SP4TA:STATE`` form (the manual's
  own SP4T section, one command per action and a port number back, not a mask) and the
  virtual lab and the pyvisa-sim definition accept both.
- Telnet (port 23): each command ends with CR LF and each reply ends with CR LF
  (manual, "Ethernet control over Telnet"); over HTTP the command is the URL path
  (``http://<ip>/:SP4TA:STATE:1``) with no terminator, which this driver does not use.

The switch has no error queue: each set command answers with its own status, which the
driver checks. Closing leaves every port disconnected.
"""

from __future__ import annotations

from typing import ClassVar

from drivers.base import Clock, Instrument, InstrumentError, LimitError, ProtocolError, Range


class MiniCircuitsRC1SP4T(Instrument):
    """Mini-Circuits RC-1SP4T-A18 (DC-18 GHz SP4T) on ``TCPIP0::<ip>::23::SOCKET``."""

    MODEL = "Mini-Circuits RC-1SP4T-A18"
    KIND = "switch"
    IDN_PATTERN = r"MN=RC-1SP4T"
    INTERFACES = ("TCPIP",)
    # Manual, "Ethernet control over Telnet": CR LF after every command and every reply.
    READ_TERMINATION = "\r\n"
    WRITE_TERMINATION = "\r\n"
    HARD_LIMITS: ClassVar = {"port": Range(0, 4, "")}  # 0 = all ports disconnected
    #: The switch letter of the one SP4T in an RC-1SP4T box (manual: "SP4T<sw>", sw = A).
    SWITCH: ClassVar[str] = "A"

    @property
    def _state_cmd(self) -> str:
        return f":SP4T{self.SWITCH}:STATE"

    def _identify(self) -> str:
        # manual, "Get model name" / "Get serial number"
        return f"{self.query(':MN?')}; {self.query(':SN?')}"

    def set(self, command: str) -> None:
        """Send a set command and check the status the switch answers with."""
        reply = self.query(command)
        self._check_status(command, reply)

    def _check_status(self, command: str, reply: str) -> None:
        code = reply.strip()[:1]
        if code == "1":
            return
        if code in ("0", "2"):
            meaning = "failure" if code == "0" else "partial success"
            raise InstrumentError(f"switch answered {reply!r} ({meaning}) to {command!r}",
                                  instrument=self.describe(), command=command)
        raise ProtocolError(f"unexpected reply {reply!r} to {command!r}",
                            instrument=self.describe(), command=command)

    def check_errors(self, after: str = "") -> None:
        """Nothing queued to read: every command's status is checked as it is answered."""

    @property
    def port(self) -> int:
        """The port COM is connected to (0 = none); manual, "Get SP4T switch state"."""
        command = f"{self._state_cmd}?"
        reply = self.query(command)
        try:
            port = int(reply.strip())
        except ValueError:
            raise ProtocolError(f"unexpected reply {reply!r} to {command!r}",
                                instrument=self.describe(), command=command) from None
        if port not in range(0, 5):
            raise ProtocolError(f"reply {reply!r} to {command!r} is not a port 0-4",
                                instrument=self.describe(), command=command)
        return port

    @port.setter
    def port(self, value: int) -> None:
        """Connect COM to port ``value`` (0 = none); manual, "Set SP4T switch state"."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise LimitError(f"port must be an integer, got {value!r}; nothing was sent",
                             instrument=self.describe())
        self.limits["port"].check("port", value, instrument=self.describe())
        self.set(f"{self._state_cmd}:{value}")

    def safe_shutdown(self) -> None:
        """Disconnect every port, confirmed by read-back."""
        command = f"{self._state_cmd}:0"
        self.set(command)
        if self.port != 0:
            raise InstrumentError(f"a port is still connected after {command}",
                                  instrument=self.describe())

    def status(self) -> str:
        port = self.port
        return "all ports disconnected" if port == 0 else f"COM -> port {port}"


class SwitchGate:
    """Use a switch as the RF on/off gate of ``differential_measurement`` (thesis 2.6.1)."""

    def __init__(self, switch: MiniCircuitsRC1SP4T, *, on_port: int, off_port: int = 0) -> None:
        self.switch = switch
        self.on_port = on_port
        self.off_port = off_port

    @property
    def clock(self) -> Clock:
        """The switch's clock: a measurement's settling waits run on it."""
        return self.switch.clock

    def output_on(self) -> None:
        self.switch.port = self.on_port

    def output_off(self) -> None:
        self.switch.port = self.off_port
