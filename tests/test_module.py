"""neuromask_pl.module, the NeuroMask LightningModule: batch independence, a frozen and restored classifier,
planted ground truth, bf16 on CPU, targets and ids, input errors, hyper-parameters, the Explanation it returns,
the out-of-memory backoff, and NeuroMask as a submodule of a user's LightningModule."""

from __future__ import annotations

import logging
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import BLUR_AREA
from torch import Tensor, nn

from neuromask_pl.data import TensorDataModule
from neuromask_pl.explanation import LOSS_TERMS, Explanation
from neuromask_pl.fastcopy import FastPath
from neuromask_pl.maths.mask import init_weights, mask_shape, upsample_mask
from neuromask_pl.module import NeuroMask
from neuromask_pl.settings import MaskSettings

pytestmark = pytest.mark.numerics

# Settings under which the masks of the tiny CNN move well away from their random start in few steps.
BATCH_CONFIGS = {
    "paper": dict(preset="paper", steps=40),
    "paper_unsaturated": dict(preset="paper", steps=60, settings=dict(weight_limit=1.0, lr=0.1)),
    # The default ends at temperature 0.01, which amplifies float32 rounding differences between batched and
    # single-image convolutions 100x; here it ends at 0.05, and tests/maths/test_optimize.py checks the
    # exact default preset in float64.
    "default": dict(preset="default", steps=40, settings=dict(temperature=0.05)),
}


def start_masks(settings: MaskSettings, ids: Tensor, height: int, width: int, seed: int) -> Tensor:
    """The masks before any optimisation step (to check that the optimisation changed them)."""
    h, w = mask_shape(height, width, settings.scale_for(height, width))
    weights = init_weights(torch.as_tensor(ids), h, w, settings.weight_limit, seed)
    return upsample_mask(torch.sigmoid(weights / settings.temperature), height, width)


def cat_explanations(parts: list[Explanation]) -> dict[str, Tensor]:
    return {name: torch.cat([getattr(p, name) for p in parts]) for name in ("ids", "masks", "targets", "prob_original")}


# ----------------------------------------------------------------------------- 1. batch independence


@pytest.mark.parametrize("config", list(BATCH_CONFIGS))
def test_batched_masks_equal_one_at_a_time(config: str, tiny_cnn, image_factory) -> None:
    images = image_factory(5, 16)
    ids = torch.tensor([7, 3, 11, 0, 42])
    tiny_cnn.train()  # NeuroMask must put BatchNorm on its running statistics itself
    module = NeuroMask(tiny_cnn, seed=5, **BATCH_CONFIGS[config])
    batched = module.explain(images, ids=ids)
    singles = [module.explain(images[i : i + 1], ids=ids[i : i + 1]) for i in range(len(ids))]
    alone = cat_explanations(singles)
    torch.testing.assert_close(batched.masks, alone["masks"], rtol=0, atol=1e-4)
    assert torch.equal(batched.targets, alone["targets"])
    assert torch.equal(batched.ids, ids)
    # The optimisation moved the masks, so the equality is not just that of the seeded start.
    start = start_masks(module.settings, ids, 16, 16, seed=5)
    assert (batched.masks - start).abs().amax() > 0.05


def test_same_sample_in_two_batches_at_different_positions(tiny_cnn, image_factory) -> None:
    images = image_factory(5, 16)
    module = NeuroMask(tiny_cnn, preset="default", steps=30, seed=1)
    first = module.explain(images[[0, 1, 2]], ids=[10, 11, 12])  # sample 11 at position 1
    second = module.explain(images[[3, 4, 1]], ids=[13, 14, 11])  # sample 11 at position 2
    torch.testing.assert_close(first.masks[1], second.masks[2], rtol=0, atol=1e-4)
    assert first.targets[1] == second.targets[2]


def test_mask_depends_on_seed_and_sample_id(tiny_cnn, image_factory) -> None:
    images = image_factory(2, 16)
    settings = dict(preset="paper", steps=20)
    base = NeuroMask(tiny_cnn, seed=0, **settings).explain(images, ids=[0, 1]).masks
    again = NeuroMask(tiny_cnn, seed=0, **settings).explain(images, ids=[0, 1]).masks
    other_seed = NeuroMask(tiny_cnn, seed=1, **settings).explain(images, ids=[0, 1]).masks
    other_ids = NeuroMask(tiny_cnn, seed=0, **settings).explain(images, ids=[5, 6]).masks
    assert torch.equal(base, again)
    assert (base - other_seed).abs().mean() > 0.1
    assert (base - other_ids).abs().mean() > 0.1


