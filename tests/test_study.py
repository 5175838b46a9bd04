"""Upload and evaluate, the sim-to-real report, the mismatch study and their commands."""

import json

import pytest

from hil.chip.backends import make_backend
from hil.chip.study import METHODS, mismatch_study, sim_to_real_report, upload_and_evaluate
from hil.cli import main
from hil.config import HardwareConfig, ModelConfig, RunConfig, TaskConfig, TrainConfig
from hil.network.tasks import SequentialDigits
from hil.runs import RunFolder
from hil.training.train import Trainer

MC = ModelConfig(n_layers=2, n_hidden=8, tau_ns=5.0, S=1.0, S_in=2.5, b_in=0.4, w_clip_dt=0.9, b_clip_dt=0.2)
TINY = ["--seeds", "0", "--epochs", "1", "--set", "model.n_hidden=4", "--set", "model.n_layers=2",
        "--set", "train.batch_size=450", "--no-progress"]


@pytest.fixture(scope="module")
def digits():
    return SequentialDigits(TaskConfig())


@pytest.fixture(scope="module")
def trained(digits):
    tc = TrainConfig(epochs=3, batch_size=100, lr0=0.03)
    return Trainer([MC, MC], [tc, tc], [0, 1], digits, progress=False).fit().net


def test_upload_to_the_ideal_chip_loses_nothing_and_to_a_mismatched_chip_loses(digits, trained):
    ideal = [make_backend("model", MC, 1, digits.input_centre, s) for s in (0, 1)]
    rows = upload_and_evaluate(trained, digits, ideal)
    for r in rows:
        assert r["model"] > 0.2
        assert abs(r["gap"]) <= 1.5 / len(digits.splits["test"])  # at most one input flips (rounding)
    chips = [make_backend("sim", MC, 1, digits.input_centre, s, {"cv_gamma": 0.3, "cv_sigma": 0.3})
             for s in (0, 1)]
    rows = upload_and_evaluate(trained, digits, chips)
    assert all(r["device_loss"] > r["model_loss"] + 0.02 for r in rows), rows  # the chip is not the model
    assert all(b.counters["uploads"] == 1 and b.counters["runs"] == 3 for b in chips)  # 899 in chunks of 300


def test_sim_to_real_report_writes_numbers_and_plots(digits, trained, tmp_path):
    chips = [make_backend("sim", MC, 1, digits.input_centre, s) for s in (0, 1)]
    folder = RunFolder(tmp_path / "r")
    rep = sim_to_real_report(trained, digits, chips, folder)
    for name in ("sim_to_real.json", "sim_to_real.png", "sim_to_real_trajectories.png"):
        assert (tmp_path / "r" / name).is_file()
    saved = json.loads((tmp_path / "r" / "sim_to_real.json").read_text())
    assert saved["summary"]["gap"]["n"] == 2
    row = rep["per_seed"][0]
    assert len(row["state_rms_per_layer"]) == 2 and all(v > 0 for v in row["state_rms_per_layer"])
    assert row["gap"] == pytest.approx(row["model_accuracy"] - row["device_accuracy"])


def test_mismatch_study_writes_table_and_plot(tmp_path, mocker):
    cfg = RunConfig(model=ModelConfig(n_layers=2, n_hidden=4, tau_ns=5.0, S=1.0, S_in=2.5, b_in=0.4,
                                      w_clip_dt=0.9, b_clip_dt=0.2),
                    train=TrainConfig(epochs=1, batch_size=450, lr0=0.02), seeds=[0],
                    hardware=HardwareConfig(readout_noise=0.01))
    folder = RunFolder(tmp_path / "s")
    spy = mocker.spy(Trainer, "__init__")
    s = mismatch_study(cfg, [0.0, 0.3], folder, finetune_epochs=1, progress=False,
                       calibration={"repeats": 16, "writes": 2})
    # the run's hardware section reaches the off-chip trainers: the ideal one and the fine-tuning
    # on each level's calibrated twin (the chip-in-the-loop trainers meet the chip's own noise)
    off = [c.kwargs for c in spy.call_args_list if "off-chip" in c.kwargs.get("label", "")]
    assert len(off) == 3 and all(kw["hardware"] is cfg.hardware for kw in off)
    for name in ("mismatch_study.json", "mismatch_study.csv", "mismatch_study.md", "mismatch_study.png",
                 "metrics.jsonl", "calibration.jsonl"):
        assert (tmp_path / "s" / name).is_file(), name
    assert [r["level"] for r in s["table"]] == [0.0, 0.3]
    for row in s["table"]:
        for m in METHODS:
            assert 0 <= row[m]["median"] <= 1 and row[m]["n"] == 1
    # the ideal model's accuracy does not depend on the chip
    assert s["table"][0]["ideal"]["median"] == s["table"][1]["ideal"]["median"]
    assert len(folder.read_metrics()) == 2 * len(METHODS)
    md = (tmp_path / "s" / "mismatch_study.md").read_text()
    assert "| 30 % |" in md and "chip-in-the-loop (nominal twin)" in md
    # issue 16: every level has its gap budget; mismatch costs nothing at 0 %, and the parts add up
    for lv in ("00", "30"):
        assert (tmp_path / "s" / f"gap_budget_cv{lv}.png").is_file()
    b0 = json.loads((tmp_path / "s" / "gap_budget_cv00.json").read_text())
    b30 = json.loads((tmp_path / "s" / "gap_budget_cv30.json").read_text())
    assert b0["median_cost"]["mismatch"] == 0.0 and b30["device"]["cv_gamma"] == 0.3
    for b in (b0, b30):
        row = b["per_seed"][0]
        assert row["total_gap"] == pytest.approx(sum(p["cost"] for p in row["parts"]))
    # the uploaded chip of the budget is the study's nominal upload: same chip, same figure
    upload30 = s["table"][1]["nominal_upload"]["median"]
    assert b30["per_seed"][0]["chip"] == pytest.approx(upload30, abs=0.05)
    assert "Gap budget" in md and "| mismatch |" in md and set(s["gap_budget"]) == {"0", "0.3"}


