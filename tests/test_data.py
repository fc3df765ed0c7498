"""Tests of modelsense.data: built-in datasets, file readers, options and input validation."""

from __future__ import annotations

import gzip
import json
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from modelsense.data import (
    DataConfig,
    Dataset,
    available_datasets,
    builtin,
    load_dataset,
    load_dataset_from_config,
)
from modelsense.data.files import read_idx
from modelsense.data.transforms import stratified_allocation
from modelsense.errors import DataError


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """No data dir from the environment; mnist1d's disk cache in a temporary folder."""
    monkeypatch.delenv("MODELSENSE_DATA_DIR", raising=False)
    monkeypatch.setenv("MODELSENSE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


# ----------------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    code = codes[array.dtype]
    blob = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob += array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)
    return path


def make_idx_set(folder: Path, gz: bool, n_train: int = 12, n_test: int = 5, seed: int = 0):
    """Random uint8 images 28x28 with labels cycling 0..9; returns the raw arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    raw = {
        "x_train": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    names = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
    for key, name in names.items():
        write_idx(folder / name, raw[key], gz=gz)
    return raw


def make_cifar_set(folder: Path, per_batch: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"batch_label": b"training batch", b"data": data, b"labels": labels}, f,
                        protocol=2)
        batches.append((data, labels))
    test = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
    test_labels = list(range(per_batch))
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test, "labels": test_labels}, f)  # str keys also work
    return batches, (test, test_labels)


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def good_split(n_train=30, n_test=10, d=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        x_train=rng.normal(size=(n_train, d)).astype(np.float32),
        y_train=np.arange(n_train) % k,
        x_test=rng.normal(size=(n_test, d)).astype(np.float32),
        y_test=np.arange(n_test) % k,
    )


# ----------------------------------------------------------------------------------- digits


def test_digits_sizes_shapes_and_types(digits):
    assert (digits.n_train, digits.n_test) == (1297, 500)
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert float(digits.x_train.min()) == 0.0 and float(digits.x_train.max()) == 1.0
    assert len(digits.metadata["corrupted_indices"]) == 0


def test_digits_split_is_stratified_and_matches_sklearn(digits):
    from sklearn.datasets import load_digits

    full = load_digits()
    counts = np.bincount(full.target, minlength=10)
    test_counts = np.bincount(digits.y_test.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 500 * counts / counts.sum()) <= 1)
    # every example appears exactly once across the two splits, pixels / 16
    all_x = np.concatenate([digits.x_train.numpy(), digits.x_test.numpy()]).reshape(-1, 64)
    ref = np.sort((full.data / 16.0).astype(np.float32).view(np.dtype((np.void, 256))).ravel())
    got = np.sort(np.ascontiguousarray(all_x).view(np.dtype((np.void, 256))).ravel())
    assert np.array_equal(ref, got)


def test_digits_deterministic_and_split_independent_of_seed(digits):
    again = load_dataset("DIGITS", seed=7)
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)


# ----------------------------------------------------------------------------------- mnist1d


def test_mnist1d_sizes_cache_and_global_rng_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSENSE_CACHE_DIR", str(tmp_path))
    builtin._MNIST1D_MEMORY.clear()
    np.random.seed(123)
    random.seed(123)
    ds = load_dataset("mnist1d")
    after_np, after_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    assert (after_np, after_py) == (np.random.random(), random.random())
    assert (ds.n_train, ds.n_test, ds.input_shape, ds.num_classes) == (4000, 1000, (40,), 10)
    assert ds.x_train.dtype == torch.float32
    assert set(ds.y_train.unique().tolist()) == set(range(10))
    cached = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp"))
    # disk cache alone (in-process cache cleared) gives the same arrays
    builtin._MNIST1D_MEMORY.clear()
    again = load_dataset("mnist1d")
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)
    # the caches hand out copies
    again.x_train.zero_()
    assert torch.equal(load_dataset("mnist1d").x_train, ds.x_train)


def test_mnist1d_damaged_cache_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSENSE_CACHE_DIR", str(tmp_path))
    builtin._MNIST1D_MEMORY.clear()
    ds = load_dataset("mnist1d")
    (cached,) = tmp_path.glob("mnist1d-*.npz")
    cached.write_bytes(b"garbage")
    builtin._MNIST1D_MEMORY.clear()
    assert torch.equal(load_dataset("mnist1d").x_train, ds.x_train)


def test_mnist1d_checks_options_before_generating(monkeypatch):
    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("generated before validating")

    monkeypatch.setattr(builtin, "_generate_mnist1d", boom)
    builtin._MNIST1D_MEMORY.clear()
    with pytest.raises(DataError, match="n_train=4001 is larger than the 4000"):
        load_dataset("mnist1d", n_train=4001)
    with pytest.raises(DataError, match=r"drop_classes \[10\] are not classes"):
        load_dataset("mnist1d", drop_classes=[10])


# ----------------------------------------------------------------------------------- spirals


def test_two_spirals_geometry_and_the_builtin_split():
    x, y = builtin.two_spirals(200, noise=0.0, seed=3)
    assert x.shape == (400, 2) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(y, np.repeat([0, 1], 200))
    np.testing.assert_array_equal(x[200:], -x[:200])  # class 1 is the point reflection of class 0
    radius, angle = np.hypot(*x[:200].T), np.arctan2(x[:200, 1], -x[:200, 0])
    turns = radius / 1.5  # without noise, the radius is 1.5 times the angle a (in radians), a <= 600 degrees
    assert turns.max() <= np.deg2rad(600) + 1e-4
    np.testing.assert_allclose(np.cos(turns), np.cos(angle), atol=1e-4)  # the point sits at angle a
    noisy, _ = builtin.two_spirals(200, noise=1.0, seed=3)
    assert np.std(noisy - x) == pytest.approx(1.0, rel=0.1)
    assert np.array_equal(builtin.two_spirals(5, seed=1)[0], builtin.two_spirals(5, seed=1)[0])
    ds = load_dataset("spirals")
    assert (ds.n_train, ds.n_test, ds.input_shape, ds.num_classes) == (2000, 1000, (2,), 2)
    assert ds.metadata["standardize"]["applied"] is False and ds.name == "spirals"
    full, labels = builtin.two_spirals()  # the split is a shuffle of two_spirals() with its defaults
    both = np.concatenate([ds.x_train.numpy(), ds.x_test.numpy()])
    order = np.lexsort(both.T)
    np.testing.assert_array_equal(both[order], full[np.lexsort(full.T)])
    np.testing.assert_array_equal(np.concatenate([ds.y_train, ds.y_test])[order], labels[np.lexsort(full.T)])
    assert torch.equal(load_dataset("two-spirals").x_test, ds.x_test)
    assert abs(float(ds.y_train.double().mean()) - 0.5) < 0.05
    with pytest.raises(DataError, match="n_train=2001 is larger than the 2000"):
        load_dataset("spirals", n_train=2001)


# ----------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name,subdir,mean,std", [
    ("mnist", "", 0.1307, 0.3081),
    ("mnist", "MNIST/raw", 0.1307, 0.3081),
    ("fmnist", "FashionMNIST/raw", 0.2860, 0.3530),
])
def test_idx_loader_values_and_normalisation(tmp_path, gz, name, subdir, mean, std):
    raw = make_idx_set(tmp_path / subdir if subdir else tmp_path, gz=gz)
    ds = load_dataset(name, data_dir=tmp_path)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert (ds.n_train, ds.n_test) == (12, 5)
    expected = (raw["x_train"].astype(np.float64) / 255.0 - mean) / std
    np.testing.assert_allclose(ds.x_train.numpy()[:, 0], expected, rtol=1e-5, atol=1e-5)
    expected_test = (raw["x_test"].astype(np.float64) / 255.0 - mean) / std
    np.testing.assert_allclose(ds.x_test.numpy()[:, 0], expected_test, rtol=1e-5, atol=1e-5)
    assert ds.y_train.tolist() == raw["y_train"].tolist()
    assert ds.y_test.tolist() == raw["y_test"].tolist()
    assert ds.metadata["normalization"] == {"mean": [mean], "std": [std]}


def test_idx_loader_uses_env_data_dir(tmp_path, monkeypatch):
    make_idx_set(tmp_path, gz=False)
    monkeypatch.setenv("MODELSENSE_DATA_DIR", str(tmp_path))
    assert load_dataset("MNIST").n_train == 12


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_every_type(tmp_path, dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == "u1":
        array = np.arange(24, dtype="u1").reshape(2, 3, 4)
    got = read_idx(write_idx(tmp_path / "a-idx", array))
    assert got.shape == (2, 3, 4) and np.array_equal(got, array)
    assert got.dtype.isnative


def test_idx_bad_magic_and_truncation(tmp_path):
    make_idx_set(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    blob = images.read_bytes()
    images.write_bytes(b"\x12\x34" + blob[2:])
    with pytest.raises(DataError, match="is not an IDX file: magic number 0x1234"):
        load_dataset("mnist", data_dir=tmp_path)
    images.write_bytes(blob[:-10])
    with pytest.raises(DataError, match=r"header says shape \(12, 28, 28\).*truncated"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_corrupt_gzip(tmp_path):
    make_idx_set(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="damaged or truncated"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_images_and_labels_disagree(tmp_path):
    make_idx_set(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, dtype=np.uint8))
    with pytest.raises(DataError, match="holds 12 images but .* holds 11 labels"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_labels_out_of_range(tmp_path):
    make_idx_set(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 2, 3, 12], dtype=np.uint8))
    with pytest.raises(DataError, match=r"y_test: 1 label\(s\) >= num_classes=10, the first 12 at row 5 of y_test in "
                                        r".* \(y_test\[4\]\)"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_missing_files_message(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_dataset("fmnist", data_dir=tmp_path)
    message = str(err.value)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert name in message
    assert str(tmp_path) in message and str(tmp_path / "FashionMNIST" / "raw") in message
    assert "no such directory" in message and "found train-images-idx3-ubyte" in message


def test_file_datasets_need_a_data_dir(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", data_dir=tmp_path / "nowhere")


# ----------------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-py"])
def test_cifar10_batches(tmp_path, subdir):
    batches, (test, test_labels) = make_cifar_set(tmp_path / subdir if subdir else tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert (ds.n_train, ds.n_test, ds.input_shape) == (20, 4, (3, 32, 32))
    mean = np.array([0.4914, 0.4822, 0.4465])[:, None, None]
    std = np.array([0.2023, 0.1994, 0.2010])[:, None, None]
    data = np.concatenate([d for d, _ in batches]).reshape(-1, 3, 32, 32)
    np.testing.assert_allclose(ds.x_train.numpy(), (data / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), (test.reshape(-1, 3, 32, 32) / 255.0 - mean) / std,
                               rtol=1e-5, atol=1e-5)
    assert ds.y_train.tolist() == [l for _, ls in batches for l in ls]
    assert ds.y_test.tolist() == test_labels
    assert ds.metadata["class_names"][0] == "airplane"


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    make_cifar_set(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({"data": Evil(), "labels": []}, f)
    with pytest.raises(DataError, match="data_batch_3 is not a CIFAR-10 python batch.*refusing"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar10_bad_batch_shape_and_missing_batch(tmp_path):
    make_cifar_set(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), dtype=np.uint8), "labels": [0] * 4}, f)
    with pytest.raises(DataError, match=r"'data' must be uint8 of shape \(n, 3072\)"):
        load_dataset("cifar10", data_dir=tmp_path)
    (tmp_path / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_1.*data_batch_5.*test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


# ----------------------------------------------------------------------------------- npz / csv


def test_npz_given_split(tmp_path):
    arrays = good_split()
    ds = load_dataset(str(save_npz(tmp_path / "toy.npz", **arrays)), standardize=False)
    assert ds.name == "toy" and ds.num_classes == 3 and ds.input_shape == (4,)
    assert np.array_equal(ds.x_train.numpy(), arrays["x_train"])
    assert np.array_equal(ds.y_test.numpy(), arrays["y_test"])
    assert ds.metadata["split"] == "given by the file"


def test_npz_table_is_split_stratified_and_fixed(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 2, 3))
    y = np.repeat([0, 1, 2, 3], 25).astype(np.float64)  # whole-number floats are accepted
    path = save_npz(tmp_path / "table.npz", X=x, y=y)
    ds = load_dataset(path, seed=5)
    assert (ds.n_train, ds.n_test, ds.input_shape) == (80, 20, (2, 3))
    assert np.bincount(ds.y_test.numpy()).tolist() == [5, 5, 5, 5]
    assert "stratified" in ds.metadata["split"]
    again = load_dataset(path, seed=6)
    assert torch.equal(again.x_test, ds.x_test)
    # the split rows are the file's rows
    rows = {tuple(r) for r in x.reshape(100, -1).astype(np.float32).tolist()}
    assert {tuple(r) for r in ds.x_train.reshape(80, -1).tolist()} <= rows


def test_npz_relative_path_found_in_data_dir(tmp_path, monkeypatch):
    save_npz(tmp_path / "toy.npz", **good_split())
    monkeypatch.chdir(tmp_path.parent)
    assert load_dataset("toy.npz", data_dir=tmp_path).n_train == 30


def test_csv(tmp_path):
    path = tmp_path / "table.csv"
    lines = ["a,label,b"] + [f"{i},{i % 2},{-i * 0.5}" for i in range(20)]
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset(path, standardize=False)
    assert (ds.n_train, ds.n_test, ds.num_classes, ds.input_shape) == (16, 4, 2, (2,))
    assert ds.metadata["feature_names"] == ["a", "b"]
    x = torch.cat([ds.x_train, ds.x_test])
    y = torch.cat([ds.y_train, ds.y_test])
    assert torch.equal(y, x[:, 0].long() % 2)
    assert torch.equal(x[:, 1], -0.5 * x[:, 0])
    assert np.bincount(ds.y_test.numpy()).tolist() == [2, 2]


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change,pattern", [
    (dict(x_train=np.zeros(30)), r"x_train .* at least 2 dimensions, got shape \(30,\)"),
    (dict(y_train=np.zeros((30, 3))), r"y_train .* must be 1-D .* got shape \(30, 3\).*argmax"),
    (dict(y_test=np.arange(9) % 3), r"x_test and y_test .* different lengths \(10 examples vs 9"),
    (dict(y_train=np.r_[np.arange(29) % 3, 1.5]),
     r"y_train: 1 label\(s\) that are not whole numbers, the first 1.5 at row 30 of y_train in .*bad.npz "
     r"\(y_train\[29\]\)"),
    (dict(y_test=np.r_[-1, np.arange(9) % 3]), r"y_test: 1 negative label\(s\), the first -1 at row 1 of y_test "
                                               r"in .*bad.npz \(y_test\[0\]\)"),
    (dict(x_test=np.zeros((0, 4)), y_test=np.zeros(0)), r"the test split .* is empty"),
    (dict(x_test=np.zeros((10, 5))), r"different shapes per example: \(4,\) vs \(5,\)"),
    (dict(y_train=np.array(["a"] * 30)), r"y_train .* integer class ids .* got dtype <U1"),
    (dict(num_classes=np.int64(2)), r"y_train: .* label\(s\) >= num_classes=2, the first 2 at row 3 of y_train "
                                    r"in .*bad.npz \(y_train\[2\]\)"),
])
def test_npz_bad_arrays(tmp_path, change, pattern):
    arrays = good_split()
    arrays.update(change)
    with pytest.raises(DataError, match=pattern):
        load_dataset(save_npz(tmp_path / "bad.npz", **arrays))


def test_nan_and_inf_reported_with_counts_and_split(tmp_path):
    arrays = good_split()
    arrays["x_test"][3, 1] = np.nan
    arrays["x_test"][3, 2] = np.nan
    arrays["x_test"][7, 0] = np.inf
    with pytest.raises(DataError, match=r"x_test: 2 NaN and 1 inf values in 2 example\(s\), the first at "
                                        r"row 4 of x_test in .*nan.npz \(x_test\[3\]\)"):
        load_dataset(save_npz(tmp_path / "nan.npz", **arrays))


def test_npz_missing_keys_lists_found_and_expected(tmp_path):
    arrays = good_split()
    del arrays["y_test"]
    with pytest.raises(DataError, match=r"holds the keys \['x_train', 'y_train', 'x_test'\]; "
                                        r"expected either \['x_train', 'y_train', 'x_test', 'y_test'\] "
                                        r".* or \['X', 'y'\]"):
        load_dataset(save_npz(tmp_path / "keys.npz", **arrays))


def test_npz_object_arrays_and_garbage(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, X=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DataError, match="object arrays"):
        load_dataset(path)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="could not read .*junk.npz as .npz"):
        load_dataset(tmp_path / "junk.npz")


def test_npz_table_checked_before_split(tmp_path):
    path = save_npz(tmp_path / "t.npz", X=np.ones((10, 2)), y=np.arange(9) % 2)
    with pytest.raises(DataError, match=r"X and y .* different lengths \(10 examples vs 9 labels\)"):
        load_dataset(path)
    x = np.ones((10, 2))
    x[4, 0] = np.nan
    with pytest.raises(DataError, match=r"X: 1 NaN and 0 inf values .* row 5 of X in .*t2.npz \(X\[4\]\)"):
        load_dataset(save_npz(tmp_path / "t2.npz", X=x, y=np.arange(10) % 2))


@pytest.mark.parametrize("text,pattern", [
    ("a,b\n1,2\n", r"no 'label' column; found columns \['a', 'b'\]"),
    ("a,Label\n1,2\n", r"did you mean 'Label'"),
    ("a,label\n1,0\nx,1\n", r"column 'a' of .*bad.csv must hold numbers, but it holds 'x' at row 2 of "
                            r".*bad.csv \(line 3; rows are counted from 1 after the header\)"),
    ("a,label\n1,0\n,1\n", r"column 'a' .* holds an empty cell at row 2 of .*bad.csv \(line 3;"),
    ("a,label\n1,0\n2,1.5\n3,1\n", r"the 'label' column: 1 label\(s\) that are not whole numbers, the first "
                                  r"1.5 at row 2 of .*bad.csv \(line 3;"),
    ("a,label\n1,0\n2,1,3\n", r"row 2 of .*bad.csv \(line 3; .*\) has 3 fields but the header has 2"),
    ("label\n1\n2\n", r"only the 'label' column"),
    ("", r"is empty"),
    ("a,label\n", r"no data rows"),
])
def test_csv_bad(tmp_path, text, pattern):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=pattern):
        load_dataset(path)


def test_unknown_name_and_paths(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'imagenet'; known: digits, mnist1d, spirals, mnist, "
                                        r"fmnist, cifar10; or give a path to a \.npz"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="nothere.npz does not exist"):
        load_dataset(tmp_path / "nothere.npz")
    (tmp_path / "data.txt").write_text("1,2")
    with pytest.raises(DataError, match=r"unsupported type '\.txt'; save the data as \.npz"):
        load_dataset(tmp_path / "data.txt")
    with pytest.raises(DataError, match="non-empty string"):
        load_dataset("")


def test_folder_as_dataset_says_it_is_a_folder(tmp_path):
    for folder in (tmp_path / "plain", tmp_path / "data.npz"):
        folder.mkdir()
        with pytest.raises(DataError, match=r"is a folder, not a dataset; the dataset is a built-in name "
                                            r"\(digits, .*\) or the path of one \.npz/\.csv file") as err:
            load_dataset(folder)
        assert "does not exist" not in str(err.value)
    make_idx_set(tmp_path / "idx", gz=False)
    with pytest.raises(DataError, match=r"holds the mnist files: .* --dataset mnist --data-dir .*idx"):
        load_dataset(tmp_path / "idx")
    save_npz(tmp_path / "plain" / "toy.npz", **good_split())
    with pytest.raises(DataError, match=r"it holds toy.npz: pass one of those files"):
        load_dataset(tmp_path / "plain")


def test_csv_without_header_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "nohead.csv"
    path.write_text("".join(f"{i},{i * 2},{i % 2}\n" for i in range(10)))
    with pytest.raises(DataError, match=r"nohead.csv has no header row: its first line holds only numbers "
                                        r"\(0, 0, 0\)\. .* a column named 'label' \(when the last column "
                                        r"holds them: x0,x1,label\)") as err:
        load_dataset(path)
    assert "columns ['0'" not in str(err.value)
    path.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(10)))
    assert load_dataset(path).n_train == 8


@pytest.mark.parametrize("y_bad,pattern", [
    (2**40, r"y: 1 label\(s\) larger than 2147483647, the first 1099511627776 at row 8 of y in .*big.npz "
            r"\(y\[7\]\); .* renumber them"),
    (np.uint64(2**63 + 5), r"larger than 2147483647, the first 9223372036854775813 at row 8"),
    (1e30, r"larger than 2147483647, the first 1e\+30 at row 8"),
    (500, r"y in .*big.npz go up to 500, which would mean 501 classes for 50 examples; .* renumber them"),
])
def test_huge_labels_refused_before_anything_is_allocated(tmp_path, y_bad, pattern):
    y = (np.arange(50) % 2).astype(np.asarray(y_bad).dtype)
    y[7] = y_bad
    path = save_npz(tmp_path / "big.npz", X=np.random.default_rng(0).normal(size=(50, 3)), y=y)
    with pytest.raises(DataError, match=pattern):
        load_dataset(path)
    split = good_split()
    split["y_train"][0] = 40  # 40 examples in all: labels up to 40 mean 41 classes
    with pytest.raises(DataError, match=r"go up to 40, which would mean 41 classes for 40 examples"):
        load_dataset(save_npz(tmp_path / "split.npz", **split))
    with pytest.raises(DataError, match=r"num_classes in .*stated.npz is 1099511627776 for 40 examples"):
        load_dataset(save_npz(tmp_path / "stated.npz", **good_split(), num_classes=np.int64(2**40)))
    with pytest.raises(DataError, match=r"num_classes in .*table.npz is 51 for 50 examples"):
        load_dataset(save_npz(tmp_path / "table.npz", X=np.ones((50, 2)), y=np.arange(50) % 2,
                              num_classes=np.int64(51)))


def test_half_precision_labels_load_without_warnings(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset(save_npz(tmp_path / "h.npz", X=np.ones((20, 2)), y=(np.arange(20) % 2).astype(np.float16)))
    assert ds.num_classes == 2


def test_bad_values_are_located_as_row_of_file_everywhere(tmp_path):
    """A NaN, an empty cell, a wrong field count and a bad label in a .csv are all reported as
    'row N of FILE' (N counted from 1 after the header) with the file's line; blank lines skipped."""
    lines = ["a,b,label"] + [f"{i},{-i},{i % 2}" for i in range(30)]
    cases = {9: ("nan,1,0", "NaN"), 20: ("1,,0", "an empty cell"), 5: ("1,2", "fields"), 12: ("1,2,x", "'x'")}
    for row, (text, what) in cases.items():
        changed = list(lines)
        changed[row] = text
        path = tmp_path / f"bad{row}.csv"
        path.write_text("\n".join(changed[:2] + [""] + changed[2:]) + "\n")  # a blank line 3
        with pytest.raises(DataError, match=rf"row {row} of .*bad{row}.csv \(line {row + 2}; rows are "
                                            r"counted from 1 after the header\)") as err:
            load_dataset(path)
        assert what in str(err.value)
    x = np.ones((30, 2))
    x[9, 1] = np.nan
    with pytest.raises(DataError, match=r"NaN .* row 10 of X in .*nan.npz \(X\[9\]\)"):
        load_dataset(save_npz(tmp_path / "nan.npz", X=x, y=np.arange(30) % 2))


