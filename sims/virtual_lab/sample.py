"""The fabricated sample in the magnet gap: drawn once, then drifting; its rectified voltages.

Geometry (the frame of ``sims.spindiode``): the chip lies in the film plane yz. Chip
coordinates are ``u`` (horizontal, along lab y) and ``v`` (along the gradient axis lab z), in
um, measured from the chip origin. The chip origin sits at the design placement plus the glue
error plus what the stages add (``pose``); the chip can be rotated in its plane by ``theta``
(glue error), and the magnet array can be rotated about the vertical z axis by ``phi`` (the
rotation stage, thesis 4.4).

Fabrication draws (seeded; every value recorded in ``truth()``, thesis 3.4.4, 3.6):
diode width (lithography at its resolution limit), contact resistance, the position error of
every diode, a small spread of M_eff and of the eq. 2.11 phase, and per device the wire-bond
inductance and pad capacitance. Gluing draws the chip's placement (~1 mm) and in-plane
rotation.

Width, contact, M_eff and phase errors have a part shared by the diodes of one synapse
(``*_pair_sigma*``: the two diodes sit 40 um apart, exposed, developed and contacted together,
so dose, focus, film and interface are common) and a smaller independent part (``*_sigma*``).
The shared part spreads devices (pairs of 45-65 Ohm, thesis 3.4.4; chains' weights off by a
few %, thesis 3.6) without unbalancing a synapse; only the independent part leaves a residual at dz = 0, which
the thesis finds "negligible" (2.7.3, Fig. 2.14b). Positions likewise: a synapse moves by
~2 um (``position_pair_sigma_um``, the lithography's resolution, thesis 3.4.2), while its
two diodes, drawn in one mask layer, keep their spacing to a fraction of a micrometre
(``position_sigma_um``; thesis 3.6: dz errors are "in proportion, much smaller than width
imprecision"). For a device of single diodes (the reference pairs) the whole device shares
the common part.

Drift (thesis 4.7): the chip's position diffuses (a random walk of a few um per sqrt(hour),
drawn every ``step_s`` and interpolated in between: creep, smooth over minutes), every stage
move kicks it a little (cable rigidity, plastic screws), and contact resistances diffuse
(oxidation, heating). They are a function of lab time only (held for ``hold_s``).

A synapse's two diodes sit side by side (``pair_spacing_um`` apart in u): the one with the
reference sign at ``v - dz/2``, the opposite one at ``v + dz/2``. In a field rising with v
this makes ``dz > 0`` a positive peak (thesis 2.7.3 / eq. 3.2 read as a difference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from sims.spindiode import (
    MagnetArray,
    SpinDiodeMaterial,
    bond_transmission,
    chain_network,
    db_to_ratio,
    kittel_frequency_hz,
    rectified_voltage_v,
)
from sims.virtual_lab.drift import GridProcess

#: resonance step for the derivative of the emf in the heating shift (Hz; the response is
#: smooth on the linewidth's ~100 MHz scale)
SHIFT_STEP_HZ = 1.0e5


@dataclass
class Device:
    """One device (a single diode, a synapse, a chain) on its own RF line and DC port."""

    name: str
    index: np.ndarray          # indices into the sample's diode arrays
    block: np.ndarray          # block of each diode (blocks in series)
    element: np.ndarray        # synapse/diode element each diode belongs to
    kind: str                  # "synapses" or "diodes"
    bond_h: float
    pad_f: float
    ripple_phase_rad: float
    voltmeter: str | None
    channel: int
    current_line: dict[str, Any] | None


@dataclass(frozen=True)
class Pose:
    """Chip origin relative to the magnet centre (mm), chip rotation and array rotation (rad)."""

    x_mm: float
    y_mm: float
    z_mm: float
    theta_rad: float
    phi_rad: float


class Sample:
    """Fabricated devices, their placement and drift, and the physics that makes them rectify."""

    def __init__(self, cfg: dict[str, Any], material: SpinDiodeMaterial, magnets: MagnetArray,
                 rng_fab: np.random.Generator, rng_drift: np.random.Generator,
                 rng_kick: np.random.Generator) -> None:
        self.material = material
        self.magnets = magnets
        fab = cfg["fabrication"]
        self.fab = fab
        self.holder = cfg["holder"]
        sample = cfg["sample"]
        self.design_placement_mm = np.array([sample["placement_mm"][k] for k in "xyz"], float)
        self.design_rotation_deg = float(sample["rotation_deg"])
        self.rng_kick = rng_kick
        self.drift_cfg = cfg["drift"]

        u, v, sign, devices = [], [], [], {}
        group: list[tuple[str, int]] = []  # diodes that share fabrication errors (module doc)
        for name, dev in sample["devices"].items():
            ou, ov = (float(x) for x in dev["origin_um"])
            start = len(u)
            element = []
            if dev["synapses"] is not None:
                half = dev["pair_spacing_um"] / 2.0
                for i, syn in enumerate(dev["synapses"]):
                    su = ou + float(syn.get("u_um", 0.0))
                    sv = ov + float(syn["v_um"])
                    dz = float(syn.get("dz_um", 0.0))
                    u += [su - half, su + half]
                    v += [sv - dz / 2.0, sv + dz / 2.0]
                    sign += [1.0, -1.0]
                    element += [i, i]
                    group += [(name, i), (name, i)]
            else:
                for i, d in enumerate(dev["diodes"]):
                    u.append(ou + float(d.get("u_um", 0.0)))
                    v.append(ov + float(d["v_um"]))
                    sign.append(float(d.get("sign", 1)))
                    element.append(i)
                    group.append((name, -1))
            element_arr = np.array(element, int)
            block_of_element = {e: b for b, block in enumerate(dev["blocks"]) for e in block}
            devices[name] = Device(
                name=name, index=np.arange(start, len(u)),
                block=np.array([block_of_element[e] for e in element], int),
                element=element_arr, kind="synapses" if dev["synapses"] is not None else "diodes",
                bond_h=0.0, pad_f=0.0, ripple_phase_rad=0.0, voltmeter=dev["voltmeter"],
                channel=int(dev["voltmeter_channel"]), current_line=dev["current_line"])
        n = len(u)
        self.devices = devices
        self.design_u_um = np.array(u, float)
        self.design_v_um = np.array(v, float)
        self.sign = np.array(sign, float)

        # ---- fabrication (one stream, drawn in a fixed order)
        r = rng_fab
        width_raw = fab["diode_width_um"] + r.normal(0, fab["width_sigma_um"], n)
        contact_raw = fab["contact_ohm"] + r.normal(0, fab["contact_sigma_ohm"], n)
        self.u_um = self.design_u_um + r.normal(0, fab["position_sigma_um"], n)
        self.v_um = self.design_v_um + r.normal(0, fab["position_sigma_um"], n)
        meff_raw = r.normal(0, fab["meff_sigma_frac"], n)
        phase_raw = r.normal(0, fab["phase_sigma_deg"], n)
        self.nominal_film_ohm = (fab["sheet_resistance_ohm_sq"] * fab["diode_length_um"]
                                 / fab["diode_width_um"])
        self.nominal_ohm = self.nominal_film_ohm + fab["contact_ohm"]
        for dev in devices.values():
            dev.bond_h = 1e-9 * fab["wire_bond_nh"] * max(
                1 + r.normal(0, fab["wire_bond_sigma_frac"]), 0.05)
            dev.pad_f = 1e-12 * fab["pad_capacitance_pf"] * max(
                1 + r.normal(0, fab["pad_capacitance_sigma_frac"]), 0.05)
            dev.ripple_phase_rad = float(r.uniform(0, 2 * math.pi))
        sig = fab["placement_sigma_mm"]
        self.placement_error_mm = np.array([r.normal(0, sig[k]) for k in "xyz"])
        self.rotation_error_deg = float(r.normal(0, fab["placement_rotation_sigma_deg"]))
        # the part shared by a synapse's two diodes (module doc), drawn last so the draws
        # above keep their order
        groups = {g: i for i, g in enumerate(dict.fromkeys(group))}
        gi = np.array([groups[g] for g in group], int)
        width_common = r.normal(0, fab["width_pair_sigma_um"], len(groups))
        contact_common = r.normal(0, fab["contact_pair_sigma_ohm"], len(groups))
        shift_common = r.normal(0, fab["position_pair_sigma_um"], (2, len(groups)))
        self.u_um = self.u_um + shift_common[0][gi]
        self.v_um = self.v_um + shift_common[1][gi]
        meff_common = r.normal(0, fab["meff_pair_sigma_frac"], len(groups))
        phase_common = r.normal(0, fab["phase_pair_sigma_deg"], len(groups))
        self.width_um = np.maximum(width_raw + width_common[gi], 0.2 * fab["diode_width_um"])
        self.contact_ohm = np.abs(contact_raw + contact_common[gi])
        self.meff_oe = material.meff_oe * (1 + meff_raw + meff_common[gi])
        self.phase_deg = material.phase_deg + phase_raw + phase_common[gi]
        self.film_ohm = fab["sheet_resistance_ohm_sq"] * fab["diode_length_um"] / self.width_um

        # ---- drift
        d = self.drift_cfg
        per_sqrt_s = 1.0 / math.sqrt(3600.0)
        self.position_drift = GridProcess(rng_drift, 3, d["step_s"], sigma_per_sqrt_s=1e-3
                                          * d["position_um_per_sqrt_h"] * per_sqrt_s,
                                          hold_s=d["hold_s"])
        self.contact_drift = GridProcess(rng_drift, max(n, 1), d["step_s"],
                                         sigma_per_sqrt_s=d["contact_frac_per_sqrt_h"]
                                         * per_sqrt_s, hold_s=d["hold_s"])
        self.kick_mm = np.zeros(3)
        self._cache: dict[str, tuple[Any, Any]] = {}
        self._responses: dict[str, tuple[Any, tuple[np.ndarray, ...]]] = {}

    # ---- pose and drift

    def kick(self, distance: float) -> None:
        """A stage moved by ``distance`` (its unit): the chip shifts a little (thesis 4.7)."""
        d = self.drift_cfg
        sigma_mm = 1e-3 * (d["move_kick_um"] + d["move_kick_frac"] * abs(distance) * 1e3)
        self.kick_mm = self.kick_mm + self.rng_kick.normal(0, sigma_mm, 3)

    def pose(self, stage_offsets: dict[str, float], t_s: float) -> Pose:
        """Where the chip is at ``t_s`` given what the stages add to its design placement."""
        xyz = (self.design_placement_mm + self.placement_error_mm
               + np.array([stage_offsets.get(k, 0.0) for k in "xyz"])
               + self.position_drift.value(t_s) + self.kick_mm)
        theta = math.radians(self.design_rotation_deg + self.rotation_error_deg)
        phi = math.radians(stage_offsets.get("rotation", 0.0))
        return Pose(float(xyz[0]), float(xyz[1]), float(xyz[2]), theta, phi)

    def diode_positions_mm(self, pose: Pose, index: np.ndarray) -> tuple[np.ndarray, ...]:
        """Lab (x, y, z) of the diodes ``index``: chip (u, v) rotated by theta, then placed."""
        u, v = 1e-3 * self.u_um[index], 1e-3 * self.v_um[index]
        ct, st = math.cos(pose.theta_rad), math.sin(pose.theta_rad)
        y = pose.y_mm + u * ct - v * st
        z = pose.z_mm + u * st + v * ct
        return np.full_like(y, pose.x_mm), y, z

    def fields(self, pose: Pose, index: np.ndarray,
               extra_hz_oe: float = 0.0) -> tuple[np.ndarray, ...]:
        """(H_x, H_y, H_z) on the diodes in the chip frame (magnet array rotated by phi)."""
        x, y, z = self.diode_positions_mm(pose, index)
        cp, sp = math.cos(pose.phi_rad), math.sin(pose.phi_rad)
        hxm, hym, hz = self.magnets.field_oe(x * cp + y * sp, -x * sp + y * cp, z)
        hx = hxm * cp - hym * sp
        hy = hxm * sp + hym * cp
        return hx, hy, hz + extra_hz_oe

    def in_plane(self, pose: Pose, index: np.ndarray,
                 extra_hz_oe: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(in-plane field magnitude, sin(2 Phi_0)) per diode.

        The magnetisation follows the in-plane field (no anisotropy, thesis 2.6.2); the current
        runs at +-45 degrees to the chip's v axis (thesis 2.5.1), so
        ``sin(2 Phi_0) = sign cos(2 (psi + theta))`` with ``psi`` the field's angle from z.
        The out-of-plane H_x changes the resonance only at order H_x^2 / M_eff and is left out.
        """
        _, hy, hz = self.fields(pose, index, extra_hz_oe)
        psi = np.arctan2(hy, hz)
        return np.hypot(hy, hz), self.sign[index] * np.cos(2 * (psi + pose.theta_rad))

    def resistance_ohm(self, t_s: float) -> np.ndarray:
        return self.film_ohm + self.contact_ohm * np.exp(self.contact_drift.value(t_s)[:len(
            self.film_ohm)])

    # ---- the rectified voltage of a device

    def holder_ratio(self, dev: Device, freq_hz: np.ndarray) -> np.ndarray:
        """Power ratio of the RF line to the device: attenuator, sqrt(f) loss and a ripple."""
        h = self.holder
        loss_db = (h["attenuator_db"] + h["loss_db_at_1ghz"] * np.sqrt(freq_hz / 1e9)
                   + h["ripple_db"] * np.sin(2 * np.pi * freq_hz / h["ripple_period_hz"]
                                             + dev.ripple_phase_rad))
        return db_to_ratio(loss_db)

    def _state(self, dev: Device, pose: Pose, t_s: float, line_oe: float) -> tuple[Any, ...]:
        key = (pose, self.contact_drift.index(t_s), line_oe)
        cached = self._cache.get(dev.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        idx = dev.index
        h_ip, s2 = self.in_plane(pose, idx, line_oe)
        r = self.resistance_ohm(t_s)[idx]
        r_chain, frac, weight = chain_network(r, dev.block)
        drive = ((self.film_ohm[idx] / r) / (self.nominal_film_ohm / self.nominal_ohm)
                 * (self.fab["diode_width_um"] / self.width_um[idx]))
        state = (h_ip, s2, r_chain, frac, weight, drive)
        self._cache[dev.name] = (key, state)
        return state

    def _response_parts(self, dev: Device, freq_hz: np.ndarray, pose: Pose, t_s: float,
                        line_oe: float) -> tuple[np.ndarray, ...]:
        """Per tone and diode: (emf per W on the line, its derivative in the resonance shift per
        Hz, W dissipated per W on the line) and the DC weight of each diode. Cached."""
        key = (pose, self.contact_drift.index(t_s), line_oe, freq_hz.tobytes())
        cached = self._responses.get(dev.name)
        if cached is not None and cached[0] == key:
            return cached[1]
        h_ip, s2, r_chain, frac, weight, drive = self._state(dev, pose, t_s, line_oe)
        idx = dev.index
        f = freq_hz[:, None]
        per_w = (self.holder_ratio(dev, freq_hz)
                 * bond_transmission(freq_hz, r_chain, dev.bond_h, dev.pad_f))
        dissipated = per_w[:, None] * frac[None, :]
        kw = dict(sin2phi0=s2[None, :], phase_deg=self.phase_deg[idx][None, :],
                  meff_oe=self.meff_oe[idx][None, :], drive_scale=drive[None, :],
                  material=self.material)
        emf = np.asarray(rectified_voltage_v(f, h_ip[None, :], dissipated, **kw))
        if self.material.power_shift_hz_per_w:
            shifted = np.asarray(rectified_voltage_v(f, h_ip[None, :], dissipated,
                                                     resonance_shift_hz=SHIFT_STEP_HZ, **kw))
            slope = (shifted - emf) / SHIFT_STEP_HZ
        else:
            slope = np.zeros_like(emf)
        parts = (emf, slope, dissipated, weight)
        self._responses[dev.name] = (key, parts)
        return parts

    def response_v_per_w(self, dev: Device, freq_hz: np.ndarray, pose: Pose, t_s: float,
                         line_oe: float = 0.0) -> np.ndarray:
        """DC voltage per watt of each tone arriving on the device's line, in the small-power
        limit (no heating shift): eq. 2.11 is linear in power."""
        emf, _, _, weight = self._response_parts(dev, np.asarray(freq_hz, float), pose, t_s,
                                                 line_oe)
        return np.asarray(emf @ weight, float)

    def device_voltage_v(self, dev: Device, freq_hz: np.ndarray, power_w: np.ndarray,
                         pose: Pose, t_s: float, line_oe: float = 0.0) -> float:
        """DC voltage at the device's port for tones ``(freq_hz, power_w)`` arriving on its line.

        Tones add (thesis 3.4.1): each is rectified independently and the emfs sum. The one
        exception is heating (thesis 2.7.1): every diode's resonance moves by
        ``power_shift_hz_per_w`` times the power it dissipates from all tones together
        (first order in the shift, which stays far below the linewidth).
        """
        if len(freq_hz) == 0:
            return 0.0
        f = np.asarray(freq_hz, float)
        p = np.asarray(power_w, float)
        emf, slope, dissipated, weight = self._response_parts(dev, f, pose, t_s, line_oe)
        shift_hz = self.material.power_shift_hz_per_w * (p @ dissipated)
        return float((p @ emf + (p @ slope) * shift_hz) @ weight)

    # ---- truth

    def truth(self, pose: Pose, t_s: float, line_oe: dict[str, float]) -> dict[str, Any]:
        """Everything drawn, and the present state (fields and resonances at this pose)."""
        r_now = self.resistance_ohm(t_s)
        devices = {}
        for name, dev in self.devices.items():
            idx = dev.index
            extra = line_oe.get(name, 0.0)
            hx, hy, hz = self.fields(pose, idx, extra)
            h_ip, s2 = self.in_plane(pose, idx, extra)
            r_chain, _, _ = chain_network(r_now[idx], dev.block)
            x, y, z = self.diode_positions_mm(pose, idx)
            diodes = []
            for j, k in enumerate(idx):
                diodes.append({
                    "element": int(dev.element[j]), "block": int(dev.block[j]),
                    "sign": int(self.sign[k]),
                    "design_u_um": float(self.design_u_um[k]),
                    "design_v_um": float(self.design_v_um[k]),
                    "u_um": float(self.u_um[k]), "v_um": float(self.v_um[k]),
                    "width_um": float(self.width_um[k]),
                    "contact_ohm_fabricated": float(self.contact_ohm[k]),
                    "resistance_ohm": float(r_now[k]), "film_ohm": float(self.film_ohm[k]),
                    "meff_oe": float(self.meff_oe[k]), "phase_deg": float(self.phase_deg[k]),
                    "position_mm": [float(x[j]), float(y[j]), float(z[j])],
                    "field_oe": [float(hx[j]), float(hy[j]), float(hz[j])],
                    "in_plane_field_oe": float(h_ip[j]), "sin2phi0": float(s2[j]),
                    "resonance_hz": float(kittel_frequency_hz(
                        h_ip[j], self.meff_oe[k], self.material.gamma_hz_per_oe)),
                })
            devices[name] = {"kind": dev.kind, "wire_bond_nh": dev.bond_h * 1e9,
                             "pad_capacitance_pf": dev.pad_f * 1e12,
                             "holder_ripple_phase_rad": dev.ripple_phase_rad,
                             "resistance_ohm": r_chain, "voltmeter": dev.voltmeter,
                             "voltmeter_channel": dev.channel, "diodes": diodes}
        return {
            "placement_error_mm": self.placement_error_mm.tolist(),
            "rotation_error_deg": self.rotation_error_deg,
            "pose": {"x_mm": pose.x_mm, "y_mm": pose.y_mm, "z_mm": pose.z_mm,
                     "chip_rotation_deg": math.degrees(pose.theta_rad),
                     "magnet_rotation_deg": math.degrees(pose.phi_rad)},
            "position_drift_mm": self.position_drift.value(t_s).tolist(),
            "move_kicks_mm": self.kick_mm.tolist(),
            "devices": devices,
        }
