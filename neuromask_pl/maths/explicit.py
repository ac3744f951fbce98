"""The mask step of the ``default`` family with its gradient written out (the explicit mask gradient).

Autograd records some 150 small kernels for a ``default`` mask step (the two-scale mask, the sampled draw, the
sigmoids, total variation, the sparsity and detail terms, and their backward); on the CPU each costs a few
microseconds whatever its size, so around a small classifier the mask arithmetic, not the classifier, sets the
step's time. :func:`explicit_mask_step` computes the same loss (:func:`~neuromask_pl.maths.losses.loss_terms`) and
its gradient with the derivative written out: autograd runs only the classifier. The bilinear resizes are
products with interpolation matrices (:class:`Resize`), whose adjoint is the transposed product. It is the same
maths, rounded differently: tests/maths/test_explicit.py checks it against autograd in float64.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuromask_pl.fastcopy.invariant import planewise
from neuromask_pl.maths.losses import cross_entropy_grad, cross_entropy_values, loss_precision, total_loss
from neuromask_pl.maths.mask import join_grids, split_grids
from neuromask_pl.settings import MaskSettings

#: How the mask step's gradient is computed: see :func:`uses_explicit_gradient`.
MaskGradient = Literal["auto", "explicit", "autograd"]
MASK_GRADIENTS: tuple[str, ...] = get_args(MaskGradient)


def covers(settings: MaskSettings) -> bool:
    """Whether :func:`explicit_mask_step` covers the settings: the weights upsampled before the sigmoid, total
    variation of the mask, sparsity on the mask, black hidden pixels, no deletion game, no jitter."""
    return (
        settings.upsample_weights
        and settings.smooth_penalty == "tv"
        and settings.smooth_on == "mask"
        and settings.sparsity_on == "mask"
        and settings.baseline == "black"
        and not settings.l_delete
        and not settings.jitter
    )


def uses_explicit_gradient(choice: str, settings: MaskSettings, device: torch.device) -> bool:
    """Whether the mask steps run :func:`explicit_mask_step`: ``choice`` ``explicit``, or ``auto`` on the CPU, where
    the settings are :func:`covers`-ed and float16 autocast (per-sample loss scaling, by autograd) is off."""
    if choice not in MASK_GRADIENTS:
        raise ValueError(f"mask_gradient must be one of {list(MASK_GRADIENTS)}, got {choice!r}")
    if choice == "explicit" and not covers(settings):
        raise ValueError(
            "mask_gradient='explicit' covers settings with upsample_weights, smooth_penalty='tv', smooth_on='mask', "
            "sparsity_on='mask', baseline='black', no l_delete and no jitter; use 'auto' or 'autograd' for these"
        )
    float16 = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
    wanted = choice == "explicit" or (choice == "auto" and device.type == "cpu")
    return wanted and covers(settings) and not float16


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(size_in: int, size_out: int) -> Tensor:
    """(size_out, size_in) weights of 1-D linear interpolation as ``F.interpolate`` (``align_corners=False``)
    computes them, from the identity interpolated in float64."""
    identity = torch.eye(size_in, dtype=torch.float64).unsqueeze(1)
    return F.interpolate(identity, size=size_out, mode="linear", align_corners=False).squeeze(1).T.contiguous()


@dataclass(frozen=True)
class Resize:
    """Bilinear resizing (``align_corners=False``) of (..., h, w) planes to (..., H, W) as ``rows @ x @ cols.T``;
    :meth:`adjoint` is its transpose, the gradient of the resize. The same values as ``F.interpolate`` up to
    rounding; each plane is its own matrix product, so a plane's result does not depend on the others."""

    rows: Tensor  # (H, h)
    cols_t: Tensor  # (w, W)
    rows_t: Tensor  # (h, H): the transposes, contiguous, for the adjoint
    cols: Tensor  # (W, w)

    @classmethod
    def between(cls, size_in: tuple[int, int], size_out: tuple[int, int], like: Tensor) -> Resize | None:
        """The resize from ``size_in`` to ``size_out`` in ``like``'s dtype and device; None when they are equal."""
        if tuple(size_in) == tuple(size_out):
            return None
        rows = _interpolation_matrix(size_in[0], size_out[0]).to(like.device, like.dtype)
        cols = _interpolation_matrix(size_in[1], size_out[1]).to(like.device, like.dtype)
        return cls(rows, cols.T.contiguous(), rows.T.contiguous(), cols)

    def __call__(self, planes: Tensor) -> Tensor:
        return _planewise_product(self.rows, planes, self.cols_t)

    def adjoint(self, planes: Tensor) -> Tensor:
        return _planewise_product(self.rows_t, planes, self.cols)


