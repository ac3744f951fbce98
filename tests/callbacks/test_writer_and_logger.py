"""Tests for neuromask_pl.callbacks, driven by a real Trainer over a fake explainer module.

MaskWriter writes a sharded store (see neuromask_pl.store); the tests read it back three
independent ways: ``numpy.load`` of the shard files, ``manifest.csv``, and ``load_results``, and
compare with what the fake module returned and with its known mask formula.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from neuromask_pl.callbacks import ExplanationLogger, MaskWriter
from neuromask_pl.callbacks.writer import MANIFEST_COLUMNS
from neuromask_pl.data import ImageFolderDataModule, TensorDataModule
from neuromask_pl.explanation import LOSS_TERMS, Explanation
from neuromask_pl.store import load_results

N, H, W, GAP = 10, 12, 14, 4
UNREADABLE = {2, 8, 9}  # 8 and 9 make the last batch (of 4) empty
CLASS_NAMES = ["cat", "dog", "owl"]
IMAGES = torch.rand(N, 3, H, W, generator=torch.Generator().manual_seed(0))


class ImageFiles(Dataset):
    """N seeded random images; the ids in UNREADABLE fail to 'load'."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        if i in UNREADABLE:
            return {"index": i, "path": f"img_{i}.png", "error": "cannot identify image file"}
        return {"index": i, "path": f"img_{i}.png", "image": IMAGES[i], "label": i % 3}


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
    """A plain DataLoader (no ``exclude_ids``: a rerun explains everything it yields again)."""
    data = ImageFiles() if indices is None else Subset(ImageFiles(), indices)
    return DataLoader(data, batch_size=4, collate_fn=collate)


def datamodule(batch_size: int = 2) -> TensorDataModule:
    """The package's in-memory DataModule over the same images (all readable); it has ``exclude_ids``."""
    return TensorDataModule(IMAGES, labels=torch.arange(N) % 3, batch_size=batch_size, pin_memory=False)


class TinyClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.class_names = CLASS_NAMES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FakeExplainer(pl.LightningModule):
    """Returns a hand-built Explanation: mask value depends on sample id, pixel and ``offset``.

    ``fail_at_batch`` simulates a crash (a preemption, a killed job): it is not a hyper-parameter,
    so a rerun without it is the same configuration.
    """

    def __init__(self, offset: float = 0.0, fail_at_batch: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["fail_at_batch"])
        self.fail_at_batch = fail_at_batch
        self.classifier = TinyClassifier().eval()
        self.class_names = self.classifier.class_names
        self.calls = 0
        self.seen: list[int] = []  # ids explained, in order
        self.outputs: list[Explanation] = []

    def explain(self, batch: dict, batch_idx: int) -> Explanation:
        self.calls += 1
        if batch_idx == self.fail_at_batch:
            raise RuntimeError("simulated crash")
        images, ids = batch["image"], batch["index"]
        self.seen += ids.tolist()
        ramp = torch.linspace(0, 1, H * W).view(1, 1, H, W)
        masks = (ramp + 0.1 * ids.view(-1, 1, 1, 1) + self.hparams.offset) % 1.0
        with torch.no_grad():
            p_orig = self.classifier(images).softmax(-1)
            targets = p_orig.argmax(-1)
            p_mask = self.classifier(images * masks).softmax(-1)
        pick = torch.arange(len(ids))
        terms = ("pred", "sparse", "smooth", "detail", "delete")
        loss = {t: 0.01 * ids.float() + k + self.hparams.offset for k, t in enumerate(terms)}
        loss["total"] = sum(loss[t] for t in terms)
        exp = Explanation(
            ids=ids,
            masks=masks,
            targets=targets,
            prob_original=p_orig[pick, targets],
            prob_masked=p_mask[pick, targets],
            loss=loss,
            mask_area=masks.mean((1, 2, 3)),
            preserved=p_mask.argmax(-1) == targets,
            steps=torch.full_like(ids, 5),
            images=images,
            paths=batch.get("path"),
            skipped=batch["skipped"],
        ).cpu()
        self.outputs.append(exp)
        return exp

    def predict_step(self, batch: dict, batch_idx: int) -> Explanation:
        return self.explain(batch, batch_idx)

    def test_step(self, batch: dict, batch_idx: int) -> Explanation:
        return self.explain(batch, batch_idx)


def expected_mask(sample_id: int, offset: float = 0.0) -> np.ndarray:
    """The FakeExplainer's mask, computed independently (float64 numpy), as stored (float16)."""
    ramp = np.arange(H * W).reshape(H, W) / (H * W - 1)
    return ((ramp + 0.1 * sample_id + offset) % 1.0).astype(np.float16)


