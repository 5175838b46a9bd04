"""Issue 21 item 5: the calibration pictures (chain design, measured weights, source
calibration) and the resumable position tracking of ``hil position optimise``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_calibration_cli import LAB, run

from calibration.chain import ChainDesign
from calibration.source import ChannelCalibration, SourceCalibration
from hil import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path: Path, min_bytes: int = 10_000) -> None:
    assert path.read_bytes()[:8] == PNG
    assert path.stat().st_size > min_bytes


def _markers(ax, marker: str) -> list:
    return [ln for ln in ax.get_lines() if ln.get_marker() == marker]


def _designs() -> list[ChainDesign]:
    f = [1.75e9, 2.25e9, 2.75e9, 3.25e9]
    z = [100.0, 180.0, 260.0, 340.0]
    return [ChainDesign("chain0", f, [-0.13, -0.39, -0.27, 0.36], z, [10.0, 40.0, 30.0, -36.0], 1e-5, 2e-5),
            ChainDesign("chain1", f, [-0.23, 0.25, -0.23, 0.23], z, [24.0, -26.0, 24.0, -24.0], 1e-5, 2e-5)]


def test_chain_design_plot_has_a_panel_per_chain_and_every_diode(tmp_path):
    def resonance_hz(z_um):  # a made-up Kittel-like law: f rises with |z|
        return 1.0e9 + 6.0e6 * np.abs(np.asarray(z_um, float))

    fig = plots.chain_design(_designs(), tmp_path / "chain_design.png", resonance_hz)
    _png(tmp_path / "chain_design.png")
    assert len(fig.axes) == 2
    for ax, d in zip(fig.axes, _designs(), strict=True):
        assert ax.get_title().startswith(d.name)
        (up,) = _markers(ax, "^")
        (down,) = _markers(ax, "v")
        z, dz = np.array(d.z_um), np.array(d.dz_um)
        assert up.get_xdata() == pytest.approx(z - dz / 2)       # reference-sign diodes
        assert down.get_xdata() == pytest.approx(z + dz / 2)
        assert up.get_ydata() == pytest.approx(resonance_hz(z - dz / 2) / 1e9)  # on f_r(z)
        (centre,) = _markers(ax, "x")
        assert centre.get_ydata() == pytest.approx(np.array(d.freq_hz) / 1e9)
        texts = [t.get_text() for t in ax.texts]
        assert sum(t.startswith("s") and "GHz" in t for t in texts) == len(z)
        assert f"{resonance_hz(z[1] - dz[1] / 2)[()] / 1e9:.3f}" in texts
    # without the map's law the diodes sit at their synapse's input frequency
    fig = plots.chain_design(_designs()[:1], tmp_path / "one.png")
    assert len(fig.axes) == 1
    assert _markers(fig.axes[0], "v")[0].get_ydata() == pytest.approx(np.array(_designs()[0].freq_hz) / 1e9)


def test_chain_weights_plot_annotates_the_errors(tmp_path):
    rows = [{"name": "chain0", "target_w": [-0.1322, -0.3949, -0.2745, 0.3621],
             "measured_w": [-0.1300, -0.3900, -0.2800, 0.3700], "v_max_v": 5e-5},
            {"name": "chain1", "target_w": [-0.2338, 0.2530, -0.2336, 0.2327],
             "measured_w": [-0.2338, 0.2530, -0.2336, 0.2327], "v_max_v": 4e-5},
            {"name": "chain2", "target_w": [-0.2177, -0.1121, 0.2409, 0.1869],
             "measured_w": [-0.20, -0.11, 0.25, 0.19]}]
    fig = plots.chain_weights(rows, tmp_path / "w.png")
    _png(tmp_path / "w.png")
    assert len(fig.axes) == 3
    ax = fig.axes[0]
    assert "mean |dw| 0.51 %" in ax.get_title() and "V_max 50.00 uV" in ax.get_title()
    assert {t.get_text() for t in ax.texts} == {"w0: 0.22 %", "w1: 0.49 %", "w2: 0.55 %", "w3: 0.79 %"}
    identity = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"][0]
    assert list(identity.get_xdata()) == list(identity.get_ydata())
    assert "mean |dw| 0.00 %" in fig.axes[1].get_title()
    assert "V_max" not in fig.axes[2].get_title()


def test_source_calibration_plot_has_f_and_p_per_channel(tmp_path):
    tuning = np.arange(0.0, 20.01, 1.0)
    amps = np.arange(0.0, 6.01, 0.25)
    p_mw = np.where(amps > 1.6, 30 * (amps - 1.6), 1e-4)
    chans = {}
    for ch, f0 in ((1, 1.6e9), (3, 2.6e9)):
        chans[ch] = ChannelCalibration(ch, tuning.tolist(), (f0 + 5e7 * tuning).tolist(), f0 + 2e8,
                                       amps.tolist(), (10 * np.log10(p_mw)).tolist(), 1.75, 4.7,
                                       [0.0, 0.0, 30.0, -48.0])
    cal = SourceCalibration(chans, {"freq_hz": [1e9, 4e9], "attenuation_db": [1.0, 2.0]})
    fig = plots.source_calibration(cal, tmp_path / "s.png")
    _png(tmp_path / "s.png")
    assert len(fig.axes) == 4  # f(V) and P(V) for each of the two channels
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "channel 1: f(V)" and titles[1] == "channel 3: f(V)"
    assert titles[2].startswith("channel 1: P(V)") and titles[3].startswith("channel 3: P(V)")
    measured, fit = fig.axes[2].get_lines()[:2]
    assert measured.get_ydata() == pytest.approx(p_mw, rel=1e-9)
    assert fit.get_xdata().min() == pytest.approx(1.75) and fit.get_xdata().max() == pytest.approx(4.7)
    assert fit.get_ydata() == pytest.approx(30 * fit.get_xdata() - 48)
    # the operating point sits on the tuning curve
    op = fig.axes[0].get_lines()[2]
    assert op.get_ydata()[0] == pytest.approx(1.8) and op.get_xdata()[0] == pytest.approx(4.0, abs=1e-6)


# --------------------------------------------------------------------------- on the virtual lab


@pytest.fixture(scope="module")
def designed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A coarse reference map and the thesis chains designed from it (``hil chain design``)."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HIL_RUNS", str(root))
        assert run("calibrate", "reference", LAB, "--no-record", "--reference-sample", "--z-step", "0.5",
                   "--f-step", "100e6") == 0
        (ref,) = root.glob("*calibrate-reference")
        assert run("chain", "design", "--map", str(ref / "reference_map.csv")) == 0
        (des,) = root.glob("*chain-design")
    return ref / "reference_map.csv", des / "chain_design.json", des / "chain_design.png"


def test_chain_design_and_measure_draw_their_pictures(designed, runs_dir):
    csv, design, png = designed
    _png(png, 30_000)
    assert run("chain", "measure", LAB, "--design", str(design), "--map", str(csv), "--fabricate",
               "--ports", "chain0=1,chain2=3", "--n-avg", "2", "--no-record") == 0
    (folder,) = runs_dir.glob("*chain-measure")
    _png(folder / "chain_weights.png")
    weights = json.loads((folder / "weights.json").read_text())
    assert [c["name"] for c in weights["chains"]] == ["chain0", "chain2"]


def _positions(folder: Path) -> dict:
    return json.loads((folder / "positions.json").read_text())


def test_position_tracking_resumes_after_an_interrupt(designed, runs_dir, monkeypatch, capsys):
    import calibration.position as position
    from hil.errors import HilError

    csv, design, _ = designed
    args = ["position", "optimise", LAB, "--design", str(design), "--map", str(csv), "--fabricate",
            "--ports", "chain2=3", "--trials", "3", "--reopt-trials", "3", "--track-inputs", "5",
            "--every", "2", "--wait-s", "30", "--no-record"]
    assert run(*args) == 0  # uninterrupted
    (whole,) = runs_dir.glob("*position-optimise*")
    full = _positions(whole)
    assert full["tracking"]["chain2"]["optimised_at"] == [0, 2, 4]
    capsys.readouterr()

    real = position.measure_inputs_v

    def interrupting(*a, **k):  # Ctrl-C while measuring the input after the third saved one
        for f in runs_dir.glob("*position-optimise*/tracking.csv"):
            if f.parent != whole and len(f.read_text().splitlines()) > 3:
                raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(position, "measure_inputs_v", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run(*args)
    (part,) = [p for p in runs_dir.glob("*position-optimise*") if p != whole]
    first = json.loads((part / "position_state.json").read_text())
    assert first["sessions"] == 1 and first["lab_time_s"] > 0
    assert first["chains"]["chain2"]["stage_z_mm"] == full["chains"]["chain2"]["stage_z_mm"]
    kept = position.read_track_rows(part / "tracking.csv")["chain2"]
    assert [r["input"] for r in kept] == [0, 1, 2]
    # the same bench and seed: what was kept is what the uninterrupted run measured
    for key in ("input_m", "lab_time_s"):
        assert [r[key.removeprefix("input_")] for r in kept] == full["tracking"]["chain2"][key][:3]
    assert not (part / "positions.json").exists()
    monkeypatch.setattr(position, "measure_inputs_v", real)

    with pytest.raises(HilError, match=r"settings differ.*every: 2 in the run, 3 now"):
        run(*args[:-5], "--every", "3", *args[-3:], "--resume", str(part))
    capsys.readouterr()
    assert run(*args, "--resume", str(part)) == 0
    out = capsys.readouterr().out
    assert "resuming the track at input 3 of 5" in out and "over 2 session(s)" in out
    assert "uV, M " not in out  # chain2 was optimised before the interrupt: not again
    done = _positions(part)
    t, u = done["tracking"]["chain2"], full["tracking"]["chain2"]
    assert t["input_index"] == [0, 1, 2, 3, 4]
    assert t["optimised_at"] == [0, 2, 3, 4]  # the resumed session re-optimises first
    assert t["input_m"][:3] == u["input_m"][:3] and t["z_mm"][:2] == u["z_mm"][:2]
    assert done["run_inputs_tone"] == full["run_inputs_tone"]
    rows = position.read_track_rows(part / "tracking.csv")["chain2"]
    assert [r["session"] for r in rows] == [1, 1, 1, 2, 2]
    assert [r["tone"] for r in rows] == full["run_inputs_tone"]["chain2"]
    assert np.all(np.diff(t["lab_time_s"]) > 0)  # continues, no restart from 0
    assert t["lab_time_s"][3] > first["lab_time_s"]
    assert max(t["input_m"]) < 0.5
    assert done["sessions"] == 2 and done["lab_time_s"] > first["lab_time_s"] + 2 * 30
    lab_time = json.loads((part / "lab_time.json").read_text())
    assert lab_time == {"command": "position optimise", "lab_time_s": done["lab_time_s"], "sessions": 2}
    _png(part / "position_tracking.png")


def test_position_tracking_plot_draws_each_chains_metric_z_and_v_max(tmp_path, monkeypatch):
    """Thesis Fig. 4.8 (``hil position optimise``): three panels over the inputs, a line per chain
    in each, holding the tracked values; a dashed line marks each re-optimisation."""
    from matplotlib.colors import to_hex

    from calibration.position import Tracking

    tracks = {"c1": Tracking([0, 1, 2, 3], [0.01, 0.02, 0.015, 0.03], [0.0, 1.0, 2.0, 3.0], [0, 2],
                             [20.4, 20.412], [1e-6, 1.1e-6]),
              "c2": Tracking([0, 1, 2, 3], [0.05, 0.04, 0.06, 0.02], [0.0, 1.0, 2.0, 3.0], [0, 3],
                             [19.8, 19.795], [2e-6, 1.5e-6])}
    figures = []
    real_save = plots.save_figure

    def keep(fig, path, **kw):  # the figure as drawn, then saved as usual
        figures.append(fig)
        return real_save(fig, path, **kw)

    monkeypatch.setattr(plots, "save_figure", keep)
    out = plots.position_tracking(tracks, tmp_path / "position_tracking.png")
    assert out == tmp_path / "position_tracking.png"
    head = out.read_bytes()[:24]
    assert head[:8] == PNG
    size = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert size == (800, 900)  # 8 x 9 in at 100 dpi
    (fig,) = figures
    a, b, c = fig.axes
    assert a.get_shared_x_axes().joined(a, c) and b.get_shared_x_axes().joined(a, b)  # one input axis
    for ax, marker in ((a, "."), (b, "o"), (c, "o")):
        drawn = _markers(ax, marker)
        assert [ln.get_label() for ln in drawn] == ["c1", "c2"]  # a line per chain, in order
        assert all(ln.get_linestyle() == "-" for ln in drawn)
    for ln, t in zip(_markers(a, "."), tracks.values(), strict=True):
        assert list(ln.get_xdata()) == t.input_index and list(ln.get_ydata()) == t.input_m
    for ln, t in zip(_markers(b, "o"), tracks.values(), strict=True):  # z from the first optimum, um
        assert list(ln.get_xdata()) == t.optimised_at
        assert ln.get_ydata() == pytest.approx(1e3 * (np.array(t.z_mm) - t.z_mm[0]))
    assert list(_markers(b, "o")[0].get_ydata()) == pytest.approx([0.0, 12.0])
    for ln, t in zip(_markers(c, "o"), tracks.values(), strict=True):  # V_max in uV
        assert list(ln.get_xdata()) == t.optimised_at
        assert ln.get_ydata() == pytest.approx(1e6 * np.array(t.v_max_v))
    dashed = [ln for ln in a.get_lines() if ln.get_linestyle() == "--"]
    assert [ln.get_xdata()[0] for ln in dashed] == [0, 2, 0, 3]  # each chain's optimisations
    assert all(to_hex(ln.get_color()) == "#808080" and ln.get_linewidth() == 0.5 for ln in dashed)
    assert a.get_ylabel() == "|V - V_max w.x| / V_max" and "optimisations dashed" in a.get_title()
    assert b.get_ylabel() == "optimal z - first (um)"
    assert c.get_ylabel() == "V_max (uV)" and c.get_xlabel() == "input"
    assert [t.get_text() for t in a.get_legend().get_texts()] == ["c1", "c2"]
