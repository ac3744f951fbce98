"""The exact numpy algorithms against scikit-learn's: the same neighbours, k-means as good, a t-SNE map as
faithful."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.manifold import TSNE, trustworthiness
from sklearn.neighbors import NearestNeighbors

from neuromask_pl.analysis import exact


def blobs(seed: int, sizes=(20, 15, 10), spread=0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (len(sizes), 12))
    x = np.concatenate([c + rng.normal(0, spread, (n, 12)) for c, n in zip(centres, sizes)])
    return x, np.repeat(np.arange(len(sizes)), sizes)


def test_nearest_neighbours_match_scikit_learn() -> None:
    x = np.random.default_rng(0).random((40, 16))  # continuous values: no ties
    expected = NearestNeighbors(n_neighbors=6).fit(x).kneighbors(x, return_distance=False)[:, 1:]
    np.testing.assert_array_equal(exact.nearest_neighbours(x, 5), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_is_as_good_as_scikit_learns(seed) -> None:
    x, truth = blobs(seed)
    labels = exact.kmeans(x, 3, seed)
    reference = KMeans(3, n_init=10, random_state=seed).fit(x)

    def cost(lab: np.ndarray) -> float:
        return float(sum(((x[lab == c] - x[lab == c].mean(0)) ** 2).sum() for c in np.unique(lab)))

    # separable blobs: the same partition (up to names), so the same cost
    assert len({(a, b) for a, b in zip(labels, truth)}) == 3
    assert cost(labels) == pytest.approx(reference.inertia_, rel=1e-9)


def test_kmeans_of_random_data_is_no_worse_than_scikit_learns() -> None:
    x = np.random.default_rng(3).random((60, 4))

    def cost(lab: np.ndarray) -> float:
        return float(sum(((x[lab == c] - x[lab == c].mean(0)) ** 2).sum() for c in np.unique(lab)))

    assert cost(exact.kmeans(x, 4, 0)) <= KMeans(4, n_init=10, random_state=0).fit(x).inertia_ * 1.02


def test_tsne_is_as_faithful_as_scikit_learns() -> None:
    x, truth = blobs(4, sizes=(25, 15, 10), spread=0.5)
    mine = exact.tsne(x, perplexity=15, seed=0)
    theirs = TSNE(2, perplexity=15, init="random", random_state=0, method="exact").fit_transform(x)
    assert trustworthiness(x, mine, n_neighbors=5) >= trustworthiness(x, theirs, n_neighbors=5) - 0.02
    # each blob stays together: every point's nearest map neighbour is of its blob
    nearest = exact.nearest_neighbours(mine, 1)[:, 0]
    assert (truth[nearest] == truth).all()


def test_tsne_is_deterministic_for_a_seed() -> None:
    x, _ = blobs(5)
    np.testing.assert_array_equal(exact.tsne(x, 10, seed=1), exact.tsne(x, 10, seed=1))
