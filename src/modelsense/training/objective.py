"""The per-example training loss: the likelihood's NLL, or the per-class sigmoid loss of the GEX code.

    cross_entropy   l_i = −log softmax(f(x_i))_{y_i}                 (categorical NLL; the default)
    sigmoid_bce     l_i = Σ_c BCE(sigmoid(f_c(x_i)), onehot(y_i)_c)
                        = Σ_c [softplus(f_c) − onehot(y_i)_c f_c]       (one Bernoulli per class, summed;
                          `problem_type=multitask` of Kim et al. 2023, the default of every GEX script)

Regression models (`gaussian` likelihood) have one loss, the squared error / 2, under `cross_entropy`
(the name means "the likelihood's NLL"). The maths of each is one likelihood object,
`core.likelihood.likelihood_for(likelihood, loss)` (`nll`, `mean` = the class probabilities, output-space
derivatives); `fit`, the retraining engine and the attribution methods (`FunctionalModel.with_loss`) take
the loss from there, so a model trained with `sigmoid_bce` is retrained and scored with it.
"""

from __future__ import annotations

from modelsense.core.likelihood import LOSSES, likelihood_for


def check_loss(loss: str, likelihood: str = "categorical") -> str:
    """`loss` when it is one of LOSSES and fits the likelihood; ConfigError otherwise."""
    likelihood_for(likelihood, loss)
    return loss


__all__ = ["LOSSES", "check_loss"]
