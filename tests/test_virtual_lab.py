"""The virtual lab as a bench: configuration, one shared world and clock, instrument behaviour,
lab time, seeds and the hidden truth. Measurements go through the drivers (``hil.bench.lab``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pyvisa
import yaml

import sims
from drivers.base import InstrumentError
from drivers.nanovoltmeter import differential_measurement
from hil.bench.lab import Lab, check_lab, load_lab_config, open_lab, parse_lab_config
from hil.errors import ConfigError
from sims.virtual_lab import VirtualVisaLibrary, World, WorldConfigError, load_world_config

ROOT = Path(sims.__file__).resolve().parent.parent
LAB = ROOT / "lab_configs" / "virtual.yaml"
NEAR = {"fabrication": {"placement_sigma_mm": {"x": 0.05, "y": 0.2, "z": 0.05}}}


def lab_data() -> dict[str, Any]:
    return yaml.safe_load(LAB.read_text())


def chapter2(seed: int = 1, overrides: dict[str, Any] | None = None) -> World:
    return World.from_file("chapter2.yaml", seed=seed, overrides=overrides)


def home_z(lab: Lab, z_mm: float = 20.0) -> None:
    lab["stage.z"].home()
    lab["stage.z"].move_abs_mm(z_mm)


# --------------------------------------------------------------------------- configuration


def test_virtual_config_loads_and_every_instrument_answers():
    config = load_lab_config(LAB)
    assert config.virtual is not None and config.virtual.seed == 2024
    assert {i.backend for i in config.instruments.values()} == {"@virtual"}
    results = check_lab(config)
    assert all(r.ok for r in results), [r.status for r in results if not r.ok]
    assert len(results) == 14  # 13 + the field probe (issue 21)


def test_all_instruments_of_a_lab_share_one_world_and_one_clock():
    with open_lab(LAB) as lab:
        libraries = {id(drv.transport._res.visalib) for drv in lab.instruments.values()}
        assert len(libraries) == 1
        library = next(iter(lab.instruments.values())).transport._res.visalib
        assert isinstance(library, VirtualVisaLibrary) and library.world is lab.world
        assert lab.clock is lab.world.clock
        before = lab.clock.now_s()
        lab.sleep(12.5)
        assert lab.clock.now_s() == pytest.approx(before + 12.5)
    with open_lab(LAB, roles=["voltmeter"]) as other:
        assert other.world is not lab.world  # each lab its own world


def _wrong_stage(data: dict[str, Any]) -> None:
    data["instruments"]["rot"].update(options={"stage": "Z825B"}, limits={})
    data["roles"].pop("stage.rotation")  # a linear axis cannot take the rotation role


BAD_VIRTUAL = [
    ("no_world", lambda d: d.pop("virtual_lab"), "virtual_lab", "uses the @virtual backend"),
    ("unknown_key", lambda d: d["virtual_lab"].update(sead=1), "virtual_lab.sead",
     "unknown key"),
    ("missing_file", lambda d: d["virtual_lab"].update(world="sims/nope.yaml"),
     "virtual_lab.world", "does not exist"),
    ("bad_seed", lambda d: d["virtual_lab"].update(seed=-3), "virtual_lab.seed", ">= 0"),
    ("no_such_address", lambda d: d["instruments"]["nvm"].update(address="GPIB0::8::INSTR"),
     "instruments.nvm.address", "has no instrument at GPIB0::8::INSTR"),
    ("wrong_model", lambda d: d["instruments"]["smu"].update(driver="keithley_2401"),
     "instruments.smu.address", "keithley_2400 ('smu') at GPIB0::24::INSTR, not a keithley_2401"),
    ("wrong_stage", _wrong_stage, "instruments.rot.options.stage",
     "carries a PRM1Z8, not a Z825B"),
    ("bad_override", lambda d: d["virtual_lab"].update(overrides={"material": {"mef_oe": 1}}),
     "virtual_lab.world", "material.mef_oe: unknown key"),
]


@pytest.mark.parametrize("mutate,key,needle", [b[1:] for b in BAD_VIRTUAL],
                         ids=[b[0] for b in BAD_VIRTUAL])
def test_virtual_config_errors_name_the_key(mutate, key, needle):
    data = lab_data()
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_lab_config(data, source="virt.yaml")
    assert info.value.key == key
    assert needle in str(info.value)


def test_world_file_errors_name_the_key(tmp_path):
    world = tmp_path / "w.yaml"
    world.write_text("base: " + str(ROOT / "sims/virtual_lab/worlds/thesis_bench.yaml")
                     + "\nmagnets: {gradiant_oe_per_mm: 150}\n")
    with pytest.raises(WorldConfigError, match=r"magnets.gradiant_oe_per_mm: unknown key"):
        load_world_config(world)
    bad_blocks = {"sample": {"devices": {"chain0": {"blocks": [[0, 1], [1, 3]]}}}}
    with pytest.raises(WorldConfigError, match=r"sample.devices.chain0.blocks"):
        World.from_file("thesis_bench.yaml", overrides=bad_blocks)
    with pytest.raises(WorldConfigError, match=r"rf.output_switch.ports.5"):
        World.from_file("thesis_bench.yaml", overrides={
            "rf": {"output_switch": {"ports": {5: "chain0"}}}})


def test_overrides_in_the_lab_config_reach_the_world(tmp_path):
    data = lab_data()
    data["virtual_lab"]["overrides"] = {"material": {"alpha": 0.02}, "magnets": {
        "gradient_oe_per_mm": 150.0}}
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data))
    with open_lab(path, roles=["voltmeter"]) as lab:
        truth = lab.world.truth()
        assert truth["material"]["alpha"] == 0.02
        assert truth["magnets"]["gradient_oe_per_mm"] == 150.0
        assert truth["seed"] == 2024


# --------------------------------------------------------------------------- coupling


def test_reading_depends_on_stage_source_and_switch():
    """The nanovoltmeter's reading follows the stage, the selected source and the switch."""
    with open_lab(LAB, world=chapter2(seed=2, overrides=NEAR)) as lab:
        home_z(lab)
        smb, nvm, sp4t, sel = (lab["rf_source"], lab["voltmeter"], lab["switch"],
                               lab["source_switch"])
        resonance = lab.world.truth()["sample"]["devices"]["diode"]["diodes"][0]["resonance_hz"]
        smb.apply(resonance - 150e6, 10.0)  # on the antisymmetric lobe
        sel.port, sp4t.port = 2, 1

        def v() -> float:
            return differential_measurement(smb, nvm, 2, sleep=lab.sleep).mean_v

        here = v()
        assert abs(here) > 5e-6
        lab["stage.z"].move_rel_mm(-0.1)  # magnets down: the sample sees 14 Oe more
        moved = v()
        assert abs(moved - here) > 0.2 * abs(here)
        sp4t.port = 2  # RF now goes to a synapse elsewhere on the chip
        assert abs(v() - moved) > 0.2 * abs(moved)
        sp4t.port = 0
        assert abs(v()) < 0.2e-6
        sp4t.port, sel.port = 1, 1  # the VCO source, which is not powered: nothing
        assert abs(v()) < 0.2e-6


