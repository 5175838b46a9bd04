"""Convolution on spin-diode chains (thesis 4.3.2, 4.8, Algorithm 3) and measurement planning.

The hardware MAC: the multi-channel VCO source (thesis 4.5) sends the four pixels of a 2x2
patch as four tones, input i at frequency f_i with power x_i P1_i (x in [0, 1]; P1_i, the
power that encodes x = 1, follows the eq. 3.3 rescaling fitted from the reference map, as
eq. 4.2 does with the printed fit); the output switch sends them to one chain; the
nanovoltmeter reads the chain's rectified voltage, RF on minus RF off. V / V_max is the
chain's MAC sum_i w_i x_i (V_max from the position optimisation, eq. 4.4).

Two ways of measuring a set of images, on the same instruments and with the same settling
criterion (``ToneSource``: the source's power within ``eps`` of full scale of its target):

- ``Algorithm3Plan`` (``plan="algorithm3"``), as the thesis writes it: every patch, row by
  row: set the four tones and wait for the source to stabilise (a wait long enough for any
  step, since the algorithm does not know how far the source moved); then for each chain: move
  z to the chain's optimum, select the chain, and measure RF on/off by switching the source's
  inputs off and on (the thesis's differential measurement with its own source; 4.6.2: "the
  spin-diode measurement requires to switch on and off the input, and this is
  time-consuming").
- ``PlannedPlan`` (``plan="planned"``), the measurement plan: (1) never measure what is known:
  an all-zero patch gives 0 V (no RF, nothing to rectify) and a patch already measured in this
  block (the images between two position optimisations) is reused; (2) RF on/off with the
  source-selector switch (port 0: nothing connected), so the source stays settled, and the
  RF-off offset of a chain is measured again only when older than ``offset_reuse_s`` (it
  drifts over minutes); (3) chains whose optimal stage z agree within ``group_um`` share one
  stage position, and the z groups are visited either once per block (a settle per patch per
  group) or at every patch (one settle per patch, a move per group), whichever the measured
  settling time and move time make cheaper; (4) the unique patches are ordered greedily so
  that consecutive ones need small changes of the amplifier voltages, and each change waits
  only as long as the measured settling time constant says that change needs.

What this bench cannot do in parallel: its output switch feeds one chain at a time, so the
nanovoltmeter's second channel has nothing to read at the same time; a bench that splits the
RF to several chains wired to separate channels would allow it (not implemented).

A plan is an object with a ``name`` and ``measure_block`` (:class:`MeasurementPlan`);
``Convolver(plan=...)`` takes one, or a name of :data:`PLANS`.

Every procedure books its lab time (``lab.clock``: the virtual clock or the wall clock) and
instrument operations in a ``Ledger`` by activity. RF is off (amplifiers at 0 V, selector at
port 0) on every exit path.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from calibration.chain import approach_z
from calibration.source import SettledTooFast, SourceCalibration, SourceWiring, _drv, measure_settling
from drivers.nanovoltmeter import differential_measurement
from drivers.rf_switch import SwitchGate

# --------------------------------------------------------------------------- bookkeeping


class Ledger:
    """Lab time and instrument operations per activity.

    Time is exclusive (a nested activity's time is not counted twice), except inside an
    ``absorbing`` activity (the periodic re-optimisation): all of its time, and its
    operations (as "<op> (<activity>)"), are booked to it, so its cost stays separate.
    """

    def __init__(self, now_s: Callable[[], float], absorbing: Sequence[str] = ("re-optimisation",)) -> None:
        self.now_s = now_s
        self.absorbing = tuple(absorbing)
        self.time_s: defaultdict[str, float] = defaultdict(float)
        self.ops: defaultdict[str, int] = defaultdict(int)
        self._stack: list[list[Any]] = []

    def _inside(self) -> str | None:
        return next((f[0] for f in self._stack if f[0] in self.absorbing), None)

    @contextmanager
    def on(self, activity: str) -> Iterator[None]:
        if self._inside() is not None:  # booked to the absorbing activity
            yield
            return
        frame = [activity, self.now_s(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            dt = self.now_s() - frame[1]
            self.time_s[activity] += dt - frame[2]
            if self._stack:
                self._stack[-1][2] += dt

    def count(self, op: str, n: int = 1) -> None:
        inside = self._inside()
        self.ops[op if inside is None else f"{op} ({inside})"] += n

    def snapshot(self) -> dict[str, Any]:
        return {"time_s": dict(self.time_s), "ops": dict(self.ops)}


# --------------------------------------------------------------------------- the source


def on_threshold_v(cal: SourceCalibration, channel: int) -> float:
    """The amplifier voltage where the channel starts to emit (from its calibration sweep)."""
    c = cal.channels[channel]
    p_mw = 10 ** (np.asarray(c.power_dbm) / 10)
    on = np.flatnonzero(p_mw > 10 * p_mw.min())
    return float(c.amplifier_v[on[0]]) if len(on) else float(c.fit_lo_v)


def measure_source_settling(lab: Any, cal: SourceCalibration, channel: int, *, interval_s: float = 0.1,
                            duration_s: float = 6.0, finest_interval_s: float = 1e-3,
                            **kwargs: Any) -> dict[str, Any]:
    """``calibration.source.measure_settling``, sampled 10x faster over a 10x shorter window
    (down to ``finest_interval_s``) for as long as the step settles before it is resolved or
    the fitted time constant spans fewer than three samples (too few points for a good fit).

    The thesis gives no time constant for the source's stabilisation (4.7), so it is not known
    before it is measured: the thesis bench's is ~30 ms (calibrated to 4.7's hour per image),
    a slower source's may be seconds; the analyser takes ~7 ms of lab time per sample."""
    while True:
        finer = interval_s / 10 >= finest_interval_s
        try:
            out = measure_settling(lab, cal, channel, interval_s=interval_s, duration_s=duration_s,
                                   **kwargs)
        except SettledTooFast:
            if not finer:
                raise
        else:
            if not finer or out["tau_s"] >= 3 * float(np.median(np.diff(out["t_s"]))):
                return out
        interval_s, duration_s = interval_s / 10, duration_s / 10


