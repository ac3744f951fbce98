#!/usr/bin/env python
"""Planted shortcuts: does a dataset-level analysis of NeuroMask's masks find the shortcuts a classifier takes?

The planted variant of the localisation benchmark (:func:`neuromask_pl.data.localisation.make_localisation_set`
with ``planted=True``) puts a white frame on 30 % of the 3s and a white corner mark on 30 % of the 7s, and no other
class ever carries either; the shipped SmallCNN trained on it (``load_benchmark_classifier("planted")``) calls
either cue alone, without a digit, the cue's class (``neuromask_pl/assets/localisation_metrics.json``). So the cue
images of classes 3 and 7 have two sufficient regions, the digit and the cue, and an explanation that shows the cue
lets the analysis split them off as a small, tight cluster of their class.

The images: the first ``--per-class`` test images of each class (by the digit's label), the digit placed within
``--spread`` pixels of the centre (default 4; the classifier was trained on digits anywhere), so that where the
digit lies is no strategy of its own and a class without a cue has one strategy to find.

Two modes:

- Store (the default): the images are written as PNG files and explained with ``--preset`` (default ``analysis``)
  by :func:`neuromask_pl.explain_folder` into a normal results store under ``--work-dir`` (default: a temporary
  folder); then, where :func:`neuromask_pl.analysis.analyze` exists (the hook: :func:`run_analysis`), SpRAy runs over
  the store and, for each cue, the F1 of the best-matching cluster of its class against the cue images, the cue
  clusters' rank by suspicion over all classes and whether any class without a cue got a suspicious cluster are
  reported, beside this script's own measures of the masks. Written to ``--json`` and ``--markdown`` (default
  ``docs/results/planted_shortcuts.{json,md}``).
- ``--study``: the objective study, in memory: the same images explained under each objective of ``--objectives``
  side by side (a preset, or ``key=value`` overrides of ``default`` joined by ``+``), measuring for each the share
  of mask mass on the cue and on the digit's box, how often a cue image's mask holds its cue, time per image
  relative to the first objective, and how separable the cue images are: by the package's analysis over the masks
  (when it exists) and by a small spectral clustering of this script's own (:func:`proxy_clusters`). Written to
  ``docs/results/planted_objectives.{json,md}``.

Examples::

    python benchmarks/planted_shortcuts.py
    python benchmarks/planted_shortcuts.py --preset default \\
        --json docs/results/planted_shortcuts_default.json --markdown docs/results/planted_shortcuts_default.md
    python benchmarks/planted_shortcuts.py --study --objectives default,l_delete=3,l_delete=10
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import sparse
from scipy.sparse import csgraph
from sklearn.cluster import KMeans
from sklearn.neighbors import kneighbors_graph

from neuromask_pl import Explainer, explain_folder, load_benchmark_classifier
from neuromask_pl.data.localisation import PLANTED_CUES, make_localisation_set
from neuromask_pl.settings import parse_overrides

logger = logging.getLogger("planted_shortcuts")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
POOL = 1000  # test images drawn from; the first ``per_class`` of each class are explained
GRID = 16  # masks are averaged to GRID x GRID cells for the clustering
SUSPICIOUS_FALLBACK = 0.1


# --------------------------------------------------------------------------- images and measures


def planted_images(per_class: int, seed: int = 0, spread: int | None = None) -> dict[str, Any]:
    """The first ``per_class`` planted test images of each class (by the digit's label), in class order."""
    pool = make_localisation_set("test", POOL, seed=seed, planted=True, planted_spread=spread)
    chosen = np.concatenate([np.flatnonzero(pool["label"].numpy() == c)[:per_class] for c in range(10)])
    index = torch.from_numpy(chosen)
    data = {k: v[index] for k, v in pool.items() if isinstance(v, torch.Tensor)}
    data["cue"] = [pool["cue"][i] for i in chosen]
    data["pool_index"] = index
    return data


def mask_measures(masks: np.ndarray, data: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per image: the share of mask mass on its cue (NaN without one), on the digit's box, and the mask's area."""
    m = masks.reshape(len(masks), -1).astype(np.float64)
    total = np.maximum(m.sum(1), 1e-12)
    cue = data["cue_mask"].reshape(len(m), -1).numpy()
    box = data["gt_mask"].reshape(len(m), -1).numpy()
    on_cue = np.where(cue.any(1), (m * cue).sum(1) / total, np.nan)
    return {"cue_share": on_cue, "box_share": (m * box).sum(1) / total, "area": m.mean(1)}


def downsample(masks: np.ndarray, grid: int = GRID) -> np.ndarray:
    """Masks (n x H x W, H and W multiples of ``grid``) averaged to ``grid x grid`` cells, flattened."""
    n, h, w = masks.shape
    return masks.reshape(n, grid, h // grid, grid, w // grid).mean(axis=(2, 4)).reshape(n, -1)


def proxy_clusters(features: np.ndarray, neighbours: int = 10, max_clusters: int = 5, seed: int = 0) -> np.ndarray:
    """A small SpRAy: symmetric kNN graph, normalised Laplacian, the number of clusters at the largest eigengap among
    the first ``max_clusters`` eigenvalues (1 when no gap exceeds 0.05), k-means on the row-normalised spectral
    embedding. Cluster labels, 0 = the largest."""
    n = len(features)
    if n < 3:
        return np.zeros(n, dtype=int)
    graph = kneighbors_graph(features, min(neighbours, n - 1), include_self=False)
    graph = sparse.csr_matrix(graph.maximum(graph.T))
    laplacian = csgraph.laplacian(graph, normed=True).toarray()
    values, vectors = np.linalg.eigh(laplacian)
    gaps = np.diff(values[: max_clusters + 1])
    k = int(np.argmax(gaps)) + 1 if gaps.max() > 0.05 else 1
    if k == 1:
        return np.zeros(n, dtype=int)
    embedding = vectors[:, :k] / np.maximum(np.linalg.norm(vectors[:, :k], axis=1, keepdims=True), 1e-12)
    labels = KMeans(k, n_init=10, random_state=seed).fit_predict(embedding)
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    return np.argsort(order)[labels]


def best_f1(labels: np.ndarray, positives: np.ndarray) -> tuple[float, int]:
    """The F1 of the cluster that best matches ``positives`` (bool), and that cluster."""
    best = (0.0, -1)
    for cluster in np.unique(labels):
        members = labels == cluster
        tp = int((members & positives).sum())
        f1 = 2 * tp / max(int(members.sum()) + int(positives.sum()), 1)
        best = max(best, (f1, int(cluster)))
    return best


def separability(masks: np.ndarray, targets: np.ndarray, data: dict[str, Any]) -> dict[str, Any]:
    """The proxy clustering per explained class: F1 of the best cluster against each cue's images, and the number
    of clusters of each class without a cue."""
    features = downsample(masks)
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)  # where, not how much
    cue_index = data["cue_index"].numpy()
    out: dict[str, Any] = {"cues": {}, "clusters_per_class": {}}
    for cls in range(10):
        members = np.flatnonzero(targets == cls)
        labels = proxy_clusters(features[members])
        out["clusters_per_class"][str(cls)] = int(labels.max()) + 1 if len(labels) else 0
        for index, (name, cue_cls) in enumerate(PLANTED_CUES.items()):
            if cue_cls == cls:
                f1, _ = best_f1(labels, cue_index[members] == index)
                out["cues"][name] = round(f1, 3)
    no_cue = [c for c in range(10) if c not in PLANTED_CUES.values()]
    out["split_no_cue_classes"] = [c for c in no_cue if out["clusters_per_class"][str(c)] > 1]
    return out


def summarise(masks: np.ndarray, targets: np.ndarray, data: dict[str, Any]) -> dict[str, Any]:
    """The objective study's numbers for one set of masks (n x H x W)."""
    measures = mask_measures(masks, data)
    cue_index = data["cue_index"].numpy()
    per_cue: dict[str, Any] = {}
    for index, name in enumerate(PLANTED_CUES):
        on = cue_index == index
        shares = measures["cue_share"][on]
        per_cue[name] = {
            "n": int(on.sum()),
            "cue_share": round(float(np.mean(shares)), 3),
            "box_share": round(float(np.mean(measures["box_share"][on])), 3),
            "holds_cue_rate": round(float(np.mean(shares >= 0.1)), 3),
        }
    plain = cue_index == -1
    return {
        "cues": per_cue,
        "box_share_without_cue": round(float(np.mean(measures["box_share"][plain])), 3),
        "area": round(float(np.mean(measures["area"])), 4),
        "separability": separability(masks, targets, data),
    }


# --------------------------------------------------------------------------- the objective study


def parse_objective(text: str) -> tuple[str, dict[str, Any]]:
    """``default`` (a preset) or ``l_delete=10+l_sparse=1`` (overrides of ``default``): (preset, overrides)."""
    from neuromask_pl.settings import PRESETS

    if text in PRESETS:
        return text, {}
    return "default", parse_overrides(text.split("+"))


def study(args: argparse.Namespace) -> dict[str, Any]:
    """Explain the images under every objective and measure each. Side by side: batch after batch, every objective
    explains the batch in turn, so a load that changes during the run weighs on each objective alike."""
    classifier = load_benchmark_classifier("planted")
    data = planted_images(args.per_class, args.seed, args.spread)
    images = data["image"]
    with torch.no_grad():
        predicted = classifier(images).argmax(1)
    texts = args.objectives.split(",")
    explainers = {}
    for text in texts:
        preset, overrides = parse_objective(text)
        explainer = Explainer(classifier, preset=preset, settings=overrides, steps=args.steps)
        explainers[text] = (preset, overrides, explainer)
    seconds = dict.fromkeys(texts, 0.0)
    explained: dict[str, list[Any]] = {text: [] for text in texts}
    for i in range(0, len(images), args.batch_size):
        chunk = slice(i, i + args.batch_size)
        for text in texts:
            start = time.perf_counter()
            explanation = explainers[text][2].explain(images[chunk], predicted[chunk], torch.arange(len(images))[chunk])
            seconds[text] += time.perf_counter() - start
            explained[text].append(explanation)
        logger.info("%d of %d images", min(i + args.batch_size, len(images)), len(images))
    rows: list[dict[str, Any]] = []
    saved: dict[str, np.ndarray] = {}
    for text in texts:
        mask = torch.cat([e.masks for e in explained[text]])[:, 0].numpy()
        preserved = torch.cat([e.preserved for e in explained[text]]).numpy()
        kept = float(preserved.mean())
        row = {
            "objective": text,
            "preset": explainers[text][0],
            "overrides": explainers[text][1],
            "seconds_per_image": round(seconds[text] / len(images), 4),
            "preserved_rate": round(kept, 3),
            **summarise(mask, predicted.numpy(), data),
            "analysis": analyse_masks(mask, predicted.numpy(), preserved, data),
        }
        rows.append(row)
        logger.info("%s", json.dumps(row))
        saved[text] = mask.astype(np.float16)
    if args.save_masks:
        np.savez_compressed(args.save_masks, targets=predicted.numpy(), **saved)
    base = rows[0]["seconds_per_image"]
    for row in rows:
        row["time_vs_first"] = round(row["seconds_per_image"] / base, 2)
    return {
        "images": len(images),
        "per_class": args.per_class,
        "accuracy": round(float((predicted == data["label"]).float().mean()), 4),
        "cue_images": {name: int((data["cue_index"] == i).sum()) for i, name in enumerate(PLANTED_CUES)},
        "rows": rows,
    }


def study_markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    cues = list(PLANTED_CUES)
    spread = "anywhere clear of the cues" if meta.get("spread") is None else f"within {meta['spread']} px of the centre"
    lines = [
        "# Planted shortcuts: which objective shows the cue",
        "",
        f"`{meta['command']}` on {meta['machine']} ({meta['threads']} threads, torch {meta['torch']}).",
        "",
        f"{result['images']} planted test images ({result['per_class']} per class by the digit, placed {spread}; cue "
        "images: "
        + ", ".join(f"{name} {n}" for name, n in result["cue_images"].items())
        + f"), explained for the predicted class (accuracy {result['accuracy']}) with the shipped planted SmallCNN, "
        "every objective in turn on each batch (so a changing load weighs on each alike). Time: seconds per image "
        "relative to the first row; kept: masks that keep the class.",
        "",
        "What the masks hold. Mass on cue / on box: the share of the mask's mass on the cue's pixels / the digit's "
        "box, mean over the cue's images; holds cue: the share of them whose mask puts at least 10 % of its mass "
        "on the cue; no-cue box: mass on the box over the images without a cue.",
        "",
        "| objective | s / image | time | kept | area | "
        + " | ".join(f"{c}: mass on cue | {c}: on box | {c}: holds cue" for c in cues)
        + " | no-cue: on box |",
        "|---" * (5 + 3 * len(cues)) + "|---|",
    ]
    for row in result["rows"]:
        cells = [
            f"`{row['objective']}`",
            f"{row['seconds_per_image']:.3f}",
            f"{row['time_vs_first']:.2f}x",
            f"{row['preserved_rate']:.2f}",
            f"{row['area']:.3f}",
        ]
        for c in cues:
            cue = row["cues"][c]
            cells += [f"{cue['cue_share']:.3f}", f"{cue['box_share']:.3f}", f"{cue['holds_cue_rate']:.2f}"]
        cells.append(f"{row['box_share_without_cue']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "How separable the cue images are. SpRAy: `neuromask_pl.analyze` over the masks (its defaults), the F1 of "
        "the cluster of the cue's class that best matches its cue images and that cluster's rank by suspicion over "
        "all classes' clusters; flagged: classes without a cue with a cluster at or above the suspicion threshold. "
        "Own: this script's small spectral clustering (16 x 16 cells, L2-normalised, kNN k=10, eigengap, k-means), "
        "its F1 and the classes without a cue it split.",
        "",
        "| objective | "
        + " | ".join(f"{c}: SpRAy F1 | {c}: rank" for c in cues)
        + " | SpRAy: no-cue classes flagged | "
        + " | ".join(f"{c}: own F1" for c in cues)
        + " | own: no-cue classes split |",
        "|---" * (3 + 3 * len(cues)) + "|",
    ]
    for row in result["rows"]:
        analysis = row.get("analysis")
        cells = [f"`{row['objective']}`"]
        for c in cues:
            if analysis:
                cells += [f"{analysis['cues'][c]['f1']:.2f}", str(analysis["cues"][c]["rank"])]
            else:
                cells += ["-", "-"]
        cells.append(", ".join(map(str, analysis["no_cue_classes_flagged"])) or "none" if analysis else "-")
        cells += [f"{row['separability']['cues'][c]:.2f}" for c in cues]
        cells.append(", ".join(map(str, row["separability"]["split_no_cue_classes"])) or "none")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the store and the analysis


def write_pngs(images: torch.Tensor, folder: Path) -> None:
    """Each image as ``NNNN.png`` (8 bits a channel): sorted names, so sample ids are the images' positions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i:04d}.png")


def read_store(store: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The masks (n x H x W) and targets (n,) of a store, by sample id."""
    from neuromask_pl import load_results

    masks: list[np.ndarray | None] = [None] * n
    targets = np.full(n, -1, dtype=np.int64)
    with load_results(store) as results:
        for sample_id, mask, row in results:
            masks[int(sample_id)] = np.asarray(mask, dtype=np.float32).reshape(mask.shape[-2:])
            targets[int(sample_id)] = int(row["target"])
    return np.stack(masks), targets


def run_analysis(store: Path, data: dict[str, Any]) -> dict[str, Any] | None:
    """SpRAy over the store with :func:`neuromask_pl.analyze`, when it exists; the cue clusters' F1 and rank."""
    try:  # the hook: the package's analysis, once it exists
        from neuromask_pl.analysis import analyze
    except ImportError as err:
        logger.warning("neuromask_pl.analyze is not importable (%s): only this script's own numbers", err)
        return None
    try:
        from neuromask_pl.analysis import SUSPICIOUS
    except ImportError:
        SUSPICIOUS = SUSPICIOUS_FALLBACK
    boxes = data["box"].tolist()
    start = time.perf_counter()
    analysis = analyze(store, truth=lambda sample_id, row: tuple(boxes[int(sample_id)]), tensorboard=False)
    seconds = time.perf_counter() - start
    ids = np.asarray(analysis.table.ids)
    labels = np.asarray(analysis.labels)
    targets = np.asarray(analysis.table.targets)
    cue_index = data["cue_index"].numpy()[ids]
    ranked = sorted(analysis.clusters, key=lambda c: c["rank"])
    rank_of = {(int(c["target"]), int(c["cluster"])): int(c["rank"]) for c in ranked}
    suspicion_of = {(int(c["target"]), int(c["cluster"])): float(c["suspicion"]) for c in ranked}
    cues: dict[str, Any] = {}
    for index, (name, cls) in enumerate(PLANTED_CUES.items()):
        members = targets == cls
        f1, cluster = best_f1(labels[members], cue_index[members] == index)
        cues[name] = {
            "class": cls,
            "f1": round(f1, 3),
            "cluster": cluster,
            "clusters_of_class": int(labels[members].max()) + 1 if members.any() else 0,
            "rank": rank_of.get((cls, cluster)),
            "suspicion": round(suspicion_of.get((cls, cluster), float("nan")), 4),
        }
    cue_classes = set(PLANTED_CUES.values())
    flagged = sorted(
        {int(c["target"]) for c in ranked if int(c["target"]) not in cue_classes and c["suspicion"] >= SUSPICIOUS}
    )
    split = sorted({int(c["target"]) for c in ranked if int(c["target"]) not in cue_classes and int(c["cluster"]) > 0})
    top = [{k: c.get(k) for k in ("rank", "target", "cluster", "size", "share", "suspicion")} for c in ranked[:6]]
    return {
        "seconds": round(seconds, 2),
        "suspicious_threshold": SUSPICIOUS,
        "cues": cues,
        "cue_clusters_top_ranked": sorted(c["rank"] or 10**6 for c in cues.values()) == list(range(1, len(cues) + 1)),
        "no_cue_classes_flagged": flagged,
        "no_cue_classes_split": split,
        "top_clusters": json.loads(json.dumps(top, default=float)),
    }


def analyse_masks(masks: np.ndarray, targets: np.ndarray, preserved: np.ndarray, data: dict[str, Any]) -> Any:
    """:func:`run_analysis` over masks held in memory: written first to a temporary store of their own (the rows
    the analysis reads: status, target, target_name, preserved, mask_area)."""
    from neuromask_pl.store import ShardWriter, merge_index, open_store

    with tempfile.TemporaryDirectory(prefix="planted_masks_") as root:
        open_store(root, {"planted_shortcuts": {"images": len(masks)}})
        with ShardWriter(root, 0) as writer:
            for i, mask in enumerate(masks):
                row = {
                    "status": "ok",
                    "target": int(targets[i]),
                    "target_name": str(int(targets[i])),
                    "mask_area": float(mask.mean()),
                    "preserved": bool(preserved[i]),
                }
                writer.add(i, mask.astype(np.float16), row)
        merge_index(Path(root))
        return run_analysis(Path(root), data)


def store_run(args: argparse.Namespace) -> dict[str, Any]:
    classifier = load_benchmark_classifier("planted")
    data = planted_images(args.per_class, args.seed, args.spread)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="planted_shortcuts_"))
    folder, store = work / "images", work / f"store_{args.preset}"
    if store.exists():
        shutil.rmtree(store)
    write_pngs(data["image"], folder)
    start = time.perf_counter()
    explain_folder(
        classifier,
        folder,
        store,
        image_size=64,
        batch_size=args.batch_size,
        preset=args.preset,
        steps=args.steps,
        trainer={"logger": False, "enable_progress_bar": False},
    )
    seconds = time.perf_counter() - start
    masks, targets = read_store(store, len(data["image"]))
    result: dict[str, Any] = {
        "images": len(targets),
        "per_class": args.per_class,
        "accuracy": round(float((torch.from_numpy(targets) == data["label"]).float().mean()), 4),
        "cue_images": {name: int((data["cue_index"] == i).sum()) for i, name in enumerate(PLANTED_CUES)},
        "explain_seconds": round(seconds, 1),
        "seconds_per_image": round(seconds / len(targets), 4),
        "store": str(store),
        "own_measures": summarise(masks, targets, data),
        "analysis": run_analysis(store, data),
    }
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
        result["store"] = "(a temporary folder, removed)"
    return result


