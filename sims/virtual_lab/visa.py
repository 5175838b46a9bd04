"""The pyvisa backend of the virtual lab: a ``VisaLibraryBase`` whose resources are the
instrument models of one ``World``.

``pyvisa.ResourceManager(VirtualVisaLibrary.for_world(world))`` gives a resource manager on
which ``open_resource(address)`` opens the world's instrument at that address; the drivers then
talk to it exactly as to a real instrument (message framing, terminations, timeouts, binary
reads). Each library instance serves one world, so every instrument opened through it shares
that world and its clock.

Semantics follow VISA (and pyvisa-sim, from which the facts were taken): a read returns the
pending output up to the termination character when it is enabled (status
``success_termination_character_read``), up to ``count`` bytes (``success_max_count_read``) or
to the end of the message (``success``, the END indicator); a read with nothing pending is a
timeout, which costs the resource's timeout in lab time and raises ``VisaIOError``. Unlike
pyvisa-sim, a whole reply is handed over at once (no byte-by-byte polling), so ten thousand
queries take seconds of wall time.
"""

from __future__ import annotations

import itertools
from typing import Any

from pyvisa import attributes, constants, highlevel, rname
from pyvisa.constants import StatusCode
from pyvisa.typing import VISARMSession, VISASession
from pyvisa.util import LibraryPath

from sims.virtual_lab.scpi import InstrumentModel
from sims.virtual_lab.world import World

_COUNTER = itertools.count(1)


def _board(parsed: Any) -> int:
    try:
        return int(getattr(parsed, "board", 0))
    except (TypeError, ValueError):
        return 0


class _Session:
    """One open resource: its attributes and the instrument model behind it."""

    def __init__(self, resource_name: str, parsed: Any, model: InstrumentModel) -> None:
        self.model = model
        self.parsed = parsed
        self.attrs: dict[Any, Any] = {
            constants.ResourceAttribute.resource_name: resource_name,
            constants.ResourceAttribute.resource_class: parsed.resource_class,
            constants.ResourceAttribute.interface_type: parsed.interface_type_const,
            constants.ResourceAttribute.interface_number: _board(parsed),
        }

    def get(self, attribute: Any) -> tuple[Any, StatusCode]:
        if attribute in self.attrs:
            return self.attrs[attribute], StatusCode.success
        attr = attributes.AttributesByID.get(attribute)
        if attr is None:
            return 0, StatusCode.error_nonsupported_attribute
        return self.attrs.setdefault(attribute, attr.default), StatusCode.success


