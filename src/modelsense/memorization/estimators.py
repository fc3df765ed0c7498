"""Held-out subsample estimators: memorization, influence and consistency (C-) scores.

Setting (Feldman & Zhang 2020, "What Neural Networks Memorize and Why", arXiv:2008.03703; Jiang,
Zhang, Talwar & Mozer 2021, "Characterizing Structural Regularities of Labeled Data", ICML): train
R models, model r on a random subset S_r of the N training examples. Record

    masks[r, i]         = 1[i in S_r]                     (R, N) bool
    values_train[r, i]  = c_r(i), e.g. 1[argmax f_r(x_i) = y_i]   (R, N)
    values_test[r, j]   = c_r(j) on test example j              (R, M)

Correctness is the quantity of the papers; any per-example number (loss, margin) works the same way.
With n_in(i) = #{r: i in S_r} and n_out(i) = R - n_in(i) every estimate below is a difference (or a
mean) of masked means over models (sum over models, divided by the count: a mean, never a sum):

    mem(i)     = mean_{r: i in S_r} c_r(i)  - mean_{r: i notin S_r} c_r(i)                  (N,)
    infl(i, j) = mean_{r: i in S_r} c_r(j)  - mean_{r: i notin S_r} c_r(j)     stored (M, N)
    C(i)       = mean_{r: i notin S_r} c_r(i), per subset ratio, then mean over ratios     (N,)

The subsampled estimator targets the expected influence over random subsets of size m = rho*N
(not leave-one-out at the full set). Standard errors are those of a difference of two independent
means, SE = sqrt(s_in^2 / n_in + s_out^2 / n_out) with the unbiased sample variances (ddof = 1);
they are NaN where n_in < 2 or n_out < 2.

Minimum number of models (`min_held_out`, default `MIN_HELD_OUT` = 3). An example held out by one
model gets a memorization/influence estimate from that one model's 0/1 outcome, extreme and noisy
(in the demo's 32-model farm, an example held out by 1 model was the top influence for 6 test
examples). So `memorization`, `influence` and `memorization_by_number_of_models` report an estimate
for example i only when n_in(i) >= min_held_out AND n_out(i) >= min_held_out (the estimator is a
difference of two means: both need the models); otherwise the estimate, its SE and interval are NaN,
the example is flagged in `reliable` (False), never enters a top-k list or a selection, and is
counted (`count_undefined` warns with the count). `min_held_out=1` gives the bare definition (NaN
only where n_in == 0 or n_out == 0). At subset ratio rho, an example is held out by fewer than m of
R models with probability P[Binomial(R, 1 - rho) < m]: with rho = 0.7 that is 0.12% for R = 32 and
under 1e-6 for R = 64.

Everything here is numbers in, numbers out (numpy; torch tensors are accepted and converted); file
IO lives in `modelsense.memorization.store`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from modelsense.errors import ConfigError, DataError
from modelsense.retraining.store import subset_size  # the farm's sampling, defined once

# Selection thresholds. SEEDS.md section 3.1 attributes them to Feldman & Zhang (2020): memorized
# training examples mem >= 0.25, high-influence train/test pairs infl >= 0.15. We could not check
# them against the paper's text (the search tools reached only its abstract), so no section is
# cited here: verify in arXiv:2008.03703 before quoting them as the paper's.
HIGH_MEMORIZATION_THRESHOLD = 0.25
HIGH_INFLUENCE_THRESHOLD = 0.15

#: Fewest models that held example i out, and fewest that trained on it, for its memorization and
#: influence estimates to be reported (see the module docstring); fewer give NaN, flagged unreliable.
MIN_HELD_OUT = 3

# Elements per temporary (R x block) array; bounds memory whatever R and N.
_BLOCK_ELEMENTS = 1 << 23
# Largest model count for which float32 sums of 0/1 values are exact.
_FLOAT32_EXACT_COUNT = 1 << 24


class UndefinedEstimateWarning(UserWarning):
    """Some examples have fewer in-runs or out-runs than the minimum (`min_held_out`; at least one),
    so their estimate is NaN."""


# --------------------------------------------------------------------------------------------
# results


class _HeldOutCounts:
    """The reliability of estimates made from per-example model counts `n_in`, `n_out` (N,) with a minimum
    `min_held_out` on each side (fields of the dataclass that inherits this)."""

    @property
    def reliable(self) -> np.ndarray:
        """(N,) bool: n_in >= min_held_out and n_out >= min_held_out (the estimate is reported, not NaN)."""
        return reliable_examples(self.n_in, self.n_out, self.min_held_out)

    @property
    def n_unreliable(self) -> int:
        """Examples whose estimate is NaN: fewer than `min_held_out` models on a side (includes undefined)."""
        return int(np.count_nonzero(~self.reliable))


@dataclass(frozen=True)
class MemorizationEstimate(_HeldOutCounts):
    """mem(i) per training example with its standard error and the counts behind it.

    estimate, standard_error: (N,) float64, NaN where `reliable` is False (see module docstring).
    n_in, n_out: (N,) int64, number of models that did / did not train on example i.
    interval: (N, 2) float64 bootstrap percentile interval (low, high), or None; NaN where unreliable.
    min_held_out: the minimum number of models on each side the estimate was computed with.
    """

    estimate: np.ndarray
    standard_error: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray
    interval: np.ndarray | None = None
    min_held_out: int = MIN_HELD_OUT

    @property
    def n_undefined(self) -> int:
        """Examples with no in-run or no out-run (NaN whatever the minimum)."""
        return int(np.count_nonzero((self.n_in == 0) | (self.n_out == 0)))


@dataclass(frozen=True)
class HeldoutMean:
    """mean_{r: i notin S_r} c_r(i) per example, its standard error s_out / sqrt(n_out), and n_out."""

    estimate: np.ndarray
    standard_error: np.ndarray
    n_out: np.ndarray


@dataclass(frozen=True)
class ConsistencyScores:
    """C-scores: held-out means per subset ratio and their mean over ratios.

    score: (N,) mean over the ratios at which example i has out-runs (NaN if none).
    standard_error: (N,) sqrt(sum_k SE_k^2) / K_i, treating ratios as independent.
    n_ratios: (N,) number K_i of ratios that entered the mean.
    per_ratio: ratio -> HeldoutMean, ratios in increasing order.
    """

    score: np.ndarray
    standard_error: np.ndarray
    n_ratios: np.ndarray
    per_ratio: dict[float, HeldoutMean]


@dataclass(frozen=True)
class InfluenceEstimate(_HeldOutCounts):
    """infl(i, j) for test example j (rows) and training example i (columns).

    scores: (M, N) matrix (the `out` array when one was given), or None when only top-k was asked.
    standard_error: (M, N) or None (only with `standard_error=True` and a full matrix).
    top_indices: (M, k) int64 training indices with the k largest influences on each test example,
        in decreasing order of influence, or None. Unreliable (NaN) columns are never selected: where
        fewer than k training examples are reliable, the row ends with index -1 and value NaN.
    top_values, top_standard_error: (M, k) matching values / standard errors, or None.
    n_in, n_out: (N,) int64 counts per training example.
    min_held_out: the minimum number of models on each side; columns below it are NaN.
    """

    scores: np.ndarray | None
    standard_error: np.ndarray | None
    top_indices: np.ndarray | None
    top_values: np.ndarray | None
    top_standard_error: np.ndarray | None
    n_in: np.ndarray
    n_out: np.ndarray
    min_held_out: int = MIN_HELD_OUT


class SubsetMasks(NamedTuple):
    """Masks of `subset_masks`: masks (R, N) bool, seeds (R,) int64, n_undefined (examples with
    no in-run or no out-run)."""

    masks: np.ndarray
    seeds: np.ndarray
    n_undefined: int


class InfluencePairs(NamedTuple):
    """Train/test pairs with influence above a threshold, in decreasing order of influence."""

    test_index: np.ndarray
    train_index: np.ndarray
    value: np.ndarray


# --------------------------------------------------------------------------------------------
# input checks


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise DataError(f"{name}: expected an array, got {type(x).__name__}") from err


def _check_masks(masks: Any, name: str = "masks") -> np.ndarray:
    m = _to_numpy(masks, name)
    if m.ndim != 2:
        raise DataError(
            f"{name}: expected a 2-D (n_models, n_train) array (True where model r trained on "
            f"example i), got shape {m.shape}"
        )
    if m.shape[0] < 1 or m.shape[1] < 1:
        raise DataError(f"{name}: expected at least one model and one example, got shape {m.shape}")
    if m.dtype != np.bool_:
        if not (np.issubdtype(m.dtype, np.number) and np.all((m == 0) | (m == 1))):
            raise DataError(f"{name}: expected booleans (or 0/1), got dtype {m.dtype} with other values")
        m = m.astype(bool)
    return m


def _check_values(values: Any, name: str, n_models: int, n_columns: int | None = None) -> np.ndarray:
    v = _to_numpy(values, name)
    if v.ndim != 2:
        raise DataError(f"{name}: expected a 2-D (n_models, n_examples) array, got shape {v.shape}")
    if v.shape[0] != n_models:
        raise DataError(
            f"{name}: expected {n_models} rows (one per model, as in masks), got shape {v.shape}; "
            "rows are models, columns examples"
        )
    if n_columns is not None and v.shape[1] != n_columns:
        raise DataError(
            f"{name}: expected {n_columns} columns (one per training example, as in masks), "
            f"got shape {v.shape}"
        )
    if not (v.dtype == np.bool_ or np.issubdtype(v.dtype, np.number)):
        raise DataError(f"{name}: expected booleans or numbers, got dtype {v.dtype}")
    if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
        bad = int(np.count_nonzero(~np.isfinite(v)))
        raise DataError(f"{name}: expected finite values, found {bad} NaN/inf entries")
    return v


def _is_binary(v: np.ndarray) -> bool:
    if v.dtype == np.bool_:
        return True
    if np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating):
        return bool(np.all((v == 0) | (v == 1)))
    return False


def _column_blocks(n: int, rows: int, block_size: int | None = None) -> Iterator[slice]:
    size = block_size or max(1, _BLOCK_ELEMENTS // max(rows, 1))
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# --------------------------------------------------------------------------------------------
# counts, subsets


def check_min_held_out(min_held_out: Any) -> int:
    """`min_held_out` as an int >= 1, or a ConfigError that says what is expected."""
    if isinstance(min_held_out, bool) or not isinstance(min_held_out, (int, np.integer)) or min_held_out < 1:
        raise ConfigError(
            f"min_held_out: expected a whole number of models >= 1 (default {MIN_HELD_OUT}), got {min_held_out!r}"
        )
    return int(min_held_out)


def reliable_examples(n_in: Any, n_out: Any, min_held_out: int = MIN_HELD_OUT) -> np.ndarray:
    """(N,) bool: True where n_in >= min_held_out and n_out >= min_held_out (an estimate is reported).

    n_in, n_out: (N,) numbers of models that trained on / held out each example. Example:
        >>> reliable_examples(np.array([5, 9, 2]), np.array([5, 1, 8]), 3)
        array([ True, False, False])
    """
    m = check_min_held_out(min_held_out)
    return (np.asarray(n_in) >= m) & (np.asarray(n_out) >= m)


def count_undefined(n_in: np.ndarray, n_out: np.ndarray, *, what: str = "memorization",
                    warn: bool = True, min_held_out: int = 1) -> int:
    """Number of examples with n_in < min_held_out or n_out < min_held_out (their estimate is NaN).

    With the default `min_held_out=1` these are the examples with no in-run or no out-run. Warns
    (`UndefinedEstimateWarning`) when the count is > 0, with the count and how to fix it: with R
    models at subset ratio rho an example lacks an in- or out-run with probability
    rho^R + (1 - rho)^R, and has fewer than m out-runs with probability P[Binomial(R, 1 - rho) < m].
    """
    n_in = np.asarray(n_in)
    n_out = np.asarray(n_out)
    m = check_min_held_out(min_held_out)
    missing = ~reliable_examples(n_in, n_out, m)
    count = int(np.count_nonzero(missing))
    if count and warn:
        n_models = int(n_in.flat[0] + n_out.flat[0]) if n_in.size else 0
        if m == 1:
            detail = (f"have no in-run or no out-run among the {n_models} models "
                      f"({int(np.count_nonzero(n_in == 0))} never trained on, "
                      f"{int(np.count_nonzero(n_out == 0))} never held out)")
            fix = "Train more models (an example lacks one side with probability rho^R + (1-rho)^R)."
        else:
            detail = (f"have fewer than {m} models on a side among the {n_models} models "
                      f"({int(np.count_nonzero(n_in < m))} trained on by fewer, "
                      f"{int(np.count_nonzero(n_out < m))} held out by fewer; min_held_out = {m})")
            fix = "Train more models, or lower min_held_out (estimates from fewer models are noisy)."
        warnings.warn(
            f"{count} of {n_in.size} training examples {detail}; their {what} estimate is NaN. {fix}",
            UndefinedEstimateWarning,
            stacklevel=3,
        )
    return count


def subset_masks(n: int, ratio: float, n_models: int, seed0: int = 0, *,
                 warn: bool = True) -> SubsetMasks:
    """Random training subsets as in the original MNIST pipeline, one row per model.

    Model r trains on `np.random.RandomState(seed0 + r).choice(n, floor(ratio * n), replace=False)`
    (without replacement). Returns `SubsetMasks(masks (n_models, n) bool, seeds (n_models,),
    n_undefined)`, where n_undefined counts examples that no model trained on or that every model
    trained on (an `UndefinedEstimateWarning` is raised when it is > 0 and `warn`).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating, np.integer)):
        raise ConfigError(f"subset ratio: expected a number in (0, 1), got {ratio!r}")
    if not (0.0 < float(ratio) < 1.0):
        raise ConfigError(
            f"subset ratio: expected a number strictly between 0 and 1 (the fraction of training "
            f"examples each model sees; Feldman & Zhang 2020 use 0.7), got {ratio}"
        )
    n = int(n)
    n_models = int(n_models)
    if n < 2:
        raise ConfigError(f"n: expected at least 2 training examples, got {n}")
    if n_models < 1:
        raise ConfigError(f"n_models: expected at least 1 model, got {n_models}")
    size = subset_size(n, ratio)
    if size < 1:
        raise ConfigError(
            f"subset ratio {ratio} of {n} examples gives an empty subset; use a ratio >= {1 / n:.3g}"
        )
    seeds = np.arange(seed0, seed0 + n_models, dtype=np.int64)
    masks = np.zeros((n_models, n), dtype=bool)
    for r, seed in enumerate(seeds):
        masks[r, np.random.RandomState(int(seed)).choice(n, size, replace=False)] = True
    n_in = masks.sum(0)
    n_undefined = count_undefined(n_in, n_models - n_in, what="memorization/influence", warn=warn)
    return SubsetMasks(masks, seeds, n_undefined)


