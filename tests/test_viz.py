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


def test_captioned_panel_has_a_caption_band_that_says_what_it_shows():
    from neuromask_pl.viz import caption_text, captioned_panel

    gen = torch.Generator().manual_seed(3)
    h, w, gap = 32, 32, 4
    image = torch.rand(3, h, w, generator=gen)
    mask = torch.rand(1, h, w, generator=gen)
    a = captioned_panel(image, mask, label="tabby", prob_original=0.93, prob_masked=0.88, mask_area=0.12)
    b = captioned_panel(image, mask, label="goldfish", prob_original=0.41, prob_masked=0.07, mask_area=0.55)
    assert a.shape[1] > h and a.shape[2] >= 3 * w + 2 * gap  # a band below the panel, at least as wide
    # the panel itself is unchanged at the top left
    assert np.array_equal(to_uint8(a[:, :h, : 3 * w + 2 * gap]), to_uint8(explanation_panel(image, mask, gap=gap)))
    band_a, band_b = to_uint8(a[:, h:]), to_uint8(b[:, h:])
    assert (band_a < 128).any()  # text drawn (dark on white)
    assert band_a.shape != band_b.shape or not np.array_equal(band_a, band_b)  # two samples, two captions
    # the colour bar: the map's dark end on the left, its bright end on the right, in the last rows
    rows = a[:, h:]
    lum = luminance(rows)
    bar_rows = lum[-8:]
    assert (bar_rows < 0.05).any() and (bar_rows > 0.9).any()
    assert caption_text("tabby", 0.93, 0.88, 0.12) == ["tabby", "prob 0.93 -> 0.88", "area 0.12"]
    assert caption_text("caf\u00e9\n\u732b", float("nan"), 0.5) == ["cafe??", "prob ? -> 0.50"]
    # the area defaults to the mask's mean
    c = captioned_panel(image, torch.zeros(1, h, w))
    assert c.shape[1] > h


def test_panel_grid_with_captions_pads_panels_and_keeps_the_plain_grid():
    from neuromask_pl.viz import panel_grid

    gen = torch.Generator().manual_seed(4)
    images, masks = torch.rand(3, 3, 8, 8, generator=gen), torch.rand(3, 1, 8, 8, generator=gen)
    plain = panel_grid(images, masks)
    assert plain.shape[1] == 3 * 8 + 4 * 2  # unchanged without captions
    captions = [{"label": name, "prob_original": 0.9, "prob_masked": 0.5} for name in ("a", "a much longer name", "b")]
    grid = panel_grid(images, masks, captions)
    assert grid.shape[1] > plain.shape[1] and grid.shape[2] > plain.shape[2]
    wide = panel_grid(images, masks, captions, columns=3)
    assert wide.shape[2] > grid.shape[2] and wide.shape[1] < grid.shape[1]
    with pytest.raises(ValueError, match="one caption per image"):
        panel_grid(images, masks, captions[:2])
