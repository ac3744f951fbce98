"""Tests for neuromask_pl.classifiers.external: tiny randomly initialised Hugging Face and timm models built in
the tests (no downloads); each test is skipped when its library is not installed."""

from __future__ import annotations

import hashlib

import pytest
import torch

from neuromask_pl import NeuroMask
from neuromask_pl.classifiers import HuggingFaceClassifier, TimmClassifier, describe_classifier

HF_MEAN, HF_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def normalised(images: torch.Tensor, mean, std) -> torch.Tensor:
    return (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def tiny_vit(**config):
    """A seeded 16x16 ViT with 3 classes (one layer, width 16)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    settings = dict(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    settings |= dict(intermediate_size=32, num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"}) | config
    return transformers.ViTForImageClassification(transformers.ViTConfig(**settings)).eval()


# --- Hugging Face -------------------------------------------------------------------------------


def test_hugging_face_model_in_memory_gives_its_logits_with_its_normalisation(images):
    model = tiny_vit(image_mean=HF_MEAN, image_std=HF_STD)
    clf = HuggingFaceClassifier(model)
    with torch.no_grad():
        expected = model(pixel_values=normalised(images, HF_MEAN, HF_STD)).logits
        assert torch.equal(clf(images), expected)
        assert not torch.equal(expected, model(pixel_values=images).logits)  # the normalisation matters
    assert clf.class_names == ["cat", "dog", "owl"] and clf.in_channels == 3 and clf.source_file is None
    result = NeuroMask(clf, preset="paper", steps=2).explain(images)
    assert result.masks.shape == (2, 1, 16, 16) and torch.equal(result.targets, expected.argmax(1))


def test_hugging_face_given_mean_std_win_and_no_normalisation_without_them(images):
    model = tiny_vit(image_mean=HF_MEAN, image_std=HF_STD)
    plain = tiny_vit()
    with torch.no_grad():
        assert torch.equal(
            HuggingFaceClassifier(model, mean=0.5, std=0.5)(images),
            model(normalised(images, [0.5] * 3, [0.5] * 3)).logits,
        )
        assert torch.equal(HuggingFaceClassifier(plain)(images), plain(images).logits)


def test_hugging_face_folder_with_its_processor_config(images, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_vit()
    model.save_pretrained(tmp_path / "vit")
    transformers.ViTImageProcessor(image_mean=HF_MEAN, image_std=HF_STD).save_pretrained(tmp_path / "vit")
    clf = HuggingFaceClassifier(str(tmp_path / "vit"))
    with torch.no_grad():
        assert torch.equal(clf(images), model(normalised(images, HF_MEAN, HF_STD)).logits)
    assert clf.class_names == ["cat", "dog", "owl"]
    weights = tmp_path / "vit" / "model.safetensors"  # what the run records hash
    assert describe_classifier(clf)["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_hugging_face_bad_folder(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError, match="Hugging Face model folder not found: .*nope"):
        HuggingFaceClassifier(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="could not load an image classifier from .*empty.*save_pretrained"):
        HuggingFaceClassifier(str(tmp_path / "empty"))


# --- timm ---------------------------------------------------------------------------------------


def tiny_timm(seed: int = 0) -> torch.nn.Module:
    """timm's own tiny EfficientNet for tests (BatchNormAct2d layers), 3 classes, seeded; no download."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_timm_model_with_weights_from_a_local_file(images, tmp_path, suffix):
    timm = pytest.importorskip("timm")
    model = tiny_timm(seed=1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        pytest.importorskip("safetensors").torch.save_file(model.state_dict(), str(path))
    clf = TimmClassifier("test_efficientnet", weights=str(path), num_classes=3, class_names=["a", "b", "c"])
    config = timm.data.resolve_model_data_config(model)
    with torch.no_grad():
        expected = model(normalised(images, config["mean"], config["std"]))
        assert torch.equal(clf(images), expected)
        assert not torch.equal(TimmClassifier("test_efficientnet", num_classes=3)(images), expected)  # weights loaded
    assert clf.source_file == str(path) and clf.class_names == ["a", "b", "c"] and not clf.model.training


def test_timm_errors(tmp_path):
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"unknown timm model 'test_efficientnett'.*Did you mean 'test_efficientnet'"):
        TimmClassifier("test_efficientnett")
    with pytest.raises(FileNotFoundError, match="weights file not found: .*nope.pt"):
        TimmClassifier("test_efficientnet", weights=str(tmp_path / "nope.pt"))
    torch.save(tiny_timm().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"shape mismatch 2: classifier\.weight"):
        TimmClassifier("test_efficientnet", weights=str(tmp_path / "w.pt"), num_classes=5)


def test_both_wrappers_can_be_named_in_a_config():
    """The CLI builds classifiers from class_path/init_args: a folder for Hugging Face, a name and a file for timm."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(HuggingFaceClassifier, "hf")
    parser.add_class_arguments(TimmClassifier, "timm")
    args = ["--hf.model_or_path", "models/vit", "--timm.name", "resnet18d", "--timm.weights", "w.safetensors"]
    parsed = parser.parse_args([*args, "--timm.kwargs", "{in_chans: 1}"])
    assert parsed.hf.model_or_path == "models/vit" and parsed.hf.output == "logits"
    assert parsed.timm.name == "resnet18d" and parsed.timm.kwargs == {"in_chans": 1}


def test_a_fixed_size_model_takes_other_sizes_with_resize_to(image_factory) -> None:
    """A ViT that takes only 32 x 32 raises its own error at 16 x 16: NeuroMask adds the size hint; resize_to makes
    it work, with masks at the images' own resolution."""
    transformers = pytest.importorskip("transformers")
    from neuromask_pl import NeuroMask
    from neuromask_pl.classifiers import HuggingFaceClassifier

    config = transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    with pytest.raises(ValueError, match=r"image size the classifier expects.*fixed-size"):
        NeuroMask(HuggingFaceClassifier(model), steps=2).explain(image_factory(2, 16))
    result = NeuroMask(HuggingFaceClassifier(model, resize_to=32), steps=2).explain(image_factory(2, 16))
    assert result.masks.shape == (2, 1, 16, 16) and torch.isfinite(result.masks).all()
    with pytest.raises(ValueError, match="resize_to"):
        HuggingFaceClassifier(model, resize_to=(32, 0))
