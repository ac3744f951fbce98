"""From a store of masks to the strategies of a classifier: :func:`analyze` runs SpRAy class by class and returns a
:class:`StrategyAnalysis`, which writes ``strategies.csv``, ``clusters.csv``, ``classes.csv``, ``summary.json`` and
``means.npz`` (numpy, scipy and scikit-learn; no torch)."""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from neuromask_pl.analysis.features import MaskTable, ObjectMask, read_masks
from neuromask_pl.analysis.spray import DISTINCT, LAYOUTS, SEPARATED, ClassClusters, spray
from neuromask_pl.analysis.strategies import class_clusters, mass_shares
from neuromask_pl.store import StoreWriteError, atomic_write, load_results
from neuromask_pl.store.layout import STORE_FILE, to_manifest_cell

ANALYSIS_DIR = "analysis"
"""The folder of a store where :meth:`StrategyAnalysis.write` puts its files by default."""

SUSPICIOUS = 0.1
"""Clusters at or above this suspicion are called suspicious in the summary, the report and the run's warnings
(a cluster under 90 % of its class, at least as tight as the rest, with a tenth or more of its mass elsewhere)."""

STRATEGY_COLUMNS = (
    "sample_id", "target", "target_name", "cluster", "x", "y", "suspicion",
    "mask_area", "preserved", "off_object", "path", "overlay_file",
)  # fmt: skip
CLUSTER_COLUMNS = (
    "rank", "target", "target_name", "cluster", "size", "share", "suspicion", "offness", "distance_to_main",
    "spread", "concentration", "mask_area", "mass_corners", "mass_border", "mass_centre", "centre_x", "centre_y",
    "off_object", "kept_rate", "exemplars",
)  # fmt: skip
CLASS_COLUMNS = (
    "rank", "target", "target_name", "samples", "clusters", "chosen_by", "suspicion", "mask_area", "kept_rate",
    "off_object", "mass_corners", "mass_border", "mass_centre",
)  # fmt: skip


def find_store(path: str | os.PathLike[str]) -> Path:
    """The store folder for ``path``: ``path`` itself when it holds ``store.json``, else its ``explanations/``
    (a run's log folder, ``lightning_logs/version_N``).

    Raises:
        FileNotFoundError: neither holds a store.
    """
    path = Path(path)
    for candidate in (path, path / "explanations"):
        if (candidate / STORE_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"no results at '{path}': give the folder of a finished (or partly finished) job, one that holds "
        f"{STORE_FILE} (a MaskWriter's output, explain_folder's output_dir) or a run folder with explanations/ in it"
    )


