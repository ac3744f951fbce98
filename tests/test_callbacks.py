"""Tests for neuromask_pl.callbacks, driven by a real Trainer over a fake explainer module."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from neuromask_pl.callbacks import MANIFEST_COLUMNS, ExplanationLogger, MaskWriter
from neuromask_pl.result import LOSS_TERMS, Explanation

N, H, W, GAP = 10, 12, 14, 4
UNREADABLE = {2, 8, 9}  # 8 and 9 make the last batch (of 4) empty
CLASS_NAMES = ["cat", "dog", "owl"]


class ImageFiles(Dataset):
    """N seeded random images; the ids in UNREADABLE fail to 'load'."""

    def __init__(self) -> None:
        self.images = torch.rand(N, 3, H, W, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        if i in UNREADABLE:
            return {"index": i, "path": f"img_{i}.png", "error": "cannot identify image file"}
        return {"index": i, "path": f"img_{i}.png", "image": self.images[i], "label": i % 3}


def collate(items: list[dict]) -> dict:
    """Build the spec's batch dict; unreadable samples go to 'skipped'."""
    ok = [it for it in items if "image" in it]
    return {
        "image": torch.stack([it["image"] for it in ok]) if ok else torch.zeros(0, 3, H, W),
        "index": torch.tensor([it["index"] for it in ok], dtype=torch.long),
        "label": torch.tensor([it["label"] for it in ok], dtype=torch.long),
        "path": [it["path"] for it in ok],
        "skipped": [it for it in items if "image" not in it],
    }


