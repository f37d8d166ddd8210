"""The ``gtsrb`` task: the files it reads and the errors when they are missing or wrong, cars that
hold whole tracks, the model's cut, a tiny split-learning run and packing the official download
(the traffic-signs example: tests/examples/test_traffic_signs.py).

Tests marked ``needs_data`` read the real files from ``../shared/data/gtsrb`` beside the
repository (the CI checkout has them); they are skipped, saying so, where that directory is
absent.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.config import load_config
from shoal.data import task_gtsrb as g
from shoal.data.federated import federate
from shoal.data.tasks import Task, load_task, task_info
from shoal.errors import ConfigError, DataError
from shoal.experiment import run_experiment
from shoal.seeding import numpy_rng
from shoal.split.cut import cut_model
from shoal.split.paradigm import default_cut

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "gtsrb"
needs_data = pytest.mark.skipif(
    not all((DATA / name).is_file() for name in g.FILES),
    reason=f"the GTSRB files are not in {DATA} (../shared/data/gtsrb beside the repository, "
           "where the CI checkout has them)")

HOW_TO_GET = (
    "They are GTSRB (German Traffic Sign Recognition Benchmark, Stallkamp et al., IJCNN 2011; "
    "free to use, please cite the paper) with every image resized to 32x32 RGB: download "
    "GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip "
    "from https://benchmark.ini.rub.de/gtsrb_dataset.html, unzip them into one directory and "
    "run `python -m shoal.data.task_gtsrb THAT_DIR OUT_DIR` (see docs/scenarios.md, \"Traffic "
    "signs in cars\"). Then pass data_dir='OUT_DIR' (config: task.data_dir) or set "
    "SHOAL_GTSRB_DIR.")


def _write(root: Path, x: np.ndarray, y: np.ndarray, track: np.ndarray | None = None,
           test_n: int = 4) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if track is None:
        np.savez(root / "gtsrb32_train.npz", x=x, y=y)
    else:
        np.savez(root / "gtsrb32_train.npz", x=x, y=y, track=track)
    np.savez(root / "gtsrb32_test.npz", x=x[:test_n], y=y[:test_n])


def _cars(task: Task) -> np.ndarray:
    assert task.groups is not None
    return task.groups


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


# -- missing and malformed files -----------------------------------------------------------------

def test_missing_directory_names_the_files_and_where_to_get_them(tmp_path: Path) -> None:
    missing = tmp_path / "gtsrb"
    with pytest.raises(DataError) as info:
        load_task("gtsrb", data_dir=str(missing))
    assert str(info.value) == (
        f"gtsrb: expected gtsrb32_train.npz and gtsrb32_test.npz in {missing}, but the "
        f"directory does not exist. {HOW_TO_GET}")


def test_missing_file_is_named(tmp_path: Path) -> None:
    _write(tmp_path, _images(30), np.zeros(30, np.uint8))
    (tmp_path / "gtsrb32_test.npz").unlink()
    with pytest.raises(DataError) as info:
        load_task("gtsrb", data_dir=str(tmp_path))
    assert str(info.value) == (
        f"gtsrb: expected gtsrb32_train.npz and gtsrb32_test.npz in {tmp_path}, but the "
        f"directory lacks gtsrb32_test.npz. {HOW_TO_GET}")


def test_no_directory_given_names_the_option_and_the_variable(monkeypatch) -> None:
    monkeypatch.delenv("SHOAL_GTSRB_DIR", raising=False)
    with pytest.raises(DataError) as info:
        load_task("gtsrb")
    assert str(info.value) == (
        "gtsrb: no data directory given; expected gtsrb32_train.npz and gtsrb32_test.npz in "
        "the directory named by the task option data_dir or the environment variable "
        f"SHOAL_GTSRB_DIR. {HOW_TO_GET}")


def test_environment_variable_names_the_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SHOAL_GTSRB_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="in .*nowhere, but the directory does not exist"):
        load_task("gtsrb")
    y = np.repeat(np.arange(2, dtype=np.uint8), 30)
    _write(tmp_path / "here", _images(60), y, y.astype(np.int32) * 1000)
    monkeypatch.setenv("SHOAL_GTSRB_DIR", str(tmp_path / "here"))
    assert len(load_task("gtsrb", cars=2).train) == 60


def test_malformed_files_say_what_was_expected(tmp_path: Path) -> None:
    _write(tmp_path / "a", _images(30)[:, :16], np.zeros(30, np.uint8))
    with pytest.raises(DataError, match=r"holds x of shape \(30, 16, 32, 3\) uint8, expected "
                                        r"\(N, 32, 32, 3\) uint8"):
        load_task("gtsrb", data_dir=str(tmp_path / "a"))
    _write(tmp_path / "b", _images(30), np.full(30, 43, np.uint8))
    with pytest.raises(DataError, match="has labels from 43 to 43, expected 0..42"):
        load_task("gtsrb", data_dir=str(tmp_path / "b"))
    _write(tmp_path / "c", _images(30), np.arange(30, dtype=np.uint8) % 2,
           np.zeros(30, np.int32))
    with pytest.raises(DataError, match="track 0 in .* holds images of several classes"):
        load_task("gtsrb", data_dir=str(tmp_path / "c"))
    (tmp_path / "d").mkdir()
    for name in g.FILES:
        (tmp_path / "d" / name).write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read .* as .npz"):
        load_task("gtsrb", data_dir=str(tmp_path / "d"))
    _write(tmp_path / "e", _images(30), np.zeros(30, np.uint8))
    whole = (tmp_path / "e" / "gtsrb32_train.npz").read_bytes()
    (tmp_path / "e" / "gtsrb32_train.npz").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(DataError, match="cannot read .* as .npz .* the file is truncated"):
        load_task("gtsrb", data_dir=str(tmp_path / "e"))
    np.savez(tmp_path / "d" / "gtsrb32_train.npz", images=_images(2))
    with pytest.raises(DataError, match="holds arrays images; expected x, y"):
        load_task("gtsrb", data_dir=str(tmp_path / "d"))


def test_options_are_checked(tmp_path: Path) -> None:
    y = np.repeat(np.arange(2, dtype=np.uint8), 30)
    _write(tmp_path, _images(60), y, y.astype(np.int32) * 1000)
    with pytest.raises(ConfigError) as info:
        load_task("gtsrb", data_dir=str(tmp_path), cars=3)
    assert str(info.value) == ("gtsrb: cars must be an integer from 1 to the number of tracks, "
                               "2 (got 3); a car holds whole tracks.")
    with pytest.raises(ConfigError) as info:
        load_task("gtsrb", data_dir=str(tmp_path), width=0)
    assert str(info.value) == "gtsrb: width must be an integer >= 1 (got 0)."


# -- tracks ----------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=200), st.integers(0, 10**6),
       st.data())
def test_deal_tracks_never_splits_a_track(track: list[int], seed: int, data) -> None:
    track_arr = np.array(track)
    n_tracks = len(set(track))
    cars = data.draw(st.integers(1, n_tracks))
    car = g.deal_tracks(track_arr, cars, np.random.default_rng(seed))
    assert car.shape == track_arr.shape
    for t in set(track):  # every row of a track is in one car
        assert len(set(car[track_arr == t].tolist())) == 1
    tracks_per_car = [len(set(track_arr[car == c].tolist())) for c in range(cars)]
    assert sorted(set(car.tolist())) == list(range(cars))  # every car holds a track
    assert max(tracks_per_car) - min(tracks_per_car) <= 1


def test_deal_tracks_rejects_more_cars_than_tracks() -> None:
    with pytest.raises(ConfigError, match="cars must be an integer from 1 to the number of "
                                          r"tracks, 2 \(got 3\)"):
        g.deal_tracks(np.array([5, 5, 7]), 3, np.random.default_rng(0))


def test_derive_tracks_cuts_each_class_into_runs_of_30() -> None:
    y = np.array([0] * 65 + [4] * 30)
    t = g.derive_tracks(y)
    assert t.tolist() == [0] * 30 + [1] * 30 + [2] * 5 + [4000] * 30


def test_file_without_tracks_gets_derived_ones(tmp_path: Path) -> None:
    y = np.repeat(np.arange(3, dtype=np.uint8), 60)  # 3 classes, 2 tracks each
    _write(tmp_path, _images(180), y)
    task = load_task("gtsrb", data_dir=str(tmp_path), cars=6)
    assert len(set(_cars(task))) == 6  # 6 derived tracks, one per car
    for car in set(_cars(task)):
        rows = np.flatnonzero(_cars(task) == car)
        assert len(rows) == 30 and np.all(np.diff(rows) == 1) and rows[0] % 30 == 0


# -- the real files ------------------------------------------------------------------------------

@needs_data
def test_real_files_shapes_classes_and_standardisation() -> None:
    task = load_task("gtsrb", data_dir=str(DATA), cars=50)
    x, y = task.train.tensors()
    tx, ty = task.test.tensors()
    assert x.shape == (39209, 3, 32, 32) and x.dtype == torch.float32
    assert tx.shape == (12630, 3, 32, 32) and ty.shape == (12630,)
    assert task.num_classes == 43 and task.kind == "classification"
    assert torch.equal(torch.unique(y), torch.arange(43))
    assert torch.equal(torch.unique(ty), torch.arange(43))
    counts = torch.bincount(y)
    assert counts.min() == 210 and counts.max() == 2250
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-3)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert len(set(_cars(task).tolist())) == 50
    assert "Stallkamp" in task.attribution and "cite" in task.attribution
    model = task.model_fn()
    assert sum(p.numel() for p in model.parameters()) == 272907
    assert model(x[:2]).shape == (2, 43)
    # Another load gets its own tensors: changing one task's data cannot change the next's.
    x[0].fill_(7.0)
    assert load_task("gtsrb", data_dir=str(DATA), cars=50).train.x[0].max() < 7.0


@needs_data
def test_real_tracks_are_whole_and_derivable() -> None:
    data = g.read_gtsrb(DATA.resolve())
    tracks, sizes = np.unique(data.track, return_counts=True)
    assert len(tracks) == 1307 and sizes.max() == 30 and sizes.min() == 29
    assert np.array_equal(data.track // 1000, data.y)  # class * 1000 + track number
    derived = g.derive_tracks(data.y)
    other = data.y != 33  # class 33 holds the one short track, so its later tracks shift
    assert np.array_equal(derived[other], data.track[other])
    assert np.mean(derived == data.track) > 0.99


@needs_data
@pytest.mark.parametrize("cars", [7, 100])
def test_cars_hold_whole_tracks(cars: int) -> None:
    task = load_task("gtsrb", data_dir=str(DATA), cars=cars, seed=3)
    track = g.read_gtsrb(DATA.resolve()).track
    fed = federate(task, seed=0)  # natural: one client per car, 20 % held out within each car
    assert len(fed.client_ids()) == cars
    owner: dict[int, str] = {}
    for cid in fed.client_ids():
        c = fed.client(cid)
        for part in (c.train, *([c.eval] if c.eval is not None else [])):
            for t in np.unique(track[part.index.numpy()]).tolist():
                assert owner.setdefault(t, cid) == cid, f"track {t} in {owner[t]} and {cid}"
    assert len(owner) == 1307
    # The deal is the seed's: the same seed deals the same cars, another seed others.
    again = _cars(load_task("gtsrb", data_dir=str(DATA), cars=cars, seed=3))
    other = _cars(load_task("gtsrb", data_dir=str(DATA), cars=cars, seed=4))
    assert np.array_equal(again, _cars(task)) and not np.array_equal(other, _cars(task))
    assert np.array_equal(
        _cars(task), np.array([f"car-{c:03d}" for c in
                               g.deal_tracks(track, cars, numpy_rng(3, "gtsrb.cars"))]))


def test_listed_with_attribution_and_default_cut() -> None:
    info = task_info("gtsrb")
    assert info["natural_ids"] and info["kind"] == "classification"
    assert info["options"] == {"data_dir": "", "cars": 100, "seed": 0, "width": 16,
                               "hidden": 128}
    assert "Stallkamp et al., IJCNN 2011; free to use, cite the paper" in info["summary"]
    assert default_cut("gtsrb", {}) == "pool2"
    split = cut_model(g.gtsrb_cnn(), "pool2", input_shape=(3, 32, 32))
    assert split.activation_shape == (32, 8, 8)  # 2,048 numbers per image leave the car
    assert [k.split(".")[0] for k in split.client_keys()] == ["conv1"] * 2 + ["conv2"] * 2


@needs_data
def test_tiny_split_learning_run(tmp_path: Path) -> None:
    config = load_config(None, [
        "paradigm=split", "baseline=false", "task.name=gtsrb", f"task.data_dir='{DATA}'",
        "task.cars=10", "federated.rounds=2", "federated.clients_per_round=3",
        "client.epochs=1", "client.batch_size=32", "client.lr=0.05", "client.max_steps=4",
        "data.eval_fraction=0"])
    (result,) = run_experiment(config, tmp_path / "run")
    assert result.paradigm == "split" and result.rounds == 2
    assert result.examples == 2 * 3 * 4 * 32  # 2 rounds, 3 cars, 4 batches of 32
    assert 0.0 <= result.final["accuracy"] <= 1.0 and math.isfinite(result.final["loss"])
    # What crossed the cut: per image 32 x 8 x 8 float32 activations up (and their gradient
    # down) -- never the 3 x 32 x 32 image.
    assert result.bytes >= 2 * result.examples * 2048 * 4
    assert (tmp_path / "run" / "split" / "model.safetensors").is_file()


# -- packing the official download -----------------------------------------------------------------

def _ppm(path: Path, rgb: tuple[int, int, int], w: int, h: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3))
    path.write_bytes(f"P6\n# made by a test\n{w} {h}\n255\n".encode() + pixels.tobytes())


def test_pack_gtsrb_reads_the_official_layout(tmp_path: Path) -> None:
    src, header = tmp_path / "download" / "GTSRB", "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
    for cls, tracks in ((0, 2), (2, 1)):
        folder = src / "Final_Training" / "Images" / f"{cls:05d}"
        rows = [header]
        for t in range(tracks):
            for i in range(3):
                name = f"{t:05d}_{i:05d}.ppm"
                _ppm(folder / name, (cls * 50, t * 100, i), 40 + i, 35)
                rows.append(f"{name};{40 + i};35;5;5;30;30;{cls}")
        (folder / f"GT-{cls:05d}.csv").write_text("\n".join(rows) + "\n")
    test_rows = [header]
    for i, cls in enumerate((2, 0)):
        _ppm(src / "Final_Test" / "Images" / f"{i:05d}.ppm", (9, 9, cls), 64, 50)
        test_rows.append(f"{i:05d}.ppm;64;50;5;5;40;40;{cls}")
    # as the official zips unpack: GTSRB/Final_Training, GTSRB/Final_Test, GT-final_test.csv
    (src.parent / "GT-final_test.csv").write_text("\n".join(test_rows) + "\n")

    g.pack_gtsrb(src.parent, tmp_path / "out")
    data = g.read_gtsrb((tmp_path / "out").resolve())
    assert data.x.shape == (9, 32, 32, 3) and data.test_x.shape == (2, 32, 32, 3)
    assert data.y.tolist() == [0] * 6 + [2] * 3 and data.test_y.tolist() == [2, 0]
    assert data.track.tolist() == [0] * 3 + [1] * 3 + [2000] * 3
    # A constant image stays that constant when resized.
    assert np.all(data.x[4] == np.array([0, 100, 1], np.uint8))
    assert np.all(data.test_x[1] == np.array([9, 9, 0], np.uint8))
    assert len(load_task("gtsrb", data_dir=str(tmp_path / "out"), cars=3).train) == 9


def test_pack_gtsrb_and_read_ppm_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not hold the unzipped GTSRB download"):
        g.pack_gtsrb(tmp_path, tmp_path / "out")
    bad = tmp_path / "bad.ppm"
    bad.write_bytes(b"P3\n2 2\n255\n")
    with pytest.raises(DataError, match="is not an 8-bit binary PPM"):
        g.read_ppm(bad)
    bad.write_bytes(b"P6\n2 2\n255\n" + bytes(5))
    with pytest.raises(DataError, match="holds 5 pixel bytes, expected 12 for 2x2 RGB"):
        g.read_ppm(bad)
