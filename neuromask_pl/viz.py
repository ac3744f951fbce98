"""Drawing masks: colour map, overlays and explanation panels (pure torch functions).

Everything here takes and returns float images in [0, 1], channels first. The only side
effect is in :func:`save_png`, which writes files atomically (:func:`neuromask_pl.store.io.atomic_write`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from neuromask_pl.store.io import atomic_write

# 18 evenly spaced samples of matplotlib's 'inferno' map (entries 0, 15, ..., 255 of its 256-entry table).
# Linear interpolation between them stays within 0.021 of the full table; luminance rises monotonically.
_INFERNO = torch.tensor(
    [
        (0.0015, 0.0005, 0.0139),
        (0.0377, 0.0259, 0.1322),
        (0.1167, 0.0476, 0.2723),
        (0.2179, 0.0366, 0.3835),
        (0.3163, 0.0535, 0.4251),
        (0.4101, 0.0879, 0.4331),
        (0.5035, 0.1216, 0.4234),
        (0.5969, 0.1548, 0.3981),
        (0.6887, 0.1922, 0.3576),
        (0.7751, 0.2397, 0.3035),
        (0.8514, 0.3023, 0.2396),
        (0.9130, 0.3816, 0.1698),
        (0.9569, 0.4754, 0.0947),
        (0.9819, 0.5794, 0.0262),
        (0.9875, 0.6904, 0.0800),
        (0.9731, 0.8054, 0.2169),
        (0.9476, 0.9174, 0.4107),
        (0.9884, 0.9984, 0.6449),
    ]
)


def colormap(values: Tensor) -> Tensor:
    """Map values in [0, 1] to RGB with the perceptually ordered 'inferno' map.

    Args:
        values: tensor of shape (..., H, W); values outside [0, 1] are clamped, NaN maps to 0.

    Returns:
        Float tensor of shape (..., 3, H, W) in [0, 1]: 0 (hidden) is black, 1 (kept) is pale yellow.
    """
    if values.dim() < 2:
        raise ValueError(f"colormap expects values of shape (..., H, W), got shape {tuple(values.shape)}")
    v = values.detach().float().nan_to_num(0.0).clamp(0.0, 1.0)
    table = _INFERNO.to(v.device)
    pos = v * (len(table) - 1)
    low = pos.floor().long().clamp(max=len(table) - 2)
    frac = (pos - low).unsqueeze(-1)
    rgb = table[low] * (1.0 - frac) + table[low + 1] * frac  # (..., H, W, 3)
    return rgb.movedim(-1, -3)


def _as_rgb(image: Tensor) -> Tensor:
    """Check a (C, H, W) image with C in {1, 3} and return it as float RGB."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image of shape (1, H, W) or (3, H, W), got shape {tuple(image.shape)}")
    image = image.detach().float()
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def _fit_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Check a (1, H, W) or (H, W) mask and resize it (bilinear) to ``size``; returns (1, H, W)."""
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3 or mask.shape[0] != 1:
        raise ValueError(f"expected a mask of shape (1, H, W) or (H, W), got shape {tuple(mask.shape)}")
    mask = mask.detach().float()
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask[None], size=size, mode="bilinear", align_corners=False)[0]
    return mask


def overlay(image: Tensor, mask: Tensor, alpha: float = 0.5) -> Tensor:
    """Blend an image with the heat map of its mask.

    Args:
        image: (3, H, W) or (1, H, W) image in [0, 1].
        mask: (1, H, W) or (H, W) mask in [0, 1]; resized to the image if needed.
        alpha: weight of the heat map, in [0, 1].

    Returns:
        (3, H, W) float image in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _as_rgb(image)
    heat = colormap(_fit_mask(mask, rgb.shape[-2:])[0])
    return ((1.0 - alpha) * rgb + alpha * heat).clamp(0.0, 1.0)


def explanation_panel(image: Tensor, mask: Tensor, gap: int = 4) -> Tensor:
    """Side-by-side strip: original | heat-map overlay | image * mask (what the classifier still sees).

    Args:
        image: (3, H, W) or (1, H, W) image in [0, 1]; grey images are repeated to RGB.
        mask: (1, H, W) or (H, W) mask in [0, 1]; resized to the image if needed.
        gap: width in pixels of the white separators.

    Returns:
        (3, H, 3 * W + 2 * gap) float image in [0, 1].
    """
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    rgb = _as_rgb(image)
    m = _fit_mask(mask, rgb.shape[-2:])
    sep = rgb.new_ones(3, rgb.shape[1], gap)
    return torch.cat([rgb, sep, overlay(rgb, m), sep, rgb * m], dim=2)


def to_uint8(img: Tensor) -> np.ndarray:
    """Convert a (3, H, W), (1, H, W) or (H, W) image in [0, 1] to an H x W x 3 uint8 array."""
    if img.dim() == 2:
        img = img.unsqueeze(0)
    rgb = _as_rgb(img).clamp(0.0, 1.0)
    return (rgb * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def save_png(img: Tensor, path: str | os.PathLike[str]) -> Path:
    """Write an image in [0, 1] ((3, H, W), (1, H, W) or (H, W)) as an 8-bit RGB PNG, atomically."""
    array = to_uint8(img)
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG")
    return Path(path)


def panel_grid(images: Tensor, masks: Tensor) -> Tensor:
    """One :func:`explanation_panel` per image (original | heat-map overlay | image * mask), stacked vertically."""
    panels = [explanation_panel(image.cpu(), mask.cpu()) for image, mask in zip(images, masks)]
    return make_grid(panels, nrow=1, padding=2, pad_value=1.0)