@dataclass
class ToneMap:
    """Input i -> source channel ``channels[i]`` at ``freq_hz[i]``; x = 1 is ``p_x1_mw[i]``
    (before the switches, the reference of the source calibration and of the reference map)."""

    channels: list[int]
    freq_hz: list[float]
    p_x1_mw: list[float]

    @classmethod
    def fit(cls, cal: SourceCalibration, channels: Sequence[int], freq_hz: Sequence[float],
            rescale: Sequence[float], *, margin: float = 0.97) -> ToneMap:
        """The largest P0 with P1_i = P0 rescale_i within every channel's settable range."""
        p_hi = [float(np.polyval(cal.channels[ch].poly_mw, cal.channels[ch].fit_hi_v))
                for ch in channels]
        p0 = margin * min(p / r for p, r in zip(p_hi, rescale, strict=True))
        return cls(list(channels), [float(f) for f in freq_hz], [p0 * float(r) for r in rescale])


class ToneSource:
    """The multi-channel source, set by input values through its calibration, with settling.

    The amplifier of each channel follows its supply through a first-order lag of time
    constant ``tau_s`` (measured: ``calibration.source.measure_settling``). The source tracks
    what it commanded and when, so it knows how far each channel still is from its target;
    ``settle()`` waits until every channel's power is within ``eps`` of its full scale
    (``fixed_wait_s``: wait that long instead, whatever the step). Powers below the lowest
    settable level (the amplifier's threshold jump) are rounded to that level or to off,
    whichever is nearer; ``clipped`` counts them.
    """

    def __init__(self, lab: Any, cal: SourceCalibration, tones: ToneMap, ledger: Ledger, *,
                 tau_s: float, eps: float = 2e-3, wiring: SourceWiring | None = None,
                 fixed_wait_s: float | None = None, tuning_settle_s: float = 30.0) -> None:
        if not tau_s > 0 or not 0 < eps < 1:
            raise ValueError(f"need tau_s > 0 and 0 < eps < 1, got {tau_s!r}, {eps!r}")
        self.lab, self.cal, self.tones, self.ledger = lab, cal, tones, ledger
        self.w = wiring or SourceWiring()
        self.tau_s, self.eps, self.fixed_wait_s = tau_s, eps, fixed_wait_s
        self.tuning_settle_s = tuning_settle_s
        self.tune = _drv(lab, self.w.tuning_role)
        self.amp = _drv(lab, self.w.amplifier_role)
        n = len(tones.channels)
        self.threshold_v = np.array([on_threshold_v(cal, ch) for ch in tones.channels])
        self.p_lo_mw = np.array([float(np.polyval(cal.channels[ch].poly_mw, cal.channels[ch].fit_lo_v))
                                 for ch in tones.channels])
        self.target_v = np.zeros(n)
        self._from_v = np.zeros(n)
        self._since_s = np.zeros(n)
        self.clipped = 0
        self.last_x = np.zeros(n)
        self.started = False

    # ---- encoding

    def encode(self, x: np.ndarray) -> np.ndarray:
        """The x each input will really get (0, or within the settable range)."""
        x = np.clip(np.asarray(x, float), 0.0, 1.0)
        p = x * np.asarray(self.tones.p_x1_mw)
        low = (p > 0) & (p < self.p_lo_mw)
        p = np.where(low, np.where(p >= self.p_lo_mw / 2, self.p_lo_mw, 0.0), p)
        return p / np.asarray(self.tones.p_x1_mw)

    def voltages(self, x: np.ndarray) -> np.ndarray:
        xe = self.encode(x)
        out = np.zeros(len(xe))
        for i, (ch, f, p1) in enumerate(zip(self.tones.channels, self.tones.freq_hz, self.tones.p_x1_mw,
                                            strict=True)):
            if xe[i] > 0:
                out[i] = self.cal.amplifier_for(ch, f, 10 * math.log10(xe[i] * p1))
        return out

    # ---- lag model

    def estimate_v(self, t_s: float) -> np.ndarray:
        return self.target_v + (self._from_v - self.target_v) * np.exp(-(t_s - self._since_s) / self.tau_s)

    def wait_needed_s(self, t_s: float) -> float:
        """Time until every channel's power is within eps of full scale of its target."""
        est = self.estimate_v(t_s)
        worst = 0.0
        for i, ch in enumerate(self.tones.channels):
            gap = abs(est[i] - self.target_v[i])
            if self.target_v[i] == 0.0:  # off: wait until below the threshold (with margin)
                dark_v = 0.95 * self.threshold_v[i]
                need = math.log(est[i] / dark_v) if est[i] > dark_v else 0.0
            else:
                slope = abs(float(np.polyval(np.polyder(self.cal.channels[ch].poly_mw), self.target_v[i])))
                err_mw = max(gap, 1e-12) * max(slope, 1e-9)
                need = math.log(err_mw / (self.eps * self.tones.p_x1_mw[i])) if err_mw > \
                    self.eps * self.tones.p_x1_mw[i] else 0.0
                if est[i] < self.threshold_v[i]:  # still dark: at least until it lights
                    need = max(need, math.log(max(self.target_v[i] - est[i], 1e-12)
                                              / max(self.target_v[i] - self.threshold_v[i], 1e-3)))
            worst = max(worst, need)
        return self.tau_s * worst

    def full_scale_wait_s(self) -> float:
        """The wait for the largest step any patch can ask (0 V to the top of the range)."""
        worst = 0.0
        for i, ch in enumerate(self.tones.channels):
            c = self.cal.channels[ch]
            v_hi = float(self.voltages(np.eye(len(self.target_v))[i])[i])
            slope = abs(float(np.polyval(np.polyder(c.poly_mw), v_hi)))
            worst = max(worst, math.log(v_hi * slope / (self.eps * self.tones.p_x1_mw[i])))
        return self.tau_s * worst

    # ---- commands

    def start(self) -> None:
        """Tuning voltages to the operating frequencies, outputs on, amplifiers at 0 V."""
        with self.ledger.on("source settling"):
            for ch, f in zip(self.tones.channels, self.tones.freq_hz, strict=True):
                self.amp.channel(ch).set_voltage_v(0.0)
                self.amp.channel(ch).set_output(True)
                self.tune.channel(ch).set_voltage_v(self.cal.tuning_for(ch, f))
                self.tune.channel(ch).set_output(True)
                self.ledger.count("supply commands", 4)
            self.lab.sleep(self.tuning_settle_s)
        self._from_v[:] = 0.0
        self.target_v[:] = 0.0
        self.started = True

    def _command(self, volts: np.ndarray) -> None:
        t = self.lab.clock.now_s()
        est = self.estimate_v(t)
        for i, ch in enumerate(self.tones.channels):
            if volts[i] != self.target_v[i]:
                self.amp.channel(ch).set_voltage_v(float(volts[i]))
                self.ledger.count("supply commands")
                self._from_v[i], self._since_s[i] = est[i], t
                self.target_v[i] = volts[i]

    def settle(self) -> None:
        with self.ledger.on("source settling"):
            wait = self.fixed_wait_s if self.fixed_wait_s is not None else \
                self.wait_needed_s(self.lab.clock.now_s())
            if wait > 0:
                self.lab.sleep(wait)
                self.ledger.count("settling waits")

    def apply(self, x: np.ndarray) -> None:
        """Set the tones for inputs ``x`` and wait until they are stable."""
        xe = self.encode(x)
        self.clipped += int(np.sum((np.asarray(x) > 0) & (np.abs(xe - np.asarray(x)) > 1e-12)))
        self.last_x = xe
        with self.ledger.on("tone setting"):
            self._command(self.voltages(xe))
        self.settle()

    def off(self) -> None:
        """Every amplifier to 0 V (no RF), waiting until every channel is dark."""
        with self.ledger.on("tone setting"):
            self._command(np.zeros(len(self.target_v)))
        self.settle()

    def shutdown(self) -> None:
        """Amplifiers to 0 V and outputs off, every channel tried (error paths)."""
        for ch in self.tones.channels:
            try:
                self.amp.channel(ch).set_voltage_v(0.0)
                self.amp.channel(ch).set_output(False)
            except Exception:  # keep switching the others off
                continue
        self.target_v[:] = 0.0
        self.started = False


