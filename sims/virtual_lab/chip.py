"""A virtual oscillator-array chip controller: the simulated chip of ``sims.oscillator_device``
behind an IEEE 488.2/SCPI interface with definite-length binary blocks.

Commands (``#<n><len><bytes>`` is an IEEE 488.2 definite-length block; every array is
float32 little-endian, C order):

* ``*IDN?``, ``*CLS``, ``*RST``, ``*OPC?`` (waits, in lab time, for a run), ``SYST:ERR?``;
* ``CONFigure:DEVice <json>``: settings of ``DeviceConfig`` merged over the world file's
  ``device`` entry, the chip rebuilt (the virtual controller emulates a chip of any structure);
  ``CONFigure:DEVice?`` the full configuration as JSON;
* ``CONFigure:SEED <n>`` / ``?``: the seed that draws the chip (rebuilds it);
* ``PARameters:DATA <block>``: every layer's ``W_ext``, ``W_int``, ``b`` in that order,
  concatenated (the shapes follow from the structure); ``PARameters:DATA?`` what was actually
  written, in the same layout;
* ``RUN <B>,<T>,<block>``: run ``B`` sequences of ``T`` points (``B x T x n_in`` values);
  the chip is busy for the run's device time (``*OPC?`` waits for it);
* ``FETCh:OUTPut?``, ``FETCh:STATes?``, ``FETCh:FILTered?``: blocks of the last run
  (``B x T x N`` / ``B x T x M``); ``FETCh:TIME?``: its device time (s);
* ``DEVice:DESCribe?``: ``describe()`` of the simulated chip, JSON in a block.

Errors: -161 malformed block or wrong length, -223 block larger than ``max_block_bytes``,
-221 nothing programmed / nothing run, -224 a value the chip refuses.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import numpy as np

from sims.oscillator_device import DeviceConfig, DeviceConfigError, OscillatorArrayDevice
from sims.virtual_lab.scpi import ScpiError, ScpiModel, compile_header

if TYPE_CHECKING:
    from sims.virtual_lab.world import World

KEYS = ("W_ext", "W_int", "b")
_PARAMS = compile_header("PARameters:DATA")
_RUN = compile_header("RUN")


def block(payload: bytes) -> bytes:
    """``payload`` as an IEEE 488.2 definite-length block."""
    n = str(len(payload))
    return f"#{len(n)}{n}".encode("ascii") + payload


class OscillatorChipModel(ScpiModel):
    MODEL = "hil_oscillator_chip"
    IDN = "HIL,OSC-ARRAY-SIM,{serial},1.0"

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        super().__init__(world, name, spec)
        self._binary_out = False
        self.seed = int(spec["seed"]) if spec["seed"] is not None else int(world.seed)
        self.settings: dict[str, Any] = dict(spec["device"] or {})
        self._build()
        self.route("CONFigure:DEVice", self._conf_device)
        self.route("CONFigure:SEED", self._conf_seed)
        self.route("PARameters:DATA", lambda a, q, g: self._params(q))
        self.route("FETCh:OUTPut", lambda a, q, g: self._fetch("outputs", q))
        self.route("FETCh:STATes", lambda a, q, g: self._fetch("states", q))
        self.route("FETCh:FILTered", lambda a, q, g: self._fetch("filtered", q))
        self.route("FETCh:TIME", lambda a, q, g: self._fetch_time(q))
        self.route("DEVice:DESCribe", lambda a, q, g: self._describe(q))
        self.route("RUN", lambda a, q, g: self._no_block())

    # ---- chip

    def _build(self) -> None:
        try:
            cfg = DeviceConfig.from_mapping(self.settings, prefix="device")
            self.device = OscillatorArrayDevice(cfg, self.seed)
        except DeviceConfigError as exc:
            raise ScpiError(-224, f"Illegal parameter value: {exc}") from None
        self.last: Any = None

    def reset(self) -> None:
        self._build()

    def _shapes(self) -> list[tuple[int, ...]]:
        c = self.device.config
        N = c.n_hidden
        out: list[tuple[int, ...]] = []
        for li in range(c.n_layers):
            out += [(N, c.n_in if li == 0 else N), (N, N), (N,)]
        return out

    # ---- handlers

    def _conf_device(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        if query:
            return json.dumps(dataclasses.asdict(self.device.config))
        try:
            given = json.loads(args)
        except json.JSONDecodeError:
            raise ScpiError(-224, "Illegal parameter value: not a JSON object") from None
        if not isinstance(given, dict):
            raise ScpiError(-224, "Illegal parameter value: not a JSON object")
        old = self.settings
        self.settings = {**self.settings, **given}
        try:
            self._build()
        except ScpiError:
            self.settings = old
            self._build()
            raise
        return None

    def _conf_seed(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        if query:
            return str(self.seed)
        seed = self.number_in(args, 0, 2**63 - 1)
        if seed != int(seed):
            raise ScpiError(-224, "Illegal parameter value")
        self.seed = int(seed)
        self._build()
        return None

    def _params(self, query: bool) -> str | None:
        if not query:
            raise ScpiError(-161, "Invalid block data")
        try:
            layers = self.device.programmed()
        except RuntimeError:
            raise ScpiError(-221, "Settings conflict: nothing programmed") from None
        flat = np.concatenate([layer[k].ravel() for layer in layers for k in KEYS])
        return self._binary(flat.astype("<f4").tobytes())

    def _fetch(self, what: str, query: bool) -> str | None:
        if not query:
            self._no_set()
        if self.last is None:
            raise ScpiError(-221, "Settings conflict: nothing run")
        return self._binary(np.ascontiguousarray(getattr(self.last, what), dtype="<f4").tobytes())

    def _fetch_time(self, query: bool) -> str | None:
        if not query:
            self._no_set()
        if self.last is None:
            raise ScpiError(-221, "Settings conflict: nothing run")
        return repr(float(self.last.device_time_s))

    def _describe(self, query: bool) -> str | None:
        if not query:
            self._no_set()
        return self._binary(json.dumps(self.device.describe()).encode())

    @staticmethod
    def _no_block() -> None:
        raise ScpiError(-161, "Invalid block data")

    def _binary(self, payload: bytes) -> str:
        """Replies are text; a binary reply is queued directly and marked for ``handle``."""
        self.out += block(payload) + b"\n"
        self._binary_out = True
        return ""

    def handle(self, command: str) -> str | None:
        self._binary_out = False
        reply = super().handle(command)
        if self._binary_out:
            return None  # already queued
        return reply

    # ---- blocks

    def handle_bytes(self, data: bytes) -> None:
        """Text lines as usual; a command whose arguments hold ``#`` carries a binary block,
        which may contain any byte (newlines included)."""
        self._pending += data
        while self._pending:
            nl = self._pending.find(b"\n")
            hs = self._pending.find(b"#")
            if hs < 0 or (0 <= nl < hs):
                if nl < 0:
                    return
                line = self._pending[:nl].decode("ascii", "replace").strip("\r").strip()
                del self._pending[:nl + 1]
                if line:
                    reply = self.handle(line)
                    if reply is not None:
                        self.out += (reply + self.TERM).encode("ascii")
                continue
            head = self._pending[:hs].decode("ascii", "replace").strip()
            if len(self._pending) < hs + 2:
                return
            ndig = chr(self._pending[hs + 1])
            if not ndig.isdigit() or ndig == "0":
                self._drop(-161, "Invalid block data")
                continue
            n = int(ndig)
            if len(self._pending) < hs + 2 + n:
                return
            digits = self._pending[hs + 2: hs + 2 + n].decode("ascii", "replace")
            if not digits.isdigit():
                self._drop(-161, "Invalid block data")
                continue
            length = int(digits)
            if length > int(self.spec["max_block_bytes"]):
                self._drop(-223, "Too much data")
                continue
            start = hs + 2 + n
            if len(self._pending) < start + length:
                return
            payload = bytes(self._pending[start:start + length])
            end = start + length
            if self._pending[end:end + 1] == b"\r":
                end += 1
            if self._pending[end:end + 1] == b"\n":
                end += 1
            del self._pending[:end]
            try:
                self._block_command(head, payload)
            except ScpiError as exc:
                self.push_error(exc.code, exc.message)

    def _drop(self, code: int, message: str) -> None:
        """A block that cannot be read: queue the error and discard everything pending."""
        self.push_error(code, message)
        self._pending.clear()

    def _block_command(self, head: str, payload: bytes) -> None:
        header, _, args = head.partition(" ")
        if len(payload) % 4:
            raise ScpiError(-161, "Invalid block data")
        values = np.frombuffer(payload, dtype="<f4").astype(np.float64)
        if not np.isfinite(values).all():
            raise ScpiError(-224, "Illegal parameter value: non-finite values")
        if _PARAMS.match(header):
            self._program(values)
        elif _RUN.match(header):
            self._run(args, values)
        else:
            raise ScpiError(-113, "Undefined header")

    def _program(self, values: np.ndarray) -> None:
        shapes = self._shapes()
        sizes = [int(np.prod(s)) for s in shapes]
        if len(values) != sum(sizes):
            raise ScpiError(-161, f"Invalid block data: expected {sum(sizes)} values, "
                            f"got {len(values)}")
        arrays, i = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            arrays.append(values[i:i + size].reshape(shape))
            i += size
        layers = [dict(zip(KEYS, arrays[3 * li: 3 * li + 3], strict=True))
                  for li in range(self.device.config.n_layers)]
        try:
            self.device.program(layers)
        except ValueError as exc:
            raise ScpiError(-224, f"Illegal parameter value: {exc}") from None
        self.busy_for(self.device.config.program_overhead_s)

    def _run(self, args: str, values: np.ndarray) -> None:
        parts = [p.strip() for p in args.split(",") if p.strip()]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ScpiError(-109, "Missing parameter: RUN <B>,<T>,<block>")
        B, T = int(parts[0]), int(parts[1])
        n_in = self.device.config.n_in
        if B < 1 or T < 1 or len(values) != B * T * n_in:
            raise ScpiError(-161, f"Invalid block data: expected {B}x{T}x{n_in} values, "
                            f"got {len(values)}")
        try:
            self.device.programmed()
        except RuntimeError:
            raise ScpiError(-221, "Settings conflict: nothing programmed") from None
        try:
            r = self.device.run(values.reshape(B, T, n_in))
        except ValueError as exc:
            raise ScpiError(-224, f"Illegal parameter value: {exc}") from None
        self.last = r
        self.busy_for(r.device_time_s)

    def truth(self) -> dict[str, Any]:
        return {"seed": self.seed, "config": dataclasses.asdict(self.device.config),
                "device_time_s": self.device.device_time_s}
