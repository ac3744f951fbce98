"""neuromask_pl.maths.losses: every loss term, the temperature schedule and the deletion game's term, checked
against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BLUR_AREA

from neuromask_pl.maths.losses import (
    LOSS_TERMS,
    area_profile_loss,
    deletion_loss,
    detail_penalty,
    laplacian_kernel,
    laplacian_size,
    loss_terms,
    settings_at,
    smooth_term,
    temperature_at,
    total_variation,
)
from neuromask_pl.settings import PRESETS, MaskSettings, resolve_settings

pytestmark = pytest.mark.numerics

# Two 6x6 weight grids with known, irregular values (one per sample).
GRID_A = [[((7 * (6 * i + j)) % 11 - 5) / 2.0 for j in range(6)] for i in range(6)]
GRID_B = [[((5 * i * i + 3 * j) % 13 - 6) / 3.0 - 9.0 for j in range(6)] for i in range(6)]
LOGITS = [[1.0, 2.0, -0.5], [0.3, -1.2, 2.5]]
TARGETS = [2, 0]


def cross_entropy_by_hand(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target], log-sum-exp written out."""
    top = max(logits)
    return top + math.log(sum(math.exp(z - top) for z in logits)) - logits[target]


def laplacian_mse_by_hand(grid: list[list[float]], size: int) -> float:
    """Mean over every valid ``size`` x ``size`` window of (centre * (size^2 - 1) - sum of the other taps)^2."""
    n, half = len(grid), size // 2
    squares = []
    for r in range(half, n - half):
        for c in range(half, len(grid[0]) - half):
            total = 0.0
            for dr in range(-half, half + 1):
                for dc in range(-half, half + 1):
                    tap = size * size - 1 if dr == 0 and dc == 0 else -1
                    total += tap * grid[r + dr][c + dc]
            squares.append(total * total)
    return sum(squares) / len(squares)


def replicate_laplacian_mse_by_hand(grid: list[list[float]], size: int) -> float:
    """Mean over every pixel of its squared Laplacian, the grid's border pixels repeated outwards."""
    rows, cols, half = len(grid), len(grid[0]), size // 2
    squares = []
    for r in range(rows):
        for c in range(cols):
            total = 0.0
            for dr in range(-half, half + 1):
                for dc in range(-half, half + 1):
                    tap = size * size - 1 if dr == 0 and dc == 0 else -1
                    total += tap * grid[min(max(r + dr, 0), rows - 1)][min(max(c + dc, 0), cols - 1)]
            squares.append(total * total)
    return sum(squares) / len(squares)


def sparsity_by_hand(grid: list[list[float]], limit: float) -> float:
    return sum(abs(w + limit) for row in grid for w in row) / (len(grid) * len(grid[0]))


def as_batch(*grids: list[list[float]]) -> torch.Tensor:
    return torch.tensor(grids, dtype=torch.float64).unsqueeze(1)


# ----------------------------------------------------------------------------- loss terms by hand


@pytest.mark.parametrize("size", [3, 5])
def test_paper_loss_terms_equal_hand_computation(size: int) -> None:
    settings = PRESETS["paper"]
    weights = as_batch(GRID_A, GRID_B)
    mask = torch.sigmoid(weights / settings.temperature)
    terms = loss_terms(
        torch.tensor(LOGITS, dtype=torch.float64),
        torch.tensor(TARGETS),
        weights,
        mask,
        laplacian_kernel(size),
        settings,
    )
    for sample, grid in enumerate((GRID_A, GRID_B)):
        pred = cross_entropy_by_hand(LOGITS[sample], TARGETS[sample])
        sparse = sparsity_by_hand(grid, 10.0)
        smooth = laplacian_mse_by_hand(grid, size)
        assert terms["pred"][sample].item() == pytest.approx(pred, rel=1e-6)
        assert terms["sparse"][sample].item() == pytest.approx(sparse, rel=1e-6)
        assert terms["smooth"][sample].item() == pytest.approx(smooth, rel=1e-6)
        total = 0.4 * pred + 0.35 * sparse + 0.03 * smooth
        assert terms["total"][sample].item() == pytest.approx(total, rel=1e-6)
    assert all(v.shape == (2,) for v in terms.values())


@pytest.mark.parametrize("size", [3, 5])
def test_replicate_padded_smoothness_by_hand(size: int) -> None:
    settings = resolve_settings("paper", None, {"laplacian_padding": "replicate"})
    weights = as_batch(GRID_A, GRID_B)
    mask = torch.sigmoid(weights / settings.temperature)
    terms = loss_terms(torch.tensor(LOGITS), torch.tensor(TARGETS), weights, mask, laplacian_kernel(size), settings)
    for sample, grid in enumerate((GRID_A, GRID_B)):
        assert terms["smooth"][sample].item() == pytest.approx(replicate_laplacian_mse_by_hand(grid, size), rel=1e-5)
        assert terms["smooth"][sample].item() != pytest.approx(laplacian_mse_by_hand(grid, size), rel=1e-3)


