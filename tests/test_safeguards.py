"""Training safeguards (issue 23): rollback with half the learning rate, weight and bias clipping,
per-element gradient clipping, and every BPTT mode learning beyond chance.

All on a small sine/square task (16 periods of 8 points, windows of 16) and one layer of 8
spintronic neurons, so that each test takes a second or two on one thread.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from hil.config import ModelConfig, TaskConfig, TrainConfig
from hil.network.tasks import SineSquare
from hil.training.train import Trainer, lr_at


@pytest.fixture(scope="module")
def task() -> SineSquare:
    return SineSquare(TaskConfig(n_periods=16, window=16), output_gain=100.0)


def model(**kw) -> ModelConfig:
    base = dict(n_layers=1, n_hidden=8, tau_ns=0.5, S=3.0, S_in=3.0, highpass=False, density_intra=1.0,
                substeps=4, w_clip_dt=0.25, b_clip_dt=1.0)
    base.update(kw)
    return ModelConfig(**base)


def params_of(tr: Trainer, k: int) -> dict[str, torch.Tensor]:
    return {n: p[k].detach().clone() for n, p in tr.net.named_parameters()}


# --------------------------------------------------------------------------- rollback

def test_rollback_restores_the_last_good_epoch_and_halves_the_learning_rate(task, mocker):
    """A non-finite loss in epoch 1 (third window) and again in epoch 2 (first window) of trial 0:
    each time its parameters and Adam state go back to the end of the previous epoch and its
    learning rate is halved (1/2, then 1/4 of the schedule); trial 1 trains on untouched."""
    tc = TrainConfig(epochs=4, lr0=0.01, lr_decay=20, bptt="truncated", output_gain=100.0,
                     max_rollbacks=3)
    tr = Trainer([model(), model()], [tc, tc], [0, 1], task, progress=False)
    poison = {(1, 2), (2, 0)}  # (epoch, update within the epoch) where trial 0's loss is NaN
    ctx = {"bad": False}
    loss = task.loss

    def nan_loss(out, y):
        losses = loss(out, y)
        if ctx["bad"] and torch.is_grad_enabled():  # the training update, not the evaluation
            losses = torch.where(torch.arange(len(losses)) == 0, torch.full_like(losses, math.nan), losses)
        return losses

    mocker.patch.object(tr.task, "loss", side_effect=nan_loss)
    epoch_end: dict[int, dict] = {}  # epoch -> trial 0's parameters and Adam step count at its end

    def log(rec):
        if rec["trial"] == 0:
            epoch_end[rec["epoch"]] = {"params": params_of(tr, 0), "t": float(tr.opt.t[0])}

    tr.log = log
    steps = mocker.spy(tr.opt, "step")
    update = tr._update
    seen: dict[int, int] = {}
    after_bad = []

    def spy_update(x, y, epoch, state=None):
        i = seen.get(epoch, 0)
        seen[epoch] = i + 1
        ctx["bad"] = (epoch, i) in poison
        n_steps = steps.call_count
        before = params_of(tr, 0)
        out = update(x, y, epoch, state)
        lr_used = steps.call_args_list[n_steps].args[0]  # the step this update made
        sched = float(lr_at(tr.lr0[:1], tr.decay[:1], epoch))
        # rollbacks before this update: epoch 1 from its third update on, epoch 2 from its first
        halvings = sum(1 for (e, j) in poison if (e, j) < (epoch, i))
        assert float(lr_used[0]) == pytest.approx(sched * 0.5 ** halvings, rel=1e-6), (epoch, i)
        assert float(lr_used[1]) == pytest.approx(sched, rel=1e-6), (epoch, i)  # the neighbour
        if ctx["bad"]:
            after_bad.append((epoch, before, params_of(tr, 0), float(tr.opt.t[0])))
            ctx["bad"] = False
        return out

    tr._update = spy_update
    res = tr.fit()
    assert [a[0] for a in after_bad] == [1, 2]
    for epoch, _, p0, t0 in after_bad:
        good = epoch_end[epoch - 1]
        for name, v in p0.items():  # the last good epoch's parameters, exactly
            assert torch.equal(v, good["params"][name]), (epoch, name)
        assert t0 == good["t"]  # and its Adam state
    # the first poisoned update came after two good ones in epoch 1: there was something to undo
    before = after_bad[0][1]
    assert all(not torch.equal(before[n], epoch_end[0]["params"][n]) for n in ("W_in", "W_rec", "bias"))
    assert float(tr.lr_factor[0]) == 0.25 and float(tr.lr_factor[1]) == 1.0
    assert res.final[0]["status"] == "rolled_back" and res.final[0]["rollbacks"] == 2
    assert res.final[1]["status"] == "ok" and res.final[1]["rollbacks"] == 0
    assert sum("halved" in e for e in res.final[0]["events"]) == 2
    lr = {(r["epoch"], r["trial"]): r["lr"] for r in res.history}
    for epoch in range(4):
        sched = float(lr_at(tr.lr0[:1], tr.decay[:1], epoch))
        factor = {0: 1.0, 1: 0.5, 2: 0.25, 3: 0.25}[epoch]
        assert lr[(epoch, 0)] == pytest.approx(sched * factor, rel=1e-6)
        assert lr[(epoch, 1)] == pytest.approx(sched, rel=1e-6)
    assert all(bool(torch.isfinite(p.detach()).all()) for p in tr.net.trainable())


def test_rollback_undoes_the_updates_of_the_current_epoch(task):
    """``_rollback`` alone: updates made since the last good epoch are undone (parameters and Adam
    moments) and the factor halves on every rollback; past ``max_rollbacks`` the trial fails
    and is frozen instead."""
    tc = TrainConfig(epochs=1, lr0=0.05, bptt="full", output_gain=100.0, max_rollbacks=2)
    tr = Trainer([model()], [tc], [0], task, progress=False)
    tr.fit()  # one good epoch: the snapshot
    good, m_good = params_of(tr, 0), [m[0].clone() for m in tr.opt.m]
    data = task.splits["train"]
    for _ in range(3):
        tr._update(data.x, data.y, 1)
    assert any(not torch.equal(v, good[n]) for n, v in params_of(tr, 0).items())
    tr._rollback(0, "test", 1)
    assert all(torch.equal(v, good[n]) for n, v in params_of(tr, 0).items())
    assert all(torch.equal(m[0], mg) for m, mg in zip(tr.opt.m, m_good, strict=True))
    assert float(tr.lr_factor[0]) == 0.5 and tr.statuses[0].status == "rolled_back"
    tr._rollback(0, "test", 1)
    assert float(tr.lr_factor[0]) == 0.25
    tr._rollback(0, "test", 1)  # the third: past max_rollbacks = 2
    assert tr.statuses[0].status == "failed" and not bool(tr.active[0])
    before = params_of(tr, 0)
    tr._update(data.x, data.y, 1)  # a failed trial is frozen
    assert all(torch.equal(v, before[n]) for n, v in params_of(tr, 0).items())


# --------------------------------------------------------------------------- clipping

def test_weights_and_biases_stay_clipped_after_every_step(task, mocker):
    """Two trials with different clipping (w_clip_dt 0.05 / 0.1, b_clip_dt 0.02 / 0.05 at
    dt = 0.5 ns: |W| <= 0.1 / 0.2, |b| <= 0.04 / 0.1) and a large learning rate: after every
    optimiser step every input and recurrent weight and every bias is within its own trial's
    bound, many sit on it (so the clip acted), and the sparsity mask still holds."""
    mcs = [model(dt_ns=0.5, density_intra=0.6, w_clip_dt=0.05, b_clip_dt=0.02),
           model(dt_ns=0.5, density_intra=0.6, w_clip_dt=0.1, b_clip_dt=0.05)]
    tc = TrainConfig(epochs=3, lr0=0.05, lr_decay=100, bptt="truncated", output_gain=100.0)
    tr = Trainer(mcs, [tc, tc], [0, 1], task, progress=False)
    steps = mocker.spy(tr.opt, "step")
    update = tr._update
    checked, at_bound = [], {"W": 0, "b": 0}

    def spy_update(*a, **kw):
        out = update(*a, **kw)
        net = tr.net
        for k, (wc, bc) in enumerate(((0.1, 0.04), (0.2, 0.1))):
            assert float(net.w_clip.flatten()[k]) == pytest.approx(wc)
            w = torch.cat([net.W_in[k].flatten(), net.W_rec[k].flatten()]).detach()
            b = net.bias[k].detach()
            assert float(w.abs().max()) <= wc * (1 + 1e-6), (k, float(w.abs().max()))
            assert float(b.abs().max()) <= bc * (1 + 1e-6), (k, float(b.abs().max()))
            assert torch.equal(net.W_rec[k].detach() * (1 - net.mask[k]), torch.zeros_like(net.mask[k]))
            at_bound["W"] += int((w.abs() >= wc * (1 - 1e-6)).sum())
            at_bound["b"] += int((b.abs() >= bc * (1 - 1e-6)).sum())
        checked.append(steps.call_count)
        return out

    tr._update = spy_update
    tr.fit()
    assert checked == list(range(1, steps.call_count + 1)) and steps.call_count >= 20  # every step
    assert at_bound["W"] > 100 and at_bound["b"] > 30  # measured 631 and 168 over 22 steps


def test_gradient_clipping_is_per_element(task, mocker):
    """train.grad_clip clips each gradient element to [-c, c] and leaves the others as they are
    (not a norm clip, which would shrink every element). Two trials of the same seed, one with
    clipping, one without: at the first step their raw gradients are equal, so the clipped one's
    must be the other's clamped element by element; at every later step it stays within c."""
    tc_free = TrainConfig(epochs=1, lr0=0.01, bptt="full", output_gain=100.0, grad_clip=None)
    probe = Trainer([model()], [tc_free], [0], task, progress=False)
    first: list[list[torch.Tensor]] = []
    step = probe.opt.step
    mocker.patch.object(probe.opt, "step", side_effect=lambda lr, active: (
        first.append([p.grad[0].clone() for p in probe.net.trainable()]), step(lr, active))[1])
    probe.fit()
    raw = torch.cat([g.abs().flatten() for g in first[0]])
    c = float(raw[raw > 0].quantile(0.75))  # a quarter of the nonzero elements above c

    tc = TrainConfig(epochs=4, lr0=0.01, bptt="full", output_gain=100.0, grad_clip=c)
    tc_free = TrainConfig(epochs=4, lr0=0.01, bptt="full", output_gain=100.0, grad_clip=None)
    tr = Trainer([model(), model()], [tc, tc_free], [0, 0], task, progress=False)
    grads: list[list[torch.Tensor]] = []
    step = tr.opt.step
    mocker.patch.object(tr.opt, "step", side_effect=lambda lr, active: (
        grads.append([p.grad.clone() for p in tr.net.trainable()]), step(lr, active))[1])
    tr.fit()
    assert len(grads) == 4
    n_clipped = n_kept = 0
    for g, r in zip(grads[0], first[0], strict=True):
        assert torch.equal(g[1], r)  # the unclipped trial saw the raw gradient
        assert torch.allclose(g[0], r.clamp(-c, c), rtol=0, atol=1e-12)
        n_clipped += int((r.abs() > c).sum())
        n_kept += int(((r.abs() < c) & (r != 0)).sum())
    assert n_clipped > 5 and n_kept > 5  # measured 20 and 60 of 89 (c = 2.50)
    for gs in grads:
        assert max(float(g[0].abs().max()) for g in gs) <= c
        assert max(float(g[1].abs().max()) for g in gs) > c  # the other trial is not clipped


