"""Task data: splits, shapes, labels and the flip-flop rule."""

import numpy as np
import pytest
import torch

from hil.config import ModelConfig, RunConfig, TaskConfig, TrainConfig, estimate_memory, validate
from hil.errors import ConfigError
from hil.network.tasks import (
    TASKS,
    FlipFlop,
    SequentialDigits,
    SineSquare,
    Split,
    Task,
    flipflop_batch,
    make_task,
    register_task,
    sine_square_sequence,
)


def test_digits_split_and_sequence():
    t = SequentialDigits(TaskConfig())
    assert len(t.splits["train"]) == 898 and len(t.splits["test"]) == 899
    x = t.splits["train"].x
    assert x.shape[1:] == (64, 1)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert t.input_centre == float(x.mean())
    assert set(t.splits["test"].y.unique().tolist()) == set(range(10))


def test_digits_validation_split_comes_from_train_half():
    t = SequentialDigits(TaskConfig(val_fraction=0.2))
    full = SequentialDigits(TaskConfig())
    assert len(t.splits["train"]) + len(t.splits["val"]) == 898
    assert torch.equal(t.splits["test"].x, full.splits["test"].x)


def test_digits_loss_and_metric_per_trial():
    t = SequentialDigits(TaskConfig())
    y = torch.tensor([1, 2, 3])
    out = torch.zeros(2, 3, 1, 10)
    out[0, torch.arange(3), 0, y] = 10.0  # trial 0 right, trial 1 uniform
    acc = t.metric(out, y)
    assert acc[0] == 1.0
    loss = t.loss(out, y)
    assert loss[0] < 1e-3 and abs(float(loss[1]) - np.log(10)) < 1e-5


def test_sine_square_sequence_shares_extremes():
    x, y = sine_square_sequence(50, 8, seed=3)
    assert x.shape == y.shape == (400,)
    per = x.reshape(50, 8)
    assert np.allclose(per[:, 2], 1.0) and np.allclose(per[:, 6], -1.0)
    assert set(np.unique(y)) == {0.0, 1.0}
    t = SineSquare(TaskConfig(n_periods=20))
    assert not torch.equal(t.splits["train"].x, t.splits["test"].x)


def test_flipflop_rule():
    x, y = flipflop_batch(4, 150, 3, 0.1, 0.0, delay=2, width=3, seed=0)
    for i in range(4):
        for b in range(3):
            state, t = 0.0, 0
            expected = np.zeros(150)
            pending = []
            while t < 150:
                if x[i, t, b] != 0 and (t == 0 or x[i, t - 1, b] == 0):
                    pending.append((t + 3 + 2, x[i, t, b]))
                t += 1
            for t in range(150):
                for when, s in pending:
                    if when == t:
                        state = s
                expected[t] = state
            assert np.array_equal(expected, y[i, :, b])
    assert np.abs(y).max() == 1.0


def test_flipflop_task_metric():
    t = FlipFlop(TaskConfig(n_train=5, n_test=3, seq_len=50))
    y = t.splits["test"].y
    out = (y + 0.1).unsqueeze(0).unsqueeze(3).squeeze(3)[None].squeeze(0)
    assert out.shape == (1, 3, 50, 3)
    assert float(t.metric(out, y)[0]) == 1.0
    assert float(t.metric(out + 0.2, y)[0]) == 0.0


def test_flipflop_validation_is_held_out_of_the_training_draws():
    full = FlipFlop(TaskConfig(name="flipflop", n_train=50, n_test=10))
    held = FlipFlop(TaskConfig(name="flipflop", n_train=50, n_test=10, val_fraction=0.2))
    assert (len(held.splits["train"]), len(held.splits["val"])) == (40, 10)
    both = torch.cat([held.splits["train"].x, held.splits["val"].x])
    assert torch.equal(both, full.splits["train"].x)  # a split of the same draws, no overlap
    assert torch.equal(held.splits["test"].x, full.splits["test"].x)
    with pytest.raises(ConfigError, match="task.val_fraction"):
        FlipFlop(TaskConfig(name="flipflop", n_train=1, n_test=10, val_fraction=0.5))