def test_current_line_shifts_the_resonance():
    """Thesis 2.7.2: a DC current in a line over the diode tunes its weight."""
    with open_lab(LAB, world=chapter2(seed=4, overrides=NEAR)) as lab:
        home_z(lab)
        smb, nvm, smu = lab["rf_source"], lab["voltmeter"], lab["dc_source"]
        lab["source_switch"].port, lab["switch"].port = 2, 1
        resonance = lab.world.truth()["sample"]["devices"]["diode"]["diodes"][0]["resonance_hz"]
        smb.apply(resonance, 10.0)
        smu.configure_voltage_source(0.05)
        smu.output_enabled = True
        volts, currents = [], []
        for level in (-0.6, -0.3, 0.0, 0.3, 0.6):  # +-40 mA, +-6 Oe
            smu.source_voltage_v = level
            currents.append(smu.measure()[1])
            volts.append(differential_measurement(smb, nvm, 2, sleep=lab.sleep).mean_v)
        assert currents == pytest.approx([-0.04, -0.02, 0.0, 0.02, 0.04], abs=1e-4)
        assert np.all(np.diff(volts) < 0) or np.all(np.diff(volts) > 0)  # monotonic in I
        assert abs(volts[-1] - volts[0]) > 10e-6


def test_magnet_rotation_and_sample_stages_set_each_diodes_field():
    """Rotating the magnet array about the gradient axis z keeps H_z and turns the transverse
    residuals into the film plane; moving the sample in y moves it along y only (without the
    random kicks moves give the holder, to compare geometry exactly)."""
    calm = {"drift": {"move_kick_um": 0.0, "move_kick_frac": 0.0}}
    with open_lab(LAB, world=chapter2(seed=8, overrides=calm)) as lab:
        def diode() -> dict[str, Any]:
            return lab.world.truth()["sample"]["devices"]["diode"]["diodes"][0]

        before = diode()
        lab["stage.rotation"].move_abs_deg(8.0)
        turned = diode()
        assert turned["field_oe"][2] == pytest.approx(before["field_oe"][2], abs=0.5)
        assert abs(turned["field_oe"][1] - before["field_oe"][1]) > 0.5
        assert turned["position_mm"] == pytest.approx(before["position_mm"], abs=0.01)
        lab["stage.y"].move_rel_mm(2.0)
        shifted = diode()
        moved = np.subtract(shifted["position_mm"], turned["position_mm"])
        assert moved == pytest.approx([0.0, 2.0, 0.0], abs=0.005)  # backlash: 3 um
        # H_z varies only weakly along y (thesis 3.6): the 0.5 Oe/mm cross term
        assert shifted["field_oe"][2] - turned["field_oe"][2] == pytest.approx(1.0, abs=0.3)