def _planewise_product(left: Tensor, planes: Tensor, right: Tensor) -> Tensor:
    """``left @ plane @ right`` for each of (..., h, w) planes, as batched products (``torch.bmm``): each plane is its
    own product of the same shape, whatever the number of planes (a single matrix product over the stacked planes
    rows would take kernels by the row count on some CPUs, e.g. MKL's AVX2 ones)."""
    stacked = planes.reshape(-1, *planes.shape[-2:])
    count = stacked.shape[0]
    inner = torch.bmm(stacked, right.expand(count, *right.shape))
    out = torch.bmm(left.expand(count, *left.shape), inner)
    return out.reshape(*planes.shape[:-2], *out.shape[-2:])


def resize(planes: Tensor, by: Resize | None) -> Tensor:
    return planes if by is None else by(planes)


def resize_adjoint(planes: Tensor, by: Resize | None) -> Tensor:
    return planes if by is None else by.adjoint(planes)


def total_variation_parts(values: Tensor) -> tuple[Tensor, Tensor]:
    """Vertical and horizontal differences of neighbouring cells of (B, h, w) planes."""
    return values[:, 1:] - values[:, :-1], values[:, :, 1:] - values[:, :, :-1]


def total_variation_grad(vertical: Tensor, horizontal: Tensor) -> Tensor:
    """Gradient of ``mean|vertical| + mean|horizontal|`` (per plane) with respect to the planes they come from:
    each difference ``a - b`` adds its sign to ``a`` and subtracts it from ``b``."""
    dv = F.pad(vertical.sign().mul_(1.0 / vertical[0].numel()), (0, 0, 1, 1))
    dh = F.pad(horizontal.sign().mul_(1.0 / horizontal[0].numel()), (1, 1))
    return (dv[:, :-1] - dv[:, 1:]).add_(dh[..., :-1]).sub_(dh[..., 1:])


def mean_abs(planes: Tensor) -> Tensor:
    """``mean|x|`` per plane of (B, h, w) planes."""
    return torch.linalg.vector_norm(planes, 1, dim=(1, 2)) / planes[0].numel()


def planewise_sigmoid(planes: Tensor) -> Tensor:
    """``torch.sigmoid`` of (B, ...) planes by :func:`~neuromask_pl.fastcopy.invariant.planewise`: each plane's
    result the same alone or in any batch, whatever its size."""
    return planewise(torch.sigmoid, planes)


def sigmoid_grad(grad: Tensor, output: Tensor) -> Tensor:
    """``grad * s'(x)`` from the sigmoid's output ``s(x)``."""
    return torch.ops.aten.sigmoid_backward(grad, output)


@dataclass(frozen=True)
class MaskGrids:
    """The resizes of a mask: its coarse grid to the fine one (None for one grid) and the fine one to the image."""

    fine: tuple[int, int]
    coarse: tuple[int, int] | None
    coarse_to_fine: Resize | None
    to_image: Resize | None

    @classmethod
    def of(
        cls, fine: tuple[int, int], coarse: tuple[int, int] | None, image: tuple[int, int], like: Tensor
    ) -> MaskGrids:
        coarse_to_fine = Resize.between(coarse, fine, like) if coarse is not None else None
        return cls(tuple(fine), coarse, coarse_to_fine, Resize.between(fine, image, like))

    def split(self, weights: Tensor) -> tuple[Tensor, Tensor | None]:
        """(fine, coarse) planes, (B, h, w) and (B, hc, wc), of the learned weights (coarse None for one grid)."""
        if self.coarse is None:
            return weights.view(-1, *self.fine), None
        fine, coarse = split_grids(weights, self.fine, self.coarse)
        return fine.squeeze(1), coarse.squeeze(1)