def test_sine_square_validation_series_is_a_third_draw():
    """task.val_fraction > 0 adds a validation series of the same length (seed 999), distinct
    from the training and test series, which stay as they were."""
    plain = make_task(TaskConfig(name="sine_square"))
    with_val = make_task(TaskConfig(name="sine_square", val_fraction=0.5))
    assert "val" not in plain.splits and "val" in with_val.splits
    for name in ("train", "test"):
        assert torch.equal(plain.splits[name].x, with_val.splits[name].x)
    val = with_val.splits["val"]
    assert val.x.shape == with_val.splits["test"].x.shape
    assert not torch.equal(val.x, with_val.splits["test"].x)
    assert not torch.equal(val.x, with_val.splits["train"].x)


# ----------------------------------------------------------------------------- the registry

def test_the_registry_holds_the_three_tasks_and_config_sees_the_same_classes():
    from hil import config
    from hil.task_specs import TASK_SPECS

    assert list(TASKS) == ["digits", "sine_square", "flipflop"]
    assert (TASKS["digits"], TASKS["sine_square"], TASKS["flipflop"]) == (SequentialDigits, SineSquare,
                                                                         FlipFlop)
    assert all(TASK_SPECS[name] is cls for name, cls in TASKS.items())
    assert config.TASKS is TASK_SPECS
    # what the trainer and the memory estimate ask each task
    assert [TASKS[n].epoch_scheme for n in TASKS] == ["batches", "sequence", "batches"]
    assert SineSquare.bptt_modes() == ("full", "truncated", "shifted", "exact")
    assert SequentialDigits.bptt_modes() == FlipFlop.bptt_modes() == ("full",)
    t, tr = TaskConfig(n_bits=5), TrainConfig(batch_size=40)
    assert [TASKS[n].n_outputs(t) for n in TASKS] == [10, 1, 5]
    assert SequentialDigits.shape(t, tr) == (1, 64, 40, 899)
    assert FlipFlop.shape(t, tr) == (5, 200, 40, 200)
    assert SineSquare.shape(t, tr) == (1, 640, 1, 1)
    assert SineSquare.shape(t, TrainConfig(bptt="exact", batch_size=7)) == (1, 30, 7, 1)
    for task in (SequentialDigits(TaskConfig()), SineSquare(TaskConfig()),
                 FlipFlop(TaskConfig(name="flipflop", n_bits=5, n_train=2, n_test=2))):
        # the spec (what config sees) agrees with the built task (what the network is sized by)
        assert (task.n_in, task.n_out) == (task.shape(task.cfg, tr)[0], task.n_outputs(task.cfg))


def test_an_unknown_task_name_fails_naming_the_key_and_the_allowed_names():
    with pytest.raises(ConfigError, match=r"task\.name: unknown task 'mnist'; allowed: digits, "
                                          r"sine_square, flipflop"):
        make_task(TaskConfig(name="mnist"))
    with pytest.raises(ConfigError, match=r"cli: task\.name: .*allowed: digits, sine_square, flipflop"):
        validate(RunConfig(task=TaskConfig(name="mnist")), "cli")


def test_the_flipflop_spec_refuses_a_delay_that_never_switches():
    validate(RunConfig(task=TaskConfig(name="flipflop", seq_len=10, delay=6)))
    with pytest.raises(ConfigError, match=r"task\.delay: must be < task\.seq_len - 3"):
        validate(RunConfig(task=TaskConfig(name="flipflop", seq_len=10, delay=7)))
    validate(RunConfig(task=TaskConfig(name="digits", seq_len=10, delay=7)))  # not the digits' concern


