"""The GEX original's experiments: `relabel`, noisy labels by negated train-test influence, class-balanced
and iterative pruning, and training (then scoring) with the per-class sigmoid loss — against their
definitions computed the slow way on tiny data, with bad input refused before anything is written."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from modelsense.attribution.selection import (
    otsu_threshold,
    pruning_set,
    relabel_targets,
    relabeled,
)
from modelsense.cli import app
from modelsense.data import DataConfig, load_dataset_from_config
from modelsense.data.dataset import Dataset
from modelsense.errors import ConfigError
from modelsense.experiments.command import execute
from modelsense.experiments.influence import (
    NOISY_LABELS,
    PRUNE,
    MethodSettings,
    NoisyLabelsSpec,
    PruneSpec,
)
from modelsense.experiments.relabel import RELABEL, RelabelSpec
from modelsense.models import ModelConfig, build_model_from_config
from modelsense.models.checkpoint import load_model
from modelsense.training import TrainConfig, fit

MODEL = ModelConfig("mlp", widths=(8,))
TRAIN = TrainConfig(lr=0.1, epochs=3, bs=32)
NOISY = DataConfig("digits", n_train=100, corruption_ratio=0.2)


def refit(data: Dataset, labels=None, indices=None):
    """The recipe's model (MODEL, TRAIN, seed 0) trained with `fit` on `data` (relabeled with `labels`)."""
    if labels is not None:
        data = Dataset(data.name, data.x_train, torch.as_tensor(labels), data.x_test, data.y_test, data.num_classes)
    module = build_model_from_config(MODEL, data.input_shape, data.num_classes, seed=TRAIN.seed)
    return fit(module, data, TRAIN, train_indices=indices, progress=False)


# -- relabel -------------------------------------------------------------------------------------------
def test_relabel_targets_by_hand():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    y = np.array([0, 2, 1])
    assert relabel_targets(p, y, "prediction").tolist() == [0, 2, 0]
    assert relabel_targets(p, y, "out-of-fold").tolist() == [0, 2, 0]
    assert relabel_targets(p, y, "other").tolist() == [1, 1, 0]  # never the given label
    assert relabeled(y, np.array([0, 2]), np.array([1, 1, 0])).tolist() == [1, 2, 0]


def test_relabel_retrains_on_the_relabeled_sets_and_compares(tmp_path):
    out = tmp_path / "rl"
    m = execute(RELABEL, RelabelSpec(NOISY, MODEL, TRAIN, methods=("loss",), budgets=("5", "otsu"), target="other",
                                     n_random=2), out, progress=False)
    data = load_dataset_from_config(NOISY)
    y, corrupted = data.y_train.numpy(), data.metadata["corrupted_indices"].numpy()
    saved = np.load(out / "relabel.npz")
    module, _ = load_model(out / "model.pt")
    with torch.no_grad():
        probabilities = module(data.x_train).softmax(-1).numpy()
    np.testing.assert_array_equal(saved["targets"], relabel_targets(probabilities, y, "other"))
    s = saved["loss"]
    with torch.no_grad():
        np.testing.assert_allclose(s, F.cross_entropy(module(data.x_train), data.y_train, reduction="none"), rtol=1e-5)
    top5 = np.argsort(-s, kind="stable")[:5]
    # the slow way: fit on the relabeled training set (the engine trains as fit does, up to rounding)
    ref = refit(data, relabeled(y, top5, saved["targets"]))
    assert m["accuracy"]["loss"][0] == pytest.approx(ref.final["test_accuracy"], abs=2 / data.n_test)
    assert m["none_accuracy"] == pytest.approx(refit(data).final["test_accuracy"], abs=2 / data.n_test)
    clean = data.metadata["original_y_train"].numpy()
    assert m["clean_accuracy"] == pytest.approx(refit(data, clean).final["test_accuracy"], abs=2 / data.n_test)
    assert m["otsu"]["loss"]["budget"] == int((s > otsu_threshold(s)).sum()) > 0
    assert m["precision"]["loss"][0] == pytest.approx(np.isin(top5, corrupted).mean())
    assert m["target_accuracy"] == pytest.approx((saved["targets"][corrupted] == clean[corrupted]).mean())
    assert len(m["random_accuracy"]) == 1 and m["budgets"] == [5]
    best = m["best"]["loss"]
    assert best["accuracy"] == max(m["accuracy"]["loss"][0], m["otsu"]["loss"]["accuracy"])
    assert best["gain_over_none"] == pytest.approx(best["accuracy"] - m["none_accuracy"])
    # jobs: 1 budget + Otsu, 2 x (1 + 1) random, none, clean
    assert len(saved["job_test_accuracy"]) == 2 + 4 + 2
    assert (out / "figures" / "relabel.png").exists() and list((out / "store").glob("*/chunks/*.npz"))
    # the retrained models are jobs of the ground-truth store: another run given it trains none again
    from modelsense.retraining.store import RetrainOptions

    again = execute(RELABEL, RelabelSpec(NOISY, MODEL, TRAIN, methods=("loss",), budgets=("5", "otsu"), target="other",
                                         n_random=2, retrain=RetrainOptions(store=str(out / "store"))),
                    tmp_path / "again", progress=False)
    assert "8 of 8 jobs stored, 0 to train" in (tmp_path / "again" / "run.log").read_text()
    assert again["accuracy"] == m["accuracy"] and again["random_accuracy"] == m["random_accuracy"]


