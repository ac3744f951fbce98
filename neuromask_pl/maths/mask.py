"""Mask parameterisation: per-sample initialisation, temperature sigmoid, baselines."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur


def sample_seed(seed: int, sample_id: int) -> int:
    """A 63-bit seed derived from ``(seed, sample_id)`` alone, never from batch position."""
    digest = hashlib.blake2b(f"neuromask:{int(seed)}:{int(sample_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_weights(ids: Tensor, height: int, width: int, weight_limit: float, seed: int) -> Tensor:
    """Mask weights uniform in (-W, W), shape (B, 1, H, W) on the CPU, one generator per sample id."""
    out = torch.empty(len(ids), 1, height, width)
    generator = torch.Generator()
    for row, sample_id in enumerate(ids.tolist()):
        generator.manual_seed(sample_seed(seed, sample_id))
        out[row].uniform_(-weight_limit, weight_limit, generator=generator)
    return out


def join_grids(fine: Tensor, coarse: Tensor) -> Tensor:
    """Fine (B, 1, h, w) and coarse (B, 1, hc, wc) weights of a two-scale mask as one (B, 1, 1, n) tensor."""
    return torch.cat([fine.flatten(1), coarse.flatten(1)], dim=1).view(fine.shape[0], 1, 1, -1)


def split_grids(joined: Tensor, fine_shape: tuple[int, int], coarse_shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The fine (B, 1, h, w) and coarse (B, 1, hc, wc) grids of :func:`join_grids`' tensor, as views of it."""
    flat = joined.flatten(1)
    cut = fine_shape[0] * fine_shape[1]
    return flat[:, :cut].view(-1, 1, *fine_shape), flat[:, cut:].view(-1, 1, *coarse_shape)


