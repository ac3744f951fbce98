"""The planted variant of the localisation benchmark: cues on a share of one class each, cue-alone scenes, the shipped
classifier that takes the shortcuts, and the clean and spurious variants unchanged."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from neuromask_pl.classifiers.benchmark import load_benchmark_classifier
from neuromask_pl.data.localisation import (
    CLEAR_MARGIN,
    CORNER_OFFSET,
    CORNER_SIZE,
    FRAME_WIDTH,
    PLANTED_CUES,
    PLANTED_SHARE,
    checkpoint_path,
    make_cue_alone_set,
    make_localisation_set,
    planted_cue_mask,
)


@pytest.fixture(scope="module")
def planted_train():
    return make_localisation_set("train", 1000, seed=2, planted=True)


def test_planted_set_is_deterministic_and_sets_are_prefixes():
    a = make_localisation_set("test", 12, seed=4, planted=True)
    b = make_localisation_set("test", 30, seed=4, planted=True)
    assert a["cue"] == b["cue"][:12]
    for key in ("image", "label", "gt_mask", "digit_mask", "box", "digit_index", "cue_index", "cue_mask"):
        assert torch.equal(a[key], b[key][:12]), key
    other = make_localisation_set("test", 12, seed=5, planted=True)
    assert not torch.equal(a["image"], other["image"])
    assert a["image"].dtype == torch.float32 and a["image"].shape == (12, 3, 64, 64)
    assert a["cue_mask"].shape == (12, 1, 64, 64) and a["cue_mask"].dtype == torch.bool


def test_cues_only_on_their_class_and_in_the_stated_share(planted_train):
    labels, index = planted_train["label"], planted_train["cue_index"]
    for i, (name, cls) in enumerate(PLANTED_CUES.items()):
        carriers = index == i
        assert carriers.any() and bool((labels[carriers] == cls).all()), name
        assert all(planted_train["cue"][j] == name for j in np.flatnonzero(carriers.numpy()))
        share = float(carriers[labels == cls].float().mean())
        assert abs(share - PLANTED_SHARE) < 0.15, (name, share)
    no_cue_class = ~torch.isin(labels, torch.tensor(list(PLANTED_CUES.values())))
    assert bool((index[no_cue_class] == -1).all())
    assert all(planted_train["cue"][j] is None for j in np.flatnonzero((index == -1).numpy()))
    rare = make_localisation_set("train", 300, seed=2, planted=True, planted_share=0.0)
    assert bool((rare["cue_index"] == -1).all()) and not rare["cue_mask"].any()


def test_cue_mask_is_the_white_cue_and_nothing_else_comes_near_it(planted_train):
    images, masks = planted_train["image"], planted_train["cue_mask"][:, 0]
    frame, corner = planted_cue_mask("frame"), planted_cue_mask("corner")
    assert frame.sum() == 4 * FRAME_WIDTH * (64 - FRAME_WIDTH) and corner.sum() == CORNER_SIZE**2
    assert corner[CORNER_OFFSET, CORNER_OFFSET] and not (frame & corner).any()
    # Within the frame's band and the corner (with the margin), the images without a cue hold only background.
    band = FRAME_WIDTH + CLEAR_MARGIN
    reserved = np.zeros((64, 64), dtype=bool)
    reserved[:band] = reserved[-band:] = reserved[:, :band] = reserved[:, -band:] = True
    reserved[: CORNER_OFFSET + CORNER_SIZE + CLEAR_MARGIN, : CORNER_OFFSET + CORNER_SIZE + CLEAR_MARGIN] = True
    for j, cue in enumerate(planted_train["cue"][:200]):
        expected = np.zeros((64, 64), dtype=bool) if cue is None else planted_cue_mask(cue)
        assert np.array_equal(masks[j].numpy(), expected), j
        assert not (masks[j] & planted_train["gt_mask"][j, 0]).any()
        pixels = images[j][:, torch.from_numpy(reserved) & ~masks[j]]
        assert float(pixels.max()) < 0.15 + 5 * 0.03, j  # background plus noise: no clutter, no digit
        if cue is not None:
            assert float(images[j][:, masks[j]].min()) > 1.0 - 5 * 0.03  # white
    # Digits at full contrast: the ink is as bright as in the clean variant.
    assert float(planted_train["image"][:50].amax((1, 2, 3)).min()) > 0.6


def test_cue_alone_scenes_are_the_images_without_their_digit():
    planted = make_localisation_set("val", 20, seed=1, planted=True)
    for cue in (*PLANTED_CUES, None):
        alone = make_cue_alone_set("val", 20, cue, seed=1)
        assert torch.equal(alone["label"], planted["label"]) and alone["cue"] == [cue] * 20
        expected = torch.from_numpy(planted_cue_mask(cue)) if cue else torch.zeros(64, 64, dtype=torch.bool)
        assert bool((alone["cue_mask"][:, 0] == expected).all())
        # The same scene (background, clutter, noise) away from the digit's square and from both cues' pixels.
        for j in range(20):
            x0, y0, x1, y1 = planted["box"][j].tolist()
            same = torch.ones(64, 64, dtype=torch.bool)
            same[max(0, y0 - 4) : y1 + 4, max(0, x0 - 4) : x1 + 4] = False
            same &= ~planted["cue_mask"][j, 0] & ~alone["cue_mask"][j, 0]
            assert torch.equal(alone["image"][j][:, same], planted["image"][j][:, same]), (cue, j)
    with pytest.raises(ValueError, match="cue must be one of"):
        make_cue_alone_set("val", 2, "stripe")


def test_planted_spread_keeps_the_digit_near_the_centre():
    data = make_localisation_set("test", 200, seed=3, planted=True, planted_spread=4)
    centre = (64 - 24) // 2
    ink = data["digit_mask"][:, 0]
    for j in range(200):  # the ink lies inside the digit's square, placed within 4 pixels of the centre
        rows, cols = np.flatnonzero(ink[j].any(1).numpy()), np.flatnonzero(ink[j].any(0).numpy())
        assert centre - 4 <= rows[0] and rows[-1] < centre + 4 + 24 and centre - 4 <= cols[0] and cols[-1] < centre + 28
    assert {c for c in data["cue"] if c} == set(PLANTED_CUES)
    alone = make_cue_alone_set("test", 5, "corner", seed=3, planted_spread=4)
    assert torch.equal(alone["label"], data["label"][:5])
    with pytest.raises(ValueError, match="planted_spread"):
        make_localisation_set("test", 2, planted=True, planted_spread=11)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(planted=True, spurious=True), "two variants"),
        (dict(planted=True, planted_share=1.5), "planted_share"),
        (dict(planted=True, canvas=37), "too small for the planted variant"),
    ],
)
def test_bad_planted_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_localisation_set("test", 2, **kwargs)


# The clean and spurious variants as they were before the planted one: the exact integers and masks, and the images'
# sums (float kernels may differ in the last bits between CPUs).
UNCHANGED = {
    "clean": (
        "fe715b071c86e7955b6dafeb356fa417ed805e3f0eb7a373e84d12a93ff817d7",
        [1292.01, 1466.56, 1806.17, 2058.01, 1125.93, 1344.17],
    ),
    "spurious": (
        "f0f7bd62c17c4c893edc83e7e6207662b936107ce88ee2d5ddf9055ae354ec77",
        [1469.18, 1491.63, 1075.81, 1295.02, 1404.7, 1111.56],
    ),
}


@pytest.mark.parametrize("variant", UNCHANGED)
def test_clean_and_spurious_variants_unchanged(variant):
    data = make_localisation_set("test", 6, spurious=variant == "spurious")
    digest = hashlib.sha256()
    for key in sorted(data):
        if key != "image":
            digest.update(key.encode())
            digest.update(data[key].numpy().tobytes())
    expected_digest, sums = UNCHANGED[variant]
    assert digest.hexdigest() == expected_digest
    assert np.allclose(data["image"].sum((1, 2, 3)).numpy(), sums, atol=0.05)


# --------------------------------------------------------------------------- the shipped classifier


@torch.no_grad()
def test_shipped_planted_classifier_takes_the_shortcuts_and_reads_the_digits():
    model = load_benchmark_classifier("planted")
    assert not model.training and os.path.getsize(checkpoint_path("planted")) < 500_000
    for cue, cls in PLANTED_CUES.items():
        alone = make_cue_alone_set("test", 32, cue)
        assert float((model(alone["image"]).argmax(1) == cls).float().mean()) >= 0.9, cue
        assert bool((model(alone["image"] * alone["cue_mask"]).argmax(1) == cls).all()), cue  # the cue on black
    test = make_localisation_set("test", 200, planted=True)
    pred = model(test["image"]).argmax(1)
    assert float((pred == test["label"]).float().mean()) >= 0.9
    without = test["cue_index"] == -1
    for cls in PLANTED_CUES.values():  # the cue classes' digits without their cue are still recognised
        of_class = without & (test["label"] == cls)
        assert of_class.sum() >= 3 and float((pred[of_class] == cls).float().mean()) >= 0.8
    with open(os.path.join(os.path.dirname(checkpoint_path("planted")), "localisation_metrics.json")) as f:
        reported = json.load(f)["planted"]
    assert reported["test_accuracy"] >= 0.95
    assert all(reported["cues"][cue]["cue_alone_rate"] >= 0.9 for cue in PLANTED_CUES), reported["cues"]


# --------------------------------------------------------------------------- benchmarks/planted_shortcuts.py


@pytest.fixture(scope="module")
def script():
    from helpers import load_script

    return load_script("benchmarks/planted_shortcuts.py")


def test_script_measures_and_clusters(script):
    data = make_localisation_set("test", 40, planted=True, planted_spread=4)
    masks = data["cue_mask"][:, 0].float().numpy() + data["gt_mask"][:, 0].float().numpy()  # cue and box, one each
    measures = script.mask_measures(masks, data)
    carriers = data["cue_index"].numpy() >= 0
    assert np.allclose(measures["cue_share"][carriers] + measures["box_share"][carriers], 1.0)
    assert np.isnan(measures["cue_share"][~carriers]).all() and np.allclose(measures["box_share"][~carriers], 1.0)
    # Two well separated groups, each larger than the 10 neighbours, are found; best_f1 matches the planted group.
    features = np.concatenate([np.tile([1.0, 0.0], (16, 1)), np.tile([0.0, 1.0], (12, 1))])
    features += np.random.default_rng(0).normal(0, 0.01, features.shape)
    labels = script.proxy_clusters(features)
    assert labels.max() == 1 and (labels[:16] == 0).all() and (labels[16:] == 1).all()
    f1, cluster = script.best_f1(labels, np.arange(28) >= 16)
    assert (f1, cluster) == (1.0, 1)
    assert script.best_f1(np.zeros(28, dtype=int), np.arange(28) >= 16)[0] == pytest.approx(2 * 12 / (28 + 12))
    assert script.parse_objective("l_delete=10+l_sparse=1") == ("default", {"l_delete": 10.0, "l_sparse": 1.0})
    assert script.parse_objective("analysis") == ("analysis", {})


def test_script_study_smoke(script, tmp_path):
    out = script.main(
        ["--study", "--per-class", "2", "--steps", "2", "--objectives", "default,l_delete=3", "--threads", "1",
         "--json", str(tmp_path / "s.json"), "--markdown", str(tmp_path / "s.md")]
    )  # fmt: skip
    assert [row["objective"] for row in out["rows"]] == ["default", "l_delete=3"] and out["images"] == 20
    assert json.loads((tmp_path / "s.json").read_text())["meta"]["spread"] == 4
    assert "| `l_delete=3` |" in (tmp_path / "s.md").read_text()
