"""pyvisa-sim definitions of the instruments (``sim_lab.yaml``) and one extension to pyvisa-sim.

pyvisa-sim queues a single message per device, ``command_error``, both for a command the
device does not know and for a known command whose value is outside the property's specs.
A SCPI instrument tells these apart: an unknown header queues -113 "Undefined header", a value
out of range -222 "Data out of range" (SCPI-99 Vol. 2, chapter 21.8 "Error/event queue").
``install_range_errors()`` makes a matched setter whose value fails its specs queue the
device's ``range_error`` entry (``error_queue: [{q: ..., command_error: ..., range_error:
...}]``) and answer nothing, as the instrument does; a device without a ``range_error`` entry
keeps pyvisa-sim's behaviour. ``SIM_FILE`` is the definitions file; ``GAUSSMETER_SIM_FILE``
the Lake Shore 425's.

Imports nothing from the rest of the project.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SIM_FILE = Path(__file__).with_name("sim_lab.yaml")
#: The Lake Shore 425 gaussmeter's definition (its own file: lab configs give it per instrument).
GAUSSMETER_SIM_FILE = Path(__file__).with_name("lakeshore_425.yaml")

#: Name of the error-queue entry queued when a setter's value fails the property's specs.
RANGE_ERROR = "range_error"

_installed = False


def _queue_range_error(device: Any) -> Any:
    """Queue ``range_error`` where the device defines it; pyvisa-sim's fallback otherwise."""
    from pyvisa_sim.component import NoResponse

    queues = getattr(device, "_error_queues", {}).values()
    if any(RANGE_ERROR in getattr(q, "_error_map", {}) for q in queues):
        device.error_response(RANGE_ERROR)
        return NoResponse
    return device.error_response("command_error")


def _match_setters(self: Any, query: bytes) -> Any:
    """pyvisa-sim's setter matching, with ``range_error`` for a value outside the specs."""
    text = query.decode("utf-8")
    device = getattr(self, "_device", self)  # a channel set knows its device
    for name, parser, response, error_response in self._setters:
        try:
            parsed = parser(text)
        except ValueError:
            continue
        try:
            if isinstance(parsed, dict) and "ch_id" in parsed:
                self._selected = parsed["ch_id"]
                self._properties[name].set_value(str(parsed["0"]))
            else:
                self._properties[name].set_value(str(parsed))
            return response
        except ValueError:
            if isinstance(error_response, bytes):
                return error_response  # the device answers its own failure reply
            return _queue_range_error(device)
    return None


def install_range_errors() -> None:
    """Patch pyvisa-sim (idempotent) so out-of-spec values queue ``range_error``."""
    global _installed
    if _installed:
        return
    from pyvisa_sim import channels, component

    component.Component._match_setters = _match_setters
    channels.Channels._match_setters = _match_setters
    _installed = True