def test_numbers_in_messages_are_plain(tmp_path):
    y = (np.arange(30) % 2).astype(np.float64)
    y[3] = np.nan
    with pytest.raises(DataError, match=r"not whole numbers, the first nan at row 4 of y") as err:
        load_dataset(save_npz(tmp_path / "y.npz", X=np.ones((30, 2)), y=y))
    assert "np." not in str(err.value) and "float64" not in str(err.value)
    with pytest.raises(DataError, match=r"got 1.5;") as err:
        load_dataset("digits", corruption_ratio=np.float64(1.5))
    assert "np." not in str(err.value)
    with pytest.raises(DataError, match=r"'num_classes' must be a positive integer scalar, got \[2, 3\]"):
        load_dataset(save_npz(tmp_path / "nc.npz", **good_split(), num_classes=np.array([2, 3])))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(corruption_ratio=-0.1), r"corruption_ratio must lie in \[0, 1\].*got -0.1"),
    (dict(corruption_ratio=1.5), r"corruption_ratio must lie in \[0, 1\].*got 1.5"),
    (dict(corruption_ratio="0.1"), r"corruption_ratio must be a number"),
    (dict(n_train=0), r"n_train must be a positive integer"),
    (dict(n_train=10.5), r"n_train must be a positive integer"),
    (dict(n_train=1298), r"n_train=1298 is larger than the 1297 training examples of 'digits'"),
    (dict(n_train=9), r"n_train=9 is smaller than the 10 classes"),
    (dict(drop_classes=range(10)), r"removes every class of 'digits'"),
    (dict(drop_classes=(3, 11)), r"drop_classes \[11\] are not classes of 'digits', which has classes 0..9"),
    (dict(drop_classes=(-1,)), r"drop_classes must be class ids"),
    (dict(drop_classes=(0, 1, 2, 3, 4, 5, 6, 7, 8), corruption_ratio=0.1), r"needs at least 2 classes"),
    (dict(seed=-1), r"seed must be a non-negative integer"),
    (dict(standardize="yes"), r"standardize must be True, False or None"),
])
def test_bad_options(kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        load_dataset("digits", **kwargs)


def test_n_train_checked_after_dropping_classes(tmp_path):
    arrays = good_split(n_train=30, k=3)
    path = save_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r"n_train=21 is larger than the 20 .* after dropping classes \[1\]"):
        load_dataset(path, n_train=21, drop_classes=[1])
    assert load_dataset(path, n_train=20, drop_classes=[1]).n_train == 20


