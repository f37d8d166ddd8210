"""The task registry, tasks of the user's own ("module:factory"), kinds and primary metrics, and
the built-in tasks: digits, fashion_mnist, heart, ai4i, cmapss (gtsrb: tests/data/test_gtsrb.py)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import pickle
import re
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from shoal.data import task_ai4i, task_cmapss, task_heart
from shoal.data import task_fashion_mnist as fm
from shoal.data.arrays import ArrayData
from shoal.data.federated import federate
from shoal.data.tasks import Task, load_task, register_task, task_names, task_options
from shoal.errors import ConfigError, DataError


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- registry ---------------------------------------------------------------------------------

def test_registry_lists_the_builtin_tasks() -> None:
    assert task_names() == ["ai4i", "cmapss", "digits", "fashion_mnist", "gtsrb", "heart"]
    assert task_names(natural_ids=True) == ["ai4i", "cmapss", "gtsrb", "heart"]
    assert task_options("digits") == {"hidden": 128, "layers": 1}


def test_unknown_task_and_option_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_task("mnist")
    assert str(info.value) == ("load_task: unknown task 'mnist'; expected one of ai4i, "
                               "cmapss, digits, fashion_mnist, gtsrb, heart.")
    with pytest.raises(ConfigError) as info:
        load_task("digits", width=3)
    assert str(info.value) == ("load_task('digits'): unknown option 'width'; accepted "
                               "options: hidden, layers.")
    with pytest.raises(ConfigError) as info:
        load_task("digits", hidden=0)
    assert str(info.value) == "digits: hidden must be an integer >= 1 (got 0)."


def test_register_task_needs_keyword_only_options() -> None:
    with pytest.raises(ConfigError, match=re.escape(
            "register_task('bad'): parameter 'size' of bad must be keyword-only with a default")):
        @register_task("bad")
        def bad(size: int) -> Task: ...  # pragma: no cover
    assert "bad" not in task_names()


# -- digits -----------------------------------------------------------------------------------

def test_digits_loads_with_a_fixed_stratified_split() -> None:
    a, b = load_task("digits"), load_task("digits", hidden=16)
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 359
    assert torch.equal(a.test.index, b.test.index)  # the same test set every time
    x, y = a.train.tensors()
    assert x.shape == (len(a.train), 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert np.bincount(a.test.tensors()[1].numpy()).min() >= 35  # every class in the test set
    assert not set(a.train.index.tolist()) & set(a.test.index.tolist())
    assert a.num_classes == 10 and a.groups is None
    assert a.default_partition == {"partition": "dirichlet", "num_clients": 20, "alpha": 0.5}
    assert n_params(b.model_fn()) == 64 * 16 + 16 + 16 * 10 + 10
    a.train.x[0, 0] = 5.0  # a caller editing one task's data does not change the next load
    assert float(load_task("digits").train.x[0, 0]) <= 1.0


def test_model_fn_builds_fresh_models_and_seeds_nothing() -> None:
    task = load_task("digits")
    torch.manual_seed(0)
    m1, m2 = task.model_fn(), task.model_fn()
    assert not torch.equal(m1[0].weight, m2[0].weight)  # the global stream moved on, not reset
    torch.manual_seed(0)
    assert torch.equal(task.model_fn()[0].weight, m1[0].weight)
    logits = m1(task.train.tensors()[0][:5])
    assert logits.shape == (5, 10)
    assert task.loss_fn(logits, task.train.tensors()[1][:5]).dim() == 0


@pytest.mark.parametrize("name", ["ai4i", "digits", "heart"])
def test_model_fn_and_loss_fn_pickle(name: str) -> None:
    # Multi-process executors send the task's functions to workers.
    task = load_task(name)
    model_fn, loss_fn = pickle.loads(pickle.dumps((task.model_fn, task.loss_fn)))
    assert n_params(model_fn()) == n_params(task.model_fn()) and loss_fn is task.loss_fn


# -- heart ------------------------------------------------------------------------------------

def test_heart_hospitals_and_patient_counts() -> None:
    sizes = {h: task_heart.read_hospital(h).shape[0] for h in task_heart.HOSPITALS}
    assert sizes == {"cleveland": 303, "hungary": 294, "switzerland": 123, "va": 200}
    task = load_task("heart")
    assert task.num_classes == 2 and task.default_partition == {"partition": "natural"}
    assert task.groups is not None and task.test_groups is not None
    total = Counter(task.groups.tolist()) + Counter(task.test_groups.tolist())
    assert dict(total) == sizes
    fd = federate(task)
    assert fd.client_ids() == ["cleveland", "hungary", "switzerland", "va"]
    for h in fd.client_ids():  # each hospital's rows are its own patients
        c = fd.client(h)
        assert len(c.train) + len(c.eval) == Counter(task.groups.tolist())[h]  # type: ignore[arg-type]


def test_heart_features_are_imputed_and_standardised() -> None:
    task = load_task("heart")
    x, y = task.train.tensors()
    assert x.shape == (689, len(task_heart.FEATURES)) == (689, 21)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.allclose(x.mean(0), torch.zeros(21), atol=1e-5)
    assert set(y.unique().tolist()) == {0, 1}
    xt, _ = task.test.tensors()
    assert torch.isfinite(xt).all() and len(task.test) == 231
    assert task.model_fn()(xt).shape == (231, 2)
    assert n_params(load_task("heart", model="mlp").model_fn()) == 21 * 32 + 32 + 32 * 2 + 2


def test_heart_reader_repairs_the_hungarian_first_row_and_marks_missing() -> None:
    table = task_heart.read_hospital("hungary")
    first = table[0]
    assert first[:10].tolist() == [40, 1, 2, 140, 289, 0, 0, 172, 0, 0] and first[13] == 0
    assert np.isnan(first[10:13]).all()
    chol = task_heart.read_hospital("switzerland")[:, task_heart.COLUMNS.index("chol")]
    assert np.isnan(chol).all()  # Switzerland records every cholesterol as 0: not measured


def test_heart_files_match_their_attribution() -> None:
    folder = importlib.resources.files("shoal") / "data" / "builtin" / "heart"
    text = (folder / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in text and "Janosi" in text and "9557968" in text
    for name in task_heart.HOSPITALS.values():
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in text


# -- fashion_mnist ----------------------------------------------------------------------------

def test_mcmahan_cnn_has_exactly_1663370_parameters() -> None:
    model = fm.mnist_cnn()
    assert n_params(model) == 1_663_370
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert fm.mnist_mlp()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def write_idx(path: Path, array: np.ndarray, *, gz: bool, magic: int | None = None) -> None:
    header = np.array([magic or (0x800 | array.ndim), *array.shape], dtype=">i4").tobytes()
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def fake_fashion(root: Path, *, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n in (("train", 12), ("t10k", 4)):
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}",
                  rng.integers(0, 256, (n, 28, 28)), gz=gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz=gz)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files_gzipped_or_not(tmp_path: Path, gz: bool) -> None:
    fake_fashion(tmp_path, gz=gz)
    task = load_task("fashion_mnist", data_dir=str(tmp_path), model="mlp")
    x, y = task.train.tensors()
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw = fm.read_idx(next(tmp_path.glob("train-images*")), 3)  # standardised as the reference
    expected = (torch.tensor(raw, dtype=torch.float32) / 255 - 0.2860) / 0.3530
    assert torch.allclose(x[:, 0], expected) and len(task.test) == 4
    assert "mean 0.2860" in task.description and "std 0.3530" in task.description
    assert y.tolist() == [k % 10 for k in range(12)]


def test_fashion_mnist_missing_directory_says_how_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_task("fashion_mnist", data_dir=str(missing))
    assert str(info.value) == (
        f"fashion_mnist: data directory {missing} does not exist; it should hold the four "
        "Fashion-MNIST IDX files. Install them with `apt-get install dataset-fashion-mnist` "
        "(Debian/Ubuntu), or download the four files from "
        "https://github.com/zalandoresearch/fashion-mnist and pass data_dir='/path/to/them'.")


def test_fashion_mnist_missing_file_is_named(tmp_path: Path) -> None:
    fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=re.escape(
            f"fashion_mnist: missing t10k-labels-idx1-ubyte.gz (or t10k-labels-idx1-ubyte) in "
            f"{tmp_path}. Install them with `apt-get install dataset-fashion-mnist`")):
        load_task("fashion_mnist", data_dir=str(tmp_path))


def test_fashion_mnist_bad_magic_and_truncation(tmp_path: Path) -> None:
    fake_fashion(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12), gz=True, magic=0x0D01)
    with pytest.raises(DataError, match=r"has IDX magic number 0x00000d01, expected 0x00000801"):
        load_task("fashion_mnist", data_dir=str(tmp_path))
    path = tmp_path / "t.idx"
    write_idx(path, np.zeros((3, 28, 28)), gz=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"holds 2347 data bytes, expected 2352 for shape"):
        fm.read_idx(path, 3)


def test_fashion_mnist_model_option() -> None:
    with pytest.raises(ConfigError) as info:
        load_task("fashion_mnist", model="resnet")
    assert str(info.value) == "fashion_mnist: model must be one of cnn, mlp (got 'resnet')."


REAL = Path(fm.DEFAULT_DIR)


@pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").exists()
                    and not (REAL / "train-images-idx3-ubyte").exists(),
                    reason=f"Fashion-MNIST not installed in {fm.DEFAULT_DIR} "
                           "(apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_real_files() -> None:
    task = load_task("fashion_mnist")
    assert task.train.x.shape == (60_000, 1, 28, 28) and len(task.test) == 10_000
    assert np.bincount(task.train.y.numpy()).tolist() == [6000] * 10
    assert task.default_partition == {"partition": "iid", "num_clients": 100}
    assert n_params(task.model_fn()) == 1_663_370
    other = load_task("fashion_mnist")
    assert other.train.x.data_ptr() != task.train.x.data_ptr()  # no shared mutable tensors


# -- ai4i -------------------------------------------------------------------------------------

def test_ai4i_lines_records_and_failures() -> None:
    x, y, line = task_ai4i.read_ai4i()
    assert x.shape == (10_000, 5) and int(y.sum()) == 339
    assert Counter(line.tolist()) == {"L": 6000, "M": 2997, "H": 1003}
    task = load_task("ai4i")
    assert task.num_classes == 2 and task.default_partition == {"partition": "natural"}
    assert len(task.train) + len(task.test) == 10_000 and len(task.test) == 2501  # rounded per line and class
    xtr, ytr = task.train.tensors()
    assert torch.isfinite(xtr).all() and torch.allclose(xtr.mean(0), torch.zeros(5), atol=1e-4)
    _, yte = task.test.tensors()
    assert int(ytr.sum()) + int(yte.sum()) == 339 and int(yte.sum()) == 85  # stratified
    fd = federate(task)
    assert fd.client_ids() == ["H", "L", "M"]
    assert task.model_fn()(xtr[:3]).shape == (3, 2)


def test_ai4i_positive_fraction_keeps_every_failure() -> None:
    task = load_task("ai4i", positive_fraction=0.1)
    y = torch.cat([task.train.tensors()[1], task.test.tensors()[1]])
    assert len(y) == 3390 and int(y.sum()) == 339
    assert set(task.groups.tolist()) == {"L", "M", "H"}
    assert len(load_task("ai4i", positive_fraction=0.01).train) == 7499  # below 3.4 %: all rows
    with pytest.raises(ConfigError) as info:
        load_task("ai4i", positive_fraction=1.5)
    assert str(info.value) == ("ai4i: positive_fraction must be a number in [0, 1) (got 1.5); "
                               "0 keeps every record.")


def test_ai4i_file_matches_its_attribution() -> None:
    folder = importlib.resources.files("shoal") / "data" / "builtin" / "ai4i"
    text = (folder / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in text and "Matzka" in text and "3e1727a" in text
    digest = hashlib.sha256((folder / "ai4i2020.csv").read_bytes()).hexdigest()
    assert digest in text


# -- cmapss -----------------------------------------------------------------------------------

def test_cmapss_windows_targets_and_engines() -> None:
    task = load_task("cmapss")
    assert task.kind == "regression" and task.primary == "rmse" and task.lower_is_better()
    assert task.train.x.shape == (17_731, 30, 14) and task.test.x.shape == (100, 30, 14)
    assert float(task.train.x.min()) == -1.0 and float(task.train.x.max()) == 1.0
    assert float(task.train.y.max()) == 125.0 and float(task.train.y.min()) == 0.0
    train, test, rul = task_cmapss.read_cmapss()
    # test engine 1: 31 cycles seen, 112 left (RUL_FD001.txt line 1), below the cap
    assert rul[0] == 112 and float(task.test.y[0]) == 112.0
    assert len(set(task.groups.tolist())) == 100 and task.groups[0] == "engine-001"
    out = task.model_fn()(task.test.x[:5])
    assert out.shape == (5,)  # exactly the targets' shape


def test_cmapss_windows_pad_short_units_and_count_cycles_left() -> None:
    x = np.arange(8, dtype=float).reshape(4, 2)  # unit 1: 3 cycles, unit 2: 1 cycle
    w, unit, left = task_cmapss.windows(x, np.array([1, 1, 1, 2]), 2)
    assert w.shape == (3, 2, 2) and unit.tolist() == [1, 1, 2] and left.tolist() == [1, 0, 0]
    assert w[2].tolist() == [[6, 7], [6, 7]]  # padded with its first row


def test_cmapss_files_match_their_attribution() -> None:
    text = (importlib.resources.files("shoal") / "data" / "builtin" / "cmapss"
            / "ATTRIBUTION.md").read_text()
    for name, digest in task_cmapss._SHA256.items():
        assert f"{digest}  {name}" in text


# -- kinds, primary metrics and tasks of one's own ---------------------------------------------

def _regression_task(**kwargs) -> Task:
    x, y = torch.randn(8, 2), torch.randn(8)
    return Task(name="mine", model_fn=lambda: torch.nn.Linear(2, 1), loss_fn=torch.nn.MSELoss(),
                train=ArrayData.of(x, y), test=ArrayData.of(x, y), num_classes=0,
                **{"kind": "regression", **kwargs})


def test_task_kind_metrics_and_primary() -> None:
    def mape(o: torch.Tensor, y: torch.Tensor) -> float:
        return 0.0

    task = _regression_task(metrics={"mape": mape}, primary="mae")
    assert task.metric_names() == ["loss", "rmse", "mae", "mse", "mape"]
    assert task.primary == "mae" and task.lower_is_better() and task.lower_is_better("mape")
    assert load_task("heart").kind == "binary" and load_task("digits").primary == "accuracy"
    with pytest.raises(ConfigError) as info:
        _regression_task(primary="accuracy")
    assert str(info.value) == (
        "task 'mine': primary metric 'accuracy' is not one of its metrics; expected one of loss, "
        "rmse, mae, mse (a regression task). Pass metrics={name: fn} to the Task to add one.")
    with pytest.raises(ConfigError) as info:
        _regression_task(kind="ranking")
    assert str(info.value) == ("Task 'mine': kind must be one of classification, binary, "
                               "regression, sequence (got 'ranking').")


def test_module_factory_tasks_load_with_their_options(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "my_tasks_mod.py").write_text(textwrap.dedent("""
        import torch
        from shoal.data.arrays import ArrayData
        from shoal.data.tasks import Task

        def small(*, n=8):
            x, y = torch.randn(n, 2), torch.randn(n)
            return Task(name="small", model_fn=lambda: torch.nn.Linear(2, 1),
                        loss_fn=torch.nn.MSELoss(), train=ArrayData.of(x, y),
                        test=ArrayData.of(x, y), num_classes=0, kind="regression")

        def not_a_task():
            return 3
        """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    task = load_task("my_tasks_mod:small", n=5)
    assert len(task.train) == 5 and task.kind == "regression"
    assert task_options("my_tasks_mod:small") == {"n": 8}
    with pytest.raises(ConfigError) as info:
        load_task("my_tasks_mod:small", m=5)
    assert str(info.value) == ("load_task('my_tasks_mod:small'): unknown option 'm'; accepted "
                               "options: n.")
    with pytest.raises(ConfigError) as info:
        load_task("my_tasks_mod:missing")
    assert str(info.value) == (
        f"load_task('my_tasks_mod:missing'): module 'my_tasks_mod' "
        f"({tmp_path / 'my_tasks_mod.py'}) has no function 'missing'; expected a function that "
        "returns a shoal Task.")
    with pytest.raises(ConfigError) as info:
        load_task("my_tasks_mod:not_a_task")
    assert str(info.value) == ("load_task('my_tasks_mod:not_a_task'): the factory returned "
                               "int, expected a shoal Task.")
    with pytest.raises(ConfigError) as info:
        load_task("nowhere_mod:small")
    assert str(info.value) == (
        "load_task('nowhere_mod:small'): cannot import module 'nowhere_mod' (No module named "
        "'nowhere_mod'). Run from the directory that holds it, or add that directory to "
        "PYTHONPATH.")
