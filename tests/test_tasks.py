"""Task data: splits, shapes, labels and the flip-flop rule."""

import numpy as np
import pytest
import torch

from hil.config import TaskConfig
from hil.errors import ConfigError
from hil.tasks import (
    FlipFlop,
    SequentialDigits,
    SineSquare,
    flipflop_batch,
    make_task,
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
