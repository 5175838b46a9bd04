"""The gap budget of an upload (issue 16): one non-ideality at a time on the same weights."""

import json

import pytest
import torch

from hil.chip.gap_budget import FACTORS, PERFECT, format_budget, gap_budget, write_budget
from hil.config import ModelConfig, TaskConfig
from hil.network.model import DynamicalNetwork
from hil.network.tasks import make_task
from hil.runs import RunFolder


@pytest.fixture(scope="module")
def small():
    """A small digits network (1 x 8 spintronic neurons), random weights, a readout fitted to
    its converged states: deterministic figures well above chance."""
    task = make_task(TaskConfig(name="digits"))
    for name in ("train", "test"):  # the first images only: fast
        sp = task.splits[name]
        sp.x, sp.y = sp.x[:120], sp.y[:120]
    cfg = ModelConfig(n_layers=1, n_hidden=8, tau_ns=5.0, S=0.8, S_in=3.0, w_clip_dt=0.9, b_clip_dt=0.2,
                      substeps=2)
    net = DynamicalNetwork([cfg, cfg], task.n_in, task.n_out, [0, 1], task.input_centre)
    net.clip_parameters()
    tr = task.splits["train"]
    with torch.no_grad():
        feats = net(tr.x)[0][:, :, -1]
        for k in range(2):
            A = torch.cat([feats[k], torch.ones(len(tr.x), 1)], 1).double()
            sol = torch.linalg.pinv(A) @ torch.nn.functional.one_hot(tr.y, 10).double()
            net.W_out[k] = sol[:-1].T.float()
            net.b_out[k] = sol[-1].float()
    return net, task


def test_a_single_factor_explains_the_whole_gap(small):
    """Only quantisation differs from the perfect chip: its row is the configured chip's gap
    beyond the integrator's, the other factors cost nothing and the interaction is exactly 0."""
    net, task = small
    device = {**PERFECT, "weight_bits": 3}
    b = gap_budget(net, task, device, repeats=2)
    for r in b["per_seed"]:
        parts = {p["factor"]: p for p in r["parts"]}
        assert sum(p["cost"] for p in r["parts"]) == pytest.approx(r["total_gap"], abs=1e-12)
        assert parts["interaction (not explained by single factors)"]["cost"] == pytest.approx(0, abs=1e-12)
        assert parts["integrator (model vs perfect chip)"]["cost"] == pytest.approx(
            r["model"] - r["perfect_chip"], abs=1e-12)
        assert parts["quantisation"]["cost"] == pytest.approx(r["perfect_chip"] - r["chip"], abs=1e-12)
        for name in FACTORS:
            if name != "quantisation":
                assert parts[name]["cost"] == 0.0
        assert r["repeats"] == 1 and r["chip_sem"] == 0.0  # nothing noisy: measured once
    # 3-bit weights on an 8-bit-free model: the factor is real on at least one seed
    assert max(abs(p["cost"]) for r in b["per_seed"] for p in r["parts"] if p["factor"] == "quantisation") > 0


def test_noisy_factors_are_repeated_with_a_standard_error(small, tmp_path):
    net, task = small
    device = {**PERFECT, "readout_noise": 0.05, "offset_std": 0.05}
    b = gap_budget(net, task, device, repeats=3)
    r = b["per_seed"][0]
    parts = {p["factor"]: p for p in r["parts"]}
    assert r["repeats"] == 3
    assert parts["thermal and readout noise"]["sem"] > 0
    assert parts["static offsets"]["sem"] == 0.0  # a static draw: exact
    folder = RunFolder(tmp_path / "run")
    write_budget(b, folder)
    data = json.loads((tmp_path / "run" / "gap_budget.json").read_text())
    assert data["median_total_gap"] == pytest.approx(b["median_total_gap"])
    rows = (tmp_path / "run" / "gap_budget.csv").read_text().splitlines()
    assert rows[0] == "seed,factor,cost_points,sem_points"
    assert len(rows) == 1 + 2 * (len(r["parts"]) + 1)
    assert (tmp_path / "run" / "gap_budget.png").stat().st_size > 1000
    assert "total (model - configured chip)" in format_budget(b)


def test_bad_repeats_is_refused(small):
    with pytest.raises(ValueError, match="repeats"):
        gap_budget(*small, repeats=0)
