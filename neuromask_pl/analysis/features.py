"""Masks as feature vectors: every mask averaged down to one ``grid x grid`` grid (any image size), read from a store
one mask at a time (numpy only)."""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neuromask_pl.store import StoredResults

ObjectMask = Callable[[int, dict[str, Any]], Any]
"""``truth(sample_id, row)``: where the object is in the sample, as an H x W bool array at the mask's size or a box
``(x0, y0, x1, y1)`` in mask pixels (``x1``, ``y1`` exclusive); None where it is not known."""


@functools.lru_cache(maxsize=64)
def area_weights(size: int, cells: int) -> np.ndarray:
    """The ``cells x size`` matrix that averages ``size`` pixels into ``cells`` equal cells: row ``i`` holds each
    pixel's overlap with cell ``i`` (a fraction where a pixel straddles two cells), divided by the cell's width."""
    edges = np.linspace(0.0, size, cells + 1)
    pixels = np.arange(size + 1, dtype=np.float64)
    lo = np.maximum(edges[:-1, None], pixels[None, :-1])
    hi = np.minimum(edges[1:, None], pixels[None, 1:])
    weights = np.clip(hi - lo, 0.0, None) / (size / cells)
    weights.flags.writeable = False
    return weights


def downsample(mask: np.ndarray, grid: int) -> np.ndarray:
    """The mean of ``mask`` (H x W) over each cell of a ``grid x grid`` grid: exact area averaging for any H and W
    (also H, W < grid), float32. Masks of every size become comparable vectors of ``grid * grid`` values."""
    if mask.ndim != 2 or min(mask.shape) < 1:
        raise ValueError(f"a mask must be a non-empty H x W array, got shape {mask.shape}")
    h, w = mask.shape
    if h % grid == 0 and w % grid == 0:  # the common case: block means, no matrix products
        return mask.reshape(grid, h // grid, grid, w // grid).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)
    small = area_weights(h, grid) @ mask.astype(np.float64) @ area_weights(w, grid).T
    return small.astype(np.float32)


@dataclass
class MaskTable:
    """The explained samples of a store, one row each, in id order: their downsampled masks and what the analysis
    needs of their manifest rows. Samples without a mask (skipped, failed) are counted in ``left_out``."""

    grid: int
    ids: np.ndarray  # int64 (n,)
    targets: np.ndarray  # int64 (n,): the explained class
    features: np.ndarray  # float32 (n, grid * grid): the downsampled masks
    area: np.ndarray  # float32 (n,): the mask's mean at full size
    preserved: np.ndarray  # float32 (n,): 1 kept the class, 0 did not, NaN unknown
    off_object: np.ndarray  # float32 (n,): the share of the mask's mass off the object, NaN without ground truth
    names: dict[int, str] = field(default_factory=dict)  # class index -> target_name
    paths: list[str] = field(default_factory=list)  # each sample's file ('' when none)
    overlays: list[str] = field(default_factory=list)  # each sample's overlay file ('' when none)
    shapes: Counter = field(default_factory=Counter)  # mask sizes seen, (H, W) -> count
    left_out: Counter = field(default_factory=Counter)  # reasons samples were left out -> count

    def __len__(self) -> int:
        return len(self.ids)


def _target(row: dict[str, Any]) -> int | None:
    value = row.get("target")
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _preserved(value: Any) -> float:
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, str) and value in ("True", "False"):
        return float(value == "True")
    return math.nan


def read_masks(results: StoredResults, grid: int = 16, truth: ObjectMask | None = None) -> MaskTable:
    """Read every mask of ``results`` once, in id order, into a :class:`MaskTable` (memory: ``4 * grid**2`` bytes a
    sample plus a few numbers; one full-size mask at a time).

    Samples are left out, and counted by reason, when their status is not ``ok``, they have no mask, no integer
    ``target``, or their mask holds NaN or values outside [0, 1].

    Args:
        results: an open store (:func:`neuromask_pl.store.load_results`).
        grid: side of the grid masks are averaged to.
        truth: where the object is in a sample (see :data:`ObjectMask`), for the share of mask mass off it.
    """
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an int >= 2, got {grid!r}")
    n = len(results)
    ids = np.empty(n, np.int64)
    targets = np.empty(n, np.int64)
    features = np.empty((n, grid * grid), np.float32)
    area, preserved, off_object = (np.full(n, np.nan, np.float32) for _ in range(3))
    names: dict[int, str] = {}
    paths: list[str] = []
    overlays: list[str] = []
    shapes: Counter = Counter()
    left_out: Counter = Counter()
    k = 0
    for sample_id, mask, row in results:
        status = row.get("status", "ok")
        target = _target(row)
        if status != "ok" or mask is None:
            left_out[f"status {status}" if status != "ok" else "no mask"] += 1
            continue
        if target is None:
            left_out["no integer target"] += 1
            continue
        if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
            left_out["mask not finite or outside [0, 1]"] += 1
            continue
        ids[k], targets[k] = sample_id, target
        features[k] = downsample(mask, grid).ravel()
        area[k] = mask.mean(dtype=np.float64)
        preserved[k] = _preserved(row.get("preserved"))
        if truth is not None:
            off_object[k] = _off_object(mask, truth(sample_id, row), sample_id)
        name = row.get("target_name")
        if name not in (None, "") and target not in names:
            names[target] = str(name)
        paths.append(str(row.get("path") or ""))
        overlays.append(str(row.get("overlay_file") or ""))
        shapes[mask.shape] += 1
        k += 1
    return MaskTable(
        grid, ids[:k], targets[:k], features[:k], area[:k], preserved[:k], off_object[:k],
        names, paths, overlays, shapes, left_out,
    )  # fmt: skip


def _off_object(mask: np.ndarray, where: Any, sample_id: int) -> float:
    if where is None:
        return math.nan
    if isinstance(where, (tuple, list)) and len(where) == 4:
        x0, y0, x1, y1 = (int(v) for v in where)
        obj = np.zeros(mask.shape, bool)
        obj[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    else:
        obj = np.asarray(where, dtype=bool)
    if obj.shape != mask.shape:
        warnings.warn(
            f"sample {sample_id}: its object mask is {obj.shape[::-1]} pixels, its mask {mask.shape[::-1]}; "
            "no off-object share for it (give the object where the mask is, at the mask's size)",
            stacklevel=3,
        )
        return math.nan
    total = float(mask.sum(dtype=np.float64))
    return math.nan if total <= 0 else float(mask[~obj].sum(dtype=np.float64)) / total
