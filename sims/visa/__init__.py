"""pyvisa-sim definitions of the instruments (``sim_lab.yaml``) and the library that opens them.

pyvisa-sim queues a single entry per device, ``command_error``, for a command the device does
not know. A SCPI instrument also tells a known command with a value outside its range apart:
an unknown header queues -113 "Undefined header", a value out of range -222 "Data out of range"
(SCPI-99 Vol. 2, chapter 21.8 "Error/event queue"); the SMC100 and the Lake Shore 425 do the
same with their own codes. pyvisa-sim has no way to queue anything but ``command_error`` from a
definitions file: the only per-property error it knows is the setter's ``e:`` entry, a *reply*
sent back when the value fails the property's specs.

The definitions therefore give every ranged setter of a device with a ``range_error`` entry in
its error queue ``e: range_error`` (``RANGE_ERROR``), and ``RangeErrorSimLibrary`` -- a
``pyvisa_sim.highlevel.SimVisaLibrary`` used as any pyvisa backend object
(``pyvisa.ResourceManager(library)``) -- turns that reply into what the instrument does: the
``range_error`` entry is queued (``Device.error_response``) and nothing is answered. It only
uses pyvisa-sim's public API: the library's ``open()``, its ``sessions``, a session's
``device`` and the device's ``write``/``read``/``error_response``. Open the files with
``visa_library(path)`` (``hil.bench.lab`` and the tests do); opened as a plain ``"<file>@sim"``
string backend, a value out of range answers the text ``range_error``, which is not an
instrument reply.

``SIM_FILE`` is the definitions file; ``GAUSSMETER_SIM_FILE`` the Lake Shore 425's.

Imports nothing from the rest of the project.
"""

from __future__ import annotations

import weakref
from collections import deque
from pathlib import Path
from typing import Any

from pyvisa import constants
from pyvisa_sim.highlevel import SimVisaLibrary

SIM_FILE = Path(__file__).with_name("sim_lab.yaml")
#: The Lake Shore 425 gaussmeter's definition (its own file: lab configs give it per instrument).
GAUSSMETER_SIM_FILE = Path(__file__).with_name("lakeshore_425.yaml")

#: The setter reply (``e:``) that stands for "queue the device's ``range_error`` entry", and
#: the name of that entry in the device's ``error_queue``.
RANGE_ERROR = "range_error"


class _RangeErrorDevice:
    """A pyvisa-sim device seen through its public ``write``/``read``: a reply that is just
    ``RANGE_ERROR`` queues the device's ``range_error`` entry instead of being answered.

    Every reply is taken from the device right after the write that caused it, so the entry
    is queued before the next command (an error query) is processed.
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self._replies: deque[bytearray] = deque()
        self._partial = bytearray()

    def write(self, data: bytes) -> None:
        self.device.write(data)
        self._drain()

    def _drain(self) -> None:
        """Move the device's finished replies here, queueing ``range_error`` for the marker."""
        while True:
            byte, end = self.device.read()
            if not byte:
                return
            self._partial += byte
            if end:
                reply, self._partial = self._partial, bytearray()
                if bytes(reply).rstrip(b"\r\n") == RANGE_ERROR.encode():
                    self.device.error_response(RANGE_ERROR)
                else:
                    self._replies.append(reply)

    def read(self) -> tuple[bytes, bool]:
        """One byte and whether it ends its reply, as ``pyvisa_sim.devices.Device.read``."""
        if not self._replies:
            self._drain()
            if not self._replies:
                return b"", False
        reply = self._replies[0]
        byte = bytes(reply[:1])
        del reply[:1]
        if reply:
            return byte, False
        self._replies.popleft()
        return byte, True

    def __getattr__(self, name: str) -> Any:
        if name == "device":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.device, name)


class RangeErrorSimLibrary(SimVisaLibrary):
    """pyvisa-sim with the ``range_error`` reply of a setter queued, as the instrument does."""

    def open(self, session: Any, resource_name: str,
             access_mode: constants.AccessModes = constants.AccessModes.no_lock,
             open_timeout: Any = constants.VI_TMO_IMMEDIATE) -> tuple[Any, constants.StatusCode]:
        handle, status = super().open(session, resource_name, access_mode, open_timeout)
        if status == constants.StatusCode.success:
            sess = self.sessions[handle]
            sess.device = _view(sess.device)
        return handle, status


#: One view per simulated device, so that two sessions on one address share its replies.
_VIEWS: weakref.WeakKeyDictionary[Any, _RangeErrorDevice] = weakref.WeakKeyDictionary()


def _view(device: Any) -> _RangeErrorDevice:
    if device not in _VIEWS:
        _VIEWS[device] = _RangeErrorDevice(device)
    return _VIEWS[device]


def visa_library(definitions: str | Path) -> RangeErrorSimLibrary:
    """The pyvisa backend object for a definitions file (a path or a ``"<file>@sim"`` string).

    Like pyvisa's own ``"<file>@sim"``, one library (one simulated state) per file.
    """
    text = str(definitions)
    path = text.removesuffix("@sim") if text.endswith("@sim") else text
    if not path:
        raise ValueError("visa_library needs a definitions file, got the bare '@sim'")
    return RangeErrorSimLibrary(path)