# ----------------------------------------------------------------------------- 2. classifier untouched


def snapshot(model: nn.Module) -> tuple[dict, dict, dict]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    return state, modes, grads


def assert_untouched(model: nn.Module, before: tuple[dict, dict, dict], when: str) -> None:
    state, modes, grads = before
    now = model.state_dict()
    assert list(now) == list(state), when
    for key, value in state.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), f"{key} changed after {when}"
    assert {name: m.training for name, m in model.named_modules()} == modes, when
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads, when
    assert all(p.grad is None for p in model.parameters()), f"a parameter got a .grad after {when}"


@pytest.mark.parametrize("handover", ["eval", "training_mixed_grad"])
def test_classifier_is_bit_identical_afterwards(handover: str, tiny_cnn, image_factory, trainer_factory) -> None:
    if handover == "training_mixed_grad":
        tiny_cnn.train()
        tiny_cnn.head.eval()  # modes differ between submodules
        tiny_cnn.features[0].weight.requires_grad_(False)
        tiny_cnn.features[1].bias.requires_grad_(False)
    model_state = snapshot(tiny_cnn)
    assert "features.1.num_batches_tracked" in model_state[0] and model_state[0]["features.1.num_batches_tracked"] > 0
    images = image_factory(4, 12)
    module = NeuroMask(tiny_cnn, preset="default", steps=8)

    module.explain(images)
    assert_untouched(tiny_cnn, model_state, "explain")
    datamodule = TensorDataModule(images, batch_size=2)
    trainer_factory().predict(module, datamodule=datamodule)
    assert_untouched(tiny_cnn, model_state, "Trainer.predict")
    metrics = trainer_factory().test(module, datamodule=datamodule, verbose=False)
    assert_untouched(tiny_cnn, model_state, "Trainer.test")

    # test() logged the batch means of what explain() gives for the same samples.
    reference = module.explain(images, ids=torch.arange(4))
    assert metrics[0]["test/mask_area"] == pytest.approx(float(reference.mask_area.mean()), abs=1e-5)
    assert metrics[0]["test/loss_total"] == pytest.approx(float(reference.loss["total"].mean()), rel=1e-4)


# ----------------------------------------------------------------------------- 3. planted ground truth

SIZE = 32
REGION = (slice(4, 12), slice(18, 26))  # the only pixels the classifier looks at
DECOY = (slice(20, 28), slice(4, 12))  # the same pattern, ignored by the classifier
CHECKER = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float() * 2 - 1


class RegionClassifier(nn.Module):
    """Two classes; class 0's logit grows with the region's correlation with a +-1 checkerboard.

    Black (paper) and blurred (default) baselines both destroy the checkerboard, so the
    prediction survives masking only if the region is kept.
    """

    def forward(self, x: Tensor) -> Tensor:
        corr = (x[:, :, REGION[0], REGION[1]] * CHECKER).mean((1, 2, 3))
        logit = 20 * (corr - 0.2)
        return torch.stack([logit, torch.zeros_like(logit)], 1)


def planted_images(n: int) -> Tensor:
    images = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 0.5 + 0.25
    images[:, :, REGION[0], REGION[1]] = (1 + CHECKER) / 2
    images[:, :, DECOY[0], DECOY[1]] = (1 + CHECKER) / 2
    return images


def test_region_classifier_ignores_everything_but_its_region() -> None:
    images = planted_images(2)
    other = images.clone()
    other[:, :, DECOY[0], DECOY[1]] = 0.0
    other[:, :, 20:, 20:] = 1.0
    classifier = RegionClassifier()
    assert torch.equal(classifier(images), classifier(other))
    assert (classifier(images).softmax(-1)[:, 0] > 0.99).all()
    blacked = images.clone()
    blacked[:, :, REGION[0], REGION[1]] = 0.0
    assert (classifier(blacked).softmax(-1)[:, 0] < 0.05).all()


