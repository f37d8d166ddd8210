"""The ``gtsrb`` task: the German Traffic Sign Recognition Benchmark at 32x32 RGB, cars as clients.

GTSRB (Stallkamp, Schlipsing, Salmen & Igel, IJCNN 2011) holds photographs of 43 kinds of German
traffic sign taken from a moving car: 39,209 training and 12,630 test images. The training
images come in *tracks*: one physical sign photographed up to 30 times as the car approaches it,
so the images of a track are near-duplicates. This task reads a 32x32 RGB packing of the
benchmark from two files in a directory the user names (123 MB: they do not ship with shoal)::

    gtsrb32_train.npz   x (39209, 32, 32, 3) uint8, y (39209,) uint8 in 0..42,
                        track (39209,) int32 = class * 1000 + the track's number in its class
    gtsrb32_test.npz    x (12630, 32, 32, 3) uint8, y (12630,) uint8

The directory is the task option ``data_dir``, else the environment variable
``SHOAL_GTSRB_DIR`` (the convention of :mod:`shoal.data.task_fashion_mnist`: a ``data_dir``
option, read from disk, nothing downloaded). A training file without ``track`` is accepted: the
tracks are then derived as the benchmark lays its training set out (see :func:`derive_tracks`).

Clients are cars, and **a car holds whole tracks**: the training tracks are dealt out at random
to ``cars`` cars (:func:`deal_tracks`), so no track is ever split between two parties (a track's
images on two sides would let a model be tested on near-copies of what it trained on, and would
tell one party what another saw). The deal fixes ``Task.groups`` (``car-000``, ...), and the
default partition is ``natural``: one client per car. Each car sees the signs of its own routes,
so the cars are label-skewed like real ones.

Preprocessing: pixels divided by 255, then standardised per channel with the training set's mean
and std (:data:`MEAN`, :data:`STD`). The model (:func:`gtsrb_cnn`) is a small CNN whose two
convolutional blocks are the camera-side part of split learning (cut after ``pool2``).
"""

from __future__ import annotations

import functools
import logging
import os
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..seeding import numpy_rng
from .arrays import ArrayData
from .tasks import Task, register_task

__all__ = ["ENV_VAR", "FILES", "MEAN", "NUM_CLASSES", "STD", "TRACK_LENGTH", "GtsrbArrays",
           "deal_tracks", "derive_tracks", "gtsrb", "gtsrb_cnn", "gtsrb_dir", "pack_gtsrb",
           "read_gtsrb", "read_ppm"]

log = logging.getLogger(__name__)

ENV_VAR = "SHOAL_GTSRB_DIR"
"""The environment variable naming the data directory when the ``data_dir`` option is empty."""

FILES = ("gtsrb32_train.npz", "gtsrb32_test.npz")
"""The two files the data directory must hold: training set, test set."""

NUM_CLASSES = 43
"""Kinds of traffic sign."""

TRACK_LENGTH = 30
"""Images per track in GTSRB's training set (one physical sign, photographed 30 times)."""

MEAN = (0.3398, 0.3117, 0.3210)
"""Per-channel (R, G, B) mean of the training images' pixels in [0, 1]."""

STD = (0.2755, 0.2647, 0.2712)
"""Per-channel (R, G, B) standard deviation of the training images' pixels in [0, 1]."""

_HOW_TO_GET = (
    "They are GTSRB (German Traffic Sign Recognition Benchmark, Stallkamp et al., IJCNN 2011; "
    "free to use, please cite the paper) with every image resized to 32x32 RGB: download "
    "GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip "
    "from https://benchmark.ini.rub.de/gtsrb_dataset.html, unzip them into one directory and "
    "run `python -m shoal.data.task_gtsrb THAT_DIR OUT_DIR` (see docs/scenarios.md, \"Traffic "
    f"signs in cars\"). Then pass data_dir='OUT_DIR' (config: task.data_dir) or set {ENV_VAR}."
)