# --------------------------------------------------------------------------------------------
# memorization


def bootstrap_counts(n_models: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """How often each model appears in each bootstrap resample: (n_boot, n_models) int64.

    Row b is a multinomial draw of n_models models with replacement, from
    `np.random.default_rng(seed)`; resample b uses model r counts[b, r] times.
    """
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_models, np.full(n_models, 1.0 / n_models), size=n_boot).astype(np.int64)


def _difference_of_means(m: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
    """Columns of (R, n) masks m (bool) and values v: estimate, se, n_in, n_out (all (n,))."""
    n_models = m.shape[0]
    mf = m.astype(np.float64)
    vf = v.astype(np.float64)
    n_in = mf.sum(0)
    n_out = n_models - n_in
    sum_in = (mf * vf).sum(0)
    sum_out = vf.sum(0) - sum_in
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_in = sum_in / n_in
        mean_out = sum_out / n_out
        deviation = vf - np.where(m, mean_in, mean_out)
        squares = deviation * deviation
        ss_in = (mf * squares).sum(0)
        ss_out = squares.sum(0) - ss_in
        var_in = ss_in / (n_in - 1)
        var_out = ss_out / (n_out - 1)
        se = np.sqrt(var_in / n_in + var_out / n_out)
    defined = (n_in > 0) & (n_out > 0)
    estimate = np.where(defined, mean_in - mean_out, np.nan)
    se = np.where((n_in > 1) & (n_out > 1), se, np.nan)
    return estimate, se, n_in.astype(np.int64), n_out.astype(np.int64)


def memorization(masks: Any, correct_train: Any, *, bootstrap: int = 0, confidence: float = 0.95,
                 seed: int = 0, warn: bool = True, min_held_out: int = MIN_HELD_OUT) -> MemorizationEstimate:
    """Subsampled memorization mem(i) = mean_{r: i in S_r} c_r(i) - mean_{r: i notin S_r} c_r(i).

    masks: (R, N) bool, True where model r trained on example i. correct_train: (R, N) correctness
    (bool/0-1) or any per-example number (loss, margin). Returns a `MemorizationEstimate` with
    (N,) estimate and standard error sqrt(s_in^2/n_in + s_out^2/n_out) (ddof = 1), the counts, and,
    with `bootstrap = B > 0`, a percentile interval at level `confidence` from B resamples of the
    models with replacement (`bootstrap_counts(R, B, seed)`), computed as weighted means
    sum_r w_br m_ri c_ri / sum_r w_br m_ri, vectorized over resamples. Resamples in which example i
    has no in- or out-run are left out of its interval.

    Examples with fewer than `min_held_out` models on either side (n_in or n_out; default
    `MIN_HELD_OUT` = 3) get NaN estimate, SE and interval and `reliable` False (module docstring);
    `min_held_out=1` keeps every defined estimate.

    Example:
        >>> import numpy as np
        >>> masks = np.array([[1, 0], [0, 1], [1, 1], [0, 1]], bool)  # example 1: held out by 1 model
        >>> correct = np.array([[1, 0], [0, 1], [1, 1], [0, 1]], float)
        >>> memorization(masks, correct, min_held_out=1).estimate
        array([1., 1.])
        >>> memorization(masks, correct, min_held_out=2, warn=False).estimate
        array([ 1., nan])
    """
    min_held_out = check_min_held_out(min_held_out)
    m = _check_masks(masks)
    v = _check_values(correct_train, "correct_train", m.shape[0], m.shape[1])
    n_models, n = m.shape
    estimate = np.empty(n)
    se = np.empty(n)
    n_in = np.empty(n, dtype=np.int64)
    n_out = np.empty(n, dtype=np.int64)
    for block in _column_blocks(n, n_models):
        estimate[block], se[block], n_in[block], n_out[block] = _difference_of_means(m[:, block], v[:, block])
    count_undefined(n_in, n_out, what="memorization", warn=warn, min_held_out=min_held_out)
    interval = None
    if bootstrap:
        interval = _bootstrap_interval(m, v, int(bootstrap), confidence, seed)
    unreliable = ~reliable_examples(n_in, n_out, min_held_out)
    estimate[unreliable] = np.nan
    se[unreliable] = np.nan
    if interval is not None:
        interval[unreliable] = np.nan
    return MemorizationEstimate(estimate, se, n_in, n_out, interval, min_held_out)


def _bootstrap_interval(m: np.ndarray, v: np.ndarray, n_boot: int, confidence: float,
                        seed: int) -> np.ndarray:
    if n_boot < 2:
        raise ConfigError(f"bootstrap: expected at least 2 resamples, got {n_boot}")
    if not (0.0 < confidence < 1.0):
        raise ConfigError(f"confidence: expected a level in (0, 1), e.g. 0.95, got {confidence}")
    n_models, n = m.shape
    weights = bootstrap_counts(n_models, n_boot, seed).astype(np.float64)  # (B, R)
    total = weights.sum(1, keepdims=True)  # = R for every resample
    alpha = 1.0 - confidence
    interval = np.empty((n, 2))
    for block in _column_blocks(n, max(n_models, n_boot)):
        mf = m[:, block].astype(np.float64)
        vf = v[:, block].astype(np.float64)
        in_n = weights @ mf
        in_sum = weights @ (mf * vf)
        out_n = total - in_n
        out_sum = weights @ vf - in_sum
        with np.errstate(divide="ignore", invalid="ignore"):
            resampled = in_sum / in_n - out_sum / out_n
        resampled[(in_n == 0) | (out_n == 0)] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN
            interval[block] = np.nanquantile(resampled, [alpha / 2, 1 - alpha / 2], axis=0).T
    return interval


def memorization_by_number_of_models(masks: Any, correct_train: Any, n_models_grid: Any, *,
                                     min_held_out: int = MIN_HELD_OUT) -> np.ndarray:
    """mem(i) from the first R' models for each R' in `n_models_grid`: (len(grid), N) float64.

    Row k equals `memorization(masks[:R'_k], correct_train[:R'_k], min_held_out=...).estimate` (NaN
    where the first R'_k models give fewer than `min_held_out` in- or out-runs), computed with
    cumulative sums over models. For the convergence figure (memorization against the number of models).
    """
    min_held_out = check_min_held_out(min_held_out)
    m = _check_masks(masks)
    v = _check_values(correct_train, "correct_train", m.shape[0], m.shape[1])
    grid = np.asarray(n_models_grid, dtype=np.int64).reshape(-1)
    if grid.size == 0 or grid.min() < 1 or grid.max() > m.shape[0]:
        raise ConfigError(
            f"n_models_grid: expected model counts between 1 and {m.shape[0]}, got {grid.tolist()}"
        )
    n_models, n = m.shape
    out = np.empty((grid.size, n))
    for block in _column_blocks(n, n_models):
        mf = m[:, block].astype(np.float64)
        vf = v[:, block].astype(np.float64)
        in_n = np.cumsum(mf, 0)[grid - 1]
        in_sum = np.cumsum(mf * vf, 0)[grid - 1]
        all_sum = np.cumsum(vf, 0)[grid - 1]
        out_n = grid[:, None] - in_n
        with np.errstate(divide="ignore", invalid="ignore"):
            est = in_sum / in_n - (all_sum - in_sum) / out_n
        est[(in_n < min_held_out) | (out_n < min_held_out)] = np.nan
        out[:, block] = est
    return out


# --------------------------------------------------------------------------------------------
# influence


def _check_out(out: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise ConfigError(f"{name}: expected a numpy array or memmap of shape {shape}, got {type(out).__name__}")
    if out.shape != shape:
        raise ConfigError(f"{name}: expected shape {shape} (n_test, n_train), got {out.shape}")
    if not np.issubdtype(out.dtype, np.floating):
        raise ConfigError(f"{name}: expected a floating dtype (float16/32/64), got {out.dtype}")
    return out


def _top_k_rows(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest entries of each row, decreasing; NaN entries are never
    chosen: a row with fewer than k numbers ends with index -1 and value NaN."""
    negated = -values  # ascending order of -value = descending value
    negated[np.isnan(negated)] = np.inf
    if k < values.shape[1]:
        candidates = np.argpartition(negated, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(values.shape[1]), values.shape).copy()
    candidates.sort(axis=1)  # ties: lower training index first
    candidate_values = np.take_along_axis(negated, candidates, axis=1)
    order = np.argsort(candidate_values, axis=1, kind="stable")
    indices = np.take_along_axis(candidates, order, axis=1)
    chosen = np.take_along_axis(values, indices, axis=1)
    indices[np.isnan(chosen)] = -1
    return indices, chosen


def influence(masks: Any, correct_test: Any, *, block_size: int | None = None,
              out: np.ndarray | None = None, dtype: Any = np.float32, top_k: int | None = None,
              standard_error: bool = False, standard_error_out: np.ndarray | None = None,
              train_block_size: int = 16384, warn: bool = True,
              min_held_out: int = MIN_HELD_OUT) -> InfluenceEstimate:
    """Subsampled influence infl(i, j) = mean_{r: i in S_r} c_r(j) - mean_{r: i notin S_r} c_r(j).

    masks: (R, N) bool; correct_test: (R, M) correctness (or losses/margins) of each model on each
    test example. Output rows are test examples j, columns training examples i: an (M, N) matrix,
    as in the original. Computed block-wise: for a block of test rows J and of training columns I,

        S_in[J, I] = C[:, J]^T @ masks[:, I]               (sum over in-runs, one matrix product)
        S_out      = sum_r C[r, J] - S_in,   infl = S_in / n_in - S_out / n_out.

    0/1 inputs are multiplied in float32 (exact: integer sums below 2^24) and the scores formed in
    float32 unless `dtype` (or `out`) is float64; other values are handled in float64 after
    subtracting each test column's mean over models (infl and SE do not change). SEs are formed in
    float64. With
    `standard_error`, SE = sqrt(s_in^2/n_in + s_out^2/n_out) from a second product with C**2.

    Output, by option:
      - `out`: an (M, N) float array (e.g. `np.lib.format.open_memmap(path, "w+", float16, (M, N))`)
        filled block by block; otherwise a new array of `dtype` unless only `top_k` was asked.
      - `top_k`: per test example the k training examples with the largest influence (indices,
        values and, with `standard_error`, their SEs), never holding more than one block of rows.
      - `standard_error_out`: an (M, N) array for the full SE matrix (implies standard_error).
    block_size: test rows per block (default: about 2^23 elements per block).
    Columns of training examples with fewer than `min_held_out` in-runs or out-runs (default
    `MIN_HELD_OUT` = 3; 1: only those with none) are NaN, in `out` too, and never enter a top-k list
    (counted, see `count_undefined`; flagged by the result's `reliable`).
    """
    min_held_out = check_min_held_out(min_held_out)
    m = _check_masks(masks)
    c = _check_values(correct_test, "correct_test", m.shape[0])
    n_models, n_train = m.shape
    n_test = c.shape[1]
    if top_k is not None:
        top_k = int(top_k)
        if not (1 <= top_k <= n_train):
            raise ConfigError(f"top_k: expected 1 <= k <= n_train = {n_train}, got {top_k}")
    if standard_error_out is not None:
        standard_error = True
        standard_error_out = _check_out(standard_error_out, (n_test, n_train), "standard_error_out")
    if out is not None:
        out = _check_out(out, (n_test, n_train), "out")
    elif top_k is None:
        out = np.empty((n_test, n_train), dtype=dtype)
    se_full = standard_error_out
    if standard_error and se_full is None and top_k is None:
        se_full = np.empty((n_test, n_train), dtype=dtype)
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // max(n_train, 1))
    if int(block_size) < 1:
        raise ConfigError(f"block_size: expected a positive number of test rows, got {block_size}")
    block_size = int(block_size)

    n_in = m.sum(0).astype(np.int64)
    n_out = n_models - n_in
    count_undefined(n_in, n_out, what="influence", warn=warn, min_held_out=min_held_out)
    undefined = ~reliable_examples(n_in, n_out, min_held_out)
    se_undefined = undefined | (n_in < 2) | (n_out < 2)

    binary = _is_binary(c) and n_models < _FLOAT32_EXACT_COUNT
    if binary:
        compute = c.astype(np.float32)
    else:
        compute = c.astype(np.float64)
        compute -= compute.mean(0)
    product_dtype = compute.dtype
    squares = None if binary or not standard_error else compute * compute
    # Arithmetic after the products: float32 for 0/1 tables unless float64 output was asked for.
    wants_float64 = np.dtype(dtype) == np.float64 or (out is not None and out.dtype == np.float64)
    post = np.float32 if binary and not wants_float64 else np.float64
    with np.errstate(divide="ignore"):
        inv_in = np.where(undefined, 0.0, 1.0 / n_in).astype(post)
        inv_out = np.where(undefined, 0.0, 1.0 / n_out).astype(post)
    inv_sum = inv_in + inv_out
    n_in_f = n_in.astype(np.float64)
    n_out_f = n_out.astype(np.float64)

    top_indices = top_values = top_se = None
    if top_k is not None:
        top_indices = np.empty((n_test, top_k), dtype=np.int64)
        top_values = np.empty((n_test, top_k), dtype=np.float64)
        if standard_error:
            top_se = np.empty((n_test, top_k), dtype=np.float64)

    for start in range(0, n_test, block_size):
        rows = slice(start, min(start + block_size, n_test))
        c_rows = compute[:, rows]  # (R, b)
        total = c_rows.sum(0, dtype=np.float64)[:, None]
        total_post = total.astype(post)
        if standard_error:
            sq_rows = c_rows if binary else squares[:, rows]
            total_sq = sq_rows.sum(0, dtype=np.float64)[:, None]
        scores = np.empty((c_rows.shape[1], n_train), dtype=post)
        errors = np.empty((c_rows.shape[1], n_train)) if standard_error else None
        for cols in _column_blocks(n_train, n_models, train_block_size):
            mask_cols = m[:, cols].astype(product_dtype)
            s_in = c_rows.T @ mask_cols  # (b, n_cols): sum of c_r(j) over models that saw i
            # infl = s_in / n_in - (total - s_in) / n_out = s_in (1/n_in + 1/n_out) - total / n_out
            block = np.multiply(s_in, inv_sum[cols], out=scores[:, cols], dtype=post, casting="unsafe")
            block -= total_post * inv_out[cols]
            if standard_error:
                s_in64 = s_in.astype(np.float64)
                s_out = total - s_in64
                ni, no = n_in_f[cols], n_out_f[cols]
                q_in = s_in64 if binary else (sq_rows.T @ mask_cols).astype(np.float64)
                q_out = total_sq - q_in
                with np.errstate(divide="ignore", invalid="ignore"):
                    var_in = np.maximum(q_in - s_in64 * s_in64 / ni, 0.0) / (ni - 1)
                    var_out = np.maximum(q_out - s_out * s_out / no, 0.0) / (no - 1)
                    errors[:, cols] = np.sqrt(var_in / ni + var_out / no)
        scores[:, undefined] = np.nan
        if errors is not None:
            errors[:, se_undefined] = np.nan
        if out is not None:
            out[rows] = scores
        if se_full is not None:
            se_full[rows] = errors
        if top_k is not None:
            idx, vals = _top_k_rows(scores, top_k)
            top_indices[rows], top_values[rows] = idx, vals
            if top_se is not None:
                picked = np.take_along_axis(errors, np.maximum(idx, 0), axis=1)
                picked[idx < 0] = np.nan
                top_se[rows] = picked
    for array in (out, se_full):
        if array is not None and hasattr(array, "flush"):
            array.flush()
    return InfluenceEstimate(out, se_full, top_indices, top_values, top_se, n_in, n_out, min_held_out)


# --------------------------------------------------------------------------------------------
# consistency


def heldout_mean(masks: Any, values: Any) -> HeldoutMean:
    """mean_{r: i notin S_r} c_r(i) per example, SE = s_out / sqrt(n_out) (ddof = 1), and n_out.

    NaN estimate where n_out == 0, NaN SE where n_out < 2.
    """
    m = _check_masks(masks)
    v = _check_values(values, "values", m.shape[0], m.shape[1])
    n_models, n = m.shape
    estimate = np.empty(n)
    se = np.empty(n)
    n_out = np.empty(n, dtype=np.int64)
    for block in _column_blocks(n, n_models):
        out_f = (~m[:, block]).astype(np.float64)
        vf = v[:, block].astype(np.float64)
        count = out_f.sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = (out_f * vf).sum(0) / count
            deviation = vf - mean
            var = (out_f * deviation * deviation).sum(0) / (count - 1)
            se[block] = np.where(count > 1, np.sqrt(var / count), np.nan)
        estimate[block] = np.where(count > 0, mean, np.nan)
        n_out[block] = count.astype(np.int64)
    return HeldoutMean(estimate, se, n_out)


def consistency(masks_by_ratio: Mapping[float, tuple[Any, Any]], *, warn: bool = True,
                independent: bool = True) -> ConsistencyScores:
    """C-scores (Jiang et al. 2021): held-out accuracy per subset ratio, then the mean over ratios.

    masks_by_ratio: {ratio: (masks (R_k, N), correct (R_k, N))}, one entry per subset ratio (the
    number of models R_k may differ between ratios; N may not). Per ratio k,
    C_k(i) = mean_{r: i notin S_r} c_r(i) with SE_k(i) = s_out / sqrt(n_out); the aggregate is
    C(i) = (1 / K_i) sum_k C_k(i) over the K_i ratios at which i was held out at least once, with

        SE = sqrt(sum_k SE_k(i)^2) / K_i     independent=True: the ratios' runs are independent
        SE = (sum_k SE_k(i)) / K_i           independent=False: the bound that holds whatever the
                                             correlation between ratios (sd of a sum <= sum of sds),
                                             e.g. for `subset_jobs` farms, whose model r shares its
                                             seed and a nested subset across ratios.
    """
    if not isinstance(masks_by_ratio, Mapping) or not masks_by_ratio:
        raise ConfigError(
            "masks_by_ratio: expected a non-empty dict {subset_ratio: (masks, correct)}, got "
            f"{type(masks_by_ratio).__name__}"
        )
    per_ratio: dict[float, HeldoutMean] = {}
    n = None
    for ratio in sorted(masks_by_ratio):
        entry = masks_by_ratio[ratio]
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ConfigError(f"masks_by_ratio[{ratio}]: expected a pair (masks, correct)")
        result = heldout_mean(*entry)
        if n is not None and result.estimate.shape[0] != n:
            raise DataError(
                f"masks_by_ratio[{ratio}]: expected {n} training examples as at the other ratios, "
                f"got {result.estimate.shape[0]}"
            )
        n = result.estimate.shape[0]
        per_ratio[float(ratio)] = result
    estimates = np.stack([r.estimate for r in per_ratio.values()])  # (K, N)
    errors = np.stack([r.standard_error for r in per_ratio.values()])
    present = ~np.isnan(estimates)
    n_ratios = present.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(present, estimates, 0.0).sum(0) / n_ratios
        if independent:
            se = np.sqrt(np.where(present, errors * errors, 0.0).sum(0)) / n_ratios
        else:
            se = np.where(present, errors, 0.0).sum(0) / n_ratios
        se = np.where(np.any(present & np.isnan(errors), axis=0), np.nan, se)
    score = np.where(n_ratios > 0, score, np.nan)
    se = np.where(n_ratios > 0, se, np.nan)
    missing = int(np.count_nonzero(n_ratios == 0))
    if missing and warn:
        warnings.warn(
            f"{missing} of {n} training examples were never held out at any subset ratio; their "
            "consistency score is NaN. Train more models.",
            UndefinedEstimateWarning,
            stacklevel=2,
        )
    return ConsistencyScores(score, se, n_ratios.astype(np.int64), per_ratio)


def group_curves(
    per_ratio: Mapping[float, Any], groups: Mapping[str, Any]
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Held-out accuracy against subset ratio per group of examples (the C-score curves of Jiang et al. 2021).

    per_ratio: {ratio: (N,) held-out means C_k} (a `HeldoutMean` or an array; e.g.
    `ConsistencyScores.per_ratio`); groups: {name: indices or (N,) bool mask of the group's examples}.
    For every group G and ratio k (ratios in increasing order), over the examples i of G with a
    defined C_k(i) (n_k of them):

        mean_k = (1 / n_k) sum_i C_k(i),    se_k = sd_i(C_k(i)) / sqrt(n_k)   (ddof = 1; NaN if n_k < 2)

    Returns {name: (mean (K,), se (K,), n (K,))}; mean is NaN where n_k = 0.
    """
    ratios = sorted(per_ratio)
    if not ratios:
        raise ConfigError("group_curves: expected at least one subset ratio")
    table = np.stack([np.asarray(getattr(per_ratio[r], "estimate", per_ratio[r]), dtype=np.float64).reshape(-1)
                      for r in ratios])  # (K, N)
    n = table.shape[1]
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for name, members in groups.items():
        members = np.asarray(_to_numpy(members, f"groups[{name!r}]")).reshape(-1)
        if members.dtype == bool:
            if members.size != n:
                raise DataError(f"groups[{name!r}]: a mask of {members.size} entries for {n} examples")
            members = np.flatnonzero(members)
        elif members.size and (not np.issubdtype(members.dtype, np.integer) or members.min() < 0 or members.max() >= n):
            raise DataError(f"groups[{name!r}]: expected indices in [0, {n}) or an (N,) bool mask")
        block = table[:, members.astype(np.int64)]
        defined = ~np.isnan(block)
        count = defined.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(defined, block, 0.0).sum(1) / count
            dev = np.where(defined, block - mean[:, None], 0.0)
            se = np.sqrt((dev * dev).sum(1) / (count - 1) / count)
        out[str(name)] = (np.where(count > 0, mean, np.nan), np.where(count > 1, se, np.nan), count.astype(np.int64))
    return out


def quantile_groups(score: Any, n_groups: int = 4) -> dict[str, np.ndarray]:
    """The examples in `n_groups` equal-count bins of `score` (N,) (NaN left out), lowest first:
    {"C-score q1 (0.12-0.45)": indices, ...}; ties broken by index (a stable sort)."""
    values = np.asarray(_to_numpy(score, "score"), dtype=np.float64).reshape(-1)
    if int(n_groups) < 1:
        raise ConfigError(f"quantile_groups: n_groups must be >= 1, got {n_groups}")
    defined = np.flatnonzero(~np.isnan(values))
    ordered = defined[np.argsort(values[defined], kind="stable")]
    out = {}
    for q, part in enumerate(np.array_split(ordered, min(int(n_groups), max(len(ordered), 1))), start=1):
        if part.size:
            out[f"C-score q{q} ({values[part].min():.2f}-{values[part].max():.2f})"] = np.sort(part)
    return out


# --------------------------------------------------------------------------------------------
# selection and evaluation


def high_memorization(mem: Any, threshold: float = HIGH_MEMORIZATION_THRESHOLD) -> np.ndarray:
    """Indices of training examples with mem(i) >= threshold, in decreasing order of mem.

    Default 0.25: the memorized-example threshold attributed to Feldman & Zhang (2020) (see
    `HIGH_MEMORIZATION_THRESHOLD`; not verified against the paper's text here). NaN never selected.
    Accepts a `MemorizationEstimate` or an (N,) array.
    """
    values = mem.estimate if isinstance(mem, MemorizationEstimate) else _to_numpy(mem, "mem")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    selected = np.flatnonzero(np.where(np.isnan(values), False, values >= threshold))
    return selected[np.argsort(-values[selected], kind="stable")]


def high_influence_pairs(infl: Any, threshold: float = HIGH_INFLUENCE_THRESHOLD, *,
                         block_size: int | None = None) -> InfluencePairs:
    """Train/test pairs (j, i) with infl(i, j) >= threshold, in decreasing order of influence.

    Default 0.15: the high-influence threshold attributed to Feldman & Zhang (2020) (see
    `HIGH_INFLUENCE_THRESHOLD`; not verified against the paper's text here). `infl` is an (M, N)
    test x train array or memmap (scanned `block_size` rows at a time) or an `InfluenceEstimate`;
    from a top-k-only estimate only the stored k pairs per test example can be found.
    """
    if isinstance(infl, InfluenceEstimate):
        if infl.scores is None:
            rows, cols = np.nonzero(np.where(np.isnan(infl.top_values), False, infl.top_values >= threshold))
            test_index, train_index = rows, infl.top_indices[rows, cols]
            value = infl.top_values[rows, cols]
            order = np.lexsort((train_index, test_index, -value))
            return InfluencePairs(test_index[order].astype(np.int64), train_index[order].astype(np.int64),
                                  value[order].astype(np.float64))
        infl = infl.scores
    matrix = infl if isinstance(infl, np.ndarray) else _to_numpy(infl, "infl")
    if matrix.ndim != 2:
        raise DataError(f"infl: expected an (n_test, n_train) matrix, got shape {matrix.shape}")
    step = block_size or max(1, _BLOCK_ELEMENTS // max(matrix.shape[1], 1))
    tests, trains, values = [], [], []
    for start in range(0, matrix.shape[0], step):
        block = np.asarray(matrix[start:start + step], dtype=np.float64)
        rows, cols = np.nonzero(np.where(np.isnan(block), False, block >= threshold))
        tests.append(rows + start)
        trains.append(cols)
        values.append(block[rows, cols])
    test_index = np.concatenate(tests).astype(np.int64)
    train_index = np.concatenate(trains).astype(np.int64)
    value = np.concatenate(values)
    order = np.lexsort((train_index, test_index, -value))
    return InfluencePairs(test_index[order], train_index[order], value[order])


def auc_corrupted(mem: Any, corrupted_indices: Any) -> float:
    """ROC AUC of memorization as a score for "this training example's label was corrupted".

    Labels 1 for `corrupted_indices`, 0 for the other examples; AUC = P(mem of a random corrupted
    example > mem of a random clean one), ties counting 1/2 (sklearn `roc_auc_score`). Examples
    with NaN memorization are left out.
    """
    from sklearn.metrics import roc_auc_score

    values = mem.estimate if isinstance(mem, MemorizationEstimate) else _to_numpy(mem, "mem")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    idx = np.asarray(_to_numpy(corrupted_indices, "corrupted_indices")).reshape(-1)
    if idx.size == 0:
        idx = idx.astype(np.int64)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise DataError(f"corrupted_indices: expected integer indices, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= values.size):
        raise DataError(
            f"corrupted_indices: expected indices in [0, {values.size}), got range "
            f"[{idx.min()}, {idx.max()}]"
        )
    labels = np.zeros(values.size, dtype=bool)
    labels[idx] = True
    keep = ~np.isnan(values)
    if labels[keep].all() or not labels[keep].any():
        raise DataError(
            "auc_corrupted: need both corrupted and clean examples with a defined memorization; got "
            f"{int(labels[keep].sum())} corrupted and {int((~labels[keep]).sum())} clean"
        )
    return float(roc_auc_score(labels[keep], values[keep]))