def test_data_errors_are_value_errors():
    with pytest.raises(ValueError):
        load_dataset("digits", corruption_ratio=2.0)


# ----------------------------------------------------------------------------------- options


@pytest.mark.parametrize("ratio", [0.0, 0.013, 0.1, 0.5, 1.0])
def test_corruption_count_and_changes(digits, ratio):
    ds = load_dataset("digits", corruption_ratio=ratio, seed=3)
    idx = ds.metadata["corrupted_indices"]
    n = digits.n_train
    assert idx.dtype == torch.int64 and len(idx) == round(ratio * n)
    assert len(torch.unique(idx)) == len(idx)
    changed = torch.nonzero(ds.y_train != digits.y_train).flatten()
    assert torch.equal(changed, idx)  # exactly the listed indices changed
    assert int(ds.y_train.min()) >= 0 and int(ds.y_train.max()) < 10
    if ratio > 0:
        assert torch.equal(ds.metadata["original_y_train"], digits.y_train)
    assert torch.equal(ds.y_test, digits.y_test) and torch.equal(ds.x_train, digits.x_train)


def test_corruption_seeded(digits):
    a = load_dataset("digits", corruption_ratio=0.2, seed=1)
    b = load_dataset("digits", corruption_ratio=0.2, seed=1)
    c = load_dataset("digits", corruption_ratio=0.2, seed=2)
    assert torch.equal(a.y_train, b.y_train)
    assert torch.equal(a.metadata["corrupted_indices"], b.metadata["corrupted_indices"])
    assert not torch.equal(a.metadata["corrupted_indices"], c.metadata["corrupted_indices"])


