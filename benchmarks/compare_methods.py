#!/usr/bin/env python
"""Compare NeuroMask presets with Captum and TorchRay attribution methods on the localisation benchmark.

Same model (the shipped SmallCNN of the chosen variant), same images (the first ``--n`` of the
benchmark's test split), same class (the classifier's prediction) and same metrics
(:mod:`neuromask_pl.metrics`, functional forms) for every method. Prints one markdown row per
method (every metric, seconds per image, n) and writes JSON with the aggregates, the per-image
values and the configuration.

Methods (each gives a saliency map B x 1 x H x W at image resolution; higher = more important):

- ``neuromask``: NeuroMask masks, one run per preset of ``--presets`` (and, for the first preset,
  one per step count of ``--steps-list``); ``--set key=value`` overrides any setting.
- ``saliency``: Captum Saliency, |gradient| max over channels.
- ``integrated_gradients``: Captum IntegratedGradients, black baseline, 32 steps (Gauss-Legendre,
  Captum's default), |attribution| summed over channels.
- ``gradcam``: Captum LayerGradCam on the last conv block's output (``--gradcam-layer``), ReLU,
  upsampled bilinearly to the image.
- ``occlusion``: Captum Occlusion, 8 x 8 window, stride 4, black baseline.
- ``extremal_perturbation``: TorchRay, preserve variant, ``--ep-area`` (0.1), TorchRay's defaults
  otherwise (800 iterations, blur perturbation, step 7, sigma 21, jitter); one image at a time, on
  the first ``--ep-n`` images.
- ``rise``: TorchRay RISE, ``--rise-masks`` random 7 x 7 masks (p = 0.5); on the first ``--rise-n``.

Metrics (means over images): pointing game (tolerance ``--tolerance`` pixels, first maximum in
raster order, and with any tied maximum), energy-based pointing (``energy="shift"``) on the digit's
box; deletion AUC (black baseline) and insertion AUC (blur baseline), 20 steps; selection and
preservation rates (black baseline, threshold 0.5) and mask area: NeuroMask masks as they are,
other maps min-max normalised per image to [0, 1] first; seconds per image (wall clock of
producing the maps, in-process, same thread count for all). Spurious variant: among images the
classifier labels ``cue_label != label`` (it follows the cue), the share whose shifted saliency
energy on the cue square is above 0.5, the mean cue energy and the pointing game on the cue.

Example::

    python benchmarks/compare_methods.py --variant clean --n 100 --steps-list 100,300,1000 \\
        --out docs/results/compare_clean.json --markdown docs/results/compare_clean.md
    python benchmarks/compare_methods.py --methods neuromask --presets default --set l_smooth=0.5 --label smooth0.5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from neuromask_pl import NeuroMask
from neuromask_pl.classifiers.benchmark import load_benchmark_classifier
from neuromask_pl.data.checks import frozen
from neuromask_pl.data.localisation import checkpoint_path, make_localisation_set
from neuromask_pl.metrics import (
    deletion_auc,
    energy_pointing,
    insertion_auc,
    mask_area,
    pointing_game,
    preservation,
    selection,
)
from neuromask_pl.settings import parse_overrides, resolve_settings

log = logging.getLogger("compare_methods")

PEER_METHODS = ("saliency", "integrated_gradients", "gradcam", "occlusion", "extremal_perturbation", "rise")
ALL_METHODS = ("neuromask",) + PEER_METHODS
AUC_STEPS = 20
THRESHOLD = 0.5
MASK_BASELINE = "black"
DELETION_BASELINE = "black"
INSERTION_BASELINE = "blur"

# Columns of the table: (key, header, format).
COLUMNS = [
    ("pointing_game", "point", "{:.3f}"),
    ("pointing_game_any", "point(any)", "{:.3f}"),
    ("energy_pointing", "energy", "{:.3f}"),
    ("deletion_auc", "del AUC ↓", "{:.4f}"),
    ("insertion_auc", "ins AUC ↑", "{:.4f}"),
    ("selection_rate", "select", "{:.3f}"),
    ("preservation_rate", "preserve", "{:.3f}"),
    ("mask_area", "area", "{:.3f}"),
]
CUE_COLUMNS = [
    ("cue_energy_gt_half_rate", "cue energy>0.5", "{:.3f}"),
    ("cue_energy_mean", "cue energy", "{:.3f}"),
    ("cue_pointing_game", "cue point", "{:.3f}"),
    ("n_cue", "n cue", "{:d}"),
]


# ----------------------------------------------------------------------------------------- arguments


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"step counts must be >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("clean", "spurious"), default="clean")
    parser.add_argument("--n", type=int, default=200, help="images from the test split (the first n)")
    parser.add_argument("--seed", type=int, default=0, help="scene seed of the benchmark and NeuroMask's seed")
    parser.add_argument(
        "--methods", default=",".join(ALL_METHODS), help=f"comma list from {', '.join(ALL_METHODS)} (default: all)"
    )
    parser.add_argument("--presets", default="default,paper", help="NeuroMask presets, comma list")
    parser.add_argument(
        "--steps-list", type=_int_list, default=None, help="run the first preset at these step counts, e.g. 100,300"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="NeuroMask setting for every NeuroMask run (repeatable), e.g. --set l_smooth=0.5",
    )
    parser.add_argument("--label", default=None, help="suffix naming this run's NeuroMask rows in the table")
    parser.add_argument("--batch-size", type=int, default=100, help="images per batch (NeuroMask and peers)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared CPU more threads can be far slower)",
    )
    parser.add_argument("--tolerance", type=float, default=3.0, help="pointing-game margin in pixels")
    parser.add_argument("--ep-area", type=float, default=0.1, help="extremal perturbation's target area")
    parser.add_argument("--ep-max-iter", type=int, default=800, help="extremal perturbation's iterations")
    parser.add_argument("--ep-n", type=int, default=None, help="run extremal perturbation on the first N images")
    parser.add_argument("--rise-masks", type=int, default=4000, help="RISE's number of random masks")
    parser.add_argument("--rise-n", type=int, default=None, help="run RISE on the first N images")
    parser.add_argument("--gradcam-layer", default="auto", help="module name for Grad-CAM (auto: last conv block)")
    parser.add_argument("--reference", default=None, help="row checked against the targets (default: first preset)")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--markdown", default=None, help="markdown output path")
    parser.add_argument("--no-per-image", action="store_true", help="leave per-image values out of the JSON")
    parser.add_argument(
        "--stability",
        default=None,
        help="thresholded-map IoU against variants of each run: comma list of alone,plain,avx2,seed or 'all' "
        "(benchmarks/stability.py)",
    )
    parser.add_argument(
        "--stability-area", type=float, default=0.05, help="top-k share for saliency maps when no NeuroMask row runs"
    )
    parser.add_argument("--dump-maps", default=None, help="save every row's maps to this .pt file")
    return parser


# ----------------------------------------------------------------------------------------- methods


def minmax(maps: Tensor) -> Tensor:
    """Per-image min-max normalisation to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = high - low
    out = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.view_as(maps)


