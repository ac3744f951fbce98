"""The batch format: what a DataModule's batch holds and how NeuroMask reads it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None, list[str] | None, list]:
    """(images, labels, ids, paths, skipped) from a dict batch, an (images, labels) pair or a tensor.

    Dict batches from this package's DataModules carry sample ids; the other forms carry none
    (ids None): NeuroMask then numbers samples in arrival order, which is stable only
    without shuffling or sharding.
    """
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(f"a dict batch needs an 'image' entry, got keys {sorted(batch)}")
        return batch["image"], batch.get("label"), batch.get("index"), batch.get("path"), list(batch.get("skipped", []))
    if isinstance(batch, (list, tuple)):
        images, labels = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        images, labels = batch, None
    if not isinstance(images, Tensor):
        raise TypeError(f"batches must be dicts, (images, labels) pairs or image tensors, got {type(images).__name__}")
    return images, labels, None, None, []


def collate_samples(samples: list[dict[str, Any]], empty_image_shape: Sequence[int] = (3, 0, 0)) -> dict[str, Any]:
    """Stack samples into a batch; samples with an ``error`` go to ``batch["skipped"]``.

    Args:
        samples: dicts with ``index`` and ``image`` (or ``error``), optionally ``label`` and ``path``.
        empty_image_shape: C x H x W used for the (0, C, H, W) image tensor of an all-unreadable batch.

    Raises:
        ValueError: if the readable images do not all have the same shape.
    """
    good = [s for s in samples if "error" not in s]
    skipped = [
        {"index": int(s["index"]), "path": s.get("path", ""), "error": s["error"]} for s in samples if "error" in s
    ]
    for item in skipped:
        logger.warning("Skipping unreadable sample %d (%s): %s", item["index"], item["path"], item["error"])

    if good:
        shapes = sorted({tuple(s["image"].shape) for s in good})
        if len(shapes) > 1:
            raise ValueError(
                f"Images in one batch have different shapes {shapes}; set image_size to crop them to one "
                "size, or use batch_size=1."
            )
        image = torch.stack([s["image"] for s in good])
    else:
        image = torch.empty((0, *empty_image_shape), dtype=torch.float32)

    batch: dict[str, Any] = {
        "image": image,
        "index": torch.tensor([int(s["index"]) for s in good], dtype=torch.long),
    }
    if samples and "label" in samples[0]:
        batch["label"] = torch.tensor([int(s["label"]) for s in good], dtype=torch.long)
    if samples and "path" in samples[0]:
        batch["path"] = [s["path"] for s in good]
    batch["skipped"] = skipped
    return batch
