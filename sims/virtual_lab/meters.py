"""Measuring instruments: the Keithley 2182A nanovoltmeter and the R&S FSV spectrum analyser.

``K2182aModel`` reads the DC voltage the world puts on each channel (the sum of the devices
wired to it: their DC ports are in series, so only RF-fed devices contribute) plus a thermal
EMF offset that drifts slowly (which the RF on/off difference of thesis 2.6.1 removes) plus
white noise: ~20 nV rms at NPLC 5 (thesis 4.6.2), scaling as 1/sqrt(NPLC), and divided by
sqrt(count) by the repeating digital filter. Each conversion takes ``NPLC / f_line`` times the
autozero factor plus an overhead, booked on the clock; ``READ?`` returns when it is done.

``FsvModel`` sweeps the tones at its input: a marker peak at the sweep point nearest each
tone (auto-peak detector, 691 points), the tone's level plus the unit's level error and a
little noise, over a noise floor of DANL + 10 log(RBW) + the input attenuation above 10 dB.
A sweep takes about ``2.5 span / RBW^2`` (at least 1 ms, zero span 1 ms); ``*OPC?`` waits.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from sims.spindiode import w_to_dbm
from sims.virtual_lab.drift import GridProcess
from sims.virtual_lab.scpi import ScpiError, ScpiModel, parse_bool

if TYPE_CHECKING:
    from sims.virtual_lab.world import World

OVERFLOW = 9.9e37
_RANGES_V = {1: (0.01, 0.1, 1.0, 10.0, 100.0), 2: (0.1, 1.0, 10.0)}


class K2182aModel(ScpiModel):
    MODEL = "keithley_2182a"
    IDN = "KEITHLEY INSTRUMENTS INC.,MODEL 2182A,{serial},C04  /A02"

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        super().__init__(world, name, spec)
        rng = self.rng("unit")
        self.static_offset_v = rng.normal(0, spec["offset_sigma_v"], 2)
        self.offset_drift = GridProcess(self.rng("offset"), 2, 1.0, sigma=spec["offset_drift_v"],
                                        tau_s=spec["offset_tau_s"])
        self.noise = self.rng("noise")
        self.reset()
        self.route("[SENSe]:FUNCtion", self._function)
        self.route("[SENSe]:CHANnel", self._channel)
        self.route("[SENSe]:VOLTage[:DC]:NPLCycles", self._nplc)
        self.route("[SENSe]:VOLTage[:DC]:DFILter[:STATe]", self._filter_state)
        self.route("[SENSe]:VOLTage[:DC]:DFILter:COUNt", self._filter_count)
        self.route("[SENSe]:VOLTage[:DC]:DFILter:TCONtrol", self._filter_type)
        self.route("[SENSe]:VOLTage[:DC]:CHANnel#:RANGe[:UPPer]", self._range)
        self.route("[SENSe]:VOLTage[:DC]:CHANnel#:RANGe:AUTO", self._autorange)
        self.route("READ", self._read)
        self.route("FETCh", self._fetch)

    def reset(self) -> None:
        self.channel = 1
        self.nplc = 5.0
        self.filter_on = False
        self.filter_count = 10
        self.filter_type = "MOV"
        self.range_v = {1: 100.0, 2: 10.0}
        self.autorange = {1: True, 2: True}
        self.last: float | None = None
        self._stack: deque[float] = deque()

    def _changed(self) -> None:
        self._stack.clear()

    def _function(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        if query:
            return '"VOLT"'
        if args.strip("'\"").upper() not in ("VOLT", "VOLT:DC", "VOLTAGE", "VOLTAGE:DC"):
            raise ScpiError(-224, "Illegal parameter value")
        return None

    def _channel(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            value = self.number_in(text, 1, 2)
            if value != int(value):
                raise ScpiError(-224, "Illegal parameter value")
            self.channel = int(value)
            self._changed()
        return self.setting(args, query, lambda: str(self.channel), put)

    def _nplc(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        top = 50.0 if self.spec["line_freq_hz"] == 50 else 60.0

        def put(text: str) -> None:
            self.nplc = self.number_in(text, 0.01, top)
            self._changed()
        return self.setting(args, query, lambda: f"{self.nplc:.2f}", put)

    def _filter_state(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            self.filter_on = parse_bool(text)
            self._changed()
        return self.setting(args, query, lambda: "1" if self.filter_on else "0", put)

    def _filter_count(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            value = self.number_in(text, 1, 100)
            if value != int(value):
                raise ScpiError(-224, "Illegal parameter value")
            self.filter_count = int(value)
            self._changed()
        return self.setting(args, query, lambda: str(self.filter_count), put)

    def _filter_type(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            word = text.strip().upper()[:3]
            if word not in ("MOV", "REP"):
                raise ScpiError(-224, "Illegal parameter value")
            self.filter_type = word
            self._changed()
        return self.setting(args, query, lambda: self.filter_type, put)

    def _which(self, groups: tuple[str, ...]) -> int:
        channel = int(groups[0] or 1)
        if channel not in _RANGES_V:
            raise ScpiError(-114, "Header suffix out of range")
        return channel

    def _range(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        channel = self._which(groups)

        def put(text: str) -> None:
            value = self.number_in(text, 0.0, 1.2 * _RANGES_V[channel][-1])
            self.range_v[channel] = next(r for r in _RANGES_V[channel] if r * 1.2 >= value)
            self.autorange[channel] = False
            self._changed()
        return self.setting(args, query, lambda: f"{self.range_v[channel]:.4f}", put)

    def _autorange(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        channel = self._which(groups)

        def put(text: str) -> None:
            self.autorange[channel] = parse_bool(text)
            self._changed()
        return self.setting(args, query, lambda: "1" if self.autorange[channel] else "0", put)

    # ---- readings

    def conversion_s(self) -> float:
        spec = self.spec
        return self.nplc / spec["line_freq_hz"] * spec["autozero_factor"] + spec["overhead_s"]

    def _conversions(self, n: int) -> np.ndarray:
        """``n`` raw conversions on the present channel (the clock advances by their time)."""
        self.clock.advance(n * self.conversion_s(), f"{self.name}: integration")
        t = self.clock.now_s()
        ch = self.channel
        signal = (self.world.dc_voltage_v(self.name, ch) + self.static_offset_v[ch - 1]
                  + self.offset_drift.value(t)[ch - 1])
        sigma = self.spec["noise_v"] * math.sqrt(self.spec["noise_ref_nplc"] / self.nplc)
        return signal + self.noise.normal(0.0, sigma, n)

    def _read(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        if not query:
            raise ScpiError(-113, "Undefined header")
        if not self.filter_on:
            value = float(self._conversions(1)[0])
        elif self.filter_type == "REP":
            value = float(np.mean(self._conversions(self.filter_count)))
        else:
            n = self.filter_count if not self._stack else 1
            self._stack.extend(self._conversions(n))
            while len(self._stack) > self.filter_count:
                self._stack.popleft()
            value = float(np.mean(self._stack))
        if not self.autorange[self.channel] and abs(value) > 1.2 * self.range_v[self.channel]:
            value = OVERFLOW
        self.last = value
        return f"{value:+.9E}"

    def _fetch(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        if self.last is None:
            raise ScpiError(-230, "Data corrupt or stale")
        return f"{self.last:+.9E}"

    def truth(self) -> dict[str, Any]:
        t = self.clock.now_s()
        return {"static_offset_v": self.static_offset_v.tolist(),
                "offset_drift_v": self.offset_drift.value(t).tolist(),
                "noise_v_at_present_nplc": self.spec["noise_v"]
                * math.sqrt(self.spec["noise_ref_nplc"] / self.nplc)}


class FsvModel(ScpiModel):
    MODEL = "rs_fsv"
    IDN = "Rohde&Schwarz,FSV-7,1307.9002K07/{serial},3.40"

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        super().__init__(world, name, spec)
        self.level_error_db = float(self.rng("unit").normal(0, spec["level_error_sigma_db"]))
        self.noise = self.rng("noise")
        self.reset()
        lo, hi = spec["freq_range_hz"]
        self.route("[SENSe]:FREQuency:CENTer", lambda a, q, g: self.setting(
            a, q, lambda: f"{self.center_hz:.3f}",
            lambda t: setattr(self, "center_hz", self.number_in(t, lo, hi))))
        self.route("[SENSe]:FREQuency:SPAN", lambda a, q, g: self.setting(
            a, q, lambda: f"{self.span_hz:.3f}",
            lambda t: setattr(self, "span_hz", self.number_in(t, 0.0, hi))))
        self.route("[SENSe]:BANDwidth[:RESolution]", lambda a, q, g: self.setting(
            a, q, lambda: f"{self.rbw_hz:.3f}",
            lambda t: setattr(self, "rbw_hz", self.number_in(t, 1.0, 10e6))))
        self.route("DISPlay[:WINDow]:TRACe:Y[:SCALe]:RLEVel", lambda a, q, g: self.setting(
            a, q, lambda: f"{self.ref_level_dbm:.2f}",
            lambda t: setattr(self, "ref_level_dbm", self.number_in(t, -130.0, 30.0))))
        self.route("INPut:ATTenuation", self._attenuation)
        self.route("INITiate:CONTinuous", lambda a, q, g: self.setting(
            a, q, lambda: "1" if self.continuous else "0",
            lambda t: setattr(self, "continuous", parse_bool(t))))
        self.route("INITiate[:IMMediate]", self._sweep)
        self.route("[SENSe]:SWEep:TIME", lambda a, q, g: f"{self.sweep_time_s():.6f}"
                   if q else self._no_set())
        self.route("CALCulate#:MARKer#:MAXimum[:PEAK]", self._marker_max)
        self.route("CALCulate#:MARKer#:X", lambda a, q, g: self._marker(q, 0))
        self.route("CALCulate#:MARKer#:Y", lambda a, q, g: self._marker(q, 1))

    def reset(self) -> None:
        lo, hi = self.spec["freq_range_hz"]
        self.center_hz = hi / 2
        self.span_hz = hi - lo
        self.rbw_hz = 3e6
        self.ref_level_dbm = 0.0
        self.attenuation_db = 10.0
        self.continuous = True
        self.trace: tuple[np.ndarray, np.ndarray] | None = None
        self.marker: tuple[float, float] | None = None

    def _attenuation(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            value = self.number_in(text, 0.0, 70.0)
            if value % 5:
                raise ScpiError(-222, "Data out of range")
            self.attenuation_db = value
        return self.setting(args, query, lambda: f"{self.attenuation_db:.1f}", put)

    def sweep_time_s(self) -> float:
        if self.span_hz == 0:
            return 1e-3
        return max(2.5 * self.span_hz / self.rbw_hz ** 2, 1e-3)

    def _sweep(self, args: str, query: bool, groups: tuple[str, ...]) -> None:
        self.busy_for(self.sweep_time_s())  # *OPC? waits for the end of the sweep
        n = int(self.spec["points"])
        start = self.center_hz - self.span_hz / 2
        freqs = np.linspace(start, start + self.span_hz, n)
        floor_dbm = (self.spec["danl_dbm_hz"] + 10 * math.log10(self.rbw_hz)
                     + self.attenuation_db - 10.0)
        # noise floor: Rayleigh-distributed envelope around the mean noise power
        levels_w = 1e-3 * 10 ** (floor_dbm / 10) * self.noise.exponential(1.0, n)
        tone_f, tone_p = self.world.tones_at(self.name)
        for f, p in zip(tone_f, tone_p, strict=True):
            if self.span_hz == 0:
                k = 0
                off_db = 3.01 * (2 * (f - self.center_hz) / self.rbw_hz) ** 2
            else:
                k = int(round((f - start) / self.span_hz * (n - 1)))
                if not -2 <= k <= n + 1:
                    continue
                k = min(max(k, 0), n - 1)
                off_db = 0.0  # the auto-peak detector shows each bin's maximum
            level_db = (float(w_to_dbm(p)) + self.level_error_db - off_db
                        + self.noise.normal(0, self.spec["level_noise_db"]))
            levels_w[k] += 1e-3 * 10 ** (level_db / 10)
        self.trace = (freqs, w_to_dbm(levels_w))

    def _marker_max(self, args: str, query: bool, groups: tuple[str, ...]) -> None:
        if query:
            raise ScpiError(-113, "Undefined header")
        if self.trace is None:
            raise ScpiError(-230, "Data corrupt or stale")
        k = int(np.argmax(self.trace[1]))
        self.marker = (float(self.trace[0][k]), float(self.trace[1][k]))

    def _marker(self, query: bool, which: int) -> str:
        if not query:
            raise ScpiError(-113, "Undefined header")
        if self.marker is None:
            raise ScpiError(-230, "Data corrupt or stale")
        return f"{self.marker[which]:.3f}" if which == 0 else f"{self.marker[which]:.2f}"

    def truth(self) -> dict[str, Any]:
        return {"level_error_db": self.level_error_db}
