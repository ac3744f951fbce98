"""Checks at the package's boundary: images going in, and the classifier frozen while explaining."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode without parameter gradients; restore every flag on exit."""
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.requires_grad) for p in module.parameters()]
    module.eval().requires_grad_(False)
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def check_images(images: Any) -> Tensor:
    """Validate a batch of images: a float tensor B x C x H x W, finite, in [0, 1]."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape B x C x H x W, got {type(images).__name__}")
    if images.ndim != 4:
        hint = " (add a batch dimension with images.unsqueeze(0))" if images.ndim == 3 else ""
        raise ValueError(f"images must have shape B x C x H x W, got {tuple(images.shape)}{hint}")
    if images.numel() == 0:
        raise ValueError(f"images are empty: shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be float in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf pixels; clean or drop those images first")
    low, high = float(images.min()), float(images.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(
            f"images must be in [0, 1] pixel space (masks hide pixels towards the baseline), got values in "
            f"[{low:.3g}, {high:.3g}]; put input normalisation inside the classifier wrapper"
        )
    return images
