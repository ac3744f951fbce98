"""Stores of generated masks with known strategies, to test the analysis and measure it at scale: every class looks
at an object (a blob that moves from image to image), and in a planted share of some classes' images the mask also
keeps a cue (a corner mark or a frame), as a classifier taking a shortcut would."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from neuromask_pl.store import ShardWriter, merge_index, open_store

CUES = ("corner", "frame")


def object_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A soft blob (an object's mask) of random radius at a random place away from the border."""
    radius = rng.uniform(0.12, 0.2) * size
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    y, x = np.mgrid[0:size, 0:size]
    d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    return np.clip((radius - d) / 2.0 + 0.5, 0.0, 1.0)


def cue_mask(cue: str, size: int) -> np.ndarray:
    """Where a cue lies: ``corner`` (a square of 1/8 of the side in the top-left corner) or ``frame`` (a ring
    1/16 of the side wide)."""
    mask = np.zeros((size, size))
    if cue == "corner":
        side = max(2, size // 8)
        mask[:side, :side] = 1.0
    elif cue == "frame":
        width = max(1, size // 16)
        mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = 1.0, 1.0, 1.0, 1.0
    else:
        raise ValueError(f"cue must be one of {CUES}, got {cue!r}")
    return mask


def write_synthetic_store(
    root: str | os.PathLike[str],
    classes: int,
    per_class: int,
    size: int = 32,
    planted: dict[int, tuple[str, float]] | None = None,
    seed: int = 0,
    chunk_size: int = 256,
) -> dict[int, np.ndarray]:
    """Write a complete store of ``classes x per_class`` generated masks (``size x size``) at ``root``, rows with
    ``target``, ``target_name`` (``class <k>``), ``status`` ``ok``, ``mask_area`` and ``preserved``, and merge its
    index. ``planted`` maps a class to its cue and the share of its images that carry it.

    Returns the ids of the cue images of each planted class.
    """
    planted = planted or {}
    rng = np.random.default_rng(seed)
    open_store(root, {"synthetic": {"classes": classes, "per_class": per_class, "size": size, "seed": seed}})
    cue_ids: dict[int, list[int]] = {c: [] for c in planted}
    with ShardWriter(root, 0, chunk_size=chunk_size) as writer:
        for target in range(classes):
            cue, share = planted.get(target, (None, 0.0))
            with_cue = set(rng.permutation(per_class)[: round(share * per_class)].tolist()) if cue else set()
            for i in range(per_class):
                sample_id = target * per_class + i
                mask = object_mask(rng, size)
                if i in with_cue:
                    mask = np.maximum(mask, cue_mask(cue, size))
                    cue_ids[target].append(sample_id)
                row = {
                    "status": "ok",
                    "target": target,
                    "target_name": f"class {target}",
                    "mask_area": float(mask.mean()),
                    "preserved": True,
                }
                writer.add(sample_id, mask.astype(np.float16), row)
    merge_index(Path(root))
    return {c: np.array(ids, np.int64) for c, ids in cue_ids.items()}
