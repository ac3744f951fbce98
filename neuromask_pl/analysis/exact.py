"""Exact algorithms for one class's small arrays, in numpy: nearest neighbours from all pairwise distances,
k-means (Lloyd's iterations from k-means++ starts) and t-SNE (van der Maaten and Hinton, 2008, without the
Barnes-Hut approximation).

A dataset of 1,000 classes runs each of these 1,000 times on ~50 x 256 arrays: there, a library call's fixed cost
(checks, thread pools) is most of the time, and these take a millisecond or a few. Larger classes go to
scikit-learn (see :mod:`~neuromask_pl.analysis.spray`)."""

from __future__ import annotations

import math

import numpy as np


def squared_distances(x: np.ndarray) -> np.ndarray:
    """All pairwise squared Euclidean distances of the rows of ``x`` (float64, clipped at 0, exact 0 diagonal)."""
    x = np.asarray(x, dtype=np.float64)
    norms = (x * x).sum(axis=1)
    d = norms[:, None] + norms[None, :] - 2.0 * (x @ x.T)
    np.maximum(d, 0.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def nearest_neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` nearest other rows of each row (``n x k`` indices, nearest first; ties: lower index first)."""
    d = squared_distances(x)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def kmeans(x: np.ndarray, k: int, seed: int, starts: int = 10, iterations: int = 100) -> np.ndarray:
    """k-means labels of the rows of ``x``: the best (least within-cluster sum of squares) of ``starts`` runs of
    Lloyd's iterations, each from k-means++ seeding drawn from ``seed``."""
    x = np.asarray(x, dtype=np.float64)
    rng = np.random.default_rng(seed)
    best, best_cost = np.zeros(len(x), np.int64), math.inf
    for _ in range(starts):
        centres = _kmeans_plus_plus(x, k, rng)
        labels = np.zeros(len(x), np.int64)
        for step in range(iterations):
            d = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
            new = d.argmin(axis=1)
            if step and np.array_equal(new, labels):
                break
            labels = new
            for c in range(k):
                members = x[labels == c]
                if len(members):
                    centres[c] = members.mean(axis=0)
        cost = float(((x - centres[labels]) ** 2).sum())
        if cost < best_cost - 1e-12:
            best, best_cost = labels, cost
    return best


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min([((x - c) ** 2).sum(axis=1) for c in centres], axis=0)
        total = d.sum()
        centres.append(x[rng.choice(len(x), p=d / total)] if total > 0 else x[rng.integers(len(x))])
    return np.array(centres)


def _affinities(d: np.ndarray, perplexity: float) -> np.ndarray:
    """The symmetric t-SNE input affinities ``P``: per row, a Gaussian whose width gives the row's conditional
    distribution the ``perplexity`` (bisection on its precision), then ``(P + P^T) / 2n``."""
    n = len(d)
    target = math.log(perplexity)
    p = np.zeros((n, n))
    for i in range(n):
        di = np.delete(d[i], i)
        lo, hi, beta = 0.0, math.inf, 1.0
        for _ in range(64):
            w = np.exp(-(di - di.min()) * beta)
            s = w.sum()
            entropy = math.log(s) + beta * float(((di - di.min()) * w).sum()) / s
            if abs(entropy - target) < 1e-5:
                break
            if entropy > target:
                lo, beta = beta, beta * 2 if hi == math.inf else (beta + hi) / 2
            else:
                hi, beta = beta, (beta + lo) / 2
        p[i, np.arange(n) != i] = w / s
    return (p + p.T) / (2 * n)


def tsne(x: np.ndarray, perplexity: float, seed: int, iterations: int = 500) -> np.ndarray:
    """Exact t-SNE of the rows of ``x`` into 2-D: Gaussian affinities at ``perplexity``, a Student-t kernel in the
    map, gradient descent with momentum (0.5, then 0.8) and per-coordinate gains, early exaggeration (12) for the
    first 250 iterations, learning rate ``max(n / 48, 50)``, started from a seeded small random map."""
    n = len(x)
    p = np.maximum(_affinities(squared_distances(x), perplexity), 1e-12)
    rng = np.random.default_rng(seed)
    y = rng.normal(0.0, 1e-4, (n, 2))
    velocity, gains = np.zeros_like(y), np.ones_like(y)
    rate = max(n / 48.0, 50.0)
    for step in range(iterations):
        exaggeration, momentum = (12.0, 0.5) if step < 250 else (1.0, 0.8)
        q = 1.0 / (1.0 + squared_distances(y))
        np.fill_diagonal(q, 0.0)
        weights = (exaggeration * p - q / q.sum()) * q
        gradient = 4.0 * (np.diag(weights.sum(axis=1)) - weights) @ y
        same = np.sign(gradient) == np.sign(velocity)
        gains = np.maximum(np.where(same, gains * 0.8, gains + 0.2), 0.01)
        velocity = momentum * velocity - rate * gains * gradient
        y = y + velocity
        y = y - y.mean(axis=0)
    return y
