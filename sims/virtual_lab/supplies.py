"""DC supplies: R&S HMP4040 (the VCO source's tuning and amplifier supplies) and Keithley 2400.

``Hmp4040Model``: four channels, each a voltage setpoint, a current limit, an OVP level and an
output state; ``INSTrument:NSELect`` picks the channel the next commands act on.
``OUTPut[:STATe] ON`` activates the selected channel and switches the general output on (HMP
manual); ``OUTPut:GENeral OFF`` switches every channel's output off. A channel drives the load
wired to it in the world (a VCO tuning port, an amplifier supply): constant voltage while the
load draws less than the current limit, constant current above it; a setpoint above the OVP
level trips the channel off. Loads are told every change of their voltage.

``K2400Model``: a voltage source with current compliance driving the world's load on it (a
current line over a device, thesis 2.7.2, or nothing: open circuit). ``READ?`` with the output
off queues error 803 and answers nothing, as the SourceMeter does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sims.virtual_lab.scpi import ScpiError, ScpiModel, parse_bool, parse_number

if TYPE_CHECKING:
    from sims.virtual_lab.world import World

LoadCallback = Callable[[float, float], None]


class Hmp4040Model(ScpiModel):
    MODEL = "rs_hmp4040"
    IDN = "ROHDE&SCHWARZ,HMP4040,{serial},HW50020001/SW2.62"
    CHANNELS = (1, 2, 3, 4)

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        self.loads: dict[int, tuple[float, list[LoadCallback]]] = {}
        super().__init__(world, name, spec)
        self.noise = self.rng("noise")
        self.reset()
        self.route("INSTrument:NSELect", self._nselect)
        self.route("INSTrument[:SELect]", self._select)
        self.route("[SOURce]:VOLTage:PROTection[:LEVel]", self._ovp)
        self.route("[SOURce]:VOLTage[:LEVel][:IMMediate][:AMPLitude]", self._voltage)
        self.route("[SOURce]:CURRent[:LEVel][:IMMediate][:AMPLitude]", self._current)
        self.route("OUTPut:GENeral", self._general)
        self.route("OUTPut:SELect", self._output_select)
        self.route("OUTPut[:STATe]", self._output)
        self.route("MEASure[:SCALar]:VOLTage[:DC]", lambda a, q, g: self._measure(q, 0))
        self.route("MEASure[:SCALar]:CURRent[:DC]", lambda a, q, g: self._measure(q, 1))

    def reset(self) -> None:
        self.selected = 1
        self.general = False
        self.ch = {c: {"volt": 0.0, "curr": float(self.spec["power_on_current_a"]),
                       "ovp": 32.5, "active": False} for c in self.CHANNELS}
        self._notify_all()

    # ---- loads

    def connect_load(self, channel: int, ohm: float, callback: LoadCallback | None = None) -> None:
        _, callbacks = self.loads.get(channel, (ohm, []))
        if callback is not None:
            callbacks.append(callback)
        self.loads[channel] = (ohm, callbacks)
        if callback is not None:
            callback(self.clock.now_s(), self.output_v(channel))

    def output_v(self, channel: int) -> float:
        """Voltage at the channel's terminals (0 when off; lower in constant current)."""
        c = self.ch[channel]
        if not (c["active"] and self.general):
            return 0.0
        ohm = self.loads.get(channel, (float("inf"), []))[0]
        return min(c["volt"], c["curr"] * ohm)

    def output_a(self, channel: int) -> float:
        ohm = self.loads.get(channel, (float("inf"), []))[0]
        return self.output_v(channel) / ohm

    def _notify_all(self) -> None:
        t = self.clock.now_s()
        for channel, (_, callbacks) in self.loads.items():
            for callback in callbacks:
                callback(t, self.output_v(channel))

    # ---- commands

    def _nselect(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            value = self.number_in(text, 1, 4)
            if value != int(value):
                raise ScpiError(-224, "Illegal parameter value")
            self.selected = int(value)
        return self.setting(args, query, lambda: str(self.selected), put)

    def _select(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            word = text.strip().upper()
            if word not in ("OUT1", "OUT2", "OUT3", "OUT4", "OUTP1", "OUTP2", "OUTP3", "OUTP4"):
                raise ScpiError(-224, "Illegal parameter value")
            self.selected = int(word[-1])
        return self.setting(args, query, lambda: f"OUTP{self.selected}", put)

    def _ovp(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        c = self.ch[self.selected]

        def put(text: str) -> None:
            c["ovp"] = self.number_in(text, 0.0, 33.0)
            self._check_ovp(self.selected)
        return self.setting(args, query, lambda: f"{c['ovp']:.3f}", put)

    def _voltage(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        c = self.ch[self.selected]

        def put(text: str) -> None:
            c["volt"] = round(self.number_in(text, 0.0, 32.05), 3)
            self._check_ovp(self.selected)
            self._notify_all()
        return self.setting(args, query, lambda: f"{c['volt']:.3f}", put)

    def _current(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        c = self.ch[self.selected]

        def put(text: str) -> None:
            c["curr"] = round(self.number_in(text, 0.0, 10.01), 3)
            self._notify_all()
        return self.setting(args, query, lambda: f"{c['curr']:.4f}", put)

    def _check_ovp(self, channel: int) -> None:
        c = self.ch[channel]
        if c["active"] and c["volt"] > c["ovp"]:
            c["active"] = False
            self._notify_all()
            raise ScpiError(-300, f"Device-specific error;OVP tripped on channel {channel}")

    def _general(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            self.general = parse_bool(text)
            self._notify_all()
        return self.setting(args, query, lambda: "1" if self.general else "0", put)

    def _output_select(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        c = self.ch[self.selected]

        def put(text: str) -> None:
            c["active"] = parse_bool(text)
            self._check_ovp(self.selected)
            self._notify_all()
        return self.setting(args, query, lambda: "1" if c["active"] else "0", put)

    def _output(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        c = self.ch[self.selected]

        def put(text: str) -> None:
            c["active"] = parse_bool(text)
            if c["active"]:
                self.general = True
            self._check_ovp(self.selected)
            self._notify_all()
        return self.setting(args, query, lambda: "1" if c["active"] else "0", put)

    def _measure(self, query: bool, which: int) -> str:
        if not query:
            raise ScpiError(-113, "Undefined header")
        self.clock.advance(0.05, f"{self.name}: measurement")
        if which == 0:
            value = self.output_v(self.selected) + self.noise.normal(0, self.spec["meas_noise_v"])
            return f"{max(value, 0.0):.3f}"
        return f"{self.output_a(self.selected):.4f}"

    def truth(self) -> dict[str, Any]:
        return {"loads_ohm": {ch: load[0] for ch, load in self.loads.items()},
                "output_v": {ch: self.output_v(ch) for ch in self.CHANNELS}}


class K2400Model(ScpiModel):
    MODEL = "keithley_2400"
    IDN = "KEITHLEY INSTRUMENTS INC.,MODEL 2400,{serial},C30   Mar 17 2006 09:29:29/A02  /K/J"
    OVP_LEVELS = (20.0, 40.0, 60.0, 80.0, 100.0, 120.0, 160.0)

    def __init__(self, world: World, name: str, spec: dict[str, Any]) -> None:
        self.load_ohm = float("inf")
        super().__init__(world, name, spec)
        self.noise = self.rng("noise")
        self.reset()
        self.route("[SOURce]:FUNCtion[:MODE]", self._function)
        self.route("[SOURce]:VOLTage:MODE", lambda a, q, g: self._word(a, q, ("FIX", "FIXED")))
        self.route("[SOURce]:VOLTage:PROTection[:LEVel]", self._ovp)
        self.route("[SOURce]:VOLTage[:LEVel][:IMMediate][:AMPLitude]", self._level)
        self.route("[SENSe]:FUNCtion[:ON]", lambda a, q, g: '"CURR:DC"' if q else None)
        self.route("[SENSe]:CURRent[:DC]:PROTection[:LEVel]", self._compliance)
        self.route("FORMat:ELEMents[:SENSe]", self._elements)
        self.route("OUTPut[:STATe]", self._output)
        self.route("READ", self._read)

    def reset(self) -> None:
        self.output = False
        self.level_v = 0.0
        self.compliance_a = 105e-6
        self.ovp_v: float | None = None
        self.elements = ["VOLT", "CURR", "RES", "TIME", "STAT"]

    def connect_load(self, ohm: float) -> None:
        self.load_ohm = ohm

    def _word(self, args: str, query: bool, allowed: tuple[str, ...]) -> str | None:
        if query:
            return allowed[0]
        if args.strip().upper() not in allowed:
            raise ScpiError(-224, "Illegal parameter value")
        return None

    def _function(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        return self._word(args, query, ("VOLT", "VOLTAGE"))

    def _ovp(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            if text.strip().upper() == "NONE":
                self.ovp_v = None
                return
            value = parse_number(text)
            level = next((lv for lv in self.OVP_LEVELS if lv >= value), None)
            if level is None:
                raise ScpiError(-222, "Data out of range")
            self.ovp_v = level
        return self.setting(args, query, lambda: f"{self.ovp_v or 210.0:+.6E}", put)

    def _level(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        lo, hi = self.spec["voltage_range_v"]

        def put(text: str) -> None:
            value = self.number_in(text, lo, hi)
            if self.ovp_v is not None and abs(value) > self.ovp_v:
                raise ScpiError(-221, "Settings conflict")
            self.level_v = value
        return self.setting(args, query, lambda: f"{self.level_v:+.6E}", put)

    def _compliance(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            self.compliance_a = self.number_in(text, 0.0, 1.05)
        return self.setting(args, query, lambda: f"{self.compliance_a:+.6E}", put)

    def _elements(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            words = [w.strip().upper()[:4] for w in text.split(",")]
            if not words or not set(words) <= {"VOLT", "CURR", "RES", "TIME", "STAT"}:
                raise ScpiError(-224, "Illegal parameter value")
            self.elements = words
        return self.setting(args, query, lambda: ",".join(self.elements), put)

    def _output(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        def put(text: str) -> None:
            self.output = parse_bool(text)
        return self.setting(args, query, lambda: "1" if self.output else "0", put)

    def output_a(self) -> float:
        """Current into the load (compliance-limited); 0 with the output off."""
        if not self.output:
            return 0.0
        current = self.level_v / self.load_ohm
        return max(-self.compliance_a, min(self.compliance_a, current))

    def _read(self, args: str, query: bool, groups: tuple[str, ...]) -> str | None:
        if not query:
            raise ScpiError(-113, "Undefined header")
        if not self.output:
            raise ScpiError(803, "Output disabled")
        spec = self.spec
        self.clock.advance(2 * spec["nplc"] / spec["line_freq_hz"] + 0.005,
                           f"{self.name}: integration")
        current = self.output_a()
        in_compliance = abs(self.level_v) > self.compliance_a * self.load_ohm
        volt = current * self.load_ohm if in_compliance else self.level_v
        values = {"VOLT": volt, "CURR": current + self.noise.normal(0, spec["noise_a"]),
                  "RES": 9.91e37, "TIME": self.clock.now_s(), "STAT": 0.0}
        return ",".join(f"{values[e]:+.6E}" for e in self.elements)

    def truth(self) -> dict[str, Any]:
        return {"load_ohm": self.load_ohm, "output_a": self.output_a()}


class K2401Model(K2400Model):
    MODEL = "keithley_2401"
    IDN = "KEITHLEY INSTRUMENTS INC.,MODEL 2401,{serial},C30   Mar 17 2006 09:29:29/A02  /K/J"