# --------------------------------------------------------------------------- lab time


def test_stage_moves_cost_distance_over_speed_and_show_backlash():
    with open_lab(LAB, roles=["stage.z", "stage.x"]) as lab:
        z, x = lab["stage.z"], lab["stage.x"]
        with pytest.raises(InstrumentError, match="NOT REFERENCED"):
            z.move_abs_mm(10.0)  # the SMC100 powers up unreferenced
        z.home()
        z.move_abs_mm(10.0)
        with lab.clock.stopwatch() as lap:
            z.move_abs_mm(20.0)  # 0.5 mm/s (the lab limit), 20 mm/s^2
        # distance / speed + speed / acceleration, plus a few ms of RS-232 exchanges
        assert 10 / 0.5 + 0.5 / 20 <= lap.lab_s < 10 / 0.5 + 0.5 / 20 + 0.1
        z.move_abs_mm(15.0)
        from_above = lab.world.truth()["stages"]["z"]["physical"]
        z.move_abs_mm(14.0)
        z.move_abs_mm(15.0)
        from_below = lab.world.truth()["stages"]["z"]["physical"]
        assert z.position_mm == pytest.approx(15.0)
        assert from_above - from_below == pytest.approx(0.002)  # LTA-HS backlash, 2 um
        with lab.clock.stopwatch() as lap:
            x.move_abs_mm(15.0)  # KDC101: capped at the 1 mm/s lab limit at connect
        assert 2.5 / 1.0 + 1.0 / 4.0 <= lap.lab_s < 2.5 / 1.0 + 1.0 / 4.0 + 0.05


