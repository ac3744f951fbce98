"""Decoding image files into [0, 1] float tensors, whatever their mode (8/16-bit, float, palette, CMYK)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

# PIL modes by how their values map to [0, 1].
_EIGHT_BIT = {"1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb limit (about 9459 x 9459)


class UnsupportedImage(ValueError):
    """An image file that decodes, but whose values cannot be mapped to [0, 1] pixels without guessing."""


def read_image(path: str, channels: int = 3) -> Tensor:
    """Decode an image file (EXIF orientation applied) into a float32 ``channels`` x H x W tensor in [0, 1].

    8-bit modes (grey, RGB, palette, CMYK, with or without alpha; alpha is dropped) are divided by 255;
    16-bit grey by 65535; 32-bit integer grey ("I", e.g. a 16-bit PNG on older Pillow) by 65535 when its
    values fit in 16 bits; 32-bit float grey ("F") is taken as it is when in [0, 1]. Grey becomes RGB by
    repeating it, colour becomes grey by ITU-R 601 luma (PIL's "L" conversion).

    Raises:
        UnsupportedImage: a mode or value range that has no unambiguous [0, 1] reading (the reason is named).
        OSError, ValueError: the file is not a readable image.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    with Image.open(path) as pil:
        if pil.width * pil.height > MAX_PIXELS:
            raise UnsupportedImage(f"{pil.width} x {pil.height} pixels is more than the {MAX_PIXELS} pixel limit")
        pil = ImageOps.exif_transpose(pil)
        mode = pil.mode
        if mode in _EIGHT_BIT:
            array = np.asarray(pil.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
        elif mode in _SIXTEEN_BIT or mode == "I":
            array = np.asarray(pil, dtype=np.float64)
            if array.min() < 0 or array.max() > 65535:
                raise UnsupportedImage(f"32-bit integer image with values in [{array.min():g}, {array.max():g}]")
            array = (array / 65535.0).astype(np.float32)
        elif mode == "F":
            array = np.asarray(pil, dtype=np.float32)
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
                raise UnsupportedImage(
                    f"32-bit float image with values outside [0, 1] (in [{np.nanmin(array):g}, {np.nanmax(array):g}])"
                )
        else:
            raise UnsupportedImage(f"image mode {mode!r} is not supported")
    image = torch.from_numpy(np.ascontiguousarray(array))
    if image.ndim == 2:  # grey
        image = image[None].expand(channels, -1, -1).clone()
    else:
        image = image.permute(2, 0, 1).contiguous()
    return image