def expected_loss_total(sample_id: int, offset: float = 0.0) -> float:
    return 0.05 * sample_id + 10.0 + 5 * offset  # the sum of FakeExplainer's five terms


def make_trainer(root: Path, callbacks: list, **kwargs) -> pl.Trainer:
    """helpers.make_trainer with a TensorBoard logger under ``root``."""
    logger = TensorBoardLogger(root / "logs", name="explain")
    return helpers.make_trainer(logger=logger, default_root_dir=root, callbacks=callbacks, **kwargs)


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


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative POSIX path -> digest)."""
    return {p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def shard_paths(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("*.npz"))


def shard_contents(path: Path) -> dict[int, np.ndarray | None]:
    """Sample id -> mask (None for a sample without one) of one shard, read with numpy alone."""
    with np.load(path) as npz:
        ids = sorted(int(name[1:-5]) for name in npz.files if name.startswith("r") and name.endswith(".json"))
        return {i: (npz[f"m{i}"] if f"m{i}" in npz.files else None) for i in ids}


def stored(out: Path) -> dict[int, tuple[np.ndarray | None, dict]]:
    """Everything in a finished store, read with load_results (which must use the merged index)."""
    with load_results(out) as results:
        assert results.indexed, "the finished job must leave an up-to-date index.npz"
        return {sid: (mask, row) for sid, mask, row in results}


def assert_same_results(a: dict[int, tuple], b: dict[int, tuple]) -> None:
    """Same ids, bit-identical masks, same rows (classifier probabilities up to float rounding)."""
    assert sorted(a) == sorted(b)
    for sid in a:
        (mask_a, row_a), (mask_b, row_b) = a[sid], b[sid]
        np.testing.assert_array_equal(mask_a, mask_b)
        assert row_a.keys() == row_b.keys()
        for key, value in row_a.items():
            if key in ("prob_original", "prob_masked"):  # batch composition may change the last bit
                assert value == pytest.approx(row_b[key], rel=1e-6), (sid, key)
            else:
                assert value == row_b[key], (sid, key)


def assert_no_leftovers(out: Path) -> None:
    assert not (out / ".lock").exists(), "the lock must be released"
    assert not list(out.rglob(".*.tmp")), "no temporary files may be left"


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
    assert json.loads((out / "store.json").read_text())["format"] == "neuromask-pl-store"

    # the shards, read with numpy alone, and their sha256sum-style sidecars
    in_shards: dict[int, np.ndarray | None] = {}
    for shard in shard_paths(out):
        assert (out / "shards" / f"{shard.name}.sha256").read_text() == f"{sha256(shard)}  {shard.name}\n"
        in_shards.update(shard_contents(shard))
    assert sorted(in_shards) == list(range(N))

    rows = read_manifest(out)
    assert sorted(rows) == list(range(N))
    with load_results(out) as results:
        assert results.indexed and results.ids.tolist() == list(range(N))
        for sid, v in values.items():
            raw = in_shards[sid]
            assert raw.dtype == np.float16 and raw.shape == (H, W)
            np.testing.assert_array_equal(raw, expected_mask(sid))
            mask, typed = results[sid]
            np.testing.assert_allclose(mask, v["mask"], atol=1e-3)
            np.testing.assert_array_equal(mask, raw.astype(np.float32))
            with Image.open(out / f"overlays/{sid:08d}.png") as png:
                assert png.size[0] >= 3 * W + 2 * GAP and png.size[1] > H  # the panel and its caption below
            rec = v["record"]
            assert typed == {**rec, "status": "ok", "overlay_file": f"overlays/{sid:08d}.png"}
            row = rows[sid]
            assert row["status"] == "ok" and row["error"] == ""
            assert row["overlay_file"] == f"overlays/{sid:08d}.png"
            assert row["path"] == f"img_{sid}.png" and int(row["target"]) == rec["target"]
            assert row["target_name"] == CLASS_NAMES[rec["target"]]
            assert row["preserved"] == str(rec["preserved"])
            for key in ("prob_original", "prob_masked", "mask_area", *(f"loss_{t}" for t in LOSS_TERMS)):
                assert float(row[key]) == pytest.approx(rec[key], abs=1e-7), key
            assert float(row["loss_total"]) == pytest.approx(expected_loss_total(sid))
        for sid in UNREADABLE:
            assert rows[sid]["status"] == "skipped"
            assert rows[sid]["error"] == "cannot identify image file" and rows[sid]["path"] == f"img_{sid}.png"
            assert rows[sid]["overlay_file"] == "" and rows[sid]["target"] == ""
            assert in_shards[sid] is None and results.mask(sid) is None and not results.has_mask(sid)
            assert results.row(sid) == {
                "sample_id": sid,
                "status": "skipped",
                "path": f"img_{sid}.png",
                "error": "cannot identify image file",
            }
            assert not (out / f"overlays/{sid:08d}.png").exists()
    assert_no_leftovers(out)


def test_run_record(predicted):
    trainer, module, log_dir = predicted
    record = json.loads((log_dir / "explanations" / "run.json").read_text())
    assert record["stage"] == "predict"
    assert record["counts"] == {"explained": N - len(UNREADABLE), "skipped": len(UNREADABLE)}
    assert record["hparams"] == {"offset": 0.0}
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
    # max_images=2 captioned panels (taller than the bare panels, as wide or wider), 2 columns would be wider
    assert image.height > 2 * (H + 2) + 2 and image.width >= 3 * W + 2 * GAP + 4


def test_overlays_are_captioned_with_class_probabilities_area_and_colour_bar(predicted):
    from neuromask_pl.viz import explanation_panel, to_uint8

    trainer, module, log_dir = predicted
    out = log_dir / "explanations"
    values = explained(module)
    bands = {}
    for sid in sorted(values)[:2]:
        with Image.open(out / f"overlays/{sid:08d}.png") as png:
            array = np.asarray(png.convert("RGB"))
        panel = to_uint8(explanation_panel(IMAGES[sid], torch.from_numpy(values[sid]["mask"])[None], gap=GAP))
        np.testing.assert_array_equal(array[:H, : panel.shape[1]], panel)  # the panel, unchanged, at the top
        band = array[H:]
        assert band.shape[0] >= 20 and (band < 100).any()  # a caption band with dark text
        bands[sid] = band
    first, second = bands.values()
    assert first.shape != second.shape or not np.array_equal(first, second)  # each sample its own caption


def test_tensorboard_gets_every_explained_image_of_a_batch_unless_capped(tmp_path):
    from neuromask_pl.callbacks.logger import _caption
    from neuromask_pl.viz import panel_grid

    many = torch.rand(12, 3, H, W, generator=torch.Generator().manual_seed(5))  # one batch of 12: more than 8

    def grid_image(max_images):
        root = tmp_path / f"cap{max_images}"
        module = FakeExplainer()
        logger = ExplanationLogger() if max_images == "default" else ExplanationLogger(max_images=max_images)
        trainer = make_trainer(root, [logger])
        data = [{"index": i, "path": f"m_{i}.png", "image": many[i], "label": i % 3} for i in range(len(many))]
        trainer.predict(module, DataLoader(data, batch_size=len(many), collate_fn=collate), return_predictions=False)
        acc = EventAccumulator(trainer.log_dir, size_guidance={"images": 0})
        acc.Reload()
        (event,) = acc.Images("explain/overlays")
        with Image.open(__import__("io").BytesIO(event.encoded_image_string)) as png:
            return np.asarray(png.convert("RGB")), module.outputs[0]

    from neuromask_pl.viz import to_uint8

    logged, exp = grid_image("default")
    ok = list(range(12))
    records = exp.records(CLASS_NAMES)
    captions = [_caption(records[i]) for i in ok]
    expected = panel_grid(exp.images[ok], exp.masks[ok], captions, columns=2)
    np.testing.assert_array_equal(logged, to_uint8(expected))  # all 12 panels, not the first 8
    capped, _ = grid_image(3)
    assert capped.shape[0] < logged.shape[0]
    np.testing.assert_array_equal(capped, to_uint8(panel_grid(exp.images[:3], exp.masks[:3], captions[:3])))


def test_crash_keeps_finished_results_and_test_stage_adds_to_them(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    trainer = make_trainer(tmp_path, [MaskWriter(str(out), write_overlays=False)])
    trainer.predict(FakeExplainer(), loader(), return_predictions=False)
    first = read_manifest(out)
    merged = {name: sha256(out / name) for name in ("manifest.csv", "index.npz")}
    first_shards = shard_paths(out)
    assert not (out / "overlays").exists() and all(r["overlay_file"] == "" for r in first.values())

    # a crash in the second batch of a rerun (plain loader: batch 0 is explained again): the merged
    # manifest and index are untouched and batch 0 is kept as a new shard
    crashing = FakeExplainer(fail_at_batch=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path, [MaskWriter(str(out), write_overlays=False)]).predict(
            crashing, loader(), return_predictions=False
        )
    assert crashing.calls == 2 and crashing.seen == [0, 1, 3]
    assert {name: sha256(out / name) for name in merged} == merged
    (new,) = set(shard_paths(out)) - set(first_shards)
    kept = shard_contents(new)
    assert sorted(kept) == [0, 1, 2, 3] and kept[2] is None
    for sid in (0, 1, 3):
        np.testing.assert_array_equal(kept[sid], expected_mask(sid))
    assert_no_leftovers(out)
    with pytest.warns(UserWarning, match="stale"):  # the index predates the new shard
        results = load_results(out)
    with results:
        assert results.ids.tolist() == list(range(N))

    # a test-stage run over a subset (same configuration) adds to the store and merges everything
    module = FakeExplainer()
    make_trainer(tmp_path, [MaskWriter(str(out))]).test(module, loader([4, 5]), verbose=False)
    assert module.seen == [4, 5]
    rows = read_manifest(out)
    assert sorted(rows) == list(range(N))
    for sid in set(range(N)) - {4, 5}:
        assert rows[sid] == first[sid]
    results = stored(out)
    for sid in (4, 5):
        np.testing.assert_array_equal(results[sid][0], expected_mask(sid).astype(np.float32))
        assert float(rows[sid]["loss_total"]) == pytest.approx(expected_loss_total(sid))
    assert (out / "overlays/00000004.png").exists() and not (out / "overlays/00000007.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
    record = json.loads((out / "run.json").read_text())
    assert record["stage"] == "test"
    assert record["counts"] == {"explained": N - len(UNREADABLE), "skipped": len(UNREADABLE)}  # the whole store
    assert_no_leftovers(out)


def test_rerun_after_crash_explains_only_missing_ids(tmp_path):
    out = tmp_path / "out"
    # batches of 2, shards of 4: batches 0-1 make shard 0 (ids 0-3), batch 2 (ids 4, 5) is still buffered
    # when batch 3 crashes, and on_exception writes it as a last shard
    crashing = FakeExplainer(fail_at_batch=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path, [MaskWriter(str(out), chunk_size=4)]).predict(
            crashing, datamodule=datamodule(), return_predictions=False
        )
    assert crashing.seen == [0, 1, 2, 3, 4, 5]
    assert [sorted(shard_contents(p)) for p in shard_paths(out)] == [[0, 1, 2, 3], [4, 5]]
    assert not (out / "manifest.csv").exists() and not (out / "index.npz").exists()
    assert_no_leftovers(out)
    with pytest.warns(UserWarning, match="missing"):  # no index yet: load_results scans the shards
        partial = load_results(out)
    with partial:
        assert partial.ids.tolist() == [0, 1, 2, 3, 4, 5]
        for sid in partial.ids.tolist():
            np.testing.assert_array_equal(partial.mask(sid, np.float16), expected_mask(sid))
    before = file_hashes(out / "shards")
    assert len(before) == 4  # two shards and their checksum files

    # the same command again (new objects, as a new process would make; batch size is loading-only)
    module = FakeExplainer()
    writer = MaskWriter(str(out), chunk_size=4)
    data = datamodule(batch_size=3)
    make_trainer(tmp_path, [writer]).predict(module, datamodule=data, return_predictions=False)
    assert module.seen == [6, 7, 8, 9] and module.calls == 2
    assert writer.resumed_ids == set(range(6)) and data.exclude_ids == set(range(6))
    after = file_hashes(out / "shards")
    assert {name: after.get(name) for name in before} == before, "finished shards must never be rewritten"
    (new,) = [p for p in shard_paths(out) if p.name not in before]
    assert sorted(shard_contents(new)) == [6, 7, 8, 9]

    rows = read_manifest(out)
    results = stored(out)
    assert sorted(rows) == sorted(results) == list(range(N))
    for sid, (mask, row) in results.items():
        np.testing.assert_array_equal(mask, expected_mask(sid).astype(np.float32))
        assert row["status"] == "ok" and row["loss_total"] == pytest.approx(expected_loss_total(sid))
        assert float(rows[sid]["loss_total"]) == row["loss_total"]
        assert (out / row["overlay_file"]).is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["counts"] == {"explained": N, "skipped": 0} and record["finished"] is not None
    assert_no_leftovers(out)

    # once more, with nothing left to explain: no step runs, and the finished store and record stay as they are
    finished = file_hashes(out)
    module = FakeExplainer()
    make_trainer(tmp_path, [MaskWriter(str(out), chunk_size=4)]).predict(
        module, datamodule=datamodule(), return_predictions=False
    )
    assert module.calls == 0
    now = file_hashes(out)
    assert {k: v for k, v in now.items() if k != "run.json"} == {k: v for k, v in finished.items() if k != "run.json"}
    record = json.loads((out / "run.json").read_text())
    assert record["counts"] == {"explained": N, "skipped": 0} and record["finished"] is not None
    assert_no_leftovers(out)


class CrashAfterBatch(Callback):
    """Raises after MaskWriter stored batch ``batch_idx`` (a job killed between its last sample and the merge)."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch_idx:
            raise RuntimeError("killed before the merge")


