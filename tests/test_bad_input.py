"""Bad input gives a clear error before any optimisation, or a per-sample failure; never a silent wrong result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuromask_pl import NeuroMask

pytestmark = pytest.mark.numerics


class Returns(nn.Module):
    """A 'classifier' whose output is fixed by a function of the input (to test what NeuroMask accepts)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fn = fn

    def forward(self, x: torch.Tensor):
        return self.fn(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda z: z.softmax(-1), "probabilities"),
        (lambda z: z[:, :1], "column"),
        (lambda z: z * float("nan"), "NaN or inf logits"),
        (lambda z: torch.cat([z[:1], z[1:] + float("inf")]), r"NaN or inf logits for image\(s\) \[1\]"),
        (lambda z: {"logits": z}, "B x K"),
    ],
    ids=["probabilities", "one-column", "nan", "inf", "dict"],
)
def test_classifier_outputs_that_are_not_logits_are_refused_before_optimising(fn, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        NeuroMask(Returns(fn), steps=2).explain(torch.rand(2, 3, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 2.5}, TypeError, "steps must be int"),
        ({"steps": True}, TypeError, "steps must be int"),
        ({"steps": "10"}, TypeError, "steps must be int"),
        ({"steps": 0}, ValueError, "steps must be >= 1"),
        ({"settings": {"lr": float("inf")}}, ValueError, "lr must be a finite number"),
        ({"settings": {"temperature": float("inf")}}, ValueError, "temperature must be a finite number"),
        ({"settings": {"lr": float("nan")}}, ValueError, "lr must be a finite number"),
        ({"target_class": 1.5}, ValueError, "target_class must be a class index"),
        ({"target_class": True}, ValueError, "target_class must be a class index"),
        ({"seed": 0.5}, TypeError, "seed must be an int"),
    ],
)
def test_settings_are_checked_by_type_and_range_at_construction(tiny_cnn, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        NeuroMask(tiny_cnn, **kwargs)


def test_targets_and_ids_must_be_whole_numbers(tiny_cnn, image_factory) -> None:
    images = image_factory(2)
    explainer = NeuroMask(tiny_cnn, steps=2)
    with pytest.raises(ValueError, match="targets must be whole numbers"):
        explainer.explain(images, targets=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="ids must be whole numbers"):
        explainer.explain(images, ids=torch.tensor([0.0, 1.7]))
    with pytest.raises(ValueError, match="ids must be >= 0"):
        explainer.explain(images, ids=[-1, 2])
    assert explainer.explain(images, targets=torch.tensor([1.0, 2.0]), ids=[3.0, 4.0]).targets.tolist() == [1, 2]


def test_images_must_have_the_classifiers_channels_and_float_type(tiny_cnn, image_factory) -> None:
    explainer = NeuroMask(tiny_cnn, steps=2)
    with pytest.raises(ValueError, match=r"1 channel\(s\) but the classifier takes 3 \(RGB\).*channels=3"):
        explainer.explain(image_factory(2, channels=1))
    with pytest.raises(ValueError, match=r"torch.float64 but the classifier's weights are torch.float32.*images.to"):
        explainer.explain(image_factory(2).double())


def test_cpu_out_of_memory_splits_the_batch_like_cuda(tiny_cnn, image_factory, monkeypatch) -> None:
    import neuromask_pl.explainer as module

    # float64: chunks of other sizes may sum in another order; float64 rounding stays far below the tolerance
    tiny_cnn, images = tiny_cnn.double(), image_factory(5).double()
    expected = NeuroMask(tiny_cnn, steps=4).explain(images)
    real = module.learn_masks
    sizes = []

    def tight_memory(classifier, images, *args, **kwargs):
        sizes.append(len(images))
        if len(images) > 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real(classifier, images, *args, **kwargs)

    monkeypatch.setattr(module, "learn_masks", tight_memory)
    explainer = NeuroMask(tiny_cnn, steps=4)
    got = explainer.explain(images)
    assert sizes[:2] == [5, 3] and explainer.max_chunk == 2
    torch.testing.assert_close(got.masks, expected.masks, rtol=0, atol=1e-9)

    def failing(message: str):
        def learn(*args, **kwargs):
            raise RuntimeError(message)

        return learn

    monkeypatch.setattr(module, "learn_masks", failing("DefaultCPUAllocator: can't allocate memory"))
    with pytest.raises(MemoryError, match="one image alone"):
        NeuroMask(tiny_cnn, steps=4).explain(images[:1])
    monkeypatch.setattr(module, "learn_masks", failing("an internal bug"))
    with pytest.raises(RuntimeError, match="an internal bug"):  # other runtime errors are not taken for memory
        NeuroMask(tiny_cnn, steps=4).explain(images)


# ----------------------------------------------------------------------------- dataset jobs

import json  # noqa: E402
import os  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from neuromask_pl.callbacks import MaskWriter  # noqa: E402
from neuromask_pl.data import ImageFolderDataModule, read_image  # noqa: E402
from neuromask_pl.store import load_results  # noqa: E402

CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Named(nn.Module):
    """A classifier with class names (a CIFAR-like 10-class head over the tiny CNN's features)."""

    def __init__(self, net: nn.Module, class_names: list[str]) -> None:
        super().__init__()
        self.net, self.class_names = net, class_names
        self.head = nn.Linear(3, len(class_names))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def write_pngs(folder: Path, count: int, seed: int = 0, size: int = 16) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (np.random.default_rng(seed).random((count, size, size, 3)) * 255).astype(np.uint8)
    paths = [folder / f"img_{k}.png" for k in range(count)]
    for path, image in zip(paths, pixels):
        Image.fromarray(image).save(path)
    return paths


def run_job(classifier, root: Path, out: Path, trainer_factory, **data) -> None:
    datamodule = ImageFolderDataModule(str(root), image_size=16, batch_size=3, **data)
    explainer = NeuroMask(classifier, preset="paper", steps=3)
    trainer = trainer_factory(callbacks=[MaskWriter(str(out), write_overlays=False)], default_root_dir=str(out.parent))
    trainer.predict(explainer, datamodule=datamodule, return_predictions=False)


def test_label_folders_are_matched_to_the_classifiers_class_names(tiny_cnn, tmp_path, trainer_factory) -> None:
    write_pngs(tmp_path / "photos" / "cat", 2)
    write_pngs(tmp_path / "photos" / "Dog", 1, seed=1)
    run_job(Named(tiny_cnn, CIFAR), tmp_path / "photos", tmp_path / "out", trainer_factory, labels=True)
    with load_results(tmp_path / "out") as results:
        names = {row["path"].split("/")[-2]: row["target_name"] for row in results.rows}
    assert names == {"cat": "cat", "Dog": "dog"}  # not "airplane", "automobile" by sorted position
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["class_to_idx"] == {"Dog": 5, "cat": 3}

    write_pngs(tmp_path / "zoo" / "zebra", 1)
    with pytest.raises(ValueError, match="label folder 'zebra' names no class"):
        run_job(Named(tiny_cnn, CIFAR), tmp_path / "zoo", tmp_path / "out2", trainer_factory, labels=True)


def test_a_label_beyond_the_classifiers_classes_names_its_file(tiny_cnn, tmp_path, trainer_factory) -> None:
    write_pngs(tmp_path / "digits" / "1", 1)
    write_pngs(tmp_path / "digits" / "7", 1, seed=2)
    unnamed = nn.Sequential(tiny_cnn)  # 3 classes, no class names: folders are class indices
    with pytest.raises(ValueError, match=r"target class 7 is outside .* \(the label of .*digits/7/img_0.png\)"):
        run_job(unnamed, tmp_path / "digits", tmp_path / "out", trainer_factory, labels=True)
    with pytest.raises(ValueError, match=r"label folder '7' names no class of the classifier's 3 classes"):
        run_job(tiny_cnn, tmp_path / "digits", tmp_path / "out2", trainer_factory, labels=True)  # named classes


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the data is missing): a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_folder_of_random_corrupt_files_completes_with_a_correct_manifest(
    tiny_cnn, tmp_path, trainer_factory, seed
) -> None:
    rng = np.random.default_rng(seed)
    root = tmp_path / "mixed"
    good = write_pngs(root, 4, seed=seed)
    grey16 = root / "grey16.png"
    Image.fromarray((rng.random((16, 16)) * 65535).astype(np.uint16)).save(grey16)
    unusual = [grey16, root / os.fsdecode(b"caf\xe9.png"), root / "palette.gif", root / "cmyk.tif"]
    rgb = Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8))
    rgb.save(unusual[1])  # a file name that is not UTF-8
    rgb.convert("P").save(unusual[2])
    rgb.convert("CMYK").save(unusual[3])
    good_bytes = good[0].read_bytes()
    bad = {
        "truncated.png": good_bytes[: int(rng.integers(20, len(good_bytes) - 10))],
        "random.jpg": rng.bytes(int(rng.integers(1, 4000))),
        "empty.png": b"",
        "text.gif": b"GIF89a not really",
        "huge.png": huge_png_header(100_000, 100_000),
        "float_out_of_range.tif": None,
    }
    for name, data in bad.items():
        if data is None:
            Image.fromarray((rng.random((8, 8)) * 50).astype(np.float32), mode="F").save(root / name)
        else:
            (root / name).write_bytes(data)
    run_job(tiny_cnn, root, tmp_path / "out", trainer_factory)

    with load_results(tmp_path / "out") as results:
        rows = {Path(row["path"]).name: row for row in results.rows}
        assert sorted(rows) == sorted([p.name for p in [*good, *unusual]] + list(bad))  # every file exactly once
        assert {n for n, r in rows.items() if r["status"] == "skipped"} == set(bad)
        assert all(rows[n]["error"] for n in bad)
        # The readable files' masks are those of explaining them directly with the same ids.
        readable = [p for p in sorted(root.iterdir()) if p.name in rows and rows[p.name]["status"] == "ok"]
        ids = [int(rows[p.name]["sample_id"]) for p in readable]
        images = torch.stack([read_image(str(p)) for p in readable])
        expected = NeuroMask(tiny_cnn, preset="paper", steps=3).explain(images, ids=ids).masks
        got = torch.stack([torch.from_numpy(results.mask(i).astype(np.float32)) for i in ids])
        torch.testing.assert_close(got, expected[:, 0], rtol=0, atol=1e-3)  # the store keeps float16 (2**-11)


