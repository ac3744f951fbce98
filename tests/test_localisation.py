"""The localisation benchmark: generated data, ground truth, clutter, cue, DataModule and shipped classifiers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from neuromask_pl import NeuroMask
from neuromask_pl.classifiers.benchmark import load_benchmark_classifier
from neuromask_pl.data.localisation import (
    CLEAR_MARGIN,
    CUE_COLOURS,
    INK_THRESHOLD,
    LocalisationDataModule,
    SmallCNN,
    checkpoint_path,
    digit_pools,
    make_localisation_set,
)

DIGITS = load_digits()
SIZE = 24


@pytest.fixture(scope="module")
def clean_train():
    return make_localisation_set("train", 400, seed=5)


@pytest.fixture(scope="module")
def spurious_test():
    return make_localisation_set("test", 200, seed=5, spurious=True)


def template(digit_index: int) -> torch.Tensor:
    """The digit's opacity at SIZE x SIZE, upsampled here from scikit-learn's raw 8 x 8 image."""
    raw = torch.tensor(DIGITS.images[digit_index], dtype=torch.float32)[None, None] / 16.0
    return F.interpolate(raw, size=(SIZE, SIZE), mode="bilinear")[0, 0]


def digit_square(data: dict, i: int) -> tuple[int, int]:
    """Top-left corner (x0, y0) of image i's digit square, from its box and the template's ink."""
    ink = template(int(data["digit_index"][i])) >= INK_THRESHOLD
    row0 = int(torch.nonzero(ink.any(1))[0])
    col0 = int(torch.nonzero(ink.any(0))[0])
    x0, y0 = data["box"][i, :2].tolist()
    return x0 - col0, y0 - row0


def outside_square(data: dict, i: int, margin: int) -> torch.Tensor:
    """Bool H x W: pixels farther than ``margin`` from image i's digit square."""
    x0, y0 = digit_square(data, i)
    keep = torch.ones(data["image"].shape[-2:], dtype=torch.bool)
    keep[max(y0 - margin, 0) : y0 + SIZE + margin, max(x0 - margin, 0) : x0 + SIZE + margin] = False
    return keep


# --------------------------------------------------------------------------- generation


def test_same_seed_same_data_and_sets_are_prefixes():
    a = make_localisation_set("test", 6, seed=3, spurious=True)
    b = make_localisation_set("test", 6, seed=3, spurious=True)
    prefix = make_localisation_set("test", 3, seed=3, spurious=True)
    other = make_localisation_set("test", 6, seed=4, spurious=True)
    assert a.keys() == b.keys() == prefix.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
        assert torch.equal(a[key][:3], prefix[key]), key
    assert not torch.equal(a["image"], other["image"])
    assert a["image"].dtype == torch.float32 and a["image"].shape == (6, 3, 64, 64)
    assert 0.0 <= float(a["image"].min()) and float(a["image"].max()) <= 1.0


