"""Image files of every common mode decode to the right [0, 1] pixels (tests written against PIL's own values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from neuromask_pl.data import ImageFolderDataModule, read_image
from neuromask_pl.data.images import UnsupportedImage


def ramp(height: int = 4, width: int = 6) -> np.ndarray:
    return np.linspace(0.0, 1.0, height * width, dtype=np.float64).reshape(height, width)


def test_sixteen_bit_grey_png_is_not_clipped(tmp_path) -> None:
    values = np.round(ramp() * 65535).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    image = read_image(str(tmp_path / "g16.png"), channels=1)
    torch.testing.assert_close(image[0], torch.from_numpy(values / 65535.0).float(), rtol=0, atol=1e-7)
    Image.fromarray(np.array([[0, 300], [65535, 1000]], dtype=np.uint16)).save(tmp_path / "few.png")
    few = read_image(str(tmp_path / "few.png"), channels=1)[0]
    assert few[0, 1] == pytest.approx(300 / 65535) and few[1, 0] == 1.0  # 300 is nearly black, not white


def test_float_tiff_in_unit_range_is_read_as_it_is(tmp_path) -> None:
    values = ramp().astype(np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    image = read_image(str(tmp_path / "f.tif"), channels=3)
    assert image.shape == (3, 4, 6)
    torch.testing.assert_close(image, torch.from_numpy(values).expand(3, -1, -1), rtol=0, atol=0)


def test_float_tiff_outside_unit_range_is_refused_with_its_reason(tmp_path) -> None:
    Image.fromarray((ramp() * 300).astype(np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(UnsupportedImage, match="outside"):
        read_image(str(tmp_path / "f.tif"))


@pytest.mark.parametrize("mode", ["P", "CMYK", "RGBA", "LA", "1"])
def test_eight_bit_modes_equal_pils_rgb_conversion(tmp_path, mode) -> None:
    rgb = Image.fromarray((np.random.default_rng(0).random((5, 7, 3)) * 255).astype(np.uint8))
    source = rgb.convert(mode)
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    source.save(path)
    expected = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    torch.testing.assert_close(read_image(str(path)), torch.from_numpy(expected).permute(2, 0, 1))


def test_grey_and_colour_channels(tmp_path) -> None:
    rgb = (np.random.default_rng(1).random((5, 7, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    grey = read_image(str(tmp_path / "c.png"), channels=1)
    expected = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32) / 255
    assert grey.shape == (1, 5, 7)
    torch.testing.assert_close(grey[0], torch.from_numpy(expected))
    with pytest.raises(ValueError, match="channels"):
        read_image(str(tmp_path / "c.png"), channels=2)


def test_folder_module_reads_grey_files_as_one_channel(tmp_path) -> None:
    for k in range(3):
        Image.fromarray((ramp(28, 28) * 255 * (k + 1) / 3).astype(np.uint8)).save(tmp_path / f"{k}.png")
    datamodule = ImageFolderDataModule(str(tmp_path), image_size=28, channels=1, batch_size=3)
    batch = next(iter(datamodule.predict_dataloader()))
    assert batch["image"].shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataModule(str(tmp_path), channels=4)