class GtsrbArrays(NamedTuple):
    """The benchmark as read from disk (read-only arrays): training images ``x`` (N, 32, 32, 3)
    uint8, labels ``y`` (N,) int64, ``track`` (N,) int64; test images ``test_x`` and labels
    ``test_y``."""

    x: np.ndarray
    y: np.ndarray
    track: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def gtsrb_dir(data_dir: str = "") -> Path:
    """The data directory: ``data_dir``, else ``$SHOAL_GTSRB_DIR``; a
    :class:`~shoal.errors.DataError` when neither names one, or the files are not there."""
    chosen = data_dir or os.environ.get(ENV_VAR, "")
    if not chosen:
        raise DataError(
            f"gtsrb: no data directory given; expected {FILES[0]} and {FILES[1]} in the "
            f"directory named by the task option data_dir or the environment variable "
            f"{ENV_VAR}. {_HOW_TO_GET}")
    root = Path(chosen).expanduser().resolve()
    missing = [name for name in FILES if not (root / name).is_file()]
    if missing:
        where = "does not exist" if not root.is_dir() else f"lacks {' and '.join(missing)}"
        raise DataError(
            f"gtsrb: expected {FILES[0]} and {FILES[1]} in {root}, but the directory {where}. "
            f"{_HOW_TO_GET}")
    return root


def derive_tracks(y: np.ndarray, length: int = TRACK_LENGTH) -> np.ndarray:
    """Track ids for training labels in GTSRB's own order (class by class, each class's tracks
    one after another): every run of equal labels cut into consecutive tracks of ``length``,
    numbered ``class * 1000 + k``. Exact when every track has ``length`` images; the official
    set has one shorter track (class 33's 20th, 29 images), after which each derived track of
    that class starts one image early. Shape ``(N,)`` int64."""
    y = np.asarray(y, dtype=np.int64)
    out = np.empty_like(y)
    start = 0
    for end in [*(np.flatnonzero(np.diff(y)) + 1).tolist(), len(y)]:
        out[start:end] = y[start] * 1000 + np.arange(end - start) // length
        start = end
    return out


