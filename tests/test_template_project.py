"""A project laid out like the most used Lightning template uses neuromask-pl with no glue code.

tests/template_project: `import lightning as L`, the network in the LightningModule's hyper-parameters,
torchmetrics attributes, grey 28 x 28 digits normalised with MNIST's mean and std, callbacks and the explain
entry built by Hydra from YAML.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_trainer
from PIL import Image

L = pytest.importorskip("lightning")
hydra_utils = pytest.importorskip("hydra.utils")
OmegaConf = pytest.importorskip("omegaconf").OmegaConf

PROJECT = Path(__file__).with_name("template_project")


@pytest.fixture(scope="module")
def project():
    sys.path.insert(0, str(PROJECT))
    try:
        from src.data.digits_datamodule import MEAN, STD, DigitsDataModule, digit_images
        from src.models.digits_module import DigitsLitModule, SimpleConvNet

        yield {"data": DigitsDataModule, "module": DigitsLitModule, "net": SimpleConvNet, "digits": digit_images,
               "mean": MEAN, "std": STD}  # fmt: skip
    finally:
        sys.path.remove(str(PROJECT))
        for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
            del sys.modules[name]


def train(project, root: Path, callbacks: list) -> tuple[dict[str, torch.Tensor], L.Trainer]:
    L.seed_everything(0)
    module = project["module"](net=project["net"]())
    trainer = make_trainer(
        L, max_epochs=2, default_root_dir=root, callbacks=callbacks, deterministic=True, inference_mode=True,
        logger=True, enable_checkpointing=True,
    )  # fmt: skip
    trainer.fit(module, datamodule=project["data"]())
    return {k: v.clone() for k, v in module.state_dict().items()}, trainer


@pytest.fixture(scope="module")
def trained(project, tmp_path_factory):
    """The template trained twice: with the YAML-configured callback, and without it."""
    root = tmp_path_factory.mktemp("template")
    config = OmegaConf.load(PROJECT / "configs" / "callbacks" / "explain_during_training.yaml")
    callback = hydra_utils.instantiate(config)["explain_during_training"]
    with_callback, trainer = train(project, root / "with", [callback])
    without, _ = train(project, root / "without", [])
    checkpoint = root / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    images, _ = project["digits"](300)
    folder = root / "digits"
    folder.mkdir()
    for k, image in enumerate(images[-4:]):
        Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(folder / f"{k}.png")
    return {"callback": callback, "with": with_callback, "without": without, "checkpoint": checkpoint,
            "folder": folder, "root": root, "log_dir": Path(trainer.log_dir)}  # fmt: skip


def test_the_yaml_configured_callback_explains_normalised_grey_digits(trained) -> None:
    callback = trained["callback"]
    explanation = callback.last_explanation
    assert explanation is not None and callback.last_epoch == 1
    assert callback.images.shape == (6, 1, 28, 28) and 0 <= callback.images.min() and callback.images.max() <= 1
    assert explanation.masks.shape == (6, 1, 28, 28) and torch.isfinite(explanation.masks).all()
    assert explanation.prob_original.min() > 0.1  # the network sees its own normalisation: confident predictions


def test_training_is_bit_identical_with_and_without_the_callback(trained) -> None:
    assert trained["with"].keys() == trained["without"].keys()
    for key, value in trained["with"].items():
        assert torch.equal(value, trained["without"][key]), key


def test_explain_checkpoint_from_the_hydra_config(project, trained) -> None:
    config = OmegaConf.load(PROJECT / "configs" / "explain.yaml")
    config.explain.checkpoint = str(trained["checkpoint"])
    config.explain.root = str(trained["folder"])
    config.explain.default_root_dir = str(trained["root"] / "hydra")
    sys.path.insert(0, str(PROJECT))
    try:
        out = hydra_utils.instantiate(config.explain)
    finally:
        sys.path.remove(str(PROJECT))
    from neuromask_pl import load_results

    with load_results(out) as results:
        assert len(results) == 4 and all(row["status"] == "ok" for row in results.rows)
        assert results.mask(0).shape == (28, 28)
    assert Path(out).is_relative_to(trained["root"] / "hydra")


def test_explain_checkpoint_through_the_cli(project, trained, tmp_path) -> None:
    from neuromask_pl.cli import main

    sys.path.insert(0, str(PROJECT))
    try:
        main([
            "predict", "--model.classifier.class_path", "neuromask_pl.classifiers.LightningCheckpointClassifier",
            "--model.classifier.init_args.module_class", "src.models.digits_module.DigitsLitModule",
            "--model.classifier.init_args.checkpoint", str(trained["checkpoint"]),
            "--model.classifier.init_args.trusted", "[src.models.digits_module.SimpleConvNet]",
            "--model.classifier.init_args.model_attribute", "net",
            "--model.classifier.init_args.mean", "[0.1307]", "--model.classifier.init_args.std", "[0.3081]",
            "--model.steps", "10", "--model.settings.mask_size", "14",
            "--data", "neuromask_pl.data.ImageFolderDataModule", "--data.root", str(trained["folder"]),
            "--data.image_size", "28", "--data.channels", "1",
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path),
            "--writer.output_dir", str(tmp_path / "out"),
        ])  # fmt: skip
    finally:
        sys.path.remove(str(PROJECT))
    from neuromask_pl import load_results

    with load_results(tmp_path / "out") as results:
        assert len(results) == 4 and all(row["status"] == "ok" for row in results.rows)


def test_neuromask_runs_under_the_lightning_trainer(project, trained) -> None:
    from neuromask_pl.classifiers import Normalize
    from neuromask_pl.lightning import NeuroMask

    net = project["net"]()
    net.load_state_dict({k[len("net.") :]: v for k, v in trained["with"].items() if k.startswith("net.")})
    classifier = torch.nn.Sequential(Normalize([project["mean"]], [project["std"]]), net).eval()
    images, _ = project["digits"](300)
    loader = torch.utils.data.DataLoader(images[-4:], batch_size=2)
    trainer = make_trainer(L)
    parts = trainer.predict(NeuroMask(classifier, steps=10, settings={"mask_size": 14}), loader)
    masks = torch.cat([p.masks for p in parts])
    alone = NeuroMask(classifier, steps=10, settings={"mask_size": 14}).explain(images[-4:])
    torch.testing.assert_close(masks, alone.masks, rtol=0, atol=1e-4)


def test_callback_explains_a_module_whose_metrics_cannot_be_deep_copied(project, trained) -> None:
    from neuromask_pl.lightning import ExplainDuringTraining

    module = project["module"](net=project["net"]())
    module.load_state_dict(trained["with"])
    images, labels = project["digits"](8)
    loss = module.criterion(module((images - project["mean"]) / project["std"]), labels)
    module.train_loss(loss)  # the metric's forward cache now holds a non-leaf tensor: deepcopy(module) fails
    with pytest.raises(RuntimeError, match="deepcopy"):
        __import__("copy").deepcopy(module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for fast_path in (None, {"fold_batchnorm": True}):  # in place by default; a failed copy falls back to it
        callback = ExplainDuringTraining(images=images[:3], steps=5, mean=0.1307, std=0.3081, fast_path=fast_path)
        assert torch.isfinite(callback.explain(module).masks).all()
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
