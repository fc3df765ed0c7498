"""Your own model and data: a factory function for each, named by `file.py:function`.

Run from the repository root (the paths below are relative to the current folder).
"""

import torch

from modelsense.attribution import make_attributor
from modelsense.data import load_dataset
from modelsense.models import build_model
from modelsense.progress import set_quiet
from modelsense.training import TrainConfig, fit

set_quiet(True)
torch.manual_seed(0)

# --8<-- [start:load]
# examples/my_data.py: make_data() -> (train, test) map-style datasets of (x, y)
data = load_dataset("examples/my_data.py:make_data")
print(data.name, tuple(data.x_train.shape), data.num_classes, "classes")
# examples/my_model.py: make_model(input_shape=..., num_classes=...) -> nn.Module
model = build_model("examples/my_model.py:make_model", data.input_shape, data.num_classes, seed=0)
print(model)
# --8<-- [end:load]

# --8<-- [start:use]
result = fit(model, data, TrainConfig(lr=0.05, epochs=30, bs=16, delta=1.0, seed=0), progress=False)
print(f"test accuracy {result.final['test_accuracy']:.3f}")
# the LayerNorm is no layer K-FAC knows: its parameters get an exact or diagonal block
att = make_attributor("if-ekfac").fit(model, data.x_train, data.y_train)
print("most self-influential training examples:", att.self_scores().argsort(descending=True)[:5].tolist())
# --8<-- [end:use]