def test_relabel_out_of_fold_targets_are_the_cl_models_predictions(tmp_path):
    from modelsense.attribution import make_attributor
    from modelsense.attribution.settings import method_context

    m = execute(RELABEL, RelabelSpec(NOISY, MODEL, TRAIN, methods=("loss",), budgets=("10",), n_random=1,
                                     settings=MethodSettings(cl_folds=3)), tmp_path / "rl", progress=False)
    data = load_dataset_from_config(NOISY)
    module, _ = load_model(tmp_path / "rl" / "model.pt")
    ctx = method_context("cl", None, TRAIN, MODEL, data)
    cl = make_attributor("cl", cl_folds=3, seed=TRAIN.seed, progress=False, **ctx).fit(
        module, data.x_train, data.y_train
    )
    targets = np.load(tmp_path / "rl" / "relabel.npz")["targets"]
    np.testing.assert_array_equal(targets, cl.oof_probabilities_.numpy().argmax(1))
    assert m["target"] == "out-of-fold" and 0 <= m["target_accuracy"] <= 1


@pytest.mark.parametrize("bad,says", [({"budgets": ("5", "lots")}, "numbers of examples and otsu"),
                                      ({"budgets": ("0",)}, r"\(0, N=100\]"), ({"budgets": ("5", "5")}, "twice"),
                                      ({"target": "oracle"}, "--target"), ({"n_random": 0}, "--n-random"),
                                      ({"methods": ("grad-cos",)}, "cannot rank"),
                                      ({"settings": MethodSettings(cl_folds=1)}, "--cl-folds")])
def test_relabel_refuses_bad_options_before_writing(tmp_path, bad, says):
    with pytest.raises(ConfigError, match=says):  # the spec's field checks, or the command's check
        execute(RELABEL, RelabelSpec(NOISY, MODEL, TRAIN, **{"methods": ("loss",), **bad}), tmp_path / "x",
                progress=False)
    assert not (tmp_path / "x").exists()


# -- noisy labels by negated train-test influence --------------------------------------------------------
def test_negated_test_influence_is_minus_the_mean_gradient_inner_product(tmp_path):
    out = tmp_path / "nl"
    m = execute(NOISY_LABELS, NoisyLabelsSpec(NOISY, MODEL, TRAIN, methods=("grad-dot",), score="negated-test",
                                              validation_size=7), out, progress=False)
    data = load_dataset_from_config(NOISY)
    module, _ = load_model(out / "model.pt")
    params = [p for p in module.parameters()]

    def grad(x, y):
        loss = F.cross_entropy(module(x[None]), y[None])
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    mean_val = torch.stack([grad(x, y) for x, y in zip(data.x_test[:7], data.y_test[:7])]).mean(0)
    expected = -torch.stack([grad(x, y) @ mean_val for x, y in zip(data.x_train, data.y_train)])
    np.testing.assert_allclose(np.load(out / "self_influence.npz")["grad_dot"], expected.detach().numpy(), rtol=1e-4,
                               atol=1e-7)
    assert m["validation_size"] == 7 and 0 <= m["auc"]["grad-dot"] <= 1


@pytest.mark.parametrize("bad,says", [({"score": "mean"}, "--score"), ({"methods": ("loss",)}, "self-influence only"),
                                      ({"validation_size": 0}, "--validation-size must be >= 1"),
                                      ({"validation_size": 10_000}, "exceeds the 500 test examples"),
                                      ({"score": "self", "validation_size": 5}, "drop it")])
