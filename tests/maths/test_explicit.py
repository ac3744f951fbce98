"""The explicit mask step (maths/explicit.py) against autograd through the generic step, and where it runs.

The comparisons run in float64 (classifier, images, weights, resize matrices). The generic step still computes
the prediction loss, total variation and the detail term in float32 (losses.py casts them, as under mixed
precision), so the two gradients differ by float32 rounding of those terms: each gradient entry is a sum of terms
carried through at most about ten float32 operations, so |difference| <= 10 * eps32 (1.2e-7) * (sum of absolute
terms), which is within 1e-5 of the gradient's largest entry for these inputs (no cancellation by orders of
magnitude: the weights are drawn uniformly, so the total-variation differences are far from 0). A wrong
derivative (a missing factor 1/T, a transposed resize, a sign) is off by order 1.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import make_images, make_tiny_cnn

from neuromask_pl import NeuroMask
from neuromask_pl.maths.explicit import MaskGrids, Resize, covers, uses_explicit_gradient
from neuromask_pl.maths.optimize import MaskOptimisation, learn_masks
from neuromask_pl.settings import PRESETS

pytestmark = pytest.mark.numerics

DEFAULT = PRESETS["default"]
VARIANTS = {
    "default": {},
    "no draws": {"sample_temperature": 0.0},
    "draws at t=0.5": {"sample_temperature": 0.5},
    "one grid": {"mask_coarse": 0, "l_detail": 0.0},
    "no detail term": {"l_detail": 0.0},
}


def float64_problem(settings, size: tuple[int, int], explicit: bool) -> MaskOptimisation:
    """A float64 MaskOptimisation of three images, its weights drawn uniformly in (-1, 1) from a fixed seed."""
    net = make_tiny_cnn(0).double()
    images = F.interpolate(make_images(3, size=16, seed=5).double(), size=size, mode="bilinear")
    targets = net(images).argmax(1)
    problem = MaskOptimisation(net, images, targets, torch.arange(3), settings, seed=0, explicit=explicit)
    generator = torch.Generator().manual_seed(2)
    problem.weights = (
        2 * torch.rand(problem.weights.shape, generator=generator, dtype=torch.float64) - 1
    ).requires_grad_()
    if explicit:
        height, width = size
        fine = problem.grids[0] if problem.grids else tuple(problem.weights.shape[-2:])
        coarse = problem.grids[1] if problem.grids else None
        problem.explicit_grids = MaskGrids.of(fine, coarse, (height, width), problem.weights)
    return problem


@pytest.mark.parametrize("size", [(64, 64), (48, 40), (32, 32)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_explicit_gradient_equals_autograd(variant: str, size: tuple[int, int]) -> None:
    settings = replace(DEFAULT, stop_patience=5, **VARIANTS[variant])  # stop_patience: the explicit step's terms too
    results = {}
    for explicit in (False, True):
        problem = float64_problem(settings, size, explicit)
        assert (problem.explicit_grids is not None) == explicit
        problem._step = 120  # an annealed temperature (about 0.25), mid-run
        results[explicit] = problem.loss_and_grad(None)
    (mask, terms, grad), (mask_f, terms_f, grad_f) = results[False], results[True]
    assert grad_f.dtype == grad.dtype == torch.float64 and grad_f.shape == grad.shape
    torch.testing.assert_close(grad_f, grad, rtol=0, atol=1e-5 * grad.abs().max().item())
    torch.testing.assert_close(mask_f, mask, rtol=0, atol=1e-12)  # float64 throughout: sigmoid of resized weights
    for name in terms:  # float32 terms in the generic step: float32 rounding of values of order 1-10
        torch.testing.assert_close(terms_f[name].double(), terms[name].double(), rtol=0, atol=1e-5, msg=name)


def test_explicit_gradient_of_the_running_rows_equals_autograd() -> None:
    """With some samples stopped, only the running rows get a gradient, as autograd's."""
    results = {}
    rows = torch.tensor([0, 2])
    for explicit in (False, True):
        problem = float64_problem(replace(DEFAULT, stop_patience=5), (64, 64), explicit)
        problem._step = 40
        results[explicit] = problem.loss_and_grad(rows)
    grad, grad_f = results[False][2], results[True][2]
    assert torch.equal(grad_f[1], torch.zeros_like(grad_f[1])) and grad_f[0].abs().max() > 0
    torch.testing.assert_close(grad_f, grad, rtol=0, atol=1e-5 * grad.abs().max().item())


