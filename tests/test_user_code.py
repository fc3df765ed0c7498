"""A user's own model (`--model file.py:make_model`), dataset (`--dataset file.py:make_data`) and
weights trained elsewhere (`--weights`), through the command line; examples/ holds the two files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from modelsense.cli import app
from modelsense.errors import ConfigError, DataError
from modelsense.models import build_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODEL = f"{EXAMPLES / 'my_model.py'}:make_model"
DATA = f"{EXAMPLES / 'my_data.py'}:make_data"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [*map(str, args), "--quiet"])


def refused(res, error=ConfigError, *words):
    assert res.exit_code != 0 and isinstance(res.exception, error), (res.output, res.exception)
    for w in words:
        assert w in str(res.exception), str(res.exception)


def test_train_and_score_a_users_model_on_a_users_dataset(tmp_path):
    res = invoke("train", "--dataset", DATA, "--model", MODEL, "--epochs", 40, "--out", tmp_path / "t")
    assert res.exit_code == 0, (res.output, res.exception)
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.8  # wine, 3 classes: standardised features train well
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["dataset"]["standardize"]["applied"] and config["model"]["name"] == MODEL
    # the checkpoint of a user's model is rebuilt from its factory, with the run's data recipe
    res = invoke("influence", "--checkpoint", tmp_path / "t" / "model.pt", "--method", "grad-dot", "--n-test", 5,
                 "--out", tmp_path / "i")
    assert res.exit_code == 0, (res.output, res.exception)
    assert np.load(tmp_path / "i" / "scores.npy").shape == (124, 5)


def test_weights_trained_elsewhere_are_scored_without_training(tmp_path):
    module = build_model(MODEL, (13,), 3, seed=3)
    torch.save(module.state_dict(), tmp_path / "w.pt")
    res = invoke("influence", "--dataset", DATA, "--model", MODEL, "--weights", tmp_path / "w.pt", "--method", "loss",
                 "--self", "--out", tmp_path / "s")
    assert res.exit_code == 0, (res.output, res.exception)
    scores = np.load(tmp_path / "s" / "self_influence.npy")
    assert scores.shape == (124,) and np.isfinite(scores).all()
    refused(invoke("influence", "--dataset", DATA, "--model", "mlp", "--weights", tmp_path / "w.pt", "--method", "loss",
                   "--self", "--out", tmp_path / "x"), ConfigError, "does not fit the model", "missing", "unexpected")
    refused(invoke("influence", "--dataset", DATA, "--model", MODEL, "--weights", tmp_path / "none.pt", "--method",
                   "loss", "--self", "--out", tmp_path / "y"), ConfigError, "not found")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


BAD_MODELS = {
    "missing.py:make_model": "not found",
    "{dir}/m.py:nothing": "defines no 'nothing'",
    "{dir}/m.py:CONSTANT": "not a function",
    "{dir}/m.py:not_a_module": "not a torch.nn.Module",
    "{dir}/m.py:wrong_outputs": "expected (n, 10) outputs",
    "{dir}/m.py:raises": "failed: RuntimeError: no GPU here",
    "{dir}/broken.py:make_model": "importing",
}


@pytest.fixture()
def user_files(tmp_path):
    (tmp_path / "m.py").write_text(
        "import torch\nfrom torch import nn\nCONSTANT = 3\n"
        "def not_a_module(input_shape, num_classes):\n    return 'a string'\n"
        "def wrong_outputs(input_shape, num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n"
        "def raises(input_shape, num_classes):\n    raise RuntimeError('no GPU here')\n")
    (tmp_path / "broken.py").write_text("import not_a_package_anyone_has\n")
    (tmp_path / "d.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def one():\n    return 5\n"
        "def singles():\n    return [torch.zeros(3)] * 4, [torch.zeros(3)] * 2\n"
        "def ragged():\n    return [(torch.zeros(3), 0), (torch.zeros(4), 1)], [(torch.zeros(3), 0)]\n"
        "def nan():\n    return [(torch.tensor([float('nan'), 0.0]), 0), (torch.zeros(2), 1)], [(torch.zeros(2), 0)]\n")
    return tmp_path


@pytest.mark.parametrize("reference", list(BAD_MODELS))
def test_a_bad_model_factory_is_one_message_and_nothing_is_written(reference, user_files):
    ref = reference.format(dir=user_files)
    refused(invoke("train", "--dataset", "digits", "--n-train", 50, "--model", ref, "--out", user_files / "out"),
            ConfigError, BAD_MODELS[reference])
    assert not (user_files / "out").exists()


@pytest.mark.parametrize(
    "name, words",
    [
        ("one", "expected a (train, test) pair"),
        ("singles", "expected a pair (x, y)"),
        ("ragged", "every input must have one shape"),
        ("nan", "row 1"),
    ],
)
def test_a_bad_data_factory_is_one_message_and_nothing_is_written(name, words, user_files):
    res = invoke("train", "--dataset", f"{user_files / 'd.py'}:{name}", "--out", user_files / "out")
    assert res.exit_code != 0 and isinstance(res.exception, (ConfigError, DataError)), res.exception
    assert words in str(res.exception), str(res.exception)
    assert not (user_files / "out").exists()


def test_model_options_are_refused_for_a_users_model():
    with pytest.raises(ConfigError, match="--widths"):
        build_model(MODEL, (13,), 3, widths=(4,))
