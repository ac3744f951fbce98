"""Tests for neuromask_pl.viz: colour map, overlays, panels and PNG writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from neuromask_pl.viz import atomic_write, colormap, explanation_panel, overlay, save_png, to_uint8

# matplotlib's inferno at 0 and 1 (first and last entries of its table)
INFERNO_0 = (0.001462, 0.000466, 0.013866)
INFERNO_1 = (0.988362, 0.998364, 0.644924)


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """Rec. 709 relative luminance of (..., 3, H, W) RGB."""
    weights = torch.tensor([0.2126, 0.7152, 0.0722]).view(3, 1, 1)
    return (rgb * weights).sum(-3)


def test_colormap_endpoints_and_shape():
    values = torch.tensor([[0.0, 1.0]])
    rgb = colormap(values)
    assert rgb.shape == (3, 1, 2)
    torch.testing.assert_close(rgb[:, 0, 0], torch.tensor(INFERNO_0), atol=1e-3, rtol=0)
    torch.testing.assert_close(rgb[:, 0, 1], torch.tensor(INFERNO_1), atol=1e-3, rtol=0)
    assert colormap(torch.rand(2, 5, 4, 6)).shape == (2, 5, 3, 4, 6)


def test_colormap_brightness_increases_and_out_of_range_is_clamped():
    ramp = torch.linspace(0, 1, 501).view(1, -1)
    lum = luminance(colormap(ramp))[0]
    assert torch.all(lum[1:] > lum[:-1])
    assert lum[-1] > 0.9 and lum[0] < 0.01
    torch.testing.assert_close(colormap(torch.tensor([[-3.0, 7.0]])), colormap(torch.tensor([[0.0, 1.0]])))
    with pytest.raises(ValueError, match="H, W"):
        colormap(torch.zeros(5))


def test_overlay_shape_range_and_blend():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 8, 10, generator=gen)
    mask = torch.rand(1, 8, 10, generator=gen)
    out = overlay(image, mask, alpha=0.3)
    assert out.shape == (3, 8, 10)
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out, 0.7 * image + 0.3 * colormap(mask[0]))
    torch.testing.assert_close(overlay(image, mask, alpha=0.0), image)
    # a grey image is repeated to RGB; a low-resolution mask is resized to the image
    assert overlay(image[:1], torch.rand(1, 4, 5, generator=gen)).shape == (3, 8, 10)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, mask, alpha=1.5)
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        overlay(image, torch.rand(2, 8, 10))


@pytest.mark.parametrize("channels", [3, 1])
def test_panel_layout(channels):
    gen = torch.Generator().manual_seed(1)
    h, w, gap = 6, 7, 3
    image = torch.rand(channels, h, w, generator=gen)
    mask = torch.rand(1, h, w, generator=gen)
    panel = explanation_panel(image, mask, gap=gap)
    assert panel.shape == (3, h, 3 * w + 2 * gap)
    rgb = image.expand(3, h, w)
    assert torch.equal(panel[:, :, :w], rgb)
    assert torch.equal(panel[:, :, w : w + gap], torch.ones(3, h, gap))
    torch.testing.assert_close(panel[:, :, w + gap : 2 * w + gap], overlay(rgb, mask))
    assert torch.equal(panel[:, :, 2 * (w + gap) :], rgb * mask)


def test_to_uint8_and_save_png_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(2)
    img = torch.rand(3, 9, 11, generator=gen)
    array = to_uint8(img)
    assert array.shape == (9, 11, 3) and array.dtype == np.uint8
    expected = np.round(img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(array, expected)

    path = save_png(img, tmp_path / "x.png")
    with Image.open(path) as png:
        assert png.mode == "RGB" and png.size == (11, 9)
        np.testing.assert_array_equal(np.asarray(png), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no temporary file left


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as f:
        f.write("half-written")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