def explicit_mask_step(
    classifier: nn.Module,
    images: Tensor,
    targets: Tensor,
    weights: Tensor,
    grids: MaskGrids,
    settings: MaskSettings,
    temperature: float,
    noise: Tensor | None,
    with_terms: bool = True,
) -> tuple[Tensor, dict[str, Tensor] | None, Tensor]:
    """One step's mask (B, 1, H, W), loss terms (each (B,), as :func:`~neuromask_pl.maths.losses.loss_terms`; None
    without ``with_terms``) and the gradient of the summed total loss with respect to ``weights`` (their shape), for
    settings that :func:`covers`. ``temperature`` is the step's; ``noise`` the step's logistic draw at the fine grid
    (1, 1, h, w) with ``settings.sample_temperature``, or None for the mask itself. Only the classifier runs under
    autocast.
    """
    t_mask = temperature
    t_seen = t_mask * settings.sample_temperature if noise is not None else t_mask
    device = images.device.type
    autocast_off = (  # entering autocast costs more than asking whether it is on
        (lambda: torch.autocast(device, enabled=False)) if torch.is_autocast_enabled(device) else contextlib.nullcontext
    )
    with autocast_off(), torch.no_grad():
        fine, coarse = grids.split(weights.detach())
        logits = fine if coarse is None else fine + resize(coarse, grids.coarse_to_fine)  # (B, h, w)
        # up(w) / T at the image's size (a new tensor: it is changed in place below)
        scaled = logits / t_mask if grids.to_image is None else grids.to_image(logits).mul_(1.0 / t_mask)
        mask = planewise_sigmoid(scaled)
        seen = mask
        if noise is not None:  # sigmoid((w / T + noise) / t) = sigmoid((up(w) / T + up(noise)) / t)
            drawn = scaled.add_(resize(noise.view(1, *grids.fine), grids.to_image))
            seen = planewise_sigmoid(
                drawn if settings.sample_temperature == 1 else drawn.mul_(1.0 / settings.sample_temperature)
            )
        masked = (images * seen.unsqueeze(1)).requires_grad_(True)
    with torch.enable_grad():
        outputs = classifier(masked)
    with autocast_off(), torch.no_grad():
        scores = loss_precision(outputs.detach())
        pred = cross_entropy_values(scores, targets)  # prediction_loss's values, without its graph
        # d total / d outputs, divided by t T: the factor of the seen mask's sigmoid, folded in here
        outputs_grad = cross_entropy_grad(scores, targets, settings.l_pred / t_seen).to(outputs.dtype)
    (masked_grad,) = torch.autograd.grad(outputs, masked, grad_outputs=outputs_grad)
    with autocast_off(), torch.no_grad():
        cells = planewise_sigmoid(logits * (1.0 / t_mask))  # the mask at the grid, for total variation
        vertical, horizontal = total_variation_parts(cells)
        detail = fine if coarse is not None else None
        terms = loss_values(pred.detach(), mask, vertical, horizontal, detail, settings) if with_terms else None
        image_grad = sigmoid_grad((masked_grad * images).sum(1).to(seen.dtype), seen)
        image_grad.addcmul_(mask, 1.0 - mask, value=settings.l_sparse / mask[0].numel() / t_mask)  # d sparse
        logits_grad = resize_adjoint(image_grad, grids.to_image)
        smooth_grad = total_variation_grad(vertical, horizontal)
        logits_grad.add_(sigmoid_grad(smooth_grad, cells), alpha=settings.l_smooth / t_mask)
        if coarse is None:
            return mask.unsqueeze(1), terms, logits_grad.view_as(weights)
        coarse_grad = resize_adjoint(logits_grad, grids.coarse_to_fine)
        fine_grad = logits_grad.add(fine.sign(), alpha=settings.l_detail / fine[0].numel())
    return mask.unsqueeze(1), terms, join_grids(fine_grad, coarse_grad)


def loss_values(
    pred: Tensor, mask: Tensor, vertical: Tensor, horizontal: Tensor, fine: Tensor | None, settings: MaskSettings
) -> dict[str, Tensor]:
    """The loss terms of :func:`~neuromask_pl.maths.losses.loss_terms` from the step's pieces (``fine`` None for
    one grid)."""
    zero = torch.zeros_like(pred)
    terms = {
        "pred": pred,
        "sparse": mask.mean((1, 2)),
        "smooth": mean_abs(vertical) + mean_abs(horizontal),
        "detail": mean_abs(fine) if fine is not None else zero,
        "delete": zero,
    }
    terms["total"] = total_loss(terms, settings, detail=fine is not None, delete=False)
    return terms
