"""The one configuration mechanism (``sims.schema``): key checks, type coercion from the real
annotations, and one error type for run, lab, world and simulated-chip configurations."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from hil.bench.lab import parse_lab_config
from hil.chip.backends import device_config
from hil.config import ModelConfig, RunConfig, load_config, update
from hil.errors import ConfigError, HilError
from sims import schema
from sims.oscillator_device import DeviceConfig, DeviceConfigError, OscillatorArrayDevice
from sims.virtual_lab import WorldConfigError, load_world_config
from sims.virtual_lab.config import complete_world_config

ROOT = Path(__file__).resolve().parent.parent
THESIS_BENCH = ROOT / "sims/virtual_lab/worlds/thesis_bench.yaml"


@dataclass
class Example:
    rate_hz: float = 1.0
    count: int = 3
    enabled: bool = False
    label: str = "a"
    limit_s: float | None = None
    mode: Literal["fast", "slow"] = "fast"
    method: str | None = field(default=None, metadata=schema.choices(("euler", "heun"), "method"))
    span: tuple[float, float] = (0.0, 1.0)
    seeds: list[int] = field(default_factory=list)


def apply(values: dict, source: str | None = "ex.yaml", **kw) -> Example:
    return schema.apply_mapping(Example(), values, "ex", source, **kw)


# ----------------------------------------------------------------------------- the error


def test_error_names_source_key_and_message_and_survives_pickling():
    err = schema.ConfigError("a.b", "must be > 0", "f.yaml")
    assert str(err) == "f.yaml: a.b: must be > 0"
    assert (err.key, err.message, err.source) == ("a.b", "must be > 0", "f.yaml")
    assert str(schema.ConfigError("a.b", "must be > 0")) == "a.b: must be > 0"
    assert isinstance(err, ValueError)
    for e in (err, ConfigError("k", "m", "s"), WorldConfigError("w.yaml", "k", "m"),
              DeviceConfigError("k", "m")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.key == e.key


def test_hil_config_error_is_the_schema_error_and_a_hil_error():
    err = ConfigError("model.S", "must be positive", "command line")
    assert isinstance(err, schema.ConfigError) and isinstance(err, HilError)
    assert str(err) == "command line: model.S: must be positive"
    assert issubclass(WorldConfigError, schema.ConfigError)
    assert issubclass(DeviceConfigError, schema.ConfigError)
    assert str(WorldConfigError("w.yaml", "magnets.x", "bad")) == "w.yaml: magnets.x: bad"


# ----------------------------------------------------------------------------- keys and types


def test_unknown_key_lists_the_allowed_keys():
    with pytest.raises(schema.ConfigError) as info:
        apply({"rate_hz": 2.0, "colour": "red"})
    assert info.value.key == "ex.colour" and info.value.source == "ex.yaml"
    assert str(info.value) == ("ex.yaml: ex.colour: unknown key; allowed: rate_hz, count, "
                               "enabled, label, limit_s, mode, method, span, seeds")


def test_wrong_type_names_file_key_and_what_is_allowed():
    with pytest.raises(schema.ConfigError) as info:
        apply({"rate_hz": "fast"})
    assert str(info.value) == "ex.yaml: ex.rate_hz: expected a number, got 'fast' (str)"
    with pytest.raises(schema.ConfigError, match=r"ex.count: expected an integer, got 2.5"):
        apply({"count": 2.5})
    with pytest.raises(schema.ConfigError, match=r"ex.label: expected a string, got 3 \(int\)"):
        apply({"label": 3})


def test_numbers_convert_where_exact():
    ex = apply({"rate_hz": 2, "count": 4.0, "limit_s": 3})
    assert ex.rate_hz == 2.0 and isinstance(ex.rate_hz, float)
    assert ex.count == 4 and isinstance(ex.count, int)
    assert ex.limit_s == 3.0 and isinstance(ex.limit_s, float)


def test_yaml_text_numbers_get_the_hint_unless_number_text():
    value = yaml.safe_load("1.0e9")  # YAML 1.1: text (the exponent needs a sign)
    assert value == "1.0e9"
    with pytest.raises(schema.ConfigError, match=r"YAML reads '1.0e9' as text, write numbers "
                                                 r"like 1.0e\+9"):
        apply({"rate_hz": value})
    assert apply({"rate_hz": value}, number_text=True).rate_hz == 1.0e9
    assert apply({"count": "12"}, number_text=True).count == 12
    with pytest.raises(schema.ConfigError, match="expected an integer"):
        apply({"count": "1.5"}, number_text=True)


def test_booleans_are_strict():
    assert apply({"enabled": True}).enabled is True
    for bad in (1, 0, "true", "yes", None):
        with pytest.raises(schema.ConfigError, match="ex.enabled: .*true or false"):
            apply({"enabled": bad})
    with pytest.raises(schema.ConfigError, match="expected a number, got True"):
        apply({"rate_hz": True})
    with pytest.raises(schema.ConfigError, match="expected an integer, got False"):
        apply({"count": False})


def test_optional_accepts_null_and_a_required_value_does_not():
    assert apply({"limit_s": None}).limit_s is None
    assert apply({"method": None}).method is None
    with pytest.raises(schema.ConfigError) as info:
        apply({"rate_hz": None})
    assert str(info.value) == "ex.yaml: ex.rate_hz: must not be null; expected a number"
    with pytest.raises(schema.ConfigError, match=r"ex.limit_s: expected a number or null, "
                                                 r"got 'soon'"):
        apply({"limit_s": "soon"})


def test_choices_list_the_allowed_values():
    assert apply({"mode": "slow", "method": "heun"}).mode == "slow"
    with pytest.raises(schema.ConfigError) as info:
        apply({"mode": "medium"})
    assert str(info.value) == "ex.yaml: ex.mode: unknown value 'medium'; allowed: fast, slow"
    with pytest.raises(schema.ConfigError) as info:
        apply({"method": "rk4"})
    assert str(info.value) == ("ex.yaml: ex.method: unknown method 'rk4'; allowed: euler, heun "
                               "or null")
    ex = Example(method="rk4")  # built in code: check_choices catches it too
    with pytest.raises(schema.ConfigError, match="ex.method: unknown method 'rk4'"):
        schema.check_choices(ex, "ex")
    schema.check_choices(Example(method=None), "ex")


def test_tuples_and_lists_check_length_and_every_item():
    ex = apply({"span": [1, 2.5], "seeds": [0, 3.0]})
    assert ex.span == (1.0, 2.5) and ex.seeds == [0, 3]
    with pytest.raises(schema.ConfigError, match=r"ex.span: expected a list of 2: \[a number, "
                                                 r"a number\], got 3 value"):
        apply({"span": [1, 2, 3]})
    with pytest.raises(schema.ConfigError, match=r"ex.seeds\[1\]: expected an integer, got 'x'"):
        apply({"seeds": [0, "x"]})
    with pytest.raises(schema.ConfigError, match=r"ex.seeds: expected a list of integers"):
        apply({"seeds": 3})


def test_removed_and_renamed_keys_say_so():
    with pytest.raises(schema.ConfigError) as info:
        apply({"every": 2}, removed={"every": "it was never read"})
    assert str(info.value) == ("ex.yaml: ex.every: removed: it was never read; delete it from "
                               "the config")
    with pytest.raises(schema.ConfigError) as info:
        apply({"rate": 2}, renamed={"rate": ("rate_hz", "units in names")})
    assert str(info.value) == ("ex.yaml: ex.rate: renamed to 'rate_hz' (units in names); write "
                               "ex.rate_hz instead")


def test_complete_mapping_fills_defaults_and_checks_numbers():
    defaults = {"gain_db": 1.0, "name": "x", "sub": {"a": 1, "b": 2}}
    out = schema.complete_mapping({"gain_db": 3, "sub": {"b": 5}}, defaults, "holder", "w.yaml")
    assert out == {"gain_db": 3.0, "name": "x", "sub": {"a": 1, "b": 5}}
    assert isinstance(out["gain_db"], float)
    assert schema.complete_mapping(None, defaults) == defaults
    with pytest.raises(schema.ConfigError, match="w.yaml: holder.gian_db: unknown key; allowed: "
                                                 "gain_db, name, sub"):
        schema.complete_mapping({"gian_db": 3}, defaults, "holder", "w.yaml")
    with pytest.raises(schema.ConfigError, match=r"holder.gain_db: expected a number, got "
                                                 r"'2.0e3' \(str\); note: YAML reads"):
        schema.complete_mapping({"gain_db": "2.0e3"}, defaults, "holder", "w.yaml")
    with pytest.raises(schema.ConfigError, match="holder: must be a mapping, got list"):
        schema.complete_mapping([1], defaults, "holder", "w.yaml")


def test_describe_reads_the_real_annotations():
    hints = schema.field_types(ModelConfig)  # `from __future__ import annotations`: strings
    assert schema.describe(hints["tau_ns"]) == "a number"
    assert schema.describe(hints["b_fixed"]) == "a number or null"
    assert schema.describe(hints["highpass"]) == "true or false or null"
    assert schema.describe(hints["substeps"]) == "an integer"
    assert schema.describe(list[int]) == "a list of integers"


# ----------------------------------------------------------------------------- the four loaders


LAB = {
    "instruments": {"smb": {"driver": "rs_smb100a", "address": "GPIB0::28::INSTR"},
                    "nvm": {"driver": "keithley_2182a", "address": "GPIB0::7::INSTR"}},
    "roles": {"rf_source": "smb", "voltmeter": "nvm"},
}


def _run_config_error(tmp_path) -> schema.ConfigError:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump({"model": {"colour": "red"}}))
    with pytest.raises(schema.ConfigError) as info:
        load_config(p)
    return info.value


def _lab_config_error() -> schema.ConfigError:
    data = copy.deepcopy(LAB)
    data["instruments"]["smb"]["colour"] = "red"
    with pytest.raises(schema.ConfigError) as info:
        parse_lab_config(data, source="lab.yaml")
    return info.value


def _world_config_error() -> schema.ConfigError:
    with pytest.raises(schema.ConfigError) as info:
        complete_world_config({"magnets": {"colour": "red"}}, source="world.yaml")
    return info.value


def _device_config_error() -> schema.ConfigError:
    with pytest.raises(schema.ConfigError) as info:
        DeviceConfig.from_mapping({"colour": "red"}, source="chip")
    return info.value


def test_all_four_loaders_raise_the_one_type_naming_source_and_key(tmp_path):
    errors = {"run": _run_config_error(tmp_path), "lab": _lab_config_error(),
              "world": _world_config_error(), "device": _device_config_error()}
    keys = {"run": "model.colour", "lab": "instruments.smb.colour", "world": "magnets.colour",
            "device": "colour"}
    for name, err in errors.items():
        assert isinstance(err, schema.ConfigError), name
        assert err.key == keys[name], name
        assert "unknown key; allowed: " in err.message, name
        assert str(err).startswith(f"{err.source}: {err.key}: "), name
    assert isinstance(errors["run"], ConfigError) and isinstance(errors["lab"], ConfigError)
    assert isinstance(errors["world"], WorldConfigError)
    assert isinstance(errors["device"], DeviceConfigError)


def test_device_settings_in_code_raise_the_same_type():
    with pytest.raises(schema.ConfigError, match="cv_gamma: must be a number >= 0"):
        OscillatorArrayDevice(DeviceConfig(cv_gamma=-1.0), 0)
    with pytest.raises(schema.ConfigError, match="neuron: unknown neuron type 'x'; allowed: "):
        DeviceConfig(neuron="x").validate()


# ----------------------------------------------------------------------------- removed, renamed


def test_train_eval_every_was_removed(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["train.eval_every=5"])
    assert info.value.key == "train.eval_every"
    assert "removed: the test metric is evaluated after every epoch" in str(info.value)
    p = tmp_path / "old.yaml"
    p.write_text("train: {eval_every: 2}\n")
    with pytest.raises(ConfigError, match=r"old.yaml: train.eval_every: removed: "):
        load_config(p)
    assert not hasattr(RunConfig().train, "eval_every")


def test_configs_written_before_the_removal_still_load():
    """Every stored run config (config.yaml, a checkpoint's) holds eval_every: 1, which did what
    the program does now: dropped without a word."""
    stored = RunConfig().to_dict()
    stored["train"]["eval_every"] = 1
    cfg = update(RunConfig(), stored, "run/config.yaml")
    assert cfg.to_dict() == RunConfig().to_dict()


def test_device_substeps_was_renamed_solver_substeps():
    assert DeviceConfig().solver_substeps == 16 and not hasattr(DeviceConfig(), "substeps")
    assert ModelConfig().substeps == 4  # the model's own keeps its name
    with pytest.raises(DeviceConfigError) as info:
        DeviceConfig.from_mapping({"substeps": 8}, source="chip.yaml")
    assert str(info.value) == (
        "chip.yaml: substeps: renamed to 'solver_substeps' (the chip's own solver steps per "
        "input point, not the trained model's model.substeps); write solver_substeps instead")
    assert DeviceConfig.from_mapping({"solver_substeps": 8}).solver_substeps == 8
    with pytest.raises(ConfigError, match="device.substeps: renamed to 'solver_substeps'"):
        device_config(ModelConfig(), 1, 0.0, ["substeps=8"])
    assert device_config(ModelConfig(), 1, 0.0, ["solver_substeps=8"]).solver_substeps == 8


def test_a_world_file_with_the_old_chip_key_names_file_and_key(tmp_path):
    world = tmp_path / "w.yaml"
    world.write_text(f"base: {THESIS_BENCH}\ninstruments:\n  chip:\n    device: {{substeps: 8}}\n")
    with pytest.raises(WorldConfigError) as info:
        load_world_config(world)
    assert info.value.source == str(world)
    assert info.value.key == "instruments.chip.device.substeps"
    assert "renamed to 'solver_substeps'" in str(info.value)
    with pytest.raises(WorldConfigError, match="instruments.chip.device.solver_substeps: must be "
                                               "an integer >= 1"):
        load_world_config(THESIS_BENCH, overrides={"instruments": {"chip": {
            "device": {"solver_substeps": 0}}}})


def test_the_cli_prints_a_world_or_device_error_in_one_line(monkeypatch, capsys):
    from hil import cli as hil_cli

    for err in (WorldConfigError("w.yaml", "magnets.colour", "unknown key; allowed: a"),
                DeviceConfigError("substeps", "renamed to 'solver_substeps'")):
        def raise_it(args, err=err):
            raise err

        monkeypatch.setattr(hil_cli, "_call", raise_it)
        assert hil_cli.main(["runs", "list"]) == 2
        out = capsys.readouterr().err
        assert out.strip() == f"hil runs: error: {err}"
