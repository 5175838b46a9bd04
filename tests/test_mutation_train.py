"""Fast checks of hil/training/train.py against known truth (written to kill mutmut's survivors,
scripts/mutation.sh): the trainer's safeguards (rollback halving the learning rate, weight/bias
and per-element gradient clipping, non-finite losses and states), what every epoch scheme and
BPTT mode feeds to the update (windows, start states, data order, averages), the records and
the progress bar of :meth:`Trainer.fit`, pruning, checkpoints and an exact resume.

Tiny synthetic tasks (a handful of short random sequences) and one layer of three spintronic
neurons, so the whole file runs in seconds. A learning rate of 0 keeps the parameters fixed
where a test needs the states a network reaches as known truth.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest
import torch

from hil.config import HardwareConfig, ModelConfig, TaskConfig, TrainConfig
from hil.errors import ConfigError
from hil.network.model import State
from hil.network.tasks import Split, Task
from hil.training import train
from hil.training.train import (
    Trainer,
    TrialAdam,
    clone_cfg,
    lr_at,
    rng_state,
    set_rng_state,
    summarize,
)

# --------------------------------------------------------------------------- tiny tasks


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out[..., 0] - y) ** 2).mean(dim=(1, 2))


def _hits(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out[..., 0] > 0.5).float() == y).float().mean(dim=(1, 2))


class ToyBatches(Task):
    """Short random sequences; target: whether the last point is above 0.5 (the loss reads the
    last step only). Epoch scheme "batches"."""

    name = "toy_batches"
    epoch_scheme = "batches"

    def __init__(self, n_train: int = 10, T: int = 5, val: bool = True) -> None:
        super().__init__(TaskConfig(window=4))
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n_train + 8, T, 1, generator=g)
        y = (x[:, -1:, 0] > 0.5).float()
        self.splits = {"train": Split(x[:n_train], y[:n_train]),
                       "test": Split(x[n_train : n_train + 4], y[n_train : n_train + 4])}
        if val:
            self.splits["val"] = Split(x[n_train + 4 :], y[n_train + 4 :])

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _mse(out, y)

    def metric(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _hits(out, y)


class ToySeries(Task):
    """One random series of ``T`` points, a target at every point. Epoch scheme "sequence"."""

    name = "toy_series"
    epoch_scheme = "sequence"
    per_step = True

    def __init__(self, T: int = 20, window: int = 4) -> None:
        super().__init__(TaskConfig(window=window))
        g = torch.Generator().manual_seed(1)
        for split in ("train", "test"):
            x = torch.rand(1, T, 1, generator=g)
            self.splits[split] = Split(x, (x[..., 0] > 0.5).float())

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _mse(out, y)

    def metric(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _hits(out, y)


def mc(**kw: Any) -> ModelConfig:
    """One layer of three spintronic neurons, one integration step per point, no clipping."""
    base: dict[str, Any] = dict(n_layers=1, n_hidden=3, tau_ns=2.0, S=1.0, S_in=2.0, highpass=False,
                                substeps=1, density_intra=1.0, w_clip_dt=None, b_clip_dt=None)
    base.update(kw)
    return ModelConfig(**base)


def tc(**kw: Any) -> TrainConfig:
    """Three short epochs of batches of 4, gain 1 (the toy tasks need no sigmoid gain)."""
    base: dict[str, Any] = dict(epochs=3, batch_size=4, lr0=0.02, lr_decay=2.0, output_gain=1.0)
    base.update(kw)
    return TrainConfig(**base)


def trainer(task: Task, K: int = 2, seeds: list[int] | None = None, model: ModelConfig | None = None,
            train_cfgs: list[TrainConfig] | None = None, **kw: Any) -> Trainer:
    """A quiet trainer of ``K`` trials (seeds 0..K-1 unless given) on ``task``."""
    seeds = seeds if seeds is not None else list(range(K))
    cfgs = train_cfgs or [tc()] * len(seeds)
    return Trainer([model or mc()] * len(seeds), cfgs, seeds, task, progress=False, **kw)


def params(tr: Trainer, k: int) -> dict[str, torch.Tensor]:
    """A copy of trial ``k``'s parameters."""
    return {n: p[k].detach().clone() for n, p in tr.net.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two parameter copies are bit for bit equal."""
    return all(torch.equal(a[n], b[n]) for n in a)


def step_spy(tr: Trainer) -> list[dict[str, Any]]:
    """Record every optimiser step: the learning rates, the active mask and the gradients."""
    calls: list[dict[str, Any]] = []
    step = tr.opt.step

    def spy(lr: torch.Tensor, active: torch.Tensor) -> None:
        calls.append({"lr": lr.clone(), "active": active.clone(),
                      "grads": [p.grad.clone() for p in tr.net.trainable()]})
        step(lr, active)

    tr.opt.step = spy  # type: ignore[method-assign]
    return calls


def update_spy(tr: Trainer) -> list[dict[str, Any]]:
    """Record every update: its arguments, the parameters before it and what it returned."""
    calls: list[dict[str, Any]] = []
    update = tr._update

    def spy(x: torch.Tensor, y: torch.Tensor, epoch: int, state: State | None = None):
        rec = {"x": x.clone(), "y": y.clone(), "epoch": epoch,
               "state": None if state is None else state.x.clone()}
        out = update(x, y, epoch, state)
        rec["loss"], rec["metric"] = out[0].clone(), out[1].clone()
        calls.append(rec)
        return out

    tr._update = spy  # type: ignore[method-assign]
    return calls


# --------------------------------------------------------------------------- small functions


def test_lr_schedule_is_lr0_over_epoch_over_decay_plus_one_per_trial() -> None:
    got = lr_at(torch.tensor([0.1, 0.2]), torch.tensor([5.0, 2.0]), 3)
    torch.testing.assert_close(got, torch.tensor([0.1 / 1.6, 0.2 / 2.5]))
    torch.testing.assert_close(lr_at(torch.tensor([0.3]), torch.tensor([4.0]), 0), torch.tensor([0.3]))


def test_summarize_statistics_and_the_empty_and_single_cases() -> None:
    s = summarize([4.0, 1.0, 2.0, 10.0, 3.0])
    assert s == pytest.approx({"n": 5, "median": 3.0, "mean": 4.0, "std": math.sqrt(12.5),
                               "q25": 2.0, "q75": 4.0, "min": 1.0, "max": 10.0})
    assert isinstance(s["n"], int)
    assert summarize([]) == {"n": 0}
    one = summarize([0.7])
    assert one["std"] == 0.0 and one["n"] == 1 and one["median"] == 0.7
    assert summarize([1.0, 3.0])["std"] == pytest.approx(math.sqrt(2.0))  # two values: ddof 1


def test_clone_cfg_changes_a_deep_copy() -> None:
    cfg = tc(epochs=5)
    got = clone_cfg(cfg, epochs=7, lr0=0.5)
    assert (got.epochs, got.lr0, got.batch_size) == (7, 0.5, 4)
    assert (cfg.epochs, cfg.lr0) == (5, 0.02) and got is not cfg
    status = train.TrialStatus(3, events=["epoch 0: x"])
    copied = clone_cfg(status, status="failed")
    copied.events.append("epoch 1: y")  # a deep copy: nothing shared with the original
    assert status.events == ["epoch 0: x"] and status.status == "ok" and copied.status == "failed"


def test_rng_state_round_trip_with_cached_gaussians(tmp_path) -> None:
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    np.random.standard_normal()  # numpy keeps the second of a pair of gaussians
    random.gauss(0.0, 1.0)  # so does Python
    state = rng_state()
    assert state["numpy"]["name"] == "MT19937" and state["numpy"]["has_gauss"] == 1
    assert state["numpy"]["keys"].dtype == torch.int64 and len(state["numpy"]["keys"]) == 624
    assert isinstance(state["numpy"]["cached_gaussian"], float) and state["numpy"]["cached_gaussian"] != 0
    assert state["python"]["gauss_next"] is not None and isinstance(state["python"]["internal"], list)
    torch.save(state, tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.standard_normal(3), random.gauss(0.0, 1.0), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.standard_normal(3), random.gauss(0.0, 1.0), random.random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[2:] == want[2:]


# --------------------------------------------------------------------------- TrialAdam


def test_trial_adam_defaults_match_torch_adam_where_eps_matters() -> None:
    """Default betas and eps: each trial's steps equal torch's Adam at that trial's learning rate,
    with gradients of ~1e-8 so that eps (1e-8) changes the step noticeably."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2, 3))
    refs = [torch.nn.Parameter(p.detach()[k].clone()) for k in range(2)]
    opts = [torch.optim.Adam([refs[k]], lr=lr) for k, lr in enumerate((0.01, 0.03))]
    mine = TrialAdam([p], 2)
    assert mine.t.shape == (2,) and not mine.t.any()
    assert all(not m.any() for m in mine.m + mine.v) and mine.m[0].shape == (2, 3)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        grad = 1e-8 * torch.randn(2, 3, generator=g)
        p.grad = grad.clone()
        for k in range(2):
            refs[k].grad = grad[k].clone()
            opts[k].step()
        mine.step(torch.tensor([0.01, 0.03]), torch.tensor([True, True]))
    for k in range(2):
        torch.testing.assert_close(p.detach()[k], refs[k].detach(), rtol=0, atol=1e-6)
    assert mine.t.tolist() == [4.0, 4.0]


def test_trial_adam_leaves_an_inactive_trial_and_a_gradless_parameter_alone() -> None:
    a = torch.nn.Parameter(torch.ones(2, 2))
    b = torch.nn.Parameter(torch.ones(2, 3))
    opt = TrialAdam([a, b], 2)
    a.grad = torch.ones(2, 2)  # b has no gradient
    opt.step(torch.tensor([0.1, 0.1]), torch.tensor([True, False]))
    assert opt.t.tolist() == [1.0, 0.0]
    torch.testing.assert_close(a.detach()[0], torch.full((2,), 0.9))  # Adam's first step: lr
    assert torch.equal(a.detach()[1], torch.ones(2)) and torch.equal(b.detach(), torch.ones(2, 3))


def test_trial_adam_state_of_and_load_state_of_one_trial() -> None:
    p = torch.nn.Parameter(torch.zeros(3, 2))
    opt = TrialAdam([p], 3)
    p.grad = torch.arange(6.0).view(3, 2)
    opt.step(torch.full((3,), 0.1), torch.tensor([True, True, False]))
    st = opt.state_of(1)
    torch.testing.assert_close(st["m"][0], 0.1 * torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(st["v"][0], 0.001 * torch.tensor([4.0, 9.0]))
    assert st["t"] == 1.0 and isinstance(st["t"], float)
    fresh = TrialAdam([torch.nn.Parameter(torch.zeros(3, 2))], 3)
    fresh.load_state_of(2, st)
    assert torch.equal(fresh.m[0][2], st["m"][0]) and torch.equal(fresh.v[0][2], st["v"][0])
    assert fresh.t.tolist() == [0.0, 0.0, 1.0] and not fresh.m[0][:2].any()


# --------------------------------------------------------------------------- construction


def test_the_trainer_refuses_mismatched_trials_schemes_and_bptt_modes() -> None:
    task = ToyBatches()
    with pytest.raises(ValueError, match="one model config, train config and seed per trial"):
        Trainer([mc(), mc()], [tc()], [0, 1], task, progress=False)
    with pytest.raises(ValueError, match="one model config"):
        Trainer([mc()], [tc(), tc()], [0, 1], task, progress=False)
    with pytest.raises(ValueError, match="one model config"):
        Trainer([mc(), mc()], [tc(), tc()], [0], task, progress=False)
    for key, value in (("epochs", 4), ("batch_size", 5), ("bptt", "truncated"), ("engine", "reference"),
                       ("output_gain", 2.0), ("windows_per_epoch", 3)):
        with pytest.raises(ConfigError) as err:
            Trainer([mc(), mc()], [tc(), tc(**{key: value})], [0, 1], ToySeries(), progress=False)
        assert err.value.key == f"train.{key}"
        assert err.value.message == "must be equal across trials run together"
    Trainer([mc(), mc()], [tc(lr0=0.1, grad_clip=2.0, max_rollbacks=1), tc()], [0, 1], task,
            progress=False)  # the rest may differ

    class Odd(ToyBatches):
        epoch_scheme = "odd"

    with pytest.raises(ConfigError) as err:
        Trainer([mc()], [tc()], [0], Odd(), progress=False)
    assert err.value.key == "task.name"
    assert err.value.message == ("task 'toy_batches' has epoch scheme 'odd'; this trainer runs: "
                                 "batches, sequence")
    with pytest.raises(ConfigError) as err:
        Trainer([mc()], [tc(bptt="shifted")], [0], task, progress=False)
    assert err.value.key == "train.bptt"
    assert err.value.message == ("'shifted' is not available for the toy_batches task "
                                 "(epoch scheme 'batches'); allowed: full")
    with pytest.raises(ConfigError) as err:  # exact start states need the filter off in every trial
        Trainer([mc(highpass=False), mc(highpass=True)], [tc(bptt="exact")] * 2, [0, 1], ToySeries(),
                progress=False)
    assert err.value.key == "train.bptt" and "model.highpass off" in err.value.message
    assert Trainer([mc()], [tc(bptt="exact")], [0], ToySeries(), progress=False).tcfg.bptt == "exact"


def test_construction_per_trial_settings_and_reproducible_generators() -> None:
    """Per-trial learning rates, decays and gradient clips (None: no clip); fresh status.
    Each trial's data order and hardware-aware draws come from generators seeded by that seed
    alone (10007 s + 1 and 7919 s + 3): the numbers recorded runs were made with, so a seed
    reproduces them whatever trials run beside it."""
    cfgs = [tc(lr0=0.1, lr_decay=3.0, grad_clip=None, max_rollbacks=2), tc(lr0=0.2, lr_decay=4.0)]
    task = ToyBatches()
    task.input_centre = 0.25  # the network centres the inputs where the task says
    tr = Trainer([mc(), mc()], cfgs, [3, 8], task, progress=False,
                 hardware=HardwareConfig(readout_noise=0.01))
    assert float(tr.net.input_centre) == 0.25 and tr.net.n_in == 1 and tr.net.n_out == 1
    torch.testing.assert_close(tr.lr0, torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(tr.decay, torch.tensor([3.0, 4.0]))
    assert tr.grad_clip.tolist() == [math.inf, 1.0]
    assert tr.lr_factor.tolist() == [1.0, 1.0] and tr.active.tolist() == [True, True]
    assert tr.max_rollbacks == 2 and tr.K == 2 and tr.seeds == [3, 8] and tr.tcfg is cfgs[0]
    assert [(s.seed, s.status, s.rollbacks, s.events) for s in tr.statuses] == [(3, "ok", 0, []),
                                                                              (8, "ok", 0, [])]
    assert [g.initial_seed() for g in tr.gens] == [10_007 * 3 + 1, 10_007 * 8 + 1]
    assert [g.initial_seed() for g in tr.hw_gens] == [7_919 * 3 + 3, 7_919 * 8 + 3]
    assert tr.hardware is not None and tr.hardware.readout_noise == 0.01
    assert (tr.start_epoch, tr.seconds_before, tr.history) == (0, 0.0, [])
    assert tr.net.engine == "fast" and tr.opt.K == 2 and len(tr.opt.m) == 5
    off = Trainer([mc()], [tc(engine="reference")], [0], ToyBatches(),
                  hardware=HardwareConfig())  # nothing switched on: no hardware-aware passes
    assert off.hardware is None and off.net.engine == "reference"
    assert off.progress is True and off.label == "train"  # the defaults: a bar labelled "train"


# --------------------------------------------------------------------------- one update


def test_update_zeroes_gradients_and_steps_with_the_scheduled_halved_rates() -> None:
    """Two updates on the same batch at learning rate 0 see the same gradient (not the sum);
    the optimiser gets lr_at(epoch) times each trial's factor and the active mask; the update
    returns the loss, metric and final state of the network it started from."""
    task = ToyBatches()
    tr = trainer(task, train_cfgs=[tc(lr0=0.0), tc(lr0=0.0)])
    steps = step_spy(tr)
    data = task.splits["train"]
    x, y = data.x[:4].expand(2, -1, -1, -1), data.y[:4].expand(2, -1, -1)
    with torch.no_grad():
        xs, fin = tr.net(x)
        out = tr.net.readout(xs[:, :, -1:])
    loss, metric, state = tr._update(x, y, 0)
    torch.testing.assert_close(loss, task.loss(out, y))
    torch.testing.assert_close(metric, task.metric(out, y))
    torch.testing.assert_close(state.x, fin.x)
    assert not loss.requires_grad and not state.x.requires_grad
    tr._update(x, y, 0)
    for g1, g2 in zip(steps[0]["grads"], steps[1]["grads"], strict=True):
        torch.testing.assert_close(g1, g2)
    assert any(float(g.abs().max()) > 0 for g in steps[0]["grads"])

    tr2 = trainer(task, train_cfgs=[tc(lr0=0.1, lr_decay=2.0), tc(lr0=0.3, lr_decay=4.0)])
    steps2 = step_spy(tr2)
    tr2.lr_factor[0] = 0.25
    tr2._update(x, y, 3)
    torch.testing.assert_close(steps2[0]["lr"], torch.tensor([0.1 / 2.5 * 0.25, 0.3 / 1.75]))
    assert steps2[0]["active"].tolist() == [True, True]


def test_update_reads_every_step_of_a_per_step_task_and_draws_the_hardware_per_update() -> None:
    """A per-step task's loss reads the readout at every point; with hardware-aware training
    every update sees a fresh draw from each trial's own generator (here: readout noise)."""
    task = ToySeries(T=12, window=4)
    tr = trainer(task, train_cfgs=[tc(bptt="full")] * 2)
    x, y = task.splits["train"].x, task.splits["train"].y
    with torch.no_grad():
        xs, _ = tr.net(x)
        out = tr.net.readout(xs)
    loss, metric, _ = tr._update(x, y, 0)
    torch.testing.assert_close(loss, task.loss(out, y))
    torch.testing.assert_close(metric, task.metric(out, y))

    hw = HardwareConfig(readout_noise=0.3)
    tr = trainer(task, train_cfgs=[tc(bptt="full")] * 2, hardware=hw)
    for _ in range(2):
        gens = []
        for g in tr.hw_gens:
            gg = torch.Generator()
            gg.set_state(g.get_state())
            gens.append(gg)
        with torch.no_grad():
            clean = task.loss(tr.net.readout(tr.net(x)[0]), y)
            with tr.net.hardware_pass(hw, gens):
                noisy = task.loss(tr.net.readout(tr.net(x)[0]), y)
        loss, _, _ = tr._update(x, y, 0)
        torch.testing.assert_close(loss, noisy)
        assert float((loss - clean).abs().min()) > 1e-4
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, tr.hw_gens, strict=True))


def test_gradients_are_clipped_per_element_on_both_sides() -> None:
    """Two trials of one seed on the same batch, one clipped at c: its gradient is the other's
    clamped to [-c, c] element by element (elements beyond c on both signs, some below c)."""
    task = ToyBatches()
    x, y = task.splits["train"].x[:4], task.splits["train"].y[:4]
    probe = trainer(task, K=1, train_cfgs=[tc(grad_clip=None)])
    raw = step_spy(probe)
    probe._update(x.expand(1, -1, -1, -1), y.expand(1, -1, -1), 0)
    flat = torch.cat([g.flatten() for g in raw[0]["grads"]])
    c = float(flat[flat != 0].abs().median())
    tr = trainer(task, seeds=[0, 0], train_cfgs=[tc(grad_clip=c), tc(grad_clip=None)])
    steps = step_spy(tr)
    tr._update(x.expand(2, -1, -1, -1), y.expand(2, -1, -1), 0)
    above = below = kept = 0
    for g, r in zip(steps[0]["grads"], raw[0]["grads"], strict=True):
        torch.testing.assert_close(g[1], r[0])  # the unclipped trial: the raw gradient
        torch.testing.assert_close(g[0], r[0].clamp(-c, c), rtol=0, atol=0)
        above += int((r[0] > c).sum())
        below += int((r[0] < -c).sum())
        kept += int(((r[0].abs() < c) & (r[0] != 0)).sum())
    assert above > 0 and below > 0 and kept > 0


def test_weights_and_biases_are_clipped_after_a_large_step() -> None:
    task = ToyBatches()
    m = mc(w_clip_dt=0.05, b_clip_dt=0.02, init_scale=1.0)
    tr = trainer(task, model=m, train_cfgs=[tc(lr0=1.0, grad_clip=None)] * 2)
    x, y = task.splits["train"].x[:4], task.splits["train"].y[:4]
    tr._update(x.expand(2, -1, -1, -1), y.expand(2, -1, -1), 0)
    w = torch.cat([tr.net.W_in.detach().flatten(), tr.net.W_rec.detach().flatten()]).abs()
    b = tr.net.bias.detach().abs()
    assert float(w.max()) == pytest.approx(0.05) and float(b.max()) == pytest.approx(0.02)
    assert float(tr.net.W_out.detach().abs().max()) > 0.5  # the readout is not clipped


def test_a_non_finite_loss_or_state_rolls_back_only_that_active_trial() -> None:
    """Trial 0's loss NaN: it is rolled back to its snapshot (the initial weights), lr halved,
    and gets no step; trial 1 trains. A finite loss with a non-finite final state counts as
    bad too. An inactive trial is neither stepped nor rolled back."""
    task = ToyBatches()
    tr = trainer(task, train_cfgs=[tc(lr0=0.1)] * 2)
    init = [params(tr, k) for k in range(2)]
    steps = step_spy(tr)
    real = task.loss
    mode = {"nan": True}

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v = real(out, y)
        if mode["nan"]:
            return torch.where(torch.arange(2) == 0, torch.full_like(v, math.nan), v)
        return v.nan_to_num(0.5)  # a state gone non-finite, with a finite loss

    tr.task.loss = loss  # type: ignore[method-assign]
    data = task.splits["train"]
    x, y = data.x[:4].expand(2, -1, -1, -1), data.y[:4].expand(2, -1, -1)
    tr._update(x, y, 0)
    assert steps[0]["active"].tolist() == [False, True]
    assert not any(g[0].any() for g in steps[0]["grads"])  # the bad trial adds no gradient
    assert same(params(tr, 0), init[0]) and not same(params(tr, 1), init[1])
    assert [s.rollbacks for s in tr.statuses] == [1, 0] and tr.lr_factor.tolist() == [0.5, 1.0]
    assert tr.statuses[0].status == "rolled_back" and tr.statuses[1].status == "ok"
    assert tr.statuses[0].events[0].startswith("epoch 0: non-finite loss or state; rolled back")

    mode["nan"] = False
    nan_state = tr.net.initial_state(4)
    nan_state.x[0] = math.nan
    tr._update(x, y, 0, nan_state)
    assert steps[1]["active"].tolist() == [False, True]
    assert [s.rollbacks for s in tr.statuses] == [2, 0] and tr.lr_factor.tolist() == [0.25, 1.0]

    tr.active[0] = False
    tr._update(x, y, 0)  # finite, but inactive: no gradient, no step
    assert not any(g[0].any() for g in steps[2]["grads"]) and steps[2]["active"].tolist() == [False, True]
    tr._update(x, y, 0, nan_state)
    assert [s.rollbacks for s in tr.statuses] == [2, 0] and steps[3]["active"].tolist() == [False, True]
    tr.active[1] = False
    n_steps = len(steps)
    tr._update(x, y, 0)
    assert len(steps) == n_steps  # nothing to train: no step at all


def test_after_update_is_called_after_every_update_with_its_epoch() -> None:
    seen: list[int] = []

    class Hooked(Trainer):
        def _after_update(self, epoch: int) -> None:
            seen.append(epoch)

    task = ToyBatches()
    Hooked([mc()], [tc(epochs=2)], [0], task, progress=False).fit()
    assert seen == [0, 0, 0, 1, 1, 1]  # 10 sequences in batches of 4


def test_snapshot_good_skips_non_finite_and_inactive_trials() -> None:
    tr = trainer(ToyBatches(), K=3)
    old = [tr._snap[k][0]["W_in"].clone() for k in range(3)]
    with torch.no_grad():
        tr.net.W_in.add_(1.0)
        tr.net.W_in[0, 0, 0] = math.nan
    tr.active[2] = False
    tr._snapshot_good()
    assert torch.equal(tr._snap[0][0]["W_in"], old[0])  # non-finite: kept the old point
    assert torch.equal(tr._snap[1][0]["W_in"], old[1] + 1.0)
    assert torch.equal(tr._snap[2][0]["W_in"], old[2])  # inactive: kept
    assert tr._snap[1][1]["t"] == 0.0 and set(tr._snap[1][0]) == {n for n, _ in tr.net.named_parameters()}


# --------------------------------------------------------------------------- epoch schemes


def test_batches_epoch_uses_each_trials_own_order_and_weights_by_batch_size() -> None:
    task = ToyBatches(n_train=10)
    tr = trainer(task, seeds=[5, 9])
    orders = []
    for g in tr.gens:
        gg = torch.Generator()
        gg.set_state(g.get_state())
        orders.append(torch.randperm(10, generator=gg))
    calls = update_spy(tr)
    loss, metric = tr.epoch_schemes()["batches"](0)
    data = task.splits["train"]
    assert [c["x"].shape[:2] for c in calls] == [(2, 4), (2, 4), (2, 2)]
    for i, c in enumerate(calls):
        for k in range(2):
            idx = orders[k][4 * i : 4 * i + 4]
            assert torch.equal(c["x"][k], data.x[idx]) and torch.equal(c["y"][k], data.y[idx])
        assert c["state"] is None and c["epoch"] == 0
    sizes = torch.tensor([4.0, 4.0, 2.0])
    torch.testing.assert_close(loss, sum(c["loss"] * s for c, s in zip(calls, sizes, strict=True)) / 10)
    torch.testing.assert_close(metric, sum(c["metric"] * s for c, s in zip(calls, sizes, strict=True)) / 10)
    assert not torch.equal(calls[0]["x"][0], calls[0]["x"][1])  # the two orders differ


def _states_from_rest(tr: Trainer, x: torch.Tensor) -> torch.Tensor:
    """(K, T + 1, M): the state before every point of the series from rest (fixed parameters)."""
    with torch.no_grad():
        xs, _ = tr.net(x)
    return torch.cat([tr.net.initial_state(1).x[:, :, None], xs], dim=2)[:, 0]


@pytest.mark.parametrize("cap, epoch, trained", [
    (None, 0, [0, 4, 8, 12, 16]), (None, 1, [1, 5, 9, 13]), (None, 6, [2, 6, 10, 14]),
    (2, 0, [0, 12]), (2, 1, [1, 9]), (1, 3, [3])])
def test_truncated_windows_shift_each_epoch_and_carry_the_state(cap, epoch, trained) -> None:
    """Windows of w = 4 points from offset epoch % w; with windows_per_epoch every k-th window
    (k = ceil(windows / cap)) trains and the state runs through the others: each trained window
    starts from the state the network reaches there from rest. The epoch's loss and metric are
    the means over its updates."""
    task = ToySeries(T=20, window=4)
    tr = trainer(task, train_cfgs=[tc(lr0=0.0, bptt="truncated", windows_per_epoch=cap)] * 2)
    x, y = task.splits["train"].x, task.splits["train"].y
    ref = _states_from_rest(tr, x)
    calls = update_spy(tr)
    loss, metric = tr._epoch_sequence(epoch)
    assert [c["x"].shape for c in calls] == [(1, 4, 1)] * len(trained)
    for c, s in zip(calls, trained, strict=True):
        assert torch.equal(c["x"], x[:, s : s + 4]) and torch.equal(c["y"], y[:, s : s + 4])
        assert c["state"].shape == (2, 1, 3)  # one series: one state per trial
        torch.testing.assert_close(c["state"][:, 0], ref[:, s], rtol=0, atol=1e-6)
        assert c["epoch"] == epoch
    torch.testing.assert_close(loss, sum(c["loss"] for c in calls) / len(calls))
    torch.testing.assert_close(metric, sum(c["metric"] for c in calls) / len(calls))


def test_truncated_epoch_without_a_whole_window_reports_zero() -> None:
    task = ToySeries(T=5, window=4)  # epoch 2: offset 2, no window of 4 fits
    tr = trainer(task, train_cfgs=[tc(lr0=0.0, bptt="truncated")] * 2)
    calls = update_spy(tr)
    loss, metric = tr._epoch_sequence(2)
    assert calls == [] and loss.tolist() == [0.0, 0.0] and metric.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("cap, starts", [(None, list(range(9))), (4, [0, 3, 6]), (3, [0, 3, 6]),
                                         (2, [0, 5])])
def test_shifted_windows_start_from_the_advanced_state(cap, starts) -> None:
    """Shifted start (eq. 5.11): windows at 0, k, 2k, ... (k = ceil((T - w + 1) / cap)), each
    starting from the previous start state advanced by k points: from rest to its start."""
    task = ToySeries(T=12, window=4)  # 9 windows
    tr = trainer(task, train_cfgs=[tc(lr0=0.0, bptt="shifted", windows_per_epoch=cap)] * 2)
    x, y = task.splits["train"].x, task.splits["train"].y
    ref = _states_from_rest(tr, x)
    calls = update_spy(tr)
    loss, metric = tr._epoch_sequence(1)
    assert len(calls) == len(starts)
    for c, s in zip(calls, starts, strict=True):
        assert torch.equal(c["x"], x[:, s : s + 4]) and torch.equal(c["y"], y[:, s : s + 4])
        assert c["state"].shape == (2, 1, 3)
        torch.testing.assert_close(c["state"][:, 0], ref[:, s], rtol=0, atol=1e-6)
        assert c["epoch"] == 1
    torch.testing.assert_close(loss, sum(c["loss"] for c in calls) / len(calls))
    torch.testing.assert_close(metric, sum(c["metric"] for c in calls) / len(calls))


def test_full_bptt_on_a_series_is_one_update_on_the_whole_series() -> None:
    task = ToySeries(T=12, window=4)
    tr = trainer(task, train_cfgs=[tc(bptt="full")] * 2)
    calls = update_spy(tr)
    loss, metric = tr.epoch_schemes()["sequence"](2)
    assert len(calls) == 1 and torch.equal(calls[0]["x"], task.splits["train"].x)
    assert calls[0]["state"] is None and calls[0]["epoch"] == 2
    assert torch.equal(loss, calls[0]["loss"]) and torch.equal(metric, calls[0]["metric"])


@pytest.mark.parametrize("cap, sizes", [(10, [4, 4, 2]), (None, [4, 4, 1])])
def test_exact_windows_are_drawn_per_trial_and_start_from_the_series_state(cap, sizes) -> None:
    """bptt=exact: windows_per_epoch (None: every window count) starts drawn from each trial's
    generator, batch_size per update; each window starts from the state of the current network
    one point before it (from rest at 0)."""
    task = ToySeries(T=12, window=4)  # 9 possible starts
    tr = trainer(task, seeds=[3, 5], train_cfgs=[tc(lr0=0.0, bptt="exact", windows_per_epoch=cap)] * 2)
    n = cap or 9
    pos = []
    for g in tr.gens:
        gg = torch.Generator()
        gg.set_state(g.get_state())
        pos.append(torch.randint(0, 9, (n,), generator=gg))
    drawn = torch.cat(pos)
    assert {0, 1} <= set(drawn.tolist())  # the edge cases: from rest, and one point in
    x, y = task.splits["train"].x, task.splits["train"].y
    ref = _states_from_rest(tr, x)
    calls = update_spy(tr)
    loss, metric = tr._epoch_sequence(0)
    assert [c["x"].shape for c in calls] == [(2, b, 4, 1) for b in sizes]
    i = 0
    for c, b in zip(calls, sizes, strict=True):
        for k in range(2):
            for j in range(b):
                p = int(pos[k][i + j])
                assert torch.equal(c["x"][k, j], x[0, p : p + 4])
                assert torch.equal(c["y"][k, j], y[0, p : p + 4])
                torch.testing.assert_close(c["state"][k, j], ref[k, p], rtol=0, atol=1e-6)
        i += b
    w = torch.tensor(sizes, dtype=torch.float32)
    torch.testing.assert_close(loss, sum(c["loss"] * s for c, s in zip(calls, w, strict=True)) / n)
    torch.testing.assert_close(metric, sum(c["metric"] * s for c, s in zip(calls, w, strict=True)) / n)


# --------------------------------------------------------------------------- fit


class FakeBar:
    """Stands in for tqdm: records its settings, postfixes, updates and closing."""

    made: list[FakeBar] = []

    def __init__(self, **kw: Any) -> None:
        self.kw, self.postfix, self.updates, self.closed = kw, [], [], False
        FakeBar.made.append(self)

    def set_postfix_str(self, s: str) -> None:
        self.postfix.append(s)

    def update(self, n: int) -> None:
        self.updates.append(n)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def bar(monkeypatch) -> type[FakeBar]:
    FakeBar.made = []
    monkeypatch.setattr("tqdm.auto.tqdm", FakeBar)
    monkeypatch.setattr(train.time, "perf_counter", lambda: 1000.0)  # a clock that stands still
    return FakeBar


def _fixed(values: dict[tuple[str, int], tuple[list[float], list[float], list[float]]]):
    """An ``_evaluate`` returning given per-trial (loss, metric, saturated) per (split, epoch)."""
    calls: list[str] = []

    def evaluate(split: str) -> dict[str, torch.Tensor]:
        calls.append(split)
        epoch = sum(1 for s in calls if s == split) - 1
        loss, metric, sat = values[(split, epoch)]
        return {"loss": torch.tensor(loss), "metric": torch.tensor(metric), "saturated": torch.tensor(sat)}

    return evaluate


def test_fit_records_every_trial_every_epoch_and_rolls_back_on_a_bad_evaluation(bar) -> None:
    """History records from the epoch's train loss/metric and the evaluations, in order; a NaN
    evaluation loss of an active trial rolls it back (its epoch-1 weights restored, lr halved
    from that epoch's record on); logs, hooks, the progress bar and the final summary."""
    task = ToyBatches()
    logged: list[dict[str, Any]] = []
    hooked: list[tuple[int, Any, Any]] = []

    class Hooked(Trainer):
        def _epoch_done(self, epoch: int, evals: dict, train_metric: torch.Tensor) -> None:
            hooked.append((epoch, evals, train_metric))

    tr = Hooked([mc(), mc()], [tc(epochs=3, lr0=0.1, lr_decay=1.0)] * 2, [4, 6], task, progress=True,
                log=logged.append, label="toy")
    nan = math.nan
    tr._evaluate = _fixed({  # type: ignore[method-assign]
        ("val", 0): ([0.5, 0.6], [0.25, 0.75], [0.0, 0.1]), ("test", 0): ([0.4, 0.3], [0.5, 1.0], [0.2, 0.3]),
        ("val", 1): ([0.1, 0.2], [0.5, 0.5], [0.0, 0.0]), ("test", 1): ([0.1, 0.2], [0.5, 0.5], [0.0, 0.0]),
        ("val", 2): ([0.1, 0.2], [1.0, 0.5], [0.0, 0.0]), ("test", 2): ([nan, 0.2], [0.0, 0.5], [0.0, 0.0])})
    train_out = {0: ([1.0, 2.0], [0.1, 0.2]), 1: ([3.0, 4.0], [0.3, 0.4]), 2: ([5.0, 6.0], [0.5, 0.6])}
    real = tr._epoch_batches
    end: dict[int, dict[str, torch.Tensor]] = {}

    def epoch_fn(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        real(epoch)
        end[epoch] = params(tr, 0)
        loss, metric = train_out[epoch]
        return torch.tensor(loss), torch.tensor(metric)

    tr._epoch_batches = epoch_fn  # type: ignore[method-assign]
    res = tr.fit()
    assert [(r["epoch"], r["trial"], r["seed"]) for r in res.history] == [
        (e, k, s) for e in range(3) for k, s in ((0, 4), (1, 6))]
    assert logged == res.history and res.history is tr.history
    r = res.history[1]  # epoch 0, trial 1
    assert set(r) == {"epoch", "seed", "trial", "train_loss", "train_accuracy", "lr", "status", "val_loss",
                      "val_accuracy", "val_saturated", "test_loss", "test_accuracy", "test_saturated"}
    assert r == pytest.approx({"epoch": 0, "seed": 6, "trial": 1, "train_loss": 2.0, "train_accuracy": 0.2,
                               "lr": 0.1, "status": "ok", "val_loss": 0.6, "val_accuracy": 0.75,
                               "val_saturated": 0.1, "test_loss": 0.3, "test_accuracy": 1.0,
                               "test_saturated": 0.3})
    assert res.history[4]["train_loss"] == 5.0 and res.history[4]["train_accuracy"] == pytest.approx(0.5)
    assert res.history[4]["status"] == "rolled_back" and res.history[5]["status"] == "ok"
    assert [r["lr"] for r in res.history] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.1 / 3 * 0.5, 0.1 / 3])
    assert same(params(tr, 0), end[1])  # rolled back to the end of epoch 1
    assert [s.rollbacks for s in tr.statuses] == [1, 0]
    assert [(e, t.tolist()) for e, _, t in hooked] == [
        (e, pytest.approx(train_out[e][1])) for e in range(3)]
    assert float(hooked[2][1]["test"]["loss"][1]) == pytest.approx(0.2)
    assert set(hooked[0][1]) == {"val", "test"}
    b = bar.made[-1]
    assert b.kw == {"total": 3, "initial": 0, "desc": "toy", "disable": False, "unit": "epoch",
                    "dynamic_ncols": True}
    assert b.postfix == ["median accuracy 25.0% (2/2 trials)", "median accuracy 50.0% (2/2 trials)",
                         "median accuracy 50.0% (2/2 trials)"]
    assert b.updates == [1, 1, 1] and b.closed
    f0, f1 = res.final
    assert f0["epoch"] == 2 and f0["seed"] == 4 and f0["status"] == "rolled_back" and f0["rollbacks"] == 1
    assert len(f0["events"]) == 1 and f0["events"][0].startswith("epoch 2: non-finite evaluation loss; ")
    assert f1 == {**res.history[5], "rollbacks": 0, "events": []}
    assert res.statuses is tr.statuses and res.net is tr.net and res.seconds == 0.0


