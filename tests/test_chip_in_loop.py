"""Chip-in-the-loop training: the autograd Function, the wrapped trainer and the CLI."""

import json

import numpy as np
import pytest
import torch

from hil.chip.backends import Backend, BackendSpec, Measurement, ModelBackend, make_backend
from hil.chip.chip_in_loop import ChipInTheLoop, ChipInTheLoopTrainer
from hil.chip.twin import TwinMonitor
from hil.cli import main
from hil.config import ModelConfig, TaskConfig, TrainConfig
from hil.errors import ConfigError
from hil.network.model import DynamicalNetwork, State
from hil.network.tasks import SequentialDigits

MC = ModelConfig(n_layers=2, n_hidden=6, tau_ns=5.0, S=1.0, S_in=2.5, b_in=0.4, w_clip_dt=0.9, b_clip_dt=0.2)
IDEAL = ["cv_gamma=0", "cv_sigma=0", "offset_std=0", "weight_bits=null", "program_noise=0",
         "synapse_gain_cv=0", "thermal_d_ghz=0", "readout_noise=0", "drift_per_sqrt_s=0",
         f"method={MC.scheme}", f"solver_substeps={MC.substeps}"]


@pytest.fixture(scope="module")
def digits():
    return SequentialDigits(TaskConfig())


class OutputsOnly(Backend):
    """A chip that measures its outputs only (no per-layer states)."""

    name = "outputs-only"

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        sp = inner.spec
        super().__init__(BackendSpec(sp.n_in, sp.n_layers, sp.n_hidden, sp.dt_ns, sp.w_max, sp.b_max, False))

    def _upload(self, layers):
        self.inner.upload(layers)

    def _run(self, inputs):
        m = self.inner.run(inputs)
        return Measurement(m.outputs, None, None, m.device_time_s)

    def _describe(self):
        return {"identity": {"model": "outputs-only"}, "parameters": {}}


def grads(task, backends=None, seeds=(0, 1), n=24):
    net = DynamicalNetwork([MC] * len(seeds), 1, 10, list(seeds), task.input_centre)
    net.clip_parameters()
    m = ChipInTheLoop(net, backends) if backends is not None else net
    x, y = task.splits["train"].x[:n], task.splits["train"].y[:n]
    xs, _ = m(x)
    task.loss(m.readout(xs[:, :, -1:]), y).sum().backward()
    return [p.grad.clone() for p in net.trainable()], xs.detach()


@pytest.mark.parametrize("kind", ["sim", "model", "outputs-only"])
def test_gradient_equals_the_models_without_mismatch_and_noise(digits, kind):
    """The done-when test: chip-in-the-loop gradient == model gradient on an ideal chip."""
    ref, xs_ref = grads(digits)

    def be(s):
        if kind == "sim":
            return make_backend("sim", MC, 1, digits.input_centre, s, IDEAL)
        inner = ModelBackend(MC, 1, digits.input_centre, s)
        return inner if kind == "model" else OutputsOnly(inner)

    got, xs = grads(digits, [be(0), be(1)])
    np.testing.assert_allclose(xs.numpy(), xs_ref.numpy(), atol=3e-5)
    for a, b in zip(ref, got, strict=True):
        assert float(a.abs().max()) > 0
        torch.testing.assert_close(b, a, rtol=1e-3, atol=2e-6)


def test_forward_values_are_the_chips_and_gradients_differ_under_mismatch(digits):
    be = [make_backend("sim", MC, 1, digits.input_centre, s, ["cv_gamma=0.3", "cv_sigma=0.3"])
          for s in (0, 1)]
    ref, xs_model = grads(digits)
    got, xs = grads(digits, be)
    assert float((xs - xs_model).abs().max()) > 0.05  # the measured states are not the model's
    rel = [float((a - b).norm() / a.norm()) for a, b in zip(ref, got, strict=True)]
    assert max(rel[:3]) > 0.05  # the backward is evaluated at the chip's states, not the model's
    # both chips were called once each, and the forward ran on them
    assert all(b.counters["runs"] == 1 and b.counters["uploads"] == 1 for b in be)


def test_unchanged_parameters_are_not_uploaded_again(digits):
    net = DynamicalNetwork([MC], 1, 10, [0], digits.input_centre)
    be = make_backend("sim", MC, 1, digits.input_centre, 0)
    loop = ChipInTheLoop(net, [be])
    with torch.no_grad():
        loop(digits.splits["test"].x[:5])
        loop(digits.splits["test"].x[5:9])
        assert be.counters["uploads"] == 1 and be.counters["runs"] == 2
        net.bias.add_(0.01)
        loop(digits.splits["test"].x[:5])
    assert be.counters["uploads"] == 2


