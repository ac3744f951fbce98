"""Shared test fixtures: a tiny seeded CNN with BatchNorm, seeded images and a quiet CPU Trainer."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from torch import nn

# The tests run thousands of tiny convolutions; on a small (2-core) machine that is busy with
# anything else, two intra-op threads make each of them ~100x slower than one thread does.
torch.set_num_threads(1)

CLASS_NAMES = ["cat", "dog", "owl"]

# Former presets, as settings over `paper` (docs/results/SUMMARY.md lists them as --set lines with their results).
# BLUR_AREA keeps a fixed temperature, so float rounding is not amplified as at the default's final 0.01.
BLUR_AREA = dict(
    steps=300, l_pred=1.0, l_sparse=10.0, l_smooth=0.2, temperature=0.3, weight_limit=0.01, laplacian=3,
    laplacian_padding="replicate", sparsity_on="area", area_target=0.15, baseline="blur", optimizer="adam", lr=0.1,
    mask_scale=8,
)  # fmt: skip
SHARP = dict(
    steps=300, l_pred=1.0, l_sparse=2.0, l_smooth=0.05, temperature=0.05, weight_limit=0.01, laplacian=3,
    laplacian_padding="replicate", sparsity_on="mask", baseline="black", optimizer="adam", lr=0.1, mask_size=32,
)  # fmt: skip

# Masks (in [0, 1]) of two runs that differ only in float32 arithmetic (the fast path against the plain one, the
# fused Adam against the per-tensor one) agree within this, max abs, at a fixed temperature.
FAST_TOLERANCE = 1e-3


class TinyCNN(nn.Module):
    """conv -> BatchNorm -> ReLU -> conv -> global average pool -> linear; takes B x 3 x H x W."""

    class_names = CLASS_NAMES

    def __init__(self, num_classes: int = len(CLASS_NAMES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_images(n: int, size: int = 16, seed: int = 0, channels: int = 3) -> torch.Tensor:
    """``n`` seeded images in [0, 1], n x channels x size x size: smooth colour fields plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return 0.75 * smooth + 0.25 * torch.rand(n, channels, size, size, generator=generator)


def make_tiny_cnn(seed: int = 0, num_classes: int = len(CLASS_NAMES)) -> TinyCNN:
    """A seeded TinyCNN, briefly trained to name each image's dominant colour, returned in eval mode.

    The training gives input-dependent, varied predictions (so masks have something to explain)
    and BatchNorm running statistics and ``num_batches_tracked`` that differ from their defaults.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyCNN(num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for step in range(40):
        images = make_images(16, size=12, seed=1000 * seed + 100 + step)
        labels = images.mean((2, 3)).argmax(1) % num_classes
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def load_script(name: str) -> ModuleType:
    """A file of the repository (``benchmarks/speed.py``; not a package) imported as a module, for its tests."""
    path = Path(__file__).resolve().parents[1] / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_masks_independent_of_the_batch(net: nn.Module, images: torch.Tensor, **options: Any) -> None:
    """Each image's mask is the same alone, in a batch and in a reordered batch (ids 7, 8, 9; target class 1).

    Callers use float64 models and images: at a final temperature of 0.01, float32 rounding differences between
    a batched and a single-image convolution would be amplified about 100x.
    """
    from neuromask_pl import NeuroMask

    def explain(batch: torch.Tensor, ids: list[int]) -> torch.Tensor:
        return NeuroMask(net, **options).explain(batch, targets=1, ids=torch.tensor(ids)).masks

    together = explain(images, [7, 8, 9])
    for k, sample_id in enumerate([7, 8, 9]):
        torch.testing.assert_close(explain(images[k : k + 1], [sample_id])[0], together[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(explain(images[[2, 0, 1]], [9, 7, 8]), together[[2, 0, 1]], rtol=1e-5, atol=1e-6)


RESNET18_CLASSIFIER = {
    "class_path": "neuromask_pl.classifiers.FactoryClassifier",
    "init_args": {"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}},
}


def write_cli_config(
    path: Path,
    images: Path,
    *,
    steps: int,
    image_size: int = 32,
    batch_size: int | None = None,
    classifier: dict[str, Any] = RESNET18_CLASSIFIER,
    preset: str = "default",
    trainer: dict[str, Any] | None = None,
    writer: dict[str, Any] | None = None,
) -> Path:
    """Write a ``neuromask-pl`` YAML config for a folder of images on a quiet single CPU and return its path."""
    data_args: dict[str, Any] = {"root": str(images), "image_size": image_size}
    if batch_size is not None:
        data_args["batch_size"] = batch_size
    config = {
        "seed_everything": 0,
        "model": {"classifier": classifier, "preset": preset, "steps": steps},
        "data": {"class_path": "neuromask_pl.data.ImageFolderDataModule", "init_args": data_args},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, **(trainer or {})},
        "writer": writer or {},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def make_trainer(package: Any = pl, **overrides: Any) -> pl.Trainer:
    """A quiet single-process CPU Trainer that NeuroMask can run under (inference_mode=False), of ``package``
    (``pytorch_lightning`` or ``lightning``); every test's Trainer comes from here, ``overrides`` set the rest."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    kwargs.update(overrides)
    return package.Trainer(**kwargs)


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    """A fresh seeded TinyCNN (3 classes, eval mode, BatchNorm with running statistics)."""
    return make_tiny_cnn(0)


@pytest.fixture
def cnn_factory() -> Callable[..., TinyCNN]:
    """:func:`make_tiny_cnn`, for tests that need several or differently seeded models."""
    return make_tiny_cnn


@pytest.fixture
def image_factory() -> Callable[..., torch.Tensor]:
    """:func:`make_images`."""
    return make_images


@pytest.fixture
def trainer_factory() -> Callable[..., pl.Trainer]:
    """:func:`make_trainer`."""
    return make_trainer


# The tests of numerics: .ci/run (scripts/test.sh) runs them a second time under another CPU's kernels
# (ATEN_CPU_CAPABILITY=avx2), so that a green CI means green on CPUs other than this one.
NUMERICS_FILES = {
    "test_golden_masks.py",
    "test_batch_invariance.py",
    "test_fused_step.py",
    "test_losses.py",
    "test_mask.py",
    "test_optimize.py",
    "test_fastpath.py",
    "test_module.py",
    "test_metrics.py",
    "test_bad_input.py",
    "test_upsample_planes.py",
    "test_lr_anneal.py",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in NUMERICS_FILES:
            item.add_marker(pytest.mark.numerics)
