"""Functional forms of the explanation metrics: pure functions returning one value per sample.

Deletion and insertion curves and their areas, the pointing game, energy pointing, mask area,
preservation and selection. The inputs (``images``, ``saliency``, ``masks``, ``targets``,
``classifier``, ``ground_truth``, ``baseline``) are described in :mod:`neuromask_pl.metrics`;
:mod:`neuromask_pl.metrics.classes` averages these values over batches and DDP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuromask_pl.data.checks import check_images, device_of, frozen
from neuromask_pl.maths.mask import apply_mask, make_baseline

TIE_RULES = ("first", "any", "all")
ENERGY_MODES = ("shift", "clamp")
# Petsiuk et al. (2018): deletion replaces pixels by zeros, insertion starts from a blurred image.
DELETION_BASELINE = "black"
INSERTION_BASELINE = "blur"
MASK_BASELINE = "black"

__all__ = [
    "DELETION_BASELINE",
    "ENERGY_MODES",
    "INSERTION_BASELINE",
    "MASK_BASELINE",
    "TIE_RULES",
    "auc",
    "boxes_to_masks",
    "deletion_auc",
    "deletion_curve",
    "energy_pointing",
    "insertion_auc",
    "insertion_curve",
    "mask_area",
    "pointing_game",
    "preservation",
    "saliency_ranks",
    "selection",
]


# ----------------------------------------------------------------------------------------- input checks


def _maps(maps: Any, name: str, batch: int | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """A saliency map or mask as a float tensor B x H x W (from B x 1 x H x W or B x H x W)."""
    if not isinstance(maps, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape B x 1 x H x W or B x H x W, got {type(maps).__name__}")
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3:
        hint = " (one map per image: sum or average the channels first)" if maps.ndim == 4 else ""
        raise ValueError(f"{name} must have shape B x 1 x H x W or B x H x W, got {tuple(maps.shape)}{hint}")
    if batch is not None and maps.shape[0] != batch:
        raise ValueError(f"{name} has {maps.shape[0]} maps for {batch} images; give one map per image")
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        raise ValueError(
            f"{name} is {tuple(maps.shape[-2:])} but the images are {tuple(size)}; upsample the maps to the "
            "image size first, e.g. with neuromask_pl.maths.mask.upsample_mask"
        )
    if maps.numel() == 0:
        raise ValueError(f"{name} are empty: shape {tuple(maps.shape)}")
    maps = maps.float() if not maps.is_floating_point() else maps
    if not torch.isfinite(maps).all():
        raise ValueError(f"{name} contain NaN or inf values; clean or drop those samples first")
    return maps


def _masks(masks: Any, batch: int | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """Masks B x H x W in [0, 1]."""
    masks = _maps(masks, "masks", batch, size)
    low, high = float(masks.min()), float(masks.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(
            f"masks must be in [0, 1] (1 keeps a pixel), got values in [{low:.3g}, {high:.3g}]; "
            "rescale the map, or use the saliency metrics (deletion, insertion, pointing) that take any scale"
        )
    return masks


def _check_steps(steps: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_choice(value: Any, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


def _targets(targets: Any, batch: int, device: torch.device) -> Tensor:
    targets = torch.as_tensor(targets, device=device).long().view(-1)
    if targets.numel() not in (1, batch):
        raise ValueError(f"targets must be one class or {batch} classes (one per image), got {targets.numel()}")
    return targets.expand(batch).clone()


def _baseline(images: Tensor, baseline: str | Tensor) -> Tensor:
    if isinstance(baseline, Tensor):
        try:
            return baseline.to(images.device, images.dtype).expand_as(images)
        except RuntimeError as error:
            raise ValueError(
                f"a baseline tensor must broadcast to the images {tuple(images.shape)}, got {tuple(baseline.shape)}"
            ) from error
    if not isinstance(baseline, str):
        raise TypeError(f"baseline must be 'black', 'mean', 'blur' or a tensor, got {type(baseline).__name__}")
    return make_baseline(images, baseline)


def _check_classifier(classifier: Any) -> nn.Module:
    if not isinstance(classifier, nn.Module):
        raise TypeError(f"classifier must be a torch.nn.Module returning logits, got {type(classifier).__name__}")
    return classifier


def _logits(classifier: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    """Float logits B x K of the frozen classifier (call inside ``frozen`` and ``no_grad``)."""
    logits = classifier(images)
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise TypeError(f"the classifier must return logits of shape B x K, got {got}")
    bad = targets[(targets < 0) | (targets >= logits.shape[1])]
    if bad.numel():
        raise ValueError(f"target class {int(bad[0])} is outside the classifier's {logits.shape[1]} classes")
    return logits.float()


def _prepare(
    classifier: Any, images: Any, maps: Any, targets: Any, *, masks: bool
) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """Checked classifier, images, maps (B x H x W) and targets, all on the classifier's device.

    ``maps`` are saliency maps of any scale, or masks in [0, 1] when ``masks`` is true.
    """
    images = check_images(images)
    batch, size = images.shape[0], tuple(images.shape[-2:])
    maps = _masks(maps, batch, size) if masks else _maps(maps, "saliency", batch, size)
    classifier = _check_classifier(classifier)
    device = device_of(classifier, images.device)
    images = images.to(device)
    return classifier, images, maps.to(device), _targets(targets, batch, device)


def _ground_truth(ground_truth: Any, batch: int, size: tuple[int, int], device: torch.device) -> Tensor:
    """Ground truth as a bool mask B x H x W; every sample must contain some object."""
    height, width = size
    boxes = isinstance(ground_truth, Tensor) and ground_truth.ndim == 2 and ground_truth.shape[-1] == 4
    if boxes or isinstance(ground_truth, (list, tuple)):
        gt = boxes_to_masks(ground_truth, height, width)
    elif isinstance(ground_truth, Tensor):
        if ground_truth.ndim == 4 and ground_truth.shape[1] == 1:
            ground_truth = ground_truth[:, 0]
        if ground_truth.ndim != 3:
            raise ValueError(
                "ground_truth must be a mask B x 1 x H x W or B x H x W, boxes B x 4 (x0, y0, x1, y1) or a list "
                f"of B box tensors K x 4, got shape {tuple(ground_truth.shape)}"
            )
        gt = ground_truth != 0
    else:
        raise TypeError(f"ground_truth must be a tensor or a list of box tensors, got {type(ground_truth).__name__}")
    if gt.shape[0] != batch or tuple(gt.shape[-2:]) != (height, width):
        raise ValueError(f"ground_truth covers {tuple(gt.shape)} but the maps are {(batch, height, width)}")
    empty = (~gt.flatten(1).any(1)).nonzero()[:, 0]
    if empty.numel():
        raise ValueError(
            f"ground_truth is empty for sample(s) {empty.tolist()[:10]} of the batch; localisation metrics are "
            "defined only for images that contain the object, so leave those samples out"
        )
    return gt.to(device)


# ------------------------------------------------------------------------------- faithfulness: curves


def saliency_ranks(saliency: Tensor) -> Tensor:
    """Rank of each pixel, B x (H W) in raster order: 0 for the most salient.

    Ties are broken by pixel index (raster order: row by row, left to right), via a stable sort,
    so equal values are removed or inserted top-left first, on any device.
    """
    flat = _maps(saliency, "saliency").flatten(1)
    order = torch.sort(-flat, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def _curve(
    classifier: nn.Module,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor | int,
    steps: int,
    baseline: str | Tensor,
    insert: bool,
) -> Tensor:
    _check_steps(steps)
    classifier, images, maps, targets = _prepare(classifier, images, saliency, targets, masks=False)
    base = _baseline(images, baseline)
    ranks = saliency_ranks(maps).view(maps.shape)[:, None]  # B x 1 x H x W
    pixels = maps[0].numel()
    curve = []
    with frozen(classifier), torch.no_grad():
        for k in range(steps + 1):
            chosen = ranks < -(-k * pixels // steps)  # the ceil(k N / steps) most salient pixels
            if insert:
                perturbed = torch.where(chosen, images, base)
            else:
                perturbed = torch.where(chosen, base, images)
            logits = _logits(classifier, perturbed, targets)
            curve.append(logits.softmax(-1).gather(1, targets[:, None])[:, 0])
    return torch.stack(curve, 1)


def deletion_curve(
    classifier: nn.Module,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor | int,
    steps: int = 20,
    baseline: str | Tensor = DELETION_BASELINE,
) -> Tensor:
    """Target-class probability as the most salient pixels are removed (Petsiuk et al., 2018).

    Column ``k`` (0..steps) is the softmax probability of the target class after the
    ``ceil(k N / steps)`` most salient of the N pixels (all channels) are replaced by the baseline:
    column 0 is the original image, column ``steps`` the baseline. Ties: see :func:`saliency_ranks`.

    Returns:
        B x (steps + 1) probabilities.
    """
    return _curve(classifier, images, saliency, targets, steps, baseline, insert=False)


def insertion_curve(
    classifier: nn.Module,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor | int,
    steps: int = 20,
    baseline: str | Tensor = INSERTION_BASELINE,
) -> Tensor:
    """Target-class probability as the most salient pixels are put back into the baseline.

    Column ``k`` is the probability with the ``ceil(k N / steps)`` most salient pixels taken from the
    image and the rest from the baseline: column 0 is the baseline, column ``steps`` the image.

    Returns:
        B x (steps + 1) probabilities.
    """
    return _curve(classifier, images, saliency, targets, steps, baseline, insert=True)


def auc(curve: Tensor) -> Tensor:
    """Trapezoidal area under curves sampled at equally spaced x in [0, 1] (shape ... x n, n >= 2)."""
    if not isinstance(curve, Tensor) or curve.ndim < 1 or curve.shape[-1] < 2:
        raise ValueError("auc needs curves with at least two points along the last dimension")
    curve = curve.float()
    return (curve.sum(-1) - 0.5 * (curve[..., 0] + curve[..., -1])) / (curve.shape[-1] - 1)


def deletion_auc(
    classifier: nn.Module,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor | int,
    steps: int = 20,
    baseline: str | Tensor = DELETION_BASELINE,
) -> Tensor:
    """Area under :func:`deletion_curve` per sample, (B,); lower is better."""
    return auc(deletion_curve(classifier, images, saliency, targets, steps, baseline))


def insertion_auc(
    classifier: nn.Module,
    images: Tensor,
    saliency: Tensor,
    targets: Tensor | int,
    steps: int = 20,
    baseline: str | Tensor = INSERTION_BASELINE,
) -> Tensor:
    """Area under :func:`insertion_curve` per sample, (B,); higher is better."""
    return auc(insertion_curve(classifier, images, saliency, targets, steps, baseline))


# ------------------------------------------------------------------------------------------ localisation


def boxes_to_masks(boxes: Tensor | Sequence[Tensor], height: int, width: int) -> Tensor:
    """Bool masks B x H x W from boxes ``(x0, y0, x1, y1)`` in pixels.

    ``boxes`` is B x 4 (one box per image) or a list of B tensors K x 4 (or 4,), whose union is taken.
    Pixel ``(x, y)`` is inside when its centre ``(x + 0.5, y + 0.5)`` lies in the closed box, so integer
    boxes select ``[y0:y1, x0:x1]``.
    """
    if isinstance(boxes, Tensor):
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be B x 4 (x0, y0, x1, y1), got shape {tuple(boxes.shape)}")
        per_image = [b[None] for b in boxes]
    else:
        per_image = [torch.as_tensor(b).reshape(-1, 4) for b in boxes]
    device = per_image[0].device if per_image else torch.device("cpu")
    xs = torch.arange(width, device=device, dtype=torch.float64) + 0.5
    ys = torch.arange(height, device=device, dtype=torch.float64) + 0.5
    out = torch.zeros(len(per_image), height, width, dtype=torch.bool, device=device)
    for i, image_boxes in enumerate(per_image):
        for x0, y0, x1, y1 in image_boxes.to(device, torch.float64):
            inside_x = (xs >= x0) & (xs <= x1)
            inside_y = (ys >= y0) & (ys <= y1)
            out[i] |= inside_y[:, None] & inside_x[None, :]
    return out


def _within_tolerance(gt: Tensor, tolerance: float) -> Tensor:
    """Pixels whose centre is at most ``tolerance`` pixels (Euclidean) from a ground-truth pixel."""
    height, width = gt.shape[-2:]
    if tolerance * tolerance >= (height - 1) ** 2 + (width - 1) ** 2:
        return torch.ones_like(gt)
    radius = int(math.floor(tolerance))
    offsets = torch.arange(-radius, radius + 1, device=gt.device, dtype=torch.float32)
    disk = (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= tolerance * tolerance).float()
    reach = F.conv2d(gt[:, None].float(), disk[None, None], padding=radius)  # exact: sums of 0/1
    return reach[:, 0] > 0.5


def pointing_game(
    saliency: Tensor, ground_truth: Tensor | Sequence[Tensor], tolerance: float = 15, ties: str = "first"
) -> Tensor:
    """Pointing game (Zhang et al., 2016): does the saliency maximum fall on the object?

    A hit when the Euclidean distance between the maximum's pixel and the nearest ground-truth pixel
    is at most ``tolerance`` pixels (``tolerance=0``: the maximum must lie on the object). Tied maxima:
    ``ties="first"`` takes the first in raster order (row by row, as ``torch.argmax`` and TorchRay's
    benchmark do); ``"any"`` hits if any maximum does (Quantus's ``PointingGame``); ``"all"`` only if
    every maximum does. Every sample needs a non-empty ground truth (ValueError otherwise).

    Returns:
        bool (B,).
    """
    _check_choice(ties, TIE_RULES, "tie rule")
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number of pixels >= 0, got {tolerance!r}")
    maps = _maps(saliency, "saliency")
    gt = _ground_truth(ground_truth, maps.shape[0], tuple(maps.shape[-2:]), maps.device)
    flat = maps.flatten(1)
    maxima = flat == flat.max(1, keepdim=True).values
    if ties == "first":
        width = maps.shape[-1]
        pixel = torch.arange(flat.shape[1], device=flat.device)
        first = torch.where(maxima, pixel, flat.shape[1]).min(1).values  # explicit: first maximum
        py, px = (first // width)[:, None, None], (first % width)[:, None, None]
        ys = torch.arange(maps.shape[-2], device=flat.device)[None, :, None]
        xs = torch.arange(width, device=flat.device)[None, None, :]
        distance2 = ((ys - py) ** 2 + (xs - px) ** 2).masked_fill(~gt, torch.iinfo(torch.long).max)
        return distance2.flatten(1).min(1).values <= tolerance * tolerance
    reach = _within_tolerance(gt, float(tolerance)).flatten(1)
    if ties == "any":
        return (maxima & reach).any(1)
    return (~maxima | reach).all(1)


def energy_pointing(saliency: Tensor, ground_truth: Tensor | Sequence[Tensor], energy: str = "shift") -> Tensor:
    """Energy-based pointing game (Wang et al., Score-CAM, 2020): share of the saliency inside the object.

    ``energy="shift"`` (default) uses ``saliency - min(saliency)`` per map, like Score-CAM's min-max
    normalised maps, so the result is unchanged by any positive scale and offset; ``"clamp"`` uses the
    positive part only (negative evidence ignored). A map with no energy (constant, or nothing positive
    with ``"clamp"``) counts as uniform: its share is the object's area fraction. Every sample needs a
    non-empty ground truth.

    Returns:
        float (B,) in [0, 1].
    """
    _check_choice(energy, ENERGY_MODES, "energy")
    maps = _maps(saliency, "saliency")
    gt = _ground_truth(ground_truth, maps.shape[0], tuple(maps.shape[-2:]), maps.device).flatten(1)
    flat = maps.flatten(1).float()
    if energy == "shift":
        flat = flat - flat.min(1, keepdim=True).values
    else:
        flat = flat.clamp_min(0)
    total = flat.sum(1)
    inside = (flat * gt).sum(1)
    uniform = gt.float().mean(1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(total.dtype).tiny), uniform)


# ------------------------------------------------------------------------------------------------ masks


def mask_area(masks: Tensor) -> Tensor:
    """Mean mask value per sample (the kept share of the image), (B,); masks in [0, 1]."""
    return _masks(masks).flatten(1).mean(1)


def _kept(
    classifier: nn.Module,
    images: Tensor,
    masks: Tensor,
    targets: Tensor | int,
    baseline: str | Tensor,
    threshold: float | None,
) -> Tensor:
    classifier, images, maps, targets = _prepare(classifier, images, masks, targets, masks=True)
    if threshold is not None:
        maps = (maps > threshold).to(images.dtype)
    masked = apply_mask(images, maps[:, None].to(images.dtype), _baseline(images, baseline))
    with frozen(classifier), torch.no_grad():
        logits = _logits(classifier, masked, targets)
    return logits.argmax(-1) == targets


def preservation(
    classifier: nn.Module, images: Tensor, masks: Tensor, targets: Tensor | int, baseline: str | Tensor = MASK_BASELINE
) -> Tensor:
    """Does the soft-masked image ``x m + (1 - m) baseline`` keep the target class (top-1)? bool (B,)."""
    return _kept(classifier, images, masks, targets, baseline, None)


def selection(
    classifier: nn.Module,
    images: Tensor,
    masks: Tensor,
    targets: Tensor | int,
    threshold: float = 0.5,
    baseline: str | Tensor = MASK_BASELINE,
) -> Tensor:
    """Does the image keep the target class (top-1) with only the pixels where ``mask > threshold``,
    the rest replaced by the baseline? bool (B,)."""
    return _kept(classifier, images, masks, targets, baseline, float(threshold))
