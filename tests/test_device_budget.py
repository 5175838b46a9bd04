"""Chip-in-the-loop on a device-time budget, and the gradient estimators (issue 22).

- Device time counts uploads (programming the chip) as well as runs.
- ``device_budget_s`` stops a trial once its chip has spent the budget on training and puts back
  its best weights so far; the stopped chip stays idle.
- On a noiseless, mismatch-free chip every estimator's gradient agrees with the model's exact
  gradient: the physics-aware one exactly, the twin steps exactly, SPSA in expectation within
  the variance it reports.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_chip_in_loop import IDEAL, MC  # the small network and the ideal chip of those tests

from hil.chip.backends import ModelBackend, make_backend
from hil.chip.budget_study import budget_table, time_to_reach
from hil.chip.chip_in_loop import ChipInTheLoop, ChipInTheLoopTrainer
from hil.chip.estimators import SPSA, PhysicsAware, TwinPeriodic, make_estimator, reidentify
from hil.cli import main
from hil.config import TaskConfig, TrainConfig
from hil.errors import ConfigError
from hil.network.model import DynamicalNetwork
from hil.network.tasks import SequentialDigits


@pytest.fixture(scope="module")
def digits():
    return SequentialDigits(TaskConfig())


# --------------------------------------------------------------------------- device time

def test_device_time_counts_uploads(digits):
    be = make_backend("sim", MC, 1, digits.input_centre, 0, ["program_overhead_s=0.25", "call_overhead_s=0"])
    net = DynamicalNetwork([MC], 1, 10, [0], digits.input_centre)
    be.upload(net.layer_weights(0))
    assert be.counters["upload_time_s"] == pytest.approx(0.25)
    assert be.counters["device_time_s"] == pytest.approx(0.25)  # nothing run yet: the upload alone
    m = be.run(digits.splits["train"].x[:3])
    assert be.counters["device_time_s"] == pytest.approx(0.25 + m.device_time_s)
    # the chip's own clock agrees: uploads are device time there too
    chip_clock = be.describe()["parameters"]["counters"]["device_time_s"]
    assert chip_clock == pytest.approx(be.counters["device_time_s"])


def test_chip_in_the_loop_counts_training_and_test_time_apart(digits):
    be = [make_backend("sim", MC, 1, digits.input_centre, 0, IDEAL)]
    tr = ChipInTheLoopTrainer([MC], [TrainConfig(epochs=1, batch_size=450)], [0], digits, be, progress=False)
    res = tr.fit()
    rec = res.history[-1]
    assert rec["upload_time_s"] > 0 and rec["device_time_s"] > rec["train_device_time_s"] > 0
    # the test split was measured once (epoch end): its device time is the difference
    test_runs = math.ceil(len(digits.splits["test"]) / 256)
    assert tr.loop.test_time_s[0] == pytest.approx(rec["device_time_s"] - rec["train_device_time_s"])
    assert test_runs >= 1


# --------------------------------------------------------------------------- the budget stop

def test_budget_stop_keeps_the_best_weights_and_idles_the_chip(digits):
    be = [make_backend("sim", MC, 1, digits.input_centre, s, ["cv_gamma=0.2"]) for s in (0, 1)]
    tc = TrainConfig(epochs=6, batch_size=300, lr0=0.02)
    tr = ChipInTheLoopTrainer([MC] * 2, [tc] * 2, [0, 1], digits, be, progress=False, device_budget_s=0.1)
    saved = []
    test_s_at_stop = {}
    orig = tr._stop_on_budget

    def spy(k, epoch):
        saved.append((k, {n: p[k].detach().clone() for n, p in tr.net.named_parameters()},
                      {n: v.clone() for n, v in tr.best_params[k].items()}, tr.best_score[k]))
        test_s_at_stop[k] = tr.loop.test_time_s[k]
        orig(k, epoch)

    tr._stop_on_budget = spy
    res = tr.fit()
    assert sorted(k for k, *_ in saved) == [0, 1]
    for k, before, best, score in saved:
        assert res.final[k]["status"] == "budget"
        assert tr.loop.train_time_s(k) < 0.1 + 0.015  # stopped within one batch (~11 ms) of the budget
        after = {n: p[k] for n, p in tr.net.named_parameters()}
        for n in best:
            assert torch.equal(after[n], best[n]), n
        assert math.isfinite(score)  # an epoch had ended: the best weights are measured ones
        assert any(not torch.equal(before[n], best[n]) for n in best)  # training had moved on
    # the final test figure is the put-back weights', measured on the chip (not the twin)
    assert [c for c in tr.curve if c.get("final")] and len(tr.budget_stopped) == 2
    assert all(tr.loop.test_time_s[k] > test_s_at_stop[k] for k in (0, 1))


def test_budget_and_estimator_settings_are_checked(digits):
    be = [make_backend("model", MC, 1, digits.input_centre, 0)]
    with pytest.raises(ConfigError, match="--device-budget"):
        ChipInTheLoopTrainer([MC], [TrainConfig(epochs=1)], [0], digits, be, device_budget_s=0)
    for bad, words in (("sgd", "unknown estimator 'sgd'"), ("twin:every=0", "every must be >= 1"),
                       ("spsa:c=-1", "c must be > 0"), ("spsa:k=2", "'k=2' is not a setting of spsa"),
                       ("twin:every=x", "every must be a number"), ("physics:every=2", "settings: none")):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
            make_estimator(bad)


# --------------------------------------------------------------------------- estimators vs exact

def _exact_and_loop(digits, estimator, seeds=(0, 1), n=24):
    """The model's exact gradient and the estimator's, on ideal chips (the model as chip)."""
    torch.manual_seed(0)
    net = DynamicalNetwork([MC] * len(seeds), 1, 10, list(seeds), digits.input_centre)
    net.clip_parameters()
    x, y = digits.splits["train"].x[:n], digits.splits["train"].y[:n]
    xs, _ = net(x)
    digits.loss(net.readout(xs[:, :, -1:]), y).sum().backward()
    exact = [p.grad.clone() for p in net.trainable()]
    for p in net.trainable():
        p.grad = None
    chips = [ModelBackend(MC, 1, digits.input_centre, s) for s in seeds]
    loop = ChipInTheLoop(net, chips, estimator=estimator)
    return exact, loop, x, y


def _step(loop, digits, x, y):
    for p in loop.trainable():
        p.grad = None
    xs, _ = loop(x)
    digits.loss(loop.readout(xs[:, :, -1:]), y).sum().backward()
    return [p.grad.clone() for p in loop.trainable()]


def test_physics_aware_gradient_is_exact_on_an_ideal_chip(digits):
    exact, loop, x, y = _exact_and_loop(digits, PhysicsAware())
    got = _step(loop, digits, x, y)
    for a, b in zip(exact, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=2e-6)
    assert loop.chip_steps == 1 and loop.twin_steps == 0


def test_twin_steps_and_chip_steps_are_exact_on_an_ideal_chip(digits):
    est = TwinPeriodic(every=2)
    exact, loop, x, y = _exact_and_loop(digits, est)
    counts = []
    for _ in range(3):  # chip, twin, chip
        got = _step(loop, digits, x, y)
        counts.append((loop.chip_steps, loop.twin_steps))
        for a, b in zip(exact, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=2e-6)
    assert counts == [(1, 0), (1, 1), (2, 1)]
    # chip steps re-identified the twin; on the ideal chip the model is already right
    assert est.reidentified == 2 and est.residual_after[-1] <= est.residual_before[-1] + 1e-9
    backend = loop.backends[0]
    assert backend.counters["runs"] == 2  # the twin step ran nothing on the chip


def test_reidentification_makes_the_twin_follow_a_mismatched_chip(digits):
    """From chip batches already measured (no further device time): the one-step residual falls,
    and so does the free-running twin's distance to the chip on inputs it was not fitted on.
    (gamma, sigma and the fixed bias are not separately identifiable from such data: the test
    holds the twin's predictions to the chip, not each parameter to its true value.)"""
    from hil.chip.twin import state_residual

    chip = make_backend("sim", MC, 1, digits.input_centre, 0,
                        [k for k in IDEAL if not k.startswith("cv_")] + ["cv_gamma=0.3", "cv_sigma=0.3"])
    net = DynamicalNetwork([MC], 1, 10, [0], digits.input_centre)
    net.clip_parameters()
    loop = ChipInTheLoop(net, [chip])
    u = digits.splits["train"].x[:64].unsqueeze(0).contiguous()
    xs, ys = loop.measure(u, net.W_in, net.W_rec, net.bias)
    runs = chip.counters["runs"]
    held_out = digits.splits["test"].x[:64]
    free0 = state_residual(net, 0, chip, held_out)["rms"]
    chip.counters["runs"] = runs
    before, after = reidentify(net, [(u, xs, ys)])
    assert chip.counters["runs"] == runs  # nothing measured again
    assert after < 0.7 * before
    free1 = state_residual(net, 0, chip, held_out)["rms"]
    assert free1 < 0.7 * free0


def test_spsa_gradient_is_unbiased_within_its_variance(digits):
    """Many SPSA samples on the ideal chip: the mean estimate agrees with the exact gradient
    within a few standard errors (from the samples' own spread), and points the same way."""
    est = SPSA(c=0.002, n=400, seed=1)
    exact, loop, x, y = _exact_and_loop(digits, est, seeds=(0,), n=16)
    got = _step(loop, digits, x, y)
    flat_exact = torch.cat([g[0].flatten() for g in exact[:3]])
    flat_got = torch.cat([g[0].flatten() for g in got[:3]])
    cos = float(flat_got @ flat_exact / (flat_got.norm() * flat_exact.norm()))
    assert cos > 0.9
    # the reported relative variance of the mean: || got - exact ||^2 is of that size
    rel = est.report()["relative_variance"]
    assert rel is not None and rel > 0
    err2 = float(((flat_got - flat_exact) ** 2).sum())
    assert err2 < 4 * rel * float((flat_got ** 2).sum()) + 1e-12
    # the readout, computed on the host from the measured states, gets its exact gradient
    for a, b in zip(exact[3:], got[3:], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=2e-6)
    assert loop.backends[0].counters["runs"] == 1 + 2 * 400


# --------------------------------------------------------------------------- the study's arithmetic

def test_time_to_reach_and_the_table():
    pts = [{"seed": 0, "update": 0, "train_device_time_s": 1.0, "test_accuracy": 0.80},
           {"seed": 0, "update": 3, "train_device_time_s": 2.0, "test_accuracy": 0.885},
           {"seed": 0, "update": 6, "train_device_time_s": 3.0, "test_accuracy": 0.87},
           {"seed": 1, "update": 0, "train_device_time_s": 1.0, "test_accuracy": 0.70},
           {"seed": 1, "update": 3, "train_device_time_s": 2.5, "test_accuracy": 0.75}]
    assert time_to_reach(pts[:3], 0.88, "accuracy") == 2.0
    assert time_to_reach(pts[3:], 0.88, "accuracy") is None
    finals = {"e": [{"test_accuracy": 0.87, "train_device_time_s": 3.0},
                    {"test_accuracy": 0.75, "train_device_time_s": 2.5}]}
    row, = budget_table({"e": pts}, finals, [0.89, 0.80], [0, 1], "accuracy", 0.01)
    assert row["reached"] == 1 and row["time_to_within_per_seed"] == [2.0, None]
    assert row["time_to_within_s"] is None  # one seed of two: not a majority
    assert row["gap_to_ideal_points"] == pytest.approx(100 * (0.02 + 0.05) / 2)


def test_cli_budget_study_writes_table_plot_and_curves(runs_dir, capsys):
    args = ["study", "budget", "--preset", "digits", "--seeds", "0", "--epochs", "1",
            "--set", "model.n_hidden=4", "--set", "model.n_layers=2", "--set", "train.batch_size=450",
            "--no-progress", "--threads", "1",
            "--finetune-epochs", "1",
            "--estimators", "offchip,physics,twin:every=2,spsa:c=0.02/n=1,physics+readout",
            "--curve-every", "1", "--level", "0.1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    folder = next(p for p in runs_dir.iterdir() if p.is_dir())
    for name in ("budget_study.json", "budget_study.csv", "budget_study.md", "budget_study.png", "model.pt"):
        assert (folder / name).is_file(), name
    s = json.loads((folder / "budget_study.json").read_text())
    assert [r["estimator"] for r in s["table"]] == ["offchip", "physics", "twin:every=2", "spsa:c=0.02,n=1",
                                                    "physics+readout"]
    # the same chips and fine-tuning as physics, then one more pass on the chip and the refit
    phys, refit = s["curves"]["physics"], s["curves"]["physics+readout"]
    assert len(refit) == len(phys) + 1 and refit[:-1] == phys
    assert refit[-1]["train_device_time_s"] > phys[-1]["train_device_time_s"]
    for spec, pts in s["curves"].items():
        t = [p["train_device_time_s"] for p in pts]
        assert t == sorted(t) and t[0] > 0, spec  # calibration is device time, spent before step 0
    assert "| physics |" in out
    # the cheap estimators spend less device time than running the chip on every batch
    dt = {r["estimator"]: r["device_time_s"]["median"] for r in s["table"]}
    assert dt["offchip"] < dt["twin:every=2"] < dt["physics"] < dt["spsa:c=0.02,n=1"]


def test_budget_study_trains_off_chip_hardware_aware_and_calibrates_as_asked(runs_dir, mocker):
    """The run's ``hardware:`` section reaches every off-chip trainer of the study (the ideal
    training and the fine-tuning on the calibrated twin; it was ignored before), and
    ``--calibration-writes``/``--calibration-repeats`` reach the twin's calibration: one upload
    per probe level instead of eight costs less device time."""
    from hil.chip import budget_study as bs
    from hil.training.train import Trainer

    spy_trainer = mocker.spy(Trainer, "__init__")
    spy_cal = mocker.spy(bs, "calibrate")
    tiny = ["study", "budget", "--preset", "digits", "--seeds", "0", "--epochs", "1",
            "--set", "model.n_hidden=4", "--set", "model.n_layers=2", "--set", "train.batch_size=450",
            "--set", "hardware.readout_noise=0.01", "--set", "hardware.weight_bits=6",
            "--no-progress", "--threads", "1", "--finetune-epochs", "1", "--estimators", "offchip"]
    times = {}
    for writes in (8, 1):
        assert main([*tiny, "--calibration-writes", str(writes), "--calibration-repeats", "64",
                     "--name", f"w{writes}"]) == 0
        folder = next(p for p in runs_dir.iterdir() if p.name.endswith(f"w{writes}"))
        s = json.loads((folder / "budget_study.json").read_text())
        assert s["calibration"] == {"writes": writes, "repeats": 64}
        times[writes] = s["table"][0]["device_time_s"]["median"]
    assert spy_cal.call_count == 2
    assert [c.kwargs for c in spy_cal.call_args_list] == [{"writes": 8, "repeats": 64},
                                                          {"writes": 1, "repeats": 64}]
    hws = [c.kwargs.get("hardware") for c in spy_trainer.call_args_list]
    assert len(hws) == 4  # per study: the ideal training and the off-chip fine-tuning
    assert all(hw is not None and hw.readout_noise == 0.01 and hw.weight_bits == 6 for hw in hws)
    # the calibration's writes dominate the off-chip method's device time: 3 levels x 7 writes
    # fewer, each an upload and a run call (the runs themselves take microseconds)
    from sims.oscillator_device import DeviceConfig

    per_write = DeviceConfig().program_overhead_s + DeviceConfig().call_overhead_s
    assert times[8] - times[1] == pytest.approx(3 * 7 * per_write, rel=0.01)


@pytest.mark.parametrize("args, words", [
    (["--estimators", "offchip", "--twin", "nominal"], "offchip fine-tunes on the calibrated twin"),
    (["--estimators", "physics,physics"], "listed twice"),
    (["--estimators", "nope"], "unknown estimator 'nope'"),
    (["--level", "7"], "--level"),
    (["--calibration-writes", "0"], "--calibration-writes: must be >= 1"),
    (["--calibration-repeats", "-3"], "--calibration-repeats: must be >= 1"),
])
def test_cli_budget_study_errors(runs_dir, capsys, args, words):
    assert main(["study", "budget", "--epochs", "1", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not runs_dir.exists() or not [p for p in runs_dir.iterdir() if p.is_dir()]  # no run folder


# --------------------------------------------------------------------------- the lab backend

def test_lab_backend_counts_the_benchs_clock(digits):
    """Through a lab config on the virtual lab, device time is lab time on the virtual clock:
    uploads, transfers and waits included, not only the chip's own run time."""
    be = make_backend("lab:lab_configs/virtual.yaml", MC, 1, digits.input_centre, 0)
    try:
        clock = be.world.clock
        t0 = clock.now_s()
        net = DynamicalNetwork([MC], 1, 10, [0], digits.input_centre)
        be.upload(net.layer_weights(0))
        m = be.run(digits.splits["train"].x[:20])
        assert be.counters["device_time_s"] == pytest.approx(clock.now_s() - t0)
        chip_own = be.chip.query_float("FETC:TIME?")
        assert m.device_time_s > chip_own > 0  # the bench spends more than the chip's run itself
    finally:
        be.close()


def test_budget_study_through_the_virtual_lab(runs_dir, capsys):
    args = ["study", "budget", "--preset", "digits", "--seeds", "0", "--epochs", "1",
            "--set", "model.n_hidden=4", "--set", "model.n_layers=2", "--set", "train.batch_size=450",
            "--no-progress", "--threads", "1", "--finetune-epochs", "1", "--estimators", "physics",
            "--twin", "nominal", "--curve-every", "0", "--backend", "lab:lab_configs/virtual.yaml"]
    assert main(args) == 0
    folder = next(p for p in runs_dir.iterdir() if p.is_dir())
    s = json.loads((folder / "budget_study.json").read_text())
    assert s["backend"] == "lab:lab_configs/virtual.yaml"
    pts = s["curves"]["physics"]
    assert pts[-1]["train_device_time_s"] > pts[0]["train_device_time_s"] == 0  # nominal twin: no calibration


def test_readout_refit_reads_the_chips_own_states(digits):
    """One pass of the training split on a mismatched chip, the host readout refitted: the
    measured loss falls, the chip's parameters stay, and the device did one upload and one
    pass (no training runs)."""
    from hil.chip.study import evaluate_on_backend, refit_readout_on_chip
    from hil.training.train import EVAL_CHUNK, Trainer

    tc = TrainConfig(epochs=3, batch_size=150, lr0=0.02)
    net = Trainer([MC], [tc], [0], digits, progress=False).fit().net
    chip = make_backend("sim", MC, 1, digits.input_centre, 0, ["cv_gamma=0.3", "cv_sigma=0.3"])
    chip_params = [p.detach().clone() for p in (net.W_in, net.W_rec, net.bias)]
    before_test = evaluate_on_backend(net, 0, chip, digits)["metric"]
    runs0, uploads0 = chip.counters["runs"], chip.counters["uploads"]
    r = refit_readout_on_chip(net, 0, chip, digits)
    n = len(digits.splits["train"])
    assert chip.counters["uploads"] == uploads0 + 1
    assert chip.counters["runs"] == runs0 + math.ceil(n / EVAL_CHUNK)
    assert r["loss_after"] < 0.9 * r["loss_before"]
    for a, b in zip(chip_params, (net.W_in, net.W_rec, net.bias), strict=True):
        assert torch.equal(a, b)
    after_test = evaluate_on_backend(net, 0, chip, digits)["metric"]
    assert after_test > before_test  # the refit generalises to the test split on the same chip


@pytest.mark.parametrize("args, words", [
    (["--estimator", "spsa"], "--estimator: is a chip-in-the-loop setting"),
    (["--device-budget", "3"], "--device-budget: is a chip-in-the-loop setting"),
    (["--backend", "sim", "--in-the-loop", "--estimator", "twin:every=0"], "twin:every must be >= 1"),
    (["--backend", "sim", "--in-the-loop", "--device-budget", "-1"], "--device-budget: must be > 0"),
    (["--backend", "sim", "--in-the-loop", "--curve-every", "-2"], "--curve-every: must be >= 0"),
])
def test_cli_train_budget_and_estimator_errors(runs_dir, capsys, args, words):
    assert main(["train", "--epochs", "1", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not runs_dir.exists() or not [p for p in runs_dir.iterdir() if p.is_dir()]  # no run folder


def test_budget_stops_a_task_trained_as_one_series():
    """Sine/square trains on one long series (an update per epoch, not per batch): the budget is
    checked after every update there too."""
    from hil.config import load_config
    from hil.network.tasks import make_task

    cfg = load_config(None, preset="sine_square", seeds="0",
                      overrides=["train.bptt=full", "train.epochs=4", "model.n_hidden=4"])
    task = make_task(cfg.task, cfg.train.output_gain)
    chip = make_backend("sim", cfg.model, task.n_in, task.input_centre, 0)
    tr = ChipInTheLoopTrainer([cfg.model], [cfg.train], [0], task, [chip], progress=False,
                              device_budget_s=0.03)
    res = tr.fit()
    assert res.final[0]["status"] == "budget" and tr.budget_stopped == [0]
    assert tr.updates < cfg.train.epochs  # stopped before the last epoch
