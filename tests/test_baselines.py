"""The GEX paper's baselines (`el2n`, `fscore`, `cl`, `knn`, `random`, `tracinrp-fge`) and the selection
rules (Otsu's threshold, the pruning set) against their definitions computed the slow way."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelsense.attribution import GaussianProjector, fine_tune_chain, make_attributor
from modelsense.attribution.selection import (
    RelabelPlan,
    otsu_threshold,
    pruning_masks,
    pruning_set,
    random_removal_masks,
)
from modelsense.core.functional import FunctionalModel
from modelsense.data.dataset import Dataset
from modelsense.errors import ConfigError
from modelsense.training import TrainConfig, fit

QUIET = {"progress": False}
RECIPE = TrainConfig(epochs=6, lr=0.2, bs=8)


def toy(n=30, d=3, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, c, generator=g) + 0.7 * torch.randn(n, c, generator=g)).argmax(1)
    return x, y


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(int(seed))
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


@pytest.fixture(scope="module")
def problem():
    x, y = toy()
    model = mlp(0)
    fit(model, Dataset("toy", x, y, x[:0], y[:0], 3), RECIPE, progress=False)
    return model.eval(), x, y


def recipe_fit(seed, x, y, cfg=RECIPE, indices=None):
    """One model of the recipe trained with `fit` (the engine trains each model as `fit` would)."""
    model = mlp(seed)
    fit(model, Dataset("toy", x, y, x[:0], y[:0], 3), TrainConfig(**{**cfg.to_dict(), "seed": seed}),
        train_indices=indices, progress=False)
    return model.eval()


# -- el2n -------------------------------------------------------------------------------------------
def test_el2n_is_the_mean_summed_brier_score_of_early_trained_models(problem):
    model, x, y = problem
    att = make_attributor("el2n", el2n_repeat=2, el2n_epochs=3, train_config=RECIPE, model_fn=mlp, seed=1,
                          **QUIET).fit(model, x, y)
    short = TrainConfig(**{**RECIPE.to_dict(), "epochs": 3})
    expected = 0
    for r in range(2):
        member = recipe_fit(RECIPE.seed + 5000 + 1 * 7919 + r, x, y, short)
        with torch.no_grad():
            expected = expected + (member(x).softmax(-1) - F.one_hot(y, 3)).pow(2).sum(1) / 2
    torch.testing.assert_close(att.self_scores().float(), expected, atol=1e-4, rtol=1e-4)
    # one model: the L2 error (Paul et al.) is the square root of the summed Brier score
    one = {"el2n_repeat": 1, "train_config": RECIPE, "model_fn": mlp, **QUIET}
    brier = make_attributor("el2n", **one).fit(model, x, y).self_scores()
    l2 = make_attributor("el2n", el2n_score="l2", **one).fit(model, x, y).self_scores()
    torch.testing.assert_close(l2, brier.sqrt())
    # sigmoid_bce scores with one sigmoid per class (the GEX code's multitask)
    sig = make_attributor("el2n", loss="sigmoid_bce", **one).fit(model, x, y).self_scores()
    assert not torch.allclose(sig, brier)
    with pytest.raises(ConfigError, match="el2n_score"):
        make_attributor("el2n", el2n_score="l1")


# -- fscore -----------------------------------------------------------------------------------------
def test_fscore_counts_forgetting_events_of_the_recipe_run(problem):
    model, x, y = problem
    cfg = TrainConfig(epochs=8, lr=0.5, bs=4)
    att = make_attributor("fscore", train_config=cfg, model_fn=mlp, **QUIET).fit(model, x, y)
    # the slow way: the same run with a snapshot after every epoch, then correct -> wrong transitions
    snap = mlp(cfg.seed)
    res = fit(snap, Dataset("toy", x, y, x[:0], y[:0], 3),
              TrainConfig(**{**cfg.to_dict(), "checkpoint_epochs": tuple(range(1, 9))}), progress=False)
    correct = []
    for e in range(1, 9):
        with torch.no_grad():
            correct.append(torch.func.functional_call(snap, res.checkpoints[f"epoch_{e}"], (x,)).argmax(1) == y)
    events = torch.zeros(len(x))
    for before, after in itertools.pairwise(correct):
        events += (before & ~after).float()
    assert events.sum() > 0  # the case has forgetting events
    torch.testing.assert_close(att.self_scores().double(), events.double())
    # the method's seed draws nothing: the recipe's seed is the run
    again = make_attributor("fscore", train_config=cfg, model_fn=mlp, seed=5, **QUIET).fit(model, x, y)
    torch.testing.assert_close(again.self_scores(), att.self_scores())


# -- cl -----------------------------------------------------------------------------------------------
def test_cl_scores_out_of_fold_probabilities(problem):
    model, x, y = problem
    att = make_attributor("cl", cl_folds=3, train_config=RECIPE, model_fn=mlp, seed=2, **QUIET).fit(model, x, y)
    folds = att.folds_
    assert sorted(torch.bincount(folds, minlength=3).tolist()) == [10, 10, 10]
    p = torch.zeros(len(x), 3)
    for f in range(3):
        held = folds == f
        member = recipe_fit(RECIPE.seed + 3000 + 2 * 7919 + f, x, y, indices=(~held).nonzero().flatten())
        with torch.no_grad():
            p[held] = member(x[held]).softmax(-1)
    torch.testing.assert_close(att.oof_probabilities_.float(), p, atol=1e-4, rtol=1e-4)
    p = att.oof_probabilities_.double()
    torch.testing.assert_close(att.self_scores().double(), 1 - p[torch.arange(len(y)), y])
    # margin of the per-class thresholds, by loops
    t = [float(np.mean([p[i, c] for i in range(len(y)) if y[i] == c])) for c in range(3)]
    expected = [max(p[i, c] - t[c] for c in range(3) if c != y[i]) - (p[i, y[i]] - t[y[i]]) for i in range(len(y))]
    margin = make_attributor("cl", cl_folds=3, cl_score="margin", train_config=RECIPE, model_fn=mlp, seed=2,
                             **QUIET).fit(model, x, y)
    torch.testing.assert_close(margin.self_scores().double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6,
                               rtol=1e-6)
    with pytest.raises(ConfigError, match="folds"):
        make_attributor("cl", cl_folds=1)
    with pytest.raises(ConfigError, match="at least 3 training examples"):
        make_attributor("cl", cl_folds=3, train_config=RECIPE, model_fn=mlp, **QUIET).fit(model, x[:2], y[:2])


# -- knn ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["features", "logits"])
def test_knn_is_the_label_disagreement_of_the_nearest_neighbours(problem, space):
    model, x, y = problem
    att = make_attributor("knn", knn_k=4, knn_space=space, **QUIET).fit(model, x, y)
    with torch.no_grad():
        z = (torch.tanh(model[0](x)) if space == "features" else model(x)).double()
    e = F.one_hot(y, 3).double()
    expected = []
    for i in range(len(x)):
        d = [(float((z[i] - z[j]).pow(2).sum()), j) for j in range(len(x)) if j != i]
        nearest = [j for _, j in sorted(d)[:4]]
        expected.append(float((e[nearest].mean(0) - e[i]).pow(2).sum()))
    torch.testing.assert_close(att.self_scores().double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6,
                               rtol=1e-6)
    # default k = N // C, as the GEX code
    default = make_attributor("knn", knn_space=space, **QUIET).fit(model, x, y).self_scores()
    k10 = make_attributor("knn", knn_k=10, knn_space=space, **QUIET).fit(model, x, y).self_scores()
    torch.testing.assert_close(default, k10)


def test_knn_refuses_too_many_neighbours_and_a_model_without_a_linear_layer(problem):
    model, x, y = problem
    with pytest.raises(ConfigError, match="only 29 other training examples"):
        make_attributor("knn", knn_k=30, **QUIET).fit(model, x, y)

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            return x @ self.w

    with pytest.raises(ConfigError, match="knn_space='logits'"):
        make_attributor("knn", **QUIET).fit(Bare(), x, y)
    assert make_attributor("knn", knn_space="logits", **QUIET).fit(Bare(), x, y).self_scores().shape == (30,)


# -- random ---------------------------------------------------------------------------------------------
def test_random_scores_depend_on_the_seed_only(problem):
    model, x, y = problem
    a = make_attributor("random", seed=3, **QUIET).fit(model, x, y).self_scores()
    b = make_attributor("random", seed=3, **QUIET).fit(mlp(7), x, (y + 1) % 3).self_scores()
    c = make_attributor("random", seed=4, **QUIET).fit(model, x, y).self_scores()
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c) and bool(((a >= 0) & (a < 1)).all()) and len(set(a.tolist())) == len(a)


# -- tracinrp-fge ------------------------------------------------------------------------------------------
def test_tracinrp_fge_is_tracin_rp_over_the_gex_members(problem):
    model, x, y = problem
    model = mlp(0, torch.float64)
    model.load_state_dict({k: v.double() for k, v in problem[0].state_dict().items()})
    xd = x.double()
    settings = {"num_ens": 3, "ft_step": 4, "ft_lr": 0.05, "ft_bs": 8, "seed": 1}
    att = make_attributor("tracinrp-fge", proj_dim=7, **settings, **QUIET).fit(model, xd, y)
    gex = make_attributor("gex", **settings, **QUIET).fit(model, xd, y)
    for a, b in zip(att.members_, gex.members_):  # the same members as gex with the same settings
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    fm = FunctionalModel(model)
    members = fine_tune_chain(fm, fm.params, xd, y, 3, 4, 0.05, ft_bs=8, seed=1)
    P = sum(v.numel() for v in fm.params.values())
    G = GaussianProjector(P, 7, seed=1, dtype=torch.float64).matrix()

    def sketched(params, xx, yy):
        rows = []
        for xi, yi in zip(xx, yy):
            loss = F.cross_entropy(torch.func.functional_call(model, params, (xi[None],)), yi[None])
            grads = torch.autograd.grad(loss, [params[k] for k in params])
            rows.append(G @ torch.cat([g.flatten() for g in grads]))
        return torch.stack(rows)

    expected_self, expected = 0, 0
    for m in members:
        params = {k: v.clone().requires_grad_(True) for k, v in m.items()}
        a, b = sketched(params, xd, y), sketched(params, xd[:5], y[:5])
        expected = expected + a @ b.T
        expected_self = expected_self + a.pow(2).sum(1)
    torch.testing.assert_close(att.scores(xd[:5], y[:5]), expected)
    torch.testing.assert_close(att.self_scores(), expected_self)


# -- selection ----------------------------------------------------------------------------------------------
def test_otsu_threshold_on_a_hand_computed_histogram():
    # 4 bins over [0, 4]: centres 0.5, 1.5, 2.5, 3.5, counts 1, 1, 0, 2; between-class variances
    # w0 w1 (μ0 − μ1)² = 1·3·(0.5 − 17/6)², 2·2·(1 − 3.5)² = 25, 2·2·(1 − 3.5)² = 25: the first maximum, 1.5
    assert otsu_threshold(np.array([0.0, 1.0, 3.0, 4.0]), bins=4) == pytest.approx(1.5)
    assert otsu_threshold(np.full(5, 2.5)) == 2.5
    with pytest.raises(ConfigError, match="finite"):
        otsu_threshold(np.array([np.nan]))
    with pytest.raises(ConfigError, match="2 bins"):
        otsu_threshold(np.arange(3.0), bins=1)


def test_otsu_threshold_maximises_the_between_class_variance_and_splits_two_modes():
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.normal(0, 1, 900), rng.normal(8, 1, 100), [np.inf]])
    t = otsu_threshold(s, bins=64)
    finite = s[np.isfinite(s)]
    counts, edges = np.histogram(finite, bins=64)
    centres = (edges[:-1] + edges[1:]) / 2
    between = {}
    for i in range(63):  # the slow way: every split of the histogram
        lo, hi = counts[: i + 1], counts[i + 1:]
        between[centres[i]] = (
            lo.sum() * hi.sum() * ((lo @ centres[: i + 1]) / lo.sum() - (hi @ centres[i + 1 :]) / hi.sum()) ** 2
        )
    chosen = min(between, key=lambda c: abs(c - t))
    assert chosen == pytest.approx(t)  # a bin centre ...
    assert between[chosen] == pytest.approx(
        max(between.values()), rel=1e-9
    )  # ... of the largest variance (empty bins tie)
    assert 2 < t < 6 and (finite > t).sum() == pytest.approx(100, abs=3)


def test_pruning_set_global_class_balanced_and_iterative_marks():
    s = np.array([5.0, 1, 4, 2, 8, 0, 7, 3])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert pruning_set(s, 3).tolist() == [1, 3, 5]  # the 3 lowest
    assert pruning_set(s, 3, remove="highest").tolist() == [0, 4, 6]
    # r = 1: ⌊4/2⌋ = 2 lowest of each class
    assert pruning_set(s, 4, y, 2, class_balance_ratio=1.0).tolist() == [1, 3, 5, 7]
    # r = 0.5: ⌊0.5·4/2⌋ = 1 per class (1 and 5), then the 2 lowest of the rest (3 and 7)
    assert pruning_set(s, 4, y, 2, class_balance_ratio=0.5).tolist() == [1, 3, 5, 7]
    assert pruning_set(s, 3, y, 2, class_balance_ratio=0.7).tolist() == [1, 3, 5]
    # examples removed in an earlier step (−inf) are removed first
    marked = s.copy()
    marked[[4, 6]] = -np.inf
    assert pruning_set(marked, 3).tolist() == [4, 5, 6]
    assert pruning_set(s, 0).tolist() == []
    for bad, says in (
        ({"k": 9}, "cannot remove 9 of 8"),
        ({"k": 2, "class_balance_ratio": 1.5}, r"\[0, 1\]"),
        ({"k": 2, "remove": "middle"}, "lowest or highest"),
        ({"k": 2, "class_balance_ratio": 0.5}, "labels"),
    ):
        with pytest.raises(ConfigError, match=says):
            pruning_set(s, **bad)
    with pytest.raises(ConfigError, match="NaN"):
        pruning_set(np.array([1.0, math.nan]), 1)


def test_pruning_masks_rescore_between_steps_and_remove_the_earlier_ones_first():
    s = np.array([5.0, 1, 3, 2, 4])
    np.testing.assert_array_equal(pruning_masks(s, [1, 3]), [[1, 0, 1, 1, 1], [1, 0, 0, 0, 1]])
    seen = []

    def rescore(keep):  # the kept examples' new scores: 0, 9, 8, 7 for examples 0, 2, 3, 4
        seen.append(keep.tolist())
        return np.array([0.0, 9, 8, 7])

    masks = pruning_masks(s, [1, 3], rescore=rescore)
    assert seen == [[True, False, True, True, True]]  # once, between the two steps
    # second step: example 1 (removed first: −inf), then the lowest new scores 0 (example 0) and 7 (example 4)
    np.testing.assert_array_equal(masks, [[1, 0, 1, 1, 1], [0, 0, 1, 1, 0]])
    highest = pruning_masks(s, [1, 2], remove="highest", rescore=lambda keep: np.array([0.0, 9, 8, 7]))
    np.testing.assert_array_equal(highest, [[0, 1, 1, 1, 1], [0, 1, 0, 1, 1]])  # 0 (+inf), then 9 (example 2)


def test_random_removal_masks_draw_each_repeat_and_k_in_turn():
    masks = random_removal_masks(10, [2, 5], 3, np.random.default_rng(7))
    rng = np.random.default_rng(7)  # the slow way: one draw after the other
    for row, k in enumerate([2, 5] * 3):
        expected = np.ones(10, dtype=bool)
        expected[rng.choice(10, size=k, replace=False)] = False
        np.testing.assert_array_equal(masks[row], expected)


def test_relabel_plan_jobs_and_results_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    clean = np.array([1, 1, 1, 1, 2, 2])  # examples 0 and 1 are corrupted
    targets = np.array([1, 2, 2, 0, 0, 1])
    plan = RelabelPlan.build({"a": np.array([6.0, 5, 4, 3, 2, 1])}, y, targets, [1, 2], rng=np.random.default_rng(0),
                             otsu=False, n_random=1, corrupted=np.array([0, 1]), clean=clean)
    assert plan.keys == [("method", "a", 1), ("method", "a", 2), ("random", "random", 1), ("random", "random", 2),
                         ("none", "none", 0), ("clean", "clean", 2)]
    assert plan.labels[0].tolist() == [1, 0, 1, 1, 2, 2] and plan.labels[1].tolist() == [1, 2, 1, 1, 2, 2]
    assert plan.labels[4].tolist() == y.tolist() and plan.labels[5].tolist() == clean.tolist()
    r = plan.results(np.array([0.6, 0.8, 0.5, 0.4, 0.3, 0.9]), np.array([0, 1]), clean)
    assert r["none_accuracy"] == 0.3 and r["clean_accuracy"] == 0.9 and r["accuracy"] == {"a": [0.6, 0.8]}
    assert r["random_accuracy"] == [0.5, 0.4] and r["random_accuracy_std"] == [0.0, 0.0]
    # budget 1 relabels example 0 to its clean label; budget 2 also example 1, to 2 (not its clean 1)
    assert r["precision"] == {"a": [1.0, 1.0]} and r["corrected"] == {"a": [0.5, 0.5]}
    assert r["best"]["a"] == {"budget": 2, "otsu": False, "accuracy": 0.8, "gain_over_none": pytest.approx(0.5),
                              "gain_over_random": pytest.approx(0.4)}
    s = np.array([9.0, 8, 1, 1, 1, 1])
    plan = RelabelPlan.build({"a": s}, y, targets, [3], rng=np.random.default_rng(0), n_random=2)
    assert plan.otsu["a"] == {"threshold": otsu_threshold(s), "budget": 2} and plan.random_budgets == [2, 3]
    assert [k for k in plan.keys if k[0] == "otsu"] == [("otsu", "a", 2)] and len(plan.keys) == 1 + 1 + 2 * 2 + 1
    r = plan.results(np.array([0.5, 0.7, 0.1, 0.2, 0.3, 0.4, 0.6]))
    assert r["otsu"]["a"] == {"threshold": otsu_threshold(s), "budget": 2, "accuracy": 0.7,
                              "random_accuracy": pytest.approx(0.2)}
    assert r["random_accuracy"] == [pytest.approx(0.3)] and r["best"]["a"]["otsu"] and "precision" not in r
