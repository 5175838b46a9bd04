"""Oscillator-array chip controller (SCPI with IEEE 488.2 definite-length binary blocks).

The controller programs every layer's ``W_ext``, ``W_int`` and ``b`` from one block
(``PAR:DATA``), runs a batch of input sequences (``RUN <B>,<T>,<block>``) and returns the
measured outputs, states and filter outputs as blocks (``FETC:OUTP?``, ``FETC:STAT?``,
``FETC:FILT?``); arrays are float32 little-endian, C order. The virtual lab's
``sims.virtual_lab.chip`` answers these commands. The driver checks the identity, validates
every block it sends or reads (header, length, finite values), refuses blocks over
``max_block_bytes`` before sending, and reads the error queue after every command.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from drivers.base import LimitError, Option, ProtocolError, Range, ScpiInstrument

KEYS = ("W_ext", "W_int", "b")


def encode_block(payload: bytes) -> bytes:
    """``payload`` as ``#<n><len><payload>``."""
    n = str(len(payload))
    if len(n) > 9:
        raise ValueError("a definite-length block holds at most 999999999 bytes")
    return f"#{len(n)}{n}".encode("ascii") + payload


def decode_block(data: bytes) -> bytes:
    """The payload of one complete block (a trailing newline is allowed); ``ValueError`` when
    the header or the length is wrong."""
    if len(data) < 2 or data[:1] != b"#" or not data[1:2].isdigit() or data[1:2] == b"0":
        raise ValueError(f"not a definite-length block: starts with {bytes(data[:8])!r}")
    n = int(data[1:2])
    digits = data[2:2 + n]
    if len(digits) != n or not digits.isdigit():
        raise ValueError(f"bad block length field {bytes(digits)!r}")
    length = int(digits)
    payload = data[2 + n:2 + n + length]
    rest = data[2 + n + length:]
    if len(payload) != length or rest not in (b"", b"\n", b"\r\n"):
        raise ValueError(f"block length {length} does not match the {len(data) - 2 - n} bytes sent")
    return bytes(payload)


