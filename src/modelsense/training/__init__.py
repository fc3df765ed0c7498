"""Training: one model (`fit`) and many at once (`train_ensemble`, the retraining engine)."""

from modelsense.training.config import TrainConfig, cosine_lr, epoch_batches
from modelsense.training.ensemble import EnsembleResult, train_ensemble
from modelsense.training.fit import Fit, evaluate, fit

__all__ = ["TrainConfig", "cosine_lr", "epoch_batches", "EnsembleResult", "train_ensemble", "Fit", "evaluate", "fit"]