def test_negated_test_refuses_bad_options_before_writing(tmp_path, bad, says):
    with pytest.raises(ConfigError, match=says):
        spec = NoisyLabelsSpec(NOISY, MODEL, TRAIN, **{"methods": ("grad-dot",), "score": "negated-test", **bad})
        execute(NOISY_LABELS, spec, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


# -- pruning: class balance, iterative ---------------------------------------------------------------------
def test_class_balanced_and_iterative_pruning(tmp_path):
    data_cfg = DataConfig("digits", n_train=100)
    data = load_dataset_from_config(data_cfg)
    y = data.y_train.numpy()
    m = execute(PRUNE, PruneSpec(data_cfg, MODEL, TRAIN, methods=("loss",), ks=(20,), class_balance_ratio=1.0,
                                 n_random=1), tmp_path / "cb", progress=False)
    s = np.load(tmp_path / "cb" / "self_influence.npz")["loss"]
    removed = np.flatnonzero(~np.load(tmp_path / "cb" / "prune_masks.npz")["masks"][0])
    np.testing.assert_array_equal(removed, pruning_set(s, 20, y, 10, 1.0))
    assert np.bincount(y[removed], minlength=10).tolist() == [2] * 10 and m["class_balance_ratio"] == 1.0

    execute(PRUNE, PruneSpec(data_cfg, MODEL, TRAIN, methods=("loss",), ks=(10, 30), iterative=True, n_random=1),
            tmp_path / "it", progress=False)
    masks = np.load(tmp_path / "it" / "prune_masks.npz")["masks"]
    first, second = np.flatnonzero(~masks[0]), np.flatnonzero(~masks[1])
    s = np.load(tmp_path / "it" / "self_influence.npz")["loss"]
    np.testing.assert_array_equal(first, np.sort(np.argsort(s, kind="stable")[:10]))
    assert set(first) <= set(second) and len(second) == 30
    # the slow way: the model retrained without the first 10, its training losses, the 20 lowest of the kept
    kept = masks[0]
    sub = Dataset(data.name, data.x_train[kept], data.y_train[kept], data.x_test, data.y_test, 10)
    res = refit(sub)
    with torch.no_grad():
        losses = F.cross_entropy(res.module(sub.x_train), sub.y_train, reduction="none").numpy()
    new = np.flatnonzero(kept)[np.argsort(losses, kind="stable")[:20]]
    assert set(second) - set(first) == set(new)


@pytest.mark.parametrize("bad,says", [({"ks": (30, 10), "iterative": True}, "increasing --ks"),
                                      ({"ks": (10,), "iterative": True}, "at least two"),
                                      ({"class_balance_ratio": 1.5}, "must be <= 1, received 1.5"),
                                      ({"class_balance_ratio": -0.1}, "--class-balance-ratio must be >= 0")])
def test_pruning_refuses_bad_options_before_writing(tmp_path, bad, says):
    with pytest.raises(ConfigError, match=says):
        spec = PruneSpec(DataConfig("digits", n_train=100), MODEL, TRAIN, **{"methods": ("loss",), "ks": (10,), **bad})
        execute(PRUNE, spec, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


# -- training and scoring with the per-class sigmoid loss ----------------------------------------------------
def test_a_sigmoid_trained_checkpoint_is_scored_with_its_loss_and_refused_where_it_does_not_fit(tmp_path):
    runner = CliRunner()
    args = ["--dataset", "digits", "--n-train", "60", "--corruption-ratio", "0.2", "--widths", "8", "--epochs", "2",
            "--quiet"]
    res = runner.invoke(app, ["train", *args, "--loss", "sigmoid_bce", "--out", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    ck = str(tmp_path / "t" / "model.pt")
    res = runner.invoke(app, ["noisy-labels", "--checkpoint", ck, "--methods", "loss", "--quiet", "--out",
                              str(tmp_path / "nl")])
    assert res.exit_code == 0, (res.output, res.exception)
    data = load_dataset_from_config(DataConfig("digits", n_train=60, corruption_ratio=0.2))
    module, _ = load_model(ck)
    with torch.no_grad():
        bce = F.binary_cross_entropy_with_logits(module(data.x_train), F.one_hot(data.y_train, 10).float(),
                                                 reduction="none").sum(1)
    np.testing.assert_allclose(np.load(tmp_path / "nl" / "self_influence.npz")["loss"], bce.numpy(), rtol=1e-5)
    # --score-loss scores with another loss than the training's
    res = runner.invoke(app, ["noisy-labels", "--checkpoint", ck, "--methods", "loss", "--score-loss", "cross_entropy",
                              "--quiet", "--out", str(tmp_path / "ce")])
    with torch.no_grad():
        ce = F.cross_entropy(module(data.x_train), data.y_train, reduction="none")
    np.testing.assert_allclose(np.load(tmp_path / "ce" / "self_influence.npz")["loss"], ce.numpy(), rtol=1e-5)
    # curvature methods and commands that follow the softmax likelihood refuse it, writing nothing
    res = runner.invoke(app, ["noisy-labels", "--checkpoint", ck, "--methods", "if-ekfac", "--quiet", "--out",
                              str(tmp_path / "a")])
    assert isinstance(res.exception, ConfigError) and "--loss sigmoid_bce" in str(res.exception)
    res = runner.invoke(app, ["spectrum", "--checkpoint", ck, "--k", "2", "--quiet", "--out", str(tmp_path / "b")])
    assert isinstance(res.exception, ConfigError) and "trained with loss 'sigmoid_bce'" in str(res.exception)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert "--loss" not in runner.invoke(app, ["spectrum", "--help"]).output
    assert "--loss" in runner.invoke(app, ["relabel", "--help"]).output