def test_corruption_new_labels_uniform_over_other_classes(tmp_path):
    n = 6000
    arrays = dict(x_train=np.zeros((n, 1)), y_train=np.zeros(n, dtype=np.int64),
                  x_test=np.zeros((3, 1)), y_test=np.arange(3))
    ds = load_dataset(save_npz(tmp_path / "u.npz", **arrays), corruption_ratio=1.0)
    counts = np.bincount(ds.y_train.numpy(), minlength=3)
    assert counts[0] == 0
    assert abs(counts[1] - n / 2) < 4 * np.sqrt(n / 4)  # binomial(6000, 1/2), 4 sigma


def test_n_train_subset_is_stratified_and_traceable(digits):
    ds = load_dataset("digits", n_train=100, seed=4)
    full_counts = np.bincount(digits.y_train.numpy(), minlength=10)
    sub_counts = np.bincount(ds.y_train.numpy(), minlength=10)
    assert sub_counts.sum() == 100 and np.all(sub_counts >= 1)
    assert np.all(np.abs(sub_counts - 100 * full_counts / full_counts.sum()) <= 1)
    idx = ds.metadata["train_indices"]
    assert torch.all(idx[1:] > idx[:-1])
    assert torch.equal(digits.x_train[idx], ds.x_train) and torch.equal(digits.y_train[idx], ds.y_train)
    assert torch.equal(load_dataset("digits", n_train=100, seed=4).metadata["train_indices"], idx)
    assert not torch.equal(load_dataset("digits", n_train=100, seed=5).metadata["train_indices"], idx)
    assert torch.equal(ds.x_test, digits.x_test)
    # corruption happens after the subset
    noisy = load_dataset("digits", n_train=100, seed=4, corruption_ratio=0.25)
    assert torch.equal(noisy.metadata["train_indices"], idx)
    assert len(noisy.metadata["corrupted_indices"]) == 25


