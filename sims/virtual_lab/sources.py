"""RF sources: the precise single-channel generators and the multi-channel VCO source.

``Smb100aModel`` / ``N5183bModel`` answer the SOURce/OUTPut commands the drivers send (see
``drivers.rf_source``), with the instrument-side level ceiling (SMB100A
``SOUR:POW:LIM:AMPL``; N5183B ``SOUR:POW:USER:MAX`` + ``:ENAB``): a level above it is refused
with -221 "Settings conflict". A level or frequency query takes ``MIN``/``MAX`` (SCPI-99 7.2.1.1)
and answers the unit's own range; the N5183B answers ``*OPT?`` with its frequency option (513,
520, 532 or 540 from ``freq_range_hz``). Each unit has a small level error (drawn, flat in frequency plus
a slope) and a tiny level noise. Settling: a frequency, level or output change completes a few
ms later, which ``*OPC?`` waits for in lab time.

``VcoSource`` is the custom source of thesis 4.5, built from parts the drivers see only
through two HMP4040 supplies: per channel a VCO (tuning voltage -> frequency, concave curve
over 0-20 V; CRBV55BE 1.53-2.9 GHz, a CRBV55CW for 3.25 GHz) and an amplifier whose supply
sets the power: nothing below the ~1.7 V threshold, then a jump to a few mW (1-5 mW before
the channel's attenuator), linear up to ~5 V and flat above (thesis 4.5.2). Fixed attenuators
(13/10/6/0 dB) set the channel maxima (10/13.3/20/40 mW at 1.75/2.25/2.75/3.25 GHz, the
ERRATA's reading of eq. 4.2), then a combiner (-10 dB) and a final amplifier that compresses on
the *total* power: ``compression_mw`` is its output 1 dB compression point, as a datasheet
gives it (100 mW, thesis 4.5.1), with a Rapp knee of smoothness 6 (a GaAs gain block), so the
83.3 mW of all four channels at their maxima lose ~0.2 dB: "below the compression point",
where tones still add (thesis 4.5.1). Each control voltage reaches the parts through a
first-order lag (the source's stabilisation, thesis 4.7): ``settle_tau_s`` for the tuning
ports, half of it for the amplifier supplies; the thesis gives no time constant, only that
Algorithm 3 takes about an hour per image because of these waits, which the thesis bench's
60 ms reproduces (``worlds/thesis_bench.yaml``, ``tests/test_lab_timing.py``). The output
carries the measured noise (Fig. 4.7, thesis 4.6.2: below 0.5 % in power and 0.005 % in
frequency, and "tends to scale down with the absolute value of delivered power"): a relative
floor ``power_noise_frac`` / ``freq_noise_frac`` at high power, rising as
``sqrt(1 + (noise_knee_frac P_max / P)^2)`` at low channel power ``P`` (an absolute noise,
supply ripple through the amplifier's mW/V slope and the channel's attenuator, that dominates
when the channel is weak; ``P_max`` is the channel's maximum).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from sims.spindiode import dbm_to_w
from sims.virtual_lab.scpi import ScpiError, ScpiModel, parse_bool

if TYPE_CHECKING:
    from sims.virtual_lab.world import World

EMPTY = (np.zeros(0), np.zeros(0))


class RfSourceModel(ScpiModel):
    """CW generator: frequency, level, output, level ceiling."""

    LEVEL_LIMIT_DEFAULT = 30.0

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        super().__init__(world, name, spec)
        rng = self.rng("unit")
        self.level_error_db = float(rng.normal(0, spec["level_error_sigma_db"]))
        self.level_slope_db_per_ghz = float(rng.normal(0, spec["level_error_sigma_db"] / 4))
        self.noise = self.rng("noise")
        self.reset()
        self.route("[SOURce]:FREQuency[:CW]", self._freq)
        self.route("[SOURce]:POWer[:LEVel][:IMMediate][:AMPLitude]", self._power)
        self.route("OUTPut[:STATe]", self._output)

    def reset(self) -> None:
        self.freq_hz = 1.0e9
        self.power_dbm = -30.0
        self.output = False

    def ceiling_dbm(self) -> float:
        raise NotImplementedError

    @staticmethod
    def _min_max(args: str, lo: float, hi: float, fmt: str) -> str | None:
        """The answer to ``<query>? MIN|MAX``, None for a plain query."""
        word = args.strip().upper()
        if not word:
            return None
        if word in ("MIN", "MINIMUM"):
            return fmt.format(lo)
        if word in ("MAX", "MAXIMUM"):
            return fmt.format(hi)
        raise ScpiError(-224, "Illegal parameter value")

    def _freq(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        lo, hi = self.spec["freq_range_hz"]
        if query and args:
            return self._min_max(args, lo, hi, "{:.3f}")

        def put(text: str) -> None:
            self.freq_hz = self.number_in(text, lo, hi)
            self.busy_for(self.spec["settle_freq_s"])
        return self.setting(args, query, lambda: f"{self.freq_hz:.3f}", put)

    def _power(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        lo, hi = self.spec["power_range_dbm"]
        if query and args:
            return self._min_max(args, lo, hi, "{:.2f}")

        def put(text: str) -> None:
            value = self.number_in(text, lo, hi)
            if value > self.ceiling_dbm() + 1e-9:
                raise ScpiError(-221, "Settings conflict;level above the limit")
            self.power_dbm = value
            self.busy_for(self.spec["settle_level_s"])
        return self.setting(args, query, lambda: f"{self.power_dbm:.2f}", put)

    def _output(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            self.output = parse_bool(text)
            self.busy_for(self.spec["settle_output_s"])
        return self.setting(args, query, lambda: "1" if self.output else "0", put)

    def tones(self) -> tuple[np.ndarray, np.ndarray]:
        """(frequencies, powers in W) at the output connector now."""
        if not self.output:
            return EMPTY
        err = (self.level_error_db + self.level_slope_db_per_ghz * self.freq_hz / 1e9
               + self.noise.normal(0, self.spec["level_noise_db"]))
        return np.array([self.freq_hz]), dbm_to_w(np.array([self.power_dbm + err]))

    def truth(self) -> dict[str, Any]:
        return {"level_error_db": self.level_error_db,
                "level_slope_db_per_ghz": self.level_slope_db_per_ghz}


class Smb100aModel(RfSourceModel):
    MODEL = "rs_smb100a"
    IDN = "Rohde&Schwarz,SMB100A,1406.6000k03/{serial},3.1.19.15-3.20.390.24"

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        self.limit_dbm = self.LEVEL_LIMIT_DEFAULT
        super().__init__(world, name, spec)
        self.route("[SOURce]:POWer:LIMit[:AMPLitude]", self._limit)

    def ceiling_dbm(self) -> float:
        return self.limit_dbm

    def _limit(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            self.limit_dbm = self.number_in(text, -145.0, 30.0)
            self.power_dbm = min(self.power_dbm, self.limit_dbm)
        return self.setting(args, query, lambda: f"{self.limit_dbm:.2f}", put)


class N5183bModel(RfSourceModel):
    MODEL = "keysight_n5183b"
    IDN = "Keysight Technologies,N5183B,{serial},B.01.86"
    NO_ERROR = '+0,"No error"'

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        self.user_max_dbm = self.LEVEL_LIMIT_DEFAULT
        self.user_max_enabled = False
        super().__init__(world, name, spec)
        self.route("[SOURce]:POWer:USER:MAX", self._user_max)
        self.route("[SOURce]:POWer:USER:ENABle", self._user_enable)
        self.route("*OPT", lambda a, q, g: self._options() if q else self._no_set())

    def _options(self) -> str:
        top_hz = self.spec["freq_range_hz"][1]
        option = next((opt for opt, hz in (("513", 13e9), ("520", 20e9), ("532", 31.8e9),
                                           ("540", 40e9)) if top_hz <= hz), "540")
        return f"1E1,1EA,{option},UNT"

    def ceiling_dbm(self) -> float:
        return self.user_max_dbm if self.user_max_enabled else self.spec["power_range_dbm"][1]

    def _user_max(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            # the user maximum is a level, so within the unit's own level range
            self.user_max_dbm = self.number_in(text, *self.spec["power_range_dbm"])
        return self.setting(args, query, lambda: f"{self.user_max_dbm:.2f}", put)

    def _user_enable(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            self.user_max_enabled = parse_bool(text)
            if self.user_max_enabled:
                self.power_dbm = min(self.power_dbm, self.user_max_dbm)
        return self.setting(args, query, lambda: "1" if self.user_max_enabled else "0", put)


# --------------------------------------------------------------------------- thesis 4.5


class Lag:
    """First-order lag of a control voltage: ``y -> target`` with time constant ``tau_s``."""

    def __init__(self, tau_s: float, value: float = 0.0) -> None:
        self.tau_s = tau_s
        self._t0 = 0.0
        self._y0 = value
        self.target = value

    def value(self, t_s: float) -> float:
        if self.tau_s <= 0:
            return self.target
        return self.target + (self._y0 - self.target) * math.exp(-(t_s - self._t0) / self.tau_s)

    def set(self, t_s: float, target: float) -> None:
        if target != self.target:
            self._y0 = self.value(t_s)
            self._t0 = t_s
            self.target = target


def smooth_min(x: np.ndarray | float, cap: float, eps: float = 1e-4) -> np.ndarray:
    """``min(x, cap)`` with a rounded knee (the amplifier's saturation above ~5 V)."""
    return (x + cap - np.sqrt((x - cap) ** 2 + eps)) / 2.0


class VcoSource:
    """The four-channel VCO/amplifier source of thesis 4.5 (not on the bus: driven by supplies)."""

    def __init__(self, world: World, spec: dict[str, Any]) -> None:
        self.world = world
        self.spec = spec
        self.name = spec["name"]
        rng = world.rng(f"vco:{self.name}:unit")
        self.noise = world.rng(f"vco:{self.name}:noise")
        sigma = spec["unit_sigma_frac"]
        self.units = []
        for ch in spec["channels"]:
            lo, hi = ch["freq_range_hz"]
            self.units.append({
                "part": ch["part"], "f_lo_hz": lo * (1 + rng.normal(0, sigma / 5)),
                "f_hi_hz": hi * (1 + rng.normal(0, sigma / 5)),
                "curvature_v": ch["tuning_curvature_v"], "attenuator_db": ch["attenuator_db"],
                "p_max_mw": ch["p_max_mw"] * (1 + rng.normal(0, sigma)),
                "jump_mw": spec["jump_mw"] * (1 + rng.normal(0, 5 * sigma)),
                "threshold_v": spec["threshold_v"] + float(rng.normal(0, 0.02)),
            })
        n = len(self.units)
        self.tuning = [Lag(spec["settle_tau_s"]) for _ in range(n)]
        self.amplifier = [Lag(spec["settle_tau_s"] / 2) for _ in range(n)]
        # final amplifier (Rapp): P_out = G P_in / (1 + (G P_in / P_sat)^s)^(1/s); the output is
        # 1 dB under the linear G P_in = P_1dB 10^0.1 when it reads P_1dB (``compression_mw``)
        s = self.smoothness = float(spec["compression_smoothness"])
        linear_1db_w = spec["compression_mw"] * 1e-3 * 10 ** 0.1
        self.p_sat_w = linear_1db_w / (10 ** (0.1 * s) - 1) ** (1 / s)

    def attach(self) -> None:
        """Subscribe to the supplies that feed the tuning ports and the amplifiers."""
        for part, lags, load in (("tuning", self.tuning, self.spec["tuning_load_ohm"]),
                                 ("amplifier", self.amplifier, self.spec["amplifier_load_ohm"])):
            wiring = self.spec[part]
            supply = self.world.instruments[wiring["supply"]]
            for lag, channel in zip(lags, wiring["channels"], strict=True):
                supply.connect_load(int(channel), load,
                                    lambda t, v, lag=lag: lag.set(t, v))

    def channel_freq_hz(self, i: int, tuning_v: float) -> float:
        u = self.units[i]
        v = min(max(tuning_v, 0.0), self.spec["tuning_max_v"])
        c = u["curvature_v"]
        shape = (1 - math.exp(-v / c)) / (1 - math.exp(-self.spec["tuning_max_v"] / c))
        return u["f_lo_hz"] + (u["f_hi_hz"] - u["f_lo_hz"]) * shape

    def channel_power_w(self, i: int, supply_v: float) -> float:
        """Channel output after its attenuator, before the combiner (W)."""
        u = self.units[i]
        if supply_v < u["threshold_v"]:
            return 0.0
        att = 10 ** (-u["attenuator_db"] / 10)
        p_raw_max = u["p_max_mw"] / att
        x = (supply_v - u["threshold_v"]) / (self.spec["saturation_v"] - u["threshold_v"])
        s = max(float(smooth_min(x, 1.0)), 0.0)
        p_raw = u["jump_mw"] + (p_raw_max - u["jump_mw"]) * s
        return 1e-3 * p_raw * att

    def tones(self) -> tuple[np.ndarray, np.ndarray]:
        t = self.world.clock.now_s()
        freqs, powers, maxima = [], [], []
        for i in range(len(self.units)):
            p = self.channel_power_w(i, self.amplifier[i].value(t))
            if p > 0:
                freqs.append(self.channel_freq_hz(i, self.tuning[i].value(t)))
                powers.append(p)
                maxima.append(1e-3 * self.units[i]["p_max_mw"])
        if not freqs:
            return EMPTY
        p_ch = np.array(powers)
        scale = self.noise_scale(p_ch, np.array(maxima))
        f = np.array(freqs) * (1 + scale * self.noise.normal(0, self.spec["freq_noise_frac"],
                                                              len(freqs)))
        p_in = (p_ch * 10 ** (-self.spec["combiner_loss_db"] / 10)
                * (1 + scale * self.noise.normal(0, self.spec["power_noise_frac"], len(freqs))))
        gain = 10 ** (self.spec["final_amplifier_gain_db"] / 10)
        return f, gain * p_in * self.compression(gain * float(np.sum(p_in)))

    def noise_scale(self, channel_power_w: np.ndarray, channel_max_w: np.ndarray) -> np.ndarray:
        """How much the relative noise of a channel grows over its floor at low power
        (thesis 4.6.2: the noise "tends to scale down with the absolute value of delivered
        power"; module doc)."""
        p = np.maximum(np.asarray(channel_power_w, float), 1e-15)
        return np.sqrt(1.0 + (self.spec["noise_knee_frac"] * channel_max_w / p) ** 2)

    def compression(self, linear_total_w: float) -> float:
        """Gain ratio of the final amplifier for a total linear output ``linear_total_w``."""
        s = self.smoothness
        return float((1.0 + (linear_total_w / self.p_sat_w) ** s) ** (-1 / s))

    def truth(self) -> dict[str, Any]:
        t = self.world.clock.now_s()
        return {"units": self.units, "final_amplifier_p_sat_w": self.p_sat_w,
                "tuning_v_effective": [lag.value(t) for lag in self.tuning],
                "amplifier_v_effective": [lag.value(t) for lag in self.amplifier]}
