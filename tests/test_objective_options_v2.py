"""Tests for the objective options of issue 6: temperature annealing and the tie-free returned map.

Values are checked against hand computations; per-sample independence is checked by explaining
images alone and in batches.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_masks_independent_of_the_batch, make_images

from neuromask_pl import NeuroMask
from neuromask_pl.maths.losses import settings_at, temperature_at
from neuromask_pl.maths.mask import tie_free_map
from neuromask_pl.settings import PRESETS, MaskSettings, resolve_settings

# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("temperature_start", -0.1, "temperature_start must be >= 0"),
        ("tie_break", -0.01, "tie_break must be in [0, 0.5)"),
        ("tie_break", 0.5, "tie_break must be in [0, 0.5)"),
    ],
)
def test_new_options_are_validated(field: str, value: float, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        MaskSettings(**{field: value})


def test_new_options_default_to_off_and_paper_is_unchanged() -> None:
    settings = MaskSettings()
    assert (settings.temperature_start, settings.tie_break) == (0.0, 0.0)
    paper = PRESETS["paper"]
    assert paper == MaskSettings()
    assert temperature_at(paper, 0) == paper.temperature and settings_at(paper, 5) is paper


def test_default_preset_anneals_and_breaks_ties() -> None:
    default = PRESETS["default"]
    assert (default.temperature_start, default.temperature) == (2.0, 0.01)
    assert (default.smooth_penalty, default.smooth_on) == ("tv", "mask")
    assert (default.baseline, default.mask_size) == ("black", 32)
    assert 0 < default.tie_break < 0.01


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


def test_annealed_temperature_reaches_the_mask_smoothness_term() -> None:
    """smooth_on='mask' uses the step's temperature: at step 0 the mask is sigmoid(w / temperature_start)."""
    from neuromask_pl.maths.losses import laplacian_kernel, loss_terms

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


# ----------------------------------------------------------------------------- tie-free map


def test_tie_free_map_by_hand_keeps_the_threshold() -> None:
    mask = torch.tensor([[[[1.0, 1.0, 0.0, 0.0, 0.7]]]])
    path = torch.tensor([[[[0.9, 0.6, 0.4, 0.1, 0.5]]]])
    out = tie_free_map(mask, path, 0.01)
    expected = [0.99 + 0.009, 0.99 + 0.006, 0.004, 0.001, 0.693 + 0.005]
    assert out.flatten().tolist() == pytest.approx(expected, abs=1e-7)
    assert torch.equal(out > 0.5, mask > 0.5)
    assert len(set(out.flatten().tolist())) == 5  # the two tied pairs are now ordered by the path
    assert tie_free_map(mask, path, 0.0) is mask


def _explain(net: torch.nn.Module, images: torch.Tensor, ids: list[int], **options: object) -> torch.Tensor:
    return NeuroMask(net, **options).explain(images, targets=1, ids=torch.tensor(ids)).masks


def test_tie_break_leaves_the_thresholded_mask_unchanged_and_stays_close(tiny_cnn: torch.nn.Module) -> None:
    images = make_images(2, size=16, seed=3)
    options = dict(preset="default", steps=12, seed=0)
    plain = _explain(tiny_cnn, images, [0, 1], **options, settings={"tie_break": 0.0})
    broken = _explain(tiny_cnn, images, [0, 1], **options, settings={"tie_break": 0.001})
    assert (broken - plain).abs().max() <= 0.001 + 1e-6
    saturated = (plain == 0) | (plain == 1)
    assert torch.equal((broken > 0.5)[saturated], (plain > 0.5)[saturated])
    for k in range(2):  # fewer ties than the plain mask
        assert broken[k].unique().numel() >= plain[k].unique().numel()


# ----------------------------------------------------------------------------- per-sample independence


@pytest.mark.parametrize(
    "options",
    [
        dict(preset="default", steps=15),
        dict(preset="paper", steps=10, settings=dict(temperature_start=1.5, tie_break=0.2)),
    ],
)
def test_masks_do_not_depend_on_the_batch(tiny_cnn: torch.nn.Module, options: dict) -> None:
    images = make_images(3, size=16, seed=5).double()
    assert_masks_independent_of_the_batch(tiny_cnn.double(), images, **options)


def test_new_options_reach_the_settings_through_the_constructor(tiny_cnn: torch.nn.Module) -> None:
    module = NeuroMask(tiny_cnn, preset="paper", settings={"temperature_start": 1.0, "tie_break": 0.05})
    assert (module.settings.temperature_start, module.settings.tie_break) == (1.0, 0.05)
    assert module.hparams["settings"]["temperature_start"] == 1.0 and module.hparams["settings"]["tie_break"] == 0.05
