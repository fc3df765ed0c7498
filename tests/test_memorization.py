"""Held-out subsample estimators and the subset-run store, against brute-force definitions."""

from __future__ import annotations

import math
import shutil
import warnings

import numpy as np
import pytest
import torch

from conftest import tiny_farm
from modelsense.errors import ConfigError, DataError
from modelsense.memorization import (
    MIN_HELD_OUT,
    UndefinedEstimateWarning,
    auc_corrupted,
    bootstrap_counts,
    consistency,
    group_curves,
    heldout_mean,
    high_influence_pairs,
    high_memorization,
    influence,
    memorization,
    memorization_by_number_of_models,
    open_influence_memmap,
    quantile_groups,
    read_original_runs,
    reliable_examples,
    subset_masks,
)

# ------------------------------------------------------------------------------------------------
# tiny tables and the slow, obvious definitions


def random_table(seed, n_models=14, n_train=11, n_test=6, binary=True):
    rng = np.random.default_rng(seed)
    masks = rng.random((n_models, n_train)) < 0.6
    masks[:, 0] = False  # never trained on: undefined
    masks[:, 1] = False
    masks[3, 1] = True  # exactly one in-run: estimate defined, SE undefined
    masks[:, 2] = True  # never held out: undefined
    if binary:
        train = (rng.random((n_models, n_train)) < 0.7).astype(np.float64)
        test = (rng.random((n_models, n_test)) < 0.6).astype(np.float64)
    else:
        train = rng.normal(size=(n_models, n_train)) + 3.0
        test = rng.normal(size=(n_models, n_test)) + 3.0
    return masks, train, test


def split_means(masks, values, i, column):
    """Lists of values[r, column] over models with / without example i, by a loop over r."""
    inside, outside = [], []
    for r in range(masks.shape[0]):
        (inside if masks[r, i] else outside).append(values[r, column])
    return inside, outside


def difference_loop(masks, values_for_column, i, column):
    inside, outside = split_means(masks, values_for_column, i, column)
    if not inside or not outside:
        return np.nan, np.nan
    estimate = np.mean(inside) - np.mean(outside)
    if len(inside) < 2 or len(outside) < 2:
        return estimate, np.nan
    se = math.sqrt(np.var(inside, ddof=1) / len(inside) + np.var(outside, ddof=1) / len(outside))
    return estimate, se


def memorization_loop(masks, train):
    out = np.array([difference_loop(masks, train, i, i) for i in range(masks.shape[1])])
    return out[:, 0], out[:, 1]


