"""The job of ``hil conv train``: noise-aware training of the hybrid convolutional network
(thesis ch. 4) into a run folder, its evaluation as in thesis 4.9 and its plots.

``hil conv deploy`` and ``hil conv report`` run :func:`hil.conv.hybrid.deploy` and
:func:`hil.conv.report.deploy_report`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hil.conv.network import confusion_matrix, evaluate, kernels_file, save_model, train_conv
from hil.runs import RunFolder, save_figure

#: thesis 4.9: the hardware network was tested on the first 100 test images
FIRST_N = 100


@dataclass(frozen=True)
class ConvTrainSettings:
    """Training and evaluation settings: eq. 4.3 noise level ``noise`` (``eval_noise`` is the
    noisy evaluation's level when training without noise), Adam's ``lr``/``weight_decay``,
    noisy passes per image on the first 100 test images (``noisy_repeats``) and on the whole
    test set (``noisy_repeats_all``); ``data_dir`` only recorded (the images are loaded)."""

    noise: float = 0.5
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0
    noisy_repeats: int = 1000
    noisy_repeats_all: int = 10
    eval_noise: float = 0.5
    data_dir: str | None = None


@dataclass(frozen=True)
class ConvTrainResult:
    """``final.json``'s content (accuracies on ``all`` and on ``first100``), the noise level
    of the noisy evaluation and the kernels file for ``hil chain design --weights``."""

    results: dict[str, Any]
    eval_noise: float
    kernels_file: Path


def train_conv_job(split: Any, settings: ConvTrainSettings, run: RunFolder, *,
                   config: Mapping[str, Any] | None = None,
                   on_epoch: Callable[[dict[str, Any]], Any] | None = None) -> ConvTrainResult:
    """Train on ``split`` (:func:`hil.conv.images.load_images`) and write ``config.yaml`` (the
    data's shape and ``config``, the caller's settings as given), per-epoch ``metrics.jsonl``
    (each record also passed to ``on_epoch``), ``model.pt``, ``kernels.json``, ``final.json``
    (clean and noisy test accuracy on the whole test set and on the first 100 test images,
    with confusion matrices), ``training.png`` and ``kernels.png``."""
    s = settings
    run.write_config({"dataset": split.name, "levels": split.levels, "image_size": split.image_size,
                      "n_train": len(split.y_train), "n_test": len(split.y_test), "optimizer": "adam",
                      **dict(config or {})})

    def progress(rec: dict[str, Any]) -> None:
        run.append_metrics(rec)
        if on_epoch is not None:
            on_epoch(rec)

    model, history = train_conv(split, noise=s.noise, epochs=s.epochs, lr=s.lr,
                                batch_size=s.batch_size, seed=s.seed, weight_decay=s.weight_decay,
                                progress=progress)
    data_dir = str(Path(s.data_dir).resolve()) if s.data_dir else None
    meta = {"dataset": split.name, "data_dir": data_dir, "levels": split.levels, "noise": s.noise,
            "epochs": s.epochs, "lr": s.lr, "batch_size": s.batch_size, "seed": s.seed,
            "class_names": split.class_names}
    save_model(run.file("model.pt"), model, meta)
    kernels = kernels_file(model, run.file("kernels.json"), meta={"dataset": split.name, "noise": s.noise,
                                                                  "seed": s.seed, "run_folder": str(run)})

    x, y = split.x_test, split.y_test
    eval_noise = s.noise if s.noise > 0 else s.eval_noise
    results: dict[str, Any] = {"eval_noise": eval_noise}
    for label, sl in (("all", slice(None)), (f"first{FIRST_N}", slice(0, FIRST_N))):
        repeats = s.noisy_repeats if label != "all" else s.noisy_repeats_all
        clean = evaluate(model, x[sl], y[sl])
        noisy = evaluate(model, x[sl], y[sl], noise=eval_noise, repeats=repeats, seed=s.seed + 2)
        results[label] = {
            "n": clean["n"], "clean_acc": clean["accuracy"], "noisy_acc": noisy["accuracy"],
            "noisy_majority_acc": noisy["majority_accuracy"], "noisy_passes_per_image": noisy["passes"],
            "confusion_clean": confusion_matrix(y[sl], clean["predictions"], split.n_classes).tolist(),
            "confusion_noisy_majority": confusion_matrix(y[sl], noisy["predictions"],
                                                         split.n_classes).tolist()}
    results["kernels"] = model.kernels().tolist()
    results["bias"] = model.bias.detach().tolist()
    results["class_names"] = list(split.class_names)
    run.write_json("final.json", results)
    plot_training(history, run.file("training.png"), f"{split.name}, n_l = {s.noise:g}")
    plot_kernels(model.kernels(), run.file("kernels.png"))
    return ConvTrainResult(results, eval_noise, kernels)


def plot_training(history: list[dict[str, Any]], path: Any, title: str) -> None:
    """Training loss and clean/noisy accuracies per epoch."""
    from hil.plots import plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(ep, [h["train_loss"] for h in history], "o-")
    a.set(xlabel="epoch", ylabel="training loss (with noise)", title=title)
    for key, lab in (("train_acc", "train, clean"), ("test_acc", "test, clean"),
                     ("test_acc_noisy", "test, noisy")):
        b.plot(ep, [100 * h[key] for h in history], "o-", label=lab)
    b.set(xlabel="epoch", ylabel="accuracy (%)")
    b.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def plot_kernels(kernels: np.ndarray, path: Any) -> None:
    """The 2x2 kernels as images (thesis Fig. 4.2a), one shared symmetric colour scale."""
    from hil.plots import plt

    vmax = float(np.abs(kernels).max()) or 1.0
    fig, axes = plt.subplots(1, len(kernels), figsize=(3.2 * len(kernels), 3.2))
    for k, ax in enumerate(np.atleast_1d(axes)):
        w = kernels[k].reshape(2, 2)
        im = ax.imshow(w, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        for (r, c), v in np.ndenumerate(w):
            ax.text(c, r, f"{v:+.3f}\nf{2 * r + c}", ha="center", va="center", fontsize=9,
                    color="white" if abs(v) > 0.6 * vmax else "black")
        ax.set(title=f"kernel {k}", xticks=[0, 1], yticks=[0, 1])
    fig.colorbar(im, ax=list(np.atleast_1d(axes)), shrink=0.8, label="weight")
    save_figure(fig, path, dpi=100)
    plt.close(fig)
