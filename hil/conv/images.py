"""Image datasets for the hybrid convolutional network (thesis chapter 4).

Two datasets, both offline: scikit-learn's 8x8 digits (shipped with the package) and
FashionMNIST read from the user's IDX files (never downloaded). Pixels are scaled to [0, 1]
(``pixel / levels``); ``levels`` is kept because the hardware sends ``pixel / levels`` of the
maximum RF power of each input frequency (thesis 4.3.2, eq. 4.2).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hil.errors import ConfigError, HilError

DIGITS_CLASSES = tuple(str(i) for i in range(10))
#: thesis table 4.1
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
#: the standard FashionMNIST file names (each may also be gzipped, with ``.gz`` appended)
FASHION_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                 "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
DATASETS = ("digits", "fashion-mnist")

#: IDX type code -> big-endian numpy dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxError(HilError, ValueError):
    """An IDX file is malformed (bad magic number, truncated, wrong size)."""


@dataclass
class ImageSplit:
    """Train and test images, (N, 1, H, W) float32 tensors in [0, 1], int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    levels: int
    name: str
    class_names: tuple[str, ...] = field(default=DIGITS_CLASSES)

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The integer pixel values 0..levels of images ``x`` (the values the hardware encodes)."""
        return torch.round(x * self.levels).to(torch.int64)


def load_digits_images(seed_split: int = 0) -> ImageSplit:
    """scikit-learn's 8x8 digits, stratified 50/50 train/test split (``random_state=seed_split``).

    The split is the one ``hil.network.tasks.SequentialDigits`` uses, so the test half, and its first
    100 images, are always the same for a given ``seed_split``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    raw = d.images.astype(np.int64)  # 0..16
    y = d.target.astype(np.int64)
    rtr, rte, ytr, yte = train_test_split(raw, y, test_size=0.5, random_state=seed_split, stratify=y)
    levels = 16

    def images(r: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((r / levels).astype(np.float32)[:, None])

    return ImageSplit(images(rtr), torch.from_numpy(ytr), images(rte), torch.from_numpy(yte),
                      levels=levels, name="digits", class_names=DIGITS_CLASSES)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzipped; gzip recognised by its magic bytes).

    Format: two zero bytes, a type code byte, the number of dimensions, that many big-endian
    uint32 sizes, then the data in big-endian order. Returns a native-endian array.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise IdxError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if blob[:2] == b"\x1f\x8b":
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError) as exc:
            raise IdxError(f"{path}: corrupt or truncated gzip file ({exc})") from None
    if len(blob) < 4:
        raise IdxError(f"{path}: truncated: {len(blob)} bytes, too short for an IDX header")
    if blob[0] != 0 or blob[1] != 0 or blob[2] not in _IDX_DTYPES:
        raise IdxError(f"{path}: not an IDX file: bad magic number {blob[:4].hex()} (expected 0000, "
                       f"a type code in {sorted(hex(c) for c in _IDX_DTYPES)} and the number of "
                       "dimensions)")
    dtype = np.dtype(_IDX_DTYPES[blob[2]])
    ndim = blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise IdxError(f"{path}: truncated header: {len(blob)} bytes, {ndim} dimensions need {header}")
    dims = tuple(int(v) for v in np.frombuffer(blob, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(blob) - header
    if got < expected:
        raise IdxError(f"{path}: truncated: dimensions {dims} need {expected} data bytes, found {got}")
    if got > expected:
        raise IdxError(f"{path}: size mismatch: dimensions {dims} need {expected} data bytes, "
                       f"found {got} ({got - expected} extra)")
    data = np.frombuffer(blob, dtype=dtype, count=int(np.prod(dims, dtype=np.int64)), offset=header)
    return data.reshape(dims).astype(dtype.newbyteorder("="))


def _find(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise ConfigError("data_dir", f"missing {name} (or {name}.gz) in {data_dir.resolve()}: the "
                      "FashionMNIST IDX files must be supplied by the user (nothing is downloaded; "
                      f"needed: {', '.join(FASHION_FILES.values())})")


def load_fashion_mnist(data_dir: str | Path) -> ImageSplit:
    """FashionMNIST from the four standard IDX files in ``data_dir``; pixels / 255."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ConfigError("data_dir", f"{data_dir} is not a folder; it must hold the FashionMNIST IDX "
                          f"files supplied by the user ({', '.join(FASHION_FILES.values())})")
    paths = {k: _find(data_dir, v) for k, v in FASHION_FILES.items()}
    arrays = {k: read_idx(p) for k, p in paths.items()}
    levels = 255
    out = []
    for part in ("train", "test"):
        x, y = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        xp, yp = paths[f"{part}_images"], paths[f"{part}_labels"]
        if x.ndim != 3 or x.shape[1] != x.shape[2]:
            raise IdxError(f"{xp}: expected square images (N, H, H), got shape {x.shape}")
        if y.ndim != 1:
            raise IdxError(f"{yp}: expected labels of shape (N,), got {y.shape}")
        if len(x) != len(y):
            raise IdxError(f"{xp} holds {len(x)} images but {yp} holds {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= len(FASHION_CLASSES)):
            raise IdxError(f"{yp}: labels outside 0..{len(FASHION_CLASSES) - 1}")
        if x.dtype != np.uint8:
            raise IdxError(f"{xp}: expected unsigned byte pixels, got {x.dtype}")
        out.append(torch.from_numpy((x.astype(np.float32) / levels)[:, None]))
        out.append(torch.from_numpy(y.astype(np.int64)))
    if out[0].shape[-1] != out[2].shape[-1]:
        raise IdxError(f"{data_dir}: train images are {out[0].shape[-1]} px wide, test images "
                       f"{out[2].shape[-1]} px")
    return ImageSplit(*out, levels=levels, name="fashion-mnist", class_names=FASHION_CLASSES)


def load_images(name: str, data_dir: str | Path | None = None, seed_split: int = 0) -> ImageSplit:
    """Dispatch on the dataset name: ``digits`` or ``fashion-mnist`` (needs ``data_dir``)."""
    if name == "digits":
        return load_digits_images(seed_split)
    if name == "fashion-mnist":
        if data_dir is None:
            raise ConfigError("data_dir", "fashion-mnist needs the folder holding the user-supplied IDX "
                              f"files ({', '.join(FASHION_FILES.values())}, optionally .gz)")
        return load_fashion_mnist(data_dir)
    raise ConfigError("dataset", f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
