"""The deletion game (``l_delete``): the image with the mask's region hidden should lose the class."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_masks_independent_of_the_batch, make_images
from torch import Tensor, nn

from neuromask_pl import NeuroMask
from neuromask_pl.data.localisation import load_benchmark_classifier, make_localisation_set
from neuromask_pl.maths.losses import deletion_loss, laplacian_kernel, loss_terms
from neuromask_pl.maths.optimize import MaskOptimisation
from neuromask_pl.metrics import deletion_auc
from neuromask_pl.settings import MaskSettings, resolve_settings


def test_deletion_loss_is_minus_log_of_one_minus_the_target_probability() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, -1.0, 3.0]])
    loss = deletion_loss(logits, torch.tensor([0, 2]))
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(1))
    p1 = math.exp(3) / (math.exp(0.5) + math.exp(-1) + math.exp(3))
    torch.testing.assert_close(loss, torch.tensor([-math.log(1 - p0), -math.log(1 - p1)]))
    # Stable where 1 - p rounds to 0 or p to 0 in float32.
    extreme = deletion_loss(torch.tensor([[100.0, 0.0], [100.0, 0.0]]), torch.tensor([0, 1]))
    torch.testing.assert_close(extreme, torch.tensor([100.0, 0.0]), atol=1e-4, rtol=0)


def test_loss_terms_add_the_weighted_deletion_term() -> None:
    torch.manual_seed(0)
    logits, deleted, targets = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 3, 1])
    weights = torch.randn(3, 1, 8, 8)
    mask, kernel = torch.sigmoid(weights), laplacian_kernel(3)
    settings = MaskSettings(l_delete=2.5)
    plain = loss_terms(logits, targets, weights, mask, kernel, settings)
    game = loss_terms(logits, targets, weights, mask, kernel, settings, logits_deleted=deleted)
    assert "delete" not in plain
    torch.testing.assert_close(game["delete"], deletion_loss(deleted, targets))
    torch.testing.assert_close(game["total"], plain["total"] + 2.5 * game["delete"])


def test_l_delete_is_validated() -> None:
    with pytest.raises(ValueError, match="l_delete must be >= 0"):
        resolve_settings("default", None, {"l_delete": -1})


class CountsImages(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x: Tensor) -> Tensor:
        self.batches.append(x.shape[0])
        return self.model(x)


def test_one_forward_pass_holds_the_masked_and_the_deleted_images(tiny_cnn) -> None:
    model = CountsImages(tiny_cnn.eval().requires_grad_(False))
    images = make_images(3, 16)
    settings = resolve_settings("default", 2, {"l_delete": 1.0})
    problem = MaskOptimisation(model, images, torch.tensor([0, 1, 2]), torch.arange(3), settings, seed=0)
    mask, logits, terms = problem.evaluate()
    assert model.batches == [6] and logits.shape == (3, 3)
    hidden = images * (1 - mask) + mask * problem.baseline  # the mask's region replaced by the baseline
    torch.testing.assert_close(terms["delete"], deletion_loss(tiny_cnn(hidden), torch.tensor([0, 1, 2])))
    result = NeuroMask(tiny_cnn, steps=3, settings={"l_delete": 1.0}).explain(images)
    assert "delete" in result.loss and result.loss["delete"].shape == (3,)


def test_masks_with_the_deletion_game_do_not_depend_on_the_batch(tiny_cnn) -> None:
    images = make_images(3, size=32, seed=5).double()
    assert_masks_independent_of_the_batch(tiny_cnn.double(), images, steps=25, settings={"l_delete": 2.0})


def test_the_deletion_game_makes_hiding_the_mask_remove_the_class() -> None:
    """On the localisation benchmark's classifier: with l_delete the class probability falls faster as the
    mask's pixels are deleted (deletion AUC), and the hidden-region loss is lower."""
    classifier = load_benchmark_classifier("clean")
    data = make_localisation_set("test", 12, seed=0)
    images = data["image"]
    targets = classifier(images).argmax(1)
    results = {
        ld: NeuroMask(classifier, steps=150, settings={"l_delete": ld}).explain(images, targets) for ld in (0.0, 10.0)
    }
    aucs = {ld: deletion_auc(classifier, images, r.masks, targets).mean() for ld, r in results.items()}
    assert aucs[10.0] < aucs[0.0]
    assert bool(results[10.0].preserved.all())
    hidden = {ld: deletion_loss(classifier(images * (1 - r.masks)), targets).mean() for ld, r in results.items()}
    assert hidden[10.0] < hidden[0.0]
