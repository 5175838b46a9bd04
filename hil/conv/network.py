"""Noise-aware hybrid convolutional network of thesis chapter 4 (Fig. 4.1, eq. 4.1 and 4.3).

Hardware part: a convolution with three 2x2 kernels, stride 1, no bias, "same" padding (one
zero row at the bottom, one zero column at the right, so each output map has the input's
size, thesis 4.3.2). Each 2x2 patch is one multiply-and-accumulate (MAC) of a chain of four
spintronic synapses: kernel input ``i = 2*k0 + k1`` (row offset ``k0``, column offset ``k1``)
is sent at RF frequency ``f_i`` (pixel (0, 0) -> 1.75 GHz).

Software part (``ConvNet.head``): per-kernel bias, max-pool 2x2 stride 2, ReLU, a linear
layer to the classes; softmax is in the cross-entropy loss.

Noise-aware training (thesis 4.6.1): the MAC output is multiplied by ``1 + n_l N(0, 1)``
with fresh noise at every forward pass (``n_l = 0.5``), so that the weights stay good under
hardware error. A zero MAC (image background) gets no noise.

Optimiser: the thesis gives the learning rate (0.01), epochs (10) and loss (cross-entropy)
but not the optimiser or the batch size; Adam with mini-batches of 64 is used here (plain
SGD at lr 0.01 barely moves in 10 epochs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibration.chain import THESIS_FREQS_HZ  # thesis 4.3.2 / table 3.1: kernel input i -> f_i

__all__ = ["THESIS_FREQS_HZ"]  # re-exported: the default frequency of each kernel input
KERNEL_SIZE = 2


def _pad(x: torch.Tensor) -> torch.Tensor:
    """"Same" padding for a 2x2 kernel: one zero column at the right, one zero row at the bottom."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images of shape (N, 1, H, W), got {tuple(x.shape)}")
    return F.pad(x, (0, KERNEL_SIZE - 1, 0, KERNEL_SIZE - 1))


def patches(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) images -> (N, H, W, 4): the padded 2x2 patch under the kernel at each
    output pixel, flattened as (0,0), (0,1), (1,0), (1,1) (index ``2*k0 + k1``): the four RF
    inputs, in frequency order, that produce that output pixel."""
    p = _pad(x).unfold(2, KERNEL_SIZE, 1).unfold(3, KERNEL_SIZE, 1)  # (N, 1, H, W, 2, 2)
    return p.reshape(*p.shape[:1], *p.shape[2:4], KERNEL_SIZE * KERNEL_SIZE)


def multiplicative_noise(mac: torch.Tensor, noise: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 4.3: ``mac * (1 + noise * N(0, 1))``, one fresh draw per element."""
    if noise <= 0:
        return mac
    eps = torch.randn(mac.shape, generator=generator, dtype=mac.dtype, device=mac.device)
    return mac * (1 + noise * eps)


