#!/usr/bin/env python
"""Stability of explanations: the same image should get the same thresholded mask whatever the batch, the
code path, the CPU's kernels or (as far as possible) the seed.

A map is binarised as a mask (``map > 0.5``, for NeuroMask masks) or, for a saliency map, as its top-k pixels
with k the share of pixels a reference mask keeps (:func:`binarize`). Two runs of a method are compared by the
intersection over union of their binarised maps, per image (:func:`iou`); a mask's shape by its number of
8-connected pieces (:func:`count_pieces`). :func:`summarise` turns a reference run and its variants into the
numbers ``compare_methods.py --stability`` and ``photo_check.py --stability`` report:

- ``alone``: each image explained alone (batch of one);
- ``plain``: the plain path (NeuroMask's fast path off: the classifier itself, the mask step by autograd);
- ``avx2``: the same command in a subprocess with ``ATEN_CPU_CAPABILITY=avx2`` (another machine's kernels);
- ``seed``: another seed (NeuroMask's, RISE's); a deterministic method repeats itself.

The command line compares saved maps (``--dump-maps`` of either script writes them)::

    python benchmarks/stability.py reference.pt other.pt [--area-from mask.pt]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from neuromask_pl.fastcopy import FastPath

VARIANTS = ("alone", "plain", "avx2", "seed")
#: A NeuroMask mask keeps a pixel where it is above this value.
THRESHOLD = 0.5
#: Kernels of another x86-64 machine for variant ``avx2``.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2"}
#: NeuroMask's arguments for the plain path (variant ``plain``): the classifier itself, no copy (as
#: ExplainDuringTraining's default), and the mask gradient by autograd.
PLAIN_PATH = {"fast_path": FastPath.off(), "mask_gradient": "autograd"}


def parse_variants(text: str | None) -> list[str]:
    """``"alone,avx2"`` -> ``["alone", "avx2"]``; ``"all"`` -> every variant; empty or None -> none."""
    if not text:
        return []
    names = list(VARIANTS) if text.strip() == "all" else [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown stability variants {unknown}; choose from {', '.join(VARIANTS)} or 'all'")
    return names


def top_k_mask(maps: Tensor, areas: Tensor) -> Tensor:
    """The ``round(area * H * W)`` highest pixels of each map (B x 1 x H x W) as a bool mask.

    Ties are broken by raster order (the earlier pixel wins), so the result is deterministic.
    """
    flat = maps.detach().flatten(1).float()
    pixels = flat.shape[1]
    counts = (areas.detach().float().cpu().clamp(0, 1) * pixels).round().long().tolist()
    order = torch.sort(-flat, dim=1, stable=True).indices
    out = torch.zeros_like(flat, dtype=torch.bool)
    for row, count in enumerate(counts):
        out[row, order[row, :count]] = True
    return out.view_as(maps)


def binarize(maps: Tensor, is_mask: bool, areas: Tensor | None = None) -> Tensor:
    """A mask's pixels above :data:`THRESHOLD`, or a saliency map's top-k pixels with k = ``areas`` (B,)."""
    if is_mask:
        return maps.detach() > THRESHOLD
    if areas is None:
        raise ValueError("a saliency map is binarised by its top-k pixels: pass areas (the share to keep per image)")
    return top_k_mask(maps, areas)


def iou(first: Tensor, second: Tensor) -> Tensor:
    """Intersection over union of two bool masks per image (B,); two empty masks agree fully (1.0)."""
    if first.shape != second.shape:
        raise ValueError(f"masks to compare must have one shape, got {tuple(first.shape)} and {tuple(second.shape)}")
    first, second = first.flatten(1).bool(), second.flatten(1).bool()
    union = (first | second).sum(1).float()
    inter = (first & second).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _label_8_connected(image: np.ndarray) -> int:
    """The number of 8-connected components of True pixels in a 2-D bool array (breadth-first search)."""
    height, width = image.shape
    seen = np.zeros_like(image, dtype=bool)
    pieces = 0
    for start in zip(*np.nonzero(image)):
        if seen[start]:
            continue
        pieces += 1
        seen[start] = True
        queue = [start]
        while queue:
            y, x = queue.pop()
            for ny in range(max(y - 1, 0), min(y + 2, height)):
                for nx in range(max(x - 1, 0), min(x + 2, width)):
                    if image[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return pieces


def count_pieces(masks: Tensor) -> Tensor:
    """The number of 8-connected pieces of each bool mask B x 1 x H x W (or B x H x W), shape (B,)."""
    arrays = masks.detach().bool().cpu().numpy().reshape(masks.shape[0], *masks.shape[-2:])
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - scipy is in the test extra; the search gives the same count
        return torch.tensor([_label_8_connected(a) for a in arrays])
    structure = np.ones((3, 3), dtype=bool)
    return torch.tensor([int(ndimage.label(a, structure=structure)[1]) for a in arrays])


@torch.no_grad()
def keeps_class(classifier: nn.Module, images: Tensor, masks: Tensor, targets: Tensor) -> Tensor:
    """Whether each image, with only the pixels of its bool mask kept and black elsewhere, keeps its class."""
    logits = classifier(images * masks.to(images.dtype))
    return logits.argmax(-1) == targets


def summarise(
    reference: Tensor,
    variants: Mapping[str, Tensor],
    kept: Mapping[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Stability numbers of one method: per variant the IoU with ``reference`` (mean, worst, per image) and,
    when ``kept`` holds ``"reference"`` and the variant, the images whose kept class differs; the reference's
    pieces per mask (mean, max) and its kept-class rate.

    ``reference`` and each variant are bool masks B x 1 x H x W (see :func:`binarize`); ``kept`` maps run
    names to bool (B,) (see :func:`keeps_class`).
    """
    pieces = count_pieces(reference)
    out: dict[str, Any] = {
        "pieces_mean": float(pieces.float().mean()),
        "pieces_max": int(pieces.max()),
        "pieces": pieces.tolist(),
        "area_mean": float(reference.flatten(1).float().mean(1).mean()),
    }
    if kept and "reference" in kept:
        out["keeps_class_rate"] = float(kept["reference"].float().mean())
    for name, masks in variants.items():
        values = iou(reference, masks)
        entry: dict[str, Any] = {
            "iou_mean": float(values.mean()),
            "iou_worst": float(values.min()),
            "iou": [round(float(v), 4) for v in values],
        }
        if kept and "reference" in kept and name in kept:
            entry["class_flips"] = int((kept["reference"] != kept[name]).sum())
        out[name] = entry
    return out