@dataclass
class StrategyAnalysis:
    """The strategies a classifier uses, class by class, found by SpRAy over the masks of a store.

    Per sample (arrays in the order of ``table.ids``): ``labels`` its cluster within its class (0 = the class's
    main strategy, the largest), ``layout`` its 2-D position in its class's map, ``suspicion`` its cluster's score.
    ``clusters`` holds one dict per cluster ranked by suspicion (``rank`` 1 = most suspicious), ``classes`` one per
    class ranked the same way (a class's suspicion is its most suspicious cluster's). ``class_means`` and
    ``cluster_means`` are the mean downsampled masks.
    """

    root: Path
    table: MaskTable
    labels: np.ndarray
    layout: np.ndarray
    suspicion: np.ndarray
    clusters: list[dict[str, Any]]
    classes: list[dict[str, Any]]
    class_means: dict[int, np.ndarray]
    cluster_means: dict[tuple[int, int], np.ndarray]
    eigenvalues: dict[int, np.ndarray]
    settings: dict[str, Any]
    store: dict[str, Any]
    seconds: float = 0.0
    output_dir: Path | None = field(default=None)

    def __repr__(self) -> str:
        return (
            f"StrategyAnalysis({len(self.table)} masks, {len(self.classes)} classes, {len(self.clusters)} clusters, "
            f"{len(self.suspicious())} suspicious, of '{self.root}')"
        )

    # -- reading
    def suspicious(self, threshold: float = SUSPICIOUS) -> list[dict[str, Any]]:
        """The clusters whose suspicion is at least ``threshold``, most suspicious first."""
        return [c for c in self.clusters if c["suspicion"] >= threshold]

    def cluster(self, target: int, cluster: int) -> dict[str, Any]:
        """The statistics of cluster ``cluster`` of class ``target``."""
        for row in self.clusters:
            if row["target"] == target and row["cluster"] == cluster:
                return row
        raise KeyError(f"class {target} has no cluster {cluster}")

    def members(self, target: int, cluster: int | None = None) -> np.ndarray:
        """The sample ids of class ``target`` (in cluster ``cluster``, or all), in id order."""
        keep = self.table.targets == target
        if cluster is not None:
            keep &= self.labels == cluster
        return self.table.ids[keep]

    def class_name(self, target: int) -> str:
        return self.table.names.get(int(target), str(target))

    def strategies(self) -> list[dict[str, Any]]:
        """One row per analysed sample (the columns of ``strategies.csv``), in id order."""
        t = self.table
        return [
            {
                "sample_id": int(t.ids[i]),
                "target": int(t.targets[i]),
                "target_name": self.class_name(t.targets[i]),
                "cluster": int(self.labels[i]),
                "x": float(self.layout[i, 0]),
                "y": float(self.layout[i, 1]),
                "suspicion": float(self.suspicion[i]),
                "mask_area": float(t.area[i]),
                "preserved": None if math.isnan(t.preserved[i]) else bool(t.preserved[i]),
                "off_object": None if math.isnan(t.off_object[i]) else float(t.off_object[i]),
                "path": t.paths[i],
                "overlay_file": t.overlays[i],
            }
            for i in range(len(t))
        ]

    def summary(self, top: int = 20) -> dict[str, Any]:
        """What ``summary.json`` holds: the store and what was left out, the settings, the classes ranked by
        suspicion, and the ``top`` most suspicious clusters."""
        return {
            "store": self.store,
            "settings": self.settings,
            "seconds": round(self.seconds, 3),
            "samples": len(self.table),
            "classes": len(self.classes),
            "clusters": len(self.clusters),
            "suspicious_threshold": SUSPICIOUS,
            "suspicious_clusters": len(self.suspicious()),
            "top_clusters": [_public(c) for c in self.clusters[:top]],
            "class_ranking": [
                {k: c[k] for k in ("rank", "target", "target_name", "samples", "clusters", "suspicion")}
                for c in self.classes
            ],
        }

    def to_pandas(self, what: str = "strategies") -> Any:
        """``strategies`` (one row per sample, indexed by ``sample_id``), ``clusters`` or ``classes`` as a
        ``pandas.DataFrame`` (pandas is optional: ``pip install pandas``)."""
        import pandas as pd

        if what == "strategies":
            return pd.DataFrame.from_records(self.strategies(), columns=STRATEGY_COLUMNS).set_index("sample_id")
        if what == "clusters":
            return pd.DataFrame.from_records([_public(c) for c in self.clusters], columns=CLUSTER_COLUMNS)
        if what == "classes":
            return pd.DataFrame.from_records(self.classes, columns=CLASS_COLUMNS)
        raise ValueError(f"what must be 'strategies', 'clusters' or 'classes', got {what!r}")

    # -- writing
    def write(self, output_dir: str | os.PathLike[str] | None = None) -> Path:
        """Write ``strategies.csv``, ``clusters.csv``, ``classes.csv``, ``summary.json`` and ``means.npz`` (the mean
        masks) into ``output_dir`` (default: the store's ``analysis/``), each atomically; returns the folder.

        Raises:
            StoreWriteError: the folder cannot be written (read-only, disk full); files already there are kept.
        """
        out = Path(output_dir) if output_dir is not None else self.root / ANALYSIS_DIR
        try:
            if out.is_symlink():
                raise OSError(f"'{out}' is a symbolic link; give a real folder")
            out.mkdir(parents=True, exist_ok=True)
            _write_csv(out / "strategies.csv", STRATEGY_COLUMNS, self.strategies())
            _write_csv(out / "clusters.csv", CLUSTER_COLUMNS, [_public(c) for c in self.clusters])
            _write_csv(out / "classes.csv", CLASS_COLUMNS, self.classes)
            with atomic_write(out / "means.npz") as f:
                np.savez(f, **self.mean_arrays())
            with atomic_write(out / "summary.json", "w") as f:
                json.dump(self.summary(), f, indent=1, default=_json_default)
        except OSError as err:
            raise StoreWriteError(f"could not write the analysis into '{out}': {err}") from err
        self.output_dir = out
        return out

    def mean_arrays(self) -> dict[str, np.ndarray]:
        """The mean masks as arrays: ``class_targets`` (C,), ``class_means`` (C, g, g), ``cluster_keys`` (K, 2:
        target, cluster) and ``cluster_means`` (K, g, g), K in rank order."""
        g = self.table.grid
        targets = sorted(self.class_means)
        keys = [(c["target"], c["cluster"]) for c in self.clusters]
        return {
            "class_targets": np.array(targets, np.int64),
            "class_means": np.stack([self.class_means[t] for t in targets]) if targets else np.zeros((0, g, g)),
            "cluster_keys": np.array(keys, np.int64).reshape(-1, 2),
            "cluster_means": np.stack([self.cluster_means[k] for k in keys]) if keys else np.zeros((0, g, g)),
        }


