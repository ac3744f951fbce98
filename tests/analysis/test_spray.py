"""The analysis's pure functions against hand-computed values and independent implementations (scipy's Laplacian,
pixel replication for area averaging)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.sparse.csgraph import laplacian

from neuromask_pl.analysis import spray as S
from neuromask_pl.analysis.features import downsample
from neuromask_pl.analysis.strategies import (
    concentration,
    distinct_mass,
    mass_shares,
    regions,
    spread,
    suspicion,
    total_variation,
)


def replicated_mean(mask: np.ndarray, grid: int) -> np.ndarray:
    """Area averaging by another route: repeat every pixel ``grid`` times along each axis (so every cell holds whole
    pixels), then block means."""
    h, w = mask.shape
    big = np.repeat(np.repeat(mask.astype(np.float64), grid, axis=0), grid, axis=1)
    return big.reshape(grid, h, grid, w).mean(axis=(1, 3))


@pytest.mark.parametrize("shape", [(32, 32), (7, 11), (3, 5), (64, 48), (17, 16)])
def test_downsample_is_exact_area_averaging_for_any_size(shape) -> None:
    mask = np.random.default_rng(0).random(shape).astype(np.float32)
    small = downsample(mask, 4)
    # float32 result of float64 sums of at most 64 x 48 values in [0, 1]: one float32 rounding, 2**-24 relative
    np.testing.assert_allclose(small, replicated_mean(mask, 4), rtol=2**-23, atol=0)
    assert math.isclose(small.mean(), mask.mean(), rel_tol=1e-6)


def test_downsample_refuses_what_is_not_a_mask() -> None:
    with pytest.raises(ValueError, match="H x W"):
        downsample(np.zeros((2, 3, 4)), 4)


def test_knn_affinity_is_symmetric_without_self_loops() -> None:
    x = np.random.default_rng(1).random((20, 5))
    a = S.knn_affinity(x, 3)
    assert (a != a.T).nnz == 0 and a.diagonal().sum() == 0
    assert np.asarray(a.sum(axis=1)).min() >= 3


def test_spectral_embedding_matches_scipys_normalised_laplacian() -> None:
    x = np.concatenate(
        [np.random.default_rng(2).normal(0, 0.1, (10, 3)), np.random.default_rng(3).normal(5, 0.1, (8, 3))]
    )
    a = S.knn_affinity(x, 4)
    values, vectors = S.spectral_embedding(a, 5)
    expected = np.linalg.eigvalsh(laplacian(a.toarray(), normed=True))[:5]
    np.testing.assert_allclose(values, expected, atol=1e-10)  # float64 eigensolvers of an 18 x 18 matrix
    assert values[1] < 1e-10  # two groups with no edge between them: two zero eigenvalues
    assert vectors.shape == (18, 5)


def test_eigengap_counts_separated_groups_only() -> None:
    assert S.eigengap(np.array([0.0, 0.0, 0.0, 0.6, 0.7]), 4, 0.05, 0.1) == 3
    # a continuum: the second eigenvalue is far from 0, so no split whatever the gaps
    assert S.eigengap(np.array([0.0, 0.3, 0.5, 0.9]), 3, 0.05, 0.1) == 1
    # separated, but the gap is too small
    assert S.eigengap(np.array([0.0, 0.05, 0.08, 0.1]), 3, 0.05, 0.1) == 1
    assert S.eigengap(np.array([0.0]), 3, 0.05, 0.1) == 1


def test_relabel_by_size_puts_the_largest_first() -> None:
    assert S.relabel_by_size(np.array([5, 2, 2, 5, 2, 9])).tolist() == [1, 0, 0, 1, 0, 2]


def test_spray_separates_two_groups_and_keeps_one_group_whole() -> None:
    rng = np.random.default_rng(4)
    group = rng.normal(0, 0.05, (30, 8))
    shifted = group.copy()
    shifted[:9, :4] += 1.0  # 9 of 30 look somewhere else too
    found = S.spray(shifted, layout="spectral")
    assert found.k == 2 and set(np.flatnonzero(found.labels == 1)) == set(range(9))
    assert S.spray(group, layout="spectral").k == 1


@pytest.mark.parametrize("n", [0, 1, 2])
def test_spray_of_a_tiny_class_is_one_cluster(n) -> None:
    found = S.spray(np.ones((n, 4)), layout="tsne")
    assert found.k == 1 and found.labels.tolist() == [0] * n and found.layout.shape == (n, 2)
    assert found.chosen_by == "too few samples"


def test_spray_of_identical_masks_is_one_cluster() -> None:
    found = S.spray(np.ones((12, 4)), k=3)
    assert found.k == 1 and found.chosen_by == "identical masks"


def test_a_given_k_above_the_distinct_masks_is_lowered() -> None:
    x = np.repeat(np.eye(2, 4), 6, axis=0)
    found = S.spray(x, k=5, layout="spectral")
    assert found.k == 2 and "lowered" in found.chosen_by


@pytest.mark.parametrize("method", ["tsne", "spectral"])
def test_layout_is_in_the_unit_square(method) -> None:
    x = np.random.default_rng(5).random((25, 6))
    found = S.spray(x, layout=method)
    assert found.layout.shape == (25, 2) and np.abs(found.layout).max() == pytest.approx(1.0)


def test_regions_and_mass_shares_by_hand() -> None:
    r = regions(16)
    assert r["corners"].sum() == 4 * 16 and r["centre"].sum() == 64 and r["border"].sum() == 256 - 144
    corner = np.zeros((16, 16))
    corner[0, 0] = 1.0
    shares = mass_shares(corner)
    assert shares["mass_corners"] == 1.0 and shares["mass_border"] == 1.0 and shares["mass_centre"] == 0.0
    assert shares["centre_x"] == pytest.approx(0.5 / 16) and shares["centre_y"] == pytest.approx(0.5 / 16)


def test_concentration_total_variation_spread_by_hand() -> None:
    assert concentration(np.ones((4, 4))) == pytest.approx(0.0, abs=1e-12)
    one = np.zeros((4, 4))
    one[1, 2] = 3.0
    assert concentration(one) == pytest.approx(1.0)
    a, b = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    assert total_variation(a, b) == 1.0 and total_variation(a, a) == 0.0
    assert spread(np.array([[0.0, 0.0], [2.0, 2.0]])) == pytest.approx(1.0)


def test_distinct_mass_counts_cells_the_cluster_alone_keeps_consistently() -> None:
    # cell 0: every member keeps it (0.5 after averaging), the rest never: its own (t = 0.5 / 0.05 = 10 -> 1);
    # cell 1: members keep it half the time (0 or 1), the rest a quarter: t = 0.25 / (0.5 + 0.433 + 0.05) -> 0.127;
    # cell 2: the same in both: 0
    cluster = np.array([[0.5, 1.0, 0.2], [0.5, 0.0, 0.2], [0.5, 1.0, 0.2], [0.5, 0.0, 0.2]])
    rest = np.array([[0.0, 1.0, 0.2], [0.0, 0.0, 0.2], [0.0, 0.0, 0.2], [0.0, 0.0, 0.2]])
    t1 = 0.25 / (0.5 + np.sqrt(3) / 4 + 0.05)
    expected = (0.5 * 1.0 + 0.5 * (t1 / 2) + 0.2 * 0.0) / 1.2
    assert distinct_mass(cluster, rest) == pytest.approx(expected)
    assert distinct_mass(np.zeros((2, 3)), rest) == 0.0


def test_suspicion_by_hand() -> None:
    assert suspicion(1.0, 0.9, 0.1, 0.5, 40) == 0.0  # a class's only cluster
    assert suspicion(0.25, 0.8, 0.1, 0.2, 10) == pytest.approx(0.8 * 0.75)
    assert suspicion(0.25, 0.8, 0.4, 0.2, 10) == pytest.approx(0.8 * 0.75 * 0.5)  # looser than the rest
    assert suspicion(0.25, 0.8, 0.1, 0.2, 2) == pytest.approx(0.8 * 0.75 * 2 / 5)  # too few to be a strategy


def test_distinct_mass_counts_a_place_next_to_the_rests_as_the_same_place() -> None:
    grid = 8
    rest = np.zeros((4, grid, grid))
    rest[:, 3:5, 3:5] = 1.0  # the rest keeps the centre
    shifted = np.zeros((4, grid, grid))
    shifted[:, 3:5, 4:6] = 1.0  # one cell to the right
    corner = np.zeros((4, grid, grid))
    corner[:, 0, 0] = 1.0  # far away
    flat = {name: a.reshape(4, -1) for name, a in (("rest", rest), ("shifted", shifted), ("corner", corner))}
    assert distinct_mass(flat["shifted"], flat["rest"], grid) == 0.0
    assert distinct_mass(flat["shifted"], flat["rest"], grid, reach=0) == pytest.approx(0.5)  # half its cells moved
    assert distinct_mass(flat["corner"], flat["rest"], grid) == pytest.approx(1.0)


def test_a_split_stands_only_for_a_cluster_that_looks_somewhere_of_its_own() -> None:
    rng = np.random.default_rng(6)
    grid = 8
    masks = np.zeros((30, grid, grid))
    masks[:, 3:5, 3:5] = 1.0
    masks[:12, 3:5, 3:5], masks[:12, 3:5, 4:6] = 0.0, 1.0  # 12 look one cell to the right: two clear groups...
    noisy = (masks + rng.uniform(0, 0.02, masks.shape)).reshape(30, -1)
    found = S.spray(noisy, layout="spectral")
    assert found.eigenvalues[1] < 0.01  # ...that the graph separates,
    assert found.k == 1 and found.chosen_by == "eigengap, then the distinct clusters"  # but not a place of its own
    masks[:12, 0, :] = 1.0  # now those 12 also keep the top edge, which no other does
    cue = (masks + rng.uniform(0, 0.02, masks.shape)).reshape(30, -1)
    found = S.spray(cue, layout="spectral")
    assert found.k == 2 and set(np.flatnonzero(found.labels == 1)) == set(range(12))
    assert S.spray(noisy, k=2, layout="spectral").k == 2  # a given k is used as it is
