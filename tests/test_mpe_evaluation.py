"""The library functions the `modelsense mpe` commands compose (mpe.predictive, mpe.evaluation,
training.recorder): each against its definition computed the obvious way, invariances and bad input."""

import numpy as np
import pytest
import torch
from torch import nn

from modelsense.core.functional import FunctionalModel
from modelsense.data.dataset import Dataset
from modelsense.errors import ConfigError
from modelsense.mpe import (
    MPESettings,
    build_posterior,
    group_loo_nll,
    memory_perturbation,
    per_example_nll,
    softmax_deviation,
)
from modelsense.mpe.evaluation import (
    best_deltas,
    checkpoint_iterations,
    correlations,
    loco_metrics,
    loo_nll_over_deltas,
    smoothed_best_deltas,
    training_steps,
    validation_metrics,
)
from modelsense.mpe.predictive import (
    all_variants,
    check_classification_head,
    class_removal_estimates,
    group_removal_nll,
    posterior_at,
    predictive_covariances,
)
from modelsense.training import TrainConfig, fit
from modelsense.training.recorder import OptimizerStateRecorder

DTYPE = torch.float64


def tiny(n=12, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DTYPE)
    y = torch.randint(0, c, (n,), generator=g)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, c)).to(DTYPE), x, y


def test_posterior_at_is_build_posterior_at_the_module():
    net, x, y = tiny()
    ours = posterior_at(net, x, y, prior_precision=2.0, structure="full", chunk_size=5)
    ref = build_posterior("laplace", FunctionalModel(net), x, y, prior_precision=2.0, structure="full")
    torch.testing.assert_close(predictive_covariances(ours, x, 5)[1], predictive_covariances(ref, x, 5)[1])
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net(x).logsumexp(1).sum().backward()
    opt.step()
    ours = posterior_at(net, x, y, source="adam", prior_precision=2.0, optimizer=opt)  # N defaults to len(x)
    ref = build_posterior("adam", FunctionalModel(net), prior_precision=2.0, optimizer=opt, n_train=len(x))
    torch.testing.assert_close(predictive_covariances(ours, x, 5)[1], predictive_covariances(ref, x, 5)[1])


def test_check_classification_head():
    x = torch.randn(3, 4)
    check_classification_head(nn.Linear(4, 3), x, 3)
    for module, classes in ((nn.Linear(4, 1), 3), (nn.Linear(4, 3), 4), (nn.Linear(4, 1), 1)):
        with pytest.raises(ConfigError, match="one logit per class"):
            check_classification_head(module, x, classes)


def test_class_removal_estimates_are_the_group_estimates_of_the_present_classes():
    net, x, y = tiny(n=10)
    y[y == 1] = 0  # class 1 absent of 4 classes
    post = build_posterior("laplace", FunctionalModel(net), x, y, prior_precision=1.0, structure="full")
    est = class_removal_estimates(post, x, y, 4, MPESettings("full"), chunk_size=3)
    present = [c for c in (0, 2) if (y == c).any()]
    assert est["classes"] == present
    for r, c in zip(est["removed"], present):
        assert r.tolist() == (y == c).nonzero().flatten().tolist()
    logits, V = predictive_covariances(post, x, 3)
    mpe = memory_perturbation(logits, y, V, MPESettings("full"))
    torch.testing.assert_close(est["estimated_nll"], group_loo_nll(mpe.loo_nll, y, 4)[present])
    assert est["estimated_nll_joint"] == group_removal_nll(post, x, logits, y, mpe.error, est["removed"], 3)


def test_validation_metrics_by_hand():
    g = torch.Generator().manual_seed(0)
    n, c = 8, 3
    logits, y = torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)
    A = torch.randn(n, c, c, generator=g)
    V = A @ A.transpose(1, 2) / 10
    variants = all_variants(logits, y, V)
    idx = torch.tensor([1, 4, 6, 7])
    loo, control = torch.randn(4, c, generator=g), torch.randn(4, c, generator=g)
    m, true = validation_metrics(logits, y, V, variants, idx, loo, control, variant="diag")
    np.testing.assert_allclose(true, softmax_deviation(control, loo).numpy())
    ref = correlations(variants["diag"].sensitivity[idx].numpy(), true)
    assert (m["pearson"], m["spearman"], m["slope"]) == (ref["pearson"], ref["spearman"], ref["slope"])
    assert m["n_retrain"] == 4 and m["estimated_loo_nll"] == pytest.approx(float(variants["diag"].loo_nll[idx].mean()))
    assert m["true_loo_nll"] == pytest.approx(float(per_example_nll(loo, y[idx]).mean()))
    assert m["estimated_loo_nll_all"] == variants["diag"].estimated_loo_nll
    assert m["mean_control_drift"] == pytest.approx(float(softmax_deviation(logits[idx], control).mean()))
    # the loo variant at α = 1 on the retrained examples alone is the loo variant of all examples there
    assert m["by_loo_damping"]["1.0"]["pearson"] == pytest.approx(m["by_variant"]["loo"]["pearson"], rel=1e-6)
    _, true_trained = validation_metrics(logits, y, V, variants, idx, loo, control, reference="trained")
    np.testing.assert_allclose(true_trained, softmax_deviation(logits[idx], loo).numpy())


