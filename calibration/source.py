"""Multi-channel VCO source calibration through the spectrum analyser (thesis 4.5.2).

Per channel: output frequency vs tuning voltage (Fig. 4.5a) and output power vs amplifier
voltage at the channel's operating frequency (Fig. 4.5b), both measured on the analyser behind
the output switch; the switch-path attenuation A(f) (Fig. 4.5c) measured with the precise
generator at a known level. The inverse maps give the (tuning, amplifier) voltages for a
requested (frequency, power).

Power reference: "before the switches", as the reference diodes were calibrated with the
generator's own level (thesis 4.5.2). In dB that is an addition (ERRATA, the printed formula
multiplies a dBm value): ``P_before_dbm = P_analyser_dbm + A_db(f)``.

Channels are calibrated one at a time (the others below the amplifier threshold, no output);
with several channels on, the shared final amplifier compresses near 100 mW in total (thesis
4.5.1), which this single-channel calibration does not correct.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.interpolate import PchipInterpolator


@dataclass
class SourceWiring:
    """Where the VCO source and the analyser sit (roles of the lab config and switch ports)."""

    tuning_role: str = "vco_supply"
    amplifier_role: str = "vco_amp"          # a role or an instrument name of the lab
    vco_source_port: int = 1                 # source selector: the VCO source
    generator_source_port: int = 2           # source selector: the precise generator
    analyzer_port: int = 4                   # output switch: the spectrum analyser
    settle_s: float = 20.0                   # VCO stabilisation (thesis 4.7): generous, the virtual
    #                                          bench's lag is ~60 ms; calibration runs once
    n_avg: int = 16                          # analyser readings averaged per point


@dataclass
class ChannelCalibration:
    channel: int
    tuning_v: list[float]
    freq_hz: list[float]
    operating_freq_hz: float
    amplifier_v: list[float]
    power_dbm: list[float]                   # before the switches, at the operating frequency
    fit_lo_v: float                          # range where P(mW) is fitted in V
    fit_hi_v: float
    poly_mw: list[float]                     # P(mW) = polyval(poly_mw, V), highest power first


def _drv(lab: Any, name: str) -> Any:
    """A driver by role, or by instrument name (the amplifier supply has no role of its own)."""
    instruments = getattr(lab, "instruments", {})
    return instruments[name] if name in instruments else lab[name]


def measure_tone(analyzer: Any, n_avg: int, center_hz: float = 2.5e9, span_hz: float = 3.0e9
                 ) -> tuple[float, float]:
    """(freq_hz, power_dbm) of the strongest tone: a wide sweep, then ``n_avg`` narrow ones
    (their mean frequency and mean power in mW, returned in dBm)."""
    f0, _ = analyzer.measure_peak(center_hz, span_hz, rbw_hz=3e6)
    fs, ps = [], []
    for _ in range(n_avg):
        f, p = analyzer.measure_peak(f0, 40e6, rbw_hz=300e3)
        fs.append(f)
        ps.append(10 ** (p / 10))
    return float(np.mean(fs)), float(10 * math.log10(np.mean(ps)))


def measure_switch_attenuation(lab: Any, freqs_hz: Sequence[float], wiring: SourceWiring, *,
                               power_dbm: float = 0.0) -> dict[str, list[float]]:
    """A(f) in dB: the generator's set level minus the analyser's reading (thesis Fig. 4.5c)."""
    rf, sa = lab["rf_source"], lab["spectrum_analyzer"]
    out: dict[str, list[float]] = {"freq_hz": [], "attenuation_db": []}
    try:
        lab["source_switch"].port = wiring.generator_source_port
        lab["switch"].port = wiring.analyzer_port
        rf.apply(float(freqs_hz[0]), power_dbm)
        rf.output_on()
        for f in freqs_hz:
            rf.freq_hz = float(f)
            _, p = measure_tone(sa, wiring.n_avg, float(f), 20e6)
            out["freq_hz"].append(float(f))
            out["attenuation_db"].append(power_dbm - p)
    finally:
        rf.output_off()
    return out


class SourceCalibration:
    """The calibrated maps of every channel and the inverse (frequency, power) -> voltages."""

    def __init__(self, channels: dict[int, ChannelCalibration], attenuation: dict[str, list[float]]
                 ) -> None:
        self.channels = channels
        self.attenuation = attenuation

    def attenuation_db(self, freq_hz: float) -> float:
        return float(np.interp(freq_hz, self.attenuation["freq_hz"], self.attenuation["attenuation_db"]))

    def tuning_for(self, channel: int, freq_hz: float) -> float:
        c = self.channels[channel]
        f, v = np.array(c.freq_hz), np.array(c.tuning_v)
        if not f[0] <= freq_hz <= f[-1]:
            raise ValueError(f"channel {channel} covers {f[0] / 1e9:.4f}-{f[-1] / 1e9:.4f} GHz, "
                             f"not {freq_hz / 1e9:.4f} GHz")
        return float(PchipInterpolator(f, v)(freq_hz))

    def amplifier_for(self, channel: int, freq_hz: float, power_dbm: float) -> float:
        """Amplifier voltage for ``power_dbm`` before the switches at ``freq_hz``: the inverse of
        the smooth P(mW)-vs-V fit (thesis Fig. 4.5b: linear from 1.7 to 5 V, plus the final
        amplifier's slight compression), moved from the operating frequency by A(f)."""
        c = self.channels[channel]
        at_op_dbm = power_dbm - self.attenuation_db(freq_hz) + self.attenuation_db(c.operating_freq_hz)
        p_mw = 10 ** (at_op_dbm / 10)
        v_grid = np.linspace(c.fit_lo_v, c.fit_hi_v, 2001)
        p_grid = np.polyval(c.poly_mw, v_grid)
        if np.any(np.diff(p_grid) <= 0):
            raise RuntimeError(f"channel {channel}: the power fit is not monotonic")
        if not p_grid[0] <= p_mw <= p_grid[-1]:
            raise ValueError(f"channel {channel} sets {p_grid[0]:.2f}-{p_grid[-1]:.2f} mW (at "
                             f"{c.operating_freq_hz / 1e9:.3f} GHz), not {p_mw:.3f} mW")
        return float(np.interp(p_mw, p_grid, v_grid))

    def settings(self, channel: int, freq_hz: float, power_dbm: float) -> tuple[float, float]:
        """(tuning_v, amplifier_v) for a requested (frequency, power before the switches)."""
        return self.tuning_for(channel, freq_hz), self.amplifier_for(channel, freq_hz, power_dbm)

    def to_json(self) -> dict[str, Any]:
        return {"units": {"freq_hz": "Hz", "power_dbm": "dBm before the switches",
                          "tuning_v": "V", "amplifier_v": "V", "attenuation_db": "dB"},
                "channels": {str(k): asdict(c) for k, c in self.channels.items()},
                "switch_attenuation": self.attenuation}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SourceCalibration:
        data = json.loads(Path(path).read_text())
        return cls({int(k): ChannelCalibration(**c) for k, c in data["channels"].items()},
                   data["switch_attenuation"])


def _vco_off(amp: Any, channels: Sequence[int]) -> None:
    """Amplifier supplies to 0 V: below the threshold, no RF from the VCO source."""
    for ch in channels:
        amp.channel(ch).set_voltage_v(0.0)


def calibrate_source(lab: Any, operating_freq_hz: dict[int, float], wiring: SourceWiring | None = None,
                     *, tuning_v: Sequence[float] | None = None,
                     amplifier_v: Sequence[float] | None = None,
                     attenuation_freqs_hz: Sequence[float] | None = None,
                     progress: Callable[[str], None] | None = None) -> SourceCalibration:
    """Calibrate the channels in ``operating_freq_hz`` (channel -> functioning frequency).

    Amplifier supplies go to 0 V (no RF) on every exit path; the generator is switched off.
    """
    w = wiring or SourceWiring()
    tuning = list(tuning_v if tuning_v is not None else np.arange(0.0, 20.001, 0.5))
    amps = list(amplifier_v if amplifier_v is not None else np.arange(0.0, 6.001, 0.1))
    att_f = list(attenuation_freqs_hz if attenuation_freqs_hz is not None
                 else np.arange(1.0e9, 4.0001e9, 0.1e9))
    tune, amp, sa = _drv(lab, w.tuning_role), _drv(lab, w.amplifier_role), lab["spectrum_analyzer"]
    channels = sorted(operating_freq_hz)
    say = progress or (lambda text: None)
    say("switch attenuation")
    attenuation = measure_switch_attenuation(lab, att_f, w)
    cal = SourceCalibration({}, attenuation)
    try:
        lab["source_switch"].port = w.vco_source_port
        lab["switch"].port = w.analyzer_port
        for ch in channels:
            amp.channel(ch).set_voltage_v(0.0)
            amp.channel(ch).set_output(True)
            tune.channel(ch).set_output(True)
        for ch in channels:
            say(f"channel {ch}: frequency vs tuning voltage")
            amp.channel(ch).set_voltage_v(4.0)
            freqs = []
            for v in tuning:
                tune.channel(ch).set_voltage_v(float(v))
                lab.sleep(w.settle_s)
                freqs.append(measure_tone(sa, 1)[0])
            f_arr, v_arr = np.array(freqs), np.array(tuning, float)
            if np.any(np.diff(f_arr) <= 0):
                raise RuntimeError(f"channel {ch}: frequency is not monotonic in tuning voltage")
            tmp = ChannelCalibration(ch, v_arr.tolist(), f_arr.tolist(), operating_freq_hz[ch],
                                     [], [], 0.0, 0.0, [])
            cal.channels[ch] = tmp
            tune.channel(ch).set_voltage_v(cal.tuning_for(ch, operating_freq_hz[ch]))
            say(f"channel {ch}: power vs amplifier voltage")
            powers = []
            for v in amps:
                amp.channel(ch).set_voltage_v(float(v))
                lab.sleep(w.settle_s)
                f, p = measure_tone(sa, w.n_avg, operating_freq_hz[ch], 40e6)
                powers.append(p + cal.attenuation_db(f))
            amp.channel(ch).set_voltage_v(0.0)
            a_arr, p_arr = np.array(amps, float), np.array(powers)
            p_mw = 10 ** (p_arr / 10)
            # the fitted range (thesis: linear from 1.7 to 5 V): above the threshold jump,
            # below the saturation knee
            on = p_mw > 10 * p_mw.min()
            steps = np.diff(p_mw)
            grows = on[1:] & (steps > 0.5 * np.median(steps[on[1:]])) if on.sum() > 3 else on[1:]
            if grows.sum() < 6:
                raise RuntimeError(f"channel {ch}: no range where the power grows with voltage")
            lo_v = float(a_arr[1:][grows].min())
            hi_v = float(a_arr[1:][grows].max()) - 0.3
            fit = (a_arr >= lo_v) & (a_arr <= hi_v)
            poly = np.polyfit(a_arr[fit], p_mw[fit], 3)
            cal.channels[ch] = ChannelCalibration(
                ch, v_arr.tolist(), f_arr.tolist(), operating_freq_hz[ch], a_arr.tolist(),
                p_arr.tolist(), lo_v, hi_v, [float(x) for x in poly])
    finally:
        _vco_off(amp, channels)
    return cal


def set_tone(lab: Any, cal: SourceCalibration, channel: int, freq_hz: float, power_dbm: float,
             wiring: SourceWiring | None = None) -> tuple[float, float]:
    """Set one channel to (freq_hz, power_dbm before the switches); returns the voltages."""
    w = wiring or SourceWiring()
    tuning_v, amp_v = cal.settings(channel, freq_hz, power_dbm)
    _drv(lab, w.tuning_role).channel(channel).set_voltage_v(tuning_v)
    _drv(lab, w.amplifier_role).channel(channel).set_voltage_v(amp_v)
    return tuning_v, amp_v


class SettledTooFast(RuntimeError):
    """The step settled before enough readings: sample faster (``interval_s``)."""


def measure_settling(lab: Any, cal: SourceCalibration, channel: int, *, v_from: float | None = None,
                     v_to: float | None = None, duration_s: float = 6.0, interval_s: float = 0.1,
                     wiring: SourceWiring | None = None) -> dict[str, Any]:
    """The stabilisation time constant of one channel's power (thesis 4.7: the custom source
    must settle after every change), measured as a step response on the analyser.

    The amplifier steps from ``v_from`` to ``v_to`` (by default inside the fitted range); the
    tone's power is read every ``interval_s`` of lab time, mapped back to the amplifier
    voltage it corresponds to through the calibration's P(V) fit, and the remaining gap to
    ``v_to`` is fitted as exp(-t / tau) while it exceeds 3 % of the step. The amplifier returns
    to 0 V (no RF) on every exit path. Returns tau_s, its fit residual and the samples.
    """
    w = wiring or SourceWiring()
    c = cal.channels[channel]
    v_from = c.fit_lo_v + 0.3 if v_from is None else v_from
    v_to = c.fit_hi_v - 0.2 if v_to is None else v_to
    tune, amp, sa = _drv(lab, w.tuning_role), _drv(lab, w.amplifier_role), lab["spectrum_analyzer"]
    samples: list[tuple[float, float]] = []
    try:
        lab["source_switch"].port = w.vco_source_port
        lab["switch"].port = w.analyzer_port
        tune.channel(channel).set_voltage_v(cal.tuning_for(channel, c.operating_freq_hz))
        tune.channel(channel).set_output(True)
        amp.channel(channel).set_output(True)
        amp.channel(channel).set_voltage_v(v_from)
        lab.sleep(w.settle_s)
        amp.channel(channel).set_voltage_v(v_to)
        t0 = lab.clock.now_s()
        while lab.clock.now_s() - t0 < duration_s:
            ta = lab.clock.now_s()
            f, p_dbm = sa.measure_peak(c.operating_freq_hz, 4e6, rbw_hz=300e3)
            samples.append((0.5 * (ta + lab.clock.now_s()) - t0, p_dbm + cal.attenuation_db(f)))
            lab.sleep(interval_s)
    finally:
        _vco_off(amp, [channel])
    t = np.array([s[0] for s in samples])
    p_mw = 10 ** (np.array([s[1] for s in samples]) / 10)
    v_grid = np.linspace(c.fit_lo_v, c.fit_hi_v, 2001)
    v_est = np.interp(p_mw, np.polyval(c.poly_mw, v_grid), v_grid)
    gap = (v_to - v_est) / (v_to - v_from)
    use = gap > 0.03
    if use.sum() < 4:
        raise SettledTooFast(f"channel {channel}: the step settled before 4 readings; lower interval_s")
    slope, intercept = np.polyfit(t[use], np.log(gap[use]), 1)
    if slope >= 0:
        raise RuntimeError(f"channel {channel}: the power does not settle towards the new setting")
    resid = float(np.std(np.log(gap[use]) - (slope * t[use] + intercept)))
    return {"channel": channel, "tau_s": float(-1 / slope), "log_residual": resid,
            "v_from": v_from, "v_to": v_to, "t_s": t.tolist(), "power_dbm": [s[1] for s in samples]}
