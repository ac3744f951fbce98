"""neuromask_pl.load_results / neuromask_pl.results.Results: the inputs read back from their files exactly as the
classifier was given them, the explanation panel, and clear refusals where the store cannot give an input back."""

from __future__ import annotations

import json

import helpers
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import neuromask_pl
from neuromask_pl.data import ImageFolderDataModule, TensorDataModule
from neuromask_pl.data.images import UnsupportedImage
from neuromask_pl.module import NeuroMask
from neuromask_pl.results import Results, load_results


def write_folder(root, rng) -> None:
    """Images of several sizes and modes, so that decoding, resizing and cropping all take part."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "a" / "wide.png")
    Image.fromarray(rng.integers(0, 256, (25, 25), dtype=np.uint8)).save(root / "a" / "grey.png")
    Image.fromarray(rng.integers(0, 256, (40, 18, 4), dtype=np.uint8), "RGBA").save(root / "b" / "tall.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "b" / "exact.jpg")


def explain(tmp_path, classifier, datamodule):
    writer = neuromask_pl.MaskWriter(str(tmp_path / "out"))
    trainer = helpers.make_trainer(callbacks=[writer])
    return trainer.predict(NeuroMask(classifier, steps=1), datamodule=datamodule), tmp_path / "out"


@pytest.mark.parametrize("channels, resize", [(3, None), (3, 24), (1, None)])
def test_image_is_the_input_the_classifier_was_given(tmp_path, channels, resize) -> None:
    write_folder(tmp_path / "images", np.random.default_rng(0))
    classifier = helpers.make_tiny_cnn() if channels == 3 else nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )  # fmt: skip
    datamodule = ImageFolderDataModule(
        str(tmp_path / "images"), image_size=16, resize=resize, channels=channels, batch_size=3, pin_memory=False
    )
    outputs, out = explain(tmp_path, classifier, datamodule)
    given = {int(i): image for batch in outputs for i, image in zip(batch.ids, batch.images)}  # what it received
    results = neuromask_pl.load_results(out)
    assert isinstance(results, Results) and len(results) == len(given) == 4
    for sample_id, image in given.items():
        back = results.image(sample_id)
        assert back.dtype == torch.float32 and back.shape == (channels, 16, 16)
        assert torch.equal(back, image), results.row(sample_id)["path"]
        panel = results.panel(sample_id)
        assert panel.shape == (3, 16, 3 * 16 + 2 * 4)
    results.close()


def test_image_refuses_what_the_store_cannot_give_back(tmp_path) -> None:
    # In-memory data: the store keeps no images, and there is no file.
    _, out = explain(tmp_path / "memory", helpers.make_tiny_cnn(), TensorDataModule(helpers.make_images(2)))
    with load_results(out) as results:
        with pytest.raises(ValueError, match="read its images with TensorDataModule, and the store keeps no images"):
            results.image(0)
        with pytest.raises(KeyError):
            results.image(7)
    # Files: a file deleted since, and a file that was skipped as unreadable.
    images = tmp_path / "files" / "images"
    write_folder(images, np.random.default_rng(1))
    (images / "b" / "broken.png").write_bytes(b"not an image")
    datamodule = ImageFolderDataModule(str(images), image_size=16, batch_size=5, pin_memory=False)
    _, out = explain(tmp_path / "files", helpers.make_tiny_cnn(), datamodule)
    (images / "a" / "grey.png").unlink()
    with load_results(out) as results:
        ids = {row["path"].rsplit("/", 1)[-1]: row["sample_id"] for row in results.rows()}
        with pytest.raises(FileNotFoundError, match="grey.png' is no longer there"):
            results.image(ids["grey.png"])
        with pytest.raises(ValueError, match="broken.png\\) was skipped"):
            results.image(ids["broken.png"])
        with pytest.raises(ValueError, match="has no mask"):
            results.panel(ids["broken.png"])
        assert results.image(ids["wide.png"]).shape == (3, 16, 16)
    # The run's decode budget (a loading setting, in run.json) holds for reading back too.
    record = json.loads((out / "run.json").read_text())
    record["datamodule_hparams"]["max_pixels"] = 100
    (out / "run.json").write_text(json.dumps(record))
    with load_results(out) as results, pytest.raises(UnsupportedImage, match="max_pixels"):
        results.image(ids["wide.png"])
