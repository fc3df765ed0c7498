"""A user's dataset larger than memory (`--dataset file.py:make_data`): inputs above
`scratch.IN_MEMORY_BYTES` go to a private, unlinked memory-mapped file, and the loaded `Dataset` is
the in-memory one exactly. The threshold is monkeypatched tiny here so tiny data takes that path."""

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from modelsense.cli import app
from modelsense.data import load_dataset, scratch
from modelsense.errors import DataError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WINE = f"{EXAMPLES / 'my_data.py'}:make_data"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def mapped_file(t: torch.Tensor) -> str | None:
    """The file of the mapping that holds the tensor's first element (None: anonymous memory, the heap)."""
    p = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= p < hi:
                name = fields[5].strip() if len(fields) > 5 else ""
                return name if name.startswith("/") else None
    return None


@pytest.fixture()
def scratch_dir(tmp_path, monkeypatch):
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setenv(scratch.SCRATCH_ENV, str(folder))
    return folder


@pytest.fixture()
def images(tmp_path):
    """A user file of 3x4 'images' (so standardisation is off unless asked), 4 classes, NaN-free."""
    (tmp_path / "imgs.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make_data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(90, 3, 4, generator=g) * 5 + 2\n"
        "    y = torch.arange(90) % 4\n"
        "    return TensorDataset(x[:60], y[:60]), [(x[i].numpy(), int(y[i])) for i in range(60, 90)]\n"
        "def holes():\n"
        "    x = torch.ones(10, 2, 3)\n"
        "    x[3, 1, 2] = float('nan'); x[7, 0, 0] = float('inf'); x[7, 1, 1] = float('nan')\n"
        "    return TensorDataset(x, torch.arange(10) % 2), TensorDataset(x[:2], torch.arange(2))\n")
    return f"{tmp_path / 'imgs.py'}"


OPTIONS = [
    {},
    {"standardize": True},
    {"n_train": 40, "seed": 2},
    {"drop_classes": (1,), "corruption_ratio": 0.25, "standardize": True, "n_train": 30, "seed": 5},
    {"drop_classes": (0, 2), "standardize": False},
]


