"""Ground truth by retraining: random-subset farms (memorization, influence, consistency, LDS)."""

from modelsense.retraining.farm import BACKENDS, FarmError, FarmSpec, model_masks, run_farm, train_chunk

__all__ = ["BACKENDS", "FarmError", "FarmSpec", "model_masks", "run_farm", "train_chunk"]
