"""A checkpoint of the Lightning-Hydra template as it ships loads safely with one trusted name.

tests/template_project/configs/model/mnist.yaml and configs/data/mnist.yaml are the template's: Hydra builds the
optimizer and scheduler as ``_partial_`` entries and the DataModule's split as an OmegaConf ListConfig, and
``save_hyperparameters(logger=False)`` pickles them into every checkpoint beside the dense network.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

L = pytest.importorskip("lightning")
hydra_utils = pytest.importorskip("hydra.utils")
OmegaConf = pytest.importorskip("omegaconf").OmegaConf

PROJECT = Path(__file__).with_name("template_project")
MODULE = "src.models.mnist_module.MNISTLitModule"
NET = "src.models.components.simple_dense_net.SimpleDenseNet"

pytestmark = pytest.mark.filterwarnings("ignore:Attribute 'net' is an instance of `nn.Module`:UserWarning")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """The template's module and DataModule built by Hydra from its YAML, trained 2 steps, and its checkpoint."""
    sys.path.insert(0, str(PROJECT))
    try:
        model = hydra_utils.instantiate(OmegaConf.load(PROJECT / "configs" / "model" / "mnist.yaml"))
        data = hydra_utils.instantiate(OmegaConf.load(PROJECT / "configs" / "data" / "mnist.yaml"))
        L.seed_everything(0)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(model, datamodule=data)
        root = tmp_path_factory.mktemp("template")
        trainer.save_checkpoint(root / "last.ckpt")
        folder = root / "digits"
        folder.mkdir()
        images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        for k, image in enumerate(images):
            Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(folder / f"{k}.png")
        yield {"model": model.eval(), "checkpoint": root / "last.ckpt", "folder": folder, "root": root,
               "images": images}  # fmt: skip
    finally:
        sys.path.remove(str(PROJECT))
        for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
            del sys.modules[name]


def test_the_checkpoint_holds_what_the_template_pickles(template):
    held = torch.serialization.get_unsafe_globals_in_checkpoint(str(template["checkpoint"]))
    for name in (NET, "torch.optim.adam.Adam", "torch.optim.lr_scheduler.ReduceLROnPlateau", "typing.Any",
                 "omegaconf.listconfig.ListConfig"):  # fmt: skip
        assert name in held
    assert len(held) >= 13


def test_it_is_refused_by_default_naming_what_it_holds_and_the_three_ways_on(template):
    from neuromask_pl.classifiers import LightningCheckpointClassifier

    with pytest.raises(ValueError) as refused:
        LightningCheckpointClassifier(MODULE, str(template["checkpoint"]), model_attribute="net")
    message = str(refused.value)
    assert len(message.splitlines()) == 1
    assert f"objects of your package src ({NET})" in message and "torch.optim.adam.Adam" in message
    assert "state_dict_prefix='net.'" in message  # way 1
    assert f"trusted=['{NET}']" in message  # way 2: one name, the network's, and nothing of the others
    assert "weights_only=False" in message  # way 3


def test_one_trusted_name_loads_it_with_the_optimizer_and_scheduler_as_inert_data(template, caplog):
    from neuromask_pl.classifiers import LightningCheckpointClassifier
    from neuromask_pl.classifiers.trust import Inert

    with caplog.at_level(logging.INFO, logger="neuromask_pl.classifiers.checkpoint"):
        clf = LightningCheckpointClassifier(
            MODULE, str(template["checkpoint"]), model_attribute="net", mean=0.1307, std=0.3081, trusted=[NET]
        )
    assert "hyper_parameters.optimizer (hydra._internal.target_policy._DeferredTarget)" in caplog.text
    assert "datamodule_hyper_parameters.train_val_test_split (omegaconf.listconfig.ListConfig)" in caplog.text
    with torch.no_grad():
        normalised = (template["images"] - 0.1307) / 0.3081
        assert torch.equal(clf(template["images"]), template["model"].net(normalised))
    assert clf.in_channels == 1  # a grey network: nothing needs to say so
    hparams = LightningCheckpointClassifier(MODULE, str(template["checkpoint"]), trusted=[NET]).model.hparams
    assert isinstance(hparams.optimizer, Inert) and isinstance(hparams.scheduler, Inert) and hparams.compile is False
    with pytest.raises(TypeError, match=r"hydra\._internal\.target_policy\._DeferredTarget was read .* as inert data"):
        hparams.optimizer(params=[])  # configure_optimizers would fail; explaining never calls it


def test_explain_checkpoint_with_one_trusted_name(template):
    from neuromask_pl import explain_checkpoint, load_results

    out = explain_checkpoint(
        template["checkpoint"], MODULE, template["folder"], template["root"] / "out", model_attribute="net",
        mean=0.1307, std=0.3081, classifier={"trusted": [NET]}, image_size=28, steps=2,
        default_root_dir=template["root"], trainer={"accelerator": "cpu", "enable_progress_bar": False},
    )  # fmt: skip
    with load_results(out) as results:
        assert len(results) == 3 and all(row["status"] == "ok" for row in results.rows)
        assert results.mask(0).shape == (28, 28)
