"""A :class:`~neuromask_pl.analysis.StrategyAnalysis` in TensorBoard, where Lightning users already look: the
projector (every analysed mask as a point, with a thumbnail and its class, cluster and suspicion), the mean masks of
the most suspicious classes and clusters as image grids, the per-class statistics as histograms and a text table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from neuromask_pl.analysis.analyze import SUSPICIOUS
from neuromask_pl.analysis.report import heat

MAX_POINTS = 10_000
"""The projector shows at most this many masks (its sprite of thumbnails must stay under 8192 x 8192 pixels and a
browser's memory): every member of a suspicious cluster first, then an even share of each class."""

THUMBNAIL = 32
"""Side of a mask's thumbnail in the projector, in pixels."""

TOP = 32
"""How many classes and clusters the image grids show (the most suspicious)."""


def run_log_dir(store: Path) -> Path:
    """Where a run's TensorBoard events are: the store's parent when the store is a run's ``explanations/``
    (events beside it), the newest ``tensorboard/version_N`` inside the store (``explain_folder``), else
    ``<store>/analysis/tensorboard``."""
    if any(store.parent.glob("events.out.tfevents.*")):
        return store.parent
    versions = sorted(store.glob("tensorboard/version_*"), key=lambda p: (len(p.name), p.name))
    return versions[-1] if versions else store / "analysis" / "tensorboard"


def chosen_points(analysis: Any, limit: int = MAX_POINTS) -> np.ndarray:
    """Positions (into the analysis's tables) of the masks the projector shows, in id order: all of them up to
    ``limit``; else the members of suspicious clusters, then the first of each class in turn (even shares)."""
    n = len(analysis.table)
    if n <= limit:
        return np.arange(n)
    first = np.flatnonzero(analysis.suspicion >= SUSPICIOUS)[:limit]
    taken = np.zeros(n, bool)
    taken[first] = True
    rest = np.flatnonzero(~taken)
    # the k-th sample of each class gets rank k: taking ranks in order gives every class an even share
    targets = analysis.table.targets[rest]
    order = np.argsort(targets, kind="stable")
    starts = np.searchsorted(targets[order], targets[order])
    within = np.empty(len(rest), np.int64)
    within[order] = np.arange(len(rest)) - starts
    more = rest[np.argsort(within, kind="stable")[: limit - len(first)]]
    return np.sort(np.concatenate([first, more]))


def _heat(masks: np.ndarray, size: int) -> torch.Tensor:
    """Grid masks (N, g, g) in [0, 1] as colour images (N, 3, size, size), float in [0, 1], each cell a block."""
    repeat = max(1, size // masks.shape[-1])
    big = np.repeat(np.repeat(masks, repeat, axis=1), repeat, axis=2)
    return torch.from_numpy(heat(big)).permute(0, 3, 1, 2).float().div_(255.0)


def write_tensorboard(
    analysis: Any, log_dir: str | os.PathLike[str] | None = None, max_points: int = MAX_POINTS
) -> Path:
    """Write ``analysis`` to TensorBoard in ``log_dir`` (default :func:`run_log_dir` of its store); returns it.

    Tags: the projector's ``analysis/masks`` (metadata columns sample_id, class, cluster, suspicion, mask_area),
    images ``analysis/class_means`` and ``analysis/suspicious_clusters`` (each cluster's mean mask beside its class's,
    most suspicious first), histograms ``analysis/class_suspicion``, ``analysis/class_mask_area``,
    ``analysis/class_kept_rate``, scalars ``analysis/samples``, ``analysis/classes``, ``analysis/suspicious_clusters``
    and the text ``analysis/summary`` (the most suspicious clusters as a table).
    """
    out = Path(log_dir) if log_dir is not None else run_log_dir(analysis.root)
    grid = analysis.table.grid
    keep = chosen_points(analysis, max_points)
    table = analysis.table
    metadata = [
        [
            str(int(table.ids[i])),
            analysis.class_name(table.targets[i]).replace("\t", " ").replace("\n", " "),
            str(int(analysis.labels[i])),
            f"{float(analysis.suspicion[i]):.3f}",
            f"{float(table.area[i]):.3f}",
        ]
        for i in keep
    ]
    with SummaryWriter(str(out)) as writer:
        writer.add_embedding(
            torch.from_numpy(table.features[keep]),
            metadata=metadata,
            metadata_header=["sample_id", "class", "cluster", "suspicion", "mask_area"],
            label_img=_heat(table.features[keep].reshape(-1, grid, grid), THUMBNAIL),
            tag="analysis/masks",
        )
        classes = analysis.classes[:TOP]
        if classes:
            means = np.stack([analysis.class_means[c["target"]] for c in classes])
            writer.add_image("analysis/class_means", make_grid(_heat(means, 64), nrow=8, padding=2))
        clusters = [c for c in analysis.clusters[:TOP] if c["suspicion"] > 0]
        if clusters:
            pairs = np.stack(
                [m for c in clusters for m in (analysis.cluster_means[(c["target"], c["cluster"])],
                                               analysis.class_means[c["target"]])]
            )  # fmt: skip
            writer.add_image("analysis/suspicious_clusters", make_grid(_heat(pairs, 64), nrow=8, padding=2))
        for key in ("suspicion", "mask_area", "kept_rate"):
            values = np.array([c[key] for c in analysis.classes if c[key] is not None], np.float64)
            if len(values):
                writer.add_histogram(f"analysis/class_{key}", values)
        writer.add_scalar("analysis/samples", len(table))
        writer.add_scalar("analysis/classes", len(analysis.classes))
        writer.add_scalar("analysis/suspicious_clusters", len(analysis.suspicious()))
        writer.add_text("analysis/summary", _summary_table(analysis, SUSPICIOUS))
    return out


def _summary_table(analysis: Any, threshold: float) -> str:
    """The most suspicious clusters as a Markdown table (TensorBoard's Text tab)."""
    lines = [
        f"{len(analysis.table)} masks, {len(analysis.classes)} classes, {len(analysis.clusters)} clusters; "
        f"{len(analysis.suspicious())} with suspicion >= {threshold}.",
        "",
        "| rank | class | cluster | size | share | suspicion | mass on border | mass in corners | exemplars |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in analysis.clusters[:TOP]:
        name = str(c["target_name"]).replace("|", "/")
        exemplars = " ".join(str(int(i)) for i in c["exemplars"][:5])
        lines.append(
            f"| {c['rank']} | {name} | {c['cluster']} | {c['size']} | {c['share']:.2f} | {c['suspicion']:.3f} "
            f"| {c['mass_border']:.2f} | {c['mass_corners']:.2f} | {exemplars} |"
        )
    return "\n".join(lines)
