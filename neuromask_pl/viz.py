"""Drawing masks: colour map, overlays and explanation panels (pure torch functions).

Everything here takes and returns float images in [0, 1], channels first. The only side
effect is in :func:`save_png`, which writes files atomically (:func:`neuromask_pl.store.io.atomic_write`).
"""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
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


def panel_grid(
    images: Tensor, masks: Tensor, captions: Sequence[Mapping[str, Any]] | None = None, columns: int = 1
) -> Tensor:
    """One :func:`explanation_panel` per image (original | heat-map overlay | image * mask), in ``columns`` columns
    (one: stacked vertically).

    With ``captions`` (one mapping per image holding the keyword arguments of :func:`caption`: ``label``,
    ``prob_original``, ``prob_masked``, ``mask_area``), each panel is a :func:`captioned_panel`; panels of different
    widths are padded with white on the right.
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if captions is None:
        panels = [explanation_panel(image.cpu(), mask.cpu()) for image, mask in zip(images, masks)]
    else:
        if len(captions) != len(images):
            raise ValueError(f"expected one caption per image, got {len(captions)} for {len(images)} images")
        panels = [captioned_panel(i.cpu(), m.cpu(), **dict(c)) for i, m, c in zip(images, masks, captions)]
        height = max(p.shape[1] for p in panels)
        width = max(p.shape[2] for p in panels)
        panels = [F.pad(p, (0, width - p.shape[2], 0, height - p.shape[1]), value=1.0) for p in panels]
    return make_grid(panels, nrow=columns, padding=2, pad_value=1.0)


# -- captions ------------------------------------------------------------------------------------------------------
_MARGIN = 3  # pixels around and between the caption's lines
_BAR_MIN = 32  # the colour bar's smallest width in pixels
_LABEL_MAX = 40  # characters of a class name kept in a caption


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    """PIL's built-in bitmap font (no file, no download; the same pixels everywhere)."""
    bitmap = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1; load_default() may be FreeType
    return bitmap() if bitmap is not None else ImageFont.load_default()


def _printable(text: str) -> str:
    """ASCII the bitmap font can draw: accents dropped (cafe), anything else '?', long names shortened."""
    text = unicodedata.normalize("NFKD", str(text))
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= _LABEL_MAX else text[: _LABEL_MAX - 3] + "..."


def _number(value: Any) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "?"
    return "?" if math.isnan(value) else f"{value:.2f}"


def caption_text(
    label: str | None = None,
    prob_original: float | None = None,
    prob_masked: float | None = None,
    mask_area: float | None = None,
) -> list[str]:
    """The caption's text items: the class name, its probability before -> after masking, the mask's area.

    Items whose values are None are left out; NaN is written ``?``. E.g. ``["tabby", "p 0.93 -> 0.88",
    "area 0.12"]``.
    """
    items = []
    if label is not None and str(label) != "":
        items.append(_printable(label))
    if prob_original is not None or prob_masked is not None:
        items.append(f"prob {_number(prob_original)} -> {_number(prob_masked)}")
    if mask_area is not None:
        items.append(f"area {_number(mask_area)}")
    return items


def caption(
    picture: Tensor,
    label: str | None = None,
    prob_original: float | None = None,
    prob_masked: float | None = None,
    mask_area: float | None = None,
    colour_bar: bool = True,
) -> Tensor:
    """A picture with a white caption band below it: the :func:`caption_text` items (as many a line as fit) and the
    colour bar of the mask's heat map, ``hidden`` (0, black) to ``kept`` (1, pale yellow).

    Args:
        picture: (3, H, W), (1, H, W) or (H, W) image in [0, 1], e.g. an :func:`explanation_panel`.
        label: the explained class's name (or number).
        prob_original: the class's probability on the original image.
        prob_masked: the class's probability on the masked image.
        mask_area: the mean of the mask (the share of the image kept).
        colour_bar: draw the colour bar.

    Returns:
        (3, H + band, max(W, caption width)) float image in [0, 1]: the picture at the top left, white elsewhere.
    """
    if picture.dim() == 2:
        picture = picture.unsqueeze(0)
    rgb = _as_rgb(picture).clamp(0.0, 1.0)
    font = _font()
    items = caption_text(label, prob_original, prob_masked, mask_area)

    def width(text: str) -> int:
        return int(math.ceil(font.getlength(text)))

    line_height = max(font.getbbox("Hg")[3], 8) + 1
    ends = ("hidden ", " kept")
    bar_row = sum(width(e) for e in ends) + _BAR_MIN if colour_bar else 0
    total = max(rgb.shape[2], bar_row + 2 * _MARGIN, *(width(t) + 2 * _MARGIN for t in items))
    lines: list[str] = []
    for item in items:  # greedy: items joined on one line while they fit
        joined = f"{lines[-1]}  {item}" if lines else item
        if lines and width(joined) + 2 * _MARGIN <= total:
            lines[-1] = joined
        else:
            lines.append(item)
    rows = len(lines) + (1 if colour_bar else 0)
    if rows == 0:
        return rgb
    band = rows * line_height + (rows + 1) * _MARGIN
    canvas = Image.new("RGB", (total, rgb.shape[1] + band), (255, 255, 255))
    canvas.paste(Image.fromarray(to_uint8(rgb)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = rgb.shape[1] + _MARGIN
    for line in lines:
        draw.text((_MARGIN, y), line, fill=(0, 0, 0), font=font)
        y += line_height + _MARGIN
    if colour_bar:
        draw.text((_MARGIN, y), ends[0], fill=(0, 0, 0), font=font)
        left = _MARGIN + width(ends[0])
        right = total - _MARGIN - width(ends[1])
        ramp = colormap(torch.linspace(0.0, 1.0, right - left).expand(line_height - 2, -1))
        canvas.paste(Image.fromarray(to_uint8(ramp)), (left, y + 1))
        draw.text((right, y), ends[1], fill=(0, 0, 0), font=font)
    array = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)
    return array.float() / 255.0


def captioned_panel(
    image: Tensor,
    mask: Tensor,
    label: str | None = None,
    prob_original: float | None = None,
    prob_masked: float | None = None,
    mask_area: float | None = None,
    gap: int = 4,
) -> Tensor:
    """An :func:`explanation_panel` with its :func:`caption` (class, probability before -> after, mask area and the
    colour bar: bright = kept) below it; ``mask_area`` defaults to the mask's mean.

    Returns:
        (3, H + band, max(3 * W + 2 * gap, caption width)) float image in [0, 1].
    """
    panel = explanation_panel(image, mask, gap=gap)
    if mask_area is None:
        mask_area = float(mask.detach().float().mean())
    return caption(panel, label, prob_original, prob_masked, mask_area)
