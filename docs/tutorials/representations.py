"""Representations: compare two networks layer by layer, up to the symmetries of ReLU networks."""

import torch

from modelsense.data import load_dataset
from modelsense.models import build_model
from modelsense.progress import set_quiet
from modelsense.representations import (
    StitchConfig,
    evaluate_accuracy,
    extract_features,
    linear_cka,
    relu_cka,
    relu_procrustes_similarity,
    stitch_models,
)
from modelsense.training import TrainConfig, fit

set_quiet(True)
torch.manual_seed(0)

# --8<-- [start:features]
data = load_dataset("digits", n_train=400, seed=0)
nets = []
for seed in (0, 1):  # two runs of one recipe that differ only in the seed
    net = build_model("mlp", data.input_shape, data.num_classes, widths=(32, 32), seed=seed)
    fit(net, data, TrainConfig(lr=0.1, epochs=20, bs=64, delta=1.0, seed=seed), progress=False)
    nets.append(net)
features = [extract_features(net, data.x_test) for net in nets]  # every nn.ReLU: name -> (n_test, width)
print("layers:", list(features[0]))
# --8<-- [end:features]

# --8<-- [start:invariance]
# permute and positively rescale the hidden units: a G_ReLU symmetry, the function is unchanged
a = features[0]["act1"]
moved = a[:, torch.randperm(a.shape[1])] * torch.rand(a.shape[1]).add(0.5)
print(f"same network, units permuted and rescaled: linear CKA {linear_cka(a, moved):.3f}, "
      f"G_ReLU-CKA {relu_cka(a, moved):.3f}, G_ReLU-Procrustes {relu_procrustes_similarity(a, moved):.3f}")
# --8<-- [end:invariance]

# --8<-- [start:compare]
for layer in features[0]:
    x, y = features[0][layer], features[1][layer]
    print(f"{layer}: seed 0 vs 1: linear CKA {linear_cka(x, y):.3f}, G_ReLU-CKA {relu_cka(x, y):.3f}, "
          f"G_ReLU-Procrustes {relu_procrustes_similarity(x, y):.3f}")
# --8<-- [end:compare]

# --8<-- [start:stitch]
# train only a linear map from net 0's first ReLU layer into net 1 (both frozen)
stitched, _ = stitch_models(nets[0], nets[1], "act1", data.x_train, data.y_train,
                            StitchConfig(kind="linear", epochs=5, lr=1e-2))
print(f"stitched accuracy {evaluate_accuracy(stitched, data.x_test, data.y_test):.3f}, "
      f"net 1 alone {evaluate_accuracy(nets[1], data.x_test, data.y_test):.3f}")
# --8<-- [end:stitch]

assert abs(relu_cka(a, moved) - 1) < 1e-4 and abs(relu_procrustes_similarity(a, moved) - 1) < 1e-4
