"""Checkpoints and resume of off-chip training (issue 18, item 3).

Every epoch of ``hil train`` ends with an atomic ``checkpoint.pt`` in the run folder (weights,
optimiser, per-trial status, history, every random generator); Ctrl-C and SIGTERM keep it, and
``hil train --resume RUN_FOLDER`` continues to the same final weights, bit for bit, as a run that
was never interrupted. A resume that cannot be right (no folder, no checkpoint, a finished run,
other settings) is refused in one line with exit code 2, leaving the folder as it was.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hil import runs
from hil.cli import main
from hil.config import HardwareConfig, ModelConfig, TaskConfig, TrainConfig
from hil.network.tasks import SineSquare
from hil.training.checkpoints import CHECKPOINT_FILE
from hil.training.train import Trainer, rng_state, set_rng_state

#: 2 seeds, 4 epochs of a small digits network with hardware-aware passes (per-trial generators
#: for the data order and for the chip's draws): about a second per run on one thread
TINY = ["--preset", "digits", "--seeds", "0-1", "--epochs", "4", "--set", "model.n_hidden=6",
        "--set", "model.n_layers=2", "--set", "train.batch_size=300", "--set",
        "hardware.program_noise=0.02", "--no-progress", "--threads", "1"]


def _train(runs_dir, *extra: str) -> int:
    return main(["train", *TINY, "--runs-dir", str(runs_dir), *extra])


def _folder(runs_dir):
    folder, = [p for p in runs_dir.iterdir() if p.is_dir()]
    return folder


def _model(folder) -> dict[str, torch.Tensor]:
    return runs.load_checkpoint(folder / "model.pt")["state_dict"]


def _metrics(folder) -> list[dict]:
    return [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run, never interrupted."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("uninterrupted")
    assert _train(root) == 0
    folder = _folder(root)
    assert not (folder / CHECKPOINT_FILE).exists()  # removed once model.pt and the results are written
    return folder


def _interrupt_at_epoch(monkeypatch, epoch: int, how=None) -> None:
    """Stop the run at the start of ``epoch`` (after the checkpoint of ``epoch - 1``)."""
    original = Trainer._epoch_batches

    def stop(self, e):
        if e == epoch:
            if how is None:
                raise KeyboardInterrupt
            how()
        return original(self, e)

    monkeypatch.setattr(Trainer, "_epoch_batches", stop)


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _assert_same_run(folder, reference) -> None:
    got, want = _model(folder), _model(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    final = [json.loads((f / "final.json").read_text()) for f in (folder, reference)]
    assert final[0] == final[1]
    s, r = (json.loads((f / "summary.json").read_text()) for f in (folder, reference))
    assert s["test"] == r["test"] and s["convergence"]["trained"] == r["convergence"]["trained"]
    assert _metrics(folder) == _metrics(reference)  # every epoch once, as measured without the stop


# --------------------------------------------------------------------------- interrupt, then resume

@pytest.mark.parametrize("same_command_line", [False, True], ids=["resume-alone", "resume-same-settings"])
def test_ctrl_c_keeps_a_checkpoint_and_resume_gives_the_uninterrupted_weights(
        tmp_path, monkeypatch, capsys, uninterrupted, same_command_line):
    root = tmp_path / "runs"
    with monkeypatch.context() as m:
        _interrupt_at_epoch(m, 2)
        assert _train(root) == 130
    folder = _folder(root)
    err = capsys.readouterr().err
    assert runs.read_status(folder)["status"] == "interrupted"
    assert (folder / CHECKPOINT_FILE).is_file() and not (folder / "model.pt").exists()
    assert f"continue with: hil train --resume {folder}" in err
    ckpt = runs.load_checkpoint(folder / CHECKPOINT_FILE)  # tensors and plain data (weights_only)
    assert ckpt["trainer"]["epoch"] == 2 and len(ckpt["trainer"]["history"]) == 2 * 2
    assert sorted({r["epoch"] for r in _metrics(folder)}) == [0, 1]

    args = ([*TINY, "--resume", str(folder)] if same_command_line
            else ["--resume", str(folder), "--no-progress"])
    assert main(["train", *args]) == 0
    out, err = capsys.readouterr()
    assert "resumed after epoch 2 of 4" in err and f"run folder: {folder}" in out
    st = runs.read_status(folder)
    assert st["status"] == "complete" and st["resumed_from_epoch"] == 2
    assert not (folder / CHECKPOINT_FILE).exists()
    assert [p.name for p in root.iterdir()] == [folder.name]  # no new run folder
    _assert_same_run(folder, uninterrupted)


def test_sigterm_after_an_epochs_metrics_before_its_checkpoint_resumes_exactly(
        tmp_path, monkeypatch, capsys, uninterrupted, restore_signals):
    """SIGTERM (as a job scheduler sends) between epoch 2's metrics and its checkpoint, the worst
    moment: the checkpoint of epoch 1 is kept, and the resumed run measures epoch 2 again without
    leaving its records twice in ``metrics.jsonl``."""
    root = tmp_path / "runs"
    save = runs.RunFolder.save_torch
    calls = []

    def save_then_term(self, name, obj):
        calls.append(name)
        if name == CHECKPOINT_FILE and len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI turns it into Terminated (a KeyboardInterrupt)
            raise AssertionError("SIGTERM was not delivered")  # pragma: no cover
        return save(self, name, obj)

    with monkeypatch.context() as m:
        m.setattr(runs.RunFolder, "save_torch", save_then_term)
        assert _train(root) == 128 + signal.SIGTERM
    folder = _folder(root)
    err = capsys.readouterr().err
    assert "SIGTERM" in err and f"hil train --resume {folder}" in err
    assert runs.read_status(folder)["status"] == "interrupted"
    assert runs.load_checkpoint(folder / CHECKPOINT_FILE)["trainer"]["epoch"] == 2
    assert sorted({r["epoch"] for r in _metrics(folder)}) == [0, 1, 2]  # epoch 2 measured, not kept
    assert main(["train", "--resume", str(folder), "--no-progress"]) == 0
    _assert_same_run(folder, uninterrupted)


#: ``hil train`` in a subprocess whose epochs from the third on are slowed down (not changed), so
#: that the test can SIGKILL it while it trains
SLOW_TRAIN = """
import sys, time
from hil.training.train import Trainer
from hil.cli import main
original = Trainer._epoch_batches
def slow(self, epoch):
    if epoch >= 2:
        time.sleep(30)
    return original(self, epoch)
