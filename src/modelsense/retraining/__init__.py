"""Ground truth by retraining: one store of retrained models' outputs (`store`: random subsets for
memorization and LDS, removals for pruning, ... keyed by recipe, example set and seed; local or Ray),
and the model zoo (`zoo`)."""

from modelsense.retraining.store import (
    BACKENDS,
    FarmError,
    GroundTruthStore,
    Job,
    RetrainOptions,
    RetrainRecipe,
    jobs_from,
    retrain,
    subset_jobs,
    subset_size,
    train_jobs,
)

__all__ = ["BACKENDS", "FarmError", "GroundTruthStore", "Job", "RetrainOptions", "RetrainRecipe", "jobs_from",
           "retrain", "subset_jobs", "subset_size", "train_jobs"]
