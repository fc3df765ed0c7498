"""Fixtures shared by every test file.

Every test starts from the same process state whatever ran before it (test order, `-n` workers): the
torch thread count and the global RNG seeds of torch, numpy and `random`. Two environment variables
change that state for the whole suite, to check that no test depends on it:
- MODELSENSE_TEST_THREADS (default 1): torch threads (`make test THREADS=2`, which also sets
  OMP_NUM_THREADS and MKL_NUM_THREADS): other sums in torch's and the BLAS's kernels.
- MODELSENSE_TEST_SEED (default 0): the global seeds: other random draws where a test takes them
  from the global generators.
"""

import os
import random

import numpy as np
import pytest
import torch

from modelsense.data import load_dataset
from modelsense.data.dataset import Dataset
from modelsense.models import build_model

TORCH_THREADS = int(os.environ.get("MODELSENSE_TEST_THREADS", "1"))
GLOBAL_SEED = int(os.environ.get("MODELSENSE_TEST_SEED", "0"))


def small_data(n: int = 120, d: int = 6, c: int = 3, seed: int = 0) -> Dataset:
    """A toy classification set: x ~ N(0, I_d), y = argmax(x W + 0.3 ε) for one W ~ N(0, 1)^(d x c), all drawn
    from `seed`; the first 90 examples train, the other n - 90 test."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, c, generator=g)
    y = (x @ w + 0.3 * torch.randn(n, c, generator=g)).argmax(1)
    return Dataset("toy", x[:90], y[:90], x[90:], y[90:], c)


def small_mlp(seed: int, d: int = 6, c: int = 3) -> torch.nn.Module:
    """An MLP d-16-c initialised from `seed` (the model for `small_data`)."""
    return build_model("mlp", (d,), c, widths=(16,), seed=seed)


class ReusedReLU(torch.nn.Module):
    """Linear(6, 6) and Linear(6, 3) with one `act` ReLU called twice per forward pass (before and after the
    first layer): a module whose output is not one tensor per pass, which feature probes must refuse."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.act = torch.nn.Linear(6, 6), torch.nn.Linear(6, 3), torch.nn.ReLU()

    def forward(self, x):
        return self.b(self.act(self.a(self.act(x))))


def loop_per_example_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, P): row i = the gradient of the cross-entropy of example i alone, by one backward pass per
    example (the slow, obvious reference for vmapped per-example gradients)."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def tiny_farm() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A synthetic farm: (masks (8, 5) bool, train correctness (8, 5), test correctness (8, 4)) of 8 models
    on 5 training and 4 test examples. Model 0 gets everything wrong, the others right.

    Example 0 is held out by model 0 only (n_out = 1) and example 4 trained on by 2 models (n_in = 2):
    both are below the default minimum of 3. Without the minimum, example 0 has memorization 1 and
    is the top influence (1.0) on every test example: one model's outcome.
    """
    masks = np.zeros((8, 5), dtype=bool)
    masks[1:, 0] = True
    masks[:4, 1] = True
    masks[[0, 2, 4, 6], 2] = True
    masks[[1, 2, 5, 6], 3] = True
    masks[[0, 1], 4] = True
    train = np.ones((8, 5))
    test = np.ones((8, 4))
    train[0] = test[0] = 0.0
    return masks, train, test


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(autouse=True)
def _same_start():
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(GLOBAL_SEED)
    np.random.seed(GLOBAL_SEED)
    random.seed(GLOBAL_SEED)
    yield
