"""Memory perturbation: leave-one-out predictions of a trained model without retraining it."""

import torch

from modelsense.core.functional import FunctionalModel
from modelsense.data import load_dataset
from modelsense.models import build_model
from modelsense.mpe import MPESettings, build_posterior, mpe_scores
from modelsense.mpe.ground_truth import refit_without_lbfgs
from modelsense.progress import set_quiet
from modelsense.training import TrainConfig, fit

set_quiet(True)
torch.manual_seed(0)

# --8<-- [start:train]
# multinomial logistic regression (a convex objective: its leave-one-out refit is unique)
data = load_dataset("digits", n_train=200, seed=0)
delta = 1.0  # prior precision: the objective is mean loss + delta / (2N) ||theta||^2
model = build_model("linear", data.input_shape, data.num_classes, seed=0)
fit(model, data, TrainConfig(optimizer="sgd", lr=0.1, epochs=30, bs=50, delta=delta, seed=0), progress=False)
# --8<-- [end:train]

# --8<-- [start:refit]
# the trained parameters polished to the exact optimum of the summed objective (float64)
model = model.double()
x, y = data.x_train.double(), data.y_train
theta = {k: v.detach() for k, v in model.named_parameters()}
optimum, _ = refit_without_lbfgs(model, x, y, [torch.tensor([], dtype=torch.long)], delta, theta)
with torch.no_grad():
    for name, p in model.named_parameters():
        p.copy_(optimum[name][0])
# --8<-- [end:refit]

# --8<-- [start:mpe]
# Laplace posterior with the full GGN of the summed loss, precision K + delta I
posterior = build_posterior("laplace", FunctionalModel(model), x, y, prior_precision=delta, structure="full")
estimate = {v: mpe_scores(posterior, x, y, MPESettings(variant=v)) for v in ("diag", "full", "loo")}
print(f"estimated LOO-CV NLL (loo variant) {estimate['loo'].estimated_loo_nll:.4f}")
# --8<-- [end:mpe]

# --8<-- [start:truth]
# ground truth: refit without each of 8 examples, to convergence
removed = torch.arange(8)
theta = {k: v.detach() for k, v in model.named_parameters()}
refits, _ = refit_without_lbfgs(model, x, y, [i.view(1) for i in removed], delta, theta)
true_shift = torch.stack([torch.func.functional_call(model, {k: v[m] for k, v in refits.items()}, x[i:i + 1])[0]
                          for m, i in enumerate(removed)]) - estimate["loo"].logits[removed]
for v, result in estimate.items():
    error = (result.shift[removed] - true_shift).norm() / true_shift.norm()
    print(f"{v:>4}: relative error of the LOO logit shift {error:.3f}")
# --8<-- [end:truth]

errors = {v: float((r.shift[removed] - true_shift).norm() / true_shift.norm()) for v, r in estimate.items()}
assert errors["loo"] < errors["full"] < errors["diag"], errors