def argv_without(argv: list[str], options: set[str]) -> list[str]:
    """``argv`` without the given options and their values (``--opt value`` or ``--opt=value``)."""
    out: list[str] = []
    skip_value = False
    for item in argv:
        if skip_value:
            skip_value = False
            continue
        name, has_value, _ = item.partition("=")
        if name in options:
            skip_value = not has_value
            continue
        out.append(item)
    return out


def maps_in_subprocess(script: str, argv: list[str], env: Mapping[str, str]) -> dict[str, Tensor]:
    """Run ``python script argv --dump-maps FILE`` with ``env`` added to the environment; the maps it saved."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "maps.pt"
        command = [sys.executable, script, *argv, "--dump-maps", str(path)]
        done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return torch.load(path)


def stability_of(
    name: str,
    maps: Tensor,
    is_mask: bool,
    remake: Callable[[str], Tensor | None],
    variants: list[str],
    areas: Tensor | None,
    keep: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """Measure one method: ``remake(variant)`` returns its maps under a variant (None = not applicable)."""
    reference = binarize(maps, is_mask, areas)
    others: dict[str, Tensor] = {}
    for variant in variants:
        remade = remake(variant)
        if remade is not None:
            others[variant] = binarize(remade.to(maps.device), is_mask, areas)
    kept = None
    if keep is not None:
        kept = {"reference": keep(reference), **{k: keep(v) for k, v in others.items()}}
    result = summarise(reference, others, kept)
    result["name"] = name
    return result


def markdown_table(results: list[dict[str, Any]], variants: list[str]) -> str:
    """One row per method: IoU mean / worst per variant, class flips, pieces, kept-class rate."""
    header = ["method"] + [f"{v} IoU mean / worst" for v in variants] + ["class flips", "pieces", "keeps class"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for result in results:
        cells = [result["name"]]
        flips = []
        for variant in variants:
            entry = result.get(variant)
            cells.append("n/a" if entry is None else f"{entry['iou_mean']:.3f} / {entry['iou_worst']:.3f}")
            if entry is not None and "class_flips" in entry:
                flips.append(f"{variant} {entry['class_flips']}")
        cells.append(", ".join(flips) or "n/a")
        cells.append(f"{result['pieces_mean']:.2f} (max {result['pieces_max']})")
        rate = result.get("keeps_class_rate")
        cells.append("n/a" if rate is None else f"{rate:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Compare maps saved by ``--dump-maps`` (same row names in both files)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("reference", help="maps saved by --dump-maps: {row name: B x 1 x H x W}")
    parser.add_argument("others", nargs="+", help="maps of other runs, same rows")
    parser.add_argument("--area-from", default=None, help="row whose mask (> 0.5) gives k for saliency maps")
    args = parser.parse_args(argv)
    reference = torch.load(args.reference)
    runs = {path: torch.load(path) for path in args.others}
    areas = None
    if args.area_from:
        areas = (reference[args.area_from] > THRESHOLD).flatten(1).float().mean(1)
    results = []
    for name, maps in reference.items():
        is_mask = name.startswith("neuromask")
        if not is_mask and areas is None:
            continue  # a saliency map needs k: pass --area-from
        variants = {path: binarize(run[name], is_mask, areas) for path, run in runs.items() if name in run}
        result = summarise(binarize(maps, is_mask, areas), variants)
        result["name"] = name
        results.append(result)
    print(markdown_table(results, list(runs)))
    print(json.dumps([{k: v for k, v in r.items() if k != "pieces"} for r in results], indent=1))
    return {"results": results}


if __name__ == "__main__":
    main()