def _check_images(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DataError(f"gtsrb: {path} holds x of shape {x.shape} {x.dtype}, expected "
                        "(N, 32, 32, 3) uint8 (32x32 RGB images).")
    if y.shape != (x.shape[0],):
        raise DataError(f"gtsrb: {path} holds {x.shape[0]} images but y has shape {y.shape}; "
                        "expected one label per image.")
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(f"gtsrb: {path} has labels from {y.min()} to {y.max()}, expected "
                        f"0..{NUM_CLASSES - 1}.")


def _read(path: Path, needed: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not a zip, truncated
        raise DataError(f"gtsrb: cannot read {path} as .npz ({e}); the file is truncated or "
                        "not a NumPy archive. Get it again.") from e
    if not set(needed) <= set(arrays):
        raise DataError(f"gtsrb: {path} holds arrays {', '.join(sorted(arrays))}; expected "
                        f"{', '.join(needed)}.")
    return arrays


@functools.lru_cache(maxsize=2)
def read_gtsrb(root: Path) -> GtsrbArrays:
    """The checked arrays of the two files in directory ``root`` (see :func:`gtsrb_dir`),
    cached per process and read-only. Tracks come from the file's ``track``, else
    :func:`derive_tracks`; a track holding two labels is an error."""
    train, test = _read(root / FILES[0], ("x", "y")), _read(root / FILES[1], ("x", "y"))
    x, y = train["x"], train["y"].astype(np.int64)
    test_x, test_y = test["x"], test["y"].astype(np.int64)
    _check_images(root / FILES[0], x, y)
    _check_images(root / FILES[1], test_x, test_y)
    if "track" in train:
        track = train["track"].astype(np.int64)
        if track.shape != y.shape:
            raise DataError(f"gtsrb: {root / FILES[0]} has track of shape {track.shape}, "
                            f"expected one track id per image, {y.shape}.")
    else:
        log.warning("gtsrb: %s has no track ids; deriving tracks of %d consecutive images per "
                    "class (GTSRB's layout)", root / FILES[0], TRACK_LENGTH)
        track = derive_tracks(y)
    ids, row_track = np.unique(track, return_inverse=True)
    labels = np.full(len(ids), -1, dtype=np.int64)
    labels[row_track] = y  # each track's label, from one of its rows
    if not np.array_equal(labels[row_track], y):
        bad = int(track[np.flatnonzero(labels[row_track] != y)[0]])
        raise DataError(f"gtsrb: track {bad} in {root / FILES[0]} holds images of several "
                        "classes; a track is one physical sign, so one class.")
    arrays = GtsrbArrays(x, y, track, test_x, test_y)
    for a in arrays:
        a.flags.writeable = False
    return arrays


def deal_tracks(track: np.ndarray, cars: int, rng: np.random.Generator) -> np.ndarray:
    """Deal whole tracks out to ``cars`` cars: the distinct track ids in random order, cut into
    ``cars`` near-equal runs. Returns the car (0..cars-1) of every row, shape ``(N,)``; all
    rows of one track go to one car, and every car gets at least one track."""
    ids, row_track = np.unique(np.asarray(track), return_inverse=True)
    if isinstance(cars, bool) or not isinstance(cars, int | np.integer) or not \
            1 <= cars <= len(ids):
        raise ConfigError(f"gtsrb: cars must be an integer from 1 to the number of tracks, "
                          f"{len(ids)} (got {cars!r}); a car holds whole tracks.")
    order = rng.permutation(len(ids))
    car_of_track = np.empty(len(ids), dtype=np.int64)
    # np.array_split sizes: the first len(ids) % cars cars hold one track more.
    for car, part in enumerate(np.array_split(order, cars)):
        car_of_track[part] = car
    return car_of_track[row_track.reshape(-1)]


def gtsrb_cnn(width: int = 16, hidden: int = 128) -> nn.Sequential:
    """A small CNN for 32x32 RGB signs, its layers named so split learning can cut at them.

    Camera side (in the car, up to ``pool2``): ``(B, 3, 32, 32)`` -> conv1 3x3 ``width`` ->
    ReLU -> pool -> ``(B, width, 16, 16)`` -> conv2 3x3 ``2*width`` -> ReLU -> pool ->
    ``(B, 2*width, 8, 8)``: 2,048 numbers per image at ``width`` 16, fewer than its 3,072
    pixels. Server side: flatten -> fc1 ``hidden`` -> ReLU -> fc2 43 logits. 272,907
    parameters at the defaults.
    """
    c = 2 * width
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, width, 3, padding=1), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(width, c, 3, padding=1), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc1=nn.Linear(c * 8 * 8, hidden), relu3=nn.ReLU(),
        fc2=nn.Linear(hidden, NUM_CLASSES),
    ))


def _floats(images: np.ndarray) -> torch.Tensor:
    # (N, 32, 32, 3) uint8 -> (N, 3, 32, 32) float32 in [0, 1], standardised per channel; a
    # new tensor for every task, so no task can change another's data.
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(torch.float32)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return x.div_(255.0).sub_(mean).div_(std)


_SUMMARY = ("GTSRB, the German traffic-sign benchmark (Stallkamp et al., IJCNN 2011; free to "
            "use, cite the paper), 39,209 + 12,630 32x32 RGB images, 43 classes, read from "
            "gtsrb32_train.npz and gtsrb32_test.npz in data_dir (or $SHOAL_GTSRB_DIR), not "
            "shipped. Clients are cars holding whole tracks (30 photos of one sign); pixels / "
            "255, standardised per channel with the training set's mean and std.")


