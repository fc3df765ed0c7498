"""`modelsense verify`: restore a checkpoint and check its accuracy (and the per-example correctness a
released run recorded, as the demo.py of Feldman & Zhang 2020 does)."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from modelsense.cli import app
from modelsense.data import DataConfig, load_dataset_from_config
from modelsense.errors import ConfigError, DataError
from modelsense.memorization.verify import VerificationFailed, example_correctness
from modelsense.models.checkpoint import load_model
from modelsense.runs import run_status

runner = CliRunner()
DATA = ["--dataset", "digits", "--n-train", "120"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MLP trained by `modelsense train`: its run folder, test correctness and a plain state_dict."""
    root = tmp_path_factory.mktemp("verify")
    res = runner.invoke(
        app, ["train", *DATA, "--widths", "16", "--epochs", "3", "--lr", "0.1", "--out", str(root / "t"), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    module, _ = load_model(root / "t" / "model.pt")
    torch.save(module.state_dict(), root / "state.pt")
    data = load_dataset_from_config(DataConfig("digits", n_train=120))
    correct = example_correctness(module, data.x_test, data.y_test)
    train_correct = example_correctness(module, data.x_train, data.y_train)
    return root, correct, train_correct, json.loads((root / "t" / "metrics.json").read_text())


def verify(*args):
    return runner.invoke(app, ["verify", *map(str, args), "--quiet"])


def write_aux(path, test_correct, train_correct, seed=0):
    """An aux_arrays.npz as the released runs write it: each split in a shuffled order with its indices."""
    rng = np.random.default_rng(seed)
    order, tr = rng.permutation(test_correct.size), rng.permutation(train_correct.size)
    k = train_correct.size // 2
    np.savez(path, correctness_test=test_correct[order], index_test=order, correctness_train=train_correct[tr[:k]],
             index_train=tr[:k], correctness_removed=train_correct[tr[k:]], index_removed=tr[k:], subsample_idx=tr[:k])
    return path


def test_checkpoint_accuracy_equals_the_training_run_and_passes(trained, tmp_path):
    root, correct, _, train_metrics = trained
    res = verify("--checkpoint", root / "t" / "model.pt", "--expected-accuracy", correct.mean(), "--tolerance", "0",
                 "--out", tmp_path / "v")
    assert res.exit_code == 0, (res.output, res.exception)
    m = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert m["passed"] and m["accuracy"] == correct.mean() and m["difference"] == 0
    # the accuracy `modelsense train` measured (other batches: equal up to an example at a rounding tie)
    assert m["accuracy"] == pytest.approx(train_metrics["test_accuracy"], abs=1.5 / correct.size)
    assert m["n_examples"] == correct.size and m["status"] == "finished"
    np.testing.assert_array_equal(np.load(tmp_path / "v" / "correctness.npy"), correct)


def test_a_checkpoint_below_the_expected_accuracy_fails_with_its_numbers_kept(trained, tmp_path):
    root, correct, _, _ = trained
    expected = correct.mean() + 0.05
    res = verify("--checkpoint", root / "t" / "model.pt", "--expected-accuracy", expected, "--tolerance", "0.01",
                 "--out", tmp_path / "v")
    assert isinstance(res.exception, VerificationFailed), (res.output, res.exception)
    assert "differs from the expected" in str(res.exception) and "> --tolerance 0.01" in str(res.exception)
    m = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert (
        m["passed"] is False
        and m["accuracy"] == pytest.approx(correct.mean())
        and run_status(tmp_path / "v") == "failed"
    )
    assert m["difference"] == pytest.approx(-0.05)


def test_plain_state_dict_of_a_model_is_verified_like_its_checkpoint(trained, tmp_path):
    root, correct, _, _ = trained
    res = verify("--weights", root / "state.pt", *DATA, "--model", "mlp", "--widths", "16", "--expected-accuracy",
                 correct.mean(), "--tolerance", "0", "--out", tmp_path / "w")
    assert res.exit_code == 0, (res.output, res.exception)
    assert json.loads((tmp_path / "w" / "metrics.json").read_text())["accuracy"] == correct.mean()
    res = verify(
        "--weights",
        root / "state.pt",
        *DATA,
        "--model",
        "mlp",
        "--widths",
        "32",
        "--expected-accuracy",
        "0.5",
        "--out",
        tmp_path / "other",
    )
    assert isinstance(res.exception, ConfigError) and "does not fit the model" in str(res.exception)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("split", ["test", "train"])
def test_recorded_correctness_is_matched_example_by_example(trained, tmp_path, split):
    root, correct, train_correct, _ = trained
    ours = correct if split == "test" else train_correct
    aux = write_aux(tmp_path / "aux.npz", correct, train_correct)
    res = verify("--checkpoint", root / "t" / "model.pt", "--aux", aux, "--split", split, "--tolerance", "0",
                 "--out", tmp_path / "same")
    assert res.exit_code == 0, (res.output, res.exception)
    m = json.loads((tmp_path / "same" / "metrics.json").read_text())
    assert (
        m["n_match"] == ours.size
        and m["mismatch_fraction"] == 0
        and m["expected_accuracy"] == pytest.approx(ours.mean())
    )
    flipped = ours.copy()
    flipped[[0, 3, 7]] = ~flipped[[0, 3, 7]]
    test_rec, train_rec = (flipped, train_correct) if split == "test" else (correct, flipped)
    aux = write_aux(tmp_path / "flipped.npz", test_rec, train_rec, seed=1)
    res = verify("--checkpoint", root / "t" / "model.pt", "--aux", aux, "--split", split, "--expected-accuracy",
                 ours.mean(), "--tolerance", 2.5 / ours.size, "--out", tmp_path / "flipped")
    assert isinstance(res.exception, VerificationFailed) and f"3 of {ours.size} examples" in str(res.exception)
    m = json.loads((tmp_path / "flipped" / "metrics.json").read_text())
    assert m["n_match"] == ours.size - 3 and m["mismatch_fraction"] == pytest.approx(3 / ours.size)
    res = verify("--checkpoint", root / "t" / "model.pt", "--aux", aux, "--split", split, "--expected-accuracy",
                 ours.mean(), "--tolerance", 3.5 / ours.size, "--out", tmp_path / "tolerated")
    assert res.exit_code == 0, (res.output, res.exception)


def test_bad_input_is_refused_before_writing(trained, tmp_path):
    root, correct, train_correct, _ = trained
    ckpt = root / "t" / "model.pt"
    small = tmp_path / "small.npz"
    np.savez(
        small,
        correctness_test=correct[:10],
        index_test=np.arange(10),
        correctness_train=train_correct,
        index_train=np.arange(train_correct.size),
        correctness_removed=np.zeros(0, bool),
        index_removed=np.zeros(0, int),
    )
    broken = tmp_path / "broken.npz"
    np.savez(broken, correctness_test=correct)
    cases = [
        ([], ConfigError, "give one model: --checkpoint (a modelsense run's model.pt) or --weights"),
        (["--checkpoint", ckpt, "--weights", root / "state.pt", "--expected-accuracy", "0.5"], ConfigError, "not both"),
        (["--checkpoint", ckpt], ConfigError, "give --expected-accuracy"),
        (["--checkpoint", ckpt, "--expected-accuracy", "1.5"], ConfigError,
         "--expected-accuracy must be <= 1, received 1.5"),
        (["--checkpoint", ckpt, "--expected-accuracy", "0.5", "--tolerance", "-1"], ConfigError, "--tolerance"),
        (["--checkpoint", ckpt, "--expected-accuracy", "0.5", "--split", "val"], ConfigError, "--split must be one of"),
        (["--checkpoint", ckpt, "--aux", small], DataError, "records 10 test examples"),
        (["--checkpoint", ckpt, "--aux", broken], DataError, "missing key"),
        (["--checkpoint", tmp_path / "none.pt", "--expected-accuracy", "0.5"], ConfigError, "not found"),
    ]
    for args, error, message in cases:
        res = verify(*args, "--out", tmp_path / "bad")
        assert isinstance(res.exception, error) and message in str(res.exception), (args, res.output, res.exception)
        assert not (tmp_path / "bad").exists(), args