@linux_only
@pytest.mark.parametrize("keep_in_memory", [0, 2**20], ids=["kept-rows-mapped", "kept-rows-in-memory"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("which", ["wine", "images"])
def test_a_memory_mapped_user_dataset_equals_the_in_memory_one(which, options, keep_in_memory, images, scratch_dir,
                                                               monkeypatch):
    reference = WINE if which == "wine" else f"{images}:make_data"
    expected = load_dataset(reference, **options)
    assert mapped_file(expected.x_train) is None
    # inputs above 0 bytes are mapped; rows kept by a subset / class drop go to memory when under keep_in_memory
    # (here: the first split is read with threshold 0, then the kept rows are compared against keep_in_memory)
    calls = []
    real = scratch.scratch_array

    def counted(shape, dtype, what):
        calls.append(what)
        return real(shape, dtype, what)

    monkeypatch.setattr(scratch, "scratch_array", counted)
    monkeypatch.setattr(scratch, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(scratch, "CHUNK_BYTES", 100)  # many chunks: every chunked loop crosses boundaries
    if keep_in_memory:
        real_keep = scratch.keep_rows

        def keep(x, index, what):
            with monkeypatch.context() as m:
                m.setattr(scratch, "IN_MEMORY_BYTES", keep_in_memory)
                return real_keep(x, index, what)

        monkeypatch.setattr("modelsense.data.loaders.keep_rows", keep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.from_numpy of the (writable) map warns nothing
        got = load_dataset(reference, **options)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        a, b = getattr(expected, key), getattr(got, key)
        assert a.dtype == b.dtype and torch.equal(a, b), key
    for key in ("corrupted_indices", "train_indices", "test_indices", "feature_mean", "feature_std"):
        assert (key in expected.metadata) == (key in got.metadata), key
        if key in expected.metadata:
            assert torch.equal(expected.metadata[key], got.metadata[key]), key
    assert expected.metadata["standardize"] == got.metadata["standardize"]
    assert calls[:2] == [f"--dataset {reference}: the inputs of the {s} set" for s in ("training", "test")]
    subset = "n_train" in options or "drop_classes" in options
    # kept rows mapped again: both splits after a class drop, the training set after a subset
    copies = 2 * ("drop_classes" in options) + ("n_train" in options)
    assert len(calls) == 2 + (0 if keep_in_memory else copies)
    # the tensors share the pages of the (unlinked) map: no copy; nothing is left in the scratch folder
    train_file = mapped_file(got.x_train)
    if subset and keep_in_memory:
        assert train_file is None
    else:
        assert train_file is not None and scratch.PREFIX in train_file and train_file.endswith("(deleted)")
        assert str(scratch_dir) in train_file
    if "drop_classes" not in options or not keep_in_memory:
        assert scratch.PREFIX in (mapped_file(got.x_test) or "")
    assert os.listdir(scratch_dir) == []


def test_the_chunked_finite_check_names_the_same_rows_as_one_pass(images, scratch_dir, monkeypatch):
    with pytest.raises(DataError) as whole:
        load_dataset(f"{images}:holes")
    monkeypatch.setattr(scratch, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(scratch, "CHUNK_BYTES", 2 * 6 * 4)  # two rows a chunk
    with pytest.raises(DataError) as chunked:
        load_dataset(f"{images}:holes")
    assert str(chunked.value) == str(whole.value)
    assert "2 NaN and 1 inf values in 2 example(s), the first at row 4 of x_train" in str(whole.value)
    assert os.listdir(scratch_dir) == []


def test_a_full_disk_is_refused_before_anything_is_written(images, scratch_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(scratch, "IN_MEMORY_BYTES", 0)
    free = 10 * 2**20
    monkeypatch.setattr(scratch.shutil, "disk_usage", lambda path: type("U", (), {"free": free})())
    with pytest.raises(DataError) as err:
        load_dataset(f"{images}:make_data")
    text = str(err.value)
    for words in ("the inputs of the training set", "memory-mapped under", str(scratch_dir), "0.01 GiB free",
                  "$MODELSENSE_SCRATCH"):
        assert words in text, text
    assert os.listdir(scratch_dir) == []
    res = CliRunner().invoke(app, ["train", "--dataset", f"{images}:make_data", "--out", str(tmp_path / "out"),
                                   "--quiet"])
    assert isinstance(res.exception, DataError) and "GiB free" in str(res.exception)
    assert not (tmp_path / "out").exists() and os.listdir(scratch_dir) == []


def test_a_missing_scratch_folder_is_one_message(images, tmp_path, monkeypatch):
    monkeypatch.setattr(scratch, "IN_MEMORY_BYTES", 0)
    monkeypatch.setenv(scratch.SCRATCH_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="not a folder"):
        load_dataset(f"{images}:make_data")
    assert not (tmp_path / "nowhere").exists()


def test_keep_rows_copies_only_the_kept_rows(scratch_dir, monkeypatch):
    x = scratch.scratch_array((50, 3), np.float32, "x")
    x[:] = np.arange(150, dtype=np.float32).reshape(50, 3)
    index = np.array([0, 7, 7, 49, 12])
    monkeypatch.setattr(scratch, "CHUNK_BYTES", 12)  # one row a chunk
    for limit, mapped in ((4 * 15, False), (4 * 15 - 1, True)):  # 5 rows of 3 float32: 60 bytes
        monkeypatch.setattr(scratch, "IN_MEMORY_BYTES", limit)
        out = scratch.keep_rows(x, index, "rows")
        assert scratch.is_mapped(out) == mapped and scratch.is_scratch(out) == mapped
        np.testing.assert_array_equal(out, np.arange(150, dtype=np.float32).reshape(50, 3)[index])
    # release() keeps the values: a shared map reads them back, a copy-on-write one is left alone
    path = scratch_dir.parent / "c.npy"
    np.save(path, np.zeros((3, 2), np.float32))
    for mode, value in (("r+", 7.0), ("c", 5.0)):  # the file holds 7 after r+; 5 lives only in the c map's pages
        m = np.load(path, mmap_mode=mode)
        m[1] = value
        scratch.release(m)
        assert m[1].tolist() == [value, value] and scratch.is_mapped(m) and not scratch.is_scratch(m)
        del m
    path.unlink()
    plain = np.ones((4, 2))
    assert not scratch.is_mapped(plain) and not scratch.is_scratch(plain[1:])
    assert os.listdir(scratch_dir) == []


@linux_only
def test_train_runs_end_to_end_on_a_memory_mapped_user_dataset(scratch_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(scratch, "IN_MEMORY_BYTES", 0)
    seen = []
    real = scratch.scratch_array
    monkeypatch.setattr(scratch, "scratch_array", lambda *a: seen.append(a[2]) or real(*a))
    res = CliRunner().invoke(app, ["train", "--dataset", WINE, "--epochs", "40", "--out", str(tmp_path / "t"),
                                   "--quiet"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert len(seen) == 2  # both splits went through a memory map
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.8
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["dataset"]["standardize"]["applied"]  # in place on the private map
    assert os.listdir(scratch_dir) == []


class _GatherSpy(torch.Tensor):
    """Inputs that record how many rows each indexing of them returns."""

    gathered: list[int] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func is torch.Tensor.__getitem__ and isinstance(out, torch.Tensor) and out.dim() > 1:
            cls.gathered.append(out.shape[0])
        return out


def test_training_on_a_subset_evaluates_it_chunk_by_chunk():
    """fit's per-epoch evaluation of `train_indices` gathers `chunk_size` rows at a time, never the whole
    subset (a whole-size copy of a memory-mapped user dataset), with the numbers of the gathered subset."""
    from modelsense.data.dataset import Dataset
    from modelsense.training.config import TrainConfig
    from modelsense.training.fit import evaluate, fit

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2600, 5, generator=g), torch.randint(0, 3, (2600,), generator=g)
    keep = torch.randperm(2600, generator=g)[:2300].sort().values
    net = nn_mlp()
    _GatherSpy.gathered = []
    data = Dataset("spy", x.as_subclass(_GatherSpy), y, x[:10], y[:10], 3)
    fitted = fit(net, data, TrainConfig(lr=0.05, epochs=1, bs=256), train_indices=keep, progress=False)
    assert _GatherSpy.gathered and max(_GatherSpy.gathered) <= 2048  # 2,300 rows before
    net.eval()
    whole = evaluate(net, x[keep], y[keep])
    chunked = evaluate(net, x, y, rows=keep, chunk_size=300)
    assert chunked["accuracy"] == whole["accuracy"]
    assert abs(chunked["loss"] - whole["loss"]) <= 1e-6 * abs(whole["loss"])
    assert abs(fitted.history["train_loss"][-1] - whole["loss"]) <= 1e-5 * abs(whole["loss"])


def nn_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_the_attributors_count_non_finite_inputs_chunk_by_chunk(monkeypatch):
    from modelsense.attribution import make_attributor

    monkeypatch.setattr(scratch, "CHUNK_BYTES", 40)  # two rows of 5 float32 a chunk
    x, y = torch.randn(30, 5), torch.randint(0, 3, (30,))
    x[3, 1], x[4, 0], x[17, 4] = float("nan"), float("inf"), float("nan")
    checked, isfinite = [], torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: checked.append(tuple(t.shape)) or isfinite(t))
    with pytest.raises(DataError, match="3 of 30 examples have NaN or infinite inputs"):
        make_attributor("grad-dot").fit(nn_mlp().eval(), x, y)
    assert max(shape[0] for shape in checked if shape[1:] == (5,)) == 2  # never a (30, 5) mask