def test_only_the_flipflop_has_an_error_budget():
    ff = FlipFlop(TaskConfig(name="flipflop", n_train=2, n_test=4, seq_len=60))
    y = ff.splits["test"].y.numpy()
    budget = ff.error_budget(y + 0.5, ff.splits["test"].x.numpy(), y)
    assert ff.error_budget_title and budget is not None
    assert budget["miss_rate"] == pytest.approx(1.0)
    assert SequentialDigits.error_budget_title is None and SineSquare.error_budget_title is None


class _Echo(Task):
    """A tiny task defined outside hil.network.tasks: report the sign of the first input at the end."""

    name = "echo_test"
    epoch_scheme = "batches"
    n_in, n_out = 1, 2

    @classmethod
    def n_outputs(cls, t: TaskConfig) -> int:
        return 2

    @classmethod
    def shape(cls, t: TaskConfig, tr: TrainConfig) -> tuple[int, int, int, int]:
        return 1, 12, min(tr.batch_size, t.n_train), t.n_test

    @classmethod
    def validate(cls, t: TaskConfig, source: str | None = None) -> None:
        if t.n_train < 8:
            raise ConfigError("task.n_train", f"echo needs at least 8, got {t.n_train}", source)

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__(cfg)
        g = torch.Generator().manual_seed(0)
        for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
            x = torch.zeros(n, 12, 1)
            y = torch.randint(0, 2, (n,), generator=g)
            x[:, 0, 0] = 2.0 * y - 1.0
            self.splits[split] = Split(x, y)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(out[:, :, -1], dim=-1)
        return -logp.gather(-1, y.expand(logp.shape[0], -1).unsqueeze(-1)).squeeze(-1).mean(1)

    def metric(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out[:, :, -1].argmax(-1) == y).float().mean(1)


@pytest.fixture
def echo_registered():
    from hil.task_specs import TASK_SPECS

    register_task(_Echo)
    try:
        yield _Echo
    finally:
        TASKS.pop(_Echo.name, None)
        TASK_SPECS.pop(_Echo.name, None)


def test_a_registered_task_is_validated_built_and_trained_without_touching_the_trainer(echo_registered):
    from hil.training.train import Trainer

    cfg = validate(RunConfig(task=TaskConfig(name="echo_test", n_train=16, n_test=8),
                             model=ModelConfig(n_hidden=6, n_layers=1),
                             train=TrainConfig(epochs=1, batch_size=8), seeds=[0]))
    with pytest.raises(ConfigError, match=r"task\.n_train: echo needs at least 8"):
        validate(RunConfig(task=TaskConfig(name="echo_test", n_train=4)))
    mem = estimate_memory(cfg)
    N = cfg.model.n_hidden
    assert mem["parameters"] == 4 * 6 * (N * 1 + 2 * N * N + N + 2 * N + 2)  # n_in 1, n_out 2
    task = make_task(cfg.task)
    assert isinstance(task, _Echo)
    res = Trainer([cfg.model], [cfg.train], cfg.seeds, task, progress=False).fit()
    assert len(res.history) == 1 and res.final[0]["status"] == "ok"
    with pytest.raises(ConfigError, match="train.bptt"):  # a batches task: full BPTT only
        Trainer([cfg.model], [TrainConfig(bptt="shifted")], [0], task, progress=False)
    with pytest.raises(ConfigError, match="allowed: digits, sine_square, flipflop, echo_test"):
        make_task(TaskConfig(name="mnist"))


def test_a_task_needs_a_name_and_a_known_epoch_scheme():
    from hil.task_specs import TASK_SPECS

    class Nameless(Task):
        pass

    class Odd(Task):
        name = "odd_test"
        epoch_scheme = "minibatches"

    with pytest.raises(ValueError, match="set a task name"):
        register_task(Nameless)
    with pytest.raises(ValueError, match="unknown epoch_scheme 'minibatches'; allowed: batches, sequence"):
        register_task(Odd)
    assert "odd_test" not in TASKS and "odd_test" not in TASK_SPECS