# --------------------------------------------------------------------------- BPTT modes learn

# Per mode: epochs, lr0, extra train settings, updates in epoch 0, threshold on the median test
# accuracy of seeds 0-3. Measured medians (this file's task and network, one thread): full
# 0.930 (seeds 0.875-0.961), truncated 0.879 (0.758-0.938), shifted 0.805 (0.781-0.852),
# exact 0.934 (0.922-0.961). A constant output scores 0.5625 (the larger class).
BPTT = {
    "full": (150, 0.01, {}, 1, 0.85),
    "truncated": (100, 0.003, {}, 8, 0.78),
    "shifted": (40, 0.003, {"windows_per_epoch": 30}, 29, 0.72),
    "exact": (60, 0.01, {"batch_size": 16, "windows_per_epoch": 64}, 4, 0.85),
}


@pytest.mark.parametrize("mode", BPTT)
def test_every_bptt_mode_learns_beyond_chance(task, mode):
    epochs, lr0, extra, per_epoch, threshold = BPTT[mode]
    chance = max(float(task.splits["test"].y.mean()), 1 - float(task.splits["test"].y.mean()))
    assert chance == pytest.approx(0.5625) and threshold > chance + 0.15
    tc = TrainConfig(epochs=epochs, lr0=lr0, lr_decay=20, bptt=mode, output_gain=100.0, **extra)
    seeds = [0, 1, 2, 3]
    tr = Trainer([model()] * 4, [tc] * 4, seeds, task, progress=False)
    calls = []
    update = tr._update
    tr._update = lambda x, y, epoch, state=None: calls.append(epoch) or update(x, y, epoch, state)
    res = tr.fit()
    assert calls.count(0) == per_epoch  # the mode's own scheme ran
    accs = [f["test_accuracy"] for f in res.final]
    assert all(f["status"] == "ok" for f in res.final)
    assert statistics.median(accs) > threshold, accs
    assert min(accs) > chance, accs
