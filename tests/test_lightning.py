"""neuromask_pl.lightning: the same classes for projects on the unified ``lightning`` package."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_trainer
from PIL import Image

L = pytest.importorskip("lightning")


def test_the_classes_are_lightning_ones_with_the_same_code() -> None:
    import neuromask_pl
    from neuromask_pl import lightning as nl

    assert issubclass(nl.NeuroMask, L.LightningModule) and not issubclass(nl.NeuroMask, neuromask_pl.NeuroMask)
    for name in ("MaskWriter", "ExplanationLogger", "ExplainDuringTraining"):
        assert issubclass(getattr(nl, name), L.Callback)
    assert issubclass(nl.ImageFolderDataModule, L.LightningDataModule)
    assert nl.NeuroMask.explain.__code__ is neuromask_pl.NeuroMask.explain.__code__  # one implementation


def test_a_folder_job_runs_under_the_lightning_trainer(tiny_cnn, tmp_path) -> None:
    from neuromask_pl import NeuroMask as PlainNeuroMask
    from neuromask_pl.lightning import ExplanationLogger, ImageFolderDataModule, MaskWriter, NeuroMask
    from neuromask_pl.store import load_results

    pixels = (np.random.default_rng(0).random((3, 16, 16, 3)) * 255).astype(np.uint8)
    for k, image in enumerate(pixels):
        Image.fromarray(image).save(tmp_path / f"{k}.png")
    datamodule = ImageFolderDataModule(str(tmp_path), image_size=16, batch_size=2)
    writer = MaskWriter(str(tmp_path / "out"))
    trainer = make_trainer(L, logger=True, default_root_dir=tmp_path / "runs", callbacks=[writer, ExplanationLogger()])
    trainer.predict(NeuroMask(tiny_cnn, preset="paper", steps=3), datamodule=datamodule, return_predictions=False)
    images = torch.stack([torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in pixels])
    expected = PlainNeuroMask(tiny_cnn, preset="paper", steps=3).explain(images).masks
    assert list((tmp_path / "runs" / "lightning_logs" / "version_0").glob("events.out.tfevents.*"))  # TensorBoard
    with load_results(tmp_path / "out") as results:
        assert len(results) == 3 and all(row["status"] == "ok" for row in results.rows)
        got = torch.stack([torch.from_numpy(results.mask(i).astype(np.float32)) for i in range(3)])
    torch.testing.assert_close(got, expected[:, 0], rtol=0, atol=1e-3)  # the store keeps float16 (2**-11)
