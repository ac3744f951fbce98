"""Tests for neuromask_pl.settings and the TF1 RMSProp: every value checked against a hand computation."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch
from conftest import BLUR_AREA

from neuromask_pl.maths.losses import area_profile_loss, laplacian_kernel, laplacian_size, loss_terms
from neuromask_pl.maths.optimize import TFRMSprop
from neuromask_pl.settings import PRESETS, MaskSettings, resolve_settings

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


# ----------------------------------------------------------------------------- presets


def test_paper_preset_is_the_reference_configuration() -> None:
    paper = PRESETS["paper"]
    assert (paper.l_pred, paper.l_sparse, paper.l_smooth) == (0.4, 0.35, 0.03)
    assert (paper.temperature, paper.weight_limit, paper.steps, paper.lr) == (0.3, 10.0, 1000, 0.03)
    assert (paper.optimizer, paper.baseline, paper.sparsity_on) == ("rmsprop_tf", "black", "weights")
    assert (paper.mask_scale, paper.laplacian) == (1, 0)


def test_blur_area_preset_uses_low_resolution_blur_area_and_adam() -> None:
    default = resolve_settings("paper", None, BLUR_AREA)
    assert (default.mask_scale, default.baseline, default.sparsity_on, default.optimizer) == (8, "blur", "area", "adam")
    assert 0 < default.area_target < 1


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
    for name in ("pred", "sparse", "smooth", "total"):
        assert both[name][1].item() == pytest.approx(second[name][0].item(), rel=1e-12)


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


# ----------------------------------------------------------------------------- TF1 RMSProp


def test_tf_rmsprop_two_steps_match_the_tf1_formula() -> None:
    start, grads = [1.0, -2.0, 0.5], [[0.5, -3.0, 0.0], [-0.25, 1.0, 2.0]]
    lr, decay, eps = 0.1, 0.9, 1e-10
    param = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = TFRMSprop([param], lr=lr)
    expected, ms = list(start), [1.0, 1.0, 1.0]  # TF1 initialises the mean square to ones
    for grad in grads:
        param.grad = torch.tensor(grad, dtype=torch.float64)
        optimizer.step()
        for i, g in enumerate(grad):
            ms[i] = decay * ms[i] + (1 - decay) * g * g
            expected[i] -= lr * g / math.sqrt(ms[i] + eps)
        assert param.detach().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # Sanity check on the numbers themselves: first step of element 0 is 0.1 * 0.5 / sqrt(0.925).
    assert expected[0] != start[0]


def test_tf_rmsprop_epsilon_sits_inside_the_square_root() -> None:
    # With decay 0 the mean square is g^2; for g = 1e-6, sqrt(g^2 + 1e-10) ~ 1.005e-5, so the step is
    # ~0.0995 * lr (epsilon outside the root would give a step of ~lr).
    param = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = TFRMSprop([param], lr=1.0, decay=0.0)
    param.grad = torch.full((1,), 1e-6, dtype=torch.float64)
    optimizer.step()
    assert param.item() == pytest.approx(-1e-6 / math.sqrt(1e-12 + 1e-10), rel=1e-9)
    assert -0.1 < param.item() < -0.09


def test_tf_rmsprop_skips_parameters_without_gradient() -> None:
    used = torch.ones(2, requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    optimizer = TFRMSprop([used, unused], lr=0.5)
    used.grad = torch.ones(2)
    optimizer.step()
    assert torch.equal(unused.detach(), torch.ones(2))
    assert used.detach().tolist() == pytest.approx([1 - 0.5 / math.sqrt(1.0)] * 2)


# ----------------------------------------------------------------------------- settings


def test_resolve_settings_applies_overrides_and_ignores_none() -> None:
    settings = resolve_settings("paper", 7, {"lr": None, "laplacian": 5, "baseline": "mean"})
    paper = PRESETS["paper"]
    assert (settings.steps, settings.laplacian, settings.baseline) == (7, 5, "mean")
    for f in fields(MaskSettings):
        if f.name not in ("steps", "laplacian", "baseline"):
            assert getattr(settings, f.name) == getattr(paper, f.name), f.name
    assert PRESETS["paper"].steps == 1000  # the preset itself is untouched


def test_resolve_settings_errors() -> None:
    with pytest.raises(ValueError, match="unknown preset 'nope'.*paper"):
        resolve_settings("nope")
    with pytest.raises(ValueError, match=r"unknown mask settings \['stpes'\]"):
        resolve_settings("paper", None, {"stpes": 3})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        resolve_settings("default", None, {"temperature": 0.0})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"weight_limit": 0.0}, "weight_limit must be > 0"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"area_target": 0.0}, r"area_target must be in \(0, 1\]"),
        ({"area_target": 1.5}, r"area_target must be in \(0, 1\]"),
        ({"mask_scale": 0}, "mask_scale must be >= 1"),
        ({"l_sparse": -0.1}, "loss weights .* must be >= 0"),
        ({"laplacian": 4}, "laplacian must be 3, 5 or 0"),
        ({"laplacian_padding": "zeros"}, "laplacian_padding must be 'none' or 'replicate'"),
        ({"sparsity_on": "pixels"}, "sparsity_on must be one of"),
        ({"baseline": "white"}, "baseline must be one of"),
        ({"optimizer": "sgd"}, "optimizer must be one of"),
    ],
)
def test_mask_settings_validation(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MaskSettings(**changes)


def test_mask_settings_as_dict_round_trips() -> None:
    settings = resolve_settings("default", 11)
    assert MaskSettings(**settings.as_dict()) == settings
    assert settings.as_dict()["steps"] == 11


def test_total_variation_by_hand() -> None:
    from neuromask_pl.maths.losses import total_variation

    values = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]]])
    # vertical |2-0|,|2-1|,|2-3| -> mean 4/3; horizontal |1-0|,|3-1|,|2-2|,|2-2| -> mean 3/4
    assert total_variation(values).item() == pytest.approx(4 / 3 + 3 / 4)


def test_smooth_term_on_the_mask_uses_the_sigmoid() -> None:
    from neuromask_pl.maths.losses import laplacian_kernel, smooth_term, total_variation

    weights = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    settings = resolve_settings("paper", None, {"smooth_penalty": "tv", "smooth_on": "mask", "temperature": 0.5})
    expected = total_variation(torch.sigmoid(weights / 0.5))
    torch.testing.assert_close(smooth_term(weights, laplacian_kernel(3), settings), expected)


def test_jitter_shift_depends_on_seed_and_step_only() -> None:
    from neuromask_pl.maths.optimize import jitter_shift

    shifts = [jitter_shift(0, step, 2) for step in range(50)]
    assert shifts == [jitter_shift(0, step, 2) for step in range(50)]
    assert all(-2 <= dy <= 2 and -2 <= dx <= 2 for dy, dx in shifts) and len(set(shifts)) > 5
    assert jitter_shift(0, 3, 0) == (0, 0) and shifts != [jitter_shift(1, step, 2) for step in range(50)]
