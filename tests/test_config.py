"""Every bad config value stops with a clear message naming the key."""

import pytest
import yaml

from hil.config import RunConfig, apply_overrides, load_config, parse_seeds, validate
from hil.errors import ConfigError


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("model.tau_ns=-1", "model.tau_ns", "positive"),
        ("model.tau_ns=0", "model.tau_ns", "positive"),
        ("model.density_inter=1.5", "model.density_inter", "(0, 1]"),
        ("model.density_intra=-0.1", "model.density_intra", "[0, 1]"),
        ("model.density_inter=0", "model.density_inter", "(0, 1]"),
        ("task.name=mnist", "task.name", "allowed: digits, sine_square, flipflop"),
        ("model.neuron=memristor", "model.neuron", "allowed: spintronic"),
        ("model.substeps=0", "model.substeps", ">= 1"),
        ("model.n_layers=0", "model.n_layers", ">= 1"),
        ("train.lr0=-0.1", "train.lr0", "positive"),
        ("train.epochs=0", "train.epochs", ">= 1"),
        ("train.engine=gpu", "train.engine", "allowed: fast, reference"),
        ("train.bptt=magic", "train.bptt", "allowed: full"),
        ("model.S=0", "model.S", "positive"),
        ("model.f_cut_ghz=1000", "model.f_cut_ghz", "stable"),
        ("model.tau_ns=abc", "model.tau_ns", "expected a number"),
        ("model.substeps=2.5", "model.substeps", "expected an integer"),
        ("model.highpass=maybe", "model.highpass", "expected true or false or null"),
        ("model.colour=red", "model.colour", "unknown key"),
        ("optics.power=3", "optics", "unknown section"),
    ],
)
def test_bad_override_names_the_key(override, key, words):
    with pytest.raises(ConfigError) as ei:
        load_config(overrides=[override])
    msg = str(ei.value)
    assert key in msg and words in msg, msg
    assert ei.value.key.startswith(key)


def test_bad_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"model": {"tau_ns": -3}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: model.tau_ns: must be a positive"):
        load_config(p)


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: .*digits"):
        load_config(preset="nope")


def test_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(RunConfig(), ["tau=3"])


@pytest.mark.parametrize("spec, out", [("0-3", [0, 1, 2, 3]), ("1,4,6", [1, 4, 6]), (5, [5]),
                                       ("0-1,5", [0, 1, 5]), ([1, "3-4"], [1, 3, 4])])
def test_seed_specs(spec, out):
    assert parse_seeds(spec) == out


@pytest.mark.parametrize("spec", ["a-b", "5-2", "-1", True, 1.5])
def test_bad_seed_specs(spec):
    with pytest.raises(ConfigError, match="seeds"):
        parse_seeds(spec)


def test_repeated_seeds():
    cfg = RunConfig(seeds=[1, 1])
    with pytest.raises(ConfigError, match="seeds repeat"):
        validate(cfg)


def test_preset_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"preset": "digits_paper", "model": {"S": 0.7}, "seeds": "0-2"}))
    cfg = load_config(p, overrides=["train.epochs=3"])
    assert cfg.model.S == 0.7
    assert cfg.model.tau_ns == 14.12  # from the preset
    assert cfg.train.epochs == 3
    assert cfg.seeds == [0, 1, 2]
    assert cfg.preset == "digits_paper"


def test_every_shipped_preset_loads_and_validates():
    from hil.config import preset_names

    names = preset_names()
    assert {"digits", "digits_ctrnn", "digits_paper", "sine_square", "flipflop"} <= set(names)
    for name in names:
        cfg = load_config(preset=name)
        assert cfg.seeds and cfg.train.epochs >= 1, name
    # the paper's comparison: the CTRNN baseline has the spintronic network's architecture
    spin, ctrnn = load_config(preset="digits").model, load_config(preset="digits_ctrnn").model
    assert (spin.neuron, ctrnn.neuron) == ("spintronic", "ctrnn") and not ctrnn.highpass_on
    for key in ("n_layers", "n_hidden", "density_inter", "density_intra", "dt_ns"):
        assert getattr(spin, key) == getattr(ctrnn, key), key
    assert spin.density_inter == spin.density_intra == 0.5
    # issue 16: every trained preset integrates with the converged scheme (its figures hold
    # under a converged solution of the ODE), and the upload preset knows the thermal floor
    for name in names:
        if name != "digits_paper":
            assert load_config(preset=name).model.scheme == "expheun", name
    assert spin.thermal_d_ghz > 0
