"""``upsample_mask``'s backward on the CPU treats a batch of one-channel masks as the channels of one image (a faster
kernel of PyTorch's): the same values and gradients bit for bit as ``F.interpolate`` on the masks as they are, and so
the same masks of the `default` preset bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_images, make_tiny_cnn

import neuromask_pl.maths.mask as mask_module
import neuromask_pl.maths.optimize as optimize_module
from neuromask_pl import NeuroMask
from neuromask_pl.maths.mask import PlanewiseUpsampleBackward, upsample_mask

pytestmark = pytest.mark.numerics


def plain_upsample(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The reference: one ``F.interpolate`` call on the (B, 1, h, w) masks (the code before the change)."""
    if mask.shape[-2:] == (height, width):
        return mask
    return F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((1, 1, 5, 5), (16, 16)),
        ((2, 1, 32, 32), (64, 64)),
        ((4, 1, 16, 16), (32, 32)),
        ((5, 1, 31, 45), (97, 140)),
        ((8, 1, 32, 32), (64, 64)),
        ((17, 1, 5, 7), (16, 23)),
        ((3, 1, 32, 43), (224, 301)),
    ],
)
def test_planewise_backward_equals_one_interpolate_call(shape, size, dtype) -> None:
    """Values and gradients, for the masks as they are and as rows of a wider tensor (grid_logits' views)."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(*shape, generator=generator, dtype=dtype)
    upstream = torch.randn(shape[0], 1, *size, generator=generator, dtype=dtype)
    for source in (weights, torch.cat([weights.flatten(1), weights.flatten(1)], 1)[:, : weights[0].numel()]):
        source = source.view(shape)
        for function in (lambda m: PlanewiseUpsampleBackward.apply(m, *size), lambda m: upsample_mask(m, *size)):
            fast = source.clone().requires_grad_(True)
            reference = source.clone().requires_grad_(True)
            out_fast, out_reference = function(fast), plain_upsample(reference, *size)
            assert torch.equal(out_fast, out_reference)
            (grad_fast,) = torch.autograd.grad(out_fast, fast, upstream)
            (grad_reference,) = torch.autograd.grad(out_reference, reference, upstream)
            assert torch.equal(grad_fast, grad_reference)


@pytest.mark.parametrize(("size", "count"), [(16, 4), (37, 6)])
def test_default_masks_bit_identical_to_the_plain_upsampling(monkeypatch, size, count) -> None:
    """Whole `default` runs (two-scale mask, weights upsampled, a draw of the mask each step), float32."""
    net = make_tiny_cnn(0)
    images = make_images(count, size=size, seed=11)

    def masks() -> torch.Tensor:
        return NeuroMask(net, preset="default", steps=300, seed=0).explain(images, ids=torch.arange(count)).masks

    fast = masks()
    monkeypatch.setattr(mask_module, "upsample_mask", plain_upsample)  # grid_logits' coarse grid
    monkeypatch.setattr(optimize_module, "upsample_mask", plain_upsample)  # image_mask
    reference = masks()
    assert 0.01 < (reference > 0.5).float().mean() < 0.99  # masks that keep something and hide something
    assert torch.equal(fast, reference)
