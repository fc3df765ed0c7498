import pytest
import torch

from modelsense.data import load_dataset


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield
