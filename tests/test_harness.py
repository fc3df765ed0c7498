"""The suite's own guarantees (tests/conftest.py): every test starts from the same process state."""

import random

import numpy as np
import pytest
import torch

from conftest import GLOBAL_SEED, TORCH_THREADS


@pytest.mark.parametrize("draws", [0, 5])
def test_every_test_starts_from_the_suite_seeds_and_threads(draws):
    """The second case runs after the first has drawn numbers and changed the threads: same start."""
    assert torch.get_num_threads() == TORCH_THREADS
    torch.testing.assert_close(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(GLOBAL_SEED)))
    assert np.random.random() == np.random.RandomState(GLOBAL_SEED).random_sample()
    assert random.random() == random.Random(GLOBAL_SEED).random()
    torch.rand(draws), np.random.random(draws), [random.random() for _ in range(draws)]
    torch.set_num_threads(TORCH_THREADS + 1)