@pytest.mark.parametrize("counts,n", [([5, 0, 3, 12], 7), ([1, 1, 1], 3), ([10, 20, 30], 60),
                                      ([7, 2, 9, 1, 40], 11), ([3, 3], 2)])
def test_stratified_allocation(counts, n):
    alloc = stratified_allocation(np.array(counts), n)
    counts = np.array(counts)
    assert alloc.sum() == n and np.all(alloc <= counts) and np.all(alloc[counts > 0] >= 1)
    assert np.all(alloc[counts == 0] == 0)
    # the spare slots follow the proportions of counts - 1 to within one example
    spare = counts - (counts > 0)
    if spare.sum():
        target = spare * (n - (counts > 0).sum()) / spare.sum()
        assert np.all(np.abs(alloc - (counts > 0) - target) < 1)


def test_drop_classes_relabels_and_traces(digits):
    ds = load_dataset("digits", drop_classes=[3, 7])
    assert ds.num_classes == 8 and ds.metadata["kept_classes"] == [0, 1, 2, 4, 5, 6, 8, 9]
    kept = torch.tensor(ds.metadata["kept_classes"])
    tr, te = ds.metadata["train_indices"], ds.metadata["test_indices"]
    assert torch.equal(digits.x_train[tr], ds.x_train) and torch.equal(digits.x_test[te], ds.x_test)
    assert torch.equal(kept[ds.y_train], digits.y_train[tr])
    assert torch.equal(kept[ds.y_test], digits.y_test[te])
    assert set(ds.y_train.tolist()) == set(range(8))
    assert int(((digits.y_train != 3) & (digits.y_train != 7)).sum()) == ds.n_train
    assert ds.metadata["class_names"] == ["0", "1", "2", "4", "5", "6", "8", "9"]