def test_parallel_moves_overlap_in_lab_time():
    with open_lab(LAB, roles=["stage.x", "stage.y"]) as lab:
        x, y = lab["stage.x"], lab["stage.y"]
        with lab.clock.stopwatch() as lap:
            x.move_abs_mm(20.0, wait=False)
            y.move_abs_mm(20.0, wait=False)
            x.wait_until_stopped(60)
            y.wait_until_stopped(60)
        assert lap.lab_s == pytest.approx(7.5 + 0.25, abs=0.1)  # one move's time, not two
        assert "not homed" in x.status()
        x.home()  # MOT_MOVE_HOME, answered by MOVE_HOMED when the axis reaches home
        assert "homed" in x.status() and "not homed" not in x.status()
        assert x.position_mm == pytest.approx(0.0)


def test_settling_integration_and_noise_cost_lab_time():
    with open_lab(LAB, roles=["rf_source", "voltmeter", "spectrum_analyzer"]) as lab:
        smb, nvm, fsv = lab["rf_source"], lab["voltmeter"], lab["spectrum_analyzer"]
        with lab.clock.stopwatch() as lap:
            smb.apply(2.5e9, 0.0)  # *OPC? answers once the level has settled (4 ms)
        assert lap.spent_s["smb: settling"] > 0 and 0.004 <= lap.lab_s < 0.02
        nvm.configure_voltage(nplc=10, filter_count=5)
        with lab.clock.stopwatch() as lap:
            nvm.read_voltage_v()
        assert lap.spent_s["nvm: integration"] == pytest.approx(5 * (2 * 10 / 50 + 0.002))
        nvm.configure_voltage(nplc=5)
        readings = np.array([nvm.read_voltage_v() for _ in range(400)])
        assert np.std(np.diff(readings)) / np.sqrt(2) == pytest.approx(20e-9, rel=0.15)
        with lab.clock.stopwatch() as lap:
            fsv.measure_peak(2.5e9, 100e6, rbw_hz=100e3)
        sweep_s = 2.5 * 100e6 / 100e3 ** 2  # *OPC? after INIT:IMM waits for the sweep
        assert sweep_s <= lap.lab_s < sweep_s + 0.02


# --------------------------------------------------------------------------- instruments


def test_vco_source_tuning_and_amplifier_curves_on_the_analyser():
    """Thesis 4.5.2: frequency vs tuning voltage, power vs amplifier supply (threshold 1.7 V,
    linear to 5 V, flat above), measured with the FSV behind port 4 of the switch."""
    with open_lab(LAB) as lab:
        tune, amp, fsv = lab["vco_supply"], lab.instruments["vco_amp"], lab["spectrum_analyzer"]
        lab["source_switch"].port, lab["switch"].port = 1, 4
        tune.ch1.set_output(True)
        amp.ch1.set_voltage_v(4.0)
        amp.ch1.set_output(True)
        freqs = []
        for volts in (0.0, 2.5, 5.0, 10.0, 15.0, 17.5, 20.0):
            tune.ch1.set_voltage_v(volts)
            lab.sleep(15)
            freqs.append(fsv.measure_peak(2.2e9, 2.0e9, rbw_hz=1e6)[0])
        assert np.all(np.diff(freqs) > 0)
        assert 1.45e9 < freqs[0] < 1.62e9 and 2.8e9 < freqs[-1] < 3.0e9
        assert 1.65e9 < freqs[1] < 1.85e9  # ~1.75 GHz at 2.5 V (thesis: 2.5-17.5 V used)
        tune.ch1.set_voltage_v(2.5)
        powers = {}
        for volts in (1.0, 1.6, 1.8, 3.0, 4.0, 5.0, 6.0):
            amp.ch1.set_voltage_v(volts)
            lab.sleep(15)
            _, powers[volts] = fsv.measure_peak(freqs[1], 20e6, rbw_hz=100e3)
        mw = {v: 10 ** (p / 10) for v, p in powers.items()}
        assert powers[1.0] < -60 and powers[1.6] < -60  # nothing below the threshold
        assert 0.05 < mw[1.8] < 0.5  # the jump, reduced by the 13 dB attenuator
        slope_lo, slope_hi = (mw[4.0] - mw[3.0]), (mw[5.0] - mw[4.0])
        assert slope_lo == pytest.approx(slope_hi, rel=0.15)  # linear from 1.7 to 5 V
        assert mw[6.0] < 1.03 * mw[5.0]  # saturated above 5 V
        assert 6 < mw[5.0] < 14  # ~10 mW maximum at 1.75 GHz, less the switch losses


