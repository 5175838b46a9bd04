"""Issue 20 item 8: ``hil.conv.hybrid.deploy`` is the procedure's steps, each a public function whose
frozen result the next one takes. Run one at a time (a user may stop after any step and look
at its result), they write the same files and give the same numbers as ``deploy``; an error at
the bench leaves every RF source off.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from calibration.chain import read_design
from hil.bench.lab import load_lab_config
from hil.conv import hybrid
from hil.conv.images import load_digits_images
from hil.conv.network import kernels_file, save_model, train_conv
from hil.runs import RunFolder, to_json
from sims.virtual_lab.sources import RfSourceModel

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "lab_configs" / "virtual.yaml"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained network, saved as ``hil conv train`` saves it (model.pt, kernels.json)."""
    folder = tmp_path_factory.mktemp("model")
    net, _ = train_conv(load_digits_images(), epochs=5, seed=0)
    save_model(folder / "model.pt", net, {"dataset": "digits", "noise": 0.5})
    kernels_file(net, folder / "kernels.json")
    return folder


def _cfg(**overrides: object) -> hybrid.DeployConfig:
    """A small deploy: 3 images (Algorithm 3 on 1), fewer Optuna trials than the thesis's."""
    base: dict[str, object] = {"lab": str(LAB), "n_images": 3, "algorithm3_images": 1, "every": 2,
                               "noisy_repeats": 5, "place_trials": 8, "reopt_trials": 4}
    return hybrid.DeployConfig(**{**base, **overrides})  # type: ignore[arg-type]


def _files(run: RunFolder) -> set[str]:
    return {p.name for p in run.path.iterdir()}


def test_steps_one_by_one_feed_each_other_and_equal_deploy(model: Path, tmp_path: Path) -> None:
    cfg = _cfg()
    lab_cfg = load_lab_config(cfg.lab)
    run = RunFolder(tmp_path / "steps")

    network = hybrid.load_network(model, cfg.n_images)
    assert network.n_images == 3 and network.x.shape[0] == 3
    assert network.freq_hz == tuple(json.loads((model / "kernels.json").read_text())["freq_hz"])

    ref = hybrid.measure_reference(cfg, lab_cfg, run, progress=False)
    assert ref.map_csv == run.file("reference_map.csv") and ref.reference_map.complete
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.map_csv = tmp_path  # type: ignore[misc]

    design = hybrid.design_chains(cfg, lab_cfg, network, ref, run, progress=False)
    names = [f"chain{k}" for k in range(len(network.kernels))]
    assert [d.name for d in design.designs] == names
    np.testing.assert_allclose([d.target_w for d in design.designs], network.kernels)
    assert [d.freq_hz for d in design.designs] == [list(network.freq_hz)] * len(names)
    assert read_design(run.file("chain_design.json")) == list(design.designs)
    assert design.world is not None  # virtual lab: the designs are fabricated in its world
    # stopping here: nothing has touched the bench yet
    assert "instruments.json" not in _files(run) and "source_calibration.json" not in _files(run)

    with hybrid.open_bench(lab_cfg, design) as lab:
        src = hybrid.calibrate_sources(lab, cfg, network, ref, run, progress=False)
        assert src.tones.freq_hz == list(network.freq_hz) and src.tau_s > 0
        assert sorted(src.calibration.channels) == [1, 2, 3, 4]
        np.testing.assert_allclose(src.p_x1_mw / src.p_x1_mw[0],
                                   ref.rescale(np.asarray(network.freq_hz))
                                   / ref.rescale(np.asarray(network.freq_hz[:1])))

        placement = hybrid.place_chains(lab, cfg, network, ref, design, src, progress=False)
        assert [(c.name, c.port, c.voltmeter_channel) for c in placement.chains] == \
            [(n, k + 1, 1) for k, n in enumerate(names)]
        assert placement.calibration_patches.shape == (cfg.vmax_patches, 4)
        placed_z = [c.stage_z_mm for c in placement.chains]

        inference = hybrid.run_inference(lab, cfg, network, design, src, placement, run, progress=False)
        assert list(inference.plans) == cfg.plans
        assert [p["images"] for p in inference.plans.values()] == [3, 1]
        # each plan re-optimised copies: the placement step's result is as it was
        assert [c.stage_z_mm for c in placement.chains] == placed_z
        assert inference.lab_time_total_s > 0
    by_steps = hybrid.write_report(network, src, placement, inference, run)

    whole = RunFolder(tmp_path / "deploy")
    via_deploy = hybrid.deploy(model, cfg, whole, progress=False)
    assert _files(whole) - _files(run) == {"config.yaml"} and _files(run) <= _files(whole)
    steps_json = json.loads(run.file("results.json").read_text())
    assert steps_json == json.loads(whole.file("results.json").read_text())
    assert to_json(by_steps) == to_json(via_deploy)  # the return values too
    for name in ("metrics.jsonl", "source_calibration.json", "instruments.json", "reference_map.csv",
                 "report.md"):
        assert run.file(name).read_bytes() == whole.file(name).read_bytes(), name
    for plan in cfg.plans:
        a, b = np.load(run.file(f"mac_{plan}.npz")), np.load(whole.file(f"mac_{plan}.npz"))
        assert set(a.files) == set(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{plan}: {key}")
    assert read_design(run.file("chain_design.json")) == read_design(whole.file("chain_design.json"))


def test_an_error_at_the_bench_leaves_every_rf_source_off(model: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The source on and then a failure during inference: deploy's bench closes all the same."""
    cfg = _cfg(plans=["planned"], n_images=1)
    worlds = []
    real_design_chains = hybrid.design_chains

    def keep_world(*args: object, **kwargs: object) -> hybrid.DesignStep:
        step = real_design_chains(*args, **kwargs)  # type: ignore[arg-type]
        worlds.append(step.world)
        return step

    def fail_with_rf_on(conv: object, patches: object) -> None:
        conv.lab["rf_source"].output_on()  # type: ignore[attr-defined]
        raise RuntimeError("lost the stage controller")

    monkeypatch.setattr(hybrid, "design_chains", keep_world)
    monkeypatch.setattr(hybrid, "fit_v_max", fail_with_rf_on)
    with pytest.raises(RuntimeError, match="lost the stage controller"):
        hybrid.deploy(model, cfg, RunFolder(tmp_path / "run"), progress=False)
    (world,) = worlds
    sources = [m for m in world.instruments.values() if isinstance(m, RfSourceModel)]
    assert sources and not any(m.output for m in sources)
    assert not (tmp_path / "run" / "results.json").exists()