@register_task("gtsrb", natural_ids=True, summary=_SUMMARY)
def gtsrb(*, data_dir: str = "", cars: int = 100, seed: int = 0, width: int = 16,
          hidden: int = 128) -> Task:
    """GTSRB from ``data_dir`` (empty: ``$SHOAL_GTSRB_DIR``), its training tracks dealt to
    ``cars`` cars with ``numpy_rng(seed, "gtsrb.cars")`` (whole tracks only; ``Task.groups``
    names each row's car). Model: :func:`gtsrb_cnn` (``width``, ``hidden``). Default
    partition: natural (one client per car). See the module docstring."""
    for name, value in (("seed", seed), ("width", width), ("hidden", hidden)):
        least = 0 if name == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"gtsrb: {name} must be an integer >= {least} (got {value!r}).")
    data = read_gtsrb(gtsrb_dir(data_dir))
    car = deal_tracks(data.track, cars, numpy_rng(seed, "gtsrb.cars"))
    width_ = len(str(cars - 1))
    model_fn: Callable[[], nn.Module] = functools.partial(gtsrb_cnn, width, hidden)
    return Task(
        name="gtsrb",
        model_fn=model_fn,
        loss_fn=F.cross_entropy,
        train=ArrayData.of(_floats(data.x), torch.from_numpy(data.y.copy())),
        test=ArrayData.of(_floats(data.test_x), torch.from_numpy(data.test_y.copy())),
        num_classes=NUM_CLASSES,
        groups=np.array([f"car-{c:0{max(width_, 3)}d}" for c in car]),
        units=data.track.copy(),
        default_partition={"partition": "natural"},
        description=(
            f"GTSRB: {len(data.y):,} training images in {len(np.unique(data.track)):,} tracks "
            f"dealt to {cars} cars (whole tracks each), {len(data.test_y):,} test images; "
            f"32x32 RGB, 43 classes; CNN {width}-{2 * width} conv, {hidden} hidden."
        ),
        attribution=(
            "GTSRB, the German Traffic Sign Recognition Benchmark: J. Stallkamp, M. Schlipsing, "
            "J. Salmen & C. Igel, \"The German Traffic Sign Recognition Benchmark: A multi-class "
            "classification competition\", IJCNN 2011. \"The data is free to use. However, we "
            "cordially ask you to cite\" the paper (https://benchmark.ini.rub.de/). Images "
            "resized to 32x32 RGB."
        ),
    )


# -- making the two files from the official download ---------------------------------------------

def read_ppm(path: Path) -> np.ndarray:
    """A binary PPM (``P6``, 8 bits per channel, GTSRB's image format) as ``(H, W, 3)`` uint8."""
    raw = path.read_bytes()
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:  # magic, width, height, maxval; '#' starts a comment line
        while pos < len(raw) and raw[pos:pos + 1].isspace():
            pos += 1
        if raw[pos:pos + 1] == b"#":
            pos = raw.find(b"\n", pos) + 1 or len(raw)
            continue
        end = pos
        while end < len(raw) and not raw[end:end + 1].isspace():
            end += 1
        if end == pos:
            break
        fields.append(raw[pos:end])
        pos = end
    if len(fields) < 4 or fields[0] != b"P6" or fields[3] != b"255":
        raise DataError(f"gtsrb: {path} is not an 8-bit binary PPM (P6, maxval 255) image.")
    w, h = int(fields[1]), int(fields[2])
    body = raw[pos + 1:pos + 1 + w * h * 3]  # one whitespace byte after maxval
    if len(body) != w * h * 3:
        raise DataError(f"gtsrb: {path} holds {len(body)} pixel bytes, expected {w * h * 3} "
                        f"for {w}x{h} RGB; the file is truncated.")
    return np.frombuffer(body, dtype=np.uint8).reshape(h, w, 3)