def find_gradcam_layer(model: nn.Module, name: str) -> nn.Module:
    """The named sub-module, or for ``auto`` the last ReLU after the last Conv2d (else that Conv2d)."""
    modules = dict(model.named_modules())
    if name != "auto":
        if name not in modules:
            raise ValueError(f"no module {name!r} in the classifier; choose one of {sorted(modules)[:40]}")
        return modules[name]
    items = list(modules.items())
    convs = [i for i, (_, m) in enumerate(items) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the classifier has no Conv2d layer for Grad-CAM; pass --gradcam-layer")
    after = [m for _, m in items[convs[-1] :] if isinstance(m, nn.ReLU)]
    return after[-1] if after else items[convs[-1]][1]


def _batched(fn: Callable[[Tensor, Tensor], Tensor], images: Tensor, targets: Tensor, batch: int) -> Tensor:
    return torch.cat([fn(images[i : i + batch], targets[i : i + batch]) for i in range(0, len(images), batch)])


def captum_maps(name: str, model: nn.Module, images: Tensor, targets: Tensor, args: argparse.Namespace) -> Tensor:
    """Saliency maps B x 1 x H x W from a Captum method."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency

    def run(x: Tensor, t: Tensor) -> Tensor:
        x = x.clone().requires_grad_(True)
        if name == "saliency":
            return Saliency(model).attribute(x, target=t, abs=True).amax(1, keepdim=True)
        if name == "integrated_gradients":
            ig = IntegratedGradients(model)
            return (
                ig.attribute(x, baselines=torch.zeros_like(x), target=t, n_steps=32, internal_batch_size=len(x) * 8)
                .abs()
                .sum(1, keepdim=True)
            )
        if name == "gradcam":
            layer = find_gradcam_layer(model, args.gradcam_layer)
            cam = LayerGradCam(model, layer).attribute(x, target=t, relu_attributions=True)
            return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
        if name == "occlusion":
            occ = Occlusion(model)
            attr = occ.attribute(x, sliding_window_shapes=(3, 8, 8), strides=(3, 4, 4), baselines=0.0, target=t)
            return attr.sum(1, keepdim=True)
        raise ValueError(name)

    return _batched(run, images, targets, args.batch_size).detach()


def extremal_maps(model: nn.Module, images: Tensor, targets: Tensor, args: argparse.Namespace) -> Tensor:
    """TorchRay extremal perturbation masks B x 1 x H x W, one image at a time."""
    from torchray.attribution.extremal_perturbation import extremal_perturbation

    maps = []
    for x, t in zip(images, targets):
        mask, _ = extremal_perturbation(
            model, x[None], int(t), areas=[args.ep_area], max_iter=args.ep_max_iter, resize=True
        )
        maps.append(mask.detach())
    return torch.cat(maps)


def rise_maps(model: nn.Module, images: Tensor, targets: Tensor, args: argparse.Namespace, seed: int = 0) -> Tensor:
    """TorchRay RISE maps B x 1 x H x W for each image's target class (masks shared by all images)."""
    from torchray.attribution.rise import rise

    maps = []
    for i in range(0, len(images), args.batch_size):
        sal = rise(model, images[i : i + args.batch_size], num_masks=args.rise_masks, batch_size=250, seed=seed)
        t = targets[i : i + args.batch_size]
        maps.append(sal[torch.arange(len(t)), t][:, None])
    return torch.cat(maps)


def neuromask_maps(
    explainer: NeuroMask, images: Tensor, targets: Tensor, ids: Tensor, batch: int
) -> tuple[Tensor, Tensor]:
    """NeuroMask's masks and the optimisation steps each image got (fewer with early stopping)."""
    masks, steps = [], []
    for i in range(0, len(images), batch):
        result = explainer.explain(images[i : i + batch], targets[i : i + batch], ids[i : i + batch])
        masks.append(result.masks)
        steps.append(result.steps)
    return torch.cat(masks).detach(), torch.cat(steps)


def variant_maps(
    variant: str,
    row: dict[str, Any],
    classifier: nn.Module,
    images: Tensor,
    targets: Tensor,
    ids: Tensor,
    args: argparse.Namespace,
) -> Tensor | None:
    """A row's maps under a stability variant of ``benchmarks/stability.py`` (not ``avx2``, which reruns the whole
    command in a subprocess), or None where the variant cannot differ (a deterministic method's seed, a peer's
    plain path, extremal perturbation alone: it already runs one image at a time)."""
    from stability import PLAIN_PATH

    n, method = row["n"], row["method"]
    images, targets, ids = images[:n], targets[:n], ids[:n]
    alone = argparse.Namespace(**{**vars(args), "batch_size": 1})
    if method == "neuromask":
        preset, overrides = row["settings"]["preset"], row["settings"]["overrides"]
        steps, seed, batch = row["settings"]["resolved"]["steps"], args.seed, args.batch_size
        path = PLAIN_PATH if variant == "plain" else {}
        seed, batch = (seed + 1, batch) if variant == "seed" else (seed, 1 if variant == "alone" else batch)
        explainer = NeuroMask(classifier, preset, steps, overrides, seed=seed, **path)
        return neuromask_maps(explainer, images, targets, ids, batch)[0]
    if method == "rise" and variant in ("alone", "seed"):
        return rise_maps(classifier, images, targets, alone if variant == "alone" else args, int(variant == "seed"))
    if variant == "alone" and method not in ("extremal_perturbation", "rise"):
        return captum_maps(method, classifier, images, targets, alone)
    return None


def measure_stability(
    rows: list[dict[str, Any]],
    maps: dict[str, Tensor],
    classifier: nn.Module,
    images: Tensor,
    targets: Tensor,
    ids: Tensor,
    args: argparse.Namespace,
    argv: list[str],
) -> str:
    """Add each row's ``stability`` (``benchmarks/stability.py``); the markdown table of them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import stability

    variants = stability.parse_variants(args.stability)
    avx2: dict[str, Tensor] = {}
    if "avx2" in variants:
        rest = stability.argv_without(argv, {"--stability", "--out", "--markdown", "--dump-maps"})
        avx2 = stability.maps_in_subprocess(__file__, rest, stability.AVX2_ENV)
    masks = [maps[r["name"]] for r in rows if r["method"] == "neuromask"]
    areas = (masks[0] > stability.THRESHOLD).flatten(1).float().mean(1) if masks else None
    for row in rows:
        n = row["n"]

        def remake(variant: str, row: dict[str, Any] = row) -> Tensor | None:
            if variant == "avx2":
                return avx2.get(row["name"])
            return variant_maps(variant, row, classifier, images, targets, ids, args)

        def keep(masks: Tensor, n: int = n) -> Tensor:
            return stability.keeps_class(classifier, images[:n], masks, targets[:n])

        area = torch.full((n,), args.stability_area) if areas is None else areas[:n]
        is_mask = row["method"] == "neuromask"
        with frozen(classifier):
            row["stability"] = stability.stability_of(
                row["name"], maps[row["name"]], is_mask, remake, variants, area, keep
            )
        log.info("  stability: %s", stability.markdown_table([row["stability"]], variants).splitlines()[-1])
    return stability.markdown_table([r["stability"] for r in rows], variants)


# ----------------------------------------------------------------------------------------- metrics


def evaluate(
    classifier: nn.Module,
    data: dict[str, Tensor],
    maps: Tensor,
    targets: Tensor,
    is_mask: bool,
    tolerance: float,
    batch: int,
) -> dict[str, Tensor]:
    """Per-image metrics of one method's maps (all tensors (n,), float)."""
    n = maps.shape[0]
    images = data["image"][:n]
    gt = data["gt_mask"][:n]
    soft = maps.clamp(0, 1) if is_mask else minmax(maps)
    out: dict[str, list[Tensor]] = {}

    def add(key: str, value: Tensor) -> None:
        out.setdefault(key, []).append(value.detach().float().cpu())

    for i in range(0, n, batch):
        s = slice(i, i + batch)
        x, m, sm, t = images[s], maps[s], soft[s], targets[s]
        add("pointing_game", pointing_game(m, gt[s], tolerance, ties="first"))
        add("pointing_game_any", pointing_game(m, gt[s], tolerance, ties="any"))
        add("pointing_game_tol0", pointing_game(m, gt[s], 0, ties="first"))
        add("energy_pointing", energy_pointing(m, gt[s], energy="shift"))
        add("deletion_auc", deletion_auc(classifier, x, m, t, AUC_STEPS, DELETION_BASELINE))
        add("insertion_auc", insertion_auc(classifier, x, m, t, AUC_STEPS, INSERTION_BASELINE))
        add("selection_rate", selection(classifier, x, sm, t, THRESHOLD, MASK_BASELINE))
        add("preservation_rate", preservation(classifier, x, sm, t, MASK_BASELINE))
        add("mask_area", mask_area(sm))
        if "cue_mask" in data:
            cue = data["cue_mask"][:n][s]
            add("cue_energy", energy_pointing(m, cue, energy="shift"))
            add("cue_pointing", pointing_game(m, cue, tolerance, ties="first"))
    return {k: torch.cat(v) for k, v in out.items()}


def aggregate(per_image: dict[str, Tensor], cue_subset: Tensor | None) -> dict[str, Any]:
    """Means of the per-image values; cue statistics over ``cue_subset`` (bool (n,))."""
    agg: dict[str, Any] = {k: float(v.mean()) for k, v in per_image.items() if not k.startswith("cue_")}
    if cue_subset is not None and "cue_energy" in per_image:
        sub = cue_subset[: len(per_image["cue_energy"])]
        agg["n_cue"] = int(sub.sum())
        if sub.any():
            energy = per_image["cue_energy"][sub]
            agg["cue_energy_gt_half_rate"] = float((energy > 0.5).float().mean())
            agg["cue_energy_mean"] = float(energy.mean())
            agg["cue_pointing_game"] = float(per_image["cue_pointing"][sub].mean())
        else:
            agg.update(cue_energy_gt_half_rate=math.nan, cue_energy_mean=math.nan, cue_pointing_game=math.nan)
    return agg


# ----------------------------------------------------------------------------------------- report


def markdown_table(rows: list[dict[str, Any]], spurious: bool) -> str:
    columns = COLUMNS + (CUE_COLUMNS if spurious else [])
    header = ["method", "n"] + [h for _, h, _ in columns] + ["s/img"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [row["name"], str(row["n"])]
        for key, _, fmt in columns:
            value = row["metrics"].get(key)
            cells.append(
                "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)
            )
        cells.append(f"{row['seconds_per_image']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(rows: list[dict[str, Any]], reference: str | None, spurious: bool) -> dict[str, Any] | None:
    """The localisation targets (docs/results/SUMMARY.md) for the reference row against the peers (the other rows)."""
    ref = next((r for r in rows if r["name"] == reference), None)
    if ref is None:
        return None
    peers = [r for r in rows if r["method"] != "neuromask"]
    m = ref["metrics"]
    checks: dict[str, Any] = {}

    def check(name: str, value: float, ok: bool, rule: str) -> None:
        checks[name] = {"value": value, "rule": rule, "met": bool(ok)}

    best_point = max((p["metrics"]["pointing_game"] for p in peers), default=-math.inf)
    best_del = min((p["metrics"]["deletion_auc"] for p in peers), default=math.inf)
    best_ins = max((p["metrics"]["insertion_auc"] for p in peers), default=-math.inf)
    if spurious:
        v = m.get("cue_energy_gt_half_rate", math.nan)
        check("cue_energy_gt_half_rate", v, v >= 0.9, ">= 0.90 (of images classified by the cue)")
    else:
        v = m["pointing_game"]
        check("pointing_game", v, v >= 0.9 and v >= best_point, f">= 0.90 and >= best peer {best_point:.3f}")
        v = m["energy_pointing"]
        check("energy_pointing", v, v >= 0.95, ">= 0.95")
        v = m["deletion_auc"]
        check("deletion_auc", v, v < best_del, f"< best peer {best_del:.4f}")
        v = m["insertion_auc"]
        check("insertion_auc", v, v > best_ins, f"> best peer {best_ins:.4f}")
        v = m["selection_rate"]
        check("selection_rate", v, v >= 0.95, ">= 0.95")
    return {"reference": reference, "checks": checks}


def targets_markdown(result: dict[str, Any] | None) -> str:
    if result is None:
        return ""
    lines = [f"Targets for `{result['reference']}`:", "", "| target | value | rule | met |", "|---|---:|---|---|"]
    for name, c in result["checks"].items():
        lines.append(f"| {name} | {c['value']:.4f} | {c['rule']} | {'yes' if c['met'] else 'NO'} |")
    return "\n".join(lines)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("captum", "torchray", "numpy", "neuromask_pl", "pytorch_lightning"):
        try:
            from importlib.metadata import version

            versions[name] = version(name.replace("_", "-") if name != "neuromask_pl" else "neuromask-pl")
        except Exception:  # noqa: BLE001 - a version we cannot read is simply left out
            pass
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        versions["git_commit"] = commit.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001
        pass
    return versions


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.n < 1 or args.batch_size < 1:
        parser.error("--n and --batch-size must be >= 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    spurious = args.variant == "spurious"

    data = make_localisation_set("test", args.n, seed=args.seed, spurious=spurious)
    classifier = load_benchmark_classifier(args.variant)
    classifier.eval()
    images = data["image"]
    with torch.no_grad():
        predicted = classifier(images).argmax(-1)
    ids = torch.arange(args.n)
    cue_subset = None
    if spurious:
        cue_subset = (predicted == data["cue_label"]) & (data["cue_label"] != data["label"])
    log.info(
        "%s: %d images, accuracy %.3f%s",
        args.variant,
        args.n,
        float((predicted == data["label"]).float().mean()),
        f", {int(cue_subset.sum())} classified by the cue (prediction == cue_label != label)" if spurious else "",
    )

    # Runs: (row name, method, callable returning maps, n, is_mask, settings)
    runs: list[tuple[str, str, Callable[[], Tensor], int, bool, dict[str, Any]]] = []
    suffix = f" [{args.label}]" if args.label else ""
    if "neuromask" in methods:
        for k, preset in enumerate(presets):
            step_counts: list[int | None] = list(args.steps_list) if (k == 0 and args.steps_list) else [None]
            for steps in step_counts:
                explainer = NeuroMask(classifier, preset, steps, overrides, seed=args.seed)
                name = f"neuromask:{preset}@{explainer.settings.steps}{suffix}"
                runs.append(
                    (
                        name,
                        "neuromask",
                        lambda e=explainer: neuromask_maps(e, images, predicted, ids, args.batch_size),
                        args.n,
                        True,
                        {"preset": preset, "overrides": overrides, "resolved": explainer.settings.as_dict()},
                    )
                )
    settings_of = {
        "saliency": {"captum": "Saliency", "abs": True, "channels": "max"},
        "integrated_gradients": {
            "captum": "IntegratedGradients",
            "baseline": "black",
            "n_steps": 32,
            "channels": "abs sum",
        },
        "gradcam": {"captum": "LayerGradCam", "layer": args.gradcam_layer, "relu": True, "upsample": "bilinear"},
        "occlusion": {"captum": "Occlusion", "window": 8, "stride": 4, "baseline": "black", "channels": "sum"},
        "extremal_perturbation": {
            "torchray": "extremal_perturbation",
            "areas": [args.ep_area],
            "max_iter": args.ep_max_iter,
            "variant": "preserve",
            "perturbation": "blur",
            "step": 7,
            "sigma": 21,
            "jitter": True,
        },
        "rise": {"torchray": "rise", "num_masks": args.rise_masks, "num_cells": 7, "p": 0.5, "seed": 0},
    }
    for method in PEER_METHODS:
        if method not in methods:
            continue
        if method == "extremal_perturbation":
            n = min(args.n, args.ep_n or args.n)
            fn = lambda n=n: extremal_maps(classifier, images[:n], predicted[:n], args)  # noqa: E731
        elif method == "rise":
            n = min(args.n, args.rise_n or args.n)
            fn = lambda n=n: rise_maps(classifier, images[:n], predicted[:n], args)  # noqa: E731
        else:
            n = args.n
            fn = lambda m=method: captum_maps(m, classifier, images, predicted, args)  # noqa: E731
        runs.append((method, method, fn, n, False, settings_of[method]))

    # Imports before the clocks start, so no method pays for them.
    if set(methods) & {"saliency", "integrated_gradients", "gradcam", "occlusion"}:
        import captum.attr  # noqa: F401
    if set(methods) & {"extremal_perturbation", "rise"}:
        import torchray.attribution.extremal_perturbation  # noqa: F401
        import torchray.attribution.rise  # noqa: F401

    rows: list[dict[str, Any]] = []
    all_maps: dict[str, Tensor] = {}
    for name, method, fn, n, is_mask, settings in runs:
        log.info("running %s on %d images ...", name, n)
        start = time.perf_counter()
        with frozen(classifier):
            maps = fn()
        seconds = time.perf_counter() - start
        maps, steps = maps if isinstance(maps, tuple) else (maps, None)
        if maps.shape != (n, 1, *images.shape[-2:]):
            raise RuntimeError(
                f"{name} returned maps of shape {tuple(maps.shape)}, expected {(n, 1, *images.shape[-2:])}"
            )
        all_maps[name] = maps
        per_image = evaluate(classifier, data, maps, predicted[:n], is_mask, args.tolerance, args.batch_size)
        metrics = aggregate(per_image, cue_subset)
        row = {
            "name": name,
            "method": method,
            "n": n,
            "seconds": seconds,
            "seconds_per_image": seconds / n,
            "metrics": metrics,
            "settings": settings,
        }
        if steps is not None:  # NeuroMask: mean optimisation steps per image (early stopping lowers it)
            row["steps_mean"] = float(steps.float().mean())
        if not args.no_per_image:
            row["per_image"] = {k: [round(float(v), 5) for v in vals] for k, vals in per_image.items()}
        rows.append(row)
        log.info("  %.1f s (%.4f s/img): %s", seconds, seconds / n, {k: round(v, 4) for k, v in metrics.items()})

    if args.dump_maps:
        torch.save(all_maps, args.dump_maps)
    argv_used = argv if argv is not None else sys.argv[1:]
    stability_md = ""
    if args.stability:
        stability_md = measure_stability(rows, all_maps, classifier, images, predicted, ids, args, argv_used)
    reference = args.reference
    if reference is None and presets and "neuromask" in methods:
        ref_steps = resolve_settings(presets[0], None, overrides).steps
        reference = f"neuromask:{presets[0]}@{ref_steps}{suffix}"
    targets = check_targets(rows, reference, spurious)
    table = markdown_table(rows, spurious)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:]))
    notes = (
        f"Localisation benchmark, `{args.variant}` variant, test split, first {args.n} images (seed {args.seed}); "
        f"shipped SmallCNN `localisation_{args.variant}.pt`; explained class: the prediction. "
        f"Pointing game: tolerance {args.tolerance:g} px, first maximum in raster order (`point`) or any tied maximum "
        f"(`point(any)`), on the digit's box. Energy: `energy_pointing(energy='shift')` on the box. Deletion (black) "
        f"and insertion (blur) AUC with {AUC_STEPS} steps on the raw maps. Selection/preservation: {MASK_BASELINE} "
        f"baseline, threshold {THRESHOLD}; NeuroMask masks as they are, other maps min-max normalised per image. "
        f"Area: mean of the [0, 1] map. s/img: wall clock of producing the maps, {torch.get_num_threads()} torch "
        f"threads, CPU."
    )
    if spurious:
        notes += (
            " Cue columns: over the `n cue` images with prediction == cue_label != label; `cue energy>0.5` = share "
            "with more than half the shifted saliency energy on the cue square."
        )
    parts = [f"Command: `{command}`", notes, table, targets_markdown(targets), stability_md]
    markdown = "\n\n".join(x for x in parts if x) + "\n"
    print(markdown)

    result = {
        "config": {
            "command": command,
            "variant": args.variant,
            "n": args.n,
            "seed": args.seed,
            "methods": methods,
            "presets": presets,
            "steps_list": args.steps_list,
            "overrides": overrides,
            "label": args.label,
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
            "tolerance": args.tolerance,
            "auc_steps": AUC_STEPS,
            "deletion_baseline": DELETION_BASELINE,
            "insertion_baseline": INSERTION_BASELINE,
            "mask_baseline": MASK_BASELINE,
            "threshold": THRESHOLD,
            "checkpoint": Path(checkpoint_path(args.variant)).name,
            "checkpoint_sha256": _sha256(checkpoint_path(args.variant)),
            "versions": _versions(),
            "accuracy": float((predicted == data["label"]).float().mean()),
            "n_cue": int(cue_subset.sum()) if cue_subset is not None else None,
        },
        "rows": rows,
        "targets": targets,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown)
    return result


if __name__ == "__main__":
    main()