def test_cli_train_with_backend_then_upload_with_verify(runs_dir, capsys):
    assert main(["train", "--preset", "digits", *TINY, "--backend", "sim", "--device", "cv_gamma=0.3"]) == 0
    out = capsys.readouterr().out
    assert "uploaded to sim: device accuracy median" in out
    train_folder = next(p for p in runs_dir.iterdir() if "train" in p.name)
    assert (train_folder / "upload" / "sim_to_real.json").is_file()
    cfg_used = json.loads((train_folder / "upload" / "backends.json").read_text())
    assert cfg_used[0]["parameters"]["config"]["cv_gamma"] == 0.3
    assert main(["upload", str(train_folder), "--backend", "sim", "--verify", "--max-iters", "1",
                 "--name", "v"]) == 0
    out = capsys.readouterr().out
    assert "gap median" in out and "verify seed 0" in out
    up = next(p for p in runs_dir.iterdir() if p.name.endswith("upload-v"))
    summary = json.loads((up / "summary.json").read_text())
    assert summary["verify"][0]["iterations"] <= 1 and len(summary["verify"][0]["state_rms"]) >= 1
    assert (up / "verify.jsonl").is_file() and (up / "verify_residuals_seed0.npz").is_file()
    assert (up / "sim_to_real.png").is_file()
    budget = json.loads((up / "gap_budget.json").read_text())  # issue 16: the gap, factor by factor
    assert budget["per_seed"][0]["total_gap"] == pytest.approx(
        sum(p["cost"] for p in budget["per_seed"][0]["parts"]))
    assert "gap budget" in out and (up / "gap_budget.png").is_file()
    # the same run through the lab bench (virtual lab): upload to any backend
    assert main(["upload", str(train_folder), "--backend", "lab:lab_configs/virtual.yaml",
                 "--name", "lab"]) == 0
    lab = next(p for p in runs_dir.iterdir() if p.name.endswith("upload-lab"))
    summary = json.loads((lab / "summary.json").read_text())
    assert summary["backend"] == "lab:lab_configs/virtual.yaml" and 0 <= summary["device"]["median"] <= 1
    assert summary["device_counters"][0]["uploads"] == 1 and "gap_budget" not in summary


def test_cli_study_mismatch_and_its_errors(runs_dir, capsys):
    assert main(["study", "mismatch", "--preset", "digits", *TINY, "--levels", "0.2",
                 "--finetune-epochs", "1", "--methods", "ideal,nominal_upload,chip_in_loop"]) == 0
    out = capsys.readouterr().out
    assert "| 20 % |" in out and "nominal weights uploaded" in out
    for args, words in [(["--levels", "x"], "--levels: cannot read 'x'"),
                        (["--methods", "magic"], "--methods: unknown ['magic']"),
                        (["--device", "cv_gamma=0.1"], "device.cv_gamma: is set by the study's --levels")]:
        assert main(["study", "mismatch", *TINY, *args]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    assert main(["upload", str(runs_dir / "nothing")]) == 2
    assert "no model.pt" in capsys.readouterr().err
    # checked before any instrument is opened: no lab lock, no run folder of the upload
    before = set(runs_dir.iterdir())
    assert main(["upload", str(runs_dir / "nothing"), "--backend", "lab:lab_configs/virtual.yaml"]) == 2
    assert "no model.pt" in capsys.readouterr().err
    assert set(runs_dir.iterdir()) == before
