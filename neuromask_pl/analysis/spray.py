"""Spectral Relevance Analysis (SpRAy; Lapuschkin et al., Nature Communications 2019) of one class's masks, as pure
functions: a sparse k-nearest-neighbour affinity graph, its spectral embedding, the number of strategies from the
eigengap, k-means on the embedding, and a 2-D layout.

Everything here works on an ``n x d`` array of one class's downsampled masks; nothing is ever ``n x n`` dense over
more than one class (:data:`DENSE_LIMIT` samples)."""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.sparse.linalg import eigsh

from neuromask_pl.analysis import exact
from neuromask_pl.analysis.strategies import distinct_mass

DENSE_LIMIT = 1500
"""Classes up to this many samples get their neighbours, eigenvectors and k-means from exact numpy code
(:mod:`~neuromask_pl.analysis.exact`, a dense eigensolver); larger ones from scikit-learn and ARPACK on the sparse
graph."""

SEPARATED = 0.2
"""The default ``separated`` of :func:`eigengap`: how near 0 the ``k``-th eigenvalue must be to propose ``k``
clusters (the proposal is then checked cluster by cluster, see :func:`spray`)."""

DISTINCT = 0.15
"""The default ``distinct`` of :func:`spray`: a cluster stands apart from its class's main strategy when at least
this share of its mass lies in cells of its own (:func:`~neuromask_pl.analysis.strategies.distinct_mass`)."""

EXACT_TSNE_LIMIT = 300
"""Classes up to this many samples get exact t-SNE (:func:`~neuromask_pl.analysis.exact.tsne`); larger ones
scikit-learn's Barnes-Hut t-SNE."""

LAYOUTS = ("auto", "tsne", "umap", "spectral")


@dataclass(frozen=True)
class ClassClusters:
    """SpRAy's result for one class: ``labels[i]`` is sample ``i``'s cluster (0 = the largest), ``layout`` its 2-D
    position, ``eigenvalues`` the smallest eigenvalues of the graph's normalised Laplacian (for the eigengap plot),
    ``k`` the number of clusters, ``chosen_by`` how it was chosen."""

    labels: np.ndarray
    layout: np.ndarray
    eigenvalues: np.ndarray
    k: int
    chosen_by: str


def knn_affinity(features: np.ndarray, neighbours: int) -> sparse.csr_matrix:
    """The symmetric k-nearest-neighbour graph of the rows of ``features`` (Euclidean), as a sparse 0/1 matrix with
    an edge where either row is among the other's ``neighbours`` nearest (self excluded). Identical rows are each
    other's neighbours."""
    n = len(features)
    k = min(neighbours, n - 1)
    if k < 1:
        return sparse.csr_matrix((n, n))
    if n <= DENSE_LIMIT:
        columns = exact.nearest_neighbours(features, k).ravel()
        graph = sparse.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), columns)), shape=(n, n))
    else:
        from sklearn.neighbors import NearestNeighbors

        graph = NearestNeighbors(n_neighbors=k + 1).fit(features).kneighbors_graph(features, mode="connectivity")
        graph.setdiag(0)
        graph.eliminate_zeros()
    graph = graph.maximum(graph.T)
    return graph.tocsr().astype(np.float64)


