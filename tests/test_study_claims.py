"""The mismatch and budget studies' claims, recomputed at reduced size (issue 23, items 1-2).

The README (Simulated chips, "hil study mismatch") reports on `digits` at 20 % mismatch (5 seeds,
120 epochs): plain upload 58.0 %, off-chip fine-tuning on the calibrated twin 86.8 %,
chip-in-the-loop with the calibrated twin 83.9 %, ideal 89.5 %. What it claims: mismatch costs
the uploaded weights accuracy, and both calibrated-twin methods win most of it back.

Here the same study runs as the README's command does (the `digits` preset, the CLI), at reduced
size: 20 training epochs, 2 fine-tuning epochs, one write per calibration level, seeds 0-1. The
claim is measured as the fraction of the upload's loss that a method recovers,
``(method - upload) / (ideal - upload)``, which varies far less from seed to seed than the
points themselves (the upload's loss ranges from 4 to 35 points).

Measured at this size (seeds 0-4, this project's 2-core CPU, Dec 2026; `hil study mismatch
--preset digits --seeds 0-4 --epochs 20 --levels 0.2 --finetune-epochs 2 --methods
ideal,nominal_upload,calibrated_offchip,chip_in_loop_calibrated --budget-repeats 0
--calibration-writes 1`, 7.7 min):

| method | recovered fraction per seed 0-4 | median seeds 0-1 | std (5 seeds) | floor |
|---|---|---|---|---|
| off-chip on the calibrated twin | 0.99, 0.87, 1.21, 0.88, 0.82 | 0.93 | 0.16 | 0.45 |
| chip-in-the-loop, calibrated twin | 0.88, 0.62, 0.89, 0.92, 0.64 | 0.75 | 0.15 | 0.30 |

Floors: the seeds 0-1 median minus three standard deviations, rounded down. The upload's loss
itself (ideal - upload) was 16.4, 4.3, 15.9, 27.5, 34.7 points: every seed must lose at least
1 point, or the fractions mean nothing. Not claimed, because the spread does not support it at
this size: that off-chip fine-tuning beats chip-in-the-loop (-0.9 to +6.2 points per seed).

The budget study's headline (README, "Device time as a budget"): with `digits_chip`, fine-tuning
the calibrated twin off-chip and refitting the readout on one measured pass (`offchip+readout`)
comes within 1 point of the ideal model on less device time than running the chip on every
batch (`physics`). At reduced size (`hil study budget --preset digits_chip --seeds 0-4 --epochs
20 --level 0.2 --estimators offchip+readout,physics --finetune-epochs 1 --calibration-writes 1
--finetune-lr 0.003`, 13.6 min with three other jobs): gap to the ideal model -1.44, -4.12,
0.00, -1.78, -0.89 points (it ends above the ideal model: the refit readout learns the chip),
seeds 0-1 median -2.78, std 1.54, so the ceiling is -2.78 + 3 x 1.54 = 1.8 points. Device time
per chip is a count, not a measurement, and is the same for every seed: 0.046 s against 0.101 s
for one epoch of `physics` (0.314 s for its five at full size). Not claimed at this size:
`offchip+readout` beating `physics` in accuracy (2.8 to 11.1 points per seed, std 3.6).
"""

from __future__ import annotations

import json

import pytest

from hil.cli import main

FLOORS = {"calibrated_offchip": 0.45, "chip_in_loop_calibrated": 0.30}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, float]]:
    """Per method, per seed: the test accuracy in points, from the study's JSON."""
    runs = tmp_path_factory.mktemp("runs")
    rc = main(["study", "mismatch", "--preset", "digits", "--seeds", "0-1", "--epochs", "20",
               "--levels", "0.2", "--finetune-epochs", "2", "--methods",
               "ideal,nominal_upload," + ",".join(FLOORS), "--budget-repeats", "0",
               "--calibration-writes", "1", "--threads", "1", "--no-progress",
               "--runs-dir", str(runs)])
    assert rc == 0
    (folder,) = runs.iterdir()
    out: dict[str, dict[int, float]] = {}
    for row in json.loads((folder / "mismatch_study.json").read_text())["results"]:
        assert row["level"] == 0.2
        out.setdefault(row["method"], {})[row["seed"]] = 100 * row["accuracy"]
    return out


def test_mismatch_costs_the_uploaded_weights_accuracy(study: dict[str, dict[int, float]]) -> None:
    loss = {s: study["ideal"][s] - study["nominal_upload"][s] for s in (0, 1)}
    assert all(v >= 1.0 for v in loss.values()), loss


@pytest.mark.parametrize("method", list(FLOORS))
def test_the_calibrated_twin_recovers_what_upload_lost(study: dict[str, dict[int, float]],
                                                       method: str) -> None:
    fractions = sorted((study[method][s] - study["nominal_upload"][s])
                       / (study["ideal"][s] - study["nominal_upload"][s]) for s in (0, 1))
    median = (fractions[0] + fractions[1]) / 2
    assert median >= FLOORS[method], f"{method}: recovers {median:.2f} of the loss < {FLOORS[method]}"


@pytest.fixture(scope="module")
def budget(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The budget study's JSON at reduced size (seeds 0-1)."""
    runs = tmp_path_factory.mktemp("runs")
    rc = main(["study", "budget", "--preset", "digits_chip", "--seeds", "0-1", "--epochs", "20",
               "--level", "0.2", "--estimators", "offchip+readout,physics", "--finetune-epochs", "1",
               "--calibration-writes", "1", "--finetune-lr", "0.003", "--threads", "1",
               "--no-progress", "--runs-dir", str(runs)])
    assert rc == 0
    (folder,) = runs.iterdir()
    return json.loads((folder / "budget_study.json").read_text())


def test_offchip_readout_comes_near_the_ideal_model_on_less_device_time(budget: dict) -> None:
    finals = budget["finals"]
    ideal = dict(zip(budget["seeds"], budget["ideal_per_seed"], strict=True))
    gaps = [100 * (ideal[row["seed"]] - row["test_accuracy"]) for row in finals["offchip+readout"]]
    assert len(gaps) == 2
    assert all(row["status"] == "ok" for rows in finals.values() for row in rows), finals
    assert sum(gaps) / 2 <= 1.8, f"offchip+readout ends {gaps} points below the ideal model"
    cheap = [row["train_device_time_s"] for row in finals["offchip+readout"]]
    full = [row["train_device_time_s"] for row in finals["physics"]]
    # device time is counted (uploads, runs), so it is exact: less than half of one physics epoch
    assert max(cheap) < 0.5 * min(full), (cheap, full)
    assert max(cheap) == pytest.approx(0.0463, abs=5e-4)