class OscillatorChipController(ScpiInstrument):
    """A chip controller answering ``HIL,OSC-ARRAY-SIM`` (the virtual lab's chip)."""

    MODEL = "HIL oscillator-array chip controller"
    KIND = "chip"
    IDN_PATTERN = r"OSC-ARRAY"
    INTERFACES = ("GPIB", "USB", "TCPIP")
    DEFAULT_TIMEOUT_MS = 60000.0
    #: sizes of one run (a lab configuration may tighten them)
    HARD_LIMITS: ClassVar = {"sequences": Range(1, 1_000_000, "seq"), "points": Range(1, 1_000_000, "pt")}
    OPTIONS: ClassVar = {"max_block_bytes": Option(int, 64_000_000, "largest block sent or read")}

    def clear_errors(self) -> None:
        """``*CLS``: empty the error queue."""
        self.write("*CLS")

    # ---- configuration

    def configure(self, settings: Mapping[str, Any] | None = None, seed: int | None = None) -> dict[str, Any]:
        """Set device settings (JSON) and/or the seed; returns the full configuration."""
        if settings:
            self.set("CONF:DEV " + json.dumps(dict(settings), separators=(",", ":")))
        if seed is not None:
            self.set(f"CONF:SEED {int(seed)}")
        return self.config()

    def config(self) -> dict[str, Any]:
        reply = self.query("CONF:DEV?")
        try:
            cfg = json.loads(reply)
        except json.JSONDecodeError:
            raise ProtocolError(f"unreadable reply {reply[:60]!r}", instrument=self.describe(),
                                command="CONF:DEV?") from None
        return cfg

    def shapes(self, cfg: Mapping[str, Any] | None = None) -> list[tuple[int, ...]]:
        c = cfg or self.config()
        N, n_in = int(c["n_hidden"]), int(c["n_in"])
        out: list[tuple[int, ...]] = []
        for li in range(int(c["n_layers"])):
            out += [(N, n_in if li == 0 else N), (N, N), (N,)]
        return out

    # ---- blocks

    def _send_block(self, head: str, values: np.ndarray) -> None:
        arr = np.asarray(values, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise LimitError(f"{head}: values must be finite", instrument=self.describe(), command=head)
        payload = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        if len(payload) > self.options["max_block_bytes"]:
            raise LimitError(f"{head}: block of {len(payload)} bytes exceeds max_block_bytes "
                             f"{self.options['max_block_bytes']}", instrument=self.describe(), command=head)
        self.write_raw(head.encode("ascii") + encode_block(payload) + b"\n", head)
        self.check_errors(after=head)

    def _read_block(self, command: str) -> bytes:
        self.write(command)
        head = self.read_raw(2, command)
        if head[:1] != b"#" or not head[1:2].isdigit() or head[1:2] == b"0":
            raise ProtocolError(f"reply is not a definite-length block: {head!r}",
                                instrument=self.describe(), command=command)
        digits = self.read_raw(int(head[1:2]), command)
        if not digits.isdigit():
            raise ProtocolError(f"bad block length {digits!r}", instrument=self.describe(), command=command)
        length = int(digits)
        if length > self.options["max_block_bytes"]:
            raise ProtocolError(f"reply block of {length} bytes exceeds max_block_bytes",
                                instrument=self.describe(), command=command)
        payload = self.read_raw(length, command) if length else b""
        end = self.read_raw(1, command)
        if len(payload) != length or end != b"\n":
            raise ProtocolError("truncated block reply", instrument=self.describe(), command=command)
        return payload

    def _read_array(self, command: str, shape: tuple[int, ...]) -> np.ndarray:
        payload = self._read_block(command)
        if len(payload) != 4 * int(np.prod(shape)):
            raise ProtocolError(f"expected {int(np.prod(shape))} float32 values for shape {shape}, "
                                f"got {len(payload)} bytes", instrument=self.describe(), command=command)
        return np.frombuffer(payload, dtype="<f4").astype(np.float64).reshape(shape)

    # ---- chip operations

    def upload(self, layers: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any] | None = None) -> None:
        """Program every layer (``W_ext``, ``W_int``, ``b``) in one block."""
        shapes = self.shapes(cfg)
        flat = []
        for i, shape in enumerate(shapes):
            a = np.asarray(layers[i // 3][KEYS[i % 3]], dtype=np.float64)
            if a.shape != shape:
                raise LimitError(f"layers[{i // 3}].{KEYS[i % 3]}: expected shape {shape}, got {a.shape}",
                                 instrument=self.describe(), command="PAR:DATA")
            flat.append(a.ravel())
        self._send_block("PAR:DATA ", np.concatenate(flat))

    def programmed(self, cfg: Mapping[str, Any] | None = None) -> list[dict[str, np.ndarray]]:
        """The weights actually written, read back."""
        shapes = self.shapes(cfg)
        total = sum(int(np.prod(s)) for s in shapes)
        flat = self._read_array("PAR:DATA?", (total,))
        out: list[dict[str, np.ndarray]] = []
        i = 0
        for k, shape in enumerate(shapes):
            size = int(np.prod(shape))
            if k % 3 == 0:
                out.append({})
            out[-1][KEYS[k % 3]] = flat[i:i + size].reshape(shape)
            i += size
        return out

    def run(self, inputs: np.ndarray, cfg: Mapping[str, Any] | None = None, *,
            states: bool = True) -> dict[str, Any]:
        """Run ``(B, T, n_in)`` inputs; returns outputs, states, filtered (``(B, T, .)``) and the
        device time."""
        c = cfg or self.config()
        u = np.asarray(inputs, dtype=np.float64)
        if u.ndim != 3 or u.shape[2] != int(c["n_in"]):
            raise LimitError(f"inputs: expected shape (B, T, {c['n_in']}), got {u.shape}",
                             instrument=self.describe(), command="RUN")
        B, T = u.shape[:2]
        self.limits["sequences"].check("sequences", B, instrument=self.describe())
        self.limits["points"].check("points", T, instrument=self.describe())
        self._send_block(f"RUN {B},{T},", u)
        self.wait_complete()
        N = int(c["n_hidden"])
        M = N * int(c["n_layers"])
        out: dict[str, Any] = {"outputs": self._read_array("FETC:OUTP?", (B, T, N))}
        if states:
            out["states"] = self._read_array("FETC:STAT?", (B, T, M))
            out["filtered"] = self._read_array("FETC:FILT?", (B, T, M))
        out["device_time_s"] = self.query_float("FETC:TIME?")
        self.check_errors(after="RUN")
        return out

    def describe_device(self) -> dict[str, Any]:
        payload = self._read_block("DEV:DESC?")
        try:
            return json.loads(payload)
        except json.JSONDecodeError:
            raise ProtocolError("unreadable description", instrument=self.describe(),
                                command="DEV:DESC?") from None

    def safe_shutdown(self) -> None:
        """Nothing to switch off; leave the error queue empty."""
        self.report_errors(after="close")
