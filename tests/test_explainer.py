"""The explainer without Lightning: the same masks as the LightningModule, its record, its mask gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import make_images, make_tiny_cnn

from neuromask_pl import PRESETS, Explainer, MaskSettings, NeuroMask
from neuromask_pl.callbacks import ExplainDuringTraining


def test_explainer_gives_the_lightning_module_s_masks_bit_for_bit() -> None:
    net, images = make_tiny_cnn(0), make_images(3, size=16, seed=2)
    alone = Explainer(net, steps=6, seed=1).explain(images, ids=torch.tensor([4, 5, 6]))
    wrapped = NeuroMask(net, steps=6, seed=1).explain(images, ids=torch.tensor([4, 5, 6]))
    assert torch.equal(alone.masks, wrapped.masks) and torch.equal(alone.targets, wrapped.targets)


def test_the_record_names_a_preset_only_when_the_settings_are_that_preset_with_the_recorded_overrides() -> None:
    net = make_tiny_cnn(0)
    record = Explainer(net, preset="paper", steps=7, settings={"lr": 0.05}).record()
    assert record["preset"] == "paper" and "steps" not in record
    assert record["settings"] == dataclasses.replace(PRESETS["paper"], steps=7, lr=0.05).as_dict()
    # a complete MaskSettings replaces the preset: the record must not say "paper"
    assert Explainer(net, preset="paper", settings=PRESETS["default"]).record()["preset"] == "default"
    odd = dataclasses.replace(PRESETS["default"], lr=0.123)
    assert Explainer(net, preset="paper", settings=odd).record()["preset"] is None
    for explainer in (Explainer(net, preset="paper", steps=7), Explainer(net, settings=odd)):
        rebuilt = Explainer(net, **explainer.record())
        assert rebuilt.settings == explainer.settings and rebuilt.record() == explainer.record()


def test_lightning_hyperparameters_are_the_record_and_rebuild_the_module() -> None:
    module = NeuroMask(make_tiny_cnn(0), preset="paper", steps=7, seed=3)
    assert dict(module.hparams) == module.explainer.record()
    twin = NeuroMask(make_tiny_cnn(0), **module.hparams)
    assert twin.settings == module.settings and twin.settings.steps == 7


def test_the_mask_gradient_is_decided_once_and_reported() -> None:
    net, images = make_tiny_cnn(0), make_images(2, size=16)
    explainer = Explainer(net, steps=2)
    assert explainer.report()["mask_gradient"] is None  # nothing ran yet
    explainer.explain(images)
    assert explainer.report()["mask_gradient"] == "explicit"  # the default on the CPU
    autograd = Explainer(net, steps=2, mask_gradient="autograd")
    autograd.explain(images)
    assert autograd.report()["mask_gradient"] == "autograd"
    paper = Explainer(net, preset="paper", steps=2)  # settings the explicit step does not cover
    paper.explain(images)
    assert paper.report()["mask_gradient"] == "autograd"
    with pytest.raises(ValueError, match="mask_gradient='explicit' covers"):
        Explainer(net, preset="paper", mask_gradient="explicit")
    with pytest.raises(ValueError, match="mask_gradient must be one of"):
        Explainer(net, mask_gradient="fused")


def test_a_complete_settings_object_needs_no_preset() -> None:
    settings = MaskSettings(steps=3)
    assert Explainer(make_tiny_cnn(0), preset=None, settings=settings).settings == settings


def test_the_training_callback_resolves_its_settings_once_at_construction() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        ExplainDuringTraining(preset="sharp")
    callback = ExplainDuringTraining(steps=4, settings={"lr": 0.2}, images=make_images(2, size=16))
    assert callback.explainer.settings.steps == 4 and callback.explainer.settings.lr == 0.2
    explanation = callback.explain(make_tiny_cnn(0))
    assert len(explanation) == 2 and callback.explainer.report()["mask_gradient"] is None  # its copy ran, not it


def test_the_report_names_the_layers_each_pass_replaced() -> None:
    explainer = Explainer(make_tiny_cnn(0), steps=1)
    explainer.explain(make_images(2, size=16))
    report = explainer.report()
    assert report["passes"] == {name: len(layers) for name, layers in report["replaced_layers"].items()}
    assert report["replaced_layers"]["frozen_linear"] == ["head"]  # the classifier's head, by its qualified name
    assert report["variant"] == "folded+packed" and report["batch_invariant"] and report["replaced_layers_ran"]
