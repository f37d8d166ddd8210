"""The ``fashion_mnist`` task: Zalando's Fashion-MNIST from its original IDX files.

60,000 training and 10,000 test images of 10 kinds of clothing, 28x28 grey. The files are read
from a local directory (Debian's ``dataset-fashion-mnist`` package puts them in
``/usr/share/datasets/fashion-mnist/``); nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from .arrays import ArrayData
from .tasks import Task, register_task

__all__ = ["DEFAULT_DIR", "MEAN", "STD", "fashion_mnist", "mnist_cnn", "mnist_mlp", "read_idx"]

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist/"
"""Where Debian's ``dataset-fashion-mnist`` package installs the IDX files."""

MEAN = 0.2860
"""Mean of the training images' pixels in [0, 1] (the reference recipes' normalisation)."""

STD = 0.3530
"""Standard deviation of the training images' pixels in [0, 1]."""

_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_HOW_TO_GET = (
    "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the "
    "four files from https://github.com/zalandoresearch/fashion-mnist and pass "
    "data_dir='/path/to/them'."
)
# IDX magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
_MAGIC = {1: 0x00000801, 3: 0x00000803}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Decode one IDX file (gzipped or not) of unsigned bytes with ``ndim`` dimensions.

    The header is the big-endian magic number then one big-endian int32 size per dimension; the
    body must hold exactly the product of the sizes in bytes.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decompress whatever the file name says
        raw = gzip.decompress(raw)
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"fashion_mnist: {path} is {len(raw)} bytes, too short for an IDX header "
                        f"({header} bytes); the file is truncated. Get it again.")
    magic, *dims = np.frombuffer(raw, dtype=">i4", count=1 + ndim).tolist()
    if magic != _MAGIC[ndim]:
        raise DataError(f"fashion_mnist: {path} has IDX magic number {magic:#010x}, expected "
                        f"{_MAGIC[ndim]:#010x} (unsigned bytes, {ndim}-D); is it the right file?")
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"fashion_mnist: {path} holds {len(raw) - header} data bytes, expected "
                        f"{expected} for shape {tuple(dims)}; the file is truncated or corrupt.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"fashion_mnist: missing {name}.gz (or {name}) in {root}. {_HOW_TO_GET}")


@functools.lru_cache(maxsize=2)
def _load(root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Cached per process as uint8 tensors (55 MB) that never leave this module: every task gets
    # its own float32 / int64 copies, so no caller can change what the next load returns.
    if not root.is_dir():
        raise DataError(f"fashion_mnist: data directory {root} does not exist; it should hold "
                        f"the four Fashion-MNIST IDX files. {_HOW_TO_GET}")
    paths = {k: _find(root, name) for k, name in _FILES.items()}
    out = []
    for split in ("train", "test"):
        images = read_idx(paths[f"{split}_x"], 3)  # (N, 28, 28) uint8
        labels = read_idx(paths[f"{split}_y"], 1)  # (N,) uint8
        if images.shape[1:] != (28, 28):
            raise DataError(f"fashion_mnist: {paths[f'{split}_x']} holds images of "
                            f"{images.shape[1:]} pixels, expected (28, 28).")
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"fashion_mnist: {images.shape[0]} {split} images but "
                            f"{labels.shape[0]} labels; expected one label per image.")
        if labels.size and labels.max() > 9:
            raise DataError(f"fashion_mnist: {paths[f'{split}_y']} has label {labels.max()}, "
                            "expected 0..9.")
        out += [torch.tensor(images), torch.tensor(labels)]  # copies: frombuffer is read-only
    return out[0], out[1], out[2], out[3]


def mnist_cnn() -> nn.Module:
    """The CNN of McMahan et al. (2017), 1,663,370 parameters. Shapes: (B, 1, 28, 28) ->
    conv5x5 32 -> (B, 32, 28, 28) -> pool -> (B, 32, 14, 14) -> conv5x5 64 -> pool ->
    (B, 64, 7, 7) -> flatten (B, 3136) -> 512 -> 10 logits."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, 10),
    )


def mnist_mlp() -> nn.Module:
    """A small MLP: (B, 1, 28, 28) -> flatten (B, 784) -> 64 -> ReLU -> 10 logits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


_MODELS = {"cnn": mnist_cnn, "mlp": mnist_mlp}


def _floats(images: torch.Tensor) -> torch.Tensor:
    # (N, 28, 28) uint8 -> (N, 1, 28, 28) float32: pixels in [0, 1], standardised with the
    # training set's mean and std (torchvision's Normalize((0.2860,), (0.3530,))); a new
    # tensor for every task.
    return images.unsqueeze(1).to(torch.float32).div_(255.0).sub_(MEAN).div_(STD)


_SUMMARY = ("Fashion-MNIST, 60,000 + 10,000 28x28 grey images, 10 classes; pixels divided by "
            "255, then standardised with mean 0.2860 and std 0.3530 (the training set's, as the "
            "reference recipes do).")


@register_task("fashion_mnist", summary=_SUMMARY)
def fashion_mnist(*, data_dir: str = DEFAULT_DIR, model: str = "cnn") -> Task:
    """Fashion-MNIST read from the IDX files in ``data_dir``; ``model`` "cnn" (McMahan et al.
    2017) or "mlp". Default partition: IID over 100 clients. Pixels are divided by 255 and
    standardised with :data:`MEAN` and :data:`STD`, as the field's reference recipes do.

    Decoding is cached per process on the resolved path (private uint8 tensors); every call
    returns new float32 / int64 tensors, so one task's data cannot be changed through
    another's, at the price of 188 MB per loaded task.
    """
    if model not in _MODELS:
        raise ConfigError(f"fashion_mnist: model must be one of {', '.join(_MODELS)} "
                          f"(got {model!r}).")
    train_x, train_y, test_x, test_y = _load(Path(data_dir).expanduser().resolve())
    x, y = _floats(train_x), train_y.to(torch.int64)
    tx, ty = _floats(test_x), test_y.to(torch.int64)
    return Task(
        name="fashion_mnist",
        model_fn=_MODELS[model],
        loss_fn=F.cross_entropy,
        train=ArrayData.of(x, y),
        test=ArrayData.of(tx, ty),
        num_classes=10,
        default_partition={"partition": "iid", "num_clients": 100},
        description=(
            f"Fashion-MNIST: {len(y):,} training and {len(ty):,} test 28x28 grey images of 10 "
            f"kinds of clothing, pixels standardised (mean 0.2860, std 0.3530); model {model}."
        ),
        attribution=(
            "Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747), Zalando Research, "
            "MIT licence; https://github.com/zalandoresearch/fashion-mnist"
        ),
    )
