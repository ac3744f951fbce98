"""NeuroMask loss terms as pure functions reduced per sample, and the temperature schedule.

Every term returns one value per image (shape ``(B,)``), so an image's loss, and
hence its mask, never depends on the other images of its batch.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from neuromask_pl.settings import MaskSettings

LOSS_TERMS = ("pred", "sparse", "smooth", "detail", "delete", "total")  # what loss_terms returns, in order


def laplacian_kernel(size: int) -> Tensor:
    """The reference's Laplacian: centre ``size**2 - 1``, every other tap -1; shape (1, 1, k, k)."""
    if size not in (3, 5):
        raise ValueError(f"Laplacian size must be 3 or 5, got {size}")
    kernel = -torch.ones(size, size)
    kernel[size // 2, size // 2] = size * size - 1
    return kernel.view(1, 1, size, size)


def laplacian_size(setting: int, height: int, width: int) -> int:
    """Kernel size for an image: the setting, or 5 for images >= 64 px a side, else 3."""
    size = setting or (5 if min(height, width) >= 64 else 3)
    if min(height, width) < size:
        raise ValueError(
            f"masks of {height}x{width} pixels are smaller than the {size}x{size} Laplacian; "
            "use larger images, a smaller mask_scale or laplacian=3"
        )
    return size


def prediction_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the target class per sample, computed in float32 (float64 stays float64), with a gradient
    that does not depend on the batch (:class:`TargetCrossEntropy`)."""
    return TargetCrossEntropy.apply(loss_precision(logits), targets)


def loss_precision(logits: Tensor) -> Tensor:
    """``logits`` in the precision the loss is computed in: float32, or float64 where they are float64."""
    return logits if logits.dtype == torch.float64 else logits.float()


def cross_entropy_values(logits: Tensor, targets: Tensor) -> Tensor:
    """Each row's cross-entropy of its target class, ``-log_softmax(logits)[target]`` (``F.cross_entropy``'s values,
    without a gradient of their own)."""
    return -torch.log_softmax(logits, 1).gather(1, targets.unsqueeze(1)).squeeze(1)


class TargetCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits, targets, reduction="none")``, the same values, with its gradient written out:
    ``(softmax(logits) - onehot(targets)) * grad``.

    Autograd's own backward (through ``log_softmax``) rounds a row's gradient differently with the number of rows on
    the CPU (4e-8 between a batch of 2 and one of 8, 10 classes), which the default's optimisation can grow into
    another mask. ``softmax`` runs row by row and the rest is exactly rounded arithmetic, so here each row's gradient
    is the same in any batch.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits, targets)
        return cross_entropy_values(logits, targets)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        logits, targets = ctx.saved_tensors
        return cross_entropy_grad(logits, targets, grad), None


def cross_entropy_grad(logits: Tensor, targets: Tensor, scale: Tensor | float) -> Tensor:
    """The gradient of ``scale`` times each row's cross-entropy with respect to its logits,
    ``(softmax(logits) - onehot(targets)) * scale``: row by row, the same in any batch."""
    probabilities = torch.softmax(logits, 1)
    probabilities.scatter_add_(1, targets.unsqueeze(1), probabilities.new_full((len(targets), 1), -1.0))
    return probabilities.mul_(scale.unsqueeze(1) if isinstance(scale, Tensor) else scale)


def temperature_at(settings: MaskSettings, step: int | None) -> float:
    """The temperature of optimisation step ``step`` (0-based; None = after the last step).

    Fixed, or with ``temperature_start > 0`` geometric from ``temperature_start`` at step 0 to
    ``temperature`` at the last step (and after it).
    """
    if not settings.temperature_start or step is None or settings.steps == 1:
        return settings.temperature
    frac = min(max(step / (settings.steps - 1), 0.0), 1.0)
    return settings.temperature_start * (settings.temperature / settings.temperature_start) ** frac


def lr_at(settings: MaskSettings, step: int) -> float:
    """The learning rate of optimisation step ``step`` (0-based): ``lr``, or with ``lr_end > 0`` ``lr`` for the
    first ``lr_hold`` of the steps, then geometric to ``lr_end`` at the last step."""
    if not settings.lr_end or settings.steps == 1:
        return settings.lr
    frac = min(max(step / (settings.steps - 1), 0.0), 1.0)
    frac = max(frac - settings.lr_hold, 0.0) / (1.0 - settings.lr_hold)
    return settings.lr * (settings.lr_end / settings.lr) ** frac


def settings_at(settings: MaskSettings, step: int | None) -> MaskSettings:
    """The settings in force at step ``step``: the annealed temperature replaces ``temperature``."""
    temperature = temperature_at(settings, step)
    return settings if temperature == settings.temperature else replace(settings, temperature=temperature)


def area_profile_loss(mask: Tensor, area: float) -> Tensor:
    """Mean squared gap between the sorted mask values and a binary mask keeping ``area`` of the pixels."""
    values = mask.flatten(1).sort(dim=1).values
    kept = round(area * values.shape[1])
    reference = torch.zeros_like(values)
    reference[:, values.shape[1] - kept :] = 1.0
    return (values - reference).pow(2).mean(1)


def sparsity(weights: Tensor, mask: Tensor, settings: MaskSettings) -> Tensor:
    """Reference ``mean|w + W|`` (on the weights), the mask's mean, or the area-profile gap, per sample."""
    if settings.sparsity_on == "weights":
        return (weights + settings.weight_limit).abs().flatten(1).mean(1)
    if settings.sparsity_on == "area":
        return area_profile_loss(mask, settings.area_target)
    return mask.flatten(1).mean(1)


