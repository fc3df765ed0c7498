"""The per-example training loss: the likelihood's NLL, or the per-class sigmoid loss of the GEX code.

    cross_entropy   l_i = −log softmax(f(x_i))_{y_i}                 (categorical NLL; the default)
    sigmoid_bce     l_i = Σ_c BCE(sigmoid(f_c(x_i)), onehot(y_i)_c)
                        = Σ_c [softplus(f_c) − onehot(y_i)_c f_c]       (one Bernoulli per class, summed;
                          `problem_type=multitask` of Kim et al. 2023, the default of every GEX script)

Regression models (`gaussian` likelihood) have one loss, the squared error / 2, under `cross_entropy`
(the name means "the likelihood's NLL"). `fit`, the retraining engine and the attribution methods take
the loss from here, so a model trained with `sigmoid_bce` is retrained and scored with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from modelsense.core.functional import per_example_nll
from modelsense.errors import ConfigError

LOSSES = ("cross_entropy", "sigmoid_bce")


def check_loss(loss: str, likelihood: str = "categorical") -> str:
    """`loss` when it is one of LOSSES and fits the likelihood; ConfigError otherwise."""
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if loss == "sigmoid_bce" and likelihood != "categorical":
        raise ConfigError("loss 'sigmoid_bce' needs a classification model (likelihood 'categorical')")
    return loss


def per_example_loss(out: Tensor, y: Tensor, likelihood: str = "categorical", loss: str = "cross_entropy") -> Tensor:
    """The training loss of each example (n,) from the model's outputs `out` (n, C) and labels `y` (n,)."""
    if loss == "sigmoid_bce":
        # one-hot by comparison (F.one_hot checks its input's values, which vmap cannot)
        target = (y.long().unsqueeze(-1) == torch.arange(out.shape[-1], device=out.device)).to(out.dtype)
        return F.binary_cross_entropy_with_logits(out, target, reduction="none").sum(-1)
    if loss != "cross_entropy":
        raise ConfigError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    return per_example_nll(out, y, likelihood)


def class_probabilities(out: Tensor, loss: str = "cross_entropy") -> Tensor:
    """The per-class probabilities the loss models: softmax(f) (cross_entropy, rows sum to 1) or
    sigmoid(f) (sigmoid_bce: one probability per class, rows need not sum to 1)."""
    return out.sigmoid() if loss == "sigmoid_bce" else out.softmax(-1)


__all__ = ["LOSSES", "check_loss", "class_probabilities", "per_example_loss"]
