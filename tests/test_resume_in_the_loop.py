"""Checkpoints and resume of chip-in-the-loop training (issue 18, item 3, for the chip).

Every epoch of ``hil train --in-the-loop`` ends with ``checkpoint.pt``: the trainer, the twin,
the estimator's state and each chip's state as far as its backend can give it. The simulated
chip gives all of it (random streams, drift, what is programmed, its clock), so a run stopped
and resumed ends with the same weights, metrics and device counters as one that never stopped.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_resume import _interrupt_at_epoch  # Ctrl-C at the start of an epoch

from hil import runs
from hil.chip.backends import make_backend
from hil.chip.chip_in_loop import ChipInTheLoopTrainer
from hil.cli import main
from hil.training.checkpoints import CHECKPOINT_FILE

#: one seed, 3 epochs of a small network with the chip in the loop, nominal twin, a drifting,
#: noisy, mismatched simulated chip: a few seconds per run
TINY = ["--preset", "digits", "--seeds", "0", "--epochs", "3", "--set", "model.n_hidden=4",
        "--set", "model.n_layers=2", "--set", "train.batch_size=450", "--no-progress", "--threads", "1",
        "--backend", "sim", "--in-the-loop", "--twin", "nominal", "--device", "cv_gamma=0.1",
        "--device", "drift_per_sqrt_s=0.05"]


def _folder(root):
    folder, = [p for p in root.iterdir() if p.is_dir()]
    return folder


def _metrics(folder):
    return [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=["physics", "twin:every=2"])
def uninterrupted(request, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("loop")
    assert main(["train", *TINY, "--estimator", request.param, "--runs-dir", str(root)]) == 0
    return request.param, _folder(root)


def test_interrupted_chip_in_the_loop_run_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys,
                                                                      uninterrupted):
    estimator, reference = uninterrupted
    root = tmp_path / "runs"
    with monkeypatch.context() as m:
        _interrupt_at_epoch(m, 2)
        assert main(["train", *TINY, "--estimator", estimator, "--runs-dir", str(root)]) == 130
    folder = _folder(root)
    assert runs.read_status(folder)["status"] == "interrupted"
    ckpt = runs.load_checkpoint(folder / CHECKPOINT_FILE)  # weights_only: tensors and plain data
    assert ckpt["mode"] == "chip-in-the-loop" and ckpt["trainer"]["epoch"] == 2
    assert ckpt["loop"]["estimator"] == estimator
    capsys.readouterr()

    assert main(["train", "--resume", str(folder), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "chip-in-the-loop, resumed after epoch 2 of 3" in err
    assert runs.read_status(folder)["status"] == "complete"
    assert not (folder / CHECKPOINT_FILE).exists()
    got = runs.load_checkpoint(folder / "model.pt")["state_dict"]
    want = runs.load_checkpoint(reference / "model.pt")["state_dict"]
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # the same epochs measured once each, with the same device counters (the chip came back as it was)
    assert _metrics(folder) == _metrics(reference)
    s, r = (json.loads((f / "summary.json").read_text()) for f in (folder, reference))
    assert s["test_on_device"] == r["test_on_device"] and s["device"] == r["device"]


def test_resume_refuses_other_chip_settings(tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    with monkeypatch.context() as m:
        _interrupt_at_epoch(m, 1)
        assert main(["train", *TINY, "--runs-dir", str(root)]) == 130
    folder = _folder(root)
    capsys.readouterr()
    assert main(["train", "--resume", str(folder), "--estimator", "spsa", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "estimator (run: None, now: 'spsa')" in err[0]
    assert (folder / CHECKPOINT_FILE).is_file() and runs.read_status(folder)["status"] == "interrupted"


def test_simulated_chip_state_round_trips(tmp_path):
    """The chip's whole state through a weights-only file: the next draws are the same."""
    from hil.config import ModelConfig

    mc = ModelConfig(n_layers=2, n_hidden=4, tau_ns=5.0)
    a = make_backend("sim", mc, 1, 0.5, 3, ["drift_per_sqrt_s=0.05"])
    layers = [{"W_ext": torch.full((4, 1), 0.3), "W_int": torch.zeros(4, 4), "b": torch.full((4,), 0.05)},
              {"W_ext": torch.full((4, 4), 0.1), "W_int": torch.zeros(4, 4), "b": torch.zeros(4)}]
    a.upload(layers)
    a.run(torch.rand(3, 5, 1))
    path = tmp_path / "chip.pt"
    torch.save(a.state(), path)
    b = make_backend("sim", mc, 1, 0.5, 3, ["drift_per_sqrt_s=0.05"])
    assert b.load_state(torch.load(path, weights_only=True)) is True
    u = torch.rand(2, 5, 1)
    ma, mb = a.run(u), b.run(u)
    assert (ma.states == mb.states).all()
    wall = "host_seconds"  # the host's own time is not the chip's
    same = [k for k in a.counters if k != wall]
    assert [a.counters[k] for k in same] == [b.counters[k] for k in same]
    other = make_backend("sim", mc, 1, 0.5, 4, [])
    with pytest.raises(ValueError, match="seed 3"):
        other.load_state(a.state())


def test_a_backend_that_cannot_restore_its_chip_uploads_again():
    """The base class keeps counters only: after a resume the parameters go to the chip again."""
    from hil.config import ModelConfig, TaskConfig, TrainConfig
    from hil.network.tasks import SequentialDigits

    mc = ModelConfig(n_layers=2, n_hidden=4, tau_ns=5.0)
    task = SequentialDigits(TaskConfig())
    tc = TrainConfig(epochs=1, batch_size=450)
    be = make_backend("model", mc, 1, task.input_centre, 0)
    tr = ChipInTheLoopTrainer([mc], [tc], [0], task, [be], progress=False)
    tr.fit()
    state = tr.resume_state(1)
    be2 = make_backend("model", mc, 1, task.input_centre, 0)
    tr2 = ChipInTheLoopTrainer([mc], [tc], [0], task, [be2], progress=False)
    tr2.load_resume_state(state)
    assert be2.counters["runs"] == be.counters["runs"] and tr2.loop._uploaded == [None]
