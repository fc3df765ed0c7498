"""Held-out subsample estimation (Feldman & Zhang 2020; Jiang et al. 2021).

`estimators`: memorization, influence and consistency scores from (R, N) subset masks and
per-model correctness tables, with standard errors and bootstrap intervals. `evaluation` (`evaluate_farm`): all of
them for one farm at once, as `modelsense memorization` reports them. `store`: a reader for the released runs of
Feldman & Zhang 2020. `verify`: a checkpoint's accuracy and per-example correctness against a record.
`plots` (imported on demand, it loads matplotlib): figures from those arrays.
"""

from modelsense.memorization.estimators import (
    HIGH_INFLUENCE_THRESHOLD,
    HIGH_MEMORIZATION_THRESHOLD,
    MIN_HELD_OUT,
    ConsistencyScores,
    HeldoutMean,
    InfluenceEstimate,
    InfluencePairs,
    MemorizationEstimate,
    SubsetMasks,
    UndefinedEstimateWarning,
    auc_corrupted,
    bootstrap_counts,
    check_min_held_out,
    consistency,
    count_undefined,
    group_curves,
    heldout_mean,
    high_influence_pairs,
    high_memorization,
    influence,
    memorization,
    memorization_by_number_of_models,
    quantile_groups,
    reliable_examples,
    subset_masks,
    subset_size,
)
from modelsense.memorization.store import (
    OriginalRuns,
    open_influence_memmap,
    read_original_runs,
    read_recorded_correctness,
)

__all__ = [
    "HIGH_INFLUENCE_THRESHOLD",
    "HIGH_MEMORIZATION_THRESHOLD",
    "MIN_HELD_OUT",
    "ConsistencyScores",
    "HeldoutMean",
    "InfluenceEstimate",
    "InfluencePairs",
    "MemorizationEstimate",
    "OriginalRuns",
    "SubsetMasks",
    "UndefinedEstimateWarning",
    "auc_corrupted",
    "bootstrap_counts",
    "check_min_held_out",
    "consistency",
    "count_undefined",
    "group_curves",
    "heldout_mean",
    "high_influence_pairs",
    "high_memorization",
    "influence",
    "memorization",
    "memorization_by_number_of_models",
    "open_influence_memmap",
    "quantile_groups",
    "read_original_runs",
    "read_recorded_correctness",
    "reliable_examples",
    "subset_masks",
    "subset_size",
]