def test_rerun_merges_a_job_that_died_after_its_last_sample(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed before the merge"):
        make_trainer(tmp_path, [MaskWriter(str(out)), CrashAfterBatch(4)]).predict(
            FakeExplainer(), datamodule=datamodule(), return_predictions=False
        )
    assert sorted(shard_contents(shard_paths(out)[0])) == list(range(N))  # all there, written by on_exception
    assert not (out / "manifest.csv").exists() and not (out / "index.npz").exists()
    shards = file_hashes(out / "shards")

    module = FakeExplainer()
    make_trainer(tmp_path, [MaskWriter(str(out))]).predict(module, datamodule=datamodule(), return_predictions=False)
    assert module.calls == 0  # nothing left to explain, yet the job is finished: merged and recorded
    assert file_hashes(out / "shards") == shards
    assert sorted(read_manifest(out)) == sorted(stored(out)) == list(range(N))
    assert json.loads((out / "run.json").read_text())["counts"] == {"explained": N, "skipped": 0}
    assert_no_leftovers(out)


def test_changed_configuration_is_refused_and_overwrite_starts_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    data = datamodule()  # one DataModule object for every run, as in a notebook
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path, [MaskWriter(str(out), chunk_size=4)]).predict(
            FakeExplainer(fail_at_batch=2), datamodule=data, return_predictions=False
        )
    module = FakeExplainer()
    make_trainer(tmp_path, [MaskWriter(str(out), chunk_size=4)]).predict(
        module, datamodule=data, return_predictions=False
    )
    assert module.seen == [4, 5, 6, 7, 8, 9] and data.exclude_ids == {0, 1, 2, 3}
    before = file_hashes(out)
    old_hash = json.loads((out / "store.json").read_text())["config_hash"]

    changed = FakeExplainer(offset=0.5)
    with pytest.raises(ValueError, match=r"another configuration.*overwrite=True"):
        make_trainer(tmp_path, [MaskWriter(str(out), chunk_size=4)]).predict(
            changed, datamodule=data, return_predictions=False
        )
    assert changed.calls == 0
    assert file_hashes(out) == before, "a refused run must not change any file"
    assert_no_leftovers(out)

    writer = MaskWriter(str(out), chunk_size=4, overwrite=True)
    make_trainer(tmp_path, [writer]).predict(changed, datamodule=data, return_predictions=False)
    assert changed.seen == list(range(N)) and writer.resumed_ids == set()
    shards_before = {name for name in before if name.startswith("shards/")}
    assert shards_before and not shards_before & set(file_hashes(out)), "the old shards must be deleted"
    assert json.loads((out / "store.json").read_text())["config_hash"] != old_hash
    results = stored(out)
    assert sorted(results) == sorted(read_manifest(out)) == list(range(N))
    for sid, (mask, row) in results.items():
        np.testing.assert_array_equal(mask, expected_mask(sid, 0.5).astype(np.float32))
        assert row["loss_total"] == pytest.approx(expected_loss_total(sid, 0.5))
    assert json.loads((out / "run.json").read_text())["hparams"] == {"offset": 0.5}
    assert (out / "notes.txt").read_text() == "mine"
    assert_no_leftovers(out)