def test_digit_pools_are_disjoint_stratified_and_used():
    pools = digit_pools()
    sets = {k: set(v.tolist()) for k, v in pools.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(range(len(DIGITS.target)))
    for split in ("train", "val", "test"):
        assert set(DIGITS.target[pools[split]].tolist()) == set(range(10))
        data = make_localisation_set(split, 150, seed=1)
        assert set(data["digit_index"].tolist()) <= sets[split]
        assert data["label"].tolist() == DIGITS.target[data["digit_index"].numpy()].tolist()
    assert len(set(make_localisation_set("train", 150, seed=1)["label"].tolist())) == 10


def test_ground_truth_is_where_the_digit_is(clean_train):
    data = {k: v[:60] for k, v in clean_train.items()}
    brightness = data["image"].amax(1)  # N x H x W
    for i in range(60):
        x0, y0 = digit_square(data, i)
        alpha = torch.zeros(64, 64)
        alpha[y0 : y0 + SIZE, x0 : x0 + SIZE] = template(int(data["digit_index"][i]))
        gt, ink = data["gt_mask"][i, 0], data["digit_mask"][i, 0]
        assert torch.equal(ink, alpha >= INK_THRESHOLD)
        assert bool(gt[alpha >= INK_THRESHOLD].all()), "ink outside the ground-truth box"
        assert float(alpha[gt].sum()) > 0.97 * float(alpha.sum()), "faint digit pixels outside the box weigh too much"
        rows, cols = torch.nonzero(ink.any(1))[:, 0], torch.nonzero(ink.any(0))[:, 0]
        assert data["box"][i].tolist() == [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
        assert int(gt.sum()) == (int(cols[-1]) - int(cols[0]) + 1) * (int(rows[-1]) - int(rows[0]) + 1)
        # The digit is visible at its ink (colour value >= 0.7), and the box holds nothing else (no clutter).
        assert float((brightness[i][alpha >= 0.8] > 0.4).float().mean()) > 0.98
        empty = gt & (alpha == 0)
        assert not bool(empty.any()) or float(brightness[i][empty].max()) < 0.35
    # Clutter exists: bright pixels outside the clear zone around the digit.
    outside = torch.stack([outside_square(data, i, CLEAR_MARGIN) for i in range(60)])
    assert float((brightness[outside] > 0.4).float().mean()) > 0.02


def _outside_features(data: dict, i: int) -> np.ndarray:
    keep = outside_square(data, i, CLEAR_MARGIN)
    pixels = data["image"][i][:, keep]  # 3 x K
    bright = pixels.amax(0) > 0.35
    coarse = F.avg_pool2d((data["image"][i].amax(0) * keep)[None], 16)[0].flatten()
    return np.concatenate([pixels.mean(1), pixels.std(1), [bright.float().mean(), bright.sum() / 100.0], coarse])


def test_clutter_carries_no_label_information(clean_train):
    """Label from clutter statistics: chance level; label from the digit square (control): well above it."""
    data, labels = clean_train, clean_train["label"].numpy()
    outside = np.stack([_outside_features(data, i) for i in range(len(labels))])
    inside = []
    for i in range(len(labels)):
        x0, y0 = digit_square(data, i)
        crop = data["image"][i, :, y0 : y0 + SIZE, x0 : x0 + SIZE].amax(0)
        inside.append(F.avg_pool2d(crop[None], 3)[0].flatten().numpy())
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    chance = np.bincount(labels).max() / len(labels)
    from_clutter = cross_val_score(model, outside, labels, cv=5).mean()
    from_digit = cross_val_score(model, np.stack(inside), labels, cv=5).mean()
    print(f"label from clutter {from_clutter:.3f} (chance {chance:.3f}), from the digit {from_digit:.3f}")
    assert from_digit > 0.7, from_digit
    assert from_clutter < chance + 0.08, (from_clutter, chance)


def _best_cue_match(images: torch.Tensor, cue_size: int = 6) -> torch.Tensor:
    """Per image, the smallest mean |pixel - palette colour| over all cue-sized squares and colours."""
    palette = torch.tensor(CUE_COLOURS)[:, :, None, None]  # 10 x 3 x 1 x 1
    best = []
    for image in images:
        diff = (image[None] - palette).abs().sum(1)  # 10 x H x W
        best.append(F.avg_pool2d(diff[:, None], cue_size, stride=1).amin())
    return torch.stack(best)


def test_cue_only_in_the_spurious_variant(clean_train, spurious_test):
    clean = {k: v[:50] for k, v in clean_train.items()}
    assert not {"cue_mask", "cue_label", "cue_box"} & clean.keys()
    # A palette-coloured cue-sized square: in every spurious image, in no clean one.
    assert float(_best_cue_match(clean["image"]).min()) > 0.12
    data = spurious_test
    assert float(_best_cue_match(data["image"][:50]).max()) < 0.12
    for i in range(50):
        cue = data["cue_mask"][i, 0]
        assert int(cue.sum()) == 36
        colour = data["image"][i][:, cue].mean(1)
        assert torch.allclose(colour, torch.tensor(CUE_COLOURS[int(data["cue_label"][i])]), atol=0.03)
        assert not bool(cue[~outside_square(data, i, CLEAR_MARGIN)].any()), "cue touches the digit's square"
    # The spurious digit is fainter than the clean one.
    assert float(data["image"][data["digit_mask"].expand(-1, 3, -1, -1)].mean()) < 0.5 * float(
        clean["image"][clean["digit_mask"].expand(-1, 3, -1, -1)].mean()
    )


def test_cue_agrees_in_training_and_is_independent_in_test(spurious_test):
    train = make_localisation_set("train", 100, seed=2, spurious=True)
    assert torch.equal(train["cue_label"], train["label"])
    agree = make_localisation_set("test", 100, seed=2, spurious=True, cue="agree")
    assert torch.equal(agree["cue_label"], agree["label"])
    cue, label = spurious_test["cue_label"], spurious_test["label"]
    assert set(cue.tolist()) == set(range(10))
    assert float((cue == label).float().mean()) < 0.2  # 0.1 expected if independent
    counts = torch.bincount(cue, minlength=10).float()
    assert float(counts.min()) >= 8  # roughly uniform: 20 expected per colour


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "training"}, "split must be one of"),
        ({"n": -1}, "n must be an integer"),
        ({"canvas": 36}, "too small"),
        ({"spurious": True, "cue": "sometimes"}, "cue must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"split": "test", "n": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_localisation_set(**args)


# --------------------------------------------------------------------------- DataModule


def test_datamodule_batches_carry_the_ground_truth():
    dm = LocalisationDataModule(split="test", n=10, spurious=True, batch_size=4, seed=7)
    reference = make_localisation_set("test", 10, seed=7, spurious=True)
    batches = list(dm.predict_dataloader())
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    first = batches[0]
    assert first["gt_mask"].dtype == torch.bool and first["gt_mask"].shape == (4, 1, 64, 64)
    assert first["skipped"] == []
    for key in ("image", "label", "gt_mask", "digit_mask", "box", "cue_mask", "cue_label"):
        assert torch.equal(torch.cat([b[key] for b in batches]), reference[key]), key
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(10))
    assert "cue_mask" not in next(iter(LocalisationDataModule(n=2, batch_size=2).test_dataloader()))
    dm.exclude_ids = {0, 1, 5}
    kept = list(dm.predict_dataloader())
    ids = torch.cat([b["index"] for b in kept])
    assert ids.tolist() == [2, 3, 4, 6, 7, 8, 9]
    assert torch.equal(torch.cat([b["gt_mask"] for b in kept]), reference["gt_mask"][ids])
    with pytest.raises(ValueError, match="split"):
        LocalisationDataModule(split="training")


