"""A dataset of your own for modelsense: `--dataset examples/my_data.py:make_data`.

modelsense calls `make_data()` and expects a `(train, test)` pair of map-style datasets (anything with
`len()` and `[i]`, e.g. `torch.utils.data.TensorDataset`) whose items are `(x, y)`: one example's
input and its integer class label 0..C-1. Here: scikit-learn's wine recognition data (bundled with
scikit-learn; 13 chemical measurements on scales from 0.1 to 1000, 3 cultivars), split 70/30. Feature
vectors are standardised by default with the training set's statistics (`--no-standardize` keeps them).
"""

import numpy as np
import torch
from sklearn.datasets import load_wine
from torch.utils.data import TensorDataset


def make_data():
    x, y = load_wine(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = torch.tensor(x[order], dtype=torch.float32), torch.tensor(y[order])
    cut = int(0.7 * len(y))
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])
