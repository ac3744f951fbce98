"""How many channels a classifier takes: in_channels on every loader, one-channel statistics, grey networks without
a convolution (the Lightning-Hydra template's SimpleDenseNet, Lightning's MNIST Backbone example), and mismatch
errors that name the right direction and the shipped configs' command-line paths. Models built here, seeded."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import make_trainer
from PIL import Image
from torch import nn

from neuromask_pl import Explainer, explain_checkpoint, explain_folder
from neuromask_pl.classifiers import (
    ClassifierWrapper,
    FactoryClassifier,
    LightningCheckpointClassifier,
    Normalize,
    TorchScriptClassifier,
)
from neuromask_pl.cli import main
from neuromask_pl.data.checks import channel_evidence
from neuromask_pl.store import load_results

MEAN, STD = 0.1307, 0.3081


class SimpleDenseNet(nn.Module):
    """The Lightning-Hydra template's network: Linear layers on a flattened 1 x 28 x 28 digit."""

    def __init__(self, input_size: int = 784, lin1_size: int = 32, output_size: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Linear(input_size, lin1_size),
            nn.BatchNorm1d(lin1_size),
            nn.ReLU(),
            nn.Linear(lin1_size, output_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, channels, width, height = x.size()
        return self.model(x.view(batch_size, -1))


class Backbone(nn.Module):
    """Lightning's MNIST example backbone (backbone_image_classifier.py): two Linear layers, no convolution."""

    def __init__(self, hidden_dim: int = 32) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.l1 = nn.Linear(28 * 28, hidden_dim)
        self.l2 = nn.Linear(hidden_dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        x = torch.relu(self.l1(x))
        return torch.relu(self.l2(x))


class PooledGrey(nn.Module):
    """A grey network that nothing in it identifies as grey: no convolution, a Linear layer on 4 x 4 pooled pixels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DenseLit(pl.LightningModule):
    """A LightningModule around the template's dense network, built from plain hyper-parameters."""

    def __init__(self, lin1_size: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = SimpleDenseNet(lin1_size=lin1_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def simple_dense_net() -> nn.Module:
    return SimpleDenseNet().eval()


def rgb_conv_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def digits(n: int = 3) -> torch.Tensor:
    """``n`` seeded grey 28 x 28 images in [0, 1]."""
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(5))


@pytest.fixture
def grey_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "digits"
    folder.mkdir()
    for k, image in enumerate(digits(3)):
        Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(folder / f"{k}.png")
    return folder


# --- the guess -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean, std", [(MEAN, STD), ([MEAN], [STD]), ((MEAN,), STD)])
def test_one_channel_statistics_imply_one_channel(mean, std):
    assert Normalize(mean, std).num_channels is None and Normalize(mean, std).one_channel  # the values broadcast
    clf = ClassifierWrapper(PooledGrey(), Normalize(mean, std))
    assert (clf.in_channels, clf.in_channels_from) == (1, "one-channel statistics")


def test_the_guess_in_order():
    assert (ClassifierWrapper(PooledGrey()).in_channels, ClassifierWrapper(PooledGrey()).in_channels_from) == (
        3, "default"
    )  # fmt: skip
    per_channel = ClassifierWrapper(PooledGrey(), Normalize([0.5, 0.5, 0.5], [0.2, 0.2, 0.2]))
    assert (per_channel.in_channels, per_channel.in_channels_from) == (3, "statistics")
    conv = ClassifierWrapper(rgb_conv_net(), Normalize(0.5, 0.5))  # one value for every channel of an RGB network
    assert (conv.in_channels, conv.in_channels_from) == (3, "convolution")
    given = ClassifierWrapper(rgb_conv_net(), Normalize(MEAN, STD), in_channels=3)
    assert (given.in_channels, given.in_channels_from) == (3, "given")
    with pytest.raises(ValueError, match=r"in_channels must be a positive integer \(1 grey, 3 RGB\) or None, got 0"):
        ClassifierWrapper(PooledGrey(), in_channels=0)


@pytest.mark.parametrize("net", [SimpleDenseNet, Backbone])
def test_grey_dense_networks_are_taken_for_grey(net):
    """No convolution and no statistics: the first Linear layer's 784 = 28 x 28 inputs say one channel."""
    for clf in (ClassifierWrapper(net()), ClassifierWrapper(net(), Normalize(MEAN, STD))):
        assert (clf.in_channels, clf.in_channels_from) == (1, "first Linear layer")
    rgb = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    assert channel_evidence(rgb) == (3, "first Linear layer") and channel_evidence(nn.Linear(4, 2)) == (None, "")


def test_torchscript_networks_are_read_by_their_layers(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(rgb_conv_net())
        traced = torch.jit.trace(simple_dense_net(), digits(2))
    assert channel_evidence(scripted) == (3, "convolution") and channel_evidence(traced) == (1, "first Linear layer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(scripted, tmp_path / "rgb.pt")
        clf = TorchScriptClassifier(str(tmp_path / "rgb.pt"), mean=0.5, std=0.5)  # one value for every channel
        assert clf.in_channels == 3
        assert TorchScriptClassifier(str(tmp_path / "rgb.pt"), in_channels=1).in_channels == 1


def test_every_loader_takes_in_channels(tmp_path):
    factory = f"{__name__}:simple_dense_net"
    assert FactoryClassifier(factory, in_channels=3).in_channels == 3
    assert FactoryClassifier(factory).in_channels == 1
    module = DenseLit()
    trainer = make_trainer(max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    clf = LightningCheckpointClassifier(f"{__name__}.DenseLit", str(tmp_path / "dense.ckpt"), model_attribute="net")
    assert (clf.in_channels, clf.in_channels_from) == (1, "first Linear layer")
    given = LightningCheckpointClassifier(f"{__name__}.DenseLit", str(tmp_path / "dense.ckpt"), in_channels=3)
    assert (given.in_channels, given.in_channels_from) == (3, "given")


# --- mismatches ------------------------------------------------------------------------------------------------


def test_a_known_channel_count_asks_for_images_read_so():
    message = (
        r"images have 1 channel\(s\) but the classifier takes 3 \(RGB\), as its first convolution says: read the "
        r"images as 3 channel\(s\): ImageFolderDataModule\(channels=3\), explain_folder\(\.\.\., channels=3\), on the "
        r"command line --data\.init_args\.channels 3$"
    )
    with pytest.raises(ValueError, match=message):
        Explainer(ClassifierWrapper(rgb_conv_net()), steps=1).explain(torch.rand(2, 1, 16, 16))


def test_a_guessed_channel_count_names_in_channels_first():
    """Grey images for a classifier whose 3 channels are only a default: the fix is the classifier's in_channels."""
    message = (
        r"images have 1 channel\(s\) but the classifier takes 3 \(RGB\), a guess \(nothing in it says how many.*\): "
        r"if it takes 1, give the classifier in_channels=1 \(on the command line "
        r"--model\.classifier\.init_args\.in_channels 1\); if it takes 3, read the images as 3"
    )
    with pytest.raises(ValueError, match=message):
        Explainer(ClassifierWrapper(PooledGrey()), steps=1).explain(torch.rand(2, 1, 16, 16))
    Explainer(ClassifierWrapper(PooledGrey(), in_channels=1), steps=1).explain(torch.rand(2, 1, 16, 16))


@pytest.mark.parametrize("wrap", [False, True])
def test_grey_dense_network_given_rgb_images_is_a_channel_error_not_an_image_size_one(wrap):
    net = simple_dense_net()
    clf = ClassifierWrapper(net, Normalize(MEAN, STD), in_channels=None) if wrap else net
    with pytest.raises(ValueError, match=r"takes 784 = 1 x 28 x 28: read the images as 1 channel") as refused:
        Explainer(clf, steps=1).explain(torch.rand(2, 3, 28, 28))
    assert "image size" not in str(refused.value) and len(str(refused.value).splitlines()) == 1
    Explainer(clf, steps=1).explain(digits(2))


def test_explain_folder_reads_grey_images_for_a_grey_dense_network(grey_folder, tmp_path):
    """No channels given anywhere: the network's first Linear layer says grey, and the folder is read so."""
    clf = ClassifierWrapper(simple_dense_net(), Normalize(MEAN, STD))
    out = explain_folder(
        clf, grey_folder, tmp_path / "out", image_size=28, steps=2, default_root_dir=tmp_path,
        trainer={"accelerator": "cpu", "enable_progress_bar": False, "logger": False},
    )  # fmt: skip
    with load_results(out) as results:
        assert len(results) == 3 and all(row["status"] == "ok" for row in results.rows)


def test_explain_checkpoint_takes_in_channels_and_channels(grey_folder, tmp_path):
    module = DenseLit()
    trainer = make_trainer(max_steps=0)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    for n, options in enumerate(({}, {"in_channels": 1}, {"channels": 1})):
        out = explain_checkpoint(
            tmp_path / "dense.ckpt", DenseLit, grey_folder, tmp_path / f"out{n}", model_attribute="net", mean=MEAN,
            std=STD, image_size=28, steps=2, default_root_dir=tmp_path,
            trainer={"accelerator": "cpu", "enable_progress_bar": False, "logger": False}, **options,
        )  # fmt: skip
        with load_results(out) as results:
            assert len(results) == 3 and all(row["status"] == "ok" for row in results.rows)


def test_the_cli_names_the_shipped_configs_flag(grey_folder, tmp_path):
    """A grey dense network from a config whose data are read as RGB: one line naming --data.init_args.channels."""
    args = [
        "predict", "--model.classifier", "neuromask_pl.classifiers.FactoryClassifier",
        "--model.classifier.init_args.factory", f"{__name__}:simple_dense_net",
        "--model.classifier.init_args.mean", "0.1307", "--model.classifier.init_args.std", "0.3081",
        "--model.steps", "2", "--data", "neuromask_pl.data.ImageFolderDataModule",
        "--data.init_args.root", str(grey_folder), "--data.init_args.image_size", "28",
        "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--writer.output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"read the images as 1 channel.*--data\.init_args\.channels 1"):
        main(args)
    main([*args, "--data.init_args.channels", "1"])
    with load_results(tmp_path / "out") as results:
        assert len(results) == 3
