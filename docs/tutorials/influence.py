"""Influence estimation: find flipped labels by self-influence, and compare methods on one model."""
# ruff: noqa: E402  (each snippet section shows the imports it needs)

import torch

from modelsense.attribution import make_attributor
from modelsense.attribution.evaluation import auc_ap
from modelsense.data import load_dataset
from modelsense.models import build_model
from modelsense.progress import set_quiet
from modelsense.training import TrainConfig, fit

set_quiet(True)
torch.manual_seed(0)

# --8<-- [start:train]
data = load_dataset("digits", n_train=400, corruption_ratio=0.1, seed=0)
corrupted = data.metadata["corrupted_indices"].numpy()
delta = 1.0
model = build_model("mlp", data.input_shape, data.num_classes, widths=(64,), seed=0)
fit(model, data, TrainConfig(lr=0.1, epochs=40, bs=64, delta=delta, seed=0), progress=False)
# --8<-- [end:train]

# --8<-- [start:self]
methods = {
    "loss": make_attributor("loss"),
    "grad-dot": make_attributor("grad-dot"),
    "if-ekfac": make_attributor("if-ekfac"),
    "gex": make_attributor("gex", num_ens=4, ft_step=50, delta=delta),  # the training's delta
}
for name, method in methods.items():
    self_influence = method.fit(model, data.x_train, data.y_train).self_scores().numpy()
    auc, ap = auc_ap(self_influence, corrupted)
    print(f"{name:>9}: AUC {auc:.3f}  AP {ap:.3f} of ranking the flipped labels first")
# --8<-- [end:self]

# --8<-- [start:pairwise]
# pairwise scores: (n_train, n_test); score(i, j) > 0: removing training example i raises test loss j
scores = methods["if-ekfac"].scores(data.x_test[:5], data.y_test[:5])
helpful = scores.argmax(0)   # the most helpful training example of each test example
print("most helpful training examples:", helpful.tolist(),
      "their labels:", data.y_train[helpful].tolist(), "test labels:", data.y_test[:5].tolist())
# --8<-- [end:pairwise]

# --8<-- [start:save]
import tempfile

from modelsense.attribution import load_attributor

with tempfile.TemporaryDirectory() as folder:
    methods["if-ekfac"].save(folder)          # factors, settings, model and data fingerprints
    again = load_attributor(folder, model, data.x_train, data.y_train)  # no refit
    assert torch.allclose(again.self_scores(), methods["if-ekfac"].self_scores())
# --8<-- [end:save]