def _resized(path: Path) -> np.ndarray:
    # (H, W, 3) uint8 -> (32, 32, 3) uint8: the whole image (not its ROI), bilinear with
    # antialiasing, rounded.
    img = torch.from_numpy(read_ppm(path).copy()).permute(2, 0, 1)[None].to(torch.float32)
    out = F.interpolate(img, size=(32, 32), mode="bilinear", antialias=True,
                        align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _ground_truth(csv: Path) -> list[tuple[str, int]]:
    # GTSRB's GT-*.csv: ';'-separated, header Filename;Width;Height;Roi.X1;...;ClassId.
    lines = csv.read_text().splitlines()
    header = lines[0].split(";") if lines else []
    if "Filename" not in header or "ClassId" not in header:
        raise DataError(f"gtsrb: {csv} has no Filename and ClassId columns; is it a GTSRB "
                        "ground-truth file?")
    f, c = header.index("Filename"), header.index("ClassId")
    return [(row[f], int(row[c])) for row in (line.split(";") for line in lines[1:] if line)]


def pack_gtsrb(source: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``gtsrb32_train.npz`` and ``gtsrb32_test.npz`` into ``out_dir`` from the official
    GTSRB download unzipped into ``source``: ``Final_Training/Images/000CC/GT-000CC.csv`` and
    its ``TTTTT_IIIII.ppm`` images (track ``TTTTT`` of class ``CC``), and
    ``Final_Test/Images/*.ppm`` with ``GT-final_test.csv`` (from GTSRB_Final_Test_GT.zip, in
    ``Final_Test/Images/`` or in ``source``); all of it may also be under ``source/GTSRB/``, as
    the official zips unpack. Every image is resized whole to 32x32 RGB;
    ``track`` is ``class * 1000 + TTTTT``. Returns the two paths."""
    given = Path(source).expanduser()
    # The official zips unpack into GTSRB/Final_Training, GTSRB/Final_Test and GT-final_test.csv.
    src = given / "GTSRB" if (given / "GTSRB" / "Final_Training").is_dir() else given
    classes = sorted((src / "Final_Training" / "Images").glob("000[0-9][0-9]"))
    tests = [p for p in (src / "Final_Test" / "Images" / "GT-final_test.csv",
                         src / "GT-final_test.csv", given / "GT-final_test.csv") if p.is_file()]
    if not classes or not tests:
        raise DataError(
            f"gtsrb: {src} does not hold the unzipped GTSRB download; expected "
            "Final_Training/Images/000CC/GT-000CC.csv (GTSRB_Final_Training_Images.zip), "
            "Final_Test/Images/*.ppm (GTSRB_Final_Test_Images.zip) and GT-final_test.csv "
            "(GTSRB_Final_Test_GT.zip).")
    xs, ys, tracks = [], [], []
    for folder in classes:
        for name, label in sorted(_ground_truth(folder / f"GT-{folder.name}.csv")):
            xs.append(_resized(folder / name))
            ys.append(label)
            tracks.append(label * 1000 + int(name.split("_")[0]))
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    train = out / FILES[0]
    np.savez_compressed(train, x=np.stack(xs), y=np.array(ys, dtype=np.uint8),
                        track=np.array(tracks, dtype=np.int32))
    rows = _ground_truth(tests[0])
    images = src / "Final_Test" / "Images"
    test = out / FILES[1]
    np.savez_compressed(test, x=np.stack([_resized(images / name) for name, _ in rows]),
                        y=np.array([label for _, label in rows], dtype=np.uint8))
    return train, test


if __name__ == "__main__":  # python -m shoal.data.task_gtsrb SOURCE_DIR OUT_DIR
    import argparse

    ap = argparse.ArgumentParser(description="Pack the official GTSRB download into the two "
                                             "files the gtsrb task reads.")
    ap.add_argument("source", help="directory holding the unzipped GTSRB download")
    ap.add_argument("out_dir", help="where to write gtsrb32_train.npz and gtsrb32_test.npz")
    cli = ap.parse_args()
    try:
        for written in pack_gtsrb(cli.source, cli.out_dir):
            print(written)
    except DataError as e:
        ap.exit(2, f"error: {e}\n")