def store_markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    own = result["own_measures"]
    lines = [
        f"# Planted shortcuts found by the analysis (preset `{meta['preset']}`)",
        "",
        f"`{meta['command']}` on {meta['machine']} ({meta['threads']} threads, torch {meta['torch']}).",
        "",
        f"{result['images']} planted test images ({result['per_class']} per class; cue images: "
        + ", ".join(f"{name} {n}" for name, n in result["cue_images"].items())
        + f'), written as PNG files and explained with `explain_folder(..., preset="{meta["preset"]}")` for the '
        f"predicted class (accuracy {result['accuracy']}): {result['explain_seconds']} s, "
        f"{result['seconds_per_image']} s an image.",
        "",
    ]
    analysis = result["analysis"]
    if analysis is None:
        lines += ["`neuromask_pl.analyze` was not importable: the analysis did not run.", ""]
    else:
        lines += [
            f"`neuromask_pl.analyze` over the store ({analysis['seconds']} s): for each cue, the cluster of its class "
            "that best matches its cue images, its F1, and its rank by suspicion over all classes' clusters.",
            "",
            "| cue | class | clusters of the class | F1 | rank | suspicion |",
            "|---|---|---|---|---|---|",
        ]
        for name, cue in analysis["cues"].items():
            lines.append(
                f"| {name} | {cue['class']} | {cue['clusters_of_class']} | {cue['f1']:.3f} | {cue['rank']} | "
                f"{cue['suspicion']} |"
            )
        lines += [
            "",
            f"Cue clusters ranked first: {'yes' if analysis['cue_clusters_top_ranked'] else 'no'}. Classes without a "
            f"cue with a cluster at or above the suspicion threshold {analysis['suspicious_threshold']}: "
            f"{', '.join(map(str, analysis['no_cue_classes_flagged'])) or 'none'}; split in two or more: "
            f"{', '.join(map(str, analysis['no_cue_classes_split'])) or 'none'}.",
            "",
        ]
    lines += [
        "The masks themselves (this script's measures): share of mask mass on the cue, mean over the cue's images, "
        "and the F1 of a small spectral clustering of its own (16 x 16 cells, kNN k=10, eigengap, k-means):",
        "",
        "| cue | images | mass on cue | mass on box | holds cue | own F1 |",
        "|---|---|---|---|---|---|",
    ]
    for name, cue in own["cues"].items():
        f1 = own["separability"]["cues"][name]
        lines.append(
            f"| {name} | {cue['n']} | {cue['cue_share']:.3f} | {cue['box_share']:.3f} | "
            f"{cue['holds_cue_rate']:.2f} | {f1:.2f} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="analysis", help="the preset of the store run")
    parser.add_argument("--per-class", type=int, default=40, help="images of each class")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="the test set's scene seed")
    parser.add_argument(
        "--spread",
        type=int,
        default=4,
        help="place each digit within this many pixels of the centre; -1: anywhere clear of the cues",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--work-dir", default=None, help="keep the PNG files and the store here (default: a temp dir)")
    parser.add_argument("--study", action="store_true", help="the objective study instead of the store run")
    parser.add_argument(
        "--objectives",
        default="default,l_delete=3,l_delete=10,l_delete=30",
        help="comma-separated: a preset, or overrides of default joined by + (l_delete=10+l_sparse=1)",
    )
    parser.add_argument("--save-masks", default=None, help="the study: save every objective's masks to this .npz")
    parser.add_argument("--json", default=None, help="default docs/results/planted_shortcuts.json (or _objectives)")
    parser.add_argument("--markdown", default=None, help="default docs/results/planted_shortcuts.md (or _objectives)")
    args = parser.parse_args(argv)
    args.spread = None if args.spread < 0 else args.spread
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    stem = "planted_objectives" if args.study else "planted_shortcuts"
    json_path = Path(args.json or RESULTS / f"{stem}.json")
    md_path = Path(args.markdown or RESULTS / f"{stem}.md")
    meta = {
        "command": shlex.join(["python", "benchmarks/planted_shortcuts.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "preset": None if args.study else args.preset,
        "spread": args.spread,
    }
    start = time.perf_counter()
    result = study(args) if args.study else store_run(args)
    meta["total_seconds"] = round(time.perf_counter() - start, 1)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n", encoding="utf-8")
    md_path.write_text((study_markdown if args.study else store_markdown)(result, meta), encoding="utf-8")
    logger.info("wrote %s and %s", json_path, md_path)
    return result


if __name__ == "__main__":
    main()