def test_drop_last_class_keeps_label_ids(digits):
    ds = load_dataset("digits", drop_classes=[9])
    tr = ds.metadata["train_indices"]
    assert torch.equal(ds.y_train, digits.y_train[tr])


def test_standardize_uses_training_statistics(digits):
    ds = load_dataset("digits", standardize=True)
    mean = digits.x_train.double().mean(0)
    std = digits.x_train.double().std(0, unbiased=False)
    std_safe = torch.where(std == 0, torch.ones_like(std), std)
    assert bool((std == 0).any())  # digits has constant (always blank) pixels
    torch.testing.assert_close(ds.metadata["feature_mean"].double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ds.metadata["feature_std"].double(), std_safe, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ds.x_test.double(), (digits.x_test.double() - mean) / std_safe,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ds.x_train.double().mean(0), torch.zeros_like(mean), rtol=0, atol=1e-5)
    got_std = ds.x_train.double().std(0, unbiased=False)
    torch.testing.assert_close(got_std, torch.where(std == 0, torch.zeros_like(std), torch.ones_like(std)),
                               rtol=0, atol=1e-5)


def scaled_table(n=200, d=6, seed=0):
    """Features on scales 1e-3 .. 1e4 (one per column) with a large offset, 2 classes."""
    rng = np.random.default_rng(seed)
    scale = np.logspace(-3, 4, d)
    x = (rng.normal(size=(n, d)) + 3.0) * scale
    y = (x[:, -1] > np.median(x[:, -1])).astype(np.int64)
    return x, y