def _public(cluster: dict[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in cluster.items() if k != "mean"}
    row["exemplars"] = " ".join(str(int(i)) for i in cluster["exemplars"])
    return row


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return to_manifest_cell(value)


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with atomic_write(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(c)) for c in columns])


def _check_settings(
    grid: int, neighbours: int | None, k: int | None, max_clusters: int, layout: str, exemplars: int, **shares: float
) -> None:
    def positive_int(value: Any) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1

    problems = [
        (positive_int(grid) and grid >= 2, f"grid must be an int >= 2, got {grid!r}"),
        (neighbours is None or positive_int(neighbours), f"neighbours must be None or an int >= 1, got {neighbours!r}"),
        (k is None or positive_int(k), f"k must be None (the eigengap) or an int >= 1, got {k!r}"),
        (positive_int(max_clusters), f"max_clusters must be an int >= 1, got {max_clusters!r}"),
        (layout in LAYOUTS, f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}"),
        (positive_int(exemplars), f"exemplars must be an int >= 1, got {exemplars!r}"),
    ]
    for name, value in shares.items():
        fine = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and 0 <= value <= 1
        problems.append((fine, f"{name} must be a number in [0, 1], got {value!r}"))
    for ok, message in problems:
        if not ok:
            raise ValueError(message)


