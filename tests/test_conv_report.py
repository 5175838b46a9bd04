"""Tests for hil.conv.report: MAC error statistics, Fig. 4.9/4.10 plots, lab time, markdown."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hil.conv import report as cr

N, K, H, W = 6, 3, 8, 8
GAIN = np.array([1.05, 1.0, 0.97])  # per-kernel systematic weight error
OFFSET = np.array([-0.02, 0.0, 0.03])
CORE_NOISE = 0.01
BG_NOISE = 0.002


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    """hw = gain * sw + offset + noise on the core, small noise only on the background (sw = 0)."""
    rng = np.random.default_rng(1234)
    background = np.ones((N, H, W), dtype=bool)
    background[:, 2:6, 1:7] = False  # "clothes" in the middle of each image
    background[0, 0, 0] = False  # one extra core pixel
    sw = rng.normal(0.5, 0.3, size=(N, K, H, W))
    sw = np.where(background[:, None], 0.0, sw)
    core_hw = GAIN[None, :, None, None] * sw + OFFSET[None, :, None, None]
    core_hw = core_hw + rng.normal(0.0, CORE_NOISE, size=sw.shape)
    bg_hw = rng.normal(0.0, BG_NOISE, size=sw.shape)
    hw = np.where(background[:, None], bg_hw, core_hw)
    return {"hw": hw, "sw": sw, "bg": background}


def test_mac_error_stats_matches_hand_computation(data):
    hw, sw, bg = data["hw"], data["sw"], data["bg"]
    stats = cr.mac_error_stats(hw, sw, bg)
    assert list(stats) == ["kernel0", "kernel1", "kernel2", "all"]
    json.dumps(stats)  # plain numbers only
    n_bg = int(bg.sum())
    n_core = N * H * W - n_bg
    for k in range(K):
        hk, sk = hw[:, k], sw[:, k]
        e_bg = hk[bg] - sk[bg]
        e_core = hk[~bg] - sk[~bg]
        s_bg, s_core = stats[f"kernel{k}"]["background"], stats[f"kernel{k}"]["core"]
        assert s_bg["count"] == n_bg and s_core["count"] == n_core
        assert isinstance(s_bg["count"], int) and isinstance(s_core["mean"], float)
        assert s_bg["mean"] == pytest.approx(e_bg.mean(), abs=1e-12)
        assert s_bg["std"] == pytest.approx(e_bg.std(), rel=1e-9)
        assert s_bg["rms"] == pytest.approx(np.sqrt(np.mean(e_bg**2)), rel=1e-9)
        assert "slope" not in s_bg and "rel_rms" not in s_bg
        assert s_core["mean"] == pytest.approx(e_core.mean(), abs=1e-12)
        assert s_core["std"] == pytest.approx(e_core.std(), rel=1e-9)
        rms = np.sqrt(np.mean(e_core**2))
        assert s_core["rms"] == pytest.approx(rms, rel=1e-9)
        assert s_core["rel_rms"] == pytest.approx(rms / np.sqrt(np.mean(sk[~bg] ** 2)), rel=1e-9)
        slope, intercept = np.polyfit(sk[~bg], hk[~bg], 1)
        assert s_core["slope"] == pytest.approx(slope, rel=1e-9)
        assert s_core["intercept"] == pytest.approx(intercept, abs=1e-9)
        # and the physics we injected: slope ~ gain, background noise ~ voltmeter noise only
        assert s_core["slope"] == pytest.approx(GAIN[k], abs=0.01)
        assert abs(s_bg["mean"]) < 3 * BG_NOISE / np.sqrt(n_bg) + 1e-4
        assert s_bg["std"] == pytest.approx(BG_NOISE, rel=0.25)
    kernel1 = stats["kernel1"]["core"]  # ideal weights: only noise
    assert kernel1["slope"] == pytest.approx(1.0, abs=0.01)
    assert kernel1["rel_rms"] == pytest.approx(CORE_NOISE / np.sqrt(0.5**2 + 0.3**2), rel=0.3)
    # pooled over kernels
    mask = np.broadcast_to(bg[:, None], hw.shape)
    e_all = hw[~mask] - sw[~mask]
    assert stats["all"]["core"]["count"] == K * n_core
    assert stats["all"]["background"]["count"] == K * n_bg
    assert stats["all"]["core"]["mean"] == pytest.approx(e_all.mean(), abs=1e-12)
    assert stats["all"]["core"]["rms"] == pytest.approx(np.sqrt(np.mean(e_all**2)), rel=1e-9)


def test_mac_error_stats_empty_group_is_none():
    sw = np.ones((2, 1, 3, 3))
    stats = cr.mac_error_stats(sw + 0.1, sw, np.zeros((2, 3, 3), dtype=bool))
    assert stats["kernel0"]["background"] == {"count": 0, "mean": None, "std": None, "rms": None}
    assert stats["kernel0"]["core"]["mean"] == pytest.approx(0.1)
    assert stats["kernel0"]["core"]["slope"] is None  # constant sw: slope undefined


@pytest.mark.parametrize(
    ("hw_shape", "sw_shape", "bg_shape", "match"),
    [
        ((2, 3, 4, 4), (2, 3, 4, 5), (2, 4, 4), "same shape"),
        ((2, 3, 4, 4), (2, 3, 4, 4), (2, 4, 5), r"background mask must have shape \(N_images, H, W\)"),
        ((3, 4, 4), (3, 4, 4), (3, 4, 4), r"mac_hw must have shape \(N_images, K_kernels, H, W\)"),
    ],
)
def test_mac_shape_errors(tmp_path, hw_shape, sw_shape, bg_shape, match):
    hw, sw, bg = np.zeros(hw_shape), np.zeros(sw_shape), np.zeros(bg_shape, dtype=bool)
    with pytest.raises(ValueError, match=match):
        cr.mac_error_stats(hw, sw, bg)
    with pytest.raises(ValueError, match=match):
        cr.plot_mac_comparison(hw, sw, bg, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_mac_mask_dtype_and_kernel_names_errors(tmp_path):
    sw = np.zeros((2, 3, 4, 4))
    with pytest.raises(ValueError, match="boolean"):
        cr.mac_error_stats(sw, sw, np.full((2, 4, 4), 0.5))
    with pytest.raises(ValueError, match="kernel_names has 2 entries"):
        cr.plot_mac_comparison(sw, sw, np.zeros((2, 4, 4), dtype=bool), tmp_path / "x.png", ["a", "b"])


def test_plot_convolved_shape_errors(tmp_path):
    img = np.zeros((8, 8))
    with pytest.raises(ValueError, match="same shape"):
        cr.plot_convolved(img, np.zeros((3, 4, 4)), np.zeros((3, 4, 5)), tmp_path / "c.png")
    with pytest.raises(ValueError, match="image must be 2-D"):
        cr.plot_convolved(np.zeros((1, 8, 8)), np.zeros((3, 4, 4)), np.zeros((3, 4, 4)), tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"maps_sw must have shape \(K_kernels, H, W\)"):
        cr.plot_convolved(img, np.zeros((4, 4)), np.zeros((4, 4)), tmp_path / "c.png")


def _assert_png(path, min_bytes=5000):
    assert path.exists()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > min_bytes


def test_plot_mac_comparison_writes_png(tmp_path, data):
    out = cr.plot_mac_comparison(data["hw"], data["sw"], data["bg"], tmp_path / "sub" / "fig49.png",
                                 kernel_names=["filter 0", "filter 1", "filter 2"])
    assert out == tmp_path / "sub" / "fig49.png"
    _assert_png(out)


def test_plot_confusions_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
    hard = rng.integers(0, 3, size=(10, 10)) + np.diag(rng.integers(5, 12, size=10))
    noisy = hard + rng.random((10, 10))  # averaged over noise draws: non-integer counts
    out = cr.plot_confusions({"software (noisy)": noisy, "hardware": hard}, tmp_path / "conf.png", classes,
                             accuracies={"software (noisy)": 0.884, "hardware": 88.0})
    _assert_png(out)
    with pytest.raises(ValueError, match="expected"):
        cr.plot_confusions({"hardware": hard[:9, :9]}, tmp_path / "bad.png", classes)
    with pytest.raises(ValueError, match="empty"):
        cr.plot_confusions({}, tmp_path / "bad.png", classes)


def test_plot_convolved_writes_png(tmp_path, data):
    rng = np.random.default_rng(3)
    img = rng.random((16, 16))
    maps_sw = data["sw"][0]
    out = cr.plot_convolved(img, maps_sw, data["hw"][0], tmp_path / "conv.png")
    _assert_png(out)
    # identical maps: zero difference must not break the colour scale
    _assert_png(cr.plot_convolved(img, maps_sw, maps_sw, tmp_path / "conv0.png"))


def test_plot_lab_time_writes_png(tmp_path):
    plans = {
        "Algorithm 3 as written": {
            "source settling": 400.0, "stage moves": 300.0, "voltmeter readings": 250.0,
            "switching": 30.0, "re-optimisation": 60.0, "other": 10.0,
        },
        "planned": {"source settling": 60.0, "voltmeter readings": 90.0, "switching": 5.0, "other": 5.0},
        "fast": {"voltmeter readings": 20.0},
    }
    _assert_png(cr.plot_lab_time(plans, tmp_path / "lab.png"))
    two = {"old": {"a": 10.0, "b": 5.0}, "new": {"a": 2.0}}
    _assert_png(cr.plot_lab_time(two, tmp_path / "lab2.png", title="two plans"))
    with pytest.raises(ValueError, match=">= 0"):
        cr.plot_lab_time({"x": {"a": -1.0}}, tmp_path / "bad.png")


def test_write_report_markdown(tmp_path, data):
    stats = cr.mac_error_stats(data["hw"], data["sw"], data["bg"])
    sections = {
        "Summary": "Hardware accuracy matches noisy software.\n",
        "Accuracy": {"hardware": 0.88, "software (noisy)": 0.884, "software": 0.9, "n_images": 100},
        "Core error": {k: v["core"] for k, v in stats.items()},
        "MAC stats": stats,
        "Notes": ["drift | re-optimised every 10 images", 3],
    }
    out = cr.write_report_markdown(tmp_path, sections, title="Conv layer report")
    assert out == tmp_path / "report.md"
    text = out.read_text()
    assert text.startswith("# Conv layer report\n")
    assert "## Accuracy" in text and "| key | value |" in text
    assert "| hardware | 0.88 |" in text
    assert "| software (noisy) | 0.884 |" in text
    assert "| n_images | 100 |" in text
    assert "| | count | mean | std | rms | rel_rms | slope | intercept |" in text
    assert f"| kernel0 | {stats['kernel0']['core']['count']} |" in text
    assert f"| kernel1.background.count | {stats['kernel1']['background']['count']} |" in text
    assert "- drift | re-optimised every 10 images" in text and "- 3" in text
    assert "Hardware accuracy matches noisy software." in text
    # deterministic
    again = cr.write_report_markdown(tmp_path / "r2.md", sections, title="Conv layer report")
    assert again.read_text() == text


# --------------------------------------------------------------------------- the deploy report


def test_wilson_interval_solves_the_score_equation():
    z = 1.959963984540054
    for p, n in ((0.88, 100), (0.5, 7), (0.03, 250)):
        lo, hi = cr.wilson_interval(p, n)
        assert lo < p < hi
        for bound in (lo, hi):  # the bounds are where |p - p0| = z * sqrt(p0 (1 - p0) / n)
            assert (p - bound) ** 2 == pytest.approx(z * z * bound * (1 - bound) / n, rel=1e-9)
    assert cr.wilson_interval(0.88, 100) == pytest.approx((0.8019, 0.9300), abs=5e-5)
    assert cr.wilson_interval(1.0, 4) == pytest.approx((4 / (4 + z * z), 1.0))  # never above 1
    assert cr.wilson_interval(0.0, 4)[0] == 0.0
    with pytest.raises(ValueError, match="fraction"):
        cr.wilson_interval(88.0, 100)
    rows = cr.accuracy_rows({"hardware": (0.88, 100)})
    assert rows == {"hardware": {"accuracy (%)": "88.0", "95 % CI (%)": "80.2 - 93.0", "images": 100}}


def test_effective_weights_recover_the_kernels():
    rng = np.random.default_rng(5)
    w = np.array([[0.5, -0.2, 0.1, 0.9], [-1.2, 0.4, 0.0, 0.3]])
    patches = rng.random((3, 4, 4, 4)) * (rng.random((3, 4, 4, 1)) > 0.3)
    mac = np.einsum("nhwi,ki->nkhw", patches, w) + rng.normal(0, 1e-3, (3, 2, 4, 4))
    measured = patches.sum(-1) > 0
    got = cr.effective_weights(mac, patches, measured)
    assert got == pytest.approx(w, abs=3e-3)
    mac_bad = mac.copy()
    mac_bad[:, 0] *= 1.1  # a chain 10 % too strong
    assert cr.effective_weights(mac_bad, patches, measured)[0] == pytest.approx(1.1 * w[0], abs=3e-3)
    one_pixel = np.zeros_like(patches)
    one_pixel[..., 0] = 1.0  # only one input ever lit: the other weights are undetermined
    assert cr.effective_weights(mac, one_pixel) is None


def test_weight_error_rows_by_hand():
    rows = cr.weight_error_rows({"chain0": [0.5, -0.25], "chain1": [1.0, 2.0]},
                                {"chain0": [0.52, -0.25], "chain1": [1.1, 1.9], "other": [0.0, 0.0]})
    assert list(rows) == ["chain0", "chain1", "all"]
    assert rows["chain0"]["mean |dw| (% of w=1)"] == 1.0 and rows["chain0"]["max |dw| (% of w=1)"] == 2.0
    assert rows["chain0"]["mean |dw| (% of max |w|)"] == 2.0
    assert rows["chain1"]["mean |dw| (% of w=1)"] == 10.0
    assert rows["chain1"]["mean |dw| (% of max |w|)"] == 5.0
    assert rows["all"]["mean |dw| (% of w=1)"] == 5.5 and rows["all"]["max |dw| (% of w=1)"] == 10.0


def _deploy_folder(tmp_path, w_hw):
    """A deploy run folder as ``hil.conv.hybrid.deploy`` writes it (the files the report reads)."""
    import yaml

    rng = np.random.default_rng(2)
    targets = [[0.5, -0.2, 0.1, 0.9], [-1.2, 0.4, 0.0, 0.3]]
    images = rng.random((4, 6, 6)) * (rng.random((4, 6, 6)) > 0.4)
    from calibration.mac import patches_2x2

    p = patches_2x2(images)
    measured = p.sum(-1) > 0
    mac_sw = np.einsum("nhwi,ki->nkhw", p, np.array(targets))
    mac_hw = np.einsum("nhwi,ki->nkhw", p, np.array(w_hw))
    np.savez(tmp_path / "mac_planned.npz", mac_hw=mac_hw, measured=measured, mac_sw=mac_sw)
    np.savez(tmp_path / "mac_algorithm3.npz", mac_hw=mac_hw[:1], measured=measured[:1], mac_sw=mac_sw[:1])
    stats = cr.mac_error_stats(mac_hw, mac_sw, ~measured)
    plan = {"images": 4, "accuracy": 0.75, "software_accuracy_same_images": 1.0, "lab_s_per_image": 500.0,
            "time_s_per_image": {"source settling": 300.0, "voltmeter readings": 150.0, "stage moves": 50.0},
            "ops_per_image": {"voltmeter readings": 160.0, "stage moves (re-optimisation)": 75.0,
                              "patches known zero": 20.0},
            "clipped_inputs": 6, "mac_stats": stats}
    alg3 = {**plan, "images": 1, "accuracy": 1.0, "lab_s_per_image": 5000.0, "clipped_inputs": 2,
            "time_s_per_image": {"source settling": 4500.0, "voltmeter readings": 500.0}}
    results = {"dataset": "digits", "n_images": 4, "model": "m/model.pt", "source": {"tau_s": 1.03},
               "software": {"accuracy": 1.0, "noisy_accuracy": 0.9, "noise": 0.5, "noisy_repeats": 20},
               "plans": {"planned": plan, "algorithm3": alg3}, "lab_time_total_s": 9000.0,
               "speedup": {"lab_time": 10.0}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(
        {"model": "m/model.pt", "dataset": "digits",
         "deploy": {"n_images": 4, "every": 2, "nplc": 5.0, "map_csv": None,
                    "plans": ["planned", "algorithm3"]}}))
    (tmp_path / "chain_design.json").write_text(json.dumps({"chains": [
        {"name": "chain0", "target_w": targets[0], "predicted_w": [0.5, -0.2, 0.1, 0.88]},
        {"name": "chain1", "target_w": targets[1], "predicted_w": targets[1]}]}))
    (tmp_path / "reference_map.csv").write_text(
        "device,stage_z_mm,freq_hz,power_dbm,voltage_v,offset_v,lab_time_s\n"
        "ref0,17.5,1e9,16,1e-6,0,1.5\nref0,17.5,2e9,16,1e-6,0,300.0\n")
    return images


def test_deploy_report_in_percent_with_settings_lab_time_clipping_and_weight_errors(tmp_path):
    w_hw = [[0.5, -0.2, 0.1, 0.95], [-1.2, 0.4, 0.0, 0.3]]  # chain0's last synapse 5 points off
    images = _deploy_folder(tmp_path, w_hw)
    text = cr.deploy_report(tmp_path, images).read_text()
    assert text.startswith("# Hybrid convolutional network on spin-diode chains")
    sections = {s.split("\n", 1)[0]: s for s in text.split("\n## ")[1:]}
    acc = next(v for k, v in sections.items() if k.startswith("Accuracy"))
    assert "Wilson" in acc.split("\n", 1)[0]
    lo, hi = cr.wilson_interval(0.75, 4)
    assert f"| hardware, measurement plan | 75.0 | {100 * lo:.1f} - {100 * hi:.1f} | 4 |" in acc
    assert "| software, noisy (n_l 0.5, 20 passes per image) | 90.0 |" in acc
    assert "| software on the same 1 image(s) | 100.0 |" in acc
    # lab time: reference map 300 s + setup 9000 - 4 * 500 - 5000 = 2000 s + inference 2000 + 5000 s
    total = next(k for k in sections if k.startswith("Lab time:"))
    assert total == "Lab time: 9300 s (2.58 h) in total"
    lab = sections[total]
    assert "| reference map (its own session) | 300 | 0.083 | 3.2 |" in lab
    assert "| source calibration, settling, placement | 2000 |" in lab
    assert "| inference, measurement plan (4 image(s)) | 2000 |" in lab and "| total | 9300 |" in lab
    kinds = sections["Lab time by operation kind, measurement plan (4 image(s), 2000 s (0.56 h))"]
    assert "| source settling | 1200.0 | 300.00 | 60.0 |" in kinds
    assert "| stage moves | 200.0 | 50.00 | 10.0 |" in kinds
    assert "Lab time by operation kind, Algorithm 3 as written (1 image(s), 5000 s (1.39 h))" in sections
    clipped = next(v for k, v in sections.items() if k.startswith("Clipped inputs"))
    assert "| measurement plan | 6 | 1.5 |" in clipped and "| Algorithm 3 as written | 2 | 2 |" in clipped
    design = next(v for k, v in sections.items() if k.startswith("Chain weight errors of the design"))
    assert "| chain0 | 0.5 | 2 | 0.56 |" in design and "| chain1 | 0 | 0 | 0 |" in design
    hw = next(v for k, v in sections.items() if k.startswith("Chain weight errors in hardware, measurement"))
    assert "| chain0 | 1.25 | 5 | 1.39 | [+0.5000, -0.2000, +0.1000, +0.9500] |" in hw
    assert "| chain1 | 0 | 0 | 0 |" in hw
    assert any(k.startswith("Chain weight errors in hardware, Algorithm 3") for k in sections)
    settings = sections["Settings"]
    for row in ("| deploy.every | 2 |", "| deploy.nplc | 5 |", "| dataset | digits |",
                "| software noise n_l | 0.5 |", "| source settling tau (s) | 1.03 |"):
        assert row in settings
    ops = sections["Instrument operations per image"]
    assert "stage moves (re-optimisation)" in ops and "patches known zero" not in ops
    # without the images: no hardware weights, the rest unchanged; a given map: no map time
    import yaml

    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    cfg["deploy"]["map_csv"] = "elsewhere/reference_map.csv"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    text = cr.deploy_report(tmp_path).read_text()
    assert "Chain weight errors in hardware" not in text and "Chain weight errors of the design" in text
    assert "reference map (its own session)" not in text and "Lab time: 9000 s (2.50 h) in total" in text


def test_hil_conv_report_rewrites_a_run_folders_report(tmp_path, capsys):
    from hil.cli import main

    _deploy_folder(tmp_path, [[0.5, -0.2, 0.1, 0.9], [-1.2, 0.4, 0.0, 0.3]])
    (tmp_path / "report.md").write_text("# old report, fractions only\n")
    assert main(["conv", "report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model not found" in out and "report.md" in out  # m/model.pt does not exist here
    text = (tmp_path / "report.md").read_text()
    assert "old report" not in text and "95 % CI (%)" in text and "Lab time: 9300 s" in text
    assert main(["conv", "report", str(tmp_path / "nothing")]) == 2
    assert "no results.json" in capsys.readouterr().err