def write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    rows = [",".join([f"f{j}" for j in range(x.shape[1])] + ["label"])]
    rows += [",".join([repr(float(v)) for v in row] + [str(int(c))]) for row, c in zip(x, y)]
    path.write_text("\n".join(rows) + "\n")
    return path


def assert_standardized_with_train_stats(ds: Dataset, raw: Dataset) -> None:
    """ds = raw standardised with the mean/std (ddof 0) of raw's training set, on both splits."""
    mean = raw.x_train.double().mean(0)
    std = raw.x_train.double().std(0, unbiased=False)
    torch.testing.assert_close(ds.metadata["feature_mean"].double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(ds.metadata["feature_std"].double(), std, rtol=1e-6, atol=0)
    torch.testing.assert_close(ds.x_train.double(), (raw.x_train.double() - mean) / std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ds.x_test.double(), (raw.x_test.double() - mean) / std, rtol=1e-5, atol=1e-5)


def test_file_feature_vectors_are_standardized_by_default(tmp_path):
    """A .npz split and a .csv table of raw features on scales 1e-3..1e4: by default both splits
    are standardised with the training set's statistics; standardize=False keeps the raw values."""
    x, y = scaled_table()
    # a given split whose test set is shifted: its own statistics would differ from the training set's
    npz = save_npz(tmp_path / "scaled.npz", x_train=x[:150], y_train=y[:150], x_test=x[150:] * 2.0 + 1.0,
                   y_test=y[150:])
    csv_path = write_csv(tmp_path / "scaled.csv", x, y)
    for path in (npz, csv_path):
        raw = load_dataset(path, standardize=False)
        ds = load_dataset(path)
        assert torch.equal(ds.y_train, raw.y_train) and torch.equal(ds.y_test, raw.y_test)
        assert_standardized_with_train_stats(ds, raw)
        assert ds.metadata["standardize"]["requested"] is None and ds.metadata["standardize"]["applied"]
        assert "feature vectors from a file" in ds.metadata["standardize"]["reason"]
        assert ds.summary()["standardize"] == ds.metadata["standardize"]
        json.dumps(ds.summary())
        forced = load_dataset(path, standardize=True)
        assert torch.equal(forced.x_test, ds.x_test) and forced.metadata["standardize"]["reason"] == "requested"
        assert raw.metadata["standardize"] == {"requested": False, "applied": False, "reason": "turned off"}
        assert "feature_mean" not in raw.metadata
    raw = load_dataset(npz, standardize=False)
    assert np.array_equal(raw.x_test.numpy(), (x[150:] * 2.0 + 1.0).astype(np.float32))
    # statistics of the final training set (after subsetting), applied to the whole test split
    sub = load_dataset(npz, n_train=60, seed=1)
    sub_raw = load_dataset(npz, n_train=60, seed=1, standardize=False)
    assert_standardized_with_train_stats(sub, sub_raw)


def test_builtin_and_image_files_keep_their_values_by_default(digits, tmp_path):
    ds = load_dataset("digits")
    assert torch.equal(ds.x_train, digits.x_train) and torch.equal(ds.x_test, digits.x_test)
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0  # pixels / 16
    assert ds.metadata["standardize"]["applied"] is False
    assert "digits keeps its usual normalisation" in ds.metadata["standardize"]["reason"]
    assert "feature_mean" not in ds.metadata
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 1, 4, 4)).astype(np.float32)
    path = save_npz(tmp_path / "images.npz", X=images, y=np.arange(40) % 2)
    ds = load_dataset(path)
    assert ds.metadata["standardize"]["applied"] is False and "(1, 4, 4)" in ds.metadata["standardize"]["reason"]
    assert np.isin(ds.x_train.numpy(), images).all()
    assert load_dataset(path, standardize=True).metadata["standardize"]["applied"] is True


