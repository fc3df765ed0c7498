"""Memorization: retrain many models on random subsets and compare in-subset and held-out accuracy."""

import numpy as np
import torch

from modelsense.data import load_dataset
from modelsense.memorization import auc_corrupted, influence, memorization, subset_masks
from modelsense.models import build_model
from modelsense.progress import set_quiet
from modelsense.training import TrainConfig, train_ensemble

set_quiet(True)
torch.manual_seed(0)

# --8<-- [start:farm]
data = load_dataset("digits", n_train=200, corruption_ratio=0.1, seed=0)
n_models = 24
# model r trains on RandomState(r).choice(N, floor(0.7 N)), Feldman & Zhang's sampling
masks = subset_masks(data.n_train, 0.7, n_models).masks                       # (24, 200) bool
cfg = TrainConfig(lr=0.1, epochs=50, bs=32, delta=0.01, seed=0)
runs = train_ensemble(lambda seed: build_model("mlp", data.input_shape, data.num_classes, widths=(64,), seed=seed),
                      data.x_train, data.y_train, torch.from_numpy(masks), cfg,
                      queries={"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)},
                      progress=False)                                          # 24 models at once (vmap)
correct_train = runs.outputs["train"]["correct"].numpy()                       # (24, 200)
correct_test = runs.outputs["test"]["correct"].numpy()                         # (24, 497)
print(f"train accuracy on the subsets {(correct_train * masks).sum() / masks.sum():.3f}")
# --8<-- [end:farm]

# --8<-- [start:estimates]
mem = memorization(masks, correct_train)         # mean over in-runs minus mean over held-out runs
print(f"mean memorization {np.nanmean(mem.estimate):.3f}; reliable estimates {mem.reliable.sum()} of {data.n_train}")
print(
    f"AUC of memorization for the flipped labels {auc_corrupted(mem.estimate, data.metadata['corrupted_indices']):.3f}"
)
infl = influence(masks, correct_test, top_k=3)   # (n_test, N) scores, here only the top 3 per test example
print("highest-influence training examples of test example 0:", infl.top_indices[0].tolist(),
      [round(float(v), 2) for v in infl.top_values[0]])
# --8<-- [end:estimates]

flipped = data.metadata["corrupted_indices"].numpy()
clean = np.setdiff1d(np.arange(data.n_train), flipped)
assert np.nanmean(mem.estimate[flipped]) > np.nanmean(mem.estimate[clean])