class VirtualVisaLibrary(highlevel.VisaLibraryBase):
    """pyvisa library whose instruments are the models of one virtual ``World``."""

    world: World
    sessions: dict[int, Any]

    @staticmethod
    def get_library_paths() -> tuple[LibraryPath, ...]:
        return (LibraryPath("virtual-lab"),)

    @staticmethod
    def get_debug_info() -> dict[str, str]:
        return {"backend": "hil virtual spintronics lab (sims.virtual_lab)"}

    @classmethod
    def for_world(cls, world: World) -> VirtualVisaLibrary:
        """A new library instance serving ``world`` (pyvisa caches instances by path, so each
        world gets its own path)."""
        lib = cls(LibraryPath(f"virtual-lab:{world.name}:{next(_COUNTER)}", "virtual"))
        lib.world = world
        return lib

    def _init(self) -> None:
        self.sessions = {}
        self._ids = itertools.count(1000)

    def _register(self, obj: Any) -> int:
        session = next(self._ids)
        self.sessions[session] = obj
        return session

    # ---- resource manager

    def open_default_resource_manager(self) -> tuple[VISARMSession, StatusCode]:
        session = VISARMSession(self._register(self))
        return session, self.handle_return_value(session, StatusCode.success)

    def list_resources(self, session: VISARMSession, query: str = "?*::INSTR") -> tuple[str, ...]:
        resources = rname.filter(tuple(self.world.by_address), query)
        if not resources:
            self.handle_return_value(session, StatusCode.error_resource_not_found)
        return tuple(resources)

    def open(self, session: VISARMSession, resource_name: str,
             access_mode: constants.AccessModes = constants.AccessModes.no_lock,
             open_timeout: Any = constants.VI_TMO_IMMEDIATE) -> tuple[VISASession, StatusCode]:
        try:
            parsed = rname.parse_resource_name(resource_name)
        except rname.InvalidResourceName:
            return VISASession(0), self.handle_return_value(
                None, StatusCode.error_invalid_resource_name)
        model = self.world.by_address.get(str(parsed))
        if model is None:
            return VISASession(0), self.handle_return_value(
                None, StatusCode.error_resource_not_found)
        sess = VISASession(self._register(_Session(str(parsed), parsed, model)))
        return sess, self.handle_return_value(sess, StatusCode.success)

    def close(self, session: Any) -> StatusCode:
        if self.sessions.pop(session, None) is None:
            return self.handle_return_value(None, StatusCode.error_invalid_object)
        return StatusCode.success

    # ---- I/O

    def _session(self, session: Any) -> _Session | None:
        sess = self.sessions.get(session)
        return sess if isinstance(sess, _Session) else None

    def write(self, session: VISASession, data: bytes) -> tuple[int, StatusCode]:
        sess = self._session(session)
        if sess is None:
            return 0, self.handle_return_value(session, StatusCode.error_invalid_object)
        sess.model.receive(bytes(data))
        return len(data), self.handle_return_value(session, StatusCode.success)

    def read(self, session: VISASession, count: int) -> tuple[bytes, StatusCode]:
        sess = self._session(session)
        if sess is None:
            return b"", self.handle_return_value(session, StatusCode.error_invalid_object)
        model = sess.model
        if not model.out:
            timeout_ms, _ = sess.get(constants.ResourceAttribute.timeout_value)
            if timeout_ms not in (None, constants.VI_TMO_INFINITE):
                model.clock.advance(float(timeout_ms) / 1000.0, f"{model.name}: timeout")
            return b"", self.handle_return_value(session, StatusCode.error_timeout)
        enabled, _ = sess.get(constants.ResourceAttribute.termchar_enabled)
        termchar, _ = sess.get(constants.ResourceAttribute.termchar)
        chunk = model.take(count, int(termchar) if enabled else None)
        if enabled and chunk.endswith(bytes([int(termchar)])):
            status = StatusCode.success_termination_character_read
        elif len(chunk) == count and model.out:
            status = StatusCode.success_max_count_read
        elif sess.parsed.interface_type_const == constants.InterfaceType.asrl:
            # a serial line has no END: a binary read stops at the requested count
            status = (StatusCode.success_max_count_read if len(chunk) == count
                      else StatusCode.success)
        else:
            status = StatusCode.success
        return chunk, self.handle_return_value(session, status)

    def clear(self, session: VISASession) -> StatusCode:
        sess = self._session(session)
        if sess is not None:
            sess.model.clear()
        return self.handle_return_value(session, StatusCode.success)

    def flush(self, session: VISASession, mask: Any) -> StatusCode:
        return self.handle_return_value(session, StatusCode.success)

    # ---- attributes and events

    def get_attribute(self, session: Any, attribute: Any) -> tuple[Any, StatusCode]:
        sess = self._session(session)
        if sess is None:
            return 0, StatusCode.error_invalid_object
        return sess.get(attribute)

    def set_attribute(self, session: Any, attribute: Any, attribute_state: Any) -> StatusCode:
        sess = self._session(session)
        if sess is None:
            return StatusCode.error_invalid_object
        sess.attrs[attribute] = attribute_state
        return StatusCode.success

    def disable_event(self, session: Any, event_type: Any, mechanism: Any) -> StatusCode:
        return StatusCode.success

    def discard_events(self, session: Any, event_type: Any, mechanism: Any) -> StatusCode:
        return StatusCode.success
