"""Lab configuration: validation messages, open_lab by role, and ``hil lab check``."""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

import sims
from drivers.rf_source import RohdeSchwarzSMB100A
from drivers.stages import NewportSMC100
from hil.bench.lab import ROLES, LabError, load_lab_config, open_lab, parse_lab_config
from hil.commands import lab as lab_command
from hil.errors import ConfigError

ROOT = Path(sims.__file__).resolve().parent.parent

BASE: dict[str, Any] = {
    "name": "test bench",
    "visa_backend": "sims/visa/sim_lab.yaml@sim",
    "instruments": {
        "smb": {"driver": "rs_smb100a", "address": "GPIB0::28::INSTR",
                "limits": {"power_dbm": [-40, 10]}},
        "nvm": {"driver": "keithley_2182a", "address": "GPIB0::7::INSTR"},
        "x": {"driver": "newport_smc100", "address": "ASRL1::INSTR",
              "options": {"stage": "LTA-HS"}},
        "rot": {"driver": "newport_smc100", "address": "ASRL4::INSTR",
                "options": {"stage": "URS100BCC"}},
    },
    "roles": {"rf_source": "smb", "voltmeter": "nvm", "stage.x": "x", "stage.rotation": "rot"},
}


def write(tmp_path: Path, data: Any, name: str = "lab.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def private_sim(tmp_path: Path) -> str:
    sim_file = tmp_path / "sim_lab.yaml"
    shutil.copy(ROOT / "sims" / "visa" / "sim_lab.yaml", sim_file)
    return f"{sim_file}@sim"


# --------------------------------------------------------------------------- bad configs


def _set(path: str, value: Any):
    def mutate(cfg: dict) -> None:
        *parents, last = path.split("/")
        node = cfg
        for key in parents:
            node = node[key]
        node[last] = value
    return mutate


def _delete(path: str):
    def mutate(cfg: dict) -> None:
        *parents, last = path.split("/")
        node = cfg
        for key in parents:
            node = node[key]
        del node[last]
    return mutate


BAD_CONFIGS = [
    ("unknown_driver", _set("instruments/smb/driver", "rs_smb100b"), "instruments.smb.driver",
     ["unknown driver 'rs_smb100b'", "allowed: rs_smb100a, keysight_n5183b"]),
    ("missing_role", _delete("roles/voltmeter"), "roles.voltmeter",
     ["missing; required roles: rf_source, voltmeter", "defined instruments: smb, nvm"]),
    ("bad_address", _set("instruments/smb/address", "COM3"), "instruments.smb.address",
     ["'COM3' is not a VISA resource name", "examples: GPIB0::28::INSTR"]),
    ("address_not_text", _set("instruments/smb/address", 28), "instruments.smb.address",
     ["must be a VISA resource string", "got int 28"]),
    ("address_wrong_interface", _set("instruments/x/address", "GPIB0::5::INSTR"),
     "instruments.x.address", ["is a GPIB address but the Newport SMC100 is reached through "
                               "ASRL only"]),
    ("gpib_address_out_of_range", _set("instruments/nvm/address", "GPIB0::31::INSTR"),
     "instruments.nvm.address", ["GPIB primary address must be 0-30"]),
    ("limit_beyond_instrument", _set("instruments/smb/limits/power_dbm", [-40, 35]),
     "instruments.smb.limits.power_dbm",
     ["beyond what the instrument can do; allowed within [-145, 30] dBm",
      "Rohde & Schwarz SMB100A"]),
    ("stage_travel_beyond_instrument", _set("instruments/x/limits", {"position_mm": [0, 60]}),
     "instruments.x.limits.position_mm", ["allowed within [0, 50] mm"]),
    ("limit_wrong_type", _set("instruments/smb/limits/power_dbm", "ten"),
     "instruments.smb.limits.power_dbm", ["must be [min, max] or a mapping with min and/or max"]),
    ("limit_yaml_exponent", _set("instruments/smb/limits/freq_hz", ["1.0e9", "3.0e9"]),
     "instruments.smb.limits.freq_hz", ["YAML reads '1.0e9' as text, write numbers like 1.0e+9"]),
    ("unknown_limit", _set("instruments/smb/limits/power_mw", [0, 10]),
     "instruments.smb.limits.power_mw",
     ["unknown limit for rs_smb100a; allowed: freq_hz [9000, 4e+10] Hz, "
      "power_dbm [-145, 30] dBm"]),
    ("timeout_wrong_type", _set("instruments/smb/timeout_ms", "fast"),
     "instruments.smb.timeout_ms", ["must be a positive number of milliseconds, got 'fast'"]),
    ("unknown_option", _set("instruments/x/options/speed", 3), "instruments.x.options.speed",
     ["unknown option for newport_smc100; allowed: stage, unit, controller_address"]),
    ("option_not_allowed", _set("instruments/x/options/unit", "inch"),
     "instruments.x.options.unit", ["choose one of mm, deg"]),
    ("option_wrong_type", _set("instruments/x/options/controller_address", "one"),
     "instruments.x.options.controller_address", ["must be of type int, got 'one'"]),
    ("unknown_role", _set("roles/magnet", "smb"), "roles.magnet",
     ["unknown role; allowed: rf_source, voltmeter, dc_source"]),
    ("role_wrong_kind", _set("roles/voltmeter", "smb"), "roles.voltmeter",
     ["instrument 'smb' (rs_smb100a) is a rf_source; this role needs a voltmeter"]),
    ("role_wrong_unit", _set("roles/stage.rotation", "x"), "roles.stage.rotation",
     ["instrument 'x' works in mm; this role needs an axis in deg"]),
    ("role_undefined_instrument", _set("roles/voltmeter", "dmm"), "roles.voltmeter",
     ["names instrument 'dmm', which is not defined; defined: smb, nvm, x, rot"]),
    ("instruments_not_mapping", _set("instruments", ["smb", "nvm"]), "instruments",
     ["must be a non-empty mapping"]),
    ("unknown_top_level_key", _set("instrumnets", {}), "instrumnets",
     ["unknown key; allowed: name, visa_backend, instruments, roles"]),
    ("unknown_instrument_key", _set("instruments/smb/adress", "GPIB0::28::INSTR"),
     "instruments.smb.adress", ["unknown key; allowed: driver, address, visa_backend"]),
    ("missing_address", _delete("instruments/nvm/address"), "instruments.nvm.address",
     ["missing (required)"]),
    ("sim_file_missing", _set("visa_backend", "sims/visa/nope.yaml@sim"), "visa_backend",
     ["nope.yaml does not exist"]),
    ("unknown_backend", _set("instruments/smb/visa_backend", "@foo"),
     "instruments.smb.visa_backend", ["unknown VISA backend '@foo'; allowed: '' (system VISA)"]),
]


@pytest.mark.parametrize("mutate,key,fragments", [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_stops_with_one_clear_message(tmp_path, mutate, key, fragments):
    data = copy.deepcopy(BASE)
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_lab_config(path)
    err = info.value
    assert err.source == str(path)
    assert err.key == key
    assert str(err).startswith(f"{path}: {key}: ")
    for fragment in fragments:
        assert fragment in str(err)


def test_base_config_is_valid(tmp_path):
    config = load_lab_config(write(tmp_path, BASE))
    assert config.roles["stage.rotation"] == "rot"
    smb = config.instruments["smb"]
    assert smb.backend == f"{ROOT / 'sims' / 'visa' / 'sim_lab.yaml'}@sim"
    assert smb.effective_limits()["power_dbm"].max == 10


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"missing.yaml: file: cannot read"):
        load_lab_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("instruments: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: yaml: not valid YAML"):
        load_lab_config(bad)
    with pytest.raises(ConfigError, match=r"x.yaml: \(top level\): must be a mapping"):
        parse_lab_config(["a"], source="x.yaml")


def test_duplicate_instrument_names_are_refused_naming_both_lines(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_text(
        "instruments:\n"
        "  smb: {driver: rs_smb100a, address: 'GPIB0::28::INSTR'}\n"
        "  nvm: {driver: keithley_2182a, address: 'GPIB0::7::INSTR'}\n"
        "  smb: {driver: keysight_n5183b, address: 'TCPIP0::192.168.1.31::inst0::INSTR'}\n"
        "roles: {rf_source: smb, voltmeter: nvm}\n")
    with pytest.raises(ConfigError, match=r"instruments.smb: instrument name 'smb' is defined "
                                          r"twice \(lines 2 and 4\)"):
        load_lab_config(path)
    path.write_text(path.read_text().replace("  smb: {driver: keysight", "  mxg: {driver: keysight")
                    + "roles: {rf_source: mxg}\n")  # a duplicate top-level key too
    with pytest.raises(ConfigError, match=r"roles: key 'roles' is defined twice \(lines 5 and 6\)"):
        load_lab_config(path)


def test_two_instruments_at_one_address_are_refused_naming_both(tmp_path):
    data = copy.deepcopy(BASE)
    data["instruments"]["smb2"] = {"driver": "keysight_n5183b", "address": "gpib0::28::instr"}
    with pytest.raises(ConfigError, match=r"instruments.smb2.address: gpib0::28::instr is also the "
                                          r"address of instrument 'smb' \(rs_smb100a\); "
                                          r"instruments 'smb' and 'smb2' cannot share"):
        load_lab_config(write(tmp_path, data))


def test_required_roles_can_be_chosen(tmp_path):
    data = copy.deepcopy(BASE)
    del data["roles"]["voltmeter"]
    assert "voltmeter" not in load_lab_config(write(tmp_path, data), required_roles=()).roles
    with pytest.raises(ConfigError, match="roles.switch: missing"):
        load_lab_config(write(tmp_path, BASE), required_roles=("rf_source", "switch"))


def test_shipped_configs_are_valid():
    sim = load_lab_config(ROOT / "lab_configs" / "sim.yaml")
    assert set(sim.roles) == set(ROLES)  # every role on the virtual bench
    for inst in sim.instruments.values():  # the gaussmeter has its own pyvisa-sim file
        own = "lakeshore_425.yaml" if inst.driver == "lakeshore_425" else "sim_lab.yaml"
        assert inst.backend == f"{ROOT / 'sims' / 'visa' / own}@sim"
    real = load_lab_config(ROOT / "lab_configs" / "template_real_bench.yaml")
    assert set(real.roles) == set(ROLES)
    assert all(inst.backend == "" for inst in real.instruments.values())
    assert real.instruments["x"].driver == "thorlabs_kdc101"


# --------------------------------------------------------------------------- open_lab


def test_open_lab_gives_drivers_by_role_and_closes_them_safely(tmp_path):
    data = copy.deepcopy(BASE)
    data["visa_backend"] = private_sim(tmp_path)
    path = write(tmp_path, data)
    with open_lab(path) as lab:
        src = lab["rf_source"]
        assert isinstance(src, RohdeSchwarzSMB100A)
        assert isinstance(lab["stage.rotation"], NewportSMC100)
        assert src.limits["power_dbm"].max == 10  # the configured limit is in force
        src.output_on()
        ids = lab.identities()
        assert ids["smb"]["roles"] == ["rf_source"]
        assert ids["smb"]["identity"].startswith("Rohde&Schwarz,SMB100A")
        with pytest.raises(LabError, match="no instrument has role 'switch'"):
            lab["switch"]
    with RohdeSchwarzSMB100A.open("GPIB0::28::INSTR", data["visa_backend"]) as again:
        assert again.output_enabled is False


def test_open_lab_failure_names_the_instrument_and_closes_the_others(tmp_path):
    data = copy.deepcopy(BASE)
    data["visa_backend"] = private_sim(tmp_path)
    data["instruments"]["nvm"].update(address="GPIB0::30::INSTR", timeout_ms=50)
    with pytest.raises(LabError, match=r"cannot use instrument 'nvm' \(keithley_2182a at "
                                       r"GPIB0::30::INSTR\): .*no reply to '\*IDN\?'"):
        open_lab(write(tmp_path, data))


def test_open_lab_only_the_roles_asked_for(tmp_path):
    data = copy.deepcopy(BASE)
    data["visa_backend"] = private_sim(tmp_path)
    data["instruments"]["nvm"].update(address="GPIB0::30::INSTR", timeout_ms=50)
    with open_lab(write(tmp_path, data), roles=["rf_source", "stage.x"]) as lab:
        assert set(lab.instruments) == {"smb", "x"}
        assert "voltmeter" not in lab


# --------------------------------------------------------------------------- hil lab check


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hil")
    sub = parser.add_subparsers(dest="command")
    lab_command.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_hil_lab_check_on_the_shipped_sim_config(capsys):
    assert cli(["lab", "check", str(ROOT / "lab_configs" / "sim.yaml")]) == 0
    out = capsys.readouterr().out
    for role in ROLES:
        assert role in out
    assert "Rohde&Schwarz,SMB100A,1406.6000k03/180123" in out
    assert "GPIB0::28::INSTR" in out and "OK: RF off" in out
    assert "all 13 instrument(s) answered" in out


def test_hil_lab_check_reports_a_failing_instrument(tmp_path, capsys):
    data = copy.deepcopy(BASE)
    data["visa_backend"] = private_sim(tmp_path)
    data["instruments"]["nvm"].update(address="GPIB0::30::INSTR", timeout_ms=50)
    assert cli(["lab", "check", str(write(tmp_path, data))]) == 1
    out = capsys.readouterr().out
    assert "FAILED: cannot use instrument 'nvm'" in out
    assert "no reply to '*IDN?' within 50 ms" in out
    assert out.count("OK: ") == 3  # the other instruments were still checked
    assert "1 of 4 instrument(s) failed: nvm" in out


def test_hil_lab_check_needs_an_action_and_a_valid_config(tmp_path):
    with pytest.raises(SystemExit):
        cli(["lab"])
    data = copy.deepcopy(BASE)
    data["instruments"]["smb"]["driver"] = "nope"
    with pytest.raises(ConfigError, match="instruments.smb.driver"):
        cli(["lab", "check", str(write(tmp_path, data))])


def test_hil_main_prints_config_errors_once_wired(tmp_path, monkeypatch, capsys):
    from hil import cli as hil_cli

    monkeypatch.setattr(hil_cli, "COMMAND_MODULES", ("hil.commands.lab",))
    data = copy.deepcopy(BASE)
    data["roles"]["voltmeter"] = "smb"
    path = write(tmp_path, data)
    assert hil_cli.main(["lab", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"hil lab: error: {path}: roles.voltmeter: instrument 'smb'" in err


# --------------------------------------------------------------------------- one program per bench


def test_a_second_program_is_refused_naming_the_holder_and_sends_nothing(tmp_path, monkeypatch):
    import json
    import os
    import subprocess
    import sys

    monkeypatch.setenv("HIL_LOCK_DIR", str(tmp_path / "locks"))
    data = copy.deepcopy(BASE)
    data["visa_backend"] = private_sim(tmp_path)
    del data["instruments"]["x"], data["instruments"]["rot"]
    del data["roles"]["stage.x"], data["roles"]["stage.rotation"]
    config = write(tmp_path, data)
    second_log = tmp_path / "second.jsonl"
    script = ("import sys\nfrom hil.bench.lab import LabError, open_lab\n"
              "try:\n    open_lab(sys.argv[1], record_to=sys.argv[2]).close()\n"
              "except LabError as exc:\n    print('REFUSED', exc)\n")
    with open_lab(config):  # this program holds the bench
        result = subprocess.run([sys.executable, "-c", script, str(config), str(second_log)],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "HIL_LOCK_DIR": str(tmp_path / "locks")})
    assert "REFUSED" in result.stdout, result.stdout + result.stderr
    assert f"GPIB0::28::INSTR) is in use by pid {os.getpid()}" in result.stdout
    assert "since 20" in result.stdout and "touched nothing" in result.stdout
    exchanges = ([json.loads(line) for line in second_log.read_text().splitlines()]
                 if second_log.exists() else [])
    assert exchanges == [], "the refused program sent something"
    # once the holder has closed, the bench is free again
    result = subprocess.run([sys.executable, "-c", script, str(config), str(second_log)],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HIL_LOCK_DIR": str(tmp_path / "locks")})
    assert "REFUSED" not in result.stdout, result.stdout