class SourceGate:
    """RF on/off by the source itself: the amplifiers back to the patch, or to 0 V; each
    with its stabilisation (what the thesis's measurement with its own source costs)."""

    def __init__(self, source: ToneSource) -> None:
        self.source = source

    def output_on(self) -> None:
        self.source.apply(self.source.last_x)

    def output_off(self) -> None:
        keep = self.source.last_x
        self.source.off()
        self.source.last_x = keep


# --------------------------------------------------------------------------- chains


@dataclass
class PlacedChain:
    """A fabricated chain in the bench: its switch port, kernel and measured operating point."""

    name: str
    port: int
    weights: list[float]
    stage_z_mm: float
    v_max_v: float
    voltmeter_channel: int = 1


@dataclass
class MacResult:
    """MACs (V / V_max) of every patch of every image, and what it cost."""

    mac: np.ndarray                       # (n_images, n_chains, H, W)
    volts: np.ndarray                     # (n_images, n_chains, H, W), 0 where not measured
    measured: np.ndarray                  # (n_images, H, W) bool: patch measured (not known)
    lab_s_per_image: list[float] = field(default_factory=list)
    ledger: dict[str, Any] = field(default_factory=dict)


def patches_2x2(images: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, H, W, 4): each pixel's 2x2 patch with one zero row/column of padding at
    the bottom/right ("same" size), in the order (0,0), (0,1), (1,0), (1,1)."""
    im = np.asarray(images, float)
    p = np.pad(im, ((0, 0), (0, 1), (0, 1)))
    return np.stack([p[:, :-1, :-1], p[:, :-1, 1:], p[:, 1:, :-1], p[:, 1:, 1:]], axis=-1)


# --------------------------------------------------------------------------- measurement plans


@runtime_checkable
class MeasurementPlan(Protocol):
    """How a :class:`Convolver` measures one block of images (those between two position
    optimisations)."""

    name: str

    def measure_block(self, conv: Convolver, block: range, patches: np.ndarray, volts: np.ndarray,
                      measured: np.ndarray, per_image_s: list[float],
                      done: Callable[[range], None]) -> None:
        """Measure the images ``block`` (indices into ``patches`` (N, H, W, 4)): fill their
        ``volts`` (N, chains, H, W) and ``measured`` (N, H, W), append each image's lab time to
        ``per_image_s`` and call ``done(indices)`` as soon as images are finished."""
        ...


class Algorithm3Plan:
    """Algorithm 3 as the thesis writes it (module doc): image by image, every patch, every
    chain, RF on/off with the source's own inputs after a full-scale settling wait."""

    name = "algorithm3"

    def measure_block(self, conv: Convolver, block: range, patches: np.ndarray, volts: np.ndarray,
                      measured: np.ndarray, per_image_s: list[float],
                      done: Callable[[range], None]) -> None:
        for i in block:
            ti = conv.lab.clock.now_s()
            self.measure_image(conv, patches[i], volts[i], measured[i])
            per_image_s.append(conv.lab.clock.now_s() - ti)
            done(range(i, i + 1))

    def measure_image(self, conv: Convolver, patches: np.ndarray, volts: np.ndarray,
                      measured: np.ndarray) -> None:
        """One image: ``patches`` (H, W, 4), ``volts`` (chains, H, W), ``measured`` (H, W)."""
        gate = SourceGate(conv.source)
        conv.reset_state()
        conv.lab["source_switch"].port = conv.source_port
        fixed, conv.source.fixed_wait_s = conv.source.fixed_wait_s, conv.source.full_scale_wait_s()
        try:
            h, w = patches.shape[:2]
            for g in range(h):
                for hh in range(w):
                    conv.source.apply(patches[g, hh])
                    for c, chain in enumerate(conv.chains):
                        conv._move(chain.stage_z_mm)
                        conv._select(chain.port)
                        volts[c, g, hh] = conv._read(gate, c)
                        conv.ledger.count("chain measurements")
                    measured[g, hh] = True
        finally:
            conv.source.fixed_wait_s = fixed