@pytest.mark.parametrize("preset", ["paper", "default"])
def test_mask_finds_the_planted_region(preset: str) -> None:
    images = planted_images(2)
    result = NeuroMask(RegionClassifier(), preset=preset, seed=0).explain(images)
    masks = result.masks[:, 0]
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[REGION] = True
    decoy = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    decoy[DECOY] = True
    mean_in, mean_out, mean_decoy = masks[:, inside].mean(1), masks[:, ~inside].mean(1), masks[:, decoy].mean(1)
    assert (mean_in > 0.5).all(), mean_in
    assert (mean_in > 2 * mean_out).all(), (mean_in, mean_out)
    assert (mean_in > 2 * mean_decoy).all(), (mean_in, mean_decoy)
    assert torch.equal(result.targets, torch.zeros(2, dtype=torch.long))
    assert result.preserved.all()


# ----------------------------------------------------------------------------- 4. bf16-mixed on CPU


def test_bf16_mixed_precision_on_cpu_is_close_to_fp32(tiny_cnn, image_factory, trainer_factory) -> None:
    """At a fixed temperature (BLUR_AREA), where float rounding is not amplified into flipped pixels as at the default's
    final 0.01: bf16 keeps 8 significant bits of the classifier's activations, which moved the masks by a mean of
    3e-5 (largest 5e-4) after 20 steps under AVX-512, AVX2 and SSE4.1 kernels; the bound leaves far more room."""
    images = image_factory(4, 16)
    module = NeuroMask(tiny_cnn, preset="paper", steps=20, settings=BLUR_AREA)
    half = trainer_factory(precision="bf16-mixed").predict(module, datamodule=TensorDataModule(images, batch_size=4))
    result = half[0]
    full = module.explain(images)
    assert result.masks.shape == (4, 1, 16, 16) and result.masks.dtype == torch.float32
    assert result.masks.min() >= 0 and result.masks.max() <= 1
    assert not torch.equal(result.masks, full.masks)  # bf16 really reached the classifier
    assert (result.masks - full.masks).abs().mean() < 0.02
    torch.testing.assert_close(result.prob_original, full.prob_original, rtol=0, atol=0.03)


# ----------------------------------------------------------------------------- 5. bad input


class TupleClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.linear(x.mean((2, 3)))
        return logits, logits


def good_images(n: int = 2, size: int = 8) -> Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def with_value(value: float) -> Tensor:
    images = good_images()
    images[1, 0, 3, 4] = value
    return images


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (good_images()[0], ValueError, r"B x C x H x W, got \(3, 8, 8\).*unsqueeze"),
        (good_images()[None], ValueError, r"B x C x H x W, got \(1, 2, 3, 8, 8\)"),
        (torch.rand(2, 1, 8, 8), ValueError, r"images have 1 channel\(s\) but the classifier takes 3"),
        (with_value(math.nan), ValueError, "NaN or inf"),
        (with_value(math.inf), ValueError, "NaN or inf"),
        (with_value(-math.inf), ValueError, "NaN or inf"),
        (torch.rand(0, 3, 8, 8), ValueError, r"empty: shape \(0, 3, 8, 8\)"),
        (torch.rand(2, 3, 0, 8), ValueError, r"empty: shape \(2, 3, 0, 8\)"),
        ((good_images() * 255).to(torch.uint8), TypeError, "float in \\[0, 1\\], got dtype torch.uint8"),
        (torch.randint(0, 2, (2, 3, 8, 8)), TypeError, "got dtype torch.int64"),
        (with_value(1.5), ValueError, r"\[0, 1\] pixel space.*1.5"),
        (with_value(-0.2), ValueError, r"\[0, 1\] pixel space.*-0.2"),
        ([[0.5]], TypeError, "must be a torch.Tensor"),
    ],
    ids=[
        "rank3",
        "rank5",
        "channels",
        "nan",
        "inf",
        "-inf",
        "B=0",
        "H=0",
        "uint8",
        "int64",
        "above1",
        "below0",
        "list",
    ],
)
def test_bad_images_are_clear_errors(images, error: type, message: str, tiny_cnn) -> None:
    module = NeuroMask(tiny_cnn, preset="paper", steps=2)
    with pytest.raises(error, match=message):
        module.explain(images)