def test_blur_area_preset_loss_terms_by_hand() -> None:
    settings = resolve_settings("paper", None, BLUR_AREA)
    weights = as_batch(GRID_A)
    mask = torch.sigmoid(weights / settings.temperature)
    kernel = laplacian_kernel(settings.laplacian)
    terms = loss_terms(torch.tensor(LOGITS[:1]), torch.tensor(TARGETS[:1]), weights, mask, kernel, settings)
    values = sorted(1 / (1 + math.exp(-w / settings.temperature)) for row in GRID_A for w in row)
    kept = round(settings.area_target * 36)
    reference = [0.0] * (36 - kept) + [1.0] * kept
    sparse = sum((v - r) ** 2 for v, r in zip(values, reference)) / 36
    by_hand = replicate_laplacian_mse_by_hand if settings.laplacian_padding == "replicate" else laplacian_mse_by_hand
    smooth = by_hand(GRID_A, settings.laplacian)
    pred = cross_entropy_by_hand(LOGITS[0], TARGETS[0])
    assert terms["sparse"].item() == pytest.approx(sparse, rel=1e-5)
    assert terms["smooth"].item() == pytest.approx(smooth, rel=1e-5)
    total = settings.l_pred * pred + settings.l_sparse * sparse + settings.l_smooth * smooth
    assert terms["total"].item() == pytest.approx(total, rel=1e-5)


def test_auto_laplacian_of_a_6x6_mask_is_3x3() -> None:
    assert laplacian_size(PRESETS["paper"].laplacian, 6, 6) == 3
    kernel = laplacian_kernel(3)[0, 0]
    assert kernel.tolist() == [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]]
    kernel5 = laplacian_kernel(5)[0, 0]
    assert kernel5[2, 2] == 24 and (kernel5 == -1).sum() == 24


def test_each_sample_loss_ignores_the_rest_of_the_batch() -> None:
    settings = PRESETS["paper"]
    weights = as_batch(GRID_A, GRID_B)
    mask = torch.sigmoid(weights / settings.temperature)
    logits, targets, kernel = torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGETS), laplacian_kernel(3)
    both = loss_terms(logits, targets, weights, mask, kernel, settings)
    second = loss_terms(logits[1:], targets[1:], weights[1:], mask[1:], kernel, settings)
    # The cross-entropy and the smoothness convolution run in float32, whose kernels may sum a batch of 2 and of 1
    # in another order: a 3-logit log-sum-exp, or 16 outputs of 9-term sums squared and averaged, agree to a few
    # float32 roundings (2**-24 each) times those 9 + 16 terms, below 2e-6 relative; the float64 sparsity term
    # (a mean of 36 values, 2**-53 each) to 1e-12.
    for name, rel in (("pred", 2e-6), ("sparse", 1e-12), ("smooth", 2e-6), ("total", 2e-6)):
        assert both[name][1].item() == pytest.approx(second[name][0].item(), rel=rel), name


def test_mask_sparsity_is_the_mask_mean() -> None:
    settings = resolve_settings("paper", None, {"sparsity_on": "mask"})
    weights = as_batch(GRID_A)
    mask = torch.sigmoid(weights / settings.temperature)
    logits, targets = torch.tensor(LOGITS[:1]), torch.tensor(TARGETS[:1])
    terms = loss_terms(logits, targets, weights, mask, laplacian_kernel(3), settings)
    by_hand = sum(1 / (1 + math.exp(-w / 0.3)) for row in GRID_A for w in row) / 36
    assert terms["sparse"].item() == pytest.approx(by_hand, rel=1e-6)


# ----------------------------------------------------------------------------- area profile