def _mean(values: np.ndarray) -> float | None:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def class_strategies(
    table: MaskTable, where: np.ndarray, exemplars: int, options: dict[str, Any]
) -> tuple[ClassClusters, list[dict[str, Any]], dict[str, Any]]:
    """SpRAy over one class (the rows ``where`` of ``table``): its clusters (:func:`~neuromask_pl.analysis.spray.spray`
    with ``options``), each cluster's statistics (:func:`~neuromask_pl.analysis.strategies.class_clusters`, with the
    class, sample ids of its exemplars, off-object share and kept rate), and the class's own row (with its mean mask
    under ``mean``)."""
    grid = table.grid
    target = int(table.targets[where[0]])
    name = table.names.get(target, str(target))
    features = table.features[where]
    found = spray(features, **options)
    rows = class_clusters(features, found.labels, grid, exemplars)
    for row in rows:
        inside = where[found.labels == row["cluster"]]
        row.update(
            target=target,
            target_name=name,
            exemplars=table.ids[where[row["exemplars"]]],
            off_object=_mean(table.off_object[inside]),
            kept_rate=_mean(table.preserved[inside]),
        )
    mean = features.mean(axis=0).reshape(grid, grid).astype(np.float32)
    shares = mass_shares(mean)
    summary = {
        "target": target,
        "target_name": name,
        "samples": len(where),
        "clusters": found.k,
        "chosen_by": found.chosen_by,
        "suspicion": max(r["suspicion"] for r in rows),
        "mask_area": float(table.area[where].mean()),
        "kept_rate": _mean(table.preserved[where]),
        "off_object": _mean(table.off_object[where]),
        **{key: shares[key] for key in ("mass_corners", "mass_border", "mass_centre")},
        "mean": mean,
    }
    return found, rows, summary


