"""Ground truth by retraining: one store of retrained models' outputs (`store`: random subsets for
memorization and LDS, removals for pruning, ... keyed by recipe, example set and seed; local or Ray),
and the model zoo (`zoo`), whose members are jobs of that store kept with their parameters."""

from modelsense.retraining.store import (
    BACKENDS,
    FarmError,
    GroundTruthStore,
    Job,
    RetrainOptions,
    RetrainRecipe,
    job_parameters,
    jobs_from,
    retrain,
    subset_jobs,
    subset_size,
    train_jobs,
)

__all__ = ["BACKENDS", "FarmError", "GroundTruthStore", "Job", "RetrainOptions", "RetrainRecipe", "job_parameters",
           "jobs_from", "retrain", "subset_jobs", "subset_size", "train_jobs"]