def test_target_outside_the_classes(tiny_cnn) -> None:
    module = NeuroMask(tiny_cnn, preset="paper", steps=2)
    with pytest.raises(ValueError, match=r"target class 3 is outside the classifier's 3 classes \(0..2\)"):
        module.explain(good_images(), targets=3)
    with pytest.raises(ValueError, match="target class -1 is outside"):
        module.explain(good_images(), targets=torch.tensor([0, -1]))


def test_target_class_outside_the_classes_with_a_trainer(tiny_cnn, trainer_factory) -> None:
    module = NeuroMask(tiny_cnn, preset="paper", steps=2, target_class=7)
    with pytest.raises(ValueError, match="target class 7 is outside the classifier's 3 classes"):
        trainer_factory().predict(module, datamodule=TensorDataModule(good_images(), batch_size=2))


def test_labels_outside_the_classes_with_a_trainer(tiny_cnn, trainer_factory) -> None:
    datamodule = TensorDataModule(good_images(), labels=torch.tensor([0, 5]), batch_size=2)
    with pytest.raises(ValueError, match="target class 5 is outside"):
        trainer_factory().predict(NeuroMask(tiny_cnn, preset="paper", steps=2), datamodule=datamodule)


def test_constructor_errors(tiny_cnn) -> None:
    with pytest.raises(ValueError, match="target_class must be a class index >= 0 \(an int\), got -1"):
        NeuroMask(tiny_cnn, target_class=-1)
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        NeuroMask(tiny_cnn, preset="fast")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        NeuroMask(tiny_cnn, steps=0)
    with pytest.raises(TypeError, match="classifier must be a torch.nn.Module, got function"):
        NeuroMask(lambda x: x)  # type: ignore[arg-type]


def test_hparams_hold_the_resolved_settings(tiny_cnn) -> None:
    module = NeuroMask(tiny_cnn, preset="paper", steps=7, seed=3, target_class=1, settings={"baseline": "mean"})
    assert "steps" not in module.hparams and module.hparams["settings"]["baseline"] == "mean"
    assert module.hparams["settings"]["steps"] == 7  # recorded once, among the settings
    assert module.hparams["settings"]["lr"] == 0.03 and module.hparams["settings"]["temperature"] == 0.3  # preset
    assert module.hparams["seed"] == 3 and module.hparams["target_class"] == 1 and module.hparams["preset"] == "paper"
    assert module.settings.steps == 7 and module.hparams["settings"] == module.settings.as_dict()
    assert module.hparams["fast_path"] == FastPath().as_dict() and module.hparams["mask_gradient"] == "auto"


@pytest.mark.parametrize(
    "options",
    [
        {"temperature_start": 1.0, "tie_break": 0.05},
        {"mask_coarse": 4, "l_detail": 2.0, "upsample_weights": True},
    ],
    ids=["annealing_and_tie_break", "two_scale_and_upsampled_weights"],
)
def test_new_options_reach_the_settings_through_the_constructor(tiny_cnn, options: dict) -> None:
    module = NeuroMask(tiny_cnn, preset="paper", settings=options)
    assert {name: getattr(module.settings, name) for name in options} == options
    assert {name: module.hparams["settings"][name] for name in options} == options


def test_duplicate_or_miscounted_ids(tiny_cnn) -> None:
    module = NeuroMask(tiny_cnn, preset="paper", steps=2)
    with pytest.raises(ValueError, match=r"2 distinct sample ids.*\[4, 4\]"):
        module.explain(good_images(), ids=[4, 4])
    with pytest.raises(ValueError, match="2 distinct sample ids"):
        module.explain(good_images(), ids=[1, 2, 3])


def test_classifier_returning_a_tuple() -> None:
    module = NeuroMask(TupleClassifier(), preset="paper", steps=2)
    with pytest.raises(TypeError, match="must return logits of shape B x K, got tuple"):
        module.explain(good_images())


def test_images_smaller_than_the_laplacian_restore_the_classifier(tiny_cnn) -> None:
    tiny_cnn.train()
    before = snapshot(tiny_cnn)
    with pytest.raises(ValueError, match="2x2 pixels are smaller than the 3x3 Laplacian"):
        NeuroMask(tiny_cnn, preset="paper", steps=2).explain(good_images(size=2))
    with pytest.raises(ValueError, match="4x4 pixels are smaller than the 5x5 Laplacian"):
        NeuroMask(tiny_cnn, preset="default", steps=2, settings={"laplacian": 5}).explain(good_images(size=4))
    assert_untouched(tiny_cnn, before, "a failed explain")


