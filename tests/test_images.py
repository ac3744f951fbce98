"""Image files of every common mode decode to the right [0, 1] pixels (tests written against PIL's own values)."""

from __future__ import annotations

import os
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from neuromask_pl.data import ImageFolderDataModule, images, read_image
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


# ----------------------------------------------------------------------------- hostile files


def test_a_fifo_named_like_an_image_is_skipped_without_opening_it(tmp_path, caplog) -> None:
    """Opening a FIFO for reading blocks until someone writes to it: the job would hang forever holding its lock."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    Image.fromarray((ramp(8, 8) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    datamodule = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=2, pin_memory=False)
    result: dict = {}
    reader = threading.Thread(target=lambda: result.update(batch=next(iter(datamodule.predict_dataloader()))))
    reader.start()
    reader.join(timeout=20)
    if reader.is_alive():  # unblock the hung open() so that the test run goes on, then fail
        os.close(os.open(tmp_path / "b.png", os.O_WRONLY))
        reader.join()
        pytest.fail("reading the folder opened the FIFO and hung")
    batch = result["batch"]
    assert batch["index"].tolist() == [0]
    [skipped] = batch["skipped"]
    assert skipped["index"] == 1 and "not a regular file" in skipped["error"] and "FIFO" in skipped["error"]
    assert "b.png" in caplog.text and "not a regular file" in caplog.text


def test_a_link_to_a_device_is_refused_as_not_a_regular_file(tmp_path) -> None:
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    with pytest.raises(UnsupportedImage, match="not a regular file.*character device"):
        read_image(str(tmp_path / "zero.png"))
    with pytest.raises(UnsupportedImage, match="not a regular file.*directory"):
        read_image(str(tmp_path))


def write_black_png(path, width: int, height: int) -> None:
    """A valid grey PNG of ``width`` x ``height`` black pixels, written in constant memory: about 100 KB for
    9,400 x 9,400 (a compressed field of zeros), 88 million pixels to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the row's pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_an_image_over_the_decode_budget_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch) -> None:
    path = tmp_path / "bomb.png"
    write_black_png(path, 9400, 9400)
    assert path.stat().st_size < 200_000
    assert 9400 * 9400 < Image.MAX_IMAGE_PIXELS, "under PIL's own limit: PIL would decode it"

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(UnsupportedImage, match=r"9400 x 9400 .*decode budget.*max_pixels"):
        read_image(str(path))
    # the memory budget alone refuses it too, naming what it would take
    with pytest.raises(UnsupportedImage, match=r"9400 x 9400 .* GB to decode.*max_decode_bytes"):
        read_image(str(path), max_pixels=None, max_decode_bytes=1 << 30)
    # within a budget it is read (small here, to keep the test fast)
    monkeypatch.undo()
    write_black_png(tmp_path / "small.png", 40, 30)
    assert read_image(str(tmp_path / "small.png"), max_pixels=1200, max_decode_bytes=None).shape == (3, 30, 40)
    with pytest.raises(UnsupportedImage, match=r"40 x 30 pixels .*max_pixels=1199"):
        read_image(str(tmp_path / "small.png"), max_pixels=1199)


def test_the_decode_budget_is_set_on_the_data_module_and_skips_with_its_reason(tmp_path, caplog) -> None:
    Image.fromarray((ramp(8, 8) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray((ramp(20, 20) * 255).astype(np.uint8)).save(tmp_path / "b.png")
    datamodule = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=2, max_pixels=100, pin_memory=False)
    batch = next(iter(datamodule.predict_dataloader()))
    assert batch["index"].tolist() == [0]
    [skipped] = batch["skipped"]
    assert skipped["index"] == 1 and "20 x 20 pixels" in skipped["error"] and "max_pixels=100" in skipped["error"]
    assert "b.png" in caplog.text and "decode budget" in caplog.text
    assert ImageFolderDataModule(str(tmp_path)).max_pixels == images.MAX_DECODE_PIXELS < Image.MAX_IMAGE_PIXELS
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_pixels"):
            ImageFolderDataModule(str(tmp_path), max_pixels=bad)
        with pytest.raises(ValueError, match="max_decode_bytes"):
            ImageFolderDataModule(str(tmp_path), max_decode_bytes=bad)
