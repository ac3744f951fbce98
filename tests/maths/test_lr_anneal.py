"""The annealed learning rate (``MaskSettings.lr_end``): its schedule by hand and its use in the inner loop."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import make_images, make_tiny_cnn

from neuromask_pl.maths.losses import lr_at
from neuromask_pl.maths.optimize import MaskOptimisation
from neuromask_pl.settings import PRESETS, MaskSettings

pytestmark = pytest.mark.numerics


def test_lr_schedule_is_geometric_from_lr_to_lr_end() -> None:
    settings = MaskSettings(steps=5, lr=0.1, lr_end=0.001)
    # Step k of 5 (0-based): 0.1 * (0.001 / 0.1) ** (k / 4) = 0.1 * 10 ** (-k / 2).
    expected = [0.1 * 10 ** (-k / 2) for k in range(5)]
    assert [lr_at(settings, k) for k in range(5)] == pytest.approx(expected, rel=1e-12)
    assert lr_at(settings, 99) == pytest.approx(0.001, rel=1e-12)  # after the last step: lr_end
    assert lr_at(dataclasses.replace(settings, lr_end=0.0), 3) == 0.1  # 0 = fixed
    with pytest.raises(ValueError, match="lr_end must be >= 0"):
        MaskSettings(lr_end=-1.0)


def test_lr_hold_runs_the_first_share_of_the_steps_at_lr() -> None:
    settings = MaskSettings(steps=5, lr=0.1, lr_end=0.001, lr_hold=0.5)
    # Steps 0..2 (fractions 0, 0.25, 0.5) at lr; then (f - 0.5) / 0.5 of the way: 0.5 -> 10**-1, 1 -> 10**-2.
    assert [lr_at(settings, k) for k in range(5)] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.001], rel=1e-12)
    with pytest.raises(ValueError, match="lr_hold must be in"):
        MaskSettings(lr_end=0.001, lr_hold=1.0)


def test_the_loop_steps_with_the_annealed_learning_rate() -> None:
    """Adam's first step moves each weight by lr (times the sign of its gradient, up to eps): measure it."""
    torch.manual_seed(0)
    net = make_tiny_cnn(0).double()
    images = make_images(2, size=16, seed=3).double()
    targets = net(images).argmax(-1)
    settings = dataclasses.replace(PRESETS["default"], steps=4, lr=0.1, lr_end=0.001, mask_coarse=0, l_detail=0.0)
    with torch.enable_grad():
        run = MaskOptimisation(net.requires_grad_(False), images, targets, torch.arange(2), settings, seed=0)
        before = run.weights.detach().clone()
        run.step()
        first = (run.weights.detach() - before).abs()
        run.run()
    moved = first[first > 0]
    # Adam's first update is lr * g / (|g| + eps): lr up to eps / |g| = 1e-8 / |g| (float64 here); the steepest
    # weight's |g| is above 1e-3 here, so within 1e-5 of lr.
    assert moved.max().item() == pytest.approx(0.1, rel=1e-5)
    last = [group["lr"] for group in run.optimizer.param_groups]
    assert last == [pytest.approx(0.001, rel=1e-12)] and math.isclose(lr_at(settings, 3), 0.001, rel_tol=1e-12)
