"""Tests for hil.conv_report: MAC error statistics, Fig. 4.9/4.10 plots, lab time, markdown."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hil import conv_report as cr

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
