"""What a cluster of masks says, as pure functions of downsampled masks: where its mass lies (corners, border,
centre, centre of mass), how concentrated and how tight it is, how far it sits from the rest of its class, and the
shortcut suspicion score that ranks clusters over a dataset."""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import maximum_filter

MIN_SUPPORT = 5
"""A cluster needs this many images for full suspicion: fewer are scaled down (``size / MIN_SUPPORT``), so that a
lone odd mask does not outrank a strategy that several images share."""


def regions(grid: int) -> dict[str, np.ndarray]:
    """Bool ``grid x grid`` masks of the image's regions: ``corners`` (the four ``grid/4``-cell squares in the
    corners), ``border`` (the outer ring, ``grid/8`` cells wide) and ``centre`` (the middle half of each side)."""
    corner, ring, quarter = max(1, grid // 4), max(1, grid // 8), grid // 4
    corners = np.zeros((grid, grid), bool)
    for rows in (slice(0, corner), slice(grid - corner, grid)):
        for cols in (slice(0, corner), slice(grid - corner, grid)):
            corners[rows, cols] = True
    border = np.ones((grid, grid), bool)
    border[ring : grid - ring, ring : grid - ring] = False
    centre = np.zeros((grid, grid), bool)
    centre[quarter : grid - quarter, quarter : grid - quarter] = True
    return {"corners": corners, "border": border, "centre": centre}


def distribution(mask: np.ndarray) -> np.ndarray:
    """``mask`` (any shape, >= 0) as a distribution of mass over its cells (uniform for an all-zero mask)."""
    mask = np.asarray(mask, dtype=np.float64).ravel()
    total = mask.sum()
    return mask / total if total > 0 else np.full(mask.size, 1.0 / mask.size)


def mass_shares(mean_mask: np.ndarray) -> dict[str, float]:
    """The share of ``mean_mask``'s (``grid x grid``) mass in each of :func:`regions`, and its centre of mass
    (``centre_x``, ``centre_y`` in [0, 1], 0 = left / top)."""
    grid = mean_mask.shape[0]
    p = distribution(mean_mask).reshape(grid, grid)
    shares = {f"mass_{name}": float(p[where].sum()) for name, where in regions(grid).items()}
    axis = (np.arange(grid) + 0.5) / grid
    shares["centre_x"] = float((p.sum(axis=0) * axis).sum())
    shares["centre_y"] = float((p.sum(axis=1) * axis).sum())
    return shares


def concentration(mean_mask: np.ndarray) -> float:
    """1 - the normalised entropy of the mask's mass: 0 spread evenly over the image, 1 all in one cell."""
    p = distribution(mean_mask)
    p = p[p > 0]
    return float(1.0 - (-(p * np.log(p)).sum()) / math.log(mean_mask.size)) if mean_mask.size > 1 else 1.0


def total_variation(a: np.ndarray, b: np.ndarray) -> float:
    """Half the L1 distance between the mass distributions of two masks: the share of mass that lies elsewhere
    (0 same places, 1 disjoint)."""
    return float(0.5 * np.abs(distribution(a) - distribution(b)).sum())


SEPARATION = 2.0
"""A cell belongs to a cluster alone when its members' values there stand this many standard deviations (the
cluster's plus the rest's) above the rest of the class's: counted fully by :func:`distinct_mass`, less below it."""

NEAR = 1
"""Cells this close (in grid cells, each way) count as the same place in :func:`distinct_mass`: an object found a
cell further along is not a place of its own."""

NOISE_FLOOR = 0.05
"""Added to the standard deviations in :func:`distinct_mass`: differences of mean masks under about a tenth never
count fully, however alike the masks."""


def distinct_mass(cluster: np.ndarray, rest: np.ndarray, grid: int | None = None, reach: int = NEAR) -> float:
    """The share of a cluster's mass in cells that are its own, in [0, 1]: each cell's mean weighted by
    ``min(1, t / SEPARATION)``, ``t = (c - r) / (s_c + s_r + NOISE_FLOOR)`` where ``c``, ``r`` are the cell's mean over
    the cluster's masks (rows of ``cluster``) and over the rest of the class (rows of ``rest``), ``s`` their standard
    deviations.

    A cue at a fixed place that every member keeps (``s_c`` near 0) and the rest never does counts fully, even when it
    is faint after averaging to the grid; a place members keep only now and then (an object found at many places: values
    0 or 1, a large ``s_c``) counts little. So a split of a class by where its object happens to be scores low, and a
    fixed cue high."""
    cluster = np.asarray(cluster, dtype=np.float64)
    rest = np.asarray(rest, dtype=np.float64)
    c, r = cluster.mean(axis=0), rest.mean(axis=0)
    if grid is not None and reach > 0:  # what the rest keeps near a cell counts as kept there
        r = maximum_filter(r.reshape(grid, grid), size=2 * reach + 1, mode="nearest").ravel()
    t = (c - r) / (cluster.std(axis=0) + rest.std(axis=0) + NOISE_FLOOR)
    total = c.sum()
    return float((c * np.clip(t / SEPARATION, 0.0, 1.0)).sum() / total) if total > 0 else 0.0


def spread(features: np.ndarray) -> float:
    """The mean distance of the rows to their mean, per cell (root mean square): 0 for identical masks."""
    if len(features) == 0:
        return 0.0
    centre = features.mean(axis=0, dtype=np.float64)
    return float(np.sqrt(((features - centre) ** 2).mean(axis=1)).mean())


def suspicion(share: float, offness: float, own_spread: float, rest_spread: float, size: int) -> float:
    """The shortcut suspicion of a cluster, in [0, 1]: ``offness x (1 - share) x tightness x support``.

    - ``offness``: :func:`distinct_mass` of the cluster against the rest of its class (where its members look, all
      of them, that the rest does not);
    - ``1 - share``: small clusters first (a class's only cluster scores 0: nothing to compare it with);
    - tightness: ``min(1, rest_spread / own_spread)``, 1 when the cluster is at least as tight as the rest;
    - support: ``min(1, size / MIN_SUPPORT)``.
    """
    if share >= 1.0:
        return 0.0
    tightness = 1.0 if own_spread <= 0 else min(1.0, rest_spread / own_spread)
    support = min(1.0, size / MIN_SUPPORT)
    return float(offness * (1.0 - share) * tightness * support)


def nearest_to_centre(features: np.ndarray, count: int) -> np.ndarray:
    """Row indices of the ``count`` rows closest to the rows' mean (ties: lower index first)."""
    centre = features.mean(axis=0, dtype=np.float64)
    distance = ((features - centre) ** 2).sum(axis=1)
    return np.argsort(distance, kind="stable")[:count]


def class_clusters(features: np.ndarray, labels: np.ndarray, grid: int, exemplars: int) -> list[dict[str, object]]:
    """The statistics of each cluster of one class (``labels`` 0 = the largest, the class's main strategy): size,
    share, mass shares and concentration of its mean mask, its spread, its distance to the main strategy and to
    the rest of the class, its suspicion, the positions of its exemplars, and its mean mask (``mean``)."""
    n = len(features)
    class_spread = spread(features)
    main = features[labels == 0].mean(axis=0)
    rows: list[dict[str, object]] = []
    for cluster in range(int(labels.max()) + 1 if n else 0):
        inside = labels == cluster
        members = np.flatnonzero(inside)
        own = features[inside]
        mean = own.mean(axis=0)
        rest = features[~inside]
        offness = distinct_mass(own, rest, grid) if len(rest) else 0.0
        own_spread = spread(own)
        rest_spread = spread(rest) if len(rest) else class_spread
        share = len(members) / n
        rows.append(
            {
                "cluster": cluster,
                "size": len(members),
                "share": share,
                "mask_area": float(mean.mean()),
                **mass_shares(mean.reshape(grid, grid)),
                "concentration": concentration(mean),
                "spread": own_spread,
                "distance_to_main": total_variation(mean, main) if cluster else 0.0,
                "offness": offness,
                "suspicion": suspicion(share, offness, own_spread, rest_spread, len(members)),
                "exemplars": members[nearest_to_centre(own, exemplars)],
                "mean": mean.reshape(grid, grid).astype(np.float32),
            }
        )
    return rows
