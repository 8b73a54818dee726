"""Shared fixtures: the real Fashion-MNIST (offline system copy) and small synthetic data."""
import pytest
import torch

from course_lib.data import load_splits, synthetic_dataset


@pytest.fixture(scope="session")
def fmnist():
    """The real Fashion-MNIST (train, test), from Debian's dataset-fashion-mnist package."""
    return load_splits("fashion-mnist", download=False)


@pytest.fixture(scope="session")
def toy():
    """A tiny learnable synthetic dataset (1x28x28, 10 classes)."""
    return synthetic_dataset(600, seed=0)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))
