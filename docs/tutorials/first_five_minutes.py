"""The first five minutes in Python: load data, train a model, score its training examples."""

import torch

from modelsense.attribution import make_attributor
from modelsense.data import load_dataset
from modelsense.models import build_model
from modelsense.progress import set_quiet
from modelsense.training import TrainConfig, fit

set_quiet(True)
torch.manual_seed(0)

# --8<-- [start:data]
# digits ships with scikit-learn: 8x8 images, 10 classes; flip 10% of the training labels
data = load_dataset("digits", n_train=300, corruption_ratio=0.1, seed=0)
print(data.x_train.shape, data.num_classes)
corrupted = data.metadata["corrupted_indices"]  # the labels that really changed
# --8<-- [end:data]

# --8<-- [start:train]
cfg = TrainConfig(optimizer="sgd", lr=0.1, epochs=10, bs=64, delta=1.0, seed=0)
model = build_model("mlp", data.input_shape, data.num_classes, widths=(32,), seed=0)
result = fit(model, data, cfg, progress=False)
print(f"test accuracy {result.final['test_accuracy']:.3f}")
# --8<-- [end:train]

# --8<-- [start:attribute]
att = make_attributor("if-ekfac", damping=0.1).fit(model, data.x_train, data.y_train)
scores = att.scores(data.x_test[:20], data.y_test[:20])  # (n_train, 20): > 0 = train example helps
self_influence = att.self_scores()                         # (n_train,)
top = self_influence.argsort(descending=True)[:30]
hits = len(set(top.tolist()) & set(corrupted.tolist()))
print(f"{hits} of the 30 highest self-influences are flipped labels ({len(corrupted)} flipped in all)")
# --8<-- [end:attribute]