def spectral_embedding(affinity: sparse.csr_matrix, dimensions: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``dimensions`` smallest eigenvalues of the normalised Laplacian ``I - D^-1/2 A D^-1/2`` (ascending) and
    their eigenvectors (columns), as in Ng, Jordan and Weiss. An isolated node (degree 0) is its own component:
    eigenvalue 0 with a vector on it alone."""
    n = affinity.shape[0]
    dimensions = min(dimensions, n)
    degree = np.asarray(affinity.sum(axis=1)).ravel()
    scale = np.zeros(n)
    scale[degree > 0] = 1.0 / np.sqrt(degree[degree > 0])
    normalised = sparse.diags(scale) @ affinity @ sparse.diags(scale)
    normalised = normalised + sparse.diags((degree == 0).astype(np.float64))  # isolated nodes: eigenvalue 1 here
    if n <= DENSE_LIMIT:
        values, vectors = np.linalg.eigh(normalised.toarray())
        values, vectors = values[::-1][:dimensions], vectors[:, ::-1][:, :dimensions]
    else:
        values, vectors = eigsh(normalised, k=dimensions, which="LA", tol=1e-8, v0=np.full(n, 1.0 / np.sqrt(n)))
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
    return np.clip(1.0 - values, 0.0, 2.0), vectors


def eigengap(eigenvalues: np.ndarray, max_clusters: int, min_gap: float, separated: float) -> int:
    """The number of clusters: the ``k`` with the largest gap ``λ_{k+1} - λ_k`` between consecutive eigenvalues of
    the normalised Laplacian (ascending), among the ``k <= max_clusters`` whose ``λ_k`` is at most ``separated``.

    ``λ_k`` near 0 says the graph falls apart into ``k`` groups with few edges between them; a class whose masks
    vary along a continuum (an object at many places) has no such ``λ_2`` and stays one cluster, as does any class
    whose best gap is under ``min_gap``."""
    values = np.asarray(eigenvalues[: max_clusters + 1], dtype=np.float64)
    if len(values) < 2:
        return 1
    gaps = np.diff(values)
    candidates = [k for k in range(2, len(values)) if values[k - 1] <= separated]
    if not candidates:
        return 1
    k = max(candidates, key=lambda k: (gaps[k - 1], -k))
    return k if gaps[k - 1] >= min_gap else 1


def kmeans_labels(embedding: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means (10 starts, seeded) on the rows of the embedding, normalised to unit length as in Ng, Jordan and
    Weiss; labels renumbered by cluster size, largest first (ties: smallest first member)."""
    if k <= 1:
        return np.zeros(len(embedding), np.int64)
    rows = embedding[:, :k]
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows / np.where(norms > 0, norms, 1.0)
    if len(rows) <= DENSE_LIMIT:
        return relabel_by_size(exact.kmeans(rows, k, seed))
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():  # fewer distinct points than k: KMeans warns and returns fewer clusters
        warnings.simplefilter("ignore")
        raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(rows)
    return relabel_by_size(raw)


def relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster labels renumbered 0, 1, ... by size, largest first (ties: the cluster whose first member comes
    first); empty labels vanish."""
    present, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(present)), key=lambda i: (-counts[i], first[i]))
    mapping = {present[i]: rank for rank, i in enumerate(order)}
    return np.array([mapping[v] for v in labels], dtype=np.int64)


def layout_2d(features: np.ndarray, embedding: np.ndarray, method: str, seed: int) -> np.ndarray:
    """A 2-D position per sample, scaled to [-1, 1]: t-SNE of the masks (``tsne``), UMAP (``umap``, when
    ``umap-learn`` is installed), the spectral embedding's two leading non-trivial vectors (``spectral``: free), or
    ``auto`` (UMAP if installed, else t-SNE). Classes under 4 samples are laid out on a line."""
    n = len(features)
    if method not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {method!r}")
    if method == "auto":
        method = "umap" if importlib.util.find_spec("umap") is not None else "tsne"
    if n < 4:
        xy = np.stack([np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(n), np.zeros(n)], axis=1)
        return xy
    if method == "spectral" or np.ptp(features, axis=0).max() == 0:
        xy = embedding[:, 1:3] if embedding.shape[1] >= 3 else np.pad(embedding[:, 1:], ((0, 0), (0, 1)))
    elif method == "umap":
        import umap

        reducer = umap.UMAP(n_neighbors=min(15, n - 1), random_state=seed, n_jobs=1)
        xy = reducer.fit_transform(features)
    elif n <= EXACT_TSNE_LIMIT:
        xy = exact.tsne(features, perplexity=min(30.0, (n - 1) / 3), seed=seed)
    else:
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, perplexity=30.0, init="pca", random_state=seed).fit_transform(
            features.astype(np.float64)
        )
    return scale_to_unit(np.asarray(xy, dtype=np.float64))


def scale_to_unit(xy: np.ndarray) -> np.ndarray:
    """Centre each axis and scale both by the same factor into [-1, 1] (a point cloud of one point stays at 0)."""
    xy = xy - (xy.max(axis=0) + xy.min(axis=0)) / 2
    extent = np.abs(xy).max()
    return (xy / extent if extent > 0 else xy).astype(np.float32)


def auto_neighbours(n: int, most: int = 10) -> int:
    """Neighbours per sample for a class of ``n``: ``round(sqrt(n))`` between 3 and ``most``. A group can only come
    apart from the rest of the graph when it has more members than each has neighbours: small classes need few."""
    return int(min(most, max(3, round(math.sqrt(n)))))


def distinct_clusters(features: np.ndarray, labels: np.ndarray, grid: int | None, threshold: float) -> int:
    """How many clusters besides the main one (label 0) look somewhere of their own: their
    :func:`~neuromask_pl.analysis.strategies.distinct_mass` against the rest of the class is at least
    ``threshold``."""
    return sum(
        distinct_mass(features[labels == c], features[labels != c], grid) >= threshold
        for c in range(1, int(labels.max()) + 1)
    )


def spray(
    features: np.ndarray,
    *,
    neighbours: int | None = None,
    k: int | None = None,
    max_clusters: int = 8,
    min_gap: float = 0.05,
    separated: float = SEPARATED,
    distinct: float = DISTINCT,
    layout: str = "auto",
    seed: int = 0,
) -> ClassClusters:
    """SpRAy on one class's masks (``n x d``, ``d`` a square grid): the kNN graph, its spectral embedding, ``k``
    clusters, k-means, and the 2-D layout. ``neighbours`` None: :func:`auto_neighbours`.

    ``k`` None: the eigengap proposes ``k`` (:func:`eigengap`, with ``min_gap`` and ``separated``), and a split
    stands only for clusters that look somewhere of their own (:func:`distinct_clusters` at ``distinct``): with
    ``d`` such clusters of ``k - 1``, the class is clustered again into ``d + 1`` (1 when ``d`` is 0), until every
    cluster besides the main one is distinct. A split of a class by where its object happens to be, or by how much of
    it the masks keep, so does not stand; a cue at a place of its own does. A given ``k`` is used as it is.

    All-identical masks, and classes too small to cluster (fewer than 3 samples), are one cluster; ``k`` above the
    number of distinct masks is lowered to it (``chosen_by`` says so)."""
    n = len(features)
    unique = len(np.unique(features, axis=0)) if n else 0
    if n < 3 or unique == 1:
        labels = np.zeros(n, np.int64)
        why = "too few samples" if n < 3 else "identical masks"
        return ClassClusters(labels, layout_2d(features, np.zeros((n, 1)), "spectral", seed), np.zeros(0), 1, why)
    affinity = knn_affinity(features, auto_neighbours(n) if neighbours is None else neighbours)
    eigenvalues, embedding = spectral_embedding(affinity, max(max_clusters, k or 0, 3) + 1)
    if k is not None:
        chosen, why = min(k, unique), "given" if k <= unique else "given, lowered to the distinct masks"
        labels = kmeans_labels(embedding, chosen, seed)
    else:
        chosen, why = eigengap(eigenvalues, min(max_clusters, n - 1), min_gap, separated), "eigengap"
        side = math.isqrt(features.shape[1])
        grid = side if side * side == features.shape[1] else None  # not a square grid: no neighbouring cells
        labels = kmeans_labels(embedding, chosen, seed)
        while chosen > 1:
            kept = distinct_clusters(features, labels, grid, distinct)
            if kept + 1 == int(labels.max()) + 1:
                break
            chosen, why = kept + 1, "eigengap, then the distinct clusters"
            labels = kmeans_labels(embedding, chosen, seed)
    return ClassClusters(labels, layout_2d(features, embedding, layout, seed), eigenvalues, int(labels.max()) + 1, why)