def loader(indices: list[int] | None = None) -> DataLoader:
    data = ImageFiles() if indices is None else Subset(ImageFiles(), indices)
    return DataLoader(data, batch_size=4, collate_fn=collate)


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.class_names = CLASS_NAMES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FakeExplainer(pl.LightningModule):
    """Returns a hand-built Explanation: mask value depends on sample id, pixel and ``offset``."""

    def __init__(self, offset: float = 0.0, fail_at_batch: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classifier = TinyClassifier().eval()
        self.class_names = self.classifier.class_names
        self.calls = 0
        self.outputs: list[Explanation] = []

    def explain(self, batch: dict, batch_idx: int) -> Explanation:
        self.calls += 1
        if batch_idx == self.hparams.fail_at_batch:
            raise RuntimeError("simulated crash")
        images, ids = batch["image"], batch["index"]
        ramp = torch.linspace(0, 1, H * W).view(1, 1, H, W)
        masks = (ramp + 0.1 * ids.view(-1, 1, 1, 1) + self.hparams.offset) % 1.0
        with torch.no_grad():
            p_orig = self.classifier(images).softmax(-1)
            targets = p_orig.argmax(-1)
            p_mask = self.classifier(images * masks).softmax(-1)
        pick = torch.arange(len(ids))
        loss = {t: 0.01 * ids.float() + k + self.hparams.offset for k, t in enumerate(("pred", "sparse", "smooth"))}
        loss["total"] = loss["pred"] + loss["sparse"] + loss["smooth"]
        exp = Explanation(
            ids=ids,
            masks=masks,
            targets=targets,
            prob_original=p_orig[pick, targets],
            prob_masked=p_mask[pick, targets],
            loss=loss,
            mask_area=masks.mean((1, 2, 3)),
            preserved=p_mask.argmax(-1) == targets,
            images=images,
            paths=batch["path"],
            skipped=batch["skipped"],
        ).cpu()
        self.outputs.append(exp)
        return exp

    def predict_step(self, batch: dict, batch_idx: int) -> Explanation:
        return self.explain(batch, batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> Explanation:
        return self.explain(batch, batch_idx)


def make_trainer(root: Path, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(root / "logs", name="explain"),
        default_root_dir=root,
        inference_mode=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def read_manifest(out: Path) -> dict[int, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        rows = list(reader)
    ids = [int(r["sample_id"]) for r in rows]
    assert ids == sorted(set(ids)), "manifest must be sorted with one row per id"
    return {int(r["sample_id"]): r for r in rows}


def explained(module: FakeExplainer) -> dict[int, dict]:
    """Per-sample values the module returned, keyed by id: independent of the writer."""
    out = {}
    for exp in module.outputs:
        for i, sid in enumerate(exp.ids.tolist()):
            out[sid] = {"mask": exp.masks[i, 0].numpy(), "record": exp.records(CLASS_NAMES)[i]}
    return out


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """One predict run with both callbacks, default output folder."""
    root = tmp_path_factory.mktemp("predict")
    module = FakeExplainer()
    trainer = make_trainer(root, [MaskWriter(), ExplanationLogger(max_images=2)])
    trainer.predict(module, loader(), return_predictions=False)
    return trainer, module, Path(trainer.log_dir)


def test_writer_writes_masks_overlays_and_manifest(predicted):
    trainer, module, log_dir = predicted
    out = log_dir / "explanations"
    values = explained(module)
    assert sorted(values) == sorted(set(range(N)) - UNREADABLE)
    rows = read_manifest(out)
    assert sorted(rows) == list(range(N))
    for sid, v in values.items():
        mask = np.load(out / f"masks/{sid:08d}.npy")
        assert mask.dtype == np.float16 and mask.shape == (H, W)
        np.testing.assert_allclose(mask.astype(np.float32), v["mask"], atol=1e-3)
        with Image.open(out / f"overlays/{sid:08d}.png") as png:
            assert png.size == (3 * W + 2 * GAP, H)
        row, rec = rows[sid], v["record"]
        assert row["status"] == "ok" and row["error"] == ""
        assert row["mask_file"] == f"masks/{sid:08d}.npy" and row["overlay_file"] == f"overlays/{sid:08d}.png"
        assert row["path"] == f"img_{sid}.png" and int(row["target"]) == rec["target"]
        assert row["target_name"] == CLASS_NAMES[rec["target"]]
        assert row["preserved"] == str(rec["preserved"])
        for key in ("prob_original", "prob_masked", "mask_area", *(f"loss_{t}" for t in LOSS_TERMS)):
            assert float(row[key]) == pytest.approx(rec[key], abs=1e-7), key
    for sid in UNREADABLE:
        assert rows[sid]["status"] == "skipped"
        assert rows[sid]["error"] == "cannot identify image file" and rows[sid]["path"] == f"img_{sid}.png"
        assert rows[sid]["mask_file"] == "" and not (out / f"masks/{sid:08d}.npy").exists()
    assert not list(out.glob("manifest.partial*")) and not list(out.rglob(".*.tmp"))


def test_run_record(predicted):
    trainer, module, log_dir = predicted
    record = json.loads((log_dir / "explanations" / "run.json").read_text())
    assert record["stage"] == "predict"
    assert record["counts"] == {"explained": N - len(UNREADABLE), "skipped": len(UNREADABLE)}
    assert record["hparams"] == {"offset": 0.0, "fail_at_batch": None}
    assert record["trainer"]["accelerator"] == "CPUAccelerator"
    assert record["trainer"]["precision"] == "32-true" and record["trainer"]["world_size"] == 1
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["pytorch_lightning"] == pl.__version__
    assert record["started"] <= record["finished"]
    assert record["classifier"] is not None and record["cli_config"] is None


def test_tensorboard_has_scalars_and_images(predicted):
    trainer, module, log_dir = predicted
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for name in ("loss_total", "loss_pred", "mask_area", "preservation_rate", "prob_original", "prob_masked"):
        assert f"explain/{name}" in scalars
    # two non-empty batches (the third has only unreadable samples)
    logged = acc.Scalars("explain/mask_area")
    assert [e.step for e in logged] == [0, 1]
    expected = [exp.summary()["mask_area"] for exp in module.outputs if len(exp)]
    assert [e.value for e in logged] == pytest.approx(expected, abs=1e-6)
    assert "explain/overlays" in acc.Tags()["images"]
    image = acc.Images("explain/overlays")[0]
    assert (image.height, image.width) == (2 * (H + 2) + 2, 3 * W + 2 * GAP + 4)  # max_images=2 panels


def test_second_run_merges_and_crash_keeps_written_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    trainer = make_trainer(tmp_path, [MaskWriter(str(out), write_overlays=False)])
    trainer.predict(FakeExplainer(), loader(), return_predictions=False)
    first = read_manifest(out)
    manifest_bytes = (out / "manifest.csv").read_bytes()
    assert not (out / "overlays").exists() and all(r["overlay_file"] == "" for r in first.values())

    # a crash in the second batch: manifest.csv is untouched, batch 0 stays journalled
    crashing = FakeExplainer(offset=0.5, fail_at_batch=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path, [MaskWriter(str(out))]).predict(crashing, loader(), return_predictions=False)
    assert (out / "manifest.csv").read_bytes() == manifest_bytes
    assert (out / "manifest.partial.csv").exists()

    # a test-stage run over a subset: journal recovered, subset replaced, other rows kept
    module = FakeExplainer(offset=0.25)
    make_trainer(tmp_path, [MaskWriter(str(out))]).test(module, loader([4, 5]), verbose=False)
    rows = read_manifest(out)
    assert sorted(rows) == list(range(N))
    recovered = explained(crashing)
    new = explained(module)
    for sid in range(N):
        source = new.get(sid) or recovered.get(sid)
        if source is None:
            assert rows[sid] == first[sid]
        else:
            assert float(rows[sid]["loss_total"]) == pytest.approx(source["record"]["loss_total"])
            np.testing.assert_allclose(np.load(out / f"masks/{sid:08d}.npy"), source["mask"], atol=1e-3)
    assert set(new) == {4, 5} and set(recovered) == {0, 1, 3}
    assert (out / "overlays/00000004.png").exists() and not (out / "overlays/00000007.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "run.json").read_text())["counts"] == {"explained": 2, "skipped": 0}
    assert not list(out.glob("manifest.partial*"))


def test_unwritable_output_dir_fails_before_any_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    module = FakeExplainer()
    trainer = make_trainer(tmp_path, [MaskWriter(str(blocker / "out"))])
    with pytest.raises(ValueError, match="a_file/out.*output_dir"):
        trainer.predict(module, loader(), return_predictions=False)
    assert module.calls == 0
    assert blocker.read_text() == "not a folder"


def test_run_record_classifier_fallback_and_cli_config(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "neuromask_pl.classifiers", None)  # import fails
    trainer = make_trainer(tmp_path, [MaskWriter()])
    Path(trainer.log_dir).mkdir(parents=True)
    (Path(trainer.log_dir) / "config.yaml").write_text("model:\n  preset: paper\n")
    trainer.predict(FakeExplainer(), loader([0]), return_predictions=False)
    record = json.loads((Path(trainer.log_dir) / "explanations" / "run.json").read_text())
    assert record["classifier"] == {"class": f"{TinyClassifier.__module__}.TinyClassifier"}
    assert record["cli_config"] == "model:\n  preset: paper\n"


def test_logger_logs_hparams_when_trainer_does_not(tmp_path):
    trainer = make_trainer(tmp_path, [ExplanationLogger(log_every_n_batches=2)], enable_autolog_hparams=False)
    trainer.predict(FakeExplainer(offset=0.125), loader(), return_predictions=False)
    assert trainer.logger.hparams["offset"] == 0.125
    acc = EventAccumulator(trainer.log_dir)
    acc.Reload()
    assert [e.step for e in acc.Scalars("explain/loss_total")] == [0]  # batch 2 is logged but empty


def test_logger_without_logger_does_nothing(tmp_path):
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        default_root_dir=tmp_path,
        inference_mode=False,
        enable_progress_bar=False,
        callbacks=[ExplanationLogger()],
    )
    trainer.predict(FakeExplainer(), loader([0, 1]), return_predictions=False)
    assert list(tmp_path.iterdir()) == []


def test_invalid_arguments():
    with pytest.raises(ValueError, match="log_every_n_batches"):
        ExplanationLogger(log_every_n_batches=0)
    with pytest.raises(ValueError, match="max_images"):
        ExplanationLogger(max_images=-1)
