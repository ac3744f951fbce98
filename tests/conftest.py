"""Fixtures and settings for all tests: a tiny seeded CNN with BatchNorm, seeded images and a quiet CPU Trainer.

The helpers behind them (and the others the tests share) live in helpers.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import pytorch_lightning as pl
import torch
from helpers import TinyCNN, make_images, make_tiny_cnn, make_trainer

# The tests run thousands of tiny convolutions; on a small (2-core) machine that is busy with
# anything else, two intra-op threads make each of them ~100x slower than one thread does.
torch.set_num_threads(1)


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    """A fresh seeded TinyCNN (3 classes, eval mode, BatchNorm with running statistics)."""
    return make_tiny_cnn(0)


@pytest.fixture
def cnn_factory() -> Callable[..., TinyCNN]:
    """:func:`helpers.make_tiny_cnn`, for tests that need several or differently seeded models."""
    return make_tiny_cnn


@pytest.fixture
def image_factory() -> Callable[..., torch.Tensor]:
    """:func:`helpers.make_images`."""
    return make_images


@pytest.fixture
def trainer_factory() -> Callable[..., pl.Trainer]:
    """:func:`helpers.make_trainer`."""
    return make_trainer