def influence_loop(masks, test):
    n_train, n_test = masks.shape[1], test.shape[1]
    est = np.empty((n_test, n_train))
    se = np.empty((n_test, n_train))
    for j in range(n_test):
        for i in range(n_train):
            est[j, i], se[j, i] = difference_loop(masks, test, i, j)
    return est, se


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedEstimateWarning)
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------------
# memorization


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_memorization_matches_loop(seed, binary):
    masks, train, _ = random_table(seed, binary=binary)
    result = quiet(memorization, masks, train, min_held_out=1)  # the bare definition
    est, se = memorization_loop(masks, train)
    np.testing.assert_allclose(result.estimate, est, rtol=1e-12, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(result.standard_error, se, rtol=1e-10, atol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(result.n_in, masks.sum(0))
    np.testing.assert_array_equal(result.n_out, masks.shape[0] - masks.sum(0))
    assert np.isnan(result.estimate[[0, 2]]).all() and np.isfinite(result.estimate[1])
    assert np.isnan(result.standard_error[1])
    assert result.n_undefined == 2


def test_memorization_warns_with_count_and_accepts_tensors_and_bools():
    masks, train, _ = random_table(3)
    with pytest.warns(UndefinedEstimateWarning, match=r"2 of 11 training examples .* 14 models"):
        result = memorization(torch.from_numpy(masks), torch.from_numpy(train.astype(bool)), min_held_out=1)
    est, _ = memorization_loop(masks, train)
    np.testing.assert_allclose(result.estimate, est, equal_nan=True)


def test_memorization_blocks_do_not_change_result(monkeypatch):
    masks, train, _ = random_table(4, n_train=37, binary=False)
    whole = quiet(memorization, masks, train)
    from modelsense.memorization import estimators

    monkeypatch.setattr(estimators, "_BLOCK_ELEMENTS", 50)  # 3 columns per block
    blocked = quiet(memorization, masks, train, bootstrap=20)
    np.testing.assert_allclose(blocked.estimate, whole.estimate, equal_nan=True)
    np.testing.assert_allclose(blocked.standard_error, whole.standard_error, equal_nan=True)


def test_bootstrap_interval_matches_loop_over_resamples():
    masks, train, _ = random_table(5, n_models=12)
    result = quiet(memorization, masks, train, bootstrap=40, confidence=0.8, seed=7, min_held_out=1)
    counts = bootstrap_counts(masks.shape[0], 40, seed=7)
    resampled = np.full((40, masks.shape[1]), np.nan)
    for b in range(40):
        rows = np.repeat(np.arange(masks.shape[0]), counts[b])  # models drawn with replacement
        for i in range(masks.shape[1]):
            resampled[b, i] = difference_loop(masks[rows], train[rows], i, i)[0]
    for i in range(masks.shape[1]):
        values = resampled[:, i][~np.isnan(resampled[:, i])]
        if values.size == 0:
            assert np.isnan(result.interval[i]).all()
            continue
        np.testing.assert_allclose(result.interval[i], np.quantile(values, [0.1, 0.9]), atol=1e-12)
    again = quiet(memorization, masks, train, bootstrap=40, confidence=0.8, seed=7, min_held_out=1)
    np.testing.assert_array_equal(again.interval, result.interval)
    assert np.all(counts.sum(1) == masks.shape[0])


def test_bootstrap_interval_brackets_estimate_on_large_table():
    masks = subset_masks(200, 0.5, 400, warn=False).masks
    rng = np.random.default_rng(0)
    p = np.where(masks, 0.9, 0.4)  # true memorization 0.5 everywhere
    correct = rng.random(masks.shape) < p
    result = memorization(masks, correct, bootstrap=200, seed=1)
    inside = (result.interval[:, 0] <= 0.5) & (0.5 <= result.interval[:, 1])
    assert 0.88 < inside.mean() <= 1.0  # ~95% coverage
    width = result.interval[:, 1] - result.interval[:, 0]
    np.testing.assert_allclose(np.median(width), np.median(2 * 1.96 * result.standard_error), rtol=0.15)


def test_memorization_by_number_of_models_equals_prefix_estimates():
    masks, train, _ = random_table(6, n_models=16)
    grid = [1, 2, 5, 9, 16]
    table = memorization_by_number_of_models(masks, train, grid)
    for row, r in zip(table, grid):
        np.testing.assert_allclose(row, quiet(memorization, masks[:r], train[:r], warn=False).estimate,
                                   equal_nan=True, atol=1e-12)
    with pytest.raises(ConfigError, match="between 1 and 16"):
        memorization_by_number_of_models(masks, train, [0, 3])


# ------------------------------------------------------------------------------------------------
# influence


@pytest.mark.parametrize("binary", [True, False])
def test_influence_matches_loop(binary):
    masks, _, test = random_table(7, binary=binary)
    expected, expected_se = influence_loop(masks, test)
    result = quiet(influence, masks, test, standard_error=True, dtype=np.float64, min_held_out=1)
    assert result.scores.shape == (test.shape[1], masks.shape[1])
    np.testing.assert_allclose(result.scores, expected, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(result.standard_error, expected_se, rtol=1e-9, atol=1e-9, equal_nan=True)
    blocked = quiet(influence, masks, test, standard_error=True, dtype=np.float64, block_size=4,
                    train_block_size=3, min_held_out=1)
    np.testing.assert_allclose(blocked.scores, result.scores, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(blocked.standard_error, result.standard_error, atol=1e-12, equal_nan=True)


def test_influence_self_column_is_memorization():
    masks, train, _ = random_table(8)
    result = quiet(influence, masks, train, dtype=np.float64, standard_error=True)
    mem = quiet(memorization, masks, train)
    np.testing.assert_allclose(np.diag(result.scores), mem.estimate, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(np.diag(result.standard_error), mem.standard_error, atol=1e-9, equal_nan=True)


def test_influence_float32_is_exact_on_binary_tables():
    masks = subset_masks(40, 0.7, 300, warn=False).masks
    correct = np.random.default_rng(0).random((300, 25)) < 0.5
    f32 = influence(masks, correct, dtype=np.float64)
    n_in = masks.sum(0)
    s_in = correct.astype(np.int64).T @ masks.astype(np.int64)  # exact integer sums
    exact = s_in / n_in - (correct.sum(0)[:, None] - s_in) / (300 - n_in)
    np.testing.assert_allclose(f32.scores, exact, rtol=0, atol=1e-14)


def test_top_k_equals_sorted_full_matrix():
    masks, _, test = random_table(9, n_train=30, n_test=9, binary=False)
    full = quiet(influence, masks, test, dtype=np.float64, standard_error=True)
    top = quiet(influence, masks, test, top_k=5, standard_error=True, block_size=2, train_block_size=7)
    assert top.scores is None and top.top_indices.shape == (9, 5)
    for j in range(9):
        row = np.where(np.isnan(full.scores[j]), -np.inf, full.scores[j])
        order = np.argsort(-row, kind="stable")[:5]
        np.testing.assert_allclose(top.top_values[j], full.scores[j, order], atol=1e-12)
        np.testing.assert_allclose(full.scores[j, top.top_indices[j]], top.top_values[j], atol=1e-12)
        np.testing.assert_allclose(top.top_standard_error[j], full.standard_error[j, top.top_indices[j]],
                                   atol=1e-12, equal_nan=True)
        assert not np.isin(top.top_indices[j], [0, 2]).any()  # undefined columns never chosen
    with pytest.raises(ConfigError, match="top_k"):
        quiet(influence, masks, test, top_k=31)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_memmap_output_equals_in_memory(tmp_path, dtype):
    masks, _, test = random_table(10, n_train=23, n_test=13)
    memory = quiet(influence, masks, test, dtype=np.float64, standard_error=True)
    scores = open_influence_memmap(tmp_path / "influence.npy", 13, 23, dtype)
    errors = open_influence_memmap(tmp_path / "influence_se.npy", 13, 23, dtype)
    result = quiet(influence, masks, test, out=scores, standard_error_out=errors, block_size=3)
    assert result.scores is scores
    del scores, errors
    loaded = np.load(tmp_path / "influence.npy", mmap_mode="r")
    loaded_se = np.load(tmp_path / "influence_se.npy", mmap_mode="r")
    assert loaded.dtype == dtype and loaded.shape == (13, 23)
    tol = 1e-3 if dtype == np.float16 else 1e-6
    np.testing.assert_allclose(loaded, memory.scores, atol=tol, equal_nan=True)
    np.testing.assert_allclose(loaded_se, memory.standard_error, atol=tol, equal_nan=True)
    same = quiet(influence, masks, test, dtype=dtype, standard_error=True)  # same arithmetic in memory
    np.testing.assert_array_equal(loaded, same.scores)
    np.testing.assert_array_equal(loaded_se, same.standard_error)


def test_influence_bad_out_shape():
    masks, _, test = random_table(11)
    with pytest.raises(ConfigError, match=r"expected shape \(6, 11\)"):
        quiet(influence, masks, test, out=np.empty((11, 6), np.float32))


# ------------------------------------------------------------------------------------------------
# minimum number of models per side (min_held_out)


def test_examples_below_min_held_out_are_flagged_and_never_top_k():
    masks, train, test = tiny_farm()
    bare = memorization(masks, train, min_held_out=1)
    assert bare.estimate[0] == 1.0 and bare.n_unreliable == 0  # the noisy estimate the minimum removes
    with pytest.warns(UndefinedEstimateWarning, match=r"2 of 5 training examples have fewer than 3 models"):
        mem = memorization(masks, train, bootstrap=10)
    assert MIN_HELD_OUT == 3 and mem.min_held_out == 3
    np.testing.assert_array_equal(mem.reliable, [False, True, True, True, False])
    np.testing.assert_array_equal(reliable_examples(mem.n_in, mem.n_out), mem.reliable)
    assert mem.n_unreliable == 2 and mem.n_undefined == 0
    # reliable examples keep their exact values: in-mean minus out-mean over the 8 models
    np.testing.assert_allclose(mem.estimate, [np.nan, 0.75 - 1.0, 0.75 - 1.0, 1.0 - 0.75, np.nan], equal_nan=True)
    assert np.isnan(mem.standard_error[[0, 4]]).all() and np.isnan(mem.interval[[0, 4]]).all()
    np.testing.assert_array_equal(high_memorization(mem, threshold=0.0), [3])
    np.testing.assert_allclose(memorization_by_number_of_models(masks, train, [8])[0], mem.estimate, equal_nan=True)

    assert quiet(influence, masks, test, top_k=1, min_held_out=1).top_indices[:, 0].tolist() == [0, 0, 0, 0]
    top = quiet(influence, masks, test, top_k=3)
    np.testing.assert_array_equal(top.top_indices, [[3, 1, 2]] * 4)  # ties: lower index first
    np.testing.assert_allclose(top.top_values, [[0.25, -0.25, -0.25]] * 4)
    assert top.n_unreliable == 2 and top.reliable.tolist() == mem.reliable.tolist()
    full = quiet(influence, masks, test, dtype=np.float64, standard_error=True)
    assert np.isnan(full.scores[:, [0, 4]]).all() and np.isnan(full.standard_error[:, [0, 4]]).all()
    np.testing.assert_allclose(full.scores[:, [1, 2, 3]], [[-0.25, -0.25, 0.25]] * 4)
    # more places than reliable examples: the row ends with index -1 and NaN, never an unreliable index
    every = quiet(influence, masks, test, top_k=5, standard_error=True)
    np.testing.assert_array_equal(every.top_indices, [[3, 1, 2, -1, -1]] * 4)
    assert np.isnan(every.top_values[:, 3:]).all() and np.isnan(every.top_standard_error[:, 3:]).all()
    assert set(high_influence_pairs(every, threshold=-1.0).train_index.tolist()) == {1, 2, 3}


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_min_held_out_must_be_a_positive_whole_number(bad):
    masks, train, test = tiny_farm()
    with pytest.raises(ConfigError, match="min_held_out: expected a whole number of models >= 1"):
        memorization(masks, train, min_held_out=bad)
    with pytest.raises(ConfigError, match="min_held_out"):
        influence(masks, test, min_held_out=bad)


# ------------------------------------------------------------------------------------------------
# consistency


def test_consistency_matches_loop():
    tables = {}
    for ratio, n_models, seed in ((0.3, 9, 0), (0.7, 13, 1)):
        masks, train, _ = random_table(seed, n_models=n_models, binary=False)
        tables[ratio] = (masks, train)
    result = quiet(consistency, tables)
    assert list(result.per_ratio) == [0.3, 0.7]
    per = {}
    for ratio, (masks, train) in tables.items():
        est, se = [], []
        for i in range(masks.shape[1]):
            outside = [train[r, i] for r in range(masks.shape[0]) if not masks[r, i]]
            est.append(np.mean(outside) if outside else np.nan)
            se.append(np.std(outside, ddof=1) / math.sqrt(len(outside)) if len(outside) > 1 else np.nan)
        per[ratio] = (np.array(est), np.array(se))
        np.testing.assert_allclose(result.per_ratio[ratio].estimate, est, atol=1e-12, equal_nan=True)
        np.testing.assert_allclose(result.per_ratio[ratio].standard_error, se, atol=1e-12, equal_nan=True)
    for i in range(11):
        defined = [r for r in per if not np.isnan(per[r][0][i])]
        if not defined:
            assert np.isnan(result.score[i])
            continue
        np.testing.assert_allclose(result.score[i], np.mean([per[r][0][i] for r in defined]), atol=1e-12)
        expected_se = math.sqrt(sum(per[r][1][i] ** 2 for r in defined)) / len(defined)
        np.testing.assert_allclose(result.standard_error[i], expected_se, atol=1e-12, equal_nan=True)
        assert result.n_ratios[i] == len(defined)
    assert result.n_ratios[2] == 0 and np.isnan(result.score[2])  # never held out


def test_consistency_of_correlated_ratios_bounds_the_error_by_the_sum():
    """Farms whose model r shares its seed and a nested subset across ratios: SE = sum_k SE_k / K."""
    tables = {ratio: random_table(seed, n_models=9, binary=False)[:2] for ratio, seed in ((0.3, 0), (0.5, 1), (0.7, 2))}
    dependent = quiet(consistency, tables, independent=False)
    independent = quiet(consistency, tables)
    np.testing.assert_array_equal(dependent.score, independent.score)
    for i in range(11):
        ses = [
            dependent.per_ratio[r].standard_error[i] for r in tables if not np.isnan(dependent.per_ratio[r].estimate[i])
        ]
        expected = sum(ses) / len(ses) if ses else np.nan
        np.testing.assert_allclose(dependent.standard_error[i], expected, atol=1e-12, equal_nan=True)
        if ses and not np.isnan(expected) and len(ses) > 1:  # the bound is never below the independent SE
            assert dependent.standard_error[i] >= independent.standard_error[i] - 1e-12


def test_group_curves_and_quantile_groups_match_loops():
    rng = np.random.default_rng(3)
    per_ratio = {0.7: rng.random(20), 0.2: rng.random(20)}
    per_ratio[0.2][[1, 5]] = np.nan  # never held out at 0.2
    groups = {"a": np.arange(10), "b": np.arange(20) >= 10, "one": [5]}
    curves = group_curves(per_ratio, groups)
    for name, members in (("a", range(10)), ("b", range(10, 20)), ("one", [5])):
        mean, se, n = curves[name]
        for k, ratio in enumerate([0.2, 0.7]):  # increasing ratios
            vals = [per_ratio[ratio][i] for i in members if not np.isnan(per_ratio[ratio][i])]
            assert n[k] == len(vals)
            np.testing.assert_allclose(mean[k], np.mean(vals) if vals else np.nan, atol=1e-12, equal_nan=True)
            expected_se = np.std(vals, ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else np.nan
            np.testing.assert_allclose(se[k], expected_se, atol=1e-12, equal_nan=True)
    assert np.isnan(curves["one"][0][0]) and curves["one"][2].tolist() == [0, 1]
    score = np.array([0.9, np.nan, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4])
    q = quantile_groups(score, 4)
    assert [idx.tolist() for idx in q.values()] == [[2, 6], [4, 8], [3, 5], [0, 7]]
    assert list(q)[0] == "C-score q1 (0.10-0.20)" and sum(len(v) for v in q.values()) == 8  # NaN left out
    with pytest.raises(DataError, match="indices in"):
        group_curves(per_ratio, {"bad": [20]})
    with pytest.raises(ConfigError, match="n_groups must be >= 1"):
        quantile_groups(score, 0)


def test_consistency_bad_input():
    masks, train, _ = random_table(0)
    with pytest.raises(ConfigError, match="non-empty dict"):
        consistency({})
    with pytest.raises(DataError, match="expected 11 training examples"):
        quiet(consistency, {0.5: (masks, train), 0.7: (masks[:, :5], train[:, :5])})


# ------------------------------------------------------------------------------------------------
# selection, AUC, subsets


def test_high_memorization_and_influence_pairs(tmp_path):
    mem = np.array([0.1, 0.5, np.nan, 0.25, 0.3, -0.4])
    np.testing.assert_array_equal(high_memorization(mem), [1, 4, 3])
    np.testing.assert_array_equal(high_memorization(mem, threshold=0.4), [1])

    masks, _, test = random_table(12, n_train=20, n_test=8)
    full = quiet(influence, masks, test, dtype=np.float64)
    pairs = high_influence_pairs(full.scores, threshold=0.1)
    expected = [(j, i, full.scores[j, i]) for j in range(8) for i in range(20)
                if not np.isnan(full.scores[j, i]) and full.scores[j, i] >= 0.1]
    expected.sort(key=lambda t: (-t[2], t[0], t[1]))
    assert len(expected) > 3
    np.testing.assert_array_equal(pairs.test_index, [e[0] for e in expected])
    np.testing.assert_array_equal(pairs.train_index, [e[1] for e in expected])
    np.testing.assert_allclose(pairs.value, [e[2] for e in expected])
    scores = open_influence_memmap(tmp_path / "infl.npy", 8, 20, np.float64)
    quiet(influence, masks, test, out=scores)
    from_memmap = high_influence_pairs(np.load(tmp_path / "infl.npy", mmap_mode="r"), 0.1, block_size=3)
    np.testing.assert_array_equal(from_memmap.train_index, pairs.train_index)
    top = quiet(influence, masks, test, top_k=20, dtype=np.float64)
    from_top = high_influence_pairs(top, 0.1)
    np.testing.assert_array_equal(from_top.test_index, pairs.test_index)
    np.testing.assert_array_equal(from_top.train_index, pairs.train_index)


def test_auc_corrupted_matches_pair_count():
    rng = np.random.default_rng(0)
    mem = rng.random(30)
    mem[[3, 4]] = mem[5]  # ties count one half
    mem[7] = np.nan
    corrupted = np.array([3, 7, 10, 11, 20])
    kept = ~np.isnan(mem)
    bad = [mem[i] for i in corrupted if kept[i]]
    good = [mem[i] for i in range(30) if kept[i] and i not in corrupted]
    wins = sum((b > g) + 0.5 * (b == g) for b in bad for g in good)
    assert auc_corrupted(mem, corrupted) == pytest.approx(wins / (len(bad) * len(good)))
    with pytest.raises(DataError, match=r"indices in \[0, 30\)"):
        auc_corrupted(mem, [2, 30])
    with pytest.raises(DataError, match="both corrupted and clean"):
        auc_corrupted(mem, [])


def test_subset_masks_reproduce_original_sampling():
    result = subset_masks(50, 0.7, 6, seed0=3, warn=False)
    assert result.masks.shape == (6, 50) and result.masks.dtype == bool
    np.testing.assert_array_equal(result.seeds, np.arange(3, 9))
    for r in range(6):
        expected = np.zeros(50, bool)
        expected[np.random.RandomState(3 + r).choice(50, int(0.7 * 50), replace=False)] = True
        np.testing.assert_array_equal(result.masks[r], expected)
    assert (result.masks.sum(1) == 35).all()


def test_subset_masks_warn_with_count_when_too_few_models():
    with pytest.warns(UndefinedEstimateWarning, match=r"(\d+) of 200 training examples") as record:
        result = subset_masks(200, 0.7, 3)
    n_in = result.masks.sum(0)
    brute = sum(1 for i in range(200) if n_in[i] == 0 or n_in[i] == 3)
    assert result.n_undefined == brute > 0
    assert f"{brute} of 200" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert subset_masks(20, 0.5, 60).n_undefined == 0


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_subset_ratio_outside_unit_interval(ratio):
    with pytest.raises(ConfigError, match=f"strictly between 0 and 1.*got {ratio}"):
        subset_masks(10, ratio, 4)


def test_subset_ratio_too_small_for_n():
    with pytest.raises(ConfigError, match="empty subset"):
        subset_masks(10, 0.05, 4)


def test_mismatched_shapes_and_bad_values():
    masks, train, test = random_table(0)
    with pytest.raises(DataError, match=r"correct_train: expected 14 rows .* got shape \(13, 11\)"):
        memorization(masks, train[:13])
    with pytest.raises(DataError, match=r"correct_train: expected 11 columns .* got shape \(14, 10\)"):
        memorization(masks, train[:, :10])
    with pytest.raises(DataError, match=r"correct_test: expected 14 rows"):
        influence(masks, test[:5])
    with pytest.raises(DataError, match="masks: expected a 2-D"):
        memorization(masks[0], train[0])
    with pytest.raises(DataError, match="masks: expected booleans"):
        memorization(masks * 2.5, train)
    bad = train.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="1 NaN/inf"):
        memorization(masks, bad)
    with pytest.raises(DataError, match="values: expected 14 rows"):
        heldout_mean(masks, train[:3])


# ------------------------------------------------------------------------------------------------
# store


def farm_tables(n_models, n_train=17, n_test=5, seed=0):
    """What a training farm would record, deterministic per model id."""
    masks = subset_masks(n_train, 0.6, n_models, warn=False).masks
    rows = []
    for r in range(n_models):
        rng = np.random.default_rng(1000 + r)
        rows.append((rng.random(n_train) < 0.8, rng.random(n_test) < 0.6,
                     rng.random(n_train).astype(np.float32), rng.random(n_test).astype(np.float32)))
    return masks, rows


def write_models(store, ids, masks, rows):
    ids = np.asarray(ids)
    return store.write_chunk(
        ids, ids + 100, masks[ids],
        np.stack([rows[r][0] for r in ids]), np.stack([rows[r][1] for r in ids]),
        loss_train=np.stack([rows[r][2] for r in ids]), loss_test=np.stack([rows[r][3] for r in ids]),
    )


def check_complete(store, n_models, masks, rows):
    runs = store.load_all()
    np.testing.assert_array_equal(runs.model_ids, np.arange(n_models))
    np.testing.assert_array_equal(runs.seeds, np.arange(n_models) + 100)
    np.testing.assert_array_equal(runs.masks, masks[:n_models])
    np.testing.assert_array_equal(runs.correct_train, np.stack([rows[r][0] for r in range(n_models)]))
    np.testing.assert_array_equal(runs.correct_test, np.stack([rows[r][1] for r in range(n_models)]))
    np.testing.assert_array_equal(runs.loss_train, np.stack([rows[r][2] for r in range(n_models)]))
    assert runs.correct_train.dtype == bool and runs.loss_test.dtype == np.float32
    assert runs.margin_train is None
    return runs


# ------------------------------------------------------------------------------------------------
# the original's released layout


def write_original_tree(root, n_train=15, n_test=7):
    """Two ratios, a few runs each, in <ratio>/<run_id>/aux_arrays.npz with shuffled orders."""
    truth = {}
    for ratio, run_ids in ((0.3, ["4", "10", "2"]), (0.7, ["0", "1", "5", "7"])):
        masks, train, test = [], [], []
        for run_id in sorted(run_ids, key=int):
            rng = np.random.default_rng(int(ratio * 100) + int(run_id))
            subsample = rng.choice(n_train, int(ratio * n_train), replace=False)
            removed = np.setdiff1d(np.arange(n_train), subsample)
            rng.shuffle(removed)
            correct_train = rng.random(n_train) < 0.7
            correct_test = rng.random(n_test) < 0.6
            test_order = rng.permutation(n_test)
            train_order = rng.permutation(subsample)  # evaluation order differs from subsample_idx
            run_dir = root / str(ratio) / run_id
            run_dir.mkdir(parents=True)
            np.savez(run_dir / "aux_arrays.npz",
                     correctness_train=correct_train[train_order], index_train=train_order,
                     correctness_removed=correct_train[removed], index_removed=removed,
                     correctness_test=correct_test[test_order], index_test=test_order,
                     subsample_idx=subsample)
            mask = np.zeros(n_train, bool)
            mask[subsample] = True
            masks.append(mask)
            train.append(correct_train)
            test.append(correct_test)
        truth[ratio] = (np.stack(masks), np.stack(train), np.stack(test))
    (root / "README").write_text("not a run")
    return truth


def test_read_original_runs_gives_same_estimates(tmp_path):
    truth = write_original_tree(tmp_path)
    runs = read_original_runs(tmp_path)
    assert list(runs) == [0.3, 0.7]
    assert runs[0.3].run_ids == ["2", "4", "10"]
    for ratio, (masks, train, test) in truth.items():
        np.testing.assert_array_equal(runs[ratio].masks, masks)
        np.testing.assert_array_equal(runs[ratio].correct_train, train)
        np.testing.assert_array_equal(runs[ratio].correct_test, test)
        got = quiet(memorization, runs[ratio].masks, runs[ratio].correct_train)
        np.testing.assert_array_equal(got.estimate, quiet(memorization, masks, train).estimate)
        got_infl = quiet(influence, runs[ratio].masks, runs[ratio].correct_test, dtype=np.float64)
        np.testing.assert_array_equal(got_infl.scores, quiet(influence, masks, test, dtype=np.float64).scores)
    scores = quiet(consistency, {r: (v.masks, v.correct_train) for r, v in runs.items()})
    direct = quiet(consistency, {r: (m, c) for r, (m, c, _) in truth.items()})
    np.testing.assert_array_equal(scores.score, direct.score)


def test_read_original_runs_malformed_trees(tmp_path):
    write_original_tree(tmp_path)
    broken = tmp_path / "0.7" / "5" / "aux_arrays.npz"
    data = dict(np.load(broken))
    del data["index_removed"]
    np.savez(broken, **data)
    with pytest.raises(DataError, match=r"0\.7/5/aux_arrays\.npz: missing key 'index_removed'"):
        read_original_runs(tmp_path)

    data["index_removed"] = np.zeros_like(data["correctness_removed"], dtype=np.int64)
    np.savez(broken, **data)
    with pytest.raises(DataError, match=r"0\.7/5/aux_arrays\.npz: index_train and index_removed .* exactly once"):
        read_original_runs(tmp_path)

    (tmp_path / "0.7" / "5" / "aux_arrays.npz").unlink()
    with pytest.raises(DataError, match=r"0\.7/5/aux_arrays\.npz: missing"):
        read_original_runs(tmp_path)

    shutil.rmtree(tmp_path / "0.7" / "5")
    run = tmp_path / "0.7" / "1" / "aux_arrays.npz"
    data = dict(np.load(run))
    data["subsample_idx"] = np.arange(len(data["subsample_idx"]))
    np.savez(run, **data)
    with pytest.raises(DataError, match="subsample_idx and index_train name different"):
        read_original_runs(tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no subset-ratio directories"):
        read_original_runs(empty)


def test_read_original_runs_different_sizes(tmp_path):
    write_original_tree(tmp_path / "a")
    write_original_tree(tmp_path / "b", n_train=16)
    shutil.copytree(tmp_path / "b" / "0.7", tmp_path / "a" / "0.5")
    with pytest.raises(DataError, match="16 training and 7 test examples, but .* has 15 and 7"):
        read_original_runs(tmp_path / "a")


# ------------------------------------------------------------------------------------------------
# figures (smoke)


def test_figures_render(tmp_path, example_shape=(1, 8, 8)):
    from modelsense.memorization import plots

    rng = np.random.default_rng(0)
    n_train, n_test, n_models = 30, 12, 40
    x_train = rng.random((n_train, *example_shape)).astype(np.float32)
    x_test = rng.random((n_test, *example_shape)).astype(np.float32)
    y_train, y_test = rng.integers(0, 3, n_train), rng.integers(0, 3, n_test)
    masks = subset_masks(n_train, 0.7, n_models, warn=False).masks
    correct = rng.random((n_models, n_train)) < 0.8
    correct_test = rng.random((n_models, n_test)) < 0.7
    mem = quiet(memorization, masks, correct).estimate
    top = quiet(influence, masks, correct_test, top_k=6)
    grid = [5, 10, 20, 40]
    figures = {
        "mem": plots.most_memorized_figure(x_train, y_train, mem, n=10, n_columns=5),  # 2 rows of 5
        "hist": plots.memorization_histogram(mem, corrupted=[1, 2, 3]),
        "pairs": plots.influence_pairs_figure(x_train, y_train, x_test, y_test, top, n_test_examples=3,
                                              n_influential=3, n_random=2),
        "pairs_full": plots.influence_pairs_figure(
            x_train, y_train, x_test, y_test, quiet(influence, masks, correct_test).scores, n_test_examples=1,
            n_random=1),
        "conv": plots.memorization_convergence_figure(grid, memorization_by_number_of_models(masks, correct, grid)),
    }
    assert len(figures["pairs"].axes) == 3 * (1 + 3 + 2)
    assert len(figures["mem"].axes) == 10
    for name, fig in figures.items():
        path = tmp_path / f"{name}.png"
        fig.savefig(path, dpi=30)
        assert path.stat().st_size > 500


@pytest.mark.parametrize("example_shape", [(3, 6, 6), (40,)])
def test_most_memorized_figure_draws_color_images_and_signals(tmp_path, example_shape):
    from modelsense.memorization import plots

    x = np.random.default_rng(0).random((5, *example_shape))
    fig = plots.most_memorized_figure(x, [0, 1, 2, 0, 1], [0.1, np.nan, 0.9, 0.3, 0.5], n=3, n_columns=3)
    assert [ax.get_title().split()[0] for ax in fig.axes] == ["#2", "#4", "#3"]
    fig.savefig(tmp_path / "mem.png", dpi=30)
    with pytest.raises(DataError, match="cannot draw an example of shape"):
        plots.most_memorized_figure(np.zeros((2, 2, 3, 3, 3)), [0, 1], [0.5, 0.4])


def _overlapping_tick_labels(fig) -> list[tuple[str, str]]:
    """Pairs of neighbouring x tick labels whose drawn boxes overlap, over every axes of `fig`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    clashes = []
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
        boxes = sorted(((box.x0, box.x1), text) for box, text in
                       ((t.get_window_extent(renderer), t.get_text()) for t in labels))
        for ((_, right), left_text), ((left, _), right_text) in zip(boxes, boxes[1:]):
            if left < right:
                clashes.append((left_text, right_text))
    return clashes


@pytest.mark.parametrize("n_models", [6, 12, 32, 64, 256, 2000])
def test_convergence_figure_tick_labels_never_overlap(tmp_path, n_models):
    from modelsense.memorization import plots

    masks = subset_masks(50, 0.7, n_models, warn=False).masks
    correct = np.random.default_rng(n_models).random(masks.shape) < 0.8
    for grid in (np.unique(np.linspace(6, n_models, num=min(12, n_models - 5)).astype(int)),  # as the command
                 np.arange(6, n_models + 1)):  # every model count: the densest grid
        fig = plots.memorization_convergence_figure(grid, memorization_by_number_of_models(masks, correct, grid))
        assert _overlapping_tick_labels(fig) == []
        fig.savefig(tmp_path / "conv.png", dpi=60)
        assert (tmp_path / "conv.png").stat().st_size > 500