@pytest.mark.parametrize("stage", ["predict", "test"])
def test_trainer_with_inference_mode_is_refused(stage: str, tiny_cnn, trainer_factory) -> None:
    trainer = trainer_factory(inference_mode=True)
    run = getattr(trainer, stage)
    with pytest.raises(RuntimeError, match=r"inference_mode=False"):
        run(NeuroMask(tiny_cnn, preset="paper", steps=2), datamodule=TensorDataModule(good_images(), batch_size=2))


def test_explain_inside_inference_mode_is_refused(tiny_cnn) -> None:
    module = NeuroMask(tiny_cnn, preset="paper", steps=2)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.inference_mode"):
        module.explain(good_images())


# ----------------------------------------------------------------------------- 6. targets


def test_default_target_is_the_predicted_class(tiny_cnn, image_factory) -> None:
    images = image_factory(6, 16)
    predicted = tiny_cnn(images).argmax(-1)
    assert predicted.unique().numel() > 1  # the check below can tell classes apart
    result = NeuroMask(tiny_cnn, preset="paper", steps=3).explain(images)
    assert torch.equal(result.targets, predicted)


def test_explicit_targets(tiny_cnn, image_factory) -> None:
    images = image_factory(3, 16)
    module = NeuroMask(tiny_cnn, preset="paper", steps=3, target_class=0)
    assert module.explain(images).targets.tolist() == [0, 0, 0]
    assert module.explain(images, targets=2).targets.tolist() == [2, 2, 2]
    assert module.explain(images, targets=torch.tensor([1, 0, 2])).targets.tolist() == [1, 0, 2]


def test_labels_of_the_batch_and_target_class_through_a_trainer(tiny_cnn, image_factory, trainer_factory) -> None:
    images = image_factory(5, 16)
    labels = (tiny_cnn(images).argmax(-1) + 1) % 3  # never the predicted class
    datamodule = TensorDataModule(images, labels=labels, ids=torch.tensor([9, 8, 7, 6, 5]), batch_size=2)
    settings = dict(preset="default", steps=10, seed=2)

    parts = trainer_factory().predict(NeuroMask(tiny_cnn, **settings), datamodule=datamodule)
    got = cat_explanations(parts)
    assert [len(p) for p in parts] == [2, 2, 1]
    assert torch.equal(got["targets"], labels)
    assert torch.equal(got["ids"], torch.tensor([9, 8, 7, 6, 5]))
    # Same masks as one explain() call over every image with the same ids and targets.
    direct = NeuroMask(tiny_cnn, **settings).explain(images, targets=labels, ids=torch.tensor([9, 8, 7, 6, 5]))
    torch.testing.assert_close(got["masks"], direct.masks, rtol=0, atol=1e-4)

    fixed = trainer_factory().predict(NeuroMask(tiny_cnn, target_class=1, **settings), datamodule=datamodule)
    assert cat_explanations(fixed)["targets"].tolist() == [1] * 5


# ----------------------------------------------------------------------------- 7. all-skipped batch


def test_predict_step_on_an_all_skipped_batch(tiny_cnn) -> None:
    skipped = [{"index": 3, "path": "a.png", "error": "truncated"}, {"index": 4, "path": "b.png", "error": "empty"}]
    batch = {
        "image": torch.empty(0, 3, 10, 12),
        "index": torch.empty(0, dtype=torch.long),
        "path": [],
        "skipped": skipped,
    }
    result = NeuroMask(tiny_cnn, preset="paper", steps=2).predict_step(batch, 0)
    assert isinstance(result, Explanation)
    assert len(result) == 0
    assert result.masks.shape == (0, 1, 10, 12)
    assert result.skipped == skipped
    assert result.records() == [] and result.summary() == {}
    assert all(result.loss[term].shape == (0,) for term in LOSS_TERMS)
    tested = NeuroMask(tiny_cnn, preset="paper", steps=2).test_step(batch, 0)  # nothing to log, no error
    assert len(tested) == 0 and tested.skipped == skipped


# ----------------------------------------------------------------------------- 8. Explanation fields