def test_switch_loss_rises_with_frequency():
    """Thesis Fig. 4.5c, measured SMB100A -> both switches -> FSV."""
    with open_lab(LAB) as lab:
        smb, fsv = lab["rf_source"], lab["spectrum_analyzer"]
        lab["source_switch"].port, lab["switch"].port = 2, 4
        smb.output_on()
        loss = []
        for f in (1.5e9, 2.5e9, 3.5e9):
            smb.apply(f, 0.0)
            loss.append(-np.mean([fsv.measure_peak(f, 1e6, rbw_hz=10e3)[1] for _ in range(5)]))
        smb.output_off()
        assert loss[2] - loss[0] > 0.25  # 2 x 0.12 dB/GHz over 2 GHz, plus ripple
        _, off = fsv.measure_peak(2.5e9, 1e6, rbw_hz=10e3)
        assert off < -90  # RF off: the noise floor (DANL -147 dBm/Hz in 10 kHz, peak of 691)


def test_scpi_long_forms_error_queue_and_timeouts():
    world = World.from_file("thesis_bench.yaml", seed=0)
    rm = pyvisa.ResourceManager(VirtualVisaLibrary.for_world(world))
    assert "GPIB0::28::INSTR" in rm.list_resources()
    smb = rm.open_resource("GPIB0::28::INSTR", read_termination="\n", write_termination="\n")
    smb.timeout = 500
    smb.write("SOURce:FREQuency:CW 2.5 GHz;:sour:pow -12.5 dBm")
    assert float(smb.query("SOUR:FREQ?")) == 2.5e9
    assert float(smb.query(":SOURce:POWer:LEVel:IMMediate:AMPLitude?")) == -12.5
    assert smb.query("SYST:ERR?") == '0,"No error"'
    smb.write("SOUR:FREQ 99 GHz")
    smb.write("FROB 1")
    assert smb.query("SYST:ERR?").startswith("-222")
    assert smb.query("SYST:ERR?").startswith("-113")
    before = world.clock.now_s()
    with pytest.raises(pyvisa.errors.VisaIOError) as info:
        smb.query("FROB?")
    assert info.value.error_code == pyvisa.constants.StatusCode.error_timeout
    assert world.clock.now_s() - before == pytest.approx(0.5, abs=0.01)
    with pytest.raises(pyvisa.errors.VisaIOError):
        rm.open_resource("GPIB0::3::INSTR")
    rm.close()


def test_recording_and_replay_work_on_the_virtual_bench(tmp_path):
    log = tmp_path / "io.jsonl"

    def session(lab: Lab) -> list[float]:
        nvm = lab["voltmeter"]
        nvm.configure_voltage(nplc=1)
        return [nvm.read_voltage_v() for _ in range(3)]

    with open_lab(LAB, roles=["voltmeter"], record_to=log) as lab:
        recorded = session(lab)
    with open_lab(LAB, roles=["voltmeter"], replay=log) as lab:
        assert session(lab) == recorded


# --------------------------------------------------------------------------- seeds, truth


def test_same_seed_same_world_and_every_draw_recorded():
    a = World.from_file("thesis_bench.yaml", seed=9).truth()
    b = World.from_file("thesis_bench.yaml", seed=9).truth()
    c = World.from_file("thesis_bench.yaml", seed=10).truth()
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True,
                                                                    default=str)
    assert a["sample"]["placement_error_mm"] != c["sample"]["placement_error_mm"]
    diodes = [d for dev in a["sample"]["devices"].values() for d in dev["diodes"]]
    assert len(diodes) == 24
    for key in ("width_um", "contact_ohm_fabricated", "u_um", "v_um", "meff_oe", "phase_deg",
                "resistance_ohm", "resonance_hz"):
        assert all(key in d for d in diodes)
    litho = np.array([d["v_um"] - d["design_v_um"] for d in diodes])
    assert 1.0 < litho.std() < 3.5  # ~2 um lithography error
    chains = a["sample"]["devices"]
    assert all(45 < dev["resistance_ohm"] < 60 for dev in chains.values())  # thesis 50.9-53.2
    assert len({round(dev["wire_bond_nh"], 6) for dev in chains.values()}) == 3
    assert a["instruments"]["smb"]["level_error_db"] != c["instruments"]["smb"]["level_error_db"]


