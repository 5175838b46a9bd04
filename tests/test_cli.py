"""The command line end to end on tiny settings."""

import json

import pytest

from hil.cli import main

TINY = ["--seeds", "0-1", "--epochs", "1", "--set", "model.n_hidden=6", "--set",
        "model.n_layers=2", "--set", "train.batch_size=300", "--no-progress"]


def test_train_writes_a_complete_run_folder(runs_dir, capsys):
    assert main(["train", "--preset", "digits", *TINY]) == 0
    out = capsys.readouterr().out
    folder = runs_dir / next(p.name for p in runs_dir.iterdir())
    assert f"run folder: {folder}" in out
    for name in ("config.yaml", "environment.json", "metrics.jsonl", "final.json",
                 "summary.json", "model.pt", "accuracy.png", "trajectories.png"):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["test"]["n"] == 2
    assert {"median", "mean", "std", "q25", "q75"} <= set(summary["test"])
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one epoch x two seeds
    # issue 16: every run reports its weights under a converged solution of the same ODE
    conv = summary["convergence"]
    assert conv["reference"]["converged"] and conv["reference"]["substeps"] >= 4
    assert len(conv["gap_points"]) == 2 and conv["test_reference"]["n"] == 2
    assert "under a converged solution of the same ODE" in out
    # analysis and design rules on the trained run
    assert main(["analyse", str(folder)]) == 0
    assert (folder / "connectivity_seed0.png").is_file()
    assert (folder / "pca_layer1_seed0.png").is_file()
    assert main(["design", "--run", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "cumulative_drive" in out and '"max_abs_state_error"' in out


@pytest.mark.parametrize(
    "args, words",
    [
        (["--task", "mnist"], "task.name: unknown task 'mnist'"),
        (["--model", "memristor"], "model.neuron: unknown model 'memristor'"),
        (["--set", "model.tau_ns=-2"], "model.tau_ns: must be a positive number"),
        (["--set", "model.density_intra=2"], "model.density_intra: must be in [0, 1]"),
        (["--seeds", "x"], "seeds: cannot read 'x'"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_bad_input_gives_clear_error_and_exit_code(runs_dir, capsys, args, words):
    assert main(["train", *args, "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err
    assert "Traceback" not in err


def test_design_rules_warn_outside_the_rules(capsys):
    assert main(["design", "--set", "model.dt_ns=20", "--set", "model.tau_ns=5"]) == 0
    out = capsys.readouterr().out
    assert "not shorter than the relaxation time" in out


def test_train_reports_when_every_seed_failed(runs_dir, capsys):
    """A run whose every seed diverges still ends cleanly, with the failed seeds named (explicit
    Euler at a huge drive: exponential Heun would not diverge, see test_convergence.py), and
    exits with code 1 (issue 18: not 0 when nothing trained)."""
    assert main(["train", "--task", "digits", "--epochs", "1", "--set", "model.S_in=500",
                 "--set", "model.substeps=1", "--set", "model.integrator=euler",
                 "--set", "train.max_rollbacks=0", "--set", "model.n_hidden=4",
                 "--set", "model.n_layers=1", "--set", "train.batch_size=400", "--seeds", "0",
                 "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "every seed failed" in out and "failed seeds (not in the summary): [0]" in out


@pytest.mark.parametrize("extra, words", [
    (["--backend", "sim", "--device", "cv_gama=0.2"], "device.cv_gama: unknown key"),
    (["--backend", "sim", "--device", "cv_gamma=lots"], "device.cv_gamma"),
    (["--backend", "model", "--device", "cv_gamma=0.2"], "the model backend has no device settings"),
    (["--backend", "lab:no/such/lab.yaml"], "no/such/lab.yaml"),
])
def test_upload_settings_are_refused_before_training(runs_dir, capsys, mocker, extra, words):
    """``hil train --backend ...`` uploads after training: a wrong device setting or lab config
    is refused before any epoch runs (it used to surface only after training), with no run folder."""
    spy = mocker.patch("hil.jobs.train_run")
    assert main(["train", "--preset", "digits", *TINY, *extra]) == 2
    assert words in capsys.readouterr().err
    spy.assert_not_called()
    assert not list(runs_dir.glob("*train*"))
