"""Tests for the objective options of issue 6 (photos): the two-scale mask and upsampled weights.

Values are checked against hand computations; per-sample independence is checked by explaining
images alone and in batches.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_masks_independent_of_the_batch, make_images

from neuromask_pl import NeuroMask
from neuromask_pl.maths.losses import detail_penalty, laplacian_kernel, loss_terms
from neuromask_pl.maths.mask import pack_weights, unpack_weights
from neuromask_pl.maths.optimize import MaskOptimisation
from neuromask_pl.settings import PRESETS, MaskSettings, resolve_settings

# ----------------------------------------------------------------------------- validation and presets


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(mask_coarse=-1), "mask_coarse must be >= 0"),
        (dict(mask_coarse=8, l_detail=-0.5), "l_detail must be >= 0"),
        (dict(l_detail=1.0), "set mask_coarse > 0 too"),
    ],
)
def test_new_options_are_validated(options: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        MaskSettings(**options)


def test_new_options_default_to_off_and_paper_is_unchanged() -> None:
    settings = MaskSettings()
    assert (settings.mask_coarse, settings.l_detail, settings.upsample_weights) == (0, 0.0, False)
    assert PRESETS["paper"] == MaskSettings()


def test_default_preset_is_two_scale_with_upsampled_weights() -> None:
    default = PRESETS["default"]
    assert (default.mask_size, default.mask_coarse, default.l_detail, default.upsample_weights) == (32, 16, 10.0, True)
    assert (default.l_pred, default.l_sparse, default.l_smooth) == (1.0, 1.0, 1.0)
    assert (default.temperature_start, default.temperature, default.tie_break) == (2.0, 0.01, 0.001)
    # a 224 px photo: fine cells of 7 px, coarse cells of 14 px; a 64 px canvas: 2 px and 4 px
    assert (default.scale_for(224, 224), default.coarse_scale_for(224, 224)) == (7, 14)
    assert (default.scale_for(64, 64), default.coarse_scale_for(64, 64)) == (2, 4)
    assert MaskSettings().coarse_scale_for(224, 224) == 1  # off: unused


def test_new_options_reach_the_settings_through_the_constructor(tiny_cnn: torch.nn.Module) -> None:
    module = NeuroMask(tiny_cnn, preset="paper", settings={"mask_coarse": 4, "l_detail": 2.0, "upsample_weights": True})
    assert (module.settings.mask_coarse, module.settings.l_detail, module.settings.upsample_weights) == (4, 2.0, True)
    assert module.hparams["settings"]["mask_coarse"] == 4 and module.hparams["settings"]["upsample_weights"] is True


# ----------------------------------------------------------------------------- two-scale weights


def test_pack_and_unpack_by_hand() -> None:
    fine = torch.arange(2 * 16, dtype=torch.float64).view(2, 1, 4, 4)
    coarse = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.5, 0.5], [0.5, 0.5]], dtype=torch.float64).view(2, 1, 2, 2)
    packed = pack_weights(fine, coarse)
    assert packed.shape == (2, 1, 1, 20)
    logits, fine_back = unpack_weights(packed, (4, 4), (2, 2))
    assert torch.equal(fine_back, fine)
    # bilinear (align_corners=False) 2x2 -> 4x4: the first row of sample 0's coarse part is 1, 0.5, -0.5, -1
    expected_row = torch.tensor([1.0, 0.5, -0.5, -1.0], dtype=torch.float64)
    torch.testing.assert_close(logits[0, 0, 0] - fine[0, 0, 0], expected_row)
    torch.testing.assert_close(logits[1] - fine[1], torch.full((1, 4, 4), 0.5, dtype=torch.float64))


def test_detail_penalty_is_added_to_the_total_only() -> None:
    settings = MaskSettings(mask_coarse=2, l_detail=3.0, smooth_penalty="tv", smooth_on="mask", sparsity_on="mask")
    logits, targets = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    weights = torch.tensor([[0.5, -1.0], [0.0, 2.0]]).expand(2, 1, 2, 2)
    mask = torch.sigmoid(weights / settings.temperature)
    fine = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    plain = loss_terms(logits, targets, weights, mask, laplacian_kernel(3), settings)
    with_detail = loss_terms(logits, targets, weights, mask, laplacian_kernel(3), settings, fine)
    assert detail_penalty(fine).tolist() == pytest.approx([1.5, 0.0])
    for term in ("pred", "sparse", "smooth"):
        assert torch.equal(plain[term], with_detail[term])
    torch.testing.assert_close(with_detail["total"], plain["total"] + 3.0 * torch.tensor([1.5, 0.0]))


def test_two_scale_optimisation_learns_both_grids(tiny_cnn: torch.nn.Module) -> None:
    # 40 px: fine grid 8 x 8 (cells of 5 px), coarse grid 5 x 5 (cells of 8 px)
    settings = resolve_settings("default", 3, {"mask_size": 8, "mask_coarse": 5, "l_detail": 1.0})
    images = make_images(2, size=40, seed=1)
    problem = MaskOptimisation(tiny_cnn, images, torch.tensor([0, 1]), torch.arange(2), settings, seed=0)
    assert problem.weights.shape == (2, 1, 1, 8 * 8 + 5 * 5)
    coarse_start = problem.weights.detach()[..., 64:].clone()
    assert torch.equal(coarse_start, torch.zeros_like(coarse_start))  # the coarse grid starts at zero
    problem.run()
    assert (problem.weights.detach()[..., 64:] != 0).any()  # and moves
    fit = problem.result()
    assert fit.masks.shape == (2, 1, 40, 40)


# ----------------------------------------------------------------------------- upsampled weights


def test_upsampled_weights_give_a_binary_mask_with_smooth_contours(tiny_cnn: torch.nn.Module) -> None:
    """sigmoid(up(w) / T) at the image's resolution, by hand, versus up(sigmoid(w / T))."""
    images, ids = make_images(1, size=16, seed=2), torch.tensor([0])

    def first_mask(upsample_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
        settings = resolve_settings(
            "paper",
            1,
            {"mask_scale": 4, "temperature": 0.001, "weight_limit": 1.0, "upsample_weights": upsample_weights},
        )
        problem = MaskOptimisation(tiny_cnn, images, torch.tensor([0]), ids, settings, seed=0)
        return problem.evaluate()[0], problem.weights.detach()

    mask_on, weights = first_mask(True)
    up = F.interpolate(weights, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(mask_on, torch.sigmoid(up / 0.001))
    assert ((mask_on > 0.01) & (mask_on < 0.99)).float().mean() < 0.1  # (nearly) binary at every pixel
    mask_off, same_weights = first_mask(False)
    assert torch.equal(same_weights, weights)
    torch.testing.assert_close(mask_off, F.interpolate(torch.sigmoid(weights / 0.001), size=(16, 16), mode="bilinear"))
    assert ((mask_off > 0.01) & (mask_off < 0.99)).float().mean() > 0.2  # bilinear ramps between 0/1 cells


# ----------------------------------------------------------------------------- per-sample independence


@pytest.mark.parametrize(
    "options",
    [
        dict(preset="default", steps=12, settings=dict(mask_size=8, mask_coarse=4)),
        dict(preset="paper", steps=8, settings=dict(mask_scale=2, mask_coarse=3, l_detail=2.0, upsample_weights=True)),
    ],
)
def test_masks_do_not_depend_on_the_batch(tiny_cnn: torch.nn.Module, options: dict) -> None:
    images = make_images(3, size=32, seed=5).double()
    assert_masks_independent_of_the_batch(tiny_cnn.double(), images, **options)