def test_targets_by_class_name_are_mapped_through_the_classifiers_class_names(tiny_cnn, image_factory) -> None:
    images = image_factory(2)
    explainer = NeuroMask(tiny_cnn, steps=2)  # class_names: cat, dog, owl
    assert explainer.explain(images, targets="owl").targets.tolist() == [2, 2]
    assert explainer.explain(images, targets=["dog", "Cat"]).targets.tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"target 'zebra' is not a class name of the classifier .*'cat', 'dog', 'owl'"):
        explainer.explain(images, targets="zebra")
    with pytest.raises(ValueError, match=r"targets must be one class or 2 classes"):
        explainer.explain(images, targets=["dog", "cat", "owl"])


def test_targets_as_text_without_class_names_are_refused_in_one_line(image_factory) -> None:
    class Unnamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3))

    images = image_factory(2)
    explainer = NeuroMask(Unnamed(), steps=2)
    for targets in ("cat", ["cat", "dog"], [0, "1"]):
        with pytest.raises(ValueError, match=r"^targets .* class indices .*no class_names") as raised:
            explainer.explain(images, targets=targets)
        assert "\n" not in str(raised.value)
    with pytest.raises(TypeError, match=r"^ids must be integers, got text"):
        explainer.explain(images, ids=["a", "b"])
