"""Mini-Circuits RC-1SP4T-A18 four-way RF switch (ASCII over a raw socket, thesis 4.4).

Commands as the Mini-Circuits programming manual for its RC- switch boxes gives them (see
``drivers.rf_switch``): ``:MN?``, ``:SN?``, ``:SP4TA:STATE:<n>`` (0 = every port
disconnected; answers "1" on success, "0" on failure), ``:SP4TA:STATE?``, and the mask forms
``SETP=<mask>`` (bit n-1 = port n, at most one bit; answers "1"/"0") and ``SWPORT?``. The
leading colon is optional and case does not matter; a command the box does not know answers
"0". The switch is electromechanical: a change takes ``switching_s`` before its status comes
back.

Transmission (thesis Fig. 4.5c): the connected port loses ``insertion_loss_db`` plus a slope
per GHz plus a small standing-wave ripple, each port with its own drawn offset and ripple
phase; a disconnected port leaks ``isolation_db`` below the input.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from sims.virtual_lab.scpi import TextModel

if TYPE_CHECKING:
    from sims.virtual_lab.world import World

_STATE = re.compile(r"^:?SP4TA:STATE:(\d+)$")
_SETP = re.compile(r"^:?SETP=(\d+)$")


class Rc1sp4tModel(TextModel):
    MODEL = "minicircuits_rc_1sp4t"
    TERM = "\r\n"
    PORTS = (1, 2, 3, 4)

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        super().__init__(world, name, spec)
        rng = self.rng("unit")
        self.port_offset_db = {p: float(rng.normal(0, spec["loss_sigma_db"])) for p in self.PORTS}
        self.port_phase = {p: float(rng.uniform(0, 2 * math.pi)) for p in self.PORTS}
        self.state = 0
        self._ratio_cache: tuple[Any, np.ndarray] | None = None

    def handle(self, command: str) -> str | None:
        upper = command.strip().upper().removeprefix(":")
        if upper == "MN?":
            return "MN=RC-1SP4T-A18"
        if upper == "SN?":
            return f"SN={self.spec['serial']}"
        if upper == "SP4TA:STATE?":
            return str(self.state)
        if upper == "SWPORT?":
            return str(0 if self.state == 0 else 1 << (self.state - 1))
        match = _STATE.match(upper)
        if match is not None:
            return self._connect(int(match.group(1)))
        match = _SETP.match(upper)
        if match is not None:
            mask = int(match.group(1))
            if mask & (mask - 1) or mask >= 1 << len(self.PORTS):
                return "0"  # more than one port of one SP4T, or no such port
            return self._connect(mask.bit_length())
        return "0"

    def _connect(self, port: int) -> str:
        if port not in (0, *self.PORTS):
            return "0"
        if port != self.state:
            self.clock.advance(self.spec["switching_s"], f"{self.name}: switching")
        self.state = port
        return "1"

    def loss_db(self, port: int, freq_hz: np.ndarray) -> np.ndarray:
        """Insertion loss of ``port`` when connected (dB, frequency dependent)."""
        s = self.spec
        f = np.asarray(freq_hz, float)
        return (s["insertion_loss_db"] + self.port_offset_db[port]
                + s["slope_db_per_ghz"] * f / 1e9
                + s["ripple_db"] * np.sin(2 * np.pi * f / s["ripple_period_hz"]
                                          + self.port_phase[port]))

    def ratio(self, port: int, freq_hz: np.ndarray) -> np.ndarray:
        """Power ratio from COM to ``port`` (and back: the switch is passive) now."""
        if port != self.state:
            return np.full(np.shape(freq_hz), 10 ** (-self.spec["isolation_db"] / 10))
        key = (port, np.asarray(freq_hz, float).tobytes())
        if self._ratio_cache is None or self._ratio_cache[0] != key:
            self._ratio_cache = (key, 10 ** (-self.loss_db(port, freq_hz) / 10))
        return self._ratio_cache[1]

    def truth(self) -> dict[str, Any]:
        return {"port_offset_db": self.port_offset_db, "port_ripple_phase_rad": self.port_phase,
                "state": self.state}