def test_lock_held_by_a_live_process_is_refused(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {
            "host": socket.gethostname(),
            "pid": holder.pid,
            "started": "2026-01-01T00:00:00+00:00",
            "token": "f" * 16,
        }
        (out / ".lock").write_text(json.dumps(lock))
        module = FakeExplainer()
        with pytest.raises(RuntimeError, match=rf"another neuromask-pl job \(pid {holder.pid} .*is writing to"):
            make_trainer(tmp_path, [MaskWriter(str(out))]).predict(
                module, datamodule=datamodule(), return_predictions=False
            )
        assert module.calls == 0
        assert json.loads((out / ".lock").read_text()) == lock, "another job's lock must be left alone"
        assert list(file_hashes(out)) == [".lock"], "nothing may be written while another job holds the lock"
    finally:
        holder.kill()
        holder.wait()

    # its holder is gone: the lock is stale, taken over with a warning, and the run goes through
    module = FakeExplainer()
    make_trainer(tmp_path, [MaskWriter(str(out))]).predict(module, datamodule=datamodule(), return_predictions=False)
    assert "took over the stale lock" in caplog.text
    assert module.seen == list(range(N)) and sorted(stored(out)) == list(range(N))
    assert_no_leftovers(out)


class DamageShard(Callback):
    """Flips one byte of a shard's mask data when the predict loop starts (after MaskWriter's check)."""

    def __init__(self, shard: Path, sample_id: int) -> None:
        self.shard, self.sample_id = shard, sample_id

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flip_mask_byte(self.shard, self.sample_id)


def flip_mask_byte(shard: Path, sample_id: int) -> None:
    """Invert one byte inside the stored mask of ``sample_id`` (the zip structure stays intact)."""
    data = bytearray(shard.read_bytes())
    with np.load(shard) as npz:
        member = npz.zip.read(f"m{sample_id}.npy")
    start = data.find(member)
    assert start > 0 and data.find(member, start + 1) == -1
    data[start + len(member) - 3] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_damaged_shards_are_detected_and_redone(tmp_path, caplog):
    out = tmp_path / "out"
    make_trainer(tmp_path, [MaskWriter(str(out), chunk_size=3)]).predict(
        FakeExplainer(), datamodule=datamodule(), return_predictions=False
    )
    first = stored(out)
    shards = shard_paths(out)
    assert [sorted(shard_contents(p)) for p in shards] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    intact = {p.name: sha256(p) for p in shards if p != shards[1]}

    # a bit flip after the job: the index's CRC catches it on reading, the rerun's checksum scan redoes the shard
    flip_mask_byte(shards[1], 4)
    with load_results(out) as results:
        with pytest.raises(RuntimeError, match="sample 4 .*damaged"):
            results.mask(4)
    # ... and a bit flip while the rerun runs (after its scan): merged without that shard, with a warning
    module = FakeExplainer()
    make_trainer(tmp_path, [MaskWriter(str(out), chunk_size=3), DamageShard(shards[2], 7)]).predict(
        module, datamodule=datamodule(), return_predictions=False
    )
    assert module.seen == [3, 4, 5]
    assert not shards[1].exists() and not Path(f"{shards[1]}.sha256").exists()
    assert any(
        r.name == "neuromask_pl.callbacks.writer" and "1 damaged shard(s) ignored" in r.getMessage()
        for r in caplog.records
    )
    partial = stored(out)
    assert sorted(partial) == [0, 1, 2, 3, 4, 5, 9]
    assert_same_results(partial, {sid: first[sid] for sid in partial})
    assert json.loads((out / "run.json").read_text())["counts"] == {"explained": 7, "skipped": 0}

    module = FakeExplainer()
    make_trainer(tmp_path, [MaskWriter(str(out), chunk_size=3)]).predict(
        module, datamodule=datamodule(), return_predictions=False
    )
    assert module.seen == [6, 7, 8]
    assert not shards[2].exists()
    assert {name: sha256(out / "shards" / name) for name in intact if name != shards[2].name} == {
        name: digest for name, digest in intact.items() if name != shards[2].name
    }
    final = stored(out)
    assert_same_results(final, first)
    for sid, (mask, _) in final.items():
        np.testing.assert_array_equal(mask, expected_mask(sid).astype(np.float32))
    assert sorted(read_manifest(out)) == list(range(N))
    assert_no_leftovers(out)


def test_output_dir_holding_a_manifest_but_no_store_is_refused(tmp_path):
    out = tmp_path / "old"
    (out / "masks").mkdir(parents=True)
    np.save(out / "masks/00000000.npy", np.zeros((H, W), np.float16))
    (out / "manifest.csv").write_text("sample_id,status,mask_file\n0,ok,masks/00000000.npy\n")
    before = file_hashes(out)
    module = FakeExplainer()
    with pytest.raises(ValueError, match=r"holds manifest.csv but .*store.json' is missing"):
        make_trainer(tmp_path, [MaskWriter(str(out))]).predict(
            module, datamodule=datamodule(), return_predictions=False
        )
    assert module.calls == 0
    assert file_hashes(out) == before, "the old results must be left exactly as they were"


def test_loader_without_exclude_ids_explains_again_and_keeps_one_result_per_id(tmp_path):
    out = tmp_path / "out"
    make_trainer(tmp_path, [MaskWriter(str(out))]).predict(FakeExplainer(), loader(), return_predictions=False)
    first = stored(out)
    module = FakeExplainer()
    with pytest.warns(UserWarning, match="no `exclude_ids`"):
        make_trainer(tmp_path, [MaskWriter(str(out))]).predict(module, loader(), return_predictions=False)
    readable = sorted(set(range(N)) - UNREADABLE)
    assert module.calls == 3 and module.seen == readable
    assert len(shard_paths(out)) == 2  # one per run: every id is stored twice, merged once
    assert sorted(read_manifest(out)) == list(range(N))
    final = stored(out)
    assert_same_results(final, first)
    for sid, (mask, row) in final.items():
        if sid in UNREADABLE:
            assert mask is None and row["status"] == "skipped"
        else:
            np.testing.assert_array_equal(mask, expected_mask(sid).astype(np.float32))
    assert json.loads((out / "run.json").read_text())["counts"] == {"explained": 7, "skipped": 3}
    assert_no_leftovers(out)


def test_rerun_retries_unreadable_images_once_they_are_fixed(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    pixels = (IMAGES[:4].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    for i in (0, 1, 3):
        Image.fromarray(pixels[i]).save(photos / f"img_{i}.png")
    (photos / "img_2.png").write_bytes(b"not a png")
    out = tmp_path / "out"

    def run() -> FakeExplainer:
        module = FakeExplainer()
        data = ImageFolderDataModule(str(photos), image_size=None, batch_size=2, pin_memory=False)
        make_trainer(tmp_path, [MaskWriter(str(out))]).predict(module, datamodule=data, return_predictions=False)
        return module

    assert run().seen == [0, 1, 3]
    assert read_manifest(out)[2]["status"] == "skipped"
    Image.fromarray(pixels[2]).save(photos / "img_2.png")  # fixed: a sample without a mask is not done
    assert run().seen == [2]
    rows = read_manifest(out)
    assert sorted(rows) == [0, 1, 2, 3] and rows[2]["status"] == "ok" and rows[2]["path"].endswith("img_2.png")
    for sid, (mask, row) in stored(out).items():
        np.testing.assert_array_equal(mask, expected_mask(sid).astype(np.float32))
        assert row["status"] == "ok" and row["path"] == str(photos / f"img_{sid}.png")
    assert json.loads((out / "run.json").read_text())["counts"] == {"explained": 4, "skipped": 0}


def test_unwritable_output_dir_fails_before_any_step(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    module = FakeExplainer()
    trainer = make_trainer(tmp_path, [MaskWriter(str(blocker / "out"))])
    with pytest.raises(ValueError, match="a_file/out.*output_dir"):
        trainer.predict(module, loader(), return_predictions=False)
    assert module.calls == 0
    assert blocker.read_text() == "not a folder"


def test_run_record_describes_the_classifier_and_keeps_the_cli_config(tmp_path):
    trainer = make_trainer(tmp_path, [MaskWriter()])
    Path(trainer.log_dir).mkdir(parents=True)
    (Path(trainer.log_dir) / "config.yaml").write_text("model:\n  preset: paper\n")
    trainer.predict(FakeExplainer(), loader([0]), return_predictions=False)
    record = json.loads((Path(trainer.log_dir) / "explanations" / "run.json").read_text())
    assert record["classifier"]["class"] == f"{TinyClassifier.__module__}.TinyClassifier"
    assert record["cli_config"] == "model:\n  preset: paper\n"


def test_logger_logs_hparams_when_trainer_does_not(tmp_path):
    trainer = make_trainer(tmp_path, [ExplanationLogger(log_every_n_batches=2)], enable_autolog_hparams=False)
    trainer.predict(FakeExplainer(offset=0.125), loader(), return_predictions=False)
    assert trainer.logger.hparams["offset"] == 0.125
    acc = EventAccumulator(trainer.log_dir)
    acc.Reload()
    assert [e.step for e in acc.Scalars("explain/loss_total")] == [0]  # batch 2 is logged but empty


def test_logger_without_logger_does_nothing(tmp_path):
    trainer = helpers.make_trainer(default_root_dir=tmp_path, callbacks=[ExplanationLogger()])
    trainer.predict(FakeExplainer(), loader([0, 1]), return_predictions=False)
    assert list(tmp_path.iterdir()) == []


def test_invalid_arguments():
    with pytest.raises(ValueError, match="log_every_n_batches"):
        ExplanationLogger(log_every_n_batches=0)
    with pytest.raises(ValueError, match="max_images"):
        ExplanationLogger(max_images=-1)


@pytest.mark.parametrize("change", ["images", "weights"])
def test_other_data_or_weights_on_the_same_output_dir_are_refused(tmp_path, change):
    """No model file and in-memory data: the store still tells another dataset or other weights apart."""
    out = tmp_path / "out"
    make_trainer(tmp_path, [MaskWriter(str(out))]).predict(
        FakeExplainer(), datamodule=datamodule(), return_predictions=False
    )
    module, data = FakeExplainer(), datamodule()
    if change == "images":
        data = TensorDataModule(IMAGES.flip(-1), labels=torch.arange(N) % 3, batch_size=2, pin_memory=False)
    else:
        with torch.no_grad():
            module.classifier.net[0].bias.add_(1.0)
    with pytest.raises(ValueError, match="another configuration"):
        make_trainer(tmp_path, [MaskWriter(str(out))]).predict(module, datamodule=data, return_predictions=False)
    assert module.calls == 0


def test_a_run_that_fails_before_its_first_result_leaves_no_folder(tmp_path):
    class Failing(FakeExplainer):
        def predict_step(self, batch, batch_idx):
            raise ValueError("bad input")

    trainer = make_trainer(tmp_path, [MaskWriter()])
    with pytest.raises(ValueError, match="bad input"):
        trainer.predict(Failing(), loader(), return_predictions=False)
    assert not Path(trainer.log_dir).exists() and not (tmp_path / "logs" / "explain").exists()
    # A folder with anything else in it (here: a finished run's results) is kept.
    done = make_trainer(tmp_path, [MaskWriter(str(tmp_path / "out"))])
    done.predict(FakeExplainer(), loader(), return_predictions=False)
    again = make_trainer(tmp_path, [MaskWriter(str(tmp_path / "out"), overwrite=True)])
    with pytest.raises(ValueError, match="bad input"):
        again.predict(Failing(), loader(), return_predictions=False)
    assert (tmp_path / "out" / "manifest.csv").exists()


class DivergesWhenDark(nn.Module):
    """Logits of a fixed linear map, but NaN for an image whose mean brightness falls below 0.3: masking an image
    darkens it, so its optimisation hits NaN; the original images (brighter) give finite logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.conv(x).mean((2, 3))
        dark = x.mean((1, 2, 3)) < 0.3
        return torch.where(dark[:, None], torch.full_like(logits, float("nan")), logits)


def test_a_sample_whose_optimisation_diverges_is_failed_and_the_rest_go_on(tmp_path):
    from neuromask_pl import NeuroMask
    from neuromask_pl.data import TensorDataModule

    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16) * 0.2 + 0.4
    images[1] = 0.95  # bright enough that its mask never darkens it below 0.3 within the run: it stays finite
    classifier = DivergesWhenDark()
    trainer = make_trainer(tmp_path, [MaskWriter(str(tmp_path / "out"))])
    explainer = NeuroMask(classifier, preset="paper", steps=30, settings={"lr": 0.5})
    trainer.predict(explainer, datamodule=TensorDataModule(images, batch_size=3), return_predictions=False)
    rows = read_manifest(tmp_path / "out")
    assert rows[1]["status"] == "ok" and rows[1]["error"] == ""
    failed = [sid for sid in (0, 2) if rows[sid]["status"] == "failed"]
    assert failed and all("diverged" in rows[sid]["error"] for sid in failed)
    with load_results(tmp_path / "out") as results:
        assert all(results.mask(sid) is None for sid in failed) and results.mask(1) is not None
        assert np.isfinite(results.mask(1)).all()


def test_a_changed_image_is_explained_again_and_overwrite_removes_what_it_replaces(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    pixels = (np.random.default_rng(0).random((4, H, W, 3)) * 255).astype(np.uint8)
    for k in range(4):
        Image.fromarray(pixels[k]).save(photos / f"img_{k}.png")

    def run(**writer) -> FakeExplainer:
        module = FakeExplainer(**writer.pop("module", {}))
        data = ImageFolderDataModule(str(photos), image_size=None, batch_size=2, pin_memory=False)
        make_trainer(tmp_path, [MaskWriter(str(out), **writer)]).predict(
            module, datamodule=data, return_predictions=False
        )
        return module

    assert run().seen == [0, 1, 2, 3]
    assert run().seen == []  # nothing changed: nothing to do
    Image.fromarray(255 - pixels[1]).save(photos / "img_1.png")  # same name, other content
    os.utime(photos / "img_1.png", ns=(0, 10**9))  # and another modification time, whatever the clock
    assert run().seen == [1]

    # Another configuration on a smaller dataset: refused, saying what changed and how to overwrite.
    for k in (2, 3):
        (photos / f"img_{k}.png").unlink()
    with pytest.raises(ValueError, match=r"hparams\.offset \(0\.0 there, 0\.5 now\).*--writer\.overwrite true"):
        run(module={"offset": 0.5})
    run(module={"offset": 0.5}, overwrite=True)
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["00000000.png", "00000001.png"]
    assert sorted(read_manifest(out)) == [0, 1]


def test_explain_folder_writes_its_tensorboard_events_with_the_output(tmp_path, monkeypatch):
    from neuromask_pl import explain_folder

    images, cwd, out = tmp_path / "images", tmp_path / "cwd", tmp_path / "results" / "out"
    (images / "a").mkdir(parents=True)
    cwd.mkdir()
    for i in range(2):
        Image.fromarray((IMAGES[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(images / "a" / f"{i}.png")
    monkeypatch.chdir(cwd)
    quiet = {"enable_progress_bar": False}
    explain_folder(TinyClassifier().eval(), images, out, image_size=None, steps=2, trainer=quiet)
    assert list(cwd.iterdir()) == []  # nothing in the current directory (no ./lightning_logs)
    (events,) = (out / "tensorboard").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    assert "explain/overlays" in acc.Tags()["images"] and "explain/mask_area" in acc.Tags()["scalars"]
    with load_results(out) as results:
        assert len(results.ids) == 2