def test_area_profile_loss_by_hand() -> None:
    mask = torch.tensor([[[[0.1, 0.9], [0.5, 0.3]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    # Sample 0 sorted: .1 .3 .5 .9 vs reference 0 0 1 1 -> (.01 + .09 + .25 + .01) / 4.
    # Sample 1 sorted: 0 0 0 1 vs 0 0 1 1 -> 1 / 4.
    loss = area_profile_loss(mask, 0.5)
    assert loss.tolist() == pytest.approx([0.09, 0.25], abs=1e-7)
    # Keeping a quarter of four pixels: reference 0 0 0 1; sample 1 then matches exactly.
    assert area_profile_loss(mask, 0.25).tolist() == pytest.approx([(0.01 + 0.09 + 0.25 + 0.01) / 4, 0.0], abs=1e-7)
    assert area_profile_loss(mask, 1.0).tolist() == pytest.approx([(0.81 + 0.49 + 0.25 + 0.01) / 4, 0.75], abs=1e-7)


def test_area_sparsity_in_loss_terms_uses_the_area_target() -> None:
    settings = resolve_settings("paper", None, BLUR_AREA)
    mask = torch.linspace(0, 1, 100).view(1, 1, 10, 10)
    weights = torch.zeros(1, 1, 5, 5)
    terms = loss_terms(torch.zeros(1, 3), torch.tensor([0]), weights, mask, laplacian_kernel(3), settings)
    values = sorted(mask.flatten().tolist())
    kept = round(settings.area_target * 100)
    reference = [0.0] * (100 - kept) + [1.0] * kept
    by_hand = sum((v - r) ** 2 for v, r in zip(values, reference)) / 100
    assert terms["sparse"].item() == pytest.approx(by_hand, rel=1e-6)
    assert terms["pred"].item() == pytest.approx(math.log(3), rel=1e-6)


# ----------------------------------------------------------------------------- Laplacian size


@pytest.mark.parametrize(
    ("setting", "height", "width", "expected"),
    [(0, 64, 64, 5), (0, 64, 300, 5), (0, 63, 300, 3), (0, 300, 63, 3), (0, 3, 3, 3), (3, 500, 500, 3), (5, 5, 9, 5)],
)
def test_laplacian_size_rule(setting: int, height: int, width: int, expected: int) -> None:
    assert laplacian_size(setting, height, width) == expected


@pytest.mark.parametrize(("setting", "height", "width", "size"), [(0, 2, 40, 3), (3, 40, 2, 3), (5, 4, 40, 5)])
def test_laplacian_larger_than_the_mask_is_an_error(setting: int, height: int, width: int, size: int) -> None:
    with pytest.raises(ValueError, match=f"smaller than the {size}x{size} Laplacian"):
        laplacian_size(setting, height, width)


def test_laplacian_kernel_rejects_other_sizes() -> None:
    with pytest.raises(ValueError, match="must be 3 or 5"):
        laplacian_kernel(7)


# ----------------------------------------------------------------------------- smoothness penalties


def test_total_variation_by_hand() -> None:
    values = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]]])
    # vertical |2-0|,|2-1|,|2-3| -> mean 4/3; horizontal |1-0|,|3-1|,|2-2|,|2-2| -> mean 3/4
    assert total_variation(values).item() == pytest.approx(4 / 3 + 3 / 4)


def test_smooth_term_on_the_mask_uses_the_sigmoid() -> None:
    weights = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    settings = resolve_settings("paper", None, {"smooth_penalty": "tv", "smooth_on": "mask", "temperature": 0.5})
    expected = total_variation(torch.sigmoid(weights / 0.5))
    torch.testing.assert_close(smooth_term(weights, laplacian_kernel(3), settings), expected)


# ----------------------------------------------------------------------------- temperature schedule


def test_temperature_schedule_by_hand() -> None:
    settings = MaskSettings(steps=5, temperature=0.01, temperature_start=1.0)
    # Geometric from 1.0 (step 0) to 0.01 (step 4): 1, 0.01^(1/4), 0.01^(1/2), 0.01^(3/4), 0.01.
    expected = [1.0, 0.01**0.25, 0.1, 0.01**0.75, 0.01]
    assert [temperature_at(settings, k) for k in range(5)] == pytest.approx(expected, rel=1e-12)
    assert temperature_at(settings, None) == 0.01  # after the loop: the final temperature
    assert temperature_at(settings, 99) == pytest.approx(0.01)  # clamped past the end
    assert settings_at(settings, 2).temperature == pytest.approx(0.1)
    assert settings_at(settings, 2).temperature_start == 1.0  # everything else as it was


def test_temperature_schedule_fixed_without_start_and_with_one_step() -> None:
    assert temperature_at(MaskSettings(steps=10, temperature=0.3), 4) == 0.3
    assert temperature_at(MaskSettings(steps=1, temperature=0.2, temperature_start=3.0), 0) == 0.2
    paper = PRESETS["paper"]
    assert temperature_at(paper, 0) == paper.temperature and settings_at(paper, 5) is paper


def test_annealed_temperature_reaches_the_mask_smoothness_term() -> None:
    """smooth_on='mask' uses the step's temperature: at step 0 the mask is sigmoid(w / temperature_start)."""
    settings = resolve_settings("default", 3)
    weights = torch.tensor([[[[0.0, 0.5], [1.0, -1.0]]]], dtype=torch.float64)
    first = settings_at(settings, 0)
    terms = loss_terms(
        torch.tensor([[1.0, 0.0]], dtype=torch.float64),
        torch.tensor([0]),
        weights,
        torch.sigmoid(weights / first.temperature),
        laplacian_kernel(3),
        first,
    )
    m = [[1 / (1 + math.exp(-w / 2.0)) for w in row] for row in ([0.0, 0.5], [1.0, -1.0])]
    tv = (abs(m[1][0] - m[0][0]) + abs(m[1][1] - m[0][1])) / 2 + (abs(m[0][1] - m[0][0]) + abs(m[1][1] - m[1][0])) / 2
    assert terms["smooth"].item() == pytest.approx(tv, rel=1e-6)  # the penalty is computed in float32


# ----------------------------------------------------------------------------- two-scale detail


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


# ----------------------------------------------------------------------------- deletion game


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
    assert torch.equal(plain["delete"], torch.zeros(3)) and list(plain) == list(LOSS_TERMS)  # reported, as zero
    torch.testing.assert_close(game["delete"], deletion_loss(deleted, targets))
    torch.testing.assert_close(game["total"], plain["total"] + 2.5 * game["delete"])
