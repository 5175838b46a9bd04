"""Mini-Circuits RC-1SP4T-A18 four-way RF switch over Ethernet (Telnet, port 23).

Thesis 4.4: a 4-way switch sends the source to one of three chains or to the spectrum
analyser; thesis 2.6.1: a switch can also gate the RF for the on/off differential
measurement (``SwitchGate``). Commands from the Mini-Circuits programming manual for its
Ethernet-controlled switches (ASCII/SCPI over Telnet or HTTP): ``:MN?`` (model name,
"MN=..."), ``:SN?`` (serial number, "SN=..."), ``:SP4T:STATE:<n>`` (connect COM to port n,
0 = all ports disconnected; the reply is "1" for success, "0" for failure) and
``:SP4T:STATE?``.

The switch has no error queue: each set command answers with its own status, which the
driver checks. Closing leaves every port disconnected.
"""

from __future__ import annotations

from typing import ClassVar

from drivers.base import Instrument, InstrumentError, LimitError, ProtocolError, Range


class MiniCircuitsRC1SP4T(Instrument):
    """Mini-Circuits RC-1SP4T-A18 (DC-18 GHz SP4T) on ``TCPIP0::<ip>::23::SOCKET``."""

    MODEL = "Mini-Circuits RC-1SP4T-A18"
    KIND = "switch"
    IDN_PATTERN = r"MN=RC-1SP4T"
    INTERFACES = ("TCPIP",)
    READ_TERMINATION = "\r\n"
    WRITE_TERMINATION = "\r\n"
    HARD_LIMITS: ClassVar = {"port": Range(0, 4, "")}  # 0 = all ports disconnected

    def _identify(self) -> str:
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
        """The port COM is connected to (0 = none)."""
        reply = self.query(":SP4T:STATE?")
        try:
            return int(reply.strip())
        except ValueError:
            raise ProtocolError(f"unexpected reply {reply!r} to ':SP4T:STATE?'",
                                instrument=self.describe(), command=":SP4T:STATE?") from None

    @port.setter
    def port(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LimitError(f"port must be an integer, got {value!r}; nothing was sent",
                             instrument=self.describe())
        self.limits["port"].check("port", value, instrument=self.describe())
        self.set(f":SP4T:STATE:{value}")

    def safe_shutdown(self) -> None:
        """Disconnect every port, confirmed by read-back."""
        self.set(":SP4T:STATE:0")
        if self.port != 0:
            raise InstrumentError("a port is still connected after :SP4T:STATE:0",
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

    def output_on(self) -> None:
        self.switch.port = self.on_port

    def output_off(self) -> None:
        self.switch.port = self.off_port
