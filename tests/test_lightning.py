"""Either Lightning package: neuromask-pl's classes, from ``neuromask_pl`` or ``neuromask_pl.lightning``, are accepted
by both ``pytorch_lightning.Trainer`` and ``lightning.Trainer`` (and by LightningCLI and Hydra)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import make_images, make_trainer
from PIL import Image

L = pytest.importorskip("lightning")

NAMES = ("NeuroMask", "MaskWriter", "ExplanationLogger", "ExplainDuringTraining", "ImageFolderDataModule",
         "TensorDataModule", "DemoDataModule", "LocalisationDataModule")  # fmt: skip
PACKAGES = {"pytorch_lightning": pl, "lightning": L}


def imported(where: str, name: str) -> type:
    import neuromask_pl
    import neuromask_pl.lightning

    return getattr(neuromask_pl if where == "neuromask_pl" else neuromask_pl.lightning, name)


def test_each_class_derives_from_both_packages_with_the_same_code() -> None:
    import neuromask_pl
    from neuromask_pl import lightning as nl

    bases = {"NeuroMask": "LightningModule", "MaskWriter": "Callback", "ExplanationLogger": "Callback",
             "ExplainDuringTraining": "Callback"}  # fmt: skip
    for name in NAMES:
        for cls in (getattr(neuromask_pl, name), getattr(nl, name)):
            base = bases.get(name, "LightningDataModule")
            assert issubclass(cls, getattr(pl, base)) and issubclass(cls, getattr(L, base)), (name, cls)
        assert getattr(neuromask_pl, name) is not getattr(nl, name)
    assert neuromask_pl.NeuroMask.__mro__[2] is pl.LightningModule and nl.NeuroMask.__mro__[2] is L.LightningModule
    assert nl.NeuroMask.explain.__code__ is neuromask_pl.NeuroMask.explain.__code__  # one implementation
    assert neuromask_pl.NeuroMask is neuromask_pl.NeuroMask and f"{neuromask_pl.NeuroMask}".endswith("NeuroMask'>")


@pytest.mark.parametrize("trainer_package", ["pytorch_lightning", "lightning"])
@pytest.mark.parametrize("where", ["neuromask_pl", "neuromask_pl.lightning"])
def test_either_import_runs_under_either_trainer(where, trainer_package, tiny_cnn, tmp_path) -> None:
    from neuromask_pl.store import load_results

    images = make_images(4)
    module = imported(where, "NeuroMask")(tiny_cnn, preset="paper", steps=3)
    callbacks = [imported(where, "MaskWriter")(str(tmp_path / "out")), imported(where, "ExplanationLogger")()]
    trainer = make_trainer(PACKAGES[trainer_package], callbacks=callbacks, logger=True, default_root_dir=tmp_path)
    datamodule = imported(where, "TensorDataModule")(images, batch_size=2)
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    first = "neuromask_pl.lightning" if trainer_package == "lightning" else "neuromask_pl"
    assert type(module) is imported(first, "NeuroMask")  # the Trainer's package's code first, from now on
    expected = imported(where, "NeuroMask")(tiny_cnn, preset="paper", steps=3).explain(images).masks[:, 0]
    with load_results(tmp_path / "out") as results:
        assert len(results) == 4 and all(row["status"] == "ok" for row in results.rows)
        got = torch.stack([torch.from_numpy(results.mask(i).astype(np.float32)) for i in range(4)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)  # the store keeps float16 (2**-11)
    tested = make_trainer(PACKAGES[trainer_package]).test(module, datamodule=datamodule, verbose=False)
    assert tested[0]["test/preservation_rate"] >= 0
    for other in PACKAGES.values():  # back and forth, and a copy or a pickle of it runs too
        make_trainer(other).predict(copy.deepcopy(module), datamodule=datamodule)
        make_trainer(other).predict(pickle.loads(pickle.dumps(module)), datamodule=datamodule)


class DigitNet(L.LightningModule):
    """A user's module on the `lightning` package: a tiny CNN trained on coloured fields."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(4, 3),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val/loss", F.cross_entropy(self(images), labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        images = make_images(8, size=8)
        return torch.utils.data.DataLoader(list(zip(images, images.mean((2, 3)).argmax(1))), batch_size=4)

    val_dataloader = train_dataloader


def test_the_training_callback_from_neuromask_pl_runs_in_a_lightning_project() -> None:
    from neuromask_pl import ExplainDuringTraining

    callback = ExplainDuringTraining(num_images=2, steps=3)
    make_trainer(L, max_epochs=1, callbacks=[callback], inference_mode=True).fit(DigitNet())
    assert callback.last_explanation is not None and callback.last_explanation.masks.shape == (2, 1, 8, 8)


def test_lightning_cli_and_hydra_accept_the_callback_from_neuromask_pl() -> None:
    """`--trainer.callbacks+=neuromask_pl.ExplainDuringTraining` in a project on `lightning` (jsonargparse checks
    that it is a subclass of lightning's Callback)."""
    from lightning.pytorch.cli import LightningCLI

    args = ["--trainer.callbacks+=neuromask_pl.ExplainDuringTraining", "--trainer.callbacks.num_images=2",
            "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_checkpointing=false"]  # fmt: skip
    cli = LightningCLI(DigitNet, run=False, args=args, save_config_callback=None)
    import neuromask_pl

    assert any(isinstance(c, neuromask_pl.ExplainDuringTraining) for c in cli.trainer.callbacks)
    hydra_utils = pytest.importorskip("hydra.utils")
    callback = hydra_utils.instantiate({"_target_": "neuromask_pl.ExplainDuringTraining", "num_images": 2})
    assert isinstance(callback, L.Callback) and isinstance(callback, pl.Callback)


def test_a_subclass_runs_under_its_own_package_and_is_told_what_to_derive_from(tiny_cnn) -> None:
    import neuromask_pl
    from neuromask_pl import lightning as nl

    class Mine(neuromask_pl.NeuroMask):
        pass

    class MineOnLightning(nl.NeuroMask):
        pass

    loader = torch.utils.data.DataLoader(make_images(2), batch_size=2)
    make_trainer(pl).predict(Mine(tiny_cnn, steps=2), loader)
    make_trainer(L).predict(MineOnLightning(tiny_cnn, steps=2), loader)
    message = r"Mine derives from neuromask_pl\.NeuroMask, .*derive it from neuromask_pl\.lightning\.NeuroMask$"
    with pytest.raises(TypeError, match=message):
        make_trainer(L).predict(Mine(tiny_cnn, steps=2), loader)
    message = r"from neuromask_pl\.lightning\.NeuroMask, .*derive it from neuromask_pl\.NeuroMask$"
    with pytest.raises(TypeError, match=message):
        make_trainer(pl).predict(MineOnLightning(tiny_cnn, steps=2), loader)


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
