"""Helpers shared by the tests (``from helpers import ...``; pytest puts tests/ on ``sys.path``).

- models and inputs: :class:`TinyCNN`, :func:`make_tiny_cnn`, :func:`make_images`, :data:`CLASS_NAMES`;
- named settings and tolerances: :data:`BLUR_AREA`, :data:`SHARP`, :data:`FAST_TOLERANCE`;
- running things: :func:`make_trainer`, :func:`write_cli_config`, :func:`load_script`, :func:`run_python`;
- checks: :func:`assert_masks_independent_of_the_batch`;
- the output store (tests/test_store_*.py): :func:`write`, :func:`shard_files`, :func:`temp_files`,
  :func:`sha256`, :data:`HASH`, :func:`read_only`.

Fixtures and pytest hooks live in conftest.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from torch import nn

REPO = Path(__file__).resolve().parents[1]
"""The repository's root."""

CLASS_NAMES = ["cat", "dog", "owl"]

# ----------------------------------------------------------------------------- named settings and tolerances

BLUR_AREA = dict(
    steps=300, l_pred=1.0, l_sparse=10.0, l_smooth=0.2, temperature=0.3, weight_limit=0.01, laplacian=3,
    laplacian_padding="replicate", sparsity_on="area", area_target=0.15, baseline="blur", optimizer="adam", lr=0.1,
    mask_scale=8,
)  # fmt: skip
"""Named settings used by the tests, over the `paper` preset: keep about 15 % of the pixels (``sparsity_on="area"``)
against a blurred baseline, with the mask learned at 1/8 of the image's resolution.

It keeps a fixed temperature (0.3), so float rounding is not amplified as at the default's final 0.01.
docs/results/SUMMARY.md lists the same settings as ``--set`` lines (tests/test_settings.py checks that they agree).
"""

SHARP = dict(
    steps=300, l_pred=1.0, l_sparse=2.0, l_smooth=0.05, temperature=0.05, weight_limit=0.01, laplacian=3,
    laplacian_padding="replicate", sparsity_on="mask", baseline="black", optimizer="adam", lr=0.1, mask_size=32,
)  # fmt: skip
"""Named settings used by the tests, over the `paper` preset: a low fixed temperature (0.05), so near-binary masks,
against a black baseline, the mask about 32 cells on its shorter side.

docs/results/SUMMARY.md lists the same settings as ``--set`` lines (tests/test_settings.py checks that they agree).
"""

FAST_TOLERANCE = 1e-3
"""Masks (in [0, 1]) of two runs that differ only in float32 arithmetic (the fast path against the plain one, the
fused Adam against the per-tensor one) agree within this, max abs, at a fixed temperature."""

# ----------------------------------------------------------------------------- models and inputs


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


# ----------------------------------------------------------------------------- running things


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


def load_script(name: str) -> ModuleType:
    """A file of the repository (``benchmarks/speed.py``; not a package) imported as a module, for its tests."""
    path = REPO / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    """``code`` in a new Python process that imports this repository's neuromask_pl; ``kwargs`` go to Popen."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, **kwargs)


# ----------------------------------------------------------------------------- checks


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


# ----------------------------------------------------------------------------- the output store (neuromask_pl.store)

HASH = "a" * 64
"""A well-formed SHA-256 hex digest (of nothing in particular)."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_files(root: Path) -> list[Path]:
    return sorted((root / "shards").glob("r*.npz"))


def temp_files(root: Path) -> list[Path]:
    return sorted(p for d in (root, root / "shards") if d.is_dir() for p in d.glob(".*.tmp"))


def write(root: Path, ids, rank: int = 0, chunk_size: int = 4, session: str = "s0", value=None, shape=(6, 5)):
    """Write masks ``np.full(shape, value or id)`` and rows {"v": id} for ``ids`` with a ShardWriter of ``rank``
    (``session`` is the writer's session token); returns the writer."""
    from neuromask_pl.store import ShardWriter

    with ShardWriter(root, rank, chunk_size=chunk_size, session=session) as writer:
        for i in ids:
            writer.add(i, np.full(shape, i if value is None else value, np.float16), {"v": i, "rank": rank})
    return writer


def read_only(monkeypatch, root: Path) -> None:
    """Make every write under ``root`` fail as on a read-only file system (EROFS), reads still work.

    Emulated at the Python level because tests may run as root, for whom a chmod changes nothing.
    """
    import builtins
    import errno
    import io

    inside = root.resolve()

    def guard(function, is_write=lambda *args, **kwargs: True):
        def call(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and is_write(path, *args, **kwargs):
                resolved = Path(os.path.abspath(path))
                if resolved == inside or inside in resolved.parents:
                    raise OSError(errno.EROFS, "Read-only file system", str(path))
            return function(path, *args, **kwargs)

        return call

    def opens_to_write(path, mode="r", *args, **kwargs):
        return any(c in mode for c in "wxa+")

    def os_open_writes(path, flags, *args, **kwargs):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    monkeypatch.setattr(builtins, "open", guard(builtins.open, opens_to_write))
    monkeypatch.setattr(io, "open", guard(io.open, opens_to_write))
    monkeypatch.setattr(os, "open", guard(os.open, os_open_writes))
    for name in ("mkdir", "unlink", "remove", "rename", "replace", "link", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


#: Marks a test of bit-for-bit batch invariance: skipped under SSE4.1 kernels (scripts/test.sh's third run), where the
#: fast-path report does not claim it (tests/fastcopy/test_invariant.py checks that).
needs_vector_kernels = pytest.mark.skipif(
    not torch.backends.cpu.get_cpu_capability().startswith("AVX"),
    reason="batch invariance is built for AVX2 and AVX-512 kernels; the fast-path report says so elsewhere",
)
