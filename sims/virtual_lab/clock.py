"""The virtual clock: lab time that instruments advance, much faster than real time.

Every action on the virtual bench costs the lab time it would take on the real one: bus
transfers, a source's settling before ``*OPC?`` answers, a voltmeter's integration, a stage's
motion, a sweep, or the caller's own waits (``sleep``). Nothing sleeps for real: the clock is
a number, advanced when the host would be waiting for the bench.

``spent_s`` keeps the time per activity (``"nvm: integration"``, ``"z: motion"``, ...) so a
procedure can report where its lab time would go; ``stopwatch()`` measures one procedure.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Lap:
    """Lab time of one ``with clock.stopwatch()`` block (``lab_s``; per activity in ``spent_s``)."""

    start_s: float
    lab_s: float = 0.0
    spent_s: dict[str, float] = field(default_factory=dict)


class VirtualClock:
    """Monotonic lab time in seconds since the world was created."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._now_s = float(start_s)
        self.spent_s: defaultdict[str, float] = defaultdict(float)

    def now_s(self) -> float:
        return self._now_s

    def advance(self, seconds: float, what: str = "wait") -> None:
        """Let ``seconds`` of lab time pass, booked under ``what``."""
        if not seconds >= 0:
            raise ValueError(f"the clock cannot go back or stand still on NaN ({seconds!r} s)")
        self._now_s += seconds
        self.spent_s[what] += seconds

    def advance_to(self, t_s: float, what: str = "wait") -> None:
        """Let time pass until ``t_s`` (nothing if that is already past)."""
        if t_s > self._now_s:
            self.advance(t_s - self._now_s, what)

    def sleep(self, seconds: float) -> None:
        """The caller waits (settling, stabilisation): the drop-in for ``time.sleep``."""
        self.advance(max(0.0, float(seconds)), "sleep")

    @contextmanager
    def stopwatch(self) -> Iterator[Lap]:
        """Measure the lab time of a block: ``with clock.stopwatch() as lap: ...; lap.lab_s``."""
        before = dict(self.spent_s)
        lap = Lap(self._now_s)
        try:
            yield lap
        finally:
            lap.lab_s = self._now_s - lap.start_s
            lap.spent_s = {k: v - before.get(k, 0.0) for k, v in self.spent_s.items()
                           if v - before.get(k, 0.0) > 0}

    def report(self) -> str:
        """Lab time so far and its largest items, for humans."""
        items = sorted(self.spent_s.items(), key=lambda kv: -kv[1])[:8]
        parts = ", ".join(f"{k} {v:.3g} s" for k, v in items)
        return f"lab time {self._now_s:.6g} s ({parts})"