class ConvNet(nn.Module):
    """Fig. 4.1: hardware conv (no bias) -> [noise] -> bias -> max-pool 2 -> ReLU -> linear."""

    def __init__(self, image_size: int, n_kernels: int = 3, n_classes: int = 10) -> None:
        super().__init__()
        if image_size < 2 or image_size % 2:
            raise ValueError(f"image_size must be even and >= 2 (2x2 max-pool), got {image_size}")
        self.image_size = int(image_size)
        self.n_kernels = int(n_kernels)
        self.n_classes = int(n_classes)
        self.conv = nn.Conv2d(1, n_kernels, KERNEL_SIZE, stride=1, bias=False)
        self.bias = nn.Parameter(torch.zeros(n_kernels))
        self.fc = nn.Linear(n_kernels * (image_size // 2) ** 2, n_classes)

    @staticmethod
    def patches(x: torch.Tensor) -> torch.Tensor:
        """See the module function :func:`patches`."""
        return patches(x)

    def mac(self, x: torch.Tensor) -> torch.Tensor:
        """The noiseless hardware output (N, n_kernels, H, W): eq. 4.1 without bias."""
        return self.conv(_pad(x))

    def head(self, mac: torch.Tensor) -> torch.Tensor:
        """Everything after the hardware: bias, max-pool, ReLU, linear -> logits."""
        h = mac + self.bias.view(1, -1, 1, 1)
        h = F.relu(F.max_pool2d(h, 2, 2))
        return self.fc(h.flatten(1))

    def forward(self, x: torch.Tensor, noise: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        return self.head(multiplicative_noise(self.mac(x), noise, generator))

    def kernels(self) -> np.ndarray:
        """(n_kernels, 4) kernel weights, input order ``2*k0 + k1`` as in :func:`patches`."""
        w = self.conv.weight.detach().cpu().double().numpy()
        return w.reshape(self.n_kernels, KERNEL_SIZE * KERNEL_SIZE)


# --------------------------------------------------------------------------- training


def _batches(n: int, batch_size: int) -> range:
    return range(0, n, batch_size)


@torch.no_grad()
def evaluate(model: ConvNet, x: torch.Tensor, y: torch.Tensor, *, noise: float = 0.0, repeats: int = 1,
             seed: int = 0, batch_size: int = 1024) -> dict[str, Any]:
    """Accuracy of ``model`` on (x, y); with ``noise > 0``, each image goes ``repeats`` times
    through the network with fresh eq. 4.3 noise (thesis 4.9: 1000 passes per image).

    Returns ``accuracy`` (mean over all passes), ``predictions`` (per-image majority vote, or
    the plain prediction without noise), ``majority_accuracy``, ``votes`` (N, classes) counts
    and ``passes``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    passes = repeats if noise > 0 else 1
    gen = torch.Generator().manual_seed(seed)
    votes = torch.zeros(len(x), model.n_classes, dtype=torch.int64)
    for i in _batches(len(x), batch_size):
        mac = model.mac(x[i:i + batch_size])
        # chunks of repeats so that (repeats x batch) noise tensors stay small
        per_chunk = max(1, (1 << 22) // max(1, mac.numel()))
        for r in range(0, passes, per_chunk):
            k = min(per_chunk, passes - r)
            m = mac.unsqueeze(0).expand(k, *mac.shape)
            m = multiplicative_noise(m, noise, gen).reshape(-1, *mac.shape[1:])
            pred = model.head(m).argmax(-1).view(k, -1)
            votes[i:i + batch_size] += F.one_hot(pred, model.n_classes).sum(0)
    y = torch.as_tensor(y)
    correct = votes.gather(1, y.view(-1, 1)).squeeze(1)
    majority = votes.argmax(1)
    return {"accuracy": float(correct.sum()) / (passes * max(1, len(x))),
            "majority_accuracy": float((majority == y).float().mean()) if len(x) else float("nan"),
            "predictions": majority.numpy(), "votes": votes.numpy(), "passes": passes, "n": len(x)}


def confusion_matrix(y_true: Sequence[int] | np.ndarray | torch.Tensor,
                     y_pred: Sequence[int] | np.ndarray | torch.Tensor, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts; row = true class, column = predicted class."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels, y_pred {p.size}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def train_conv(split: Any, *, noise: float = 0.5, epochs: int = 10, lr: float = 0.01, batch_size: int = 64,
               seed: int = 0, weight_decay: float = 0.0,
               progress: Callable[[dict[str, Any]], None] | None = None
               ) -> tuple[ConvNet, list[dict[str, Any]]]:
    """Noise-aware training on an :class:`hil.conv.images.ImageSplit` (thesis 4.3.1, 4.6.1).

    Adam, cross-entropy on the logits, mini-batches reshuffled every epoch. ``seed`` fixes the
    initial weights (``torch.manual_seed``) and a private generator draws the shuffling and
    the training noise, so a run is reproducible. Per epoch: mean training loss (with noise),
    clean train and test accuracy, and the test accuracy with one noisy pass per image (same
    noise draw every epoch, so the curve shows the weights changing, not the noise).
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})")
    torch.manual_seed(seed)
    x_train = torch.as_tensor(split.x_train, dtype=torch.float32)
    y_train = torch.as_tensor(split.y_train, dtype=torch.int64)
    x_test = torch.as_tensor(split.x_test, dtype=torch.float32)
    y_test = torch.as_tensor(split.y_test, dtype=torch.int64)
    model = ConvNet(int(x_train.shape[-1]), n_classes=len(split.class_names))
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(len(x_train), generator=gen)
        total, count = 0.0, 0
        for i in _batches(len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x_train[idx], noise=noise, generator=gen), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        rec = {"epoch": epoch, "train_loss": total / count,
               "train_acc": evaluate(model, x_train, y_train)["accuracy"],
               "test_acc": evaluate(model, x_test, y_test)["accuracy"],
               "test_acc_noisy": evaluate(model, x_test, y_test, noise=noise, seed=seed + 1)["accuracy"],
               "noise": noise, "seconds": time.perf_counter() - t0}
        history.append(rec)
        if progress is not None:
            progress(rec)
    return model, history


# --------------------------------------------------------------------------- files


def _plain(obj: Any) -> Any:
    """JSON round trip, so that ``meta`` loads with ``torch.load(weights_only=True)``."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def save_model(path: str | Path, model: ConvNet, meta: dict[str, Any] | None = None) -> Path:
    """Save the weights with the shape of the network, so :func:`load_model` can rebuild it."""
    from hil.runs import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format": "hil-convnet-1", "image_size": model.image_size, "n_kernels": model.n_kernels,
                    "n_classes": model.n_classes, "state_dict": model.state_dict(),
                    "meta": _plain(meta or {})}, tmp)
    return path


def load_model(path: str | Path) -> tuple[ConvNet, dict[str, Any]]:
    """The network saved by :func:`save_model` and its ``meta``."""
    from hil.errors import HilError
    from hil.runs import load_checkpoint

    blob = load_checkpoint(path)  # weights_only=True; a corrupt file is a HilError naming it
    if blob.get("format") != "hil-convnet-1":
        raise HilError(f"{path}: not a model file written by hil.conv.network.save_model")
    try:
        model = ConvNet(blob["image_size"], blob["n_kernels"], blob["n_classes"])
        model.load_state_dict(blob["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise HilError(f"{path}: the weights do not fit a hil.conv.network network ({exc!s:.200})") from None
    return model, blob["meta"]


def kernels_file(model: ConvNet, path: str | Path, freq_hz: Sequence[float] = THESIS_FREQS_HZ,
                 meta: dict[str, Any] | None = None) -> Path:
    """Write the kernels as the weight file of ``hil chain design --weights``: one chain of four
    synapses per kernel, synapse i at ``freq_hz[i]`` carrying weight ``kernels()[k, i]``."""
    w = model.kernels()
    if len(freq_hz) != w.shape[1]:
        raise ValueError(f"need {w.shape[1]} frequencies (one per kernel input), got {len(freq_hz)}")
    spec = {"freq_hz": [float(f) for f in freq_hz],
            "weights": {f"chain{k}": [float(v) for v in w[k]] for k in range(len(w))},
            "units": "weight per unit of normalised pixel (pixel / levels, i.e. per unit of the "
                     "maximum RF power of eq. 4.2); input i = 2*row + column under the kernel",
            "meta": _plain({"bias": model.bias.detach().tolist(), **(meta or {})})}
    path = Path(path)
    path.write_text(json.dumps(spec, indent=2))
    return path