def analyze(
    results_dir: str | os.PathLike[str],
    *,
    grid: int = 16,
    neighbours: int | None = None,
    k: int | None = None,
    max_clusters: int = 8,
    min_gap: float = 0.05,
    separated: float = SEPARATED,
    distinct: float = DISTINCT,
    layout: str = "auto",
    exemplars: int = 8,
    truth: ObjectMask | None = None,
    seed: int = 0,
    output_dir: str | os.PathLike[str] | None = None,
    write: bool = True,
    report: bool = True,
    tensorboard: str | os.PathLike[str] | bool = False,
) -> StrategyAnalysis:
    """Find the strategies a classifier uses, class by class: SpRAy over the masks of a finished (or partly
    finished) job.

    Per explained class (the ``target`` column): every mask averaged to a ``grid x grid`` grid, a
    ``neighbours``-nearest-neighbour graph, its spectral embedding, the number of strategies from the eigengap (or
    ``k``), k-means, and a 2-D layout; then each cluster's statistics and its shortcut suspicion
    (:func:`~neuromask_pl.analysis.strategies.suspicion`). Reads each mask once (numpy; one full-size mask in
    memory at a time); classes are analysed one at a time.

    Args:
        results_dir: a store (``store.json`` in it) or a run folder with ``explanations/``.
        grid: side of the grid masks are averaged to (images of any size become comparable).
        neighbours: neighbours per sample in the affinity graph; None: ``sqrt`` of the class's size, 3 to 10
            (:func:`~neuromask_pl.analysis.spray.auto_neighbours`).
        k: the number of clusters per class; None chooses it from the eigengap (at most ``max_clusters``).
        min_gap: the smallest eigengap that splits a class (below it a class is one strategy).
        separated: how near 0 the ``k``-th eigenvalue must be for ``k`` clusters (how clearly the class's graph
            falls apart; see :func:`~neuromask_pl.analysis.spray.eigengap`).
        distinct: the share of a cluster's mass that must lie in cells of its own for a proposed split to stand
            (:func:`~neuromask_pl.analysis.spray.spray`); ``k`` given skips the check.
        layout: ``auto`` (UMAP when ``umap-learn`` is installed, else t-SNE), ``tsne``, ``umap`` or ``spectral``.
        exemplars: the images listed per cluster (those closest to its centre).
        truth: where the object is in each sample (see :data:`~neuromask_pl.analysis.features.ObjectMask`), for
            the share of mask mass off it (``off_object``).
        seed: seeds k-means and the layout.
        output_dir: where to write (default ``<store>/analysis``); ``write=False`` writes nothing.
        report: also write ``report.html`` (a self-contained page; see :mod:`neuromask_pl.analysis.report`).
        tensorboard: a log folder (or True: the run's own, beside the store) to write the projector and images to.

    Raises:
        FileNotFoundError: no store at ``results_dir``.
        ValueError: an impossible setting, or a store with no explained sample to analyse.
    """
    _check_settings(
        grid, neighbours, k, max_clusters, layout, exemplars, min_gap=min_gap, separated=separated, distinct=distinct
    )
    start = time.perf_counter()
    root = find_store(results_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = load_results(root)
    complete = results.indexed
    with results:
        stored = len(results)
        table = read_masks(results, grid, truth)
    for warning in caught:
        warnings.warn(f"analyze: {warning.message}", stacklevel=2)
    if len(table) == 0:
        reasons = ", ".join(f"{n} {why}" for why, n in table.left_out.items()) or "the store is empty"
        raise ValueError(f"nothing to analyse in '{root}': {stored} samples stored, none explained ({reasons})")
    if table.left_out:
        warnings.warn(
            f"analyze: {sum(table.left_out.values())} of {stored} samples left out: "
            + ", ".join(f"{n} {why}" for why, n in table.left_out.items()),
            stacklevel=2,
        )
    n = len(table)
    labels = np.zeros(n, np.int64)
    layout_xy = np.zeros((n, 2), np.float32)
    suspicion = np.zeros(n, np.float32)
    clusters: list[dict[str, Any]] = []
    classes: list[dict[str, Any]] = []
    class_means: dict[int, np.ndarray] = {}
    cluster_means: dict[tuple[int, int], np.ndarray] = {}
    eigenvalues: dict[int, np.ndarray] = {}
    order = np.argsort(table.targets, kind="stable")
    bounds = np.flatnonzero(np.diff(table.targets[order])) + 1
    options = dict(neighbours=neighbours, k=k, max_clusters=max_clusters, min_gap=min_gap, separated=separated,
                   distinct=distinct, layout=layout, seed=seed)  # fmt: skip
    with threadpool_limits(1):  # one class's arrays are small: BLAS threads would only wait for each other
        for where in np.split(order, bounds):
            target = int(table.targets[where[0]])
            found, rows, summary = class_strategies(table, where, exemplars, options)
            labels[where], layout_xy[where] = found.labels, found.layout
            eigenvalues[target] = found.eigenvalues
            for row in rows:
                suspicion[where[found.labels == row["cluster"]]] = row["suspicion"]
                cluster_means[(target, row["cluster"])] = row["mean"]
            clusters.extend(rows)
            class_means[target] = summary.pop("mean")
            classes.append(summary)
    clusters.sort(key=lambda c: (-c["suspicion"], c["target"], c["cluster"]))
    for rank, row in enumerate(clusters, 1):
        row["rank"] = rank
    classes.sort(key=lambda c: (-c["suspicion"], c["target"]))
    for rank, row in enumerate(classes, 1):
        row["rank"] = rank
    analysis = StrategyAnalysis(
        root=root,
        table=table,
        labels=labels,
        layout=layout_xy,
        suspicion=suspicion,
        clusters=clusters,
        classes=classes,
        class_means=class_means,
        cluster_means=cluster_means,
        eigenvalues=eigenvalues,
        settings={
            "grid": grid,
            "neighbours": neighbours,
            "k": k,
            "max_clusters": max_clusters,
            "min_gap": min_gap,
            "separated": separated,
            "layout": layout,
            "exemplars": exemplars,
            "seed": seed,
            "truth": truth is not None,
        },  # fmt: skip
        store={
            "path": str(root),
            "stored": stored,
            "analysed": n,
            "left_out": dict(table.left_out),
            "complete": complete,
            "mask_shapes": {f"{h}x{w}": c for (h, w), c in sorted(table.shapes.items())},
        },
    )
    analysis.seconds = time.perf_counter() - start
    if write:
        out = analysis.write(output_dir)
        if report:
            from neuromask_pl.analysis.report import write_report

            write_report(analysis, out)
    if tensorboard:
        from neuromask_pl.analysis.projector import write_tensorboard

        write_tensorboard(analysis, None if tensorboard is True else tensorboard)
    return analysis