def test_noise_streams_are_independent_of_each_other():
    """Using one instrument more does not change what another draws."""
    def readings(extra_fsv_sweeps: int) -> list[float]:
        with open_lab(LAB, roles=["voltmeter", "spectrum_analyzer"]) as lab:
            for _ in range(extra_fsv_sweeps):
                lab["spectrum_analyzer"].sweep()
            lab.world.clock.advance_to(100.0)
            return [lab["voltmeter"].read_voltage_v() for _ in range(5)]

    assert readings(0) == readings(3)


def test_drift_moves_the_sample_and_contacts_over_lab_time():
    world = chapter2(seed=6)
    start = world.truth()["sample"]
    world.clock.sleep(4 * 3600)
    later = world.truth()["sample"]
    shift_um = 1e3 * np.abs(np.subtract(later["position_drift_mm"], start["position_drift_mm"]))
    assert 0.2 < shift_um.max() < 25  # a few um over hours (thesis 4.7)
    r0 = start["devices"]["synapse_p40"]["diodes"][0]["resistance_ohm"]
    r1 = later["devices"]["synapse_p40"]["diodes"][0]["resistance_ohm"]
    assert r0 != r1 and abs(r1 - r0) / r0 < 0.05
    # the trajectory depends on lab time only, not on how often it was looked at
    other = chapter2(seed=6)
    for t in np.linspace(0, 4 * 3600, 37):
        other.clock.advance_to(float(t))
        other.truth()
    assert other.truth()["sample"]["position_drift_mm"] == later["position_drift_mm"]


def test_truth_is_a_copy_not_a_handle():
    world = chapter2(seed=1)
    truth = world.truth()
    mutated = copy.deepcopy(truth)
    mutated["sample"]["devices"]["diode"]["diodes"][0]["width_um"] = 0.0
    truth["material"]["meff_oe"] = 1.0
    assert world.truth()["material"]["meff_oe"] == 9680.0
    assert world.sample.width_um[0] != 0.0


def test_virtual_switch_and_mxg_answer_the_manual_forms():
    world = World.from_file("thesis_bench.yaml", seed=0)
    rm = pyvisa.ResourceManager(VirtualVisaLibrary.for_world(world))
    sw = rm.open_resource("TCPIP0::192.168.1.50::23::SOCKET", read_termination="\r\n",
                          write_termination="\r\n")
    sw.timeout = 500
    assert sw.query(":SP4TA:STATE:3") == "1" and sw.query(":SP4TA:STATE?") == "3"
    assert sw.query("SWPORT?") == "4"  # bit 2 = port 3
    assert sw.query("SETP=1") == "1" and sw.query("sp4ta:state?") == "1"
    assert sw.query("SETP=3") == "0"  # two ports of one SP4T at once: refused
    assert sw.query(":SP4T:STATE:2") == "0"  # the switch letter is required
    assert sw.query(":SP4TA:STATE?") == "1"
    mxg = rm.open_resource("TCPIP0::192.168.1.31::inst0::INSTR", read_termination="\n",
                           write_termination="\n")
    mxg.timeout = 500
    assert "520" in mxg.query("*OPT?").split(",")
    assert float(mxg.query("SOUR:POW? MAX")) == 25.0 and float(mxg.query("POW? MIN")) == -130.0
    mxg.write("SOUR:POW:USER:MAX 30")  # above the unit's level range
    assert mxg.query("SYST:ERR?").startswith("-222")
