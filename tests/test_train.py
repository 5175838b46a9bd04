"""Training: it learns, it is reproducible, and it survives divergence."""

import math

import pytest
import torch

from hil.config import ModelConfig, TaskConfig, TrainConfig
from hil.network.tasks import SequentialDigits, SineSquare
from hil.training.train import Trainer, TrialAdam, lr_at, summarize


@pytest.fixture(scope="module")
def digits():
    return SequentialDigits(TaskConfig())


def small(**kw):
    base = dict(n_hidden=12, n_layers=2, S_in=4.0, S=1.0, tau_ns=7.0)
    base.update(kw)
    return ModelConfig(**base)


def test_digits_training_learns(digits):
    tc = TrainConfig(epochs=3, batch_size=60, lr0=0.02)
    res = Trainer([small()], [tc], [0], digits, progress=False).fit()
    accs = [r["test_accuracy"] for r in res.history]
    assert accs[-1] > 0.3  # chance is 0.1
    assert res.final[0]["status"] == "ok"


def test_same_seed_same_result_alone_or_stacked(digits):
    tc = TrainConfig(epochs=1, batch_size=100, lr0=0.02)
    a = Trainer([small()], [tc], [5], digits, progress=False).fit()
    b = Trainer([small(), small()], [tc, tc], [4, 5], digits, progress=False).fit()
    assert a.final[0]["test_accuracy"] == pytest.approx(b.final[1]["test_accuracy"], abs=2e-3)
    assert a.final[0]["train_loss"] == pytest.approx(b.final[1]["train_loss"], rel=1e-4)
    c = Trainer([small()], [tc], [5], digits, progress=False).fit()
    assert c.final[0]["train_loss"] == a.final[0]["train_loss"]


def test_divergence_rolls_back_and_fails_only_that_seed(digits):
    """A trial driven to NaN is rolled back, then marked failed; its neighbour trains on."""
    tc = TrainConfig(epochs=2, batch_size=300, lr0=0.02, max_rollbacks=1)
    tr = Trainer([small(S_in=1e6), small()], [tc, tc], [0, 1], digits, progress=False)
    res = tr.fit()
    assert res.final[0]["status"] == "failed"
    assert res.final[0]["rollbacks"] == 2
    assert any("Euler step" in e for e in res.final[0]["events"])
    assert res.final[1]["status"] == "ok"
    assert math.isfinite(res.final[1]["test_loss"])


def test_sine_square_shifted_start_bptt_runs_and_learns():
    task = SineSquare(TaskConfig(n_periods=12, window=8))
    mc = ModelConfig(n_layers=1, n_hidden=4, tau_ns=2.0, S=1.0, S_in=1.0, dt_ns=1.0,
                     w_clip_dt=None, b_clip_dt=None)
    tc = TrainConfig(epochs=2, lr0=0.02, bptt="shifted", output_gain=10.0)
    res = Trainer([mc], [tc], [0], task, progress=False).fit()
    # measured: 0.604 on the 96 test points after 2 epochs (untrained 0.500; a constant output
    # scores 0.5 on this series), test loss 15.3 after epoch 0, 7.2 after epoch 1
    assert res.final[0]["test_accuracy"] > 0.55
    assert res.history[-1]["test_loss"] < res.history[0]["test_loss"]


@pytest.mark.parametrize("mode", ["full", "truncated"])
def test_sine_square_other_modes(mode):
    task = SineSquare(TaskConfig(n_periods=10, window=8))
    mc = ModelConfig(n_layers=1, n_hidden=3, tau_ns=2.0, S=1.0)
    tc = TrainConfig(epochs=2, lr0=0.02, bptt=mode, output_gain=10.0)
    res = Trainer([mc], [tc], [0], task, progress=False).fit()
    assert len(res.history) == 2


def test_bptt_modes_only_for_sequence_task(digits):
    from hil.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.bptt: 'truncated' is not available for the digits "
                                          r"task \(epoch scheme 'batches'\); allowed: full"):
        Trainer([small()], [TrainConfig(bptt="truncated")], [0], digits, progress=False)


def test_the_task_picks_the_epoch_scheme(digits, monkeypatch):
    """The trainer runs the epoch of the task's ``epoch_scheme``, whatever the task's name."""
    calls: list[str] = []
    for scheme in ("batches", "sequence"):
        real = getattr(Trainer, f"_epoch_{scheme}")

        def spy(self, epoch, real=real, scheme=scheme):
            calls.append(scheme)
            return real(self, epoch)

        monkeypatch.setattr(Trainer, f"_epoch_{scheme}", spy)
    sine = SineSquare(TaskConfig(n_periods=4))
    Trainer([small()], [TrainConfig(epochs=2, output_gain=10.0)], [0], sine, progress=False).fit()
    assert calls == ["sequence", "sequence"]
    Trainer([small()], [TrainConfig(epochs=1, batch_size=300)], [0], digits, progress=False).fit()
    assert calls == ["sequence", "sequence", "batches"]
    monkeypatch.setattr(type(sine), "epoch_scheme", "batches")  # the same task, told otherwise
    Trainer([small()], [TrainConfig(epochs=1, output_gain=10.0)], [0], sine, progress=False).fit()
    assert calls[-1] == "batches"