class PlannedPlan:
    """The measurement plan (module doc): a block at once, known patches skipped, unique ones
    ordered for short settling waits, RF on/off with the selector switch."""

    name = "planned"

    def measure_block(self, conv: Convolver, block: range, patches: np.ndarray, volts: np.ndarray,
                      measured: np.ndarray, per_image_s: list[float],
                      done: Callable[[range], None]) -> None:
        t0 = conv.lab.clock.now_s()
        sl = slice(block.start, block.stop)
        self.measure_images(conv, patches[sl], volts[sl], measured[sl])
        dt = (conv.lab.clock.now_s() - t0) / len(block)
        per_image_s += [dt] * len(block)  # the block's time shared equally
        done(block)

    def measure_images(self, conv: Convolver, patches: np.ndarray, volts: np.ndarray,
                       measured: np.ndarray) -> None:
        """The images of one block: ``patches`` (n, H, W, 4), ``volts`` (n, chains, H, W),
        ``measured`` (n, H, W).

        Chains at different z: either one pass per z group (a settle per patch per group) or
        every group at each patch (one settle per patch, a stage move per group per patch),
        whichever the bench's own timings (settling time constant, mean move time) make
        cheaper.
        """
        source, ledger = conv.source, conv.ledger
        flat = patches.reshape(-1, patches.shape[-1])
        encoded = source.encode(flat)
        source.clipped += int(np.sum((flat > 0) & (np.abs(encoded - flat) > 1e-12)))
        nonzero = encoded.sum(axis=1) > 0
        unique, inverse = np.unique(encoded[nonzero], axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        ledger.count("patches", len(flat))
        ledger.count("patches known zero", int((~nonzero).sum()))
        ledger.count("patches repeated", int(nonzero.sum() - len(unique)))
        v_unique = np.zeros((len(unique), len(conv.chains)))
        gate = SwitchGate(conv.lab["source_switch"], on_port=conv.source_port, off_port=0)
        conv.lab["source_switch"].port = 0
        conv.reset_state()
        groups = conv.z_groups()
        order = conv.order_patches(unique)
        settle_s = 0.5 * source.full_scale_wait_s()  # a typical ordered step (log scale)
        patch_major = len(groups) > 1 and (len(groups) - 1) * settle_s > len(groups) * 2 * conv._move_s()
        ledger.count("blocks patch-major" if patch_major else "blocks group-major")

        def read(c: int) -> float:
            return conv._read_planned(gate, c) if conv.offset_reuse_s > 0 else conv._read(gate, c)

        if patch_major:
            for j in order:
                source.apply(unique[j])
                for g, z in groups:
                    conv._move(z)
                    conv._measure_group(j, g, v_unique, read)
        else:
            for g, z in groups:
                conv._move(z)
                for j in order:
                    source.apply(unique[j])
                    conv._measure_group(j, g, v_unique, read)
        out = np.zeros((len(flat), len(conv.chains)))
        out[np.flatnonzero(nonzero)] = v_unique[inverse]
        n, h, w = patches.shape[:3]
        volts[...] = out.reshape(n, h, w, -1).transpose(0, 3, 1, 2)
        measured[...] = nonzero.reshape(n, h, w)


PLANS: dict[str, type[MeasurementPlan]] = {"planned": PlannedPlan, "algorithm3": Algorithm3Plan}


def make_plan(plan: str | MeasurementPlan) -> MeasurementPlan:
    """``plan`` itself if it is a plan object, else a new plan of that name in :data:`PLANS`."""
    if isinstance(plan, str):
        if plan not in PLANS:
            raise ValueError(f"plan must be one of {', '.join(repr(k) for k in PLANS)} or a "
                             f"MeasurementPlan object, got {plan!r}")
        return PLANS[plan]()
    if not isinstance(plan, MeasurementPlan):
        raise TypeError(f"plan must be a name ({', '.join(PLANS)}) or an object with name and "
                        f"measure_block (MeasurementPlan), got {type(plan).__name__}")
    return plan


class Convolver:
    """Measures the MACs of images on the placed chains with ``plan`` (a
    :class:`MeasurementPlan`, or its name in :data:`PLANS`; see the module doc).

    ``reoptimise(lab, chains, ledger)`` is called before the first image and every ``every``
    images (thesis 4.7: every ten images); it may update the chains' z and V_max.
    """

    def __init__(self, lab: Any, source: ToneSource, chains: list[PlacedChain], ledger: Ledger, *,
                 plan: str | MeasurementPlan = "planned", n_avg: int = 1, every: int = 10,
                 group_um: float = 3.0, offset_reuse_s: float = 30.0,
                 reoptimise: Callable[[Any, list[PlacedChain], Ledger], None] | None = None,
                 source_port: int | None = None, progress: Callable[[int, int], None] | None = None
                 ) -> None:
        self.plan: MeasurementPlan = make_plan(plan)
        self.lab, self.source, self.chains, self.ledger = lab, source, chains, ledger
        self.n_avg, self.every, self.group_um = n_avg, every, group_um
        self.offset_reuse_s = offset_reuse_s
        self._offset: dict[int, tuple[float, float]] = {}  # chain -> (lab time, RF-off volts)
        self._gate_on = False
        self._port: int | None = None
        self._nvm_channel: int | None = None
        self.reoptimise = reoptimise
        self.source_port = source.w.vco_source_port if source_port is None else source_port
        self.progress = progress

    # ---- instruments

    def _move(self, z_mm: float) -> None:
        with self.ledger.on("stage moves"):
            approach_z(self.lab["stage.z"], z_mm)
            self.ledger.count("stage moves")

    def _select(self, port: int) -> None:
        if port == self._port:
            return
        with self.ledger.on("switching"):
            self.lab["switch"].port = port
            self._port = port
            self.ledger.count("switch changes")

    def _channel(self, chain: int) -> None:
        """The voltmeter channel the chain's DC port is wired to."""
        ch = self.chains[chain].voltmeter_channel
        if ch != self._nvm_channel:
            with self.ledger.on("switching"):
                self.lab["voltmeter"].channel = ch
                self._nvm_channel = ch
                self.ledger.count("voltmeter channel changes")

    def reset_state(self) -> None:
        """Forget what the switches are known to be set to (someone else used them)."""
        self._port = self._nvm_channel = None
        self._gate_on = False

    def _read_planned(self, gate: SwitchGate, chain: int) -> float:
        """RF-on reading(s) minus the chain's RF-off offset; the offset (thermal EMFs, drifting
        over minutes, ``K2182A`` doc) is measured again only when older than
        ``offset_reuse_s``: between patches the selector stays on and only the source moves.
        RF stays on between readings; ``run`` switches it off on every exit path."""
        nvm = self.lab["voltmeter"]
        self._channel(chain)
        with self.ledger.on("voltmeter readings"):
            if not self._gate_on:
                gate.output_on()
                self._gate_on = True
                self.ledger.count("rf gate changes")
            on = [nvm.read_voltage_v() for _ in range(self.n_avg)]
            self.ledger.count("voltmeter readings", self.n_avg)
            last = self._offset.get(chain)
            now = self.lab.clock.now_s()
            if last is None or now - last[0] > self.offset_reuse_s:
                gate.output_off()
                self._gate_on = False
                off = [nvm.read_voltage_v() for _ in range(self.n_avg)]
                self.ledger.count("voltmeter readings", self.n_avg)
                self.ledger.count("rf gate changes")
                last = self._offset[chain] = (self.lab.clock.now_s(), float(np.mean(off)))
        return float(np.mean(on)) - last[1]

    def _read(self, gate: Any, chain: int) -> float:
        self._channel(chain)
        with self.ledger.on("voltmeter readings"):
            r = differential_measurement(gate, self.lab["voltmeter"], self.n_avg, sleep=self.lab.sleep)
            self.ledger.count("voltmeter readings", 2 * self.n_avg)
            self.ledger.count("rf gate changes", 2 * self.n_avg)
        return r.mean_v

    # ---- running a plan

    def run(self, images: np.ndarray,
            on_done: Callable[[range, np.ndarray, np.ndarray], None] | None = None) -> MacResult:
        """``images``: (N, H, W) input values in [0, 1]. Each image's MACs use the V_max of the
        optimisation before it. ``on_done(indices, mac, volts)`` is called as soon as images
        are finished (as the plan finishes them: after each block for the measurement plan,
        each image for Algorithm 3), so a caller can save them before the run ends."""
        images = np.asarray(images, float)
        n, h, w = images.shape
        k = len(self.chains)
        volts = np.zeros((n, k, h, w))
        mac = np.zeros((n, k, h, w))
        measured = np.zeros((n, h, w), bool)
        per_image: list[float] = []
        patches = patches_2x2(images)

        def done(idx: range) -> None:
            sl = slice(idx.start, idx.stop)
            v_max = np.array([c.v_max_v for c in self.chains])
            mac[sl] = volts[sl] / v_max[None, :, None, None]
            if on_done is not None:
                on_done(idx, mac[sl], volts[sl])
            self._tick(idx.stop, n)

        try:
            self.source.start()
            for b0 in range(0, n, self.every):
                if self.reoptimise is not None:
                    with self.ledger.on("re-optimisation"):
                        self.reoptimise(self.lab, self.chains, self.ledger)
                block = range(b0, min(n, b0 + self.every))
                self.plan.measure_block(self, block, patches, volts, measured, per_image, done)
        finally:
            self.source.shutdown()
            self.lab["source_switch"].port = 0
        return MacResult(mac, volts, measured, per_image, self.ledger.snapshot())

    def _tick(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)

    def groups(self) -> list[list[int]]:
        """Chains whose optimal z agree within ``group_um``: measured at one stage position."""
        order = sorted(range(len(self.chains)), key=lambda c: self.chains[c].stage_z_mm)
        groups: list[list[int]] = []
        for c in order:
            if groups and 1e3 * (self.chains[c].stage_z_mm - self.chains[groups[-1][0]].stage_z_mm) \
                    <= self.group_um:
                groups[-1].append(c)
            else:
                groups.append([c])
        return groups

    def z_groups(self) -> list[tuple[list[int], float]]:
        """``groups()`` with the stage z each is measured at (the mean of its chains' optima)."""
        return [(g, float(np.mean([self.chains[c].stage_z_mm for c in g]))) for g in self.groups()]

    def _measure_group(self, j: int, group: list[int], out: np.ndarray, read: Callable[[int], float],
                       count: bool = True) -> None:
        """Read every chain of a z group for patch ``j`` (the source already set). Chains fed
        through one port (a splitter) are read on their voltmeter channels during the same
        RF-on period."""
        for c in sorted(group, key=lambda c: (self.chains[c].port, self.chains[c].voltmeter_channel)):
            self._select(self.chains[c].port)
            out[j, c] = read(c)
            if count:
                self.ledger.count("chain measurements")

    def order_patches(self, unique: np.ndarray) -> list[int]:
        """Greedy nearest neighbour in amplifier voltages (largest channel change), from the
        source's present state: consecutive patches need small changes, so short waits."""
        volts = np.array([self.source.voltages(u) for u in unique])
        left = list(range(len(unique)))
        cur = self.source.target_v.copy()
        out = []
        while left:
            d = np.max(np.abs(volts[left] - cur), axis=1)
            j = left.pop(int(np.argmin(d)))
            out.append(j)
            cur = volts[j]
        return out

    def _move_s(self) -> float:
        """Mean lab time of a stage move so far (0.5 s before the first)."""
        n = self.ledger.ops.get("stage moves", 0)
        return self.ledger.time_s.get("stage moves", 0.0) / n if n else 0.5


def fit_v_max(conv: Convolver, patches: np.ndarray) -> dict[str, float]:
    """V_max of every chain (eq. 4.4's least-squares scale) from representative multi-tone
    patches sent with the source the images use, so that its calibration error and the final
    amplifier's compression with several tones on are in V_max, as in Algorithm 2 (thesis:
    100 sets of four inputs representative of the dataset). Measured patch by patch, each
    chain at its own z (RF on/off with the selector switch). Updates the chains."""
    lab, source, ledger = conv.lab, conv.source, conv.ledger
    if not source.started:
        raise RuntimeError("fit_v_max: start the source first (ToneSource.start; Convolver.run does it "
                           "before calling reoptimise)")
    gate = SwitchGate(lab["source_switch"], on_port=conv.source_port, off_port=0)
    encoded = source.encode(np.atleast_2d(patches))
    encoded = encoded[encoded.sum(axis=1) > 0]
    if len(encoded) < 2:
        raise ValueError("fit_v_max needs at least two non-zero patches")
    volts = np.zeros((len(encoded), len(conv.chains)))
    lab["source_switch"].port = 0
    conv.reset_state()
    groups = conv.z_groups()
    for j in conv.order_patches(encoded):
        source.apply(encoded[j])
        for g, z in groups:
            conv._move(z)
            conv._measure_group(j, g, volts, lambda c: conv._read(gate, c), count=False)
    out = {}
    for c, chain in enumerate(conv.chains):
        s = encoded @ np.asarray(chain.weights, float)
        v_max = float(volts[:, c] @ s / (s @ s))
        if v_max <= 0:
            raise RuntimeError(f"{chain.name}: the chain answers with the wrong sign (V_max {v_max:.3g} V); "
                               f"is it placed and connected to switch port {chain.port}?")
        chain.v_max_v = v_max
        out[chain.name] = v_max
    ledger.count("v_max fits")
    return out
