"""The inner loop: learn one mask per image against a frozen classifier."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neuromask_pl.mask import (
    apply_mask,
    init_weights,
    make_baseline,
    mask_shape,
    sample_seed,
    tie_free_map,
    upsample_mask,
    weights_to_mask,
)
from neuromask_pl.objective import MaskSettings, laplacian_kernel, laplacian_size, loss_terms, settings_at


class TFRMSprop(torch.optim.Optimizer):
    """RMSProp exactly as TensorFlow 1's ``RMSPropOptimizer`` (the reference's optimiser).

    Unlike ``torch.optim.RMSprop``, the mean square starts at one and epsilon sits
    inside the square root: ``ms = d*ms + (1-d)*g^2; w -= lr * g / sqrt(ms + eps)``.
    """

    def __init__(self, params: Iterable[Tensor], lr: float = 0.001, decay: float = 0.9, eps: float = 1e-10) -> None:
        super().__init__(params, {"lr": lr, "decay": decay, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["ms"] = torch.ones_like(param)
                ms = state["ms"]
                ms.mul_(group["decay"]).addcmul_(param.grad, param.grad, value=1 - group["decay"])
                param.addcdiv_(param.grad, (ms + group["eps"]).sqrt(), value=-group["lr"])


def make_optimizer(params: list[Tensor], settings: MaskSettings) -> torch.optim.Optimizer:
    """The optimiser named by the settings; both are element-wise, so samples stay independent."""
    if settings.optimizer == "rmsprop_tf":
        return TFRMSprop(params, lr=settings.lr)
    return torch.optim.Adam(params, lr=settings.lr)


def jitter_shift(seed: int, step: int, jitter: int) -> tuple[int, int]:
    """The (dy, dx) shift of a step, in [-jitter, jitter]; from ``(seed, step)`` only, so the same for
    every image of the step and independent of the batch."""
    if jitter == 0:
        return (0, 0)
    generator = torch.Generator().manual_seed(sample_seed(seed, -1 - step))
    dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=generator).tolist()
    return (dy, dx)


@dataclass
class MaskFit:
    """Raw output of :func:`learn_masks` (tensors on the images' device)."""

    masks: Tensor
    logits_masked: Tensor
    loss: dict[str, Tensor]


def learn_masks(
    classifier: nn.Module,
    images: Tensor,
    targets: Tensor,
    ids: Tensor,
    settings: MaskSettings,
    seed: int,
) -> MaskFit:
    """Optimise one mask per image for ``settings.steps`` steps.

    The summed loss is minimised; since every term is per sample and the optimisers are
    element-wise, each mask follows exactly the path it would follow alone. The classifier
    must already be frozen (eval mode, no parameter gradients) by the caller.
    """
    height, width = images.shape[-2:]
    mask_height, mask_width = mask_shape(height, width, settings.scale_for(height, width))
    kernel = laplacian_kernel(laplacian_size(settings.laplacian, mask_height, mask_width)).to(images.device)
    baseline = make_baseline(images, settings.baseline)
    weights = init_weights(ids.cpu(), mask_height, mask_width, settings.weight_limit, seed).to(images.device)
    weights.requires_grad_(True)
    optimizer = make_optimizer([weights], settings)

    def evaluate(shift: tuple[int, int] = (0, 0), step: int | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        current = settings_at(settings, step)  # annealed temperature (the final one when step is None)
        mask = upsample_mask(weights_to_mask(weights, current.temperature), height, width)
        masked = apply_mask(images, mask, baseline)
        if shift != (0, 0):
            masked = torch.roll(masked, shifts=shift, dims=(-2, -1))
        logits = classifier(masked)
        return mask, logits, loss_terms(logits, targets, weights, mask, kernel, current)

    # Sum of the masks over the steps, for the tie-free map (tie_break > 0).
    path = torch.zeros(images.shape[0], 1, height, width, device=images.device) if settings.tie_break else None
    for step in range(settings.steps):
        step_mask, _, terms = evaluate(jitter_shift(seed, step, settings.jitter), step)
        (weights.grad,) = torch.autograd.grad(terms["total"].sum(), [weights])
        optimizer.step()
        if path is not None:
            path += step_mask.detach().float()

    with torch.no_grad():
        mask, logits, terms = evaluate()
        if path is not None:
            mask = tie_free_map(mask, path / settings.steps, settings.tie_break)
    return MaskFit(masks=mask.detach().float(), logits_masked=logits.detach().float(), loss=terms)