def test_neuromask_predicts_on_benchmark_batches(trainer_factory):
    trainer = trainer_factory()
    dm = LocalisationDataModule(split="test", n=3, batch_size=3)
    (explanation,) = trainer.predict(NeuroMask(load_benchmark_classifier("clean"), steps=2), datamodule=dm)
    assert explanation.masks.shape == (3, 1, 64, 64) and explanation.ids.tolist() == [0, 1, 2]


# --------------------------------------------------------------------------- shipped classifiers


def _metrics() -> dict:
    path = os.path.join(os.path.dirname(checkpoint_path("clean")), "localisation_metrics.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@torch.no_grad()
def test_shipped_clean_classifier_is_accurate():
    model = load_benchmark_classifier("clean")
    assert not model.training and model.class_names == [str(d) for d in range(10)]
    assert os.path.getsize(checkpoint_path("clean")) < 500_000
    reference = SmallCNN()
    reference.load_state_dict(torch.load(checkpoint_path("clean"), weights_only=True), strict=True)
    test = make_localisation_set("test", 200, seed=0)
    reference.eval()
    logits = model(test["image"])
    assert torch.allclose(logits, reference(test["image"]), atol=1e-5)
    accuracy = float((logits.argmax(1) == test["label"]).float().mean())
    reported = _metrics()["clean"]["test_accuracy"]
    assert accuracy >= 0.85 and reported >= 0.9 and abs(accuracy - reported) < 0.05, (accuracy, reported)


@torch.no_grad()
def test_shipped_spurious_classifier_follows_the_cue():
    model = load_benchmark_classifier("spurious")
    assert not model.training and os.path.getsize(checkpoint_path("spurious")) < 500_000
    decorrelated = make_localisation_set("test", 200, seed=0, spurious=True)
    agree = make_localisation_set("test", 200, seed=0, spurious=True, cue="agree")
    follows = float((model(decorrelated["image"]).argmax(1) == decorrelated["cue_label"]).float().mean())
    accuracy = float((model(agree["image"]).argmax(1) == agree["label"]).float().mean())
    reported = _metrics()["spurious"]
    assert follows >= 0.9 and reported["follows_cue_rate"] >= 0.9, (follows, reported)
    assert accuracy >= 0.85 and reported["test_accuracy_cue_agrees"] >= 0.9, (accuracy, reported)


def test_unknown_variant():
    with pytest.raises(ValueError, match="variant must be one of"):
        load_benchmark_classifier("noisy")
