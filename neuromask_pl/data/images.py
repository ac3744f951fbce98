"""Decoding image files into [0, 1] float tensors, whatever their mode (8/16-bit, float, palette, CMYK)."""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

# PIL modes by how their values map to [0, 1].
_EIGHT_BIT = {"1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa"}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}


MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb limit (about 9459 x 9459)
MAX_DECODE_PIXELS = 50_000_000
"""The default decode budget in pixels (e.g. 8,660 x 5,773), below PIL's bomb limit: a larger image is skipped from
its header, before anything is decoded."""
MAX_DECODE_BYTES = 2 << 30
"""The default decode budget in bytes of memory (2 GiB), as :func:`decode_bytes` estimates it from the header."""

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class UnsupportedImage(ValueError):
    """An image file that is not read: its values cannot be mapped to [0, 1] pixels without guessing, it is over
    the decode budget, or it is not a regular file (the reason is named)."""


def _open_regular_file(path: str) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (after symbolic links): a FIFO, socket or device is
    refused without opening it (opening a FIFO waits for a writer, forever), and checked again once open."""

    def refuse(mode: int) -> None:
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
        raise UnsupportedImage(f"not a regular file ({kind}); only regular files are opened as images")

    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        refuse(mode)
    # O_NONBLOCK: should it have become a FIFO since the check, opening it does not wait (refused below).
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            refuse(mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open_image(file: BinaryIO, path: str) -> Image.Image:
    """``Image.open`` of an open file; the error for a file that is no image names its path (as for a path)."""
    try:
        return Image.open(file)
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file {path!r}") from None


def _stored_bytes(mode: str) -> int:
    """Bytes per pixel PIL holds for an image of ``mode`` (several 8-bit bands take 4)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode in _SIXTEEN_BIT:
        return 2
    return 4


def decode_bytes(mode: str, width: int, height: int, channels: int = 3) -> int:
    """Peak memory :func:`read_image` takes to decode a ``width`` x ``height`` image of PIL ``mode``, estimated
    from its header, from above: PIL's pixels, their conversion and its packed copy, and the float arrays on the way
    to the ``channels`` x H x W float32 tensor. 35 bytes a pixel for an 8-bit RGB file read as RGB (28 measured),
    14 read as grey (14 measured), 34 for a 16-bit grey one read as RGB (24 measured)."""
    stored = _stored_bytes(mode)
    if mode in _EIGHT_BIT:
        per_pixel = stored + (1 if channels == 1 else 4) + channels + 2 * 4 * channels  # converted, packed, floats
    elif mode == "F":
        per_pixel = stored + 4 + 4 * channels
    else:  # 16- and 32-bit integers: float64 array and its scaled copy, float32, tensor
        per_pixel = stored + 8 + 8 + 4 + 4 * channels
    return width * height * per_pixel


def check_decode_budget(pil: Image.Image, channels: int, max_pixels: int | None, max_decode_bytes: int | None) -> None:
    """Raise :class:`UnsupportedImage` when an opened (not yet decoded) image is over the decode budget."""
    width, height = pil.size
    if width * height > MAX_PIXELS:
        raise UnsupportedImage(f"{width} x {height} pixels is more than PIL's {MAX_PIXELS} pixel limit")
    if max_pixels is not None and width * height > max_pixels:
        raise UnsupportedImage(
            f"{width} x {height} pixels ({width * height / 1e6:.1f} million) is over the decode budget of "
            f"{max_pixels} pixels (max_pixels={max_pixels}); raise it to read this image"
        )
    need = decode_bytes(pil.mode, width, height, channels)
    if max_decode_bytes is not None and need > max_decode_bytes:
        raise UnsupportedImage(
            f"{width} x {height} pixels ({pil.mode}) would take about {need / 1e9:.1f} GB to decode, over the decode "
            f"budget of {max_decode_bytes / 1e9:.1f} GB (max_decode_bytes={max_decode_bytes}); raise it to read "
            "this image"
        )


def read_image(
    path: str,
    channels: int = 3,
    max_pixels: int | None = MAX_DECODE_PIXELS,
    max_decode_bytes: int | None = MAX_DECODE_BYTES,
) -> Tensor:
    """Decode an image file (EXIF orientation applied) into a float32 ``channels`` x H x W tensor in [0, 1].

    8-bit modes (grey, RGB, palette, CMYK, with or without alpha; alpha is dropped) are divided by 255;
    16-bit grey by 65535; 32-bit integer grey ("I", e.g. a 16-bit PNG on older Pillow) by 65535 when its
    values fit in 16 bits; 32-bit float grey ("F") is taken as it is when in [0, 1]. Grey becomes RGB by
    repeating it, colour becomes grey by ITU-R 601 luma (PIL's "L" conversion).

    Only regular files are opened (not FIFOs, sockets or devices). The decode budget is checked from the file's
    header, before any pixel is decoded: at most ``max_pixels`` pixels and ``max_decode_bytes`` bytes of memory as
    :func:`decode_bytes` estimates it (None: no such budget; PIL's own bomb limit always holds).

    Raises:
        UnsupportedImage: a mode or value range that has no unambiguous [0, 1] reading, an image over the decode
            budget, or not a regular file (the reason is named).
        OSError, ValueError: the file is not a readable image.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    with _open_regular_file(path) as file, _open_image(file, path) as pil:
        check_decode_budget(pil, channels, max_pixels, max_decode_bytes)
        pil = ImageOps.exif_transpose(pil)
        mode = pil.mode
        if mode in _EIGHT_BIT:
            array = np.asarray(pil.convert("L" if channels == 1 else "RGB"), dtype=np.float32)
            array /= 255.0  # in place: one float array less at the peak
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
