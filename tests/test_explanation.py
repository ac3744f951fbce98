"""neuromask_pl.explanation: an Explanation's saving, loading, plain-dict export, the empty Explanation, and the
sanity flags, each provoked by a tiny classifier of tests/sanity_models.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import make_images, make_tiny_cnn
from sanity_models import IgnoresInput, MeanCurve, mid_grey, random_weights_cnn

from neuromask_pl.explainer import Explainer
from neuromask_pl.explanation import (
    EMPTY_AREA,
    FLAGS,
    FULL_AREA,
    LOSS_TERMS,
    ONE_CLASS_MIN_SAMPLES,
    PROB_RISE,
    Explanation,
    sample_flags,
    sanity_report,
)
from neuromask_pl.module import NeuroMask


def test_save_and_load_round_trip(tmp_path, tiny_cnn, image_factory) -> None:
    result = NeuroMask(tiny_cnn, preset="paper", steps=3).explain(image_factory(3), ids=[7, 8, 9])
    result.paths = ["a.png", "b.png", "c.png"]
    result.save(tmp_path / "exp.pt")
    back = Explanation.load(tmp_path / "exp.pt")
    assert back.paths == result.paths and back.skipped == []
    for name in ("ids", "masks", "targets", "prob_original", "prob_masked", "mask_area", "preserved", "images"):
        assert torch.equal(getattr(back, name), getattr(result, name)), name
    for term, value in result.loss.items():
        assert torch.equal(back.loss[term], value)
    assert back.records() == result.records()


def test_as_dict_is_plain(tiny_cnn, image_factory) -> None:
    result = NeuroMask(tiny_cnn, preset="paper", steps=2).explain(image_factory(2))
    data = result.as_dict()
    assert list(data["loss"]) == ["pred", "sparse", "smooth", "detail", "delete", "total"]
    assert data["masks"].shape == (2, 1, 16, 16) and data["ids"].tolist() == [0, 1]


def test_load_rejects_other_files(tmp_path) -> None:
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not hold a saved Explanation"):
        Explanation.load(tmp_path / "other.pt")


def test_empty_explanation_has_every_field_with_zero_samples() -> None:
    images = torch.empty(0, 3, 10, 12)
    empty = Explanation.empty(images)
    assert len(empty) == 0 and empty.masks.shape == (0, 1, 10, 12) and empty.images is images
    assert set(empty.loss) == set(LOSS_TERMS) and all(v.shape == (0,) for v in empty.loss.values())
    assert empty.ids.dtype == empty.targets.dtype == empty.steps.dtype == torch.long
    assert empty.preserved.dtype == torch.bool and empty.prob_masked.shape == (0,)
    assert empty.records() == [] and empty.summary() == {}


# ----------------------------------------------------------------------------------------------- sanity flags


def test_a_classifier_that_ignores_its_input_gives_flagged_empty_masks_not_a_silent_success() -> None:
    """The black image alone keeps the class, so the sparsity penalty empties the masks (area ~1e-4) while the class
    stays 'preserved' with an all-black masked image: every sample is flagged, and the run says so."""
    result = Explainer(IgnoresInput(), steps=40).explain(mid_grey(12))
    assert result.preserved.all() and (result.mask_area < EMPTY_AREA).all()  # what looked like success
    assert result.baseline_preserved.all() and torch.allclose(result.prob_baseline, result.prob_original)
    assert result.flags() == [["baseline_keeps_class", "empty_mask"]] * 12
    assert [row["flags"] for row in result.records()] == ["baseline_keeps_class;empty_mask"] * 12
    report = result.sanity(IgnoresInput.class_names)
    assert report["flags"] == {"baseline_keeps_class": 12, "empty_mask": 12, "full_mask": 0, "prob_rise": 0}
    assert report["one_class"] and report["predicted_classes"] == 1
    text = "\n".join(report["warnings"])
    assert "12 of 12 image(s): the baseline alone" in text and "12 of 12 mask(s) are empty" in text
    assert "every one of the 12 images is predicted as class 0 (cat)" in text


def test_a_classifier_that_needs_every_pixel_gives_flagged_full_masks() -> None:
    result = Explainer(MeanCurve("full"), steps=40).explain(mid_grey(4))
    assert (result.mask_area > FULL_AREA).all() and not result.baseline_preserved.any()
    assert result.flags() == [["full_mask"]] * 4
    assert any("4 of 4 mask(s) are full" in line for line in result.sanity()["warnings"])


def test_masks_that_add_evidence_are_flagged_and_warned_about_when_most_do() -> None:
    """Unsure on the originals (p ~ 0.55), sure once about half of the image is hidden: prob_masked far above."""
    result = Explainer(MeanCurve("rise"), steps=40).explain(mid_grey(4))
    assert (result.prob_masked > result.prob_original + PROB_RISE).all() and not result.baseline_preserved.any()
    assert result.flags() == [["prob_rise"]] * 4
    assert any("on 4 of 4 image(s) the target's probability" in w for w in result.sanity()["warnings"])
    # On a minority of the images it is no warning for the run (each row still carries its flag).
    rows = result.records() + [{**row, "flags": ""} for row in result.records()]
    assert sanity_report(rows)["flags"]["prob_rise"] == 4 and sanity_report(rows)["warnings"] == []


def test_a_classifier_with_random_weights_that_calls_everything_one_class_is_warned_about() -> None:
    images = make_images(21, seed=3)
    model = random_weights_cnn()
    assert model(images).argmax(-1).unique().numel() == 1  # what the seeded random weights do
    report = Explainer(model, steps=2).explain(images).sanity()
    assert report["one_class"] and report["predicted_classes"] == 1
    assert any(line.startswith("every one of the 21 images is predicted as class") for line in report["warnings"])
    # Too few images to say, and a classifier that tells images apart: no warning.
    assert not Explainer(model, steps=2).explain(images[: ONE_CLASS_MIN_SAMPLES - 1]).sanity()["one_class"]
    varied = Explainer(make_tiny_cnn(), steps=2).explain(make_images(12, seed=3)).sanity()
    assert not varied["one_class"] and varied["predicted_classes"] > 1
    assert not any("every one" in line for line in varied["warnings"])


def test_the_baseline_check_uses_the_settings_baseline() -> None:
    """Black is class 1 for MeanCurve('full'), but the mean colour of a mid-grey image is class 0."""
    images = mid_grey(2)
    black = Explainer(MeanCurve("full"), steps=1).explain(images)
    mean = Explainer(MeanCurve("full"), steps=1, settings={"baseline": "mean"}).explain(images)
    assert not black.baseline_preserved.any() and mean.baseline_preserved.all()
    assert black.predicted.tolist() == mean.predicted.tolist() == [0, 0]
    for baseline in ("blur", "noise"):
        result = Explainer(MeanCurve("full"), steps=1, settings={"baseline": baseline}).explain(images)
        assert result.prob_baseline.shape == (2,) and result.baseline_preserved.dtype == torch.bool


def test_sample_flags_thresholds() -> None:
    assert sample_flags(0.5, 0.9, 0.95, False) == []
    assert sample_flags(EMPTY_AREA / 2, 0.9, 0.95, None) == ["empty_mask"]
    assert sample_flags(EMPTY_AREA, 0.9, 0.95, None) == []
    assert sample_flags(FULL_AREA + 0.01, 0.2, 0.2 + PROB_RISE + 0.01, True) == [
        "baseline_keeps_class",
        "full_mask",
        "prob_rise",
    ]
    assert list(FLAGS) == ["baseline_keeps_class", "empty_mask", "full_mask", "prob_rise"]


def test_failed_samples_and_explanations_without_the_checks_carry_no_flags() -> None:
    result = Explainer(IgnoresInput(), steps=40).explain(mid_grey(2))
    result.errors = ["diverged", ""]
    assert result.flags() == [[], ["baseline_keeps_class", "empty_mask"]]
    assert result.sanity()["samples"] == 1
    # An Explanation built without the baseline check (older saves, other explainers): no baseline flag, no class.
    bare = replace(result, errors=None, predicted=None, prob_baseline=None, baseline_preserved=None)
    assert bare.flags() == [["empty_mask"]] * 2
    assert bare.records()[0]["predicted"] is None and bare.records()[0]["prob_baseline"] is None
    assert bare.sanity()["predicted_classes"] is None


def test_saved_explanations_keep_the_checks(tmp_path) -> None:
    result = Explainer(IgnoresInput(), steps=3).explain(mid_grey(2))
    result.save(tmp_path / "exp.pt")
    back = Explanation.load(tmp_path / "exp.pt")
    for name in ("predicted", "prob_baseline", "baseline_preserved"):
        assert torch.equal(getattr(back, name), getattr(result, name)), name
    assert back.flags() == result.flags()