def test_trial_adam_matches_torch_adam():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(2, 3, 4))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ref = torch.optim.Adam([p2], lr=0.01)
    mine = TrialAdam([p1], 2)
    for _ in range(5):
        g = torch.randn(2, 3, 4)
        p1.grad, p2.grad = g.clone(), g.clone()
        ref.step()
        mine.step(torch.tensor([0.01, 0.01]), torch.tensor([True, True]))
    assert torch.allclose(p1, p2, atol=1e-6)
    before = p1.detach().clone()
    p1.grad = torch.randn(2, 3, 4)
    mine.step(torch.tensor([0.01, 0.01]), torch.tensor([True, False]))
    assert torch.equal(p1[1], before[1]) and not torch.equal(p1[0], before[0])


def test_lr_schedule():
    assert float(lr_at(torch.tensor(0.1), torch.tensor(5.0), 5)) == pytest.approx(0.05)


def test_summary():
    s = summarize([0.8, 0.9, 1.0])
    assert s["median"] == 0.9 and s["min"] == 0.8 and s["n"] == 3
    assert s["std"] == pytest.approx(0.1)


@pytest.mark.parametrize("mode,cap,expected", [("shifted", 4, 3), ("shifted", 3, 3), ("shifted", None, 9),
                                                ("truncated", 1, 1)])
def test_windows_per_epoch_limits_updates(mode, cap, expected):
    """train.windows_per_epoch: at most that many windows (weight updates) per epoch."""
    task = SineSquare(TaskConfig(n_periods=2, window=8))  # 16 points: 9 shifted windows
    mc = ModelConfig(n_layers=1, n_hidden=2, tau_ns=2.0, S=1.0)
    tc = TrainConfig(epochs=1, lr0=0.02, bptt=mode, output_gain=10.0, windows_per_epoch=cap)
    tr = Trainer([mc], [tc], [0], task, progress=False)
    calls = []
    update = tr._update
    tr._update = lambda *a, **kw: calls.append(1) or update(*a, **kw)
    tr.fit()
    assert len(calls) == expected


def test_windows_per_epoch_validated():
    from hil.config import RunConfig, validate
    from hil.errors import ConfigError

    for bad in (0, -3, 2.5, True):
        cfg = RunConfig(train=TrainConfig(windows_per_epoch=bad))
        with pytest.raises(ConfigError, match="train.windows_per_epoch"):
            validate(cfg)


def test_exact_bptt_windows_start_from_the_series_state():
    """bptt=exact: batch_size windows per update, each started from the state the current
    network reaches at that point from rest; a seed trains alike alone or stacked."""
    from hil.network.tasks import Split

    task = SineSquare(TaskConfig(n_periods=4, window=8))  # 32 points, 25 windows
    g = torch.Generator().manual_seed(0)  # a series whose windows are all different
    task.splits["train"] = Split(torch.rand(1, 32, 1, generator=g),
                                 (torch.rand(1, 32, generator=g) > 0.5).float())
    mc = ModelConfig(n_layers=1, n_hidden=2, tau_ns=1.0, S=1.0, highpass=False)
    tc = TrainConfig(epochs=1, lr0=0.01, bptt="exact", batch_size=4, windows_per_epoch=10,
                     output_gain=10.0)
    tr = Trainer([mc, mc], [tc, tc], [0, 1], task, progress=False)
    seen = []
    update = tr._update

    def spy(x, y, epoch, state=None):
        # before the update: the start states must equal a pass from rest to each window start
        with torch.no_grad():
            full, _ = tr.net(task.splits["train"].x)
            series = task.splits["train"].x[0, :, 0]
            for k in range(2):
                for b in range(x.shape[1]):
                    match = (series.unfold(0, 8, 1) == x[k, b, :, 0]).all(1).nonzero().flatten()
                    assert len(match) == 1
                    p = int(match[0])
                    want = tr.net.initial_state(1).x[k, 0] if p == 0 else full[k, 0, p - 1]
                    assert torch.allclose(state.x[k, b], want, atol=1e-6)
        seen.append(x.shape)
        return update(x, y, epoch, state)

    tr._update = spy
    res = tr.fit()
    assert [s[:2] for s in seen] == [(2, 4), (2, 4), (2, 2)]  # 10 windows in batches of 4
    alone = Trainer([mc], [tc], [1], task, progress=False).fit()
    assert alone.final[0]["test_accuracy"] == pytest.approx(res.final[1]["test_accuracy"])
    assert torch.allclose(alone.net.W_in[0], res.net.W_in[1], atol=1e-5)


def test_exact_bptt_refuses_the_highpass_filter():
    from hil.errors import ConfigError

    task = SineSquare(TaskConfig(n_periods=4, window=8))
    mc = ModelConfig(n_layers=1, n_hidden=2, highpass=True)
    with pytest.raises(ConfigError, match="train.bptt"):
        Trainer([mc], [TrainConfig(bptt="exact")], [0], task, progress=False)


def test_two_neurons_learn_sine_square_with_exact_bptt():
    """The sine_square_2 recipe, shortened to 80 epochs: seeds 1 and 2 above 90 % (measured
    91.6 and 97.0 %; at the full 300 epochs the preset's median is 95.5 %)."""
    from hil.config import apply_overrides, load_config
    from hil.network.tasks import make_task

    cfg = apply_overrides(load_config(preset="sine_square_2"), ["train.epochs=80"])
    task = make_task(cfg.task, cfg.train.output_gain)
    res = Trainer([cfg.model] * 2, [cfg.train] * 2, [1, 2], task, progress=False).fit()
    assert all(f["test_accuracy"] > 0.9 for f in res.final), [f["test_accuracy"] for f in res.final]