@pytest.mark.parametrize(
    "sizes", [((16, 16), (32, 32)), ((32, 32), (64, 64)), ((32, 28), (224, 196)), ((17, 5), (50, 16))]
)
def test_resize_equals_bilinear_interpolation(sizes) -> None:
    """Matrix resizing against F.interpolate (float64: both are exact up to rounding, about 1e-16 per operation on
    values of order 1), and its adjoint against autograd's gradient of F.interpolate."""
    size_in, size_out = sizes
    planes = torch.rand(3, *size_in, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    resize = Resize.between(size_in, size_out, planes)
    reference = F.interpolate(planes.unsqueeze(1), size=size_out, mode="bilinear", align_corners=False).squeeze(1)
    torch.testing.assert_close(resize(planes.detach()), reference, rtol=0, atol=1e-12)
    upstream = torch.rand(3, *size_out, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (expected,) = torch.autograd.grad(reference, planes, upstream)
    torch.testing.assert_close(resize.adjoint(upstream), expected, rtol=0, atol=1e-12)
    assert Resize.between(size_in, size_in, planes) is None


class OneAtATime(torch.nn.Module):
    """A classifier run on each image of the batch separately: its own results cannot depend on the batch."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(image.unsqueeze(0)) for image in images])


def test_explicit_steps_do_not_depend_on_the_batch() -> None:
    """Float32, 25 explicit steps around a classifier that sees one image at a time: each sample's mask alone equals
    its mask in a batch of four, bit for bit (the resizes are one matrix product per plane; the rest is
    elementwise or reduced per sample)."""
    net = OneAtATime(make_tiny_cnn(0))
    images = make_images(4, size=32, seed=3)
    targets = net(images).argmax(1)
    settings = replace(DEFAULT, steps=25)
    batch = learn_masks(net, images, targets, torch.arange(4), settings, seed=0, explicit=True).masks
    for i in range(4):
        alone = learn_masks(
            net, images[i : i + 1], targets[i : i + 1], torch.arange(i, i + 1), settings, 0, explicit=True
        )
        assert torch.equal(alone.masks[0], batch[i]), i


def test_explicit_step_keeps_the_mask_arithmetic_in_float32_under_autocast() -> None:
    """Under bf16 autocast only the classifier runs in bf16: the mask and the resizes stay float32, so the mask
    equals the one without autocast bit for bit, and the gradient is float32."""
    net = make_tiny_cnn(0)
    images = make_images(2, size=32, seed=4)
    problem = MaskOptimisation(net, images, net(images).argmax(1), torch.arange(2), DEFAULT, seed=0, explicit=True)
    mask, _, grad = problem.loss_and_grad(None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask_bf16, _, grad_bf16 = problem.loss_and_grad(None)
    assert torch.equal(mask_bf16, mask) and grad_bf16.dtype == torch.float32
    assert (grad_bf16 - grad).abs().max() < 0.05 * grad.abs().max()  # bf16 keeps 8 bits: a few per cent


def test_which_settings_the_explicit_step_covers() -> None:
    assert covers(DEFAULT) and not covers(PRESETS["paper"])
    for change in (
        {"upsample_weights": False},
        {"smooth_penalty": "laplacian"},
        {"smooth_on": "weights"},
        {"sparsity_on": "area"},
        {"baseline": "blur"},
        {"l_delete": 1.0},
        {"jitter": 1},
    ):
        assert not covers(replace(DEFAULT, **change)), change


def test_the_report_says_how_the_mask_step_ran() -> None:
    net = make_tiny_cnn(0)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_explicit_gradient("auto", DEFAULT, cpu) and not uses_explicit_gradient("auto", DEFAULT, cuda)
    assert uses_explicit_gradient("explicit", DEFAULT, cuda) and not uses_explicit_gradient("autograd", DEFAULT, cpu)
    images = make_images(2, size=16)
    for options, ran in (
        ({}, "explicit"),
        ({"preset": "paper"}, "autograd"),
        ({"mask_gradient": "autograd"}, "autograd"),
    ):
        module = NeuroMask(net, steps=1, **options)
        module.explain(images)
        assert module.fast_path_report["mask_gradient"] == ran, options