def test_explanation_fields_match_independent_computations(tiny_cnn, image_factory) -> None:
    images = image_factory(3, 16)
    ids = torch.tensor([4, 0, 2])
    result = NeuroMask(tiny_cnn, preset="paper", steps=60, settings={"weight_limit": 1.0, "lr": 0.1}).explain(
        images, ids=ids
    )
    assert result.masks.shape == (3, 1, 16, 16)
    assert result.masks.min() >= 0 and result.masks.max() <= 1
    assert torch.equal(result.ids, ids)
    assert result.images is not None and torch.equal(result.images, images)

    with torch.no_grad():
        logits = tiny_cnn.eval()(images)
        probs = torch.exp(logits - logits.logsumexp(-1, keepdim=True))
        expected_original = probs[torch.arange(3), result.targets]
        masked_logits = tiny_cnn(images * result.masks)  # paper: hidden pixels go black
    torch.testing.assert_close(result.prob_original, expected_original, rtol=0, atol=1e-6)
    expected_masked = masked_logits.softmax(-1)[torch.arange(3), result.targets]
    torch.testing.assert_close(result.prob_masked, expected_masked, rtol=0, atol=1e-5)
    assert torch.equal(result.preserved, masked_logits.argmax(-1) == result.targets)
    torch.testing.assert_close(result.mask_area, result.masks.mean((1, 2, 3)), rtol=0, atol=1e-6)
    torch.testing.assert_close(result.loss["pred"], -expected_masked.log(), rtol=1e-4, atol=1e-5)
    total = 0.4 * result.loss["pred"] + 0.35 * result.loss["sparse"] + 0.03 * result.loss["smooth"]
    torch.testing.assert_close(result.loss["total"], total, rtol=1e-5, atol=1e-6)

    names = ["cat", "dog", "owl"]
    rows = result.records(names)
    assert [r["sample_id"] for r in rows] == [4, 0, 2]
    for i, row in enumerate(rows):
        assert row["target"] == int(result.targets[i]) and row["target_name"] == names[row["target"]]
        assert row["prob_original"] == pytest.approx(float(expected_original[i]), abs=1e-6)
        assert row["prob_masked"] == pytest.approx(float(expected_masked[i]), abs=1e-5)
        assert row["mask_area"] == pytest.approx(float(result.masks[i].mean()), abs=1e-6)
        assert row["preserved"] == bool(result.preserved[i])
        assert row["path"] == ""
        for term in LOSS_TERMS:
            assert row[f"loss_{term}"] == pytest.approx(float(result.loss[term][i]))
    summary = result.summary()
    assert summary["mask_area"] == pytest.approx(sum(r["mask_area"] for r in rows) / 3, abs=1e-6)
    assert summary["preservation_rate"] == pytest.approx(sum(r["preserved"] for r in rows) / 3)
    assert summary["prob_original"] == pytest.approx(float(expected_original.mean()), abs=1e-6)
    assert summary["loss_total"] == pytest.approx(sum(r["loss_total"] for r in rows) / 3, rel=1e-6)


def test_explain_works_on_a_module_returned_by_a_trainer(tiny_cnn, image_factory, trainer_factory) -> None:
    """predict returns Explanations on the CPU with the batch's paths/skipped and the class names reachable."""
    images = image_factory(2, 16)
    module = NeuroMask(tiny_cnn, preset="paper", steps=3)
    (result,) = trainer_factory().predict(module, datamodule=TensorDataModule(images, batch_size=2))
    assert result.masks.device.type == "cpu" and result.skipped == [] and result.paths is None
    assert module.class_names == ["cat", "dog", "owl"]
    assert torch.equal(result.targets, F.softmax(tiny_cnn(images), -1).argmax(-1))


def test_wrong_number_of_targets_is_a_clear_error(tiny_cnn, image_factory) -> None:
    with pytest.raises(ValueError, match="one class or 5 classes"):
        NeuroMask(tiny_cnn, steps=1).explain(image_factory(5), targets=torch.tensor([0, 1]))