def smoothness(weights: Tensor, kernel: Tensor, padding: str = "none") -> Tensor:
    """Mean squared Laplacian of the weights per sample, without padding (reference) or replicate-padded."""
    weights = weights.float()
    if padding == "replicate":
        weights = F.pad(weights, [kernel.shape[-1] // 2] * 4, mode="replicate")
    with torch.autocast(weights.device.type, enabled=False):  # float32 even under mixed precision
        response = F.conv2d(weights, kernel.to(weights.device, torch.float32))
    return response.pow(2).flatten(1).mean(1)


def smooth_term(weights: Tensor, kernel: Tensor, settings: MaskSettings) -> Tensor:
    """The smoothness penalty the settings ask for, on the weights or on the (coarse) mask, per sample."""
    values = weights if settings.smooth_on == "weights" else torch.sigmoid(weights / settings.temperature)
    if settings.smooth_penalty == "tv":
        return total_variation(values)
    return smoothness(values, kernel, settings.laplacian_padding)


def total_variation(values: Tensor) -> Tensor:
    """Mean absolute difference between vertically and horizontally neighbouring pixels, per sample."""
    values = values.float()
    vertical = (values[..., 1:, :] - values[..., :-1, :]).abs().flatten(1).mean(1)
    horizontal = (values[..., :, 1:] - values[..., :, :-1]).abs().flatten(1).mean(1)
    return vertical + horizontal


def detail_penalty(fine: Tensor) -> Tensor:
    """``mean|w_fine|`` per sample: the detail a two-scale mask adds to its coarse grid."""
    return fine.float().abs().flatten(1).mean(1)


def loss_terms(
    logits: Tensor,
    targets: Tensor,
    weights: Tensor,
    mask: Tensor,
    kernel: Tensor,
    settings: MaskSettings,
    fine: Tensor | None = None,
    logits_deleted: Tensor | None = None,
) -> dict[str, Tensor]:
    """The NeuroMask loss, term by term (unweighted), each of shape (B,), and ``total``, their weighted sum.

    ``weights`` are the mask's logits (for a two-scale mask, the coarse grid upsampled plus the fine one);
    ``fine`` are the fine weights of a two-scale mask, whose ``l_detail * mean|fine|`` is added to ``total``;
    ``logits_deleted`` are the logits of the images with the mask's region hidden (the deletion game), whose
    ``l_delete * deletion_loss`` is added to ``total``. Without them, ``detail`` and ``delete`` are zero.
    The keys are :data:`LOSS_TERMS`, in that order.
    """
    zero = torch.zeros(len(targets), device=targets.device)
    terms = {
        "pred": prediction_loss(logits, targets),
        "sparse": sparsity(weights, mask, settings),
        "smooth": smooth_term(weights, kernel, settings),
        "detail": detail_penalty(fine) if fine is not None else zero,
        "delete": deletion_loss(logits_deleted, targets) if logits_deleted is not None else zero,
    }
    terms["total"] = total_loss(terms, settings, detail=fine is not None, delete=logits_deleted is not None)
    return terms


def total_loss(terms: dict[str, Tensor], settings: MaskSettings, detail: bool, delete: bool) -> Tensor:
    """The weighted sum of the loss terms, per sample; the detail and deletion terms only where they exist."""
    total = settings.l_pred * terms["pred"] + settings.l_sparse * terms["sparse"] + settings.l_smooth * terms["smooth"]
    if detail and settings.l_detail:
        total = total + settings.l_detail * terms["detail"]
    if delete:
        total = total + settings.l_delete * terms["delete"]
    return total


def deletion_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """``-log(1 - p_target)`` per sample, computed stably from the logits: near 0 once the class is gone."""
    logits = logits.float()
    others = logits.scatter(1, targets.view(-1, 1), float("-inf"))
    return torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)
