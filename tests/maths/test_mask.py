"""neuromask_pl.maths.mask: the tie-free returned map and the two-scale weights, checked against hand computations."""

from __future__ import annotations

import pytest
import torch

from neuromask_pl.maths.mask import grid_logits, join_grids, tie_free_map

pytestmark = pytest.mark.numerics


def test_tie_free_map_by_hand_keeps_the_threshold() -> None:
    mask = torch.tensor([[[[1.0, 1.0, 0.0, 0.0, 0.7]]]])
    path = torch.tensor([[[[0.9, 0.6, 0.4, 0.1, 0.5]]]])
    out = tie_free_map(mask, path, 0.01)
    expected = [0.99 + 0.009, 0.99 + 0.006, 0.004, 0.001, 0.693 + 0.005]
    assert out.flatten().tolist() == pytest.approx(expected, abs=1e-7)
    assert torch.equal(out > 0.5, mask > 0.5)
    assert len(set(out.flatten().tolist())) == 5  # the two tied pairs are now ordered by the path
    assert tie_free_map(mask, path, 0.0) is mask


def test_pack_and_unpack_by_hand() -> None:
    fine = torch.arange(2 * 16, dtype=torch.float64).view(2, 1, 4, 4)
    coarse = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.5, 0.5], [0.5, 0.5]], dtype=torch.float64).view(2, 1, 2, 2)
    packed = join_grids(fine, coarse)
    assert packed.shape == (2, 1, 1, 20)
    logits, fine_back = grid_logits(packed, (4, 4), (2, 2))
    assert torch.equal(fine_back, fine)
    # bilinear (align_corners=False) 2x2 -> 4x4: the first row of sample 0's coarse part is 1, 0.5, -0.5, -1
    expected_row = torch.tensor([1.0, 0.5, -0.5, -1.0], dtype=torch.float64)
    torch.testing.assert_close(logits[0, 0, 0] - fine[0, 0, 0], expected_row)
    torch.testing.assert_close(logits[1] - fine[1], torch.full((1, 4, 4), 0.5, dtype=torch.float64))


def test_black_baseline_as_none_gives_the_same_masked_images_and_gradients() -> None:
    """``apply_mask(x, m, None)`` skips ``(1 - m) * 0``: the same values forward and backward (adding a zero)."""
    from neuromask_pl.maths.mask import apply_mask

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 8, 8, generator=generator)
    mask = torch.rand(2, 1, 8, 8, generator=generator)
    mask[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # saturated pixels too
    upstream = torch.randn(2, 3, 8, 8, generator=generator)
    outputs, grads = [], []
    for baseline in (torch.zeros_like(images), None):
        leaf = mask.clone().requires_grad_(True)
        out = apply_mask(images, leaf, baseline)
        outputs.append(out.detach())
        grads.append(torch.autograd.grad(out, leaf, upstream)[0])
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])


def test_noise_baseline_depends_on_seed_and_step_only() -> None:
    """The same pattern for every image of a step, whatever the batch; a new one per step and seed; each image's
    noise within its own value range (the pattern scaled to [min, max])."""
    from neuromask_pl.maths.mask import noise_baseline

    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 0.5, 2.0]).view(
        3, 1, 1, 1
    )
    batch = noise_baseline(images, seed=0, step=4)
    assert torch.equal(noise_baseline(images[1:2], seed=0, step=4), batch[1:2])
    pattern = (batch - images.amin((1, 2, 3), True)) / (images.amax((1, 2, 3), True) - images.amin((1, 2, 3), True))
    torch.testing.assert_close(pattern[0], pattern[2])  # one pattern, scaled per image
    assert bool(((batch >= images.amin((1, 2, 3), True)) & (batch <= images.amax((1, 2, 3), True))).all())
    assert not torch.equal(noise_baseline(images, seed=0, step=5), batch)
    assert not torch.equal(noise_baseline(images, seed=1, step=4), batch)
    assert torch.equal(noise_baseline(images, seed=0, step=4), batch)


def test_noise_is_not_a_fixed_baseline() -> None:
    from neuromask_pl.maths.mask import make_baseline

    with pytest.raises(ValueError, match="drawn anew every optimisation step"):
        make_baseline(torch.rand(1, 3, 8, 8), "noise")


def test_logistic_noise_depends_on_seed_and_step_only_and_is_logistic() -> None:
    """The sampled mask's draw: from (seed, step) alone, a new one per step and seed, and logistic: sigmoid(noise)
    is uniform, so its mean is 1/2 and its variance 1/12 (with 65,536 draws the standard error of the mean is
    sqrt(1/12 / 65536) = 0.0011; a tolerance of 0.01 is 9 of them), and noise has mean 0 (standard error
    sqrt(pi^2/3 / 65536) = 0.007; tolerance 0.05, 7 of them)."""
    from neuromask_pl.maths.mask import logistic_noise

    noise = logistic_noise(seed=0, step=3, shape=(256, 256))
    assert noise.shape == (1, 1, 256, 256) and bool(torch.isfinite(noise).all())
    assert torch.equal(logistic_noise(seed=0, step=3, shape=(256, 256)), noise)
    assert not torch.equal(logistic_noise(seed=0, step=4, shape=(256, 256)), noise)
    assert not torch.equal(logistic_noise(seed=1, step=3, shape=(256, 256)), noise)
    uniform = torch.sigmoid(noise.double())
    assert abs(float(uniform.mean()) - 0.5) < 0.01
    assert abs(float(uniform.var()) - 1 / 12) < 0.01
    assert abs(float(noise.mean())) < 0.05
