"""The data layer seen through the CLI: a user's own feature vectors are standardised by default,
and bad dataset files are refused with one clear message before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from modelsense.cli import app
from modelsense.errors import DataError

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    monkeypatch.delenv("MODELSENSE_DATA_DIR", raising=False)


def scaled_classification(tmp_path: Path) -> tuple[Path, Path]:
    """make_classification with feature j multiplied by 10^(-3 + 7j/9), as .npz (X, y) and .csv."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=600, n_features=10, n_informative=6, random_state=0)
    x = x * np.logspace(-3, 4, 10)
    npz = tmp_path / "scaled.npz"
    np.savez(npz, X=x, y=y)
    csv = tmp_path / "scaled.csv"
    rows = [",".join([f"f{j}" for j in range(10)] + ["label"])]
    rows += [",".join([repr(float(v)) for v in row] + [str(int(c))]) for row, c in zip(x, y)]
    csv.write_text("\n".join(rows) + "\n")
    return npz, csv


def train(tmp_path: Path, dataset: Path, name: str, *flags: str) -> tuple[dict, dict]:
    out = tmp_path / name
    res = runner.invoke(app, ["train", "--dataset", str(dataset), "--model", "linear", "--epochs", "10",
                              "--out", str(out), "--quiet", *flags])
    assert res.exit_code == 0, res.output
    return json.loads((out / "metrics.json").read_text()), json.loads((out / "config.json").read_text())


def test_train_defaults_standardize_a_users_feature_vectors(tmp_path):
    """Features on scales 1e-3..1e4: the default trains as well as --standardize (same data, so the
    same model), --no-standardize is far worse; config.json says what was done."""
    npz, csv = scaled_classification(tmp_path)
    default, config = train(tmp_path, npz, "default")
    forced, _ = train(tmp_path, npz, "forced", "--standardize")
    raw, raw_config = train(tmp_path, npz, "raw", "--no-standardize")
    assert default["test_accuracy"] == pytest.approx(forced["test_accuracy"], abs=0.02)
    assert default["test_accuracy"] > 0.75
    assert raw["test_nll"] is None or raw["test_nll"] > 10 * default["test_nll"]
    assert config["dataset"]["standardize"]["applied"] is True and config["dataset"]["standardize"]["requested"] is None
    assert raw_config["dataset"]["standardize"] == {"requested": False, "applied": False, "reason": "turned off"}
    from_csv, csv_config = train(tmp_path, csv, "csv")
    assert csv_config["dataset"]["standardize"]["applied"] is True
    assert from_csv["test_accuracy"] > 0.75


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "data.npz").mkdir()
    return tmp_path / "data.npz"


def _headerless(tmp_path: Path) -> Path:
    path = tmp_path / "nohead.csv"
    path.write_text("".join(f"{i},{i * 2},{i % 2}\n" for i in range(20)))
    return path


def _huge_label(tmp_path: Path) -> Path:
    y = np.arange(50) % 2
    y[7] = 2**40
    np.savez(tmp_path / "big.npz", X=np.ones((50, 3)), y=y)
    return tmp_path / "big.npz"


def _nan_cell(tmp_path: Path) -> Path:
    lines = ["a,b,label"] + [f"{i},{i},{i % 2}" for i in range(30)]
    lines[10] = "nan,1,0"
    (tmp_path / "nan.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "nan.csv"


def _empty_cell(tmp_path: Path) -> Path:
    lines = ["a,b,label"] + [f"{i},{i},{i % 2}" for i in range(30)]
    lines[21] = "1,,0"
    (tmp_path / "empty.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "empty.csv"


def _nan_label(tmp_path: Path) -> Path:
    y = (np.arange(40) % 2).astype(float)
    y[3] = np.nan
    np.savez(tmp_path / "y.npz", X=np.ones((40, 2)), y=y)
    return tmp_path / "y.npz"


@pytest.mark.parametrize("make,words", [
    (_folder, ["data.npz is a folder, not a dataset", "the path of one .npz/.csv file"]),
    (_headerless, ["has no header row", "a column named 'label'", "add that line"]),
    (_huge_label, ["larger than 2147483647", "row 8 of y in", "renumber them"]),
    (_nan_cell, ["NaN", "row 10 of", "nan.csv (line 11; rows are counted from 1 after the header)"]),
    (_empty_cell, ["an empty cell", "row 21 of", "empty.csv (line 22; rows are counted from 1 after the header)"]),
    (_nan_label, ["not whole numbers, the first nan at row 4 of y in"]),
])
def test_bad_dataset_files_are_refused_before_writing(tmp_path, make, words):
    dataset = make(tmp_path)
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--dataset", str(dataset), "--model", "linear", "--epochs", "1",
                              "--out", str(out), "--quiet"])
    assert res.exit_code != 0 and isinstance(res.exception, DataError), res.output
    message = str(res.exception)
    for w in words:
        assert w in message, message
    assert "does not exist" not in message and "np.float" not in message and "np.int" not in message
    assert "index" not in message
    assert not out.exists()
