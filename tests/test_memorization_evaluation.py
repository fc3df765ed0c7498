"""`memorization.evaluation` (a farm's estimates at once) and `memorization.verify` on tiny farms with exact answers."""

import numpy as np
import pytest
import torch

from modelsense.errors import ConfigError
from modelsense.memorization import estimators as est
from modelsense.memorization.evaluation import check_farm_size, check_ratios, evaluate_farm, main_ratio
from modelsense.memorization.verify import example_correctness, verification


def _farm(r: int = 8, n: int = 6, n_test: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((r, n), dtype=bool)
    masks[: r // 2] = True
    masks = np.stack([rng.permutation(col) for col in masks.T], 1)  # every example: r/2 models in, r/2 out
    return masks, rng.random((r, n)) < 0.6, rng.random((r, n_test)) < 0.5


def test_evaluate_farm_equals_the_estimators_it_assembles():
    masks, correct, correct_test = _farm()
    farm = evaluate_farm(masks, correct, correct_test, corrupted=[0, 3], top_k=2, min_held_out=2)
    mem = est.memorization(masks, correct, min_held_out=2)
    np.testing.assert_array_equal(farm.arrays["memorization"], mem.estimate)
    np.testing.assert_array_equal(farm.arrays["heldout_accuracy"], est.heldout_mean(masks, correct).estimate)
    infl = est.influence(masks, correct_test, top_k=2, warn=False, min_held_out=2)
    np.testing.assert_array_equal(farm.arrays["influence_top_indices"], infl.top_indices)
    assert farm.metrics["n_models"] == 8 and farm.metrics["min_held_out"] == 2
    assert farm.metrics["mean_memorization"] == pytest.approx(np.nanmean(mem.estimate))
    assert farm.metrics["auc_corrupted"] == pytest.approx(est.auc_corrupted(mem.estimate, [0, 3]))
    np.testing.assert_array_equal(farm.convergence[0], [4, 5, 6, 7, 8])  # from 2 x min_held_out models on
    assert "consistency" not in farm.arrays and not farm.consistency_curves


def test_evaluate_farm_full_influence_fills_the_given_matrix_and_none_leaves_it_out():
    masks, correct, correct_test = _farm()
    out = np.full((3, 6), -5.0, dtype=np.float32)
    evaluate_farm(masks, correct, correct_test, influence="full", influence_out=out, min_held_out=2)
    full = est.influence(masks, correct_test, warn=False, min_held_out=2).scores
    np.testing.assert_allclose(out, full, rtol=1e-6)
    farm = evaluate_farm(masks, correct, correct_test, influence="none", min_held_out=2)
    assert farm.influence is None and "n_high_influence_pairs" not in farm.metrics
    with pytest.raises(ConfigError, match="--influence must be one of topk, full, none, received 'most'"):
        evaluate_farm(masks, correct, correct_test, influence="most")


def test_consistency_over_ratios_is_the_mean_held_out_accuracy():
    (m1, c1, t), (m2, c2, _) = _farm(seed=1), _farm(seed=2)
    farm = evaluate_farm(m1, c1, t, by_ratio={0.3: (m1, c1), 0.7: (m2, c2)}, influence="none", min_held_out=2,
                         corrupted=[1])
    expected = (est.heldout_mean(m1, c1).estimate + est.heldout_mean(m2, c2).estimate) / 2
    np.testing.assert_allclose(farm.arrays["consistency"], expected)
    assert farm.ratios == [0.3, 0.7] and farm.metrics["subset_ratios"] == [0.3, 0.7]
    assert set(farm.consistency_curves) == {"corrupted vs clean labels", "C-score quantiles"}
    assert farm.arrays["heldout_accuracy_by_ratio"].shape == (2, 6)


def test_ratio_and_farm_size_rules():
    assert main_ratio([0.1, 0.5, 0.9], 0.6) == 0.5 and main_ratio([0.25, 0.75], 0.5) == 0.75  # the larger on a tie
    assert check_ratios((0.9, 0.1)) == (0.1, 0.9)
    with pytest.raises(ConfigError, match="lists a ratio twice"):
        check_ratios((0.5, 0.5))
    assert check_farm_size(3, 6) == 3
    with pytest.raises(ConfigError, match="--min-held-out 3 needs at least 6 models"):
        check_farm_size(3, 5)
    with pytest.raises(ConfigError, match="--min-held-out must be a whole number"):
        check_farm_size(0, 8)


def test_verification_against_an_accuracy_and_a_record():
    correct = np.array([True, True, False, True])
    metrics, failures = verification(correct, 0.75, 0.0)
    assert metrics["accuracy"] == 0.75 and metrics["passed"] and not failures
    recorded = np.array([True, False, False, True])
    metrics, failures = verification(correct, None, 0.2, recorded, source="aux.npz")
    assert metrics["expected_accuracy"] == 0.5 and metrics["n_match"] == 3 and metrics["mismatch_fraction"] == 0.25
    assert len(failures) == 2 and "differs from the expected 0.5000" in failures[0] and "aux.npz" in failures[1]


def test_example_correctness_is_argmax_equals_label_in_any_batch_size():
    linear = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
    x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]]), torch.tensor([0, 0, 0])
    for batch in (1, 2, 5):
        np.testing.assert_array_equal(example_correctness(linear, x, y, batch_size=batch), [True, False, True])