def test_loco_metrics_by_hand():
    estimates = {"classes": [0, 2, 3], "removed": [torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([3, 4])],
                 "estimated_nll": torch.tensor([1.0, 3.0, 2.0]), "estimated_nll_joint": [1.5, 2.5, 3.5]}
    tables = {"test_loss": np.array([[1.0, 3.0], [4.0, 4.0], [2.0, 2.0], [0.5, 0.5]]),  # control last
              "train_loss": np.arange(20, dtype=float).reshape(4, 5),
              "test_correct": np.array([[1, 0], [0, 0], [1, 1], [1, 1]], dtype=bool)}
    m = loco_metrics(estimates, tables)
    assert m["true_test_nll"] == [2.0, 4.0, 2.0] and m["control_test_nll"] == 0.5
    assert m["true_test_accuracy"] == [0.5, 0.0, 1.0] and m["accuracy_drop"] == [0.5, 1.0, 0.0]
    assert m["true_removed_train_nll"] == [0.5, 7.0, 13.5]  # row m at the examples removed from model m
    assert m["spearman_removed"] == pytest.approx(0.5) and m["spearman_joint_removed"] == pytest.approx(1.0)
    assert m["classes"] == [0, 2, 3] and "slope" not in m


def test_checkpoint_iterations_and_training_steps():
    assert training_steps(101, 10, 2) == 22
    assert checkpoint_iterations(100, 10, 3) == (3, 10, 12, 30)  # 10, 10 %, 40 %, 100 % of 30 steps
    assert checkpoint_iterations(100, 10, 3, (5, 30)) == (5, 30)
    with pytest.raises(ConfigError, match=r"checkpoint iterations \[31\] exceed the 30 steps"):
        checkpoint_iterations(100, 10, 3, (5, 31))


def test_best_deltas_raw_and_smoothed_by_hand():
    deltas = [1.0, 10.0, 100.0]
    assert best_deltas(deltas, [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]) == {"best_delta_estimated": 10.0,
                                                                      "best_delta_test": 1.0}
    s = smoothed_best_deltas(deltas, [3.0, 1.0, 2.0], [1.0, 2.0, 3.0], 2)
    np.testing.assert_allclose(s["deltas"], [10 ** 0.5, 10 ** 1.5])
    assert s["estimated_nll"] == [2.0, 1.5] and s["test_nll"] == [1.5, 2.5]
    assert s["best_delta_estimated"] == pytest.approx(10 ** 1.5) and s["best_delta_test"] == pytest.approx(10 ** 0.5)


def test_loo_nll_over_deltas_does_not_depend_on_the_other_deltas():
    """Model m trains with example weights δ_max/δ_m and prior δ_max: its objective is that of δ_m alone."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    data = Dataset("tiny", x, y, x[:10], y[:10], 3)

    def model_fn(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    cfg = TrainConfig(lr=0.1, epochs=3, bs=8, delta=1.0, eval_every=0)
    both = loo_nll_over_deltas(model_fn, data, cfg, np.array([1.0, 10.0]), structure="full", chunk_size=16,
                               progress=False)
    alone = loo_nll_over_deltas(model_fn, data, cfg, np.array([1.0]), structure="full", chunk_size=16, progress=False)
    for key in ("test_nll", "estimated_nll"):
        assert both[key][0] == pytest.approx(alone[key][0], rel=1e-4)
    assert set(both["estimated_nll_by_variant"]) == {"diag", "full", "loo"}
    assert both["best_delta_estimated"] in (1.0, 10.0) and len(both["test_accuracy"]) == 2


def test_recorder_watching_the_module_later_records_the_same(digits):
    from modelsense.models import build_model

    data = digits.subset(range(100)) if hasattr(digits, "subset") else digits
    cfg = TrainConfig(optimizer="adam", lr=0.05, epochs=1, bs=32, delta=1.0, eval_every=0, checkpoint_iterations=(2,))
    module = build_model("mlp", data.input_shape, data.num_classes, widths=(8,), seed=0)
    with OptimizerStateRecorder(iterations=(2,)).watch(module) as rec:
        res = fit(module, data, cfg, progress=False)
    snap = rec.snapshots["iteration_2"]
    assert rec.module is module and snap["kind"] == "adam" and snap["step"] == 2
    for k, v in res.checkpoints["iteration_2"].items():
        torch.testing.assert_close(snap["params"][k], v)
