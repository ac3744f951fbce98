"""neuromask_pl.data.modules, the DataModules: image folders (geometry, colours, sample ids, labels, unreadable
files, workers), tensors and the demo photos."""

from __future__ import annotations

import io
import logging
import os
import pickle
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from neuromask_pl.data import DemoDataModule, ImageFolderDataModule, TensorDataModule

# --------------------------------------------------------------------------- helpers


def save_solid(path, size_wh, colour, mode="RGB", fmt=None):
    """Write a solid-colour image; ``colour`` is the RGB it should decode to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = {"RGB": tuple(colour), "L": colour[0], "RGBA": (*colour, 77)}[mode]
    Image.new(mode, size_wh, fill).save(path, format=fmt)
    return path


def save_corrupt(tmp_path):
    """A .jpg of random bytes and a PNG cut in half."""
    rng = np.random.default_rng(0)
    bad_jpg = tmp_path / "b_random.jpg"
    bad_jpg.write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    bad_png = tmp_path / "c_truncated.png"
    bad_png.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return bad_jpg, bad_png


def all_batches(dm, stage="predict"):
    dm.setup(stage)
    loader = dm.predict_dataloader() if stage == "predict" else dm.test_dataloader()
    return list(loader)


def by_id(batches):
    """Map sample id -> (image, path, label) over all batches."""
    out = {}
    for b in batches:
        for i, idx in enumerate(b["index"].tolist()):
            assert idx not in out
            path = b["path"][i] if "path" in b else None
            label = int(b["label"][i]) if "label" in b else None
            out[idx] = (b["image"][i], path, label)
    return out


# Known colours; the L image decodes to grey, so its expected colour is (v, v, v).
COLOURED = [
    # relative path, size (w, h), mode, colour
    ("a/red.png", (40, 30), "RGB", (255, 0, 0)),
    ("a/sub/grey.png", (64, 64), "L", (128, 128, 128)),
    ("b/rgba.png", (30, 50), "RGBA", (0, 0, 255)),
    ("b/photo.jpg", (80, 60), "RGB", (20, 200, 60)),
    ("c.PNG", (17, 23), "RGB", (250, 250, 0)),
]


@pytest.fixture
def colour_folder(tmp_path):
    for rel, size, mode, colour in COLOURED:
        save_solid(tmp_path / rel, size, colour, mode)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    save_solid(tmp_path / ".hidden" / "x.png", (8, 8), (1, 2, 3))
    return tmp_path


# --------------------------------------------------------------------------- ImageFolderDataModule


def test_folder_shapes_ids_paths_and_colours(colour_folder):
    dm = ImageFolderDataModule(str(colour_folder), image_size=16, batch_size=2)
    batches = all_batches(dm)
    expected_order = sorted(rel for rel, *_ in COLOURED)  # sorted relative paths define the ids
    assert [len(b["index"]) for b in batches] == [2, 2, 1]
    for b in batches:
        assert set(b) == {"image", "index", "path", "skipped"}  # no labels requested
        assert b["image"].dtype == torch.float32 and b["index"].dtype == torch.long
        assert b["image"].shape[1:] == (3, 16, 16)
        assert b["skipped"] == []
    samples = by_id(batches)
    assert sorted(samples) == list(range(len(COLOURED)))
    colours = {rel: colour for rel, _, _, colour in COLOURED}
    for idx, (image, path, _) in samples.items():
        rel = expected_order[idx]
        assert os.path.isabs(path) and path == str(colour_folder / rel)
        expected = torch.tensor(colours[rel], dtype=torch.float32).view(3, 1, 1) / 255
        tol = 3 / 255 if rel.endswith(".jpg") else 1e-6
        assert torch.allclose(image, expected.expand_as(image), atol=tol), rel


def test_resize_and_center_crop_follow_the_geometry(tmp_path):
    # Red channel is a ramp 4*x over a 60 x 30 image. Shorter side 30 -> 10 scales by 1/3, giving a
    # 20 x 10 image; the centre crop starts at column 5, so output column j samples source x = 3j + 16.
    width, height = 60, 30
    ramp = np.zeros((height, width, 3), dtype=np.uint8)
    ramp[..., 0] = 4 * np.arange(width)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    image = all_batches(ImageFolderDataModule(str(tmp_path), image_size=10))[0]["image"][0]
    expected = (12 * torch.arange(10) + 64).float() / 255
    assert torch.allclose(image[0], expected.expand(10, 10), atol=1.01 / 255)
    assert image[1:].abs().max() == 0
    # resize=20 first: 40 x 20, crop starts at column 15, scale 1/1.5: x = 1.5j + 22.75.
    image = all_batches(ImageFolderDataModule(str(tmp_path), image_size=10, resize=20))[0]["image"][0]
    expected = 4 * (1.5 * torch.arange(10) + 22.75) / 255
    assert torch.allclose(image[0], expected.expand(10, 10), atol=1.01 / 255)


def test_image_size_none_keeps_sizes_and_rejects_mixed_batches(colour_folder):
    batches = all_batches(ImageFolderDataModule(str(colour_folder), image_size=None, batch_size=1))
    sizes = {b["path"][0]: tuple(b["image"].shape) for b in batches}
    for rel, (w, h), *_ in COLOURED:
        assert sizes[str(colour_folder / rel)] == (1, 3, h, w)
    dm = ImageFolderDataModule(str(colour_folder), image_size=None, batch_size=2)
    with pytest.raises(ValueError, match="batch_size=1"):
        all_batches(dm)


def test_labels_from_named_folders(tmp_path):
    for cls, n in (("dog", 2), ("ant", 1), ("cat", 3)):
        for i in range(n):
            save_solid(tmp_path / cls / f"{i}.png", (12, 9), (10 * i, 0, 0))
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, labels=True, batch_size=4)
    assert dm.class_to_idx == {"ant": 0, "cat": 1, "dog": 2}
    assert dm.hparams["labels"] is True
    samples = by_id(all_batches(dm))
    assert len(samples) == 6
    for _, path, label in samples.values():
        folder = os.path.basename(os.path.dirname(path))
        assert label == dm.class_to_idx[folder]


def test_labels_from_integer_folders_are_the_class_ids(tmp_path):
    for cls in ("10", "2", "0"):  # "10" sorts before "2" as text: ids must come from the number
        save_solid(tmp_path / cls / "deep" / "img.png", (9, 9), (0, 0, 0))
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, labels=True)
    assert dm.class_to_idx == {"0": 0, "10": 10, "2": 2}
    batch = all_batches(dm, "test")[0]
    got = {os.path.relpath(p, tmp_path).split(os.sep)[0]: int(lbl) for p, lbl in zip(batch["path"], batch["label"])}
    assert got == {"0": 0, "10": 10, "2": 2}


def test_folder_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataModule(str(tmp_path / "missing"))
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.png"):
        ImageFolderDataModule(str(tmp_path))
    save_solid(tmp_path / "cls" / "a.png", (8, 8), (0, 0, 0))
    save_solid(tmp_path / "loose.png", (8, 8), (0, 0, 0))
    with pytest.raises(ValueError, match="loose.png"):
        ImageFolderDataModule(str(tmp_path), labels=True)
    with pytest.raises(ValueError, match="resize"):
        ImageFolderDataModule(str(tmp_path), image_size=32, resize=16)
    with pytest.raises(ValueError, match="batch_size"):
        ImageFolderDataModule(str(tmp_path), batch_size=0)


def test_corrupt_files_are_skipped_and_reported(tmp_path, caplog):
    good_a = save_solid(tmp_path / "a_good.png", (20, 10), (0, 255, 0))
    bad_jpg, bad_png = save_corrupt(tmp_path)
    good_d = save_solid(tmp_path / "d_good.jpg", (10, 20), (0, 0, 255))
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="neuromask_pl.data"):
        (batch,) = all_batches(dm)
    assert batch["index"].tolist() == [0, 3]
    assert batch["path"] == [str(good_a), str(good_d)]
    assert batch["image"].shape == (2, 3, 8, 8)
    assert torch.allclose(batch["image"][0, 1], torch.ones(8, 8))  # the green one is at its place
    assert [(s["index"], s["path"]) for s in batch["skipped"]] == [(1, str(bad_jpg)), (2, str(bad_png))]
    assert "UnidentifiedImageError" in batch["skipped"][0]["error"]
    assert "truncated" in batch["skipped"][1]["error"]
    assert str(bad_jpg) in caplog.text and str(bad_png) in caplog.text


def test_all_corrupt_batch_is_empty(tmp_path):
    save_corrupt(tmp_path)
    save_solid(tmp_path / "cls" / "z.png", (8, 8), (9, 9, 9))
    dm = ImageFolderDataModule(str(tmp_path), image_size=12, batch_size=2)
    first, second = all_batches(dm)
    assert first["image"].shape == (0, 3, 12, 12) and first["image"].dtype == torch.float32
    assert first["index"].dtype == torch.long and first["index"].numel() == 0
    assert first["path"] == [] and len(first["skipped"]) == 2
    assert second["index"].tolist() == [2]


def test_workers_give_the_same_batches_as_the_main_process(colour_folder):
    save_corrupt(colour_folder)
    reference_batches = all_batches(ImageFolderDataModule(str(colour_folder), image_size=16, batch_size=1))
    reference = by_id(reference_batches)
    reference_skipped = [s for b in reference_batches for s in b["skipped"]]
    assert len(reference_skipped) == 2
    dm = ImageFolderDataModule(str(colour_folder), image_size=16, batch_size=3, num_workers=2)
    loader = dm.predict_dataloader()
    pickle.loads(pickle.dumps(loader.collate_fn))  # spawn-based workers need a picklable collate
    batches = list(loader)
    assert sorted((s for b in batches for s in b["skipped"]), key=lambda s: s["index"]) == reference_skipped
    got = by_id(batches)
    assert sorted(got) == sorted(reference) and len(got) == len(COLOURED)
    for idx, (image, path, _) in got.items():
        assert path == reference[idx][1] and torch.equal(image, reference[idx][0])


def test_hyperparameters_and_loader_settings(colour_folder):
    dm = ImageFolderDataModule(str(colour_folder), image_size=16, batch_size=3, num_workers=0)
    assert dm.hparams["batch_size"] == 3 and dm.hparams["image_size"] == 16
    assert dm.pin_memory == torch.cuda.is_available()
    assert ImageFolderDataModule(str(colour_folder), pin_memory=True).predict_dataloader().pin_memory
    predict, test = dm.predict_dataloader(), dm.test_dataloader()
    assert predict.batch_size == test.batch_size == 3
    assert isinstance(predict.sampler, torch.utils.data.SequentialSampler)
    assert [b["index"].tolist() for b in predict] == [b["index"].tolist() for b in test] == [[0, 1, 2], [3, 4]]


class _IdCollector(pl.LightningModule):
    """Records what Trainer.predict hands to predict_step."""

    def predict_step(self, batch, batch_idx):
        return {"index": batch["index"].tolist(), "path": batch["path"], "skipped": batch["skipped"]}


def test_trainer_predict_passes_the_batch_through(tmp_path, trainer_factory):
    save_solid(tmp_path / "a.png", (10, 10), (1, 1, 1))
    save_corrupt(tmp_path)
    trainer = trainer_factory()
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, batch_size=3)
    (out,) = trainer.predict(_IdCollector(), datamodule=dm)
    assert out["index"] == [0] and out["path"] == [str(tmp_path / "a.png")]
    assert [s["index"] for s in out["skipped"]] == [1, 2]


# --------------------------------------------------------------------------- TensorDataModule


def test_tensor_datamodule_ids_labels_and_images():
    images = torch.rand(5, 1, 6, 4)
    ids = torch.tensor([40, 7, 3, 99, 12])
    dm = TensorDataModule(images, labels=torch.tensor([0, 1, 0, 2, 1]), ids=ids, batch_size=2)
    assert "images" not in dm.hparams and dm.hparams["batch_size"] == 2
    batches = all_batches(dm)
    assert [b["index"].tolist() for b in batches] == [[40, 7], [3, 99], [12]]
    assert all("path" not in b and b["skipped"] == [] for b in batches)
    assert torch.equal(torch.cat([b["image"] for b in batches]), images)
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 1, 0, 2, 1]
    plain = all_batches(TensorDataModule(images, batch_size=5))[0]
    assert plain["index"].tolist() == [0, 1, 2, 3, 4] and "label" not in plain


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"images": torch.rand(3, 8, 8)}, ValueError, "4-D"),
        ({"images": torch.zeros(2, 3, 4, 4, dtype=torch.uint8)}, TypeError, "floating point"),
        ({"images": torch.full((2, 3, 4, 4), 2.0)}, ValueError, r"\[0, 1\]"),
        ({"images": torch.rand(2, 3, 4, 4), "labels": torch.tensor([0, 1, 2])}, ValueError, "labels.*length N = 2"),
        ({"images": torch.rand(2, 3, 4, 4), "labels": torch.tensor([0.0, 1.0])}, TypeError, "integer"),
        ({"images": torch.rand(2, 3, 4, 4), "ids": torch.tensor([[0, 1]])}, ValueError, "ids.*1-D"),
        ({"images": torch.rand(3, 3, 4, 4), "ids": torch.tensor([4, 5, 4])}, ValueError, "unique"),
    ],
)
def test_tensor_datamodule_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        TensorDataModule(**kwargs)


# --------------------------------------------------------------------------- DemoDataModule


def test_demo_datamodule_yields_the_six_photos():
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip("sklearn.datasets")
    dm = DemoDataModule()
    (batch,) = all_batches(dm)
    assert batch["image"].shape == (6, 3, 224, 224) and batch["index"].tolist() == list(range(6))
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1 and batch["image"].std() > 0.1
    assert batch["path"] == [
        "skimage:chelsea", "skimage:coffee", "skimage:astronaut", "skimage:rocket",
        "sklearn:china.jpg", "sklearn:flower.jpg",
    ]  # fmt: skip
    # Independent reference for the coffee photo (400 x 600): PIL resize to 224 x 336, crop columns 56..280.
    ref = Image.fromarray(skimage_data.coffee()).resize((336, 224), Image.BILINEAR).crop((56, 0, 280, 224))
    ref = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 255
    assert (batch["image"][1] - ref).abs().mean() < 0.005


def test_demo_without_optional_packages_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match=r"neuromask-pl\[demo\]"):
        DemoDataModule()


def test_excluded_ids_are_not_loaded_again() -> None:
    images = torch.rand(5, 3, 4, 4)
    dm = TensorDataModule(images, ids=torch.tensor([10, 11, 12, 13, 14]), batch_size=2)
    dm.exclude_ids = {11, 14}
    batches = list(dm.predict_dataloader())
    assert torch.cat([b["index"] for b in batches]).tolist() == [10, 12, 13]
    assert torch.equal(torch.cat([b["image"] for b in batches]), images[[0, 2, 3]])
