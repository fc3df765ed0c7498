"""Self-influence-only baselines of the GEX paper: `loss` and `el2n`.

    loss   self_score(i) = l_i(θ*)                                   (the trained model's training loss)
    el2n   self_score(i) = (1/R) Σ_r || softmax(f(x_i; θ_r)) − onehot(y_i) ||₂
           over R models trained from scratch for a few epochs (Paul et al. 2021; the original's
           `el2n` sums the squared error over `--el2n_repeat` 5 models of `--el2n_epoch` 10 epochs)

Both rank examples like a self-influence (large = atypical or mislabeled); they have no pairwise
scores.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelsense.attribution.base import Attributor, ComputeOptions, check_int, register
from modelsense.errors import ConfigError


@register("loss")
class TrainingLoss(Attributor):
    """self_score(i) = l_i(θ*), the per-example training loss of the fitted model."""

    pairwise = False

    def __init__(self, *, loss: str = "cross_entropy", seed: int = 0, compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)

    def _self_scores(self) -> Tensor:
        return self._per_example_losses(self.params_, self.x_train_, self.y_train_).detach().cpu()


@register("el2n")
class El2n(Attributor):
    """EL2N: mean over `el2n_repeat` early-trained models of ||p_i − onehot(y_i)||₂.

    Settings: el2n_repeat R, el2n_epochs (epochs of each model; None: 10% of train_config.epochs,
    at least 1), train_config (`TrainConfig` of those models; default TrainConfig()), model_fn
    (seed -> fresh module; default: the fitted module re-initialised).
    """

    pairwise = False
    needs = frozenset({"recipe"})
    state_attributes = ("el2n_",)

    def __init__(self, el2n_repeat: int = 5, el2n_epochs: int | None = None, train_config=None,
                 model_fn: Callable[[int], nn.Module] | None = None, *, loss: str = "cross_entropy", seed: int = 0,
                 compute: ComputeOptions | None = None) -> None:
        super().__init__(loss=loss, seed=seed, compute=compute)
        self.el2n_repeat = check_int("el2n_repeat", el2n_repeat)
        self.el2n_epochs = check_int("el2n_epochs", el2n_epochs, allow_none=True)
        self.train_config, self.model_fn = train_config, model_fn

    def _fit(self) -> None:
        from dataclasses import replace

        from modelsense.attribution.members import reinitialised_copy
        from modelsense.training import TrainConfig, train_ensemble

        if self.model_.likelihood != "categorical":
            raise ConfigError("el2n needs a classification model (likelihood 'categorical')")
        base = self.train_config or TrainConfig()
        epochs = self.el2n_epochs or max(1, round(0.1 * base.epochs))
        cfg = replace(base, epochs=epochs, checkpoint_epochs=(), checkpoint_iterations=())
        module = self.model_.module
        model_fn = self.model_fn or (lambda s: reinitialised_copy(module, s))
        x, y = self.x_train_.cpu().float(), self.y_train_.cpu()
        masks = torch.ones(self.el2n_repeat, len(x), dtype=torch.bool)
        seeds = [base.seed + 5000 + self.seed * 7919 + r for r in range(self.el2n_repeat)]
        res = train_ensemble(model_fn, x, y, masks, cfg, seeds=seeds, queries={"train": (x, y)}, progress=self.compute.progress)
        logits = res.outputs["train"]["logits"]  # (R, N, C)
        err = torch.softmax(logits.double(), -1) - F.one_hot(y, logits.shape[-1]).double()
        self.el2n_ = err.norm(dim=-1).mean(0).to(next(iter(self.params_.values())).dtype)

    def _self_scores(self) -> Tensor:
        return self.el2n_.detach().cpu()