def test_fit_prunes_on_request_stops_when_all_are_stopped_and_checkpoints(bar) -> None:
    """on_epoch gets the evaluations and train metric; the trials it names stop ("pruned"),
    a failed one stays failed; when none is left the run stops. A checkpoint after every epoch;
    the progress bar shows only the active trials and the test split without a val split."""
    task = ToyBatches(val=False)
    asked: list[tuple[int, set[str], torch.Tensor]] = []
    states: list[dict[str, Any]] = []

    def on_epoch(epoch: int, info: dict[str, Any]) -> set[int]:
        asked.append((epoch, set(info["evals"]), info["train_metric"]))
        return {0: {1}, 1: {0, 1, 2}}.get(epoch, set())

    class Extra(Trainer):
        def _progress_extra(self) -> str:
            return ", 3 s on chip"

    tr = Extra([mc()] * 3, [tc(epochs=5, max_rollbacks=0)] * 3, [0, 1, 2], task, progress=False,
               on_epoch=on_epoch, checkpoint=states.append)
    tr._rollback(2, "test", 0)  # past max_rollbacks = 0: failed at once
    tr.seconds_before = 2.5  # time spent before: the checkpoints carry it on (the clock stands still)
    tr._evaluate = _fixed({("test", e): ([0.1, 0.2, 0.3], [0.25, 0.5, 1.0], [0.0] * 3)  # type: ignore[method-assign]
                           for e in range(5)})
    frozen: dict[int, dict[str, torch.Tensor]] = {}
    real = tr._epoch_batches

    def epoch_fn(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        frozen[epoch] = params(tr, 1)
        return real(epoch)

    tr._epoch_batches = epoch_fn  # type: ignore[method-assign]
    res = tr.fit()
    assert [a[0] for a in asked] == [0, 1] and asked[0][1] == {"test"} and asked[0][2].shape == (3,)
    assert [f["status"] for f in res.final] == ["pruned", "pruned", "failed"]
    assert [r["status"] for r in res.history] == ["ok", "ok", "failed", "ok", "pruned", "failed"]
    assert same(frozen[1], params(tr, 1))  # pruned after epoch 0: frozen since
    assert not tr.active.any() and len(res.history) == 6
    b = bar.made[-1]
    assert b.kw["disable"] is True and b.kw["total"] == 5 and b.closed and b.updates == [1, 1]
    assert b.postfix == ["median accuracy 25.0% (2/3 trials), 3 s on chip",
                         "median accuracy 25.0% (1/3 trials), 3 s on chip"]
    assert [s["epoch"] for s in states] == [1, 2] and [s["seconds"] for s in states] == [2.5, 2.5]
    assert states[0]["active"].tolist() == [True, False, False]

    again = Extra([mc()] * 3, [tc(epochs=5, max_rollbacks=0)] * 3, [0, 1, 2], task, progress=False)
    again.load_resume_state(states[-1])  # every trial stopped: nothing left to run
    calls = update_spy(again)
    res2 = again.fit()
    assert calls == [] and len(res2.history) == 6 and bar.made[-1].kw["initial"] == 2
    assert [f["status"] for f in res2.final] == ["pruned", "pruned", "failed"]


def test_evaluate_reports_loss_metric_and_saturation() -> None:
    """The trainer's evaluation of a split: the task's loss and metric of the readout of the last
    step, and the fraction of states below 0.01 or above 0.99."""
    task = ToyBatches()
    tr = trainer(task, model=mc(S_in=40.0, b_in=-0.5, tau_ns=1.0))
    got = tr._evaluate("test")
    data = task.splits["test"]
    with torch.no_grad():
        xs, _ = tr.net(data.x)
        out = tr.net.readout(xs[:, :, -1:])
    torch.testing.assert_close(got["loss"], task.loss(out, data.y))
    torch.testing.assert_close(got["metric"], task.metric(out, data.y))
    sat = ((xs < 0.01) | (xs > 0.99)).float().mean(dim=(1, 2, 3))
    torch.testing.assert_close(got["saturated"], sat)
    assert 0 < float(sat.max()) < 1


def _nan_equal(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Records equal, NaN equal to NaN (a diverged batch makes the epoch's train loss NaN)."""
    def key(r: dict[str, Any]) -> dict[str, Any]:
        return {k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()}

    return [key(r) for r in a] == [key(r) for r in b]


def test_resume_continues_at_the_same_numbers(bar, tmp_path) -> None:
    """A run stopped after epoch 1 (checkpoint saved as a weights-only file) and resumed by a
    fresh trainer ends with the uninterrupted run's weights, optimiser, history and statuses,
    including a rollback's halved lr and the hardware-aware draws; its clock goes on from the
    time already spent."""
    task = ToyBatches()
    hw = HardwareConfig(program_noise=0.05, readout_noise=0.02)
    real = task.loss
    count = {"n": 0}

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        v = real(out, y)
        if torch.is_grad_enabled():
            count["n"] += 1
            if count["n"] == 2:  # trial 0's second update of the run diverges
                v = torch.where(torch.arange(2) == 0, torch.full_like(v, math.nan), v)
        return v

    task.loss = loss  # type: ignore[method-assign]

    def make(**kw: Any) -> Trainer:
        return trainer(task, seeds=[3, 4], model=mc(w_clip_dt=0.5, b_clip_dt=0.2),  # write errors need ranges
                       train_cfgs=[tc(epochs=4, lr0=0.05)] * 2, hardware=hw, **kw)

    ref_tr = make()
    ref = ref_tr.fit()
    assert ref.final[0]["rollbacks"] == 1 and ref.final[1]["rollbacks"] == 0
    count["n"] = 0
    path = tmp_path / "ckpt.pt"

    def keep(state: dict[str, Any]) -> None:
        torch.save(state, path)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make(checkpoint=keep).fit()
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 2 and state["seconds"] == 0.0 and len(state["history"]) == 4
    count["n"] = 100  # no more divergence
    torch.manual_seed(99)  # other global random state, as in a fresh process
    resumed = make()
    resumed.load_resume_state(state)
    resumed.seconds_before = 7.5
    assert resumed.start_epoch == 2 and resumed.lr_factor.tolist() == [0.5, 1.0]
    assert resumed.resume_state(2)["seconds"] == 0.0  # no time given: none
    res = resumed.fit()
    for (name, p), q in zip(res.net.named_parameters(), ref.net.parameters(), strict=True):
        assert torch.equal(p, q), name
    for a, b in zip(resumed.opt.m + resumed.opt.v + [resumed.opt.t],
                    ref_tr.opt.m + ref_tr.opt.v + [ref_tr.opt.t], strict=True):
        assert torch.equal(a, b)
    assert resumed.opt.t.tolist() == [10.0, 12.0]  # 3 updates an epoch, one of trial 0's undone
    assert _nan_equal(res.history, ref.history) and len(res.history) == 8
    assert [f["events"] for f in res.final] == [f["events"] for f in ref.final]
    assert [s.status for s in resumed.statuses] == ["rolled_back", "ok"]
    assert res.seconds == 7.5 and bar.made[-1].kw["initial"] == 2
