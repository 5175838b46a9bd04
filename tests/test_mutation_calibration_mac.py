"""Fast checks of calibration/mac.py (Algorithm 3 and the measurement plan) on a fake bench with
known truth (written to kill mutmut's survivors, scripts/mutation.sh).

The fake bench: a four-channel source whose power follows a known quadratic P(V) above a 1.5 V
threshold (no lag: what is commanded is emitted), a source selector (port 1: the source), an
output switch, a stage and a voltmeter that reads, on the chain the switch feeds, V_max w.x
(x: the emitted powers over the ToneMap's full scale) plus a per-channel offset. Every
command, move and reading is logged, and each takes a known lab time.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from calibration.mac import (
    Algorithm3Plan,
    Convolver,
    Ledger,
    PlacedChain,
    PlannedPlan,
    SourceGate,
    ToneMap,
    ToneSource,
    fit_v_max,
    measure_source_settling,
    on_threshold_v,
)
from calibration.source import ChannelCalibration, SettledTooFast, SourceCalibration, SourceWiring

FREQS = (1.75e9, 2.25e9, 2.75e9, 3.25e9)
#: P(mW) = polyval(poly, V) over 1.5-5 V: lowest settable powers 1.0, 1.5, 2.0, 0.5 mW
POLYS = {1: [1.0, 5.0, -8.75], 2: [0.5, 6.0, -8.625], 3: [2.0, 2.0, -5.5], 4: [1.5, 4.0, -8.875]}
AMPS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0]
P1 = [40.0, 32.0, 48.0, 40.0]  # full scale (x = 1) per input, mW
THRESHOLD_V = 1.5


def channel_cal(ch: int) -> ChannelCalibration:
    f0 = FREQS[ch - 1]
    p = [1e-4 if v < THRESHOLD_V else float(np.polyval(POLYS[ch], v)) for v in AMPS]
    return ChannelCalibration(ch, [0.0, 5.0 + ch, 20.0], [f0 - 4e8, f0, f0 + 4e8], f0, AMPS,
                              [10 * math.log10(x) for x in p], THRESHOLD_V, 5.0, POLYS[ch])


CAL = SourceCalibration({ch: channel_cal(ch) for ch in POLYS},
                        {"freq_hz": [1e9, 4e9], "attenuation_db": [0.0, 0.0]})
TONES = ToneMap([1, 2, 3, 4], list(FREQS), list(P1))


# --------------------------------------------------------------------------- the fake bench


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now_s(self) -> float:
        return self.t


class Output:
    def __init__(self, supply: Supply, ch: int) -> None:
        self.supply, self.ch = supply, ch

    def set_voltage_v(self, v: float) -> None:
        self.supply.v[self.ch] = v
        self.supply.log.append((self.supply.name, self.ch, "V", v))

    def set_output(self, on: bool) -> None:
        self.supply.on[self.ch] = on
        self.supply.log.append((self.supply.name, self.ch, "out", on))


class Supply:
    def __init__(self, name: str, log: list, broken: tuple[int, ...] = ()) -> None:
        self.name, self.log, self.broken = name, log, broken
        self.v: dict[int, float] = {}
        self.on: dict[int, bool] = {}

    def channel(self, ch: int) -> Output:
        if ch in self.broken:
            raise OSError(f"channel {ch} does not answer")
        return Output(self, ch)


class Switch:
    def __init__(self, name: str, log: list) -> None:
        self.name, self.log, self._port = name, log, 0

    @property
    def port(self) -> int:
        return self._port

    @port.setter
    def port(self, p: int) -> None:
        self._port = p
        self.log.append((self.name, p))


class Stage:
    def __init__(self, lab: Lab) -> None:
        self.lab, self.position_mm = lab, 0.0

    def status(self) -> str:
        return "READY"

    def move_abs_mm(self, z: float) -> None:
        self.lab.clock.t += 1.0  # a move takes 1 s
        self.position_mm = z
        self.lab.log.append(("z", z))


class Truth:
    """A chain as the fake bench has it: port, voltmeter channel, optimum z, kernel, V_max."""

    def __init__(self, port: int, channel: int, z: float, w: tuple[float, ...], v_max: float) -> None:
        self.port, self.channel, self.z, self.w, self.v_max = port, channel, z, np.array(w), v_max


class Voltmeter:
    def __init__(self, lab: Lab) -> None:
        self.lab, self.channel, self.reads = lab, 1, 0

    def read_voltage_v(self) -> float:
        lab = self.lab
        lab.clock.t += 0.25  # a reading takes 0.25 s
        self.reads += 1
        v = 1e-6 * self.channel + lab.drift_v_per_s * lab.clock.t
        if lab["source_switch"].port == 1:
            x = lab.emitted_x()
            for c in lab.chains:
                if c.port == lab["switch"].port and c.channel == self.channel:
                    v += c.v_max * float(c.w @ x) / (1.0 + ((lab["stage.z"].position_mm - c.z) / 0.01) ** 2)
        lab.log.append(("read", self.channel, v))
        return v


class Lab(dict):
    def __init__(self, chains: list[Truth] = (), broken: tuple[int, ...] = ()) -> None:
        self.clock, self.log, self.chains, self.drift_v_per_s = Clock(), [], list(chains), 0.0
        super().__init__({"vco_supply": Supply("tune", self.log),
                          "vco_amp": Supply("amp", self.log, broken),
                          "source_switch": Switch("selector", self.log),
                          "switch": Switch("output", self.log)})
        self["stage.z"] = Stage(self)
        self["voltmeter"] = Voltmeter(self)

    def sleep(self, s: float) -> None:
        self.clock.t += s
        self.log.append(("sleep", s))

    def emitted_x(self) -> np.ndarray:
        amp = self["vco_amp"]
        x = []
        for i, ch in enumerate(TONES.channels):
            v = amp.v.get(ch, 0.0)
            on = amp.on.get(ch, False) and v >= THRESHOLD_V
            x.append(float(np.polyval(POLYS[ch], v)) / P1[i] if on else 0.0)
        return np.array(x)

    def events(self, *kinds: str) -> list:
        return [e for e in self.log if e[0] in kinds]


W0, W1, W2 = (0.5, -0.25, 0.125, 0.25), (-0.2, 0.4, 0.3, -0.1), (0.1, 0.2, -0.3, 0.4)


def bench(z: tuple[float, ...] = (20.0, 20.1, 20.2), ports: tuple[int, ...] = (1, 2, 3),
          channels: tuple[int, ...] = (1, 1, 1), v_max: tuple[float, ...] = (2e-6, 3e-6, 4e-6),
          **kw: Any) -> tuple[Lab, list[PlacedChain]]:
    """A fake bench with chains (weights W0, W1, W2) and their PlacedChain records."""
    ws = (W0, W1, W2)
    truths = [Truth(p, ch, zz, w, vm)
              for p, ch, zz, w, vm in zip(ports, channels, z, ws, v_max, strict=False)]
    placed = [PlacedChain(f"c{k}", t.port, list(t.w), t.z, t.v_max, t.channel) for k, t in enumerate(truths)]
    return Lab(truths, **kw), placed


def source(lab: Lab, **kw: Any) -> ToneSource:
    kw.setdefault("tau_s", 0.05)
    return ToneSource(lab, CAL, TONES, Ledger(lab.clock.now_s), **kw)


def started(lab: Lab, **kw: Any) -> ToneSource:
    src = source(lab, **kw)
    src.start()
    lab.log.clear()
    return src


# --------------------------------------------------------------------------- bookkeeping


def test_ledger_nested_and_absorbing_activities() -> None:
    t = [10.0]
    led = Ledger(lambda: t[0], absorbing=("calib",))
    with led.on("a"):
        t[0] += 1
        with led.on("b"):
            t[0] += 2
            with led.on("c"):
                t[0] += 4
        led.count("x")
    with led.on("re-optimisation"):  # not absorbing here: booked exclusively as usual
        with led.on("d"):
            t[0] += 8
    with led.on("calib"):
        t[0] += 16
        with led.on("a"):
            t[0] += 32
            led.count("x", 5)
    led.count("y", 0)
    assert dict(led.time_s) == {"a": 1.0, "b": 2.0, "c": 4.0, "re-optimisation": 0.0, "d": 8.0, "calib": 48.0}
    assert dict(led.ops) == {"x": 1, "x (calib)": 5, "y": 0}
    assert Ledger(lambda: 0.0).absorbing == ("re-optimisation",)
    snap = led.snapshot()
    assert type(snap["time_s"]) is dict and type(snap["ops"]) is dict  # plain dicts (for JSON)
    led.count("z")
    assert "z" not in snap["ops"]  # a copy


# --------------------------------------------------------------------------- the source


def test_on_threshold_is_the_first_voltage_emitting_ten_times_the_floor() -> None:
    assert on_threshold_v(CAL, 1) == 1.5
    c = channel_cal(2)
    c.power_dbm = [-40.0, -40.0, -31.0, -29.0, -20.0, 0.0, 5.0, 10.0]  # 1e-4 mW floor; 10x: -30 dBm
    assert on_threshold_v(SourceCalibration({2: c}, CAL.attenuation), 2) == 1.5
    c.power_dbm = [-40.0, -29.8, -20.0, -15.0, -10.0, 0.0, 5.0, 10.0]  # just over 10x
    assert on_threshold_v(SourceCalibration({2: c}, CAL.attenuation), 2) == 0.5
    c.power_dbm = [-39.0, -40.0, -29.8, -15.0, -10.0, 0.0, 5.0, 10.0]  # the floor anywhere
    assert on_threshold_v(SourceCalibration({2: c}, CAL.attenuation), 2) == 1.0
    c.power_dbm = [-40.0, -30.0, -20.0, -15.0, -10.0, 0.0, 5.0, 10.0]  # exactly 10x: not yet on
    assert on_threshold_v(SourceCalibration({2: c}, CAL.attenuation), 2) == 1.0
    c.power_dbm = [-40.0, -30.2, -20.0, -15.0, -10.0, 0.0, 5.0, 10.0]  # 9.8 dB: 9.5x, in mW
    assert on_threshold_v(SourceCalibration({2: c}, CAL.attenuation), 2) == 1.0
    c.power_dbm = [-40.0] * 8  # never on: the fitted range's start
    c.fit_lo_v = 1.25
    assert on_threshold_v(SourceCalibration({2: c}, CAL.attenuation), 2) == 1.25


def test_measure_source_settling_samples_faster_until_the_step_is_resolved(monkeypatch) -> None:
    import calibration.mac as mac

    calls: list[tuple[float, float]] = []
    script: list[Any] = []

    def fake(lab: Any, cal: Any, channel: int, *, interval_s: float, duration_s: float, **kw: Any) -> dict:
        calls.append((interval_s, duration_s))
        assert (lab, cal, channel) == ("lab", "cal", 3) and kw == {"v_to": 4.0}
        out = script.pop(0)
        if isinstance(out, Exception):
            raise out
        return {"tau_s": out, "t_s": list(np.arange(6) * interval_s)}

    monkeypatch.setattr(mac, "measure_settling", fake)
    script[:] = [0.31]  # tau >= 3 samples: done
    assert measure_source_settling("lab", "cal", 3, v_to=4.0)["tau_s"] == 0.31
    assert calls == [(0.1, 6.0)]
    calls.clear()
    script[:] = [0.299, 0.031]  # 2.99 samples: 10x finer over a 10x shorter window
    assert measure_source_settling("lab", "cal", 3, v_to=4.0)["tau_s"] == 0.031
    assert calls == [(0.1, 6.0), (pytest.approx(0.01), pytest.approx(0.6))]
    calls.clear()
    script[:] = [SettledTooFast("x"), SettledTooFast("x"), 0.004]
    assert measure_source_settling("lab", "cal", 3, v_to=4.0)["tau_s"] == 0.004
    assert calls == [(0.1, 6.0), (pytest.approx(0.01), pytest.approx(0.6)),
                     (pytest.approx(1e-3), pytest.approx(0.06))]
    calls.clear()
    # at the finest interval: the result as it is, or the error
    script[:] = [0.0001]
    out = measure_source_settling("lab", "cal", 3, interval_s=0.005, duration_s=1.0, v_to=4.0)
    assert out["tau_s"] == 0.0001 and calls == [(0.005, 1.0)]
    script[:] = [SettledTooFast("too fast")]
    with pytest.raises(SettledTooFast):
        measure_source_settling("lab", "cal", 3, interval_s=0.005, v_to=4.0)
    calls.clear()
    script[:] = [1e-4, 2e-5]  # interval exactly 10x the finest: one finer step allowed
    assert measure_source_settling("lab", "cal", 3, interval_s=0.01, finest_interval_s=0.001,
                                   v_to=4.0)["tau_s"] == 2e-5
    assert calls == [(0.01, 6.0), (pytest.approx(0.001), pytest.approx(0.6))]


def test_measure_source_settling_accepts_exactly_three_samples_per_tau(monkeypatch) -> None:
    import calibration.mac as mac

    calls: list[float] = []

    def fake(lab: Any, cal: Any, channel: int, *, interval_s: float, duration_s: float) -> dict:
        calls.append(interval_s)
        return {"tau_s": 0.375, "t_s": [0.0, 0.125, 0.25, 0.375, 0.5]}  # tau: exactly 3 samples

    monkeypatch.setattr(mac, "measure_settling", fake)
    assert measure_source_settling(None, None, 1)["tau_s"] == 0.375 and calls == [0.1]


def test_tone_map_fit_uses_the_weakest_channel_with_a_margin() -> None:
    # highest settable powers: 41.25, 33.875, 54.5, 48.625 mW; per unit rescale the least is ch1
    tm = ToneMap.fit(CAL, [1, 2, 3, 4], [1.8e9, 2.2e9, 2.8e9, 3.2e9], [1.0, 0.8, 1.2, 1.0])
    p0 = 0.97 * 41.25
    assert tm.channels == [1, 2, 3, 4] and tm.freq_hz == [1.8e9, 2.2e9, 2.8e9, 3.2e9]
    assert tm.p_x1_mw == pytest.approx([p0, 0.8 * p0, 1.2 * p0, p0], rel=1e-12)
    tm = ToneMap.fit(CAL, (2, 3), np.array([2.2e9, 2.8e9]), (2.0, 1.0), margin=0.5)
    assert tm.p_x1_mw == pytest.approx([0.5 * 33.875, 0.5 * 33.875 / 2], rel=1e-12)
    assert type(tm.channels) is list and all(type(f) is float for f in tm.freq_hz)


def test_tone_source_checks_its_settings_and_reads_its_calibration() -> None:
    lab = Lab()
    for tau, eps in ((0.0, 2e-3), (-1.0, 2e-3), (float("nan"), 2e-3), (0.1, 0.0), (0.1, 1.0), (0.1, -0.1)):
        with pytest.raises(ValueError, match="tau_s"):
            ToneSource(lab, CAL, TONES, Ledger(lab.clock.now_s), tau_s=tau, eps=eps)
    src = ToneSource(lab, CAL, TONES, Ledger(lab.clock.now_s), tau_s=1e-3, eps=0.999)
    assert src.eps == 0.999 and src.tau_s == 1e-3
    src = source(lab)
    assert src.eps == 2e-3 and src.fixed_wait_s is None and src.tuning_settle_s == 30.0
    assert src.w == SourceWiring() and src.tune is lab["vco_supply"] and src.amp is lab["vco_amp"]
    assert src.threshold_v.tolist() == [1.5] * 4
    assert src.p_lo_mw == pytest.approx([1.0, 1.5, 2.0, 0.5])
    assert src.target_v.tolist() == [0.0] * 4 and src.clipped == 0 and src.started is False
    assert src.last_x.tolist() == [0.0] * 4
    # by instrument name, and other roles
    lab2 = Lab()
    lab2.instruments = {"my_amp": lab2["vco_amp"]}
    del lab2["vco_amp"]
    lab2["tuner"] = lab2.pop("vco_supply")
    src2 = ToneSource(lab2, CAL, TONES, Ledger(lab2.clock.now_s), tau_s=0.1,
                      wiring=SourceWiring(tuning_role="tuner", amplifier_role="my_amp"))
    assert src2.amp is lab2.instruments["my_amp"] and src2.tune is lab2["tuner"]


def test_encode_rounds_below_the_lowest_level_and_clips() -> None:
    src = source(Lab())
    # x * P1: ch1 40 mW (lowest 1.0 mW: x 0.025), ch2 32 (1.5: x 0.046875), ch3 48 (2.0), ch4 40 (0.5)
    x = src.encode(np.array([0.025, 0.046875 / 2, 0.5 * 2.0 / 48 - 1e-9, 1.2]))
    assert x == pytest.approx([0.025, 0.046875, 0.0, 1.0], abs=1e-12)
    x = src.encode(np.array([-0.5, 0.03, 0.0, 0.0124]))
    assert x == pytest.approx([0.0, 0.046875, 0.0, 0.0125], abs=1e-12)
    x = src.encode([[0.02, 0.04, 0.7, 0.0062]])  # array-like, any shape
    assert x.shape == (1, 4) and x[0] == pytest.approx([0.025, 0.046875, 0.7, 0.0], abs=1e-12)


def test_voltages_invert_the_power_fit() -> None:
    src = source(Lab())
    x = np.array([1.0, 0.0, 0.5, 0.01])  # ch4: 0.4 mW, rounded to its lowest 0.5 mW
    v = src.voltages(x)
    assert v[1] == 0.0
    for i in (0, 2, 3):
        ch = TONES.channels[i]
        p = max(x[i] * P1[i], 0.5)
        assert np.polyval(POLYS[ch], v[i]) == pytest.approx(p, rel=1e-6)
    assert v[3] == pytest.approx(1.5, abs=1e-6)


def test_start_tunes_every_channel_then_waits() -> None:
    lab = Lab()
    src = source(lab, tuning_settle_s=12.5)
    src.target_v[:] = 3.0
    src._from_v[:] = 2.0
    src.start()
    tuning = [CAL.tuning_for(ch, f) for ch, f in zip(TONES.channels, FREQS, strict=True)]
    expected = []
    for ch, v in zip(TONES.channels, tuning, strict=True):
        expected += [("amp", ch, "V", 0.0), ("amp", ch, "out", True), ("tune", ch, "V", v),
                     ("tune", ch, "out", True)]
    assert lab.log == expected + [("sleep", 12.5)]
    assert tuning == pytest.approx([6.0, 7.0, 8.0, 9.0])
    assert src.ledger.ops == {"supply commands": 16} and src.ledger.time_s == {"source settling": 12.5}
    assert src.started and src.target_v.tolist() == [0.0] * 4 and src._from_v.tolist() == [0.0] * 4
    lab2 = Lab()
    source(lab2).start()
    assert lab2.log[-1] == ("sleep", 30.0)


def test_commands_only_the_changed_channels_and_tracks_the_lag() -> None:
    lab = Lab()
    src = started(lab, tau_s=2.0)
    lab.clock.t = 100.0
    src._command(np.array([3.0, 0.0, 2.0, 0.0]))
    assert lab.log == [("amp", 1, "V", 3.0), ("amp", 3, "V", 2.0)]
    assert src.ledger.ops["supply commands"] == 16 + 2
    assert src._since_s.tolist() == [100.0, 0.0, 100.0, 0.0]
    lab.clock.t = 102.0
    e = math.exp(-1.0)
    assert src.estimate_v(102.0) == pytest.approx([3.0 * (1 - e), 0.0, 2.0 * (1 - e), 0.0])
    lab.log.clear()
    src._command(np.array([3.0, 0.0, 4.0, 0.0]))  # ch3 from where it has got to
    assert lab.log == [("amp", 3, "V", 4.0)]
    assert src._from_v == pytest.approx([0.0, 0.0, 2.0 * (1 - e), 0.0])
    assert src.target_v.tolist() == [3.0, 0.0, 4.0, 0.0]
    ch3 = 4.0 - (4.0 - 2.0 * (1 - e)) * e
    assert src.estimate_v(104.0) == pytest.approx([3.0 * (1 - e * e), 0.0, ch3, 0.0])
    lab.log.clear()
    src._command(np.array([3.0, 0.0, 4.0, 0.0]))  # nothing changed: nothing sent
    assert lab.log == [] and src.ledger.ops["supply commands"] == 16 + 3


def test_wait_needed_until_within_eps_of_full_scale() -> None:
    lab = Lab()
    tau = 0.5
    src = started(lab, tau_s=tau, eps=1e-3)
    lab.clock.t = 0.0
    src._command(np.array([3.0, 0.0, 0.0, 0.0]))  # ch1 0 -> 3 V: P error = gap x slope at 3 V (11)
    need = tau * math.log(3.0 * 11.0 / (1e-3 * 40.0))
    assert src.wait_needed_s(0.0) == pytest.approx(need, rel=1e-9)
    assert src.wait_needed_s(0.2) == pytest.approx(need - 0.2, rel=1e-9)
    assert src.wait_needed_s(need + 0.01) == 0.0
    # a small step above the threshold: only the power error counts
    lab.clock.t = 50.0
    src._command(np.array([3.01, 0.0, 0.0, 0.0]))
    assert src.wait_needed_s(50.0) == pytest.approx(tau * math.log(0.01 * 11.02 / 0.04), rel=1e-6)
    # a step from dark to just above the threshold: the wait until it lights dominates
    lab.clock.t = 100.0
    src._command(np.zeros(4))
    lab.clock.t = 200.0
    src._command(np.array([0.0, 1.501, 0.0, 0.0]))
    light = tau * math.log(1.501 / 0.001)
    assert src.wait_needed_s(200.0) == pytest.approx(light, rel=1e-9)
    # switching off: until every channel is below 95 % of its threshold
    lab.clock.t = 300.0
    src._command(np.array([0.0, 0.0, 4.0, 0.0]))
    lab.clock.t = 400.0
    src._command(np.zeros(4))
    assert src.wait_needed_s(400.0) == pytest.approx(tau * math.log(4.0 / (0.95 * 1.5)), rel=1e-9)
    assert src.wait_needed_s(400.0 + tau * math.log(4.0 / 1.4)) == 0.0
    # the worst channel wins; the eps scales with the channel's full scale
    lab.clock.t = 500.0
    src._command(np.array([2.0, 0.0, 3.0, 0.0]))
    w1 = math.log(2.0 * 9.0 / (1e-3 * 40.0))
    w3 = math.log(3.0 * 14.0 / (1e-3 * 48.0))
    assert src.wait_needed_s(500.0) == pytest.approx(tau * max(w1, w3), rel=1e-9)
    src.target_v[:] = src._from_v[:] = 0.0
    assert src.wait_needed_s(600.0) == 0.0


def test_full_scale_wait_is_the_largest_step() -> None:
    src = source(Lab(), tau_s=0.25, eps=1e-3)
    waits = []
    for i, ch in enumerate(TONES.channels):
        v_hi = src.voltages(np.eye(4)[i])[i]
        slope = np.polyval(np.polyder(POLYS[ch]), v_hi)
        waits.append(math.log(v_hi * slope / (1e-3 * P1[i])))
    assert src.full_scale_wait_s() == pytest.approx(0.25 * max(waits), rel=1e-9)
    assert int(np.argmax(waits)) != 0  # not the first channel's
    # a loose eps: every channel's step is within a factor e of it, so less than one tau
    loose = source(Lab(), tau_s=0.25, eps=0.9).full_scale_wait_s()
    assert loose == pytest.approx(0.25 * (max(waits) + math.log(1e-3 / 0.9)), rel=1e-9) and loose < 0.25


def test_a_tone_map_with_lists_of_different_lengths_is_refused() -> None:
    src = ToneSource(Lab(), CAL, ToneMap([1, 2, 3, 4], list(FREQS[:3]), list(P1)), Ledger(lambda: 0.0),
                     tau_s=0.1)
    with pytest.raises(ValueError):
        src.voltages(np.full(4, 0.5))
    with pytest.raises(ValueError):
        src.start()


def test_wait_for_a_weak_channel_and_from_part_way_down() -> None:
    """A channel whose power changes slowly with the voltage (0.6 mW/V at 3 V) needs less than
    the voltage gap says; a channel re-lit while it is still fading needs only the rest."""
    c = channel_cal(1)
    c.poly_mw = [0.1, 0.0, 0.775]  # 1.0 mW at 1.5 V, 3.275 mW at 5 V
    lab = Lab()
    src = ToneSource(lab, SourceCalibration({1: c}, CAL.attenuation), ToneMap([1], [FREQS[0]], [3.0]),
                     Ledger(lab.clock.now_s), tau_s=1.0, eps=1e-3)
    src._command(np.array([3.0]))
    assert src.wait_needed_s(0.0) == pytest.approx(math.log(3.0 * 0.6 / 3e-3), rel=1e-9)
    lab.clock.t = 100.0
    src._command(np.array([0.0]))
    lab.clock.t = 100.0 + math.log(3.0)  # faded to 1 V: dark
    src._command(np.array([1.501]))
    light = math.log((1.501 - 1.0) / 0.001)
    assert src.wait_needed_s(lab.clock.t) == pytest.approx(light, rel=1e-6)


def test_settle_waits_as_long_as_needed_or_fixed() -> None:
    lab = Lab()
    src = started(lab, tau_s=0.5)
    lab.clock.t = 10.0
    src._command(np.array([3.0, 0.0, 0.0, 0.0]))
    need = src.wait_needed_s(10.0)
    src.settle()
    assert lab.log[-1] == ("sleep", pytest.approx(need)) and src.wait_needed_s(lab.clock.t) < 1e-9
    assert src.ledger.ops["settling waits"] == 1
    assert src.ledger.time_s["source settling"] == pytest.approx(30.0 + need)
    lab.clock.t += 1e-3
    src.settle()  # settled: no wait
    assert src.ledger.ops["settling waits"] == 1 and len(lab.events("sleep")) == 1
    src.fixed_wait_s = 7.0
    src.settle()
    assert lab.log[-1] == ("sleep", 7.0) and src.ledger.ops["settling waits"] == 2
    src.fixed_wait_s = 0.0
    src.settle()
    assert len(lab.events("sleep")) == 2


def test_apply_and_off_set_the_tones_and_count_clipped_inputs() -> None:
    lab = Lab()
    src = started(lab, tau_s=0.1)
    src.apply(np.array([0.5, 0.02, 0.0, 1.0]))  # 0.02 x 32 = 0.64 mW: rounded to 0 (< 0.75)
    assert src.clipped == 1 and src.last_x == pytest.approx([0.5, 0.0, 0.0, 1.0])
    assert lab.emitted_x() == pytest.approx([0.5, 0.0, 0.0, 1.0], rel=1e-6)
    assert lab.log[-1][0] == "sleep" and src.wait_needed_s(lab.clock.t) < 1e-9
    assert src.ledger.ops["supply commands"] == 16 + 2 and "tone setting" in src.ledger.time_s
    src.apply(np.array([1.3, 0.03, 0.0, 1.0]))  # clipped at 1; rounded up to 1.5 mW
    assert src.clipped == 3 and src.last_x == pytest.approx([1.0, 0.046875, 0.0, 1.0])
    src.apply(np.array([1.0, 0.046875, 0.0, 1.0]))  # exactly settable: not clipped
    assert src.clipped == 3
    src.off()
    assert lab.emitted_x().tolist() == [0.0] * 4 and src.target_v.tolist() == [0.0] * 4
    assert src.wait_needed_s(lab.clock.t) < 1e-9 and lab.log[-1][0] == "sleep"
    assert src.last_x == pytest.approx([1.0, 0.046875, 0.0, 1.0])  # off keeps what was applied
    assert set(src.ledger.time_s) == {"source settling", "tone setting"}


def test_shutdown_switches_every_channel_off_even_if_one_fails() -> None:
    lab = Lab(broken=(2,))
    src = source(lab)
    src.target_v[:] = 3.0
    src.started = True
    src.shutdown()
    assert lab.log == [("amp", 1, "V", 0.0), ("amp", 1, "out", False), ("amp", 3, "V", 0.0),
                       ("amp", 3, "out", False), ("amp", 4, "V", 0.0), ("amp", 4, "out", False)]
    assert src.target_v.tolist() == [0.0] * 4 and src.started is False


def test_source_gate_switches_the_tones_off_and_back() -> None:
    lab = Lab()
    src = started(lab)
    src.apply(np.array([0.5, 0.5, 0.0, 0.5]))
    gate = SourceGate(src)
    assert gate.source is src
    gate.output_off()
    assert lab.emitted_x().tolist() == [0.0] * 4 and src.last_x == pytest.approx([0.5, 0.5, 0.0, 0.5])
    gate.output_on()
    assert lab.emitted_x() == pytest.approx([0.5, 0.5, 0.0, 0.5], rel=1e-6)


# --------------------------------------------------------------------------- the convolver


def truth_volts(lab: Lab, src: ToneSource, patch: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """What each chain of the bench answers to ``patch`` (as the source encodes it)."""
    x = src.encode(patch)
    return np.array([c.v_max * float(c.w @ x) * gain for c in lab.chains])


def test_switches_and_stage_are_commanded_only_when_needed() -> None:
    lab, chains = bench(channels=(1, 2, 2))
    src = started(lab)
    conv = Convolver(lab, src, chains, src.ledger)
    assert (conv.n_avg, conv.every, conv.group_um, conv.offset_reuse_s) == (1, 10, 3.0, 30.0)
    assert conv.source_port == 1 and conv.reoptimise is None and conv.progress is None
    assert isinstance(conv.plan, PlannedPlan)
    conv._select(2)
    conv._select(2)
    conv._channel(1)
    conv._channel(2)  # also on voltmeter channel 2: nothing to do
    assert lab.log == [("output", 2)] and lab["voltmeter"].channel == 2
    ops = src.ledger.ops
    assert ops["switch changes"] == 1 and ops["voltmeter channel changes"] == 1
    assert src.ledger.time_s["switching"] == 0.0
    assert set(src.ledger.time_s) == {"source settling", "switching"}
    conv._channel(0)
    assert lab["voltmeter"].channel == 1 and ops["voltmeter channel changes"] == 2
    conv.reset_state()
    conv._select(2)
    conv._channel(0)
    assert lab.events("output") == [("output", 2), ("output", 2)] and ops["voltmeter channel changes"] == 3
    assert conv._gate_on is False
    # stage moves: approached from below, timed
    assert conv._move_s() == 0.5  # before the first move
    conv._move(20.0)
    assert lab.events("z") == [("z", 20.0)] and ops["stage moves"] == 1 and conv._move_s() == 1.0
    conv._move(19.0)  # from above: overshoot, then up (2 s)
    assert lab.events("z")[1:] == [("z", pytest.approx(18.95)), ("z", 19.0)]
    assert ops["stage moves"] == 2 and conv._move_s() == 1.5
    assert src.ledger.time_s["stage moves"] == 3.0
    assert Convolver(lab, source(lab, wiring=SourceWiring(vco_source_port=3)), chains,
                     src.ledger).source_port == 3


def reading_setup(z_mm: float, port: int) -> tuple[Lab, list[PlacedChain], ToneSource, Convolver]:
    """A started source applying one input, and a Convolver (2 readings averaged) at ``z_mm``
    with the selector on ``port``: the set-up of the reading tests."""
    lab, chains = bench()
    src = started(lab)
    src.apply(np.array([0.5, 0.25, 0.0, 1.0]))
    conv = Convolver(lab, src, chains, src.ledger, n_avg=2)
    conv._move(z_mm)
    conv._select(port)
    return lab, chains, src, conv


def test_planned_reading_reuses_the_rf_off_offset_while_it_is_fresh() -> None:
    from drivers.rf_switch import SwitchGate

    lab, chains, src, conv = reading_setup(20.0, 1)
    lab.drift_v_per_s = 1e-9
    gate = SwitchGate(lab["source_switch"], on_port=1, off_port=0)
    lab.clock.t = 1000.0
    lab.log.clear()
    sig = truth_volts(lab, src, np.array([0.5, 0.25, 0.0, 1.0]))[0]
    v = conv._read_planned(gate, 0)
    # on, two readings, off, two readings: the mean difference (drift 0.5 s apart)
    assert [e[:2] for e in lab.log] == [("selector", 1), ("read", 1), ("read", 1), ("selector", 0),
                                        ("read", 1), ("read", 1)]
    assert v == pytest.approx(sig - 0.5e-9, rel=1e-6)
    assert conv._offset[0] == (1001.0, pytest.approx(1e-6 + 1e-9 * 1000.875))
    ops = src.ledger.ops
    assert ops["voltmeter readings"] == 4 and ops["rf gate changes"] == 2
    assert src.ledger.time_s["voltmeter readings"] == 1.0
    # fresh offset: RF on again, the on-readings only
    lab.log.clear()
    v = conv._read_planned(gate, 0)
    assert [e[:2] for e in lab.log] == [("selector", 1), ("read", 1), ("read", 1)]
    assert v == pytest.approx(sig + 1e-9 * 0.5, rel=1e-6)  # readings 0.5 s after the offset's
    assert ops["voltmeter readings"] == 6 and ops["rf gate changes"] == 3
    lab.log.clear()
    conv._read_planned(gate, 0)  # RF already on: not switched
    assert [e[:2] for e in lab.log] == [("read", 1), ("read", 1)]
    # exactly offset_reuse_s old: still used; older: measured again
    lab.clock.t = 1001.0 + 30.0 - 0.5
    lab.log.clear()
    conv._read_planned(gate, 0)
    assert len(lab.events("read")) == 2
    lab.clock.t = 1001.0 + 30.0 - 0.25
    lab.log.clear()
    conv._read_planned(gate, 0)
    assert [e[:2] for e in lab.log] == [("read", 1), ("read", 1), ("selector", 0), ("read", 1), ("read", 1)]
    assert conv._offset[0][0] == 1001.0 + 30.0 + 0.75 and conv._gate_on is False
    assert ops["rf gate changes"] == 4
    # each chain has its own offset, read on its own voltmeter channel
    lab.log.clear()
    chains[1].voltmeter_channel = 2
    conv._read_planned(gate, 1)
    assert lab["voltmeter"].channel == 2 and sorted(conv._offset) == [0, 1]
    assert conv._offset[1] == (lab.clock.t, pytest.approx(2e-6 + 1e-9 * (lab.clock.t - 0.125), rel=1e-9))


def test_differential_reading_switches_rf_for_every_reading() -> None:
    from drivers.rf_switch import SwitchGate

    lab, chains, src, conv = reading_setup(20.1, 2)
    lab.log.clear()
    v = conv._read(SwitchGate(lab["source_switch"], on_port=1, off_port=0), 1)
    assert [e[:2] for e in lab.log if e[0] != "sleep"] == [("selector", 1), ("read", 1), ("selector", 0),
                                                          ("read", 1)] * 2 + [("selector", 0)]
    assert v == pytest.approx(truth_volts(lab, src, np.array([0.5, 0.25, 0.0, 1.0]))[1], rel=1e-6)
    assert lab.events("sleep") == [("sleep", 0.0)] * 4  # its waits on the lab's clock
    assert src.ledger.ops["voltmeter readings"] == 4 and src.ledger.ops["rf gate changes"] == 4
    assert src.ledger.time_s["voltmeter readings"] == pytest.approx(1.0)


def test_groups_are_chains_within_group_um_of_the_groups_first() -> None:
    lab, chains = bench(z=(20.0, 20.0029, 20.005))
    chains.append(PlacedChain("c3", 4, [0.0] * 4, 19.0, 1e-6))
    src = source(lab)
    conv = Convolver(lab, src, chains, src.ledger)
    assert conv.groups() == [[3], [0, 1], [2]]
    zg = conv.z_groups()
    assert [g for g, _ in zg] == [[3], [0, 1], [2]]
    assert [z for _, z in zg] == pytest.approx([19.0, 20.00145, 20.005])
    assert Convolver(lab, src, chains, src.ledger, group_um=5.0).groups() == [[3], [0, 1, 2]]
    assert Convolver(lab, src, chains, src.ledger, group_um=2.0).groups() == [[3], [0], [1], [2]]
    assert Convolver(lab, src, chains[:1], src.ledger).groups() == [[0]]
    chains[1].stage_z_mm = 20.0 + 2 ** -8  # 3.90625 um: exactly group_um still groups
    assert Convolver(lab, src, chains, src.ledger, group_um=3.90625).groups() == [[3], [0, 1], [2]]
    assert Convolver(lab, src, chains, src.ledger, group_um=3.9).groups() == [[3], [0], [1, 2]]


def test_a_group_is_read_port_by_port_and_channel_by_channel() -> None:
    lab, chains = bench(ports=(2, 1, 1), channels=(1, 2, 1), z=(20.0, 20.0, 20.0))
    src = started(lab)
    conv = Convolver(lab, src, chains, src.ledger)
    order: list[tuple[int, int]] = []
    out = np.zeros((3, 3))

    def read(c: int) -> float:
        order.append((c, lab["switch"].port))
        return 10.0 + c

    conv._measure_group(1, [0, 1, 2], out, read)
    assert order == [(2, 1), (1, 1), (0, 2)]  # port 1 (channels 1, 2), then port 2
    assert out[1].tolist() == [10.0, 11.0, 12.0] and not out[[0, 2]].any()
    assert src.ledger.ops["chain measurements"] == 3 and src.ledger.ops["switch changes"] == 2
    conv._measure_group(2, [1], out, read, count=False)
    assert src.ledger.ops["chain measurements"] == 3 and out[2, 1] == 11.0


def test_patches_are_ordered_by_the_nearest_amplifier_voltages() -> None:
    lab, chains = bench()
    src = started(lab)
    conv = Convolver(lab, src, chains, src.ledger)
    unique = np.array([[1.0, 1.0, 1.0, 1.0], [0.1, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5],
                       [0.1, 0.0, 0.0, 0.05]])
    assert conv.order_patches(unique) == [1, 3, 2, 0]
    src.apply(np.array([1.0, 1.0, 1.0, 0.9]))
    assert conv.order_patches(unique) == [0, 2, 1, 3]  # 1 and 3 as far: the first
    assert conv.order_patches(unique[:0]) == []


class Recording:
    """A plan that 'measures' patch sums and records what it was asked."""

    name = "recording"

    def __init__(self, lab: Lab) -> None:
        self.lab, self.blocks, self.v_max_at = lab, [], []

    def measure_block(self, conv, block, patches, volts, measured, per_image_s, done) -> None:
        self.blocks.append(block)
        self.v_max_at.append([c.v_max_v for c in conv.chains])
        for i in block:
            volts[i] = np.arange(1, len(conv.chains) + 1)[:, None, None] * patches[i].sum(-1)
            measured[i] = True
            per_image_s.append(float(i))
        self.lab.log.append(("block", block.start))
        done(block)


def test_run_reoptimises_before_each_block_and_reports_as_it_goes() -> None:
    lab, chains = bench()
    src = source(lab)
    plan = Recording(lab)
    calls: list[Any] = []

    def reopt(lab_: Any, chains_: list[PlacedChain], ledger: Ledger) -> None:
        assert lab_ is lab and chains_ is chains and ledger is src.ledger and src.started
        lab.log.append(("reopt",))
        lab.sleep(5.0)
        ledger.count("reads")
        for c in chains_:
            c.v_max_v *= 2

    conv = Convolver(lab, src, chains, src.ledger, plan=plan, reoptimise=reopt,
                     progress=lambda d, n: calls.append(("progress", d, n)))
    images = np.random.default_rng(1).random((12, 2, 3))
    res = conv.run(images, on_done=lambda idx, mac, volts: calls.append((idx, mac.copy(), volts.copy())))
    assert plan.blocks == [range(0, 10), range(10, 12)]  # every 10 images by default
    assert [e[0] for e in lab.log if e[0] in ("reopt", "block")] == ["reopt", "block", "reopt", "block"]
    assert plan.v_max_at == [[4e-6, 6e-6, 8e-6], [8e-6, 12e-6, 16e-6]]  # after each re-optimisation
    sums = res.volts[:, 0]
    assert sums == pytest.approx(images.sum(-1).sum(-1)[:, None, None] * 0 + sums)  # shape check
    assert res.volts.shape == (12, 3, 2, 3) and res.mac.shape == (12, 3, 2, 3)
    from calibration.mac import patches_2x2

    s = patches_2x2(images).sum(-1)
    assert res.volts[:, 2] == pytest.approx(3 * s)
    assert res.mac[:10, 1] == pytest.approx(2 * s[:10] / 6e-6)  # the block's V_max
    assert res.mac[10:, 1] == pytest.approx(2 * s[10:] / 12e-6)
    assert res.measured.all() and res.measured.dtype == bool
    assert res.lab_s_per_image == [float(i) for i in range(12)]
    assert calls[0][1].shape == calls[0][2].shape == (10, 3, 2, 3)  # the block's images only
    assert calls[0][1] == pytest.approx(res.mac[:10])
    assert [c[0] for c in calls] == [range(0, 10), "progress", range(10, 12), "progress"]
    assert calls[1] == ("progress", 10, 12) and calls[3] == ("progress", 12, 12)
    assert calls[2][1] == pytest.approx(res.mac[10:]) and calls[2][2] == pytest.approx(res.volts[10:])
    assert res.ledger["time_s"]["re-optimisation"] == 10.0
    assert res.ledger["ops"]["reads (re-optimisation)"] == 2
    assert res.ledger == src.ledger.snapshot()
    assert not src.started and lab["source_switch"].port == 0 and lab.log[-1] == ("selector", 0)
    assert lab["vco_amp"].on == {1: False, 2: False, 3: False, 4: False}
    # without re-optimisation or callbacks; a smaller block size
    lab2, chains2 = bench()
    plan2 = Recording(lab2)
    conv2 = Convolver(lab2, source(lab2), chains2, Ledger(lab2.clock.now_s), plan=plan2, every=5)
    res2 = conv2.run(images[:6])
    assert plan2.blocks == [range(0, 5), range(5, 6)] and res2.mac[:, 0] == pytest.approx(s[:6] / 2e-6)


def test_run_switches_rf_off_when_the_plan_fails() -> None:
    lab, chains = bench()
    src = source(lab)

    class Failing:
        name = "failing"

        def measure_block(self, conv, block, *args) -> None:
            lab["source_switch"].port = 1
            src.apply(np.array([1.0, 1.0, 1.0, 1.0]))
            raise TimeoutError("the voltmeter does not answer")

    with pytest.raises(TimeoutError):
        Convolver(lab, src, chains, src.ledger, plan=Failing()).run(np.ones((2, 2, 2)))
    assert lab["source_switch"].port == 0 and lab.emitted_x().tolist() == [0.0] * 4 and not src.started


# --------------------------------------------------------------------------- the plans


IMAGES = np.array([[[0.5, 0.0], [0.0, 0.0]], [[0.0, 0.5], [0.5, 0.25]], [[0.5, 0.0], [0.0, 0.0]]])


def test_planned_measures_each_unique_patch_once_and_skips_zeros() -> None:
    from calibration.mac import patches_2x2

    lab, chains = bench()
    src = started(lab, tau_s=1e-3)
    conv = Convolver(lab, src, chains, src.ledger)
    conv._port = 1  # stale knowledge: forgotten at the start of the block
    src.clipped = 2  # from earlier blocks: added to
    patches = patches_2x2(np.concatenate([IMAGES, IMAGES[1:2], IMAGES[1:2]]))
    patches[1, 1, 1] = [0.02, 0.0, 0.0, 0.25]  # 0.8 mW on ch1: rounded up to its lowest 1 mW
    volts = np.full((5, 3, 2, 2), 9.0)
    measured = np.zeros((5, 2, 2), bool)
    per_image: list[float] = [5.0]
    done: list[range] = []
    t0 = lab.clock.t
    # the block: images 1-3 (images 0 and 4 belong to other blocks and are left alone)
    PlannedPlan().measure_block(conv, range(1, 4), patches, volts, measured, per_image, done.append)
    assert done == [range(1, 4)]
    assert per_image == [5.0] + [pytest.approx((lab.clock.t - t0) / 3)] * 3
    assert (volts[[0, 4]] == 9.0).all() and not measured[[0, 4]].any()
    nonzero = patches.sum(-1) > 0
    assert measured[1:4].tolist() == nonzero[1:4].tolist()
    for n in range(1, 4):
        for g in range(2):
            for h in range(2):
                want = truth_volts(lab, src, patches[n, g, h]) if nonzero[n, g, h] else np.zeros(3)
                assert volts[n, :, g, h] == pytest.approx(want, rel=1e-5, abs=1e-12), (n, g, h)
    ops = src.ledger.ops
    # 12 patches: 3 zero, 9 others of which 6 differ ([0.25, 0, 0, 0] only in image 3)
    assert ops["patches"] == 12 and ops["patches known zero"] == 3 and ops["patches repeated"] == 3
    assert ops["chain measurements"] == 3 * 6 and src.clipped == 3
    assert lab.events("selector")[0] == ("selector", 0)
    assert {e[1] for e in lab.events("selector")} == {0, 1}  # RF off: the selector's port 0
    assert src.ledger.time_s["voltmeter readings"] == pytest.approx(0.25 * (3 * 6 + 3))
    assert ("output", 1) in lab.log  # selected again though it was 'known'
    # tau 1 ms: settling is cheap, so one pass per z group (3 moves)
    assert ops["blocks group-major"] == 1 and "blocks patch-major" not in ops
    assert [e[1] for e in lab.events("z")] == [20.0, 20.1, 20.2]
    # the offset is read once per chain (RF off with the selector), then reused
    assert ops["voltmeter readings"] == 3 * 6 + 3


def test_planned_visits_groups_patch_by_patch_when_settling_is_slow() -> None:
    from calibration.mac import patches_2x2

    lab, chains = bench(z=(20.0, 20.002, 20.2))
    src = started(lab, tau_s=10.0)
    conv = Convolver(lab, src, chains, src.ledger, offset_reuse_s=0.0)
    patches = patches_2x2(IMAGES[1:2])
    volts = np.zeros((1, 3, 2, 2))
    measured = np.zeros((1, 2, 2), bool)
    PlannedPlan().measure_images(conv, patches, volts, measured)
    ops = src.ledger.ops
    assert ops["blocks patch-major"] == 1
    assert ops["stage moves"] == 2 * 4  # both groups at each of the 4 patches
    assert [e[1] for e in lab.events("z")[:2]] == pytest.approx([20.001, 20.2])
    gain = 1 / (1 + 0.1 ** 2)  # the pair is measured at their mean z, 1 um off each
    for g in range(2):
        for h in range(2):
            want = truth_volts(lab, src, patches[0, g, h]) * np.array([gain, gain, 1.0])
            assert volts[0, :, g, h] == pytest.approx(want, rel=1e-5)
    # offset_reuse_s = 0: every reading is a differential one (on, off, and off again at its end)
    assert ops["voltmeter readings"] == 2 * 12 and ops["rf gate changes"] == 2 * 12
    assert [e[1] for e in lab.events("selector")] == [0] + [1, 0, 0] * 12


def test_planned_reads_with_any_positive_offset_age() -> None:
    """offset_reuse_s below a second still reads RF on, then off for the offset (no third switch
    as in a differential reading)."""
    from calibration.mac import patches_2x2

    lab, chains = bench(z=(20.0, 20.0, 20.0), ports=(1, 1, 1), channels=(1, 2, 3))
    src = started(lab, tau_s=1e-3)
    conv = Convolver(lab, src, chains, src.ledger, offset_reuse_s=0.5)
    PlannedPlan().measure_images(conv, patches_2x2(IMAGES[:1]), np.zeros((1, 3, 2, 2)),
                                 np.zeros((1, 2, 2), bool))
    sel = [e[1] for e in lab.events("selector")]  # one patch, three chains: on, off for each
    assert sel == [0] + [1, 0] * 3 and src.ledger.ops["voltmeter readings"] == 6


@pytest.mark.parametrize("n_groups", [2, 3])
def test_planned_chooses_the_cheaper_order_at_the_boundary(n_groups: int) -> None:
    from calibration.mac import patches_2x2

    z = (20.0, 20.1, 20.2) if n_groups == 3 else (20.0, 20.0, 20.2)
    ref_lab, _ = bench()
    full = source(ref_lab, tau_s=1.0).full_scale_wait_s()
    # patch-major when (groups - 1) x half the full-scale wait > groups x 2 x 0.5 s (the first move)
    boundary_tau = n_groups * 2 * 0.5 / ((n_groups - 1) * 0.5 * full)
    for factor, major in ((1.02, "blocks patch-major"), (0.98, "blocks group-major")):
        lab, chains = bench(z=z)
        src = started(lab, tau_s=boundary_tau * factor)
        conv = Convolver(lab, src, chains, src.ledger)
        PlannedPlan().measure_images(conv, patches_2x2(IMAGES[:1]), np.zeros((1, 3, 2, 2)),
                                     np.zeros((1, 2, 2), bool))
        assert src.ledger.ops[major] == 1, factor


def test_algorithm3_measures_every_patch_and_chain_with_its_own_source() -> None:
    from calibration.mac import patches_2x2

    lab, chains = bench()
    src = started(lab, tau_s=0.01)
    src.fixed_wait_s = 0.125
    conv = Convolver(lab, src, chains, src.ledger, plan="algorithm3")
    conv._port = 1
    patches = patches_2x2(IMAGES[:2])
    volts = np.zeros((2, 3, 2, 2))
    measured = np.zeros((2, 2, 2), bool)
    per_image: list[float] = []
    done: list[range] = []
    times = []
    plan = Algorithm3Plan()
    plan.measure_block(conv, range(0, 2), patches, volts, measured, per_image,
                       lambda r: (done.append(r), times.append(lab.clock.t)))
    assert done == [range(0, 1), range(1, 2)]
    assert per_image == pytest.approx([times[0] - (times[0] - per_image[0]), times[1] - times[0]])
    assert measured.all()  # zeros too
    for n in range(2):
        for g in range(2):
            for h in range(2):
                assert volts[n, :, g, h] == pytest.approx(truth_volts(lab, src, patches[n, g, h]), rel=1e-5,
                                                          abs=1e-12)
    assert src.ledger.ops["chain measurements"] == 2 * 4 * 3
    assert src.fixed_wait_s == 0.125  # restored
    full = src.full_scale_wait_s()
    waits = [e[1] for e in lab.events("sleep") if e[1] > 0]  # the full-scale wait at every change:
    assert waits == pytest.approx([full] * len(waits))  # the patch, then per chain RF on, off, off
    assert len(waits) == 2 * 4 * (1 + 3 * 3)
    # per patch: the tones, then for each chain: its z, its port, RF on/off by the source
    assert lab.events("selector") == [("selector", 1), ("selector", 1)]
    assert [e[1] for e in lab.events("z")][:3] == [20.0, 20.1, 20.2]
    assert [e[1] for e in lab.events("output")][:4] == [1, 2, 3, 1]  # re-selected per chain
    assert src.ledger.ops["stage moves"] == 2 * 4 * 3


def test_algorithm3_restores_the_fixed_wait_after_an_error() -> None:
    lab, chains = bench()
    src = started(lab)
    conv = Convolver(lab, src, chains, src.ledger, plan="algorithm3")

    def broken() -> float:
        raise TimeoutError("no answer")

    lab["voltmeter"].read_voltage_v = broken
    with pytest.raises(TimeoutError):
        Algorithm3Plan().measure_image(conv, np.ones((1, 1, 4)), np.zeros((3, 1, 1)), np.zeros((1, 1), bool))
    assert src.fixed_wait_s is None


# --------------------------------------------------------------------------- V_max


def test_fit_v_max_is_the_least_squares_scale_of_each_chain() -> None:
    lab, chains = bench(z=(20.0, 20.0, 20.3))
    for c in chains:
        c.v_max_v = 1.0
    src = source(lab, tau_s=0.01)
    conv = Convolver(lab, src, chains, src.ledger)
    calib = np.array([[0.5, 0.25, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.25, 0.0],
                      [0.25, 1.0, 0.5, 0.5]])
    with pytest.raises(RuntimeError, match="start the source"):
        fit_v_max(conv, calib)
    src.start()
    with pytest.raises(ValueError, match="two non-zero"):
        fit_v_max(conv, calib[:2])
    with pytest.raises(ValueError, match="two non-zero"):
        fit_v_max(conv, np.array([0.005, 0.0, 0.0, 0.0]))  # rounded to off: no patch at all
    conv._port = 1
    lab.log.clear()
    out = fit_v_max(conv, calib)
    gain = np.array([1 / (1 + 0.0), 1.0, 1.0])
    assert out == {"c0": pytest.approx(2e-6 * gain[0], rel=1e-5), "c1": pytest.approx(3e-6, rel=1e-5),
                   "c2": pytest.approx(4e-6, rel=1e-5)}
    assert [c.v_max_v for c in chains] == [out["c0"], out["c1"], out["c2"]]
    assert src.ledger.ops["v_max fits"] == 1 and "chain measurements" not in src.ledger.ops
    assert lab.log[0] == ("selector", 0) and ("output", 1) in lab.log
    assert [e[1] for e in lab.events("selector")][1:4] == [1, 0, 0]  # RF on/off with the selector
    assert src.ledger.ops["stage moves"] == 2 * 3  # both z groups at each patch
    assert [e[1] for e in lab.events("z")][:2] == [20.0, 20.3]
    assert src.ledger.ops["voltmeter readings"] == 3 * 3 * 2
    # one patch twice is enough (the zeros dropped); a chain answering negatively is refused
    # patches of small sums count too (two are enough; the zeros are dropped)
    out = fit_v_max(conv, np.array([[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.25, 0.5, 0.0]]))
    assert out["c1"] == pytest.approx(3e-6, rel=1e-5) and src.ledger.ops["v_max fits"] == 2
    lab.chains[1].v_max = -3e-6
    with pytest.raises(RuntimeError, match="c1: the chain answers with the wrong sign"):
        fit_v_max(conv, calib[:3])
    lab.chains[1].v_max = 0.0
    with pytest.raises(RuntimeError, match="wrong sign"):
        fit_v_max(conv, calib[2:])


def test_patches_are_floats_whatever_the_images() -> None:
    from calibration.mac import patches_2x2

    p = patches_2x2(np.array([[[1, 0], [2, 3]]]))
    assert p.dtype == np.float64 and p.shape == (1, 2, 2, 4)
    assert p[0, 0, 0].tolist() == [1.0, 0.0, 2.0, 3.0] and p[0, 1, 1].tolist() == [3.0, 0.0, 0.0, 0.0]