# ----------------------------------------------------------------------------------- config, listing


def test_config_round_trip(digits):
    cfg = DataConfig(name="digits", n_train=50, corruption_ratio=0.1, drop_classes=(2,), seed=9)
    a = load_dataset_from_config(cfg)
    b = load_dataset("digits", n_train=50, corruption_ratio=0.1, drop_classes=(2,), seed=9)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.metadata["config"] == cfg.to_dict()
    json.dumps(a.metadata["config"])
    assert DataConfig(**cfg.to_dict() | {"drop_classes": (2,)}) == cfg


def test_available_datasets(tmp_path):
    listing = available_datasets()
    by_name = {d["name"]: d for d in listing}
    assert by_name["digits"]["n_train"] == 1297 and by_name["digits"]["input_shape"] == [1, 8, 8]
    assert by_name["mnist1d"]["n_test"] == 1000 and by_name["mnist1d"]["input_shape"] == [40]
    assert by_name["spirals"]["n_train"] == 2000 and by_name["spirals"]["input_shape"] == [2]
    assert "train-images-idx3-ubyte" in by_name["mnist"]["files"]
    assert "--data-dir" in by_name["mnist"]["source"]
    assert "test_batch" in by_name["cifar10"]["files"]
    assert any(".npz" in d["name"] for d in listing)
    assert "found" not in by_name["mnist"]
    assert by_name["digits"]["normalization"] == "pixels / 16, in [0, 1]"
    assert "standardised" in by_name["PATH.npz / PATH.csv"]["normalization"]
    make_idx_set(tmp_path / "MNIST" / "raw", gz=True)
    by_name = {d["name"]: d for d in available_datasets(tmp_path)}
    assert by_name["mnist"]["found"] and by_name["mnist"]["location"] == str(tmp_path / "MNIST" / "raw")
    assert not by_name["fmnist"]["found"] and not by_name["cifar10"]["found"]
    json.dumps(available_datasets(tmp_path))


def test_cifar10_reads_batches_pickled_by_numpy_1(tmp_path):
    """Original CIFAR files name numpy.core.multiarray (numpy < 2) and have bytes keys."""
    batches, _ = make_cifar_set(tmp_path)
    path = tmp_path / "data_batch_2"
    blob = path.read_bytes()
    assert b"numpy._core.multiarray" in blob
    path.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.y_train[4:8].tolist() == batches[1][1]