def grid_logits(joined: Tensor, fine_shape: tuple[int, int], coarse_shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``(logits, fine)`` of :func:`join_grids`' tensor, where ``logits = up(coarse) + fine`` (bilinear), per sample."""
    fine, coarse = split_grids(joined, fine_shape, coarse_shape)
    return fine + upsample_mask(coarse, *fine_shape), fine


def weights_to_mask(weights: Tensor, temperature: float) -> Tensor:
    """``sigmoid(w / T)``: 1 keeps a pixel, 0 hides it."""
    return torch.sigmoid(weights / temperature)


def tie_free_map(mask: Tensor, path_mean: Tensor, weight: float) -> Tensor:
    """``(1 - weight) * mask + weight * path_mean``: the mask with ties broken by the optimisation path.

    ``path_mean`` is the mask averaged over the optimisation steps (image resolution): a pixel the
    shrinking mask dropped late ranks above one it dropped early, as variables leave a lasso path.
    With ``weight < 0.5`` a saturated pixel (exactly 0 or 1) stays on its side of 0.5, so the
    thresholded mask is unchanged; ``weight == 0`` returns the mask itself.
    """
    if weight <= 0:
        return mask
    return (1.0 - weight) * mask + weight * path_mean


def mask_shape(height: int, width: int, scale: int, minimum: int = 5) -> tuple[int, int]:
    """Size of the learned weights: the image's size divided by ``scale`` (rounded up),
    but at least ``minimum`` pixels a side (or the image's own size) so small images still get a mask."""
    return tuple(max(-(-side // scale), min(side, minimum)) for side in (height, width))  # type: ignore[return-value]


def upsample_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """Bring a low-resolution mask to the image's size (bilinear); a no-op at full size.

    From :data:`PLANEWISE_BACKWARD_MIN` masks on, on the CPU, the gradient goes through
    :class:`PlanewiseUpsampleBackward`: the same values bit for bit, faster.
    """
    if mask.shape[-2:] == (height, width):
        return mask
    planes = mask.shape[0] * mask.shape[1]
    if mask.device.type == "cpu" and planes >= PLANEWISE_BACKWARD_MIN and torch.is_grad_enabled():
        return PlanewiseUpsampleBackward.apply(mask, height, width)
    return F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)


#: Masks per call from which :class:`PlanewiseUpsampleBackward` pays for its Python overhead (about 25 us per call):
#: a default mask step (1 thread, 64 px) measured 0.94x at batch 4, 0.86x at 8 and 0.80x at 16, unchanged at 2.
PLANEWISE_BACKWARD_MIN = 4


class PlanewiseUpsampleBackward(torch.autograd.Function):
    """Bilinear upsampling (``align_corners=False``) whose backward treats the masks as the channels of one image.

    For a (B, 1, H, W) gradient, which is channels-last contiguous too, PyTorch's CPU backward takes its channels-last
    kernel; for the same gradient viewed as (1, B, H, W) it takes the generic one. Both add
    ``(h_lambda * w_lambda) * grad`` into each input cell over the output pixels in the same order, so the gradients
    are the same bit for bit (tests/maths/test_upsample_planes.py), and the generic kernel takes about 17 us a plane
    instead of 40 (32 -> 64 cells, 1 thread). The forward is the ordinary call: viewed as channels, its kernel would
    vectorise across the masks and round differently from 8 masks on.
    """

    @staticmethod
    def forward(ctx, mask: Tensor, height: int, width: int) -> Tensor:  # type: ignore[override]
        ctx.input_shape = mask.shape
        return F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        batch, channels, height, width = ctx.input_shape
        planes = grad.reshape(1, batch * channels, *grad.shape[-2:])
        grad_planes = torch.ops.aten.upsample_bilinear2d_backward(
            planes, list(grad.shape[-2:]), [1, batch * channels, height, width], False
        )
        return grad_planes.view(ctx.input_shape), None, None


def blur_kernel_size(height: int, width: int) -> int:
    """Side of the blur baseline's Gaussian kernel: odd, about 4 sigma (sigma = longer side / 20), no wider
    than reflection padding allows; 1 (no blur at all) for images under 10 pixels a side."""
    sigma = max(height, width) / 20.0
    return max(1, min(2 * int(2 * sigma) + 1, 2 * (min(height, width) // 2) - 1))


def make_baseline(images: Tensor, kind: str) -> Tensor:
    """What hidden pixels become: black (zeros), each image's mean colour, or a blurred copy."""
    if kind == "black":
        return torch.zeros_like(images)
    if kind == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if kind == "blur":
        sigma = max(images.shape[-2:]) / 20.0
        size = blur_kernel_size(*images.shape[-2:])
        return gaussian_blur(images, kernel_size=[size, size], sigma=[sigma, sigma])
    if kind == "noise":
        raise ValueError(
            "the noise baseline is drawn anew every optimisation step (noise_baseline); choose black, mean or blur here"
        )
    raise ValueError(f"unknown baseline {kind!r}; choose black, mean or blur")


#: Offsets of the per-step random streams (see :func:`step_generator`), apart from the initial weights' (sample
#: ids >= 0) and from each other: the jitter's shifts, the noise baseline and the sampled masks' draws.
JITTER_STREAM, NOISE_STREAM, SAMPLE_STREAM = -1, -(10**9), -(2 * 10**9)


def step_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, stream, step)`` only: the same draw for every image of a step, whatever
    the batch, the path or the device."""
    return torch.Generator().manual_seed(sample_seed(seed, stream - step))


def noise_baseline(images: Tensor, seed: int, step: int) -> Tensor:
    """Uniform noise over each image's value range, the same pattern for every image of step ``step`` (drawn from
    ``(seed, step)`` only, so independent of the batch) and a new one each step."""
    pattern = torch.rand((1, *images.shape[1:]), generator=step_generator(seed, NOISE_STREAM, step))
    pattern = pattern.to(images.device, images.dtype)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    return low + (images.amax(dim=(1, 2, 3), keepdim=True) - low) * pattern


def logistic_noise(seed: int, step: int, shape: tuple[int, int]) -> Tensor:
    """Logistic noise ``logit(u) = log(u / (1 - u))`` (u uniform, clamped to [1e-6, 1 - 1e-6]) of shape
    (1, 1, h, w) on the CPU: the draw of step ``step`` of a sampled mask, from ``(seed, step)`` only, so the same for
    every image of the step."""
    return torch.rand((1, 1, *shape), generator=step_generator(seed, SAMPLE_STREAM, step)).logit_(1e-6)


def apply_mask(images: Tensor, mask: Tensor, baseline: Tensor | None) -> Tensor:
    """``x * m + (1 - m) * baseline``; the one-channel mask broadcasts over the image's channels.

    ``baseline=None`` is the black baseline without its zeros: ``x * m``, the same values (``(1 - m) * 0`` adds
    zero) for two kernels forward and backward instead of four.
    """
    if baseline is None:
        return images * mask
    return images * mask + (1.0 - mask) * baseline