def test_tuple_batches_get_distinct_ids_in_arrival_order(tiny_cnn, image_factory, trainer_factory) -> None:
    images = image_factory(5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=2)
    results = trainer_factory().predict(NeuroMask(tiny_cnn, preset="paper", steps=3), loader)
    assert torch.cat([r.ids for r in results]).tolist() == [0, 1, 2, 3, 4]
    alone = NeuroMask(tiny_cnn, preset="paper", steps=3).explain(images[4:], ids=[4])
    torch.testing.assert_close(results[-1].masks, alone.masks, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- 9. out-of-memory backoff


class RunsOutOfMemory(nn.Module):
    """Wraps a model and raises CUDA's out-of-memory error on batches larger than ``limit`` with gradients."""

    sizes: list[int] = []  # batch sizes that ran with gradients (class-level: NeuroMask runs a copy)

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit = model, limit
        RunsOutOfMemory.sizes = []

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            if x.shape[0] > self.limit:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            RunsOutOfMemory.sizes.append(x.shape[0])
        return self.model(x)


def test_out_of_memory_splits_the_batch_and_gives_the_same_masks(tiny_cnn, image_factory, caplog) -> None:
    images = image_factory(5, 16)
    reference = NeuroMask(tiny_cnn, steps=15).explain(images)
    wrapped = RunsOutOfMemory(tiny_cnn, limit=2)
    module = NeuroMask(wrapped, steps=15)
    with caplog.at_level(logging.WARNING, logger="neuromask_pl.module"):
        result = module.explain(images)
    assert module.max_chunk == 2 and max(RunsOutOfMemory.sizes) == 2
    assert "out of memory with 5 images" in caplog.text
    torch.testing.assert_close(result.masks, reference.masks, rtol=0, atol=1e-4)
    assert torch.equal(result.ids, reference.ids) and result.steps.tolist() == [15] * 5


def test_out_of_memory_with_one_image_is_a_clear_error(tiny_cnn, image_factory) -> None:
    module = NeuroMask(RunsOutOfMemory(tiny_cnn, limit=0), steps=5)
    with pytest.raises(MemoryError, match="one image alone does not fit"):
        module.explain(image_factory(2, 16))


# ----------------------------------------------------------------------------- 10. inside another module


class ClassifyAndExplain(pl.LightningModule):
    """A user's module: classifies, and explains its own predictions in predict_step."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.explainer = NeuroMask(self.net, preset="paper", steps=4, seed=3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def predict_step(self, batch, batch_idx: int) -> dict:
        (images,) = batch
        ids = torch.arange(len(images)) + batch_idx * 3
        return {"logits": self(images), "explanation": self.explainer.explain(images, ids=ids).cpu()}


def test_explaining_inside_another_modules_predict_step(tiny_cnn, image_factory, trainer_factory) -> None:
    images = image_factory(5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=3)
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    outputs = trainer_factory().predict(ClassifyAndExplain(tiny_cnn), loader)

    explanations = [o["explanation"] for o in outputs]
    assert all(isinstance(e, Explanation) for e in explanations)
    alone = NeuroMask(tiny_cnn, preset="paper", steps=4, seed=3).explain(images)
    torch.testing.assert_close(torch.cat([e.masks for e in explanations]), alone.masks, atol=1e-4, rtol=0)
    assert torch.cat([e.targets for e in explanations]).tolist() == alone.targets.tolist()
    assert all(torch.equal(v, before[k]) for k, v in tiny_cnn.state_dict().items())


def test_submodule_needs_inference_mode_off(tiny_cnn, image_factory, trainer_factory) -> None:
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(image_factory(2)), batch_size=2)
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        trainer_factory(inference_mode=True).predict(ClassifyAndExplain(tiny_cnn), loader)


class Classify(pl.LightningModule):
    """The same user's module before it held an explainer."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def test_a_host_modules_checkpoints_are_the_same_with_an_explainer(tiny_cnn, cnn_factory, tmp_path) -> None:
    with_explainer, without = ClassifyAndExplain(tiny_cnn), Classify(tiny_cnn)
    assert with_explainer.state_dict().keys() == without.state_dict().keys()  # no explainer.classifier.* copy
    torch.save(without.state_dict(), tmp_path / "host.pt")
    old = torch.load(tmp_path / "host.pt", weights_only=True)
    ClassifyAndExplain(cnn_factory(1)).load_state_dict(old, strict=True)  # a checkpoint from before loads
    # and a classifier named `classifier` inside the user's network is still checked strictly
    host = ClassifyAndExplain(nn.Sequential())
    host.net.add_module("classifier", nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="Missing key.*net.classifier.weight"):
        host.load_state_dict({}, strict=True)
