"""Fixtures shared by the kernel tests: a fresh seed per test and the device to use."""

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """Seed torch differently on every run; the seed is printed so a failure replays."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"torch seed: {seed}")
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def device() -> torch.device:
    """CUDA when present (compiled kernels), else the CPU (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