def test_states_passed_in_and_mismatched_backends_are_refused(digits):
    net = DynamicalNetwork([MC], 1, 10, [0], digits.input_centre)
    loop = ChipInTheLoop(net, [make_backend("model", MC, 1, digits.input_centre, 0)])
    with pytest.raises(ConfigError, match="train.bptt"):
        loop(digits.splits["test"].x[:2], State(torch.zeros(1, 2, 12), torch.zeros(1, 2, 12)))
    other = ModelConfig(n_layers=2, n_hidden=4)
    with pytest.raises(ConfigError, match="one backend per trial"):
        ChipInTheLoop(net, [])
    with pytest.raises(ConfigError, match="2 layers x 4"):
        ChipInTheLoop(net, [make_backend("model", other, 1, 0.0, 0)])


def test_trainer_learns_on_a_mismatched_noisy_chip_and_logs_device_use(digits):
    mc = ModelConfig(n_layers=2, n_hidden=8, tau_ns=5.0, S=1.0, S_in=2.5, b_in=0.4, w_clip_dt=0.9,
                     b_clip_dt=0.2)
    tc = TrainConfig(epochs=2, batch_size=100, lr0=0.03)
    be = [make_backend("sim", mc, 1, digits.input_centre, 0, ["cv_gamma=0.2", "cv_sigma=0.2"])]
    res = ChipInTheLoopTrainer([mc], [tc], [0], digits, be, progress=False).fit()
    accs = [r["test_accuracy"] for r in res.history]
    assert accs[-1] > max(0.25, accs[0])  # chance is 0.1; measured on the chip
    last = res.history[-1]
    assert last["device_runs"] == be[0].counters["runs"] > 2 * 9
    assert last["device_time_s"] > 0 and last["device_uploads"] >= 18
    assert res.net.backward_calls == 2 * 9 and res.net.nonfinite_backward == 0


def test_monitor_recalibrates_the_twin_when_the_chip_drifts(digits):
    drifting = ["drift_per_sqrt_s=1.0", "program_overhead_s=0.02", "cv_gamma=0", "cv_sigma=0", "offset_std=0"]
    be = [make_backend("sim", MC, 1, digits.input_centre, 0, drifting)]
    events = []
    mon = TwinMonitor(probe=digits.splits["train"].x[:8], every=2, ratio=1.3, on_event=events.append,
                      calibration={"repeats": 32, "writes": 2, "n_points": 30})
    tc = TrainConfig(epochs=1, batch_size=150, lr0=0.02)
    ChipInTheLoopTrainer([MC], [tc], [0], digits, be, monitor=mon, progress=False).fit()
    checks = [e for e in events if e["event"] in ("twin_check", "twin_recalibrated")]
    assert len(checks) == 3  # 6 steps, every 2
    recal = [e for e in events if e["event"] == "twin_recalibrated"]
    assert recal and mon.recalibrations == len(recal)
    assert all(e["residual"] > e["threshold"] for e in recal)
    assert "gamma_ghz" in recal[0]["twin"]


def test_cli_train_in_the_loop_writes_a_complete_run_folder(runs_dir, capsys):
    args = ["train", "--preset", "digits", "--seeds", "0", "--epochs", "1", "--set", "model.n_hidden=4",
            "--set", "model.n_layers=2", "--set", "train.batch_size=450", "--no-progress",
            "--backend", "sim", "--in-the-loop", "--twin", "nominal", "--monitor-every", "1",
            "--device", "cv_gamma=0.1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    folder = runs_dir / next(p.name for p in runs_dir.iterdir())
    assert "chip-in-the-loop (sim, nominal twin)" in out
    for name in ("config.yaml", "metrics.jsonl", "final.json", "summary.json", "model.pt", "backends.json",
                 "twin_events.jsonl", "sim_to_real.json", "sim_to_real.png", "sim_to_real_trajectories.png",
                 "accuracy.png"):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["device"][0]["device_runs"] > 0 and summary["backward_calls"] == 2
    rec = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["device_time_s"] > 0
    backends = json.loads((folder / "backends.json").read_text())
    assert backends[0]["parameters"]["config"]["cv_gamma"] == 0.1


@pytest.mark.parametrize("args, words", [
    (["--in-the-loop"], "--in-the-loop: needs --backend"),
    (["--device", "cv_gamma=0.1"], "--device: device settings need --backend"),
    (["--backend", "sim", "--in-the-loop", "--device", "cv_gama=1"], "device.cv_gama: unknown key"),
])
def test_cli_in_the_loop_errors(runs_dir, capsys, args, words):
    assert main(["train", "--epochs", "1", "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
