"""Metrics: hand-computed values, Metric classes against their functional twins, and peer libraries."""

from __future__ import annotations

import math
import warnings
from copy import deepcopy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.utilities.data import dim_zero_sum

from neuromask_pl.maths.mask import make_baseline
from neuromask_pl.metrics import (
    DeletionAUC,
    EnergyPointing,
    InsertionAUC,
    MaskArea,
    PointingGame,
    PreservationRate,
    SelectionRate,
    auc,
    boxes_to_masks,
    deletion_auc,
    deletion_curve,
    energy_pointing,
    explanation_metrics,
    insertion_auc,
    insertion_curve,
    mask_area,
    pointing_game,
    preservation,
    saliency_ranks,
    selection,
    update_explanation_metrics,
)

pytestmark = pytest.mark.numerics

WEIGHTS = [0.1, 0.2, 0.3, 0.4]  # class-0 weight of each pixel of a 2 x 2 image, in raster order


def linear_classifier(bias1: float = 0.0) -> nn.Module:
    """2 classes on 1 x 2 x 2 images: logit0 = sum(WEIGHTS * x), logit1 = bias1, so p0 = sigmoid(logit0 - bias1)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([WEIGHTS, [0.0] * 4]))
        model[1].bias.copy_(torch.tensor([0.0, bias1]))
    return model.eval()


def sigmoid(values: list[float]) -> torch.Tensor:
    return torch.tensor([[1 / (1 + math.exp(-v)) for v in values]])


def trapezoid(values: list[float]) -> float:
    return sum((a + b) / 2 for a, b in zip(values, values[1:])) / (len(values) - 1)


# Saliency of the 2 x 2 image, raster order (0, 1, 2, 3) = (3, 1, 0, 4): removal order is pixel 3, 0, 1, 2.
SALIENCY = torch.tensor([[[3.0, 1.0], [0.0, 4.0]]])
ONES = torch.ones(1, 1, 2, 2)


# ------------------------------------------------------------------------------------------ deletion / insertion


def test_deletion_and_insertion_curves_by_hand():
    model = linear_classifier()
    # Removing pixels 3, 0, 1, 2 of an all-ones image leaves logit0 = 1.0, 0.6, 0.5, 0.3, 0.
    expected = sigmoid([1.0, 0.6, 0.5, 0.3, 0.0])
    torch.testing.assert_close(deletion_curve(model, ONES, SALIENCY, 0, steps=4, baseline="black"), expected)
    torch.testing.assert_close(
        deletion_auc(model, ONES, SALIENCY, 0, steps=4, baseline="black"),
        torch.tensor([trapezoid(expected[0].tolist())]),
    )
    # 3 steps over 4 pixels remove ceil(4k/3) = 0, 2, 3, 4 pixels.
    torch.testing.assert_close(
        deletion_curve(model, ONES, SALIENCY, 0, steps=3, baseline="black"), sigmoid([1.0, 0.5, 0.3, 0.0])
    )
    # Insertion puts the pixels back into a black image in the same order.
    torch.testing.assert_close(
        insertion_curve(model, ONES, SALIENCY, 0, steps=4, baseline="black"), sigmoid([0.0, 0.4, 0.5, 0.7, 1.0])
    )
    torch.testing.assert_close(
        insertion_auc(model, ONES, SALIENCY, 0, steps=2, baseline="black"),
        torch.tensor([trapezoid(sigmoid([0.0, 0.5, 1.0])[0].tolist())]),
    )
    # Class 1 is the complement.
    torch.testing.assert_close(deletion_curve(model, ONES, SALIENCY, 1, steps=4, baseline="black"), 1 - expected)


def test_curves_depend_only_on_the_order_and_break_ties_in_raster_order():
    model = linear_classifier()
    reference = deletion_curve(model, ONES, SALIENCY, 0, steps=4, baseline="black")
    rescaled = deletion_curve(
        model, ONES, 1e-3 * SALIENCY[:, None] - 7.0, 0, steps=4, baseline="black"
    )  # B x 1 x H x W
    torch.testing.assert_close(rescaled, reference)
    # A constant map removes pixels 0, 1, 2, 3: logit0 = 1.0, 0.9, 0.7, 0.4, 0.
    flat = torch.zeros(1, 2, 2)
    torch.testing.assert_close(
        deletion_curve(model, ONES, flat, 0, steps=4, baseline="black"), sigmoid([1.0, 0.9, 0.7, 0.4, 0.0])
    )


def test_ranks_break_ties_by_pixel_index():
    values = torch.randint(0, 3, (2, 64, 64), generator=torch.Generator().manual_seed(0)).float()  # many ties
    ranks = saliency_ranks(values)
    for row, flat in zip(ranks, values.flatten(1).tolist()):
        order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))
        expected = torch.empty(len(flat), dtype=torch.long)
        expected[order] = torch.arange(len(flat))
        assert torch.equal(row, expected)


def test_baselines():
    model = linear_classifier()
    image = torch.tensor([[[[1.0, 0.0], [0.0, 0.2]]]])  # mean 0.3
    saliency = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])  # raster order
    # "mean": removed pixels become 0.3; logit0 after removing 0, 1, 2, 3 pixels.
    logits = [0.1 + 0.08, 0.03 + 0.08, 0.03 + 0.06 + 0.08, 0.03 + 0.06 + 0.09 + 0.08, 0.3]
    torch.testing.assert_close(deletion_curve(model, image, saliency, 0, steps=4, baseline="mean"), sigmoid(logits))
    # A tensor baseline acts like the named one.
    torch.testing.assert_close(
        deletion_curve(model, image, saliency, 0, steps=4, baseline=torch.zeros(1)),
        deletion_curve(model, image, saliency, 0, steps=4, baseline="black"),
    )
    # "blur" is make_baseline's blurred image: the fully deleted end point is the classifier on it.
    images = torch.rand(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    curve = deletion_curve(model, images, torch.rand(2, 2, 2), 0, steps=2, baseline="blur")
    expected = model(make_baseline(images, "blur")).softmax(-1)[:, 0]
    torch.testing.assert_close(curve[:, -1], expected.detach())
    torch.testing.assert_close(curve[:, 0], model(images).softmax(-1)[:, 0].detach())
    with pytest.raises(ValueError, match="unknown baseline"):
        deletion_curve(model, images, torch.rand(2, 2, 2), 0, baseline="white")


def test_auc_by_hand():
    torch.testing.assert_close(auc(torch.tensor([1.0, 0.0])), torch.tensor(0.5))
    torch.testing.assert_close(auc(torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])), torch.tensor([0.75, 1.0]))


def test_batch_equals_one_at_a_time(tiny_cnn, image_factory):
    images = image_factory(5, size=12, seed=1)
    saliency = torch.rand(5, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 1, 2, 1, 0])
    for curve_fn in (deletion_curve, insertion_curve):
        batched = curve_fn(tiny_cnn, images, saliency, targets, steps=6)
        single = torch.cat(
            [curve_fn(tiny_cnn, images[i : i + 1], saliency[i : i + 1], targets[i : i + 1], steps=6) for i in range(5)]
        )
        assert batched.shape == (5, 7)
        torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-6)
    masks = saliency.clamp(0, 1)
    for kept_fn in (preservation, selection):
        single = torch.cat(
            [kept_fn(tiny_cnn, images[i : i + 1], masks[i : i + 1], targets[i : i + 1]) for i in range(5)]
        )
        assert torch.equal(kept_fn(tiny_cnn, images, masks, targets), single)


# ---------------------------------------------------------------------------------------------- localisation


def one_peak(y: int, x: int, size: int = 9) -> torch.Tensor:
    saliency = torch.zeros(1, 1, size, size)
    saliency[0, 0, y, x] = 1.0
    return saliency


def test_pointing_game_tolerance_boundary():
    gt = torch.zeros(1, 9, 9, dtype=torch.bool)
    gt[0, 0, 0] = True  # one object pixel at (x=0, y=0); the maximum at (x=4, y=3) is 5 pixels away
    saliency = one_peak(3, 4)
    for ties in ("first", "any", "all"):
        assert pointing_game(saliency, gt, tolerance=5, ties=ties).tolist() == [True]
        assert pointing_game(saliency, gt, tolerance=4.99, ties=ties).tolist() == [False]
        assert pointing_game(saliency, gt, tolerance=0, ties=ties).tolist() == [False]
        assert pointing_game(one_peak(0, 0), gt, tolerance=0, ties=ties).tolist() == [True]
    # The same object as a box (x0, y0, x1, y1) = (0, 0, 1, 1).
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert pointing_game(saliency, box, tolerance=5).tolist() == [True]
    assert pointing_game(saliency, box, tolerance=4.99).tolist() == [False]


def test_pointing_game_tie_rules():
    saliency = torch.zeros(1, 9, 9)
    saliency[0, 0, 0] = saliency[0, 8, 8] = 2.0  # two maxima; the first in raster order is (0, 0)
    gt = torch.zeros(1, 9, 9, dtype=torch.bool)
    gt[0, 6:, 6:] = True
    assert pointing_game(saliency, gt, tolerance=0, ties="first").tolist() == [False]
    assert pointing_game(saliency, gt, tolerance=0, ties="any").tolist() == [True]
    assert pointing_game(saliency, gt, tolerance=0, ties="all").tolist() == [False]
    gt[0, 0, 0] = True
    assert pointing_game(saliency, gt, tolerance=0, ties="all").tolist() == [True]


def test_pointing_game_rules_agree_without_ties():
    """The distance path (first) and the dilation path (any, all) agree when the maximum is unique."""
    generator = torch.Generator().manual_seed(0)
    saliency = torch.rand(40, 1, 16, 16, generator=generator)
    corners = torch.randint(0, 12, (40, 2), generator=generator).float()
    boxes = torch.cat([corners, corners + torch.randint(1, 5, (40, 2), generator=generator)], 1)
    for tolerance in (0, 1.5, 3, 6):
        first = pointing_game(saliency, boxes, tolerance, ties="first")
        assert torch.equal(first, pointing_game(saliency, boxes, tolerance, ties="any"))
        assert torch.equal(first, pointing_game(saliency, boxes, tolerance, ties="all"))
    assert 0 < int(pointing_game(saliency, boxes, 3).sum()) < 40  # both hits and misses


def test_boxes_to_masks():
    masks = boxes_to_masks(torch.tensor([[1, 2, 3, 5], [0.0, 0.0, 0.4, 0.6]]), 6, 4)
    expected = torch.zeros(2, 6, 4, dtype=torch.bool)
    expected[0, 2:5, 1:3] = True  # integer boxes are slices
    expected[1, 0, 0] = False  # pixel centre (0.5, 0.5) lies outside x <= 0.4
    assert torch.equal(masks, expected)
    union = boxes_to_masks([torch.tensor([[0, 0, 1, 1], [3, 5, 4, 6]]), torch.tensor([1, 1, 2, 2])], 6, 4)
    assert union.sum(dim=(1, 2)).tolist() == [2, 1] and union[0, 5, 3] and union[1, 1, 1]


def test_energy_pointing_by_hand():
    saliency = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    gt = torch.tensor([[[True, True], [False, False]]])
    # shift: saliency - 1 = (0, 1, 2, 3), 1 of 6 inside; clamp: 3 of 10 inside.
    torch.testing.assert_close(energy_pointing(saliency, gt), torch.tensor([1 / 6]))
    torch.testing.assert_close(energy_pointing(5 * saliency - 2, gt), torch.tensor([1 / 6]))
    torch.testing.assert_close(energy_pointing(saliency, gt, energy="clamp"), torch.tensor([0.3]))
    # A constant map spreads its energy uniformly: the object's area share.
    torch.testing.assert_close(energy_pointing(torch.full((1, 2, 2), 0.7), gt), torch.tensor([0.5]))
    torch.testing.assert_close(energy_pointing(-saliency, gt, energy="clamp"), torch.tensor([0.5]))


def test_bad_inputs_say_what_to_do(tiny_cnn, image_factory):
    images = image_factory(2, size=8)
    with pytest.raises(ValueError, match="ground_truth is empty for sample"):
        pointing_game(torch.rand(2, 8, 8), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="upsample"):
        deletion_curve(tiny_cnn, images, torch.rand(2, 1, 4, 4), 0)
    with pytest.raises(ValueError, match="sum or average the channels"):
        deletion_curve(tiny_cnn, images, torch.rand(2, 3, 8, 8), 0)
    with pytest.raises(ValueError, match=r"masks must be in \[0, 1\]"):
        preservation(tiny_cnn, images, 2 * torch.ones(2, 8, 8), 0)
    with pytest.raises(ValueError, match="outside the classifier's 3 classes"):
        selection(tiny_cnn, images, torch.ones(2, 8, 8), 5)
    with pytest.raises(ValueError, match="NaN"):
        pointing_game(torch.full((2, 8, 8), float("nan")), torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="steps"):
        DeletionAUC(tiny_cnn, steps=0)


# ----------------------------------------------------------------------------------------------- masks


def test_mask_area_preservation_and_selection_by_hand():
    model = linear_classifier(bias1=0.5)  # class 0 wins when sum(WEIGHTS * kept pixels) > 0.5
    masks = torch.tensor([[[0.45, 0.45], [0.45, 1.0]], [[0.2, 0.2], [0.6, 0.9]]])
    images = torch.ones(2, 1, 2, 2)
    torch.testing.assert_close(mask_area(masks), torch.tensor([0.5875, 0.475]))
    # soft: 0.67 and 0.60 > 0.5; hard (mask > 0.5): pixel 3 alone (0.4) and pixels 2, 3 (0.7).
    assert preservation(model, images, masks, 0).tolist() == [True, True]
    assert selection(model, images, masks, 0).tolist() == [False, True]
    assert selection(model, images, masks, 0, threshold=0.4).tolist() == [True, True]
    # With a white baseline every hidden pixel still counts: the class is kept.
    assert selection(model, images, masks, 0, baseline=torch.ones(1)).tolist() == [True, True]


# ------------------------------------------------------------------------------------------ Metric classes


def random_batches(image_factory, sizes=(3, 1, 4)):
    generator = torch.Generator().manual_seed(7)
    out = []
    for i, size in enumerate(sizes):
        images = image_factory(size, size=10, seed=20 + i)
        masks = torch.rand(size, 1, 10, 10, generator=generator) ** 3
        targets = torch.randint(0, 3, (size,), generator=generator)
        corners = torch.randint(0, 7, (size, 2), generator=generator).float()
        peak = masks.flatten(1).argmax(1)
        on_peak = torch.stack([peak % 10, peak // 10], 1).float().clamp(max=7)  # boxes (x0, y0) on the maximum
        corners[::2] = on_peak[::2]
        boxes = torch.cat([corners, corners + 3], 1)
        out.append((images, masks, targets, boxes))
    return out


def functional_means(classifier, batches, steps, tolerance=15):
    images, masks, targets, boxes = (torch.cat(parts) for parts in zip(*batches))
    return {
        "deletion_auc": deletion_auc(classifier, images, masks, targets, steps, "black").mean(),
        "insertion_auc": insertion_auc(classifier, images, masks, targets, steps, "blur").mean(),
        "mask_area": mask_area(masks).mean(),
        "preservation_rate": preservation(classifier, images, masks, targets).float().mean(),
        "selection_rate": selection(classifier, images, masks, targets).float().mean(),
        "pointing_game": pointing_game(masks, boxes, tolerance).float().mean(),
        "energy_pointing": energy_pointing(masks, boxes).mean(),
    }


def test_metric_classes_equal_the_mean_of_the_functional(tiny_cnn, image_factory):
    batches = random_batches(image_factory)
    expected = functional_means(tiny_cnn, batches, steps=5, tolerance=1)
    metrics = {
        "deletion_auc": DeletionAUC(tiny_cnn, steps=5),
        "insertion_auc": InsertionAUC(tiny_cnn, steps=5),
        "mask_area": MaskArea(),
        "preservation_rate": PreservationRate(tiny_cnn),
        "selection_rate": SelectionRate(tiny_cnn),
        "pointing_game": PointingGame(tolerance=1),
        "energy_pointing": EnergyPointing(),
    }
    for images, masks, targets, boxes in batches:
        for name, metric in metrics.items():
            if name in ("pointing_game", "energy_pointing"):
                metric.update(masks, boxes)
            elif name == "mask_area":
                metric.update(masks)
            else:
                metric.update(images, masks, targets)
    for name, metric in metrics.items():
        torch.testing.assert_close(metric.compute(), expected[name], msg=name)
    assert 0 < float(expected["pointing_game"]) < 1 and 0 < float(expected["preservation_rate"]) < 1


def test_each_metric_class_holds_exactly_its_functional_twin(tiny_cnn, image_factory):
    """Non-default settings reach the functional: one update's states are its values' float32 sum and count."""
    ((images, masks, targets, boxes),) = random_batches(image_factory, sizes=(8,))
    x, m, t = images, masks, targets
    twins = [
        (DeletionAUC(tiny_cnn, steps=3, baseline="mean"), (x, m, t), deletion_auc(tiny_cnn, x, m, t, 3, "mean")),
        (InsertionAUC(tiny_cnn, steps=3, baseline="black"), (x, m, t), insertion_auc(tiny_cnn, x, m, t, 3, "black")),
        (MaskArea(), (m,), mask_area(m)),
        (PreservationRate(tiny_cnn, baseline="mean"), (x, m, t), preservation(tiny_cnn, x, m, t, "mean")),
        (SelectionRate(tiny_cnn, 0.7, baseline="mean"), (x, m, t), selection(tiny_cnn, x, m, t, 0.7, "mean")),
        (PointingGame(tolerance=2, ties="any"), (m, boxes), pointing_game(m, boxes, 2, "any")),
        (EnergyPointing(energy="clamp"), (m, boxes), energy_pointing(m, boxes, "clamp")),
    ]
    for metric, args, values in twins:
        metric.update(*args)
        # total starts at 0.0 and adds values.float().sum(): the same operation, so equal to the bit.
        assert torch.equal(metric.total, values.float().sum()), type(metric).__name__
        assert int(metric.count) == values.numel() == 8


def test_collection_update_and_sum_reduced_states(tiny_cnn, image_factory):
    batches = random_batches(image_factory)
    expected = functional_means(tiny_cnn, batches, steps=4)
    collection = explanation_metrics(tiny_cnn, steps=4, localisation=True, prefix="test/")
    first, second = explanation_metrics(tiny_cnn, steps=4, localisation=True), explanation_metrics(tiny_cnn, steps=4)
    for i, (images, masks, targets, boxes) in enumerate(batches):
        update_explanation_metrics(collection, images, masks, targets, ground_truth=boxes)
        # As two DDP ranks would: rank 0 takes the first batch, rank 1 the others (without ground truth).
        update_explanation_metrics(first if i == 0 else second, images, masks, targets, boxes if i == 0 else None)
    values = collection.compute()
    assert set(values) == {f"test/{name}" for name in expected}
    for name, value in expected.items():
        torch.testing.assert_close(values[f"test/{name}"], value, msg=name)
    for name, metric in first.items():
        assert metric.full_state_update is False
        assert set(metric._reductions) == {"total", "count"}
        assert all(fn is dim_zero_sum for fn in metric._reductions.values()), name
        if name in second:
            metric.merge_state(second[name])
    merged = first.compute()
    for name in ("deletion_auc", "insertion_auc", "mask_area", "preservation_rate", "selection_rate"):
        torch.testing.assert_close(merged[name], expected[name], msg=name)
    # Localisation metrics saw only the first batch, and were never given a batch without ground truth.
    torch.testing.assert_close(merged["pointing_game"], pointing_game(batches[0][1], batches[0][3]).float().mean())
    assert "pointing_game" not in second and int(first["pointing_game"].count) == len(batches[0][0])


def test_collection_keeps_equal_looking_metrics_apart():
    """Preservation and selection rates both 1.0 after the first batch must not share updates afterwards."""
    model = linear_classifier(bias1=0.5)
    collection = explanation_metrics(model, steps=2)
    images = torch.ones(1, 1, 2, 2)
    update_explanation_metrics(collection, images, torch.ones(1, 1, 2, 2), torch.tensor([0]))
    update_explanation_metrics(collection, images, torch.tensor([[[[0.45, 0.45], [0.45, 1.0]]]]), torch.tensor([0]))
    values = collection.compute()
    assert float(values["preservation_rate"]) == 1.0 and float(values["selection_rate"]) == 0.5
    # The same through MetricCollection.update, which hands each metric the keyword arguments it takes.
    collection = explanation_metrics(model, steps=2)
    for masks in (torch.ones(1, 1, 2, 2), torch.tensor([[[[0.45, 0.45], [0.45, 1.0]]]])):
        collection.update(images=images, saliency=masks, masks=masks, targets=torch.tensor([0]))
    assert collection.compute() == values


def test_metrics_leave_the_classifier_alone(tiny_cnn, image_factory):
    tiny_cnn.train()
    tiny_cnn.head.requires_grad_(False)
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    collection = explanation_metrics(tiny_cnn, steps=3, localisation=True)
    clone = collection.clone(prefix="val/")
    images = image_factory(2, size=8)
    update_explanation_metrics(clone, images, torch.rand(2, 8, 8), torch.tensor([0, 2]), torch.ones(2, 8, 8))
    # Eval mode while used (BatchNorm statistics untouched), flags restored afterwards.
    assert all(torch.equal(before[k], v) for k, v in tiny_cnn.state_dict().items())
    assert tiny_cnn.training and all(m.training for m in tiny_cnn.modules())
    assert [p.requires_grad for p in tiny_cnn.parameters()] == [True] * 6 + [False] * 2
    # Shared, not copied, and not part of the metrics' modules or state.
    assert clone["val/deletion_auc"].classifier is tiny_cnn
    assert not any(isinstance(m, type(tiny_cnn)) for m in clone.modules())
    assert collection.state_dict() == {} and clone.state_dict() == {}


def test_collection_in_a_lightning_test_step(tiny_cnn, image_factory, trainer_factory):
    """The call NeuroMask.test_step makes: the logged values are the functional means over all batches."""

    class Explained(pl.LightningModule):
        def __init__(self, classifier: nn.Module) -> None:
            super().__init__()
            self.classifier = classifier
            self.test_metrics = explanation_metrics(classifier, steps=4, localisation=True, prefix="test/")

        def test_step(self, batch, batch_idx):
            images, masks, targets, boxes = batch
            update_explanation_metrics(self.test_metrics, images, masks, targets, ground_truth=boxes)
            self.log_dict(self.test_metrics)

    batches = random_batches(image_factory, sizes=(3, 2))
    data = TensorDataset(*(torch.cat(parts) for parts in zip(*batches)))
    module = Explained(tiny_cnn)
    assert all(key.startswith("classifier.") for key in module.state_dict())
    copy = deepcopy(module)  # a copied module's metrics use the copied classifier
    assert copy.test_metrics["test/insertion_auc"].classifier is copy.classifier is not tiny_cnn
    trainer = trainer_factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.test(module, DataLoader(data, batch_size=3), verbose=False)
    expected = functional_means(tiny_cnn, batches, steps=4)
    for name, value in expected.items():
        torch.testing.assert_close(trainer.callback_metrics[f"test/{name}"], value, msg=name)


# -------------------------------------------------------------------------------------------- peer libraries


def test_deletion_and_pointing_agree_with_quantus(tiny_cnn, image_factory):
    quantus = pytest.importorskip("quantus")
    images = image_factory(6, size=12, seed=3)
    generator = torch.Generator().manual_seed(0)
    saliency = torch.rand(6, 1, 12, 12, generator=generator)  # no ties
    targets = tiny_cnn(images).argmax(1).detach()
    steps = 12
    ours = deletion_curve(tiny_cnn, images, saliency, targets, steps=steps, baseline="black")
    # PixelFlipping broadcasts the map over the 3 channels and removes `features_in_step` values a step in
    # descending order; 3 x 144 / 12 values = 12 pixels, all channels. Baseline 0.0 is our "black" (Quantus's own
    # "black" is each image's current minimum). Its curve starts after the first step, and its AUC is
    # np.trapz with dx=1 over those points.
    flipping = quantus.PixelFlipping(
        features_in_step=3 * 144 // steps, perturb_baseline=0.0, normalise=False, abs=False, disable_warnings=True
    )
    kwargs = dict(
        model=tiny_cnn,
        x_batch=images.numpy(),
        y_batch=targets.numpy(),
        a_batch=saliency.numpy(),
        channel_first=True,
        softmax=True,
        device="cpu",
    )
    curves = np.array(flipping(**kwargs))
    torch.testing.assert_close(ours[:, 1:], torch.tensor(curves, dtype=torch.float32), atol=1e-5, rtol=0)
    # Quantus's AUC (return_auc_per_sample, helpers.utils.calculate_auc) is np.trapz(curve, dx=1), which
    # numpy 2 removed: the same rule, as np.trapezoid.
    their_auc = torch.tensor(np.trapezoid(curves, dx=1, axis=1), dtype=torch.float32)
    our_auc = deletion_auc(tiny_cnn, images, saliency, targets, steps=steps, baseline="black")
    torch.testing.assert_close(our_auc * steps - (ours[:, 0] + ours[:, 1]) / 2, their_auc, atol=1e-5, rtol=0)

    # Pointing game: Quantus has no tolerance (ours with tolerance=0) and counts a hit if any maximum is on
    # the object (ties="any"); without ties every rule agrees.
    corners = torch.randint(0, 8, (6, 2), generator=generator).float()
    gt = boxes_to_masks(torch.cat([corners, corners + 5], 1), 12, 12)[:, None]
    peak = saliency.flatten(1).argmax(1)
    gt.view(6, -1)[:3].scatter_(1, peak[:3, None], True)  # the first three are hits
    tied = saliency.clone()
    tied.view(6, -1)[torch.arange(6), (peak + 77) % 144] = tied.flatten(1).max(1).values  # a second maximum
    game = quantus.PointingGame(normalise=False, abs=False, disable_warnings=True)
    for maps, ties in ((saliency, "first"), (tied, "any")):
        theirs = game(
            model=tiny_cnn,
            x_batch=images.numpy(),
            y_batch=targets.numpy(),
            a_batch=maps.numpy(),
            s_batch=gt.float().numpy(),
            channel_first=True,
        )
        assert pointing_game(maps, gt, tolerance=0, ties=ties).tolist() == [bool(v) for v in theirs]
    assert 3 <= int(pointing_game(saliency, gt, tolerance=0).sum()) < 6

    # Energy pointing ("clamp" on a non-negative map) is Quantus's relevance mass accuracy.
    mass = quantus.RelevanceMassAccuracy(normalise=False, abs=False, disable_warnings=True)
    theirs = mass(
        model=tiny_cnn,
        x_batch=images.numpy(),
        y_batch=targets.numpy(),
        a_batch=saliency.numpy(),
        s_batch=gt.float().numpy(),
        channel_first=True,
    )
    torch.testing.assert_close(
        energy_pointing(saliency, gt, energy="clamp"),
        torch.tensor(np.array(theirs), dtype=torch.float32),
        atol=1e-5,
        rtol=0,
    )


def test_pointing_tolerance_agrees_with_torchray():
    torchray_pointing = pytest.importorskip("torchray.benchmark.pointing_game")
    generator = torch.Generator().manual_seed(1)
    saliency = torch.rand(30, 20, 20, generator=generator)
    corners = torch.randint(0, 16, (30, 2), generator=generator).float()
    gt = boxes_to_masks(torch.cat([corners, corners + 4], 1), 20, 20)
    peak = saliency.flatten(1).argmax(1)
    for tolerance in (3, 6):
        # TorchRay counts distances strictly below the tolerance; distances between pixels are square roots
        # of integers, so ours at tolerance - 0.001 is the same rule.
        game = torchray_pointing.PointingGame(num_classes=1, tolerance=tolerance)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = [game.evaluate(gt[i], (int(peak[i] % 20), int(peak[i] // 20))) == 1 for i in range(30)]
        ours = pointing_game(saliency, gt, tolerance=tolerance - 1e-3).tolist()
        assert ours == theirs and 0 < sum(ours) < 30