Trainer._epoch_batches = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_keeps_the_last_checkpoint_and_the_run_resumes_exactly(tmp_path, uninterrupted):
    root = tmp_path / "runs"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, "train", *TINY, "--runs-dir", str(root)],
                            cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        ckpt = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(root.glob(f"*/{CHECKPOINT_FILE}"))
            if found:
                try:
                    if runs.load_checkpoint(found[0])["trainer"]["epoch"] == 2:
                        ckpt = found[0]
                        break
                except runs.HilError:  # pragma: no cover - never a partial file (atomic), but be safe
                    pass
            time.sleep(0.05)
        assert ckpt is not None, proc.stderr.read().decode() if proc.poll() is not None else "timeout"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    folder = ckpt.parent
    assert runs.read_status(folder)["status"] == "running"  # nobody left to say otherwise
    assert main(["train", "--resume", str(folder), "--no-progress", "--threads", "1"]) == 0
    assert runs.read_status(folder)["status"] == "complete"
    _assert_same_run(folder, uninterrupted)


def test_an_interrupt_before_the_first_epoch_ends_says_there_is_nothing_to_resume(
        tmp_path, monkeypatch, capsys):
    root = tmp_path / "runs"
    _interrupt_at_epoch(monkeypatch, 0)
    assert _train(root) == 130
    folder = _folder(root)
    assert not (folder / CHECKPOINT_FILE).exists()
    err = capsys.readouterr().err
    assert "no epoch had finished" in err and "--resume" not in err
    assert main(["train", "--resume", str(folder)]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err


# --------------------------------------------------------------------------- refusals

def _refused(capsys, *args: str) -> str:
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hil train: error: ") and "--resume" in err[0], err
    return err[0]


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    with monkeypatch.context() as m:
        _interrupt_at_epoch(m, 2)
        assert _train(root) == 130
    return _folder(root)


def test_resume_refuses_changed_settings_naming_the_keys(interrupted, capsys):
    before = {p.name: p.read_bytes() for p in interrupted.iterdir() if p.is_file()}
    capsys.readouterr()
    line = _refused(capsys, *TINY, "--epochs", "5", "--set", "model.S=0.9", "--resume", str(interrupted))
    assert "settings differ" in line and "train.epochs (run: 4, now: 5)" in line and "model.S (run:" in line
    assert "model.n_hidden" not in line
    # the preset alone: its own size and seeds differ
    line = _refused(capsys, "--preset", "digits", "--resume", str(interrupted))
    assert "model.n_hidden (run: 6, now:" in line and "seeds" in line
    # nothing in the folder changed: still interrupted, still resumable
    assert {p.name: p.read_bytes() for p in interrupted.iterdir() if p.is_file()} == before
    assert runs.read_status(interrupted)["status"] == "interrupted"


def test_resume_refuses_a_missing_folder_a_folder_without_checkpoint_and_a_finished_run(
        tmp_path, capsys, uninterrupted):
    assert "no such run folder" in _refused(capsys, "--resume", str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no checkpoint.pt" in _refused(capsys, "--resume", str(empty))
    assert "complete" in _refused(capsys, "--resume", str(uninterrupted))
    assert runs.read_status(uninterrupted)["status"] == "complete"


def test_resume_refuses_a_run_still_running_and_chip_in_the_loop(interrupted, capsys):
    runs.RunFolder(interrupted).set_status("running")  # records this pid...
    st = json.loads((interrupted / "status.json").read_text())
    st["pid"] = os.getppid()  # ...another live process
    (interrupted / "status.json").write_text(json.dumps(st))
    assert "still running" in _refused(capsys, "--resume", str(interrupted))
    st["pid"] = 2 ** 22 + 12345  # a dead process (SIGKILL): resumable
    (interrupted / "status.json").write_text(json.dumps(st))
    assert "chip-in-the-loop" in _refused(capsys, "--backend", "sim", "--in-the-loop", "--resume",
                                          str(interrupted))


def test_a_corrupt_checkpoint_is_refused_in_one_line(interrupted, capsys):
    (interrupted / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    assert main(["train", "--resume", str(interrupted)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable checkpoint" in err[0]


# --------------------------------------------------------------------------- the trainer itself

def test_trainer_resumes_rollbacks_lr_factors_and_hardware_draws_exactly(tmp_path, mocker):
    """The trainer alone, on a sine/square series with truncated BPTT and hardware-aware passes:
    trial 0 rolls back in epoch 0 (lr halved). A trainer built afresh from the checkpoint of
    epoch 2 (saved and loaded as a file, weights only) ends where the uninterrupted one ends."""
    task = SineSquare(TaskConfig(n_periods=16, window=16), output_gain=100.0)
    mc = ModelConfig(n_layers=1, n_hidden=8, tau_ns=0.5, S=3.0, S_in=3.0, highpass=False,
                     density_intra=1.0, substeps=4, w_clip_dt=0.25, b_clip_dt=1.0)
    tc = TrainConfig(epochs=4, lr0=0.01, lr_decay=20, bptt="truncated", output_gain=100.0, max_rollbacks=3)
    hw = HardwareConfig(program_noise=0.02, readout_noise=0.01)
    loss = task.loss
    seen = {"n": 0}

    def poisoned(out, y):  # trial 0's 5th training update of the run (epoch 0) is non-finite
        losses = loss(out, y)
        if torch.is_grad_enabled():
            seen["n"] += 1
            if seen["n"] == 5:
                nan = torch.full_like(losses, math.nan)
                losses = torch.where(torch.arange(len(losses)) == 0, nan, losses)
        return losses

    mocker.patch.object(task, "loss", side_effect=poisoned)

    def make(**kw) -> Trainer:
        return Trainer([mc, mc], [tc, tc], [0, 1], task, progress=False, hardware=hw, **kw)

    ref = make().fit()
    assert ref.final[0]["rollbacks"] == 1 and ref.final[0]["status"] == "rolled_back"
    assert ref.history[0]["status"] == "rolled_back" and ref.history[0]["epoch"] == 0

    seen["n"] = 0
    path = tmp_path / "ckpt.pt"

    def keep(state):
        torch.save(state, path)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make(checkpoint=keep).fit()
    torch.manual_seed(123)  # a fresh process: other global random state
    resumed = make()
    resumed.load_resume_state(torch.load(path, weights_only=True))
    assert resumed.start_epoch == 2 and float(resumed.lr_factor[0]) == 0.5
    res = resumed.fit()
    for (name, p), q in zip(res.net.named_parameters(), ref.net.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert runs.finite_or_none(res.history) == runs.finite_or_none(ref.history)  # NaN: the rolled-back epoch
    assert [f["events"] for f in res.final] == [f["events"] for f in ref.final]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.standard_normal(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.standard_normal(3), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
