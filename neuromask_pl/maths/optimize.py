"""The inner loop: learn one mask per image against a frozen classifier."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neuromask_pl.maths.explicit import MaskGrids, covers, explicit_mask_step
from neuromask_pl.maths.losses import laplacian_kernel, laplacian_size, loss_terms, lr_at, settings_at, temperature_at
from neuromask_pl.maths.mask import (
    JITTER_STREAM,
    apply_mask,
    blur_kernel_size,
    grid_logits,
    init_weights,
    join_grids,
    logistic_noise,
    make_baseline,
    mask_shape,
    noise_baseline,
    step_generator,
    tie_free_map,
    upsample_mask,
    weights_to_mask,
)
from neuromask_pl.settings import MaskSettings


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


class LeanAdam(torch.optim.Optimizer):
    """``torch.optim.Adam``'s per-tensor step (no weight decay, AMSGrad or maximize), the same float operations
    in the same order, so the same weights bit for bit, without its per-step bookkeeping: about 20 us instead of
    55 us for a mask's weights on the CPU (1 thread), where a mask step around a small classifier takes 1 ms."""

    def __init__(
        self, params: Iterable[Tensor], lr: float = 0.001, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            (beta1, beta2), lr = group["betas"], group["lr"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:  # Adam keeps its step count as a float32 tensor: exact integers to 2**24 steps
                    state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                state["step"] += 1
                step, exp_avg, exp_avg_sq = float(state["step"]), state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(param.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
                param.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1**step)))


def single_kernel_adam(device: torch.device) -> bool:
    """Whether Adam runs as torch's single-kernel implementation (``fused=True``): on CUDA."""
    return device.type == "cuda"


def make_optimizer(params: list[Tensor], settings: MaskSettings) -> torch.optim.Optimizer:
    """The optimiser named by the settings; both are element-wise, so samples stay independent. Adam runs as one
    kernel on CUDA, otherwise as :class:`LeanAdam` (torch's per-tensor Adam, bit for bit, with less bookkeeping)."""
    if settings.optimizer == "rmsprop_tf":
        return TFRMSprop(params, lr=settings.lr)
    if single_kernel_adam(params[0].device):
        return torch.optim.Adam(params, lr=settings.lr, fused=True)
    return LeanAdam(params, lr=settings.lr)


def masked_batch(
    weights: Tensor,
    images: Tensor,
    baseline: Tensor | None,
    grids: tuple[tuple[int, int], tuple[int, int]] | None,
    temperature: float,
    upsample_weights: bool,
    deleting: bool,
    sample: tuple[Tensor, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The mask arithmetic before the classifier: ``(mask, masked images, logits, fine)``.

    With ``sample = (noise, t)`` the classifier sees a draw of the mask instead of the mask itself (binary
    concrete): ``sigmoid((w / T + noise) / t)``, ``noise`` logistic at the weights' grid (see
    :func:`~neuromask_pl.maths.mask.logistic_noise`); the returned mask stays ``sigmoid(w / T)``.

    ``weights`` are the learned weights (two-scale ones joined, with ``grids`` their (fine, coarse) shapes);
    ``logits`` are the weights the mask is the sigmoid of (for a two-scale mask, fine plus upsampled coarse) and
    ``fine`` the fine grid (None for one grid); the mask is at the images' size; with ``deleting`` the masked
    images are followed by the images with the mask's region hidden (the deletion game); ``baseline`` None is
    black (see :func:`~neuromask_pl.maths.mask.apply_mask`).
    """
    height, width = images.shape[-2:]
    fine = None
    if grids is not None:
        weights, fine = grid_logits(weights, *grids)
    size = (height, width)
    mask = image_mask(weights, temperature, upsample_weights, *size)
    seen = mask  # what the classifier sees: the mask, or a draw of it (binary concrete)
    if sample is not None:  # sigmoid((w / T + noise) / t) = sigmoid((w + T noise) / (T t))
        noise, sample_temperature = sample
        seen = image_mask(weights + temperature * noise, temperature * sample_temperature, upsample_weights, *size)
    masked = apply_mask(images, seen, baseline)
    if deleting:  # in the same forward pass as the masked images
        masked = torch.cat([masked, apply_mask(images, 1 - seen, baseline)])
    return mask, masked, weights, fine


def image_mask(weights: Tensor, temperature: float, upsample_weights: bool, height: int, width: int) -> Tensor:
    """``sigmoid(w / T)`` at the image's size: the weights upsampled before the sigmoid, or the mask after it."""
    if upsample_weights:
        return weights_to_mask(upsample_mask(weights, height, width), temperature)
    return upsample_mask(weights_to_mask(weights, temperature), height, width)


def jitter_shift(seed: int, step: int, jitter: int) -> tuple[int, int]:
    """The (dy, dx) shift of a step, in [-jitter, jitter]; from ``(seed, step)`` only, so the same for
    every image of the step and independent of the batch."""
    if jitter == 0:
        return (0, 0)
    dy, dx = torch.randint(-jitter, jitter + 1, (2,), generator=step_generator(seed, JITTER_STREAM, step)).tolist()
    return (dy, dx)


def update_patience(loss: Tensor, best: Tensor, stale: Tensor, tolerance: float) -> tuple[Tensor, Tensor]:
    """Per-sample early-stopping bookkeeping: the best loss so far and the steps since it improved
    by more than ``tolerance`` (relative to its size)."""
    threshold = torch.where(torch.isfinite(best), best - tolerance * best.abs(), best)
    improved = loss < threshold
    return torch.where(improved, loss, best), torch.where(improved, torch.zeros_like(stale), stale + 1)


def running_rows(active: Tensor, power_of_two: bool = False) -> Tensor:
    """The batch rows a step runs: the active samples. With ``power_of_two`` they are topped up with stopped
    samples to the next power of two (at most the batch), so that the classifier sees at most log2(batch) + 2
    batch sizes: CUDA graphs record one graph per batch size (each recording costs time and memory)."""
    rows = active.nonzero()[:, 0]
    if not power_of_two or rows.numel() == 0:
        return rows
    size = min(len(active), 1 << (rows.numel() - 1).bit_length())
    padding = (~active).nonzero()[:, 0][: size - rows.numel()]
    return torch.cat([rows, padding]).sort().values


class SampleLossScale:
    """Dynamic loss scaling per sample, for float16 autocast (as ``torch.amp.GradScaler``, but one
    scale per image, so an overflow in one image never skips or changes another image's step).

    A sample whose gradient is not finite skips its step and halves its scale; every
    ``growth_interval`` finite steps in a row double it.
    """

    def __init__(self, batch: int, device: torch.device, init: float = 2.0**16, growth_interval: int = 200) -> None:
        self.scale = torch.full((batch,), init, device=device)
        self.good_steps = torch.zeros(batch, dtype=torch.long, device=device)
        self.growth_interval = growth_interval

    def unscale(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        """(gradient divided by each sample's scale, per-sample finite flag); updates the scales."""
        shape = (-1,) + (1,) * (grad.ndim - 1)
        grad = grad / self.scale.view(shape)
        finite = torch.isfinite(grad.flatten(1)).all(1)
        self.good_steps = torch.where(finite, self.good_steps + 1, torch.zeros_like(self.good_steps))
        grow = self.good_steps >= self.growth_interval
        self.scale = torch.where(finite, torch.where(grow, self.scale * 2, self.scale), self.scale / 2)
        self.good_steps = torch.where(grow, torch.zeros_like(self.good_steps), self.good_steps)
        return torch.where(finite.view(shape), grad, torch.zeros_like(grad)), finite


def autocast_float16(device: torch.device) -> bool:
    """Whether float16 autocast is active for ``device`` (then mask gradients need loss scaling)."""
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16


@dataclass
class MaskFit:
    """Raw output of :func:`learn_masks` (tensors on the images' device); ``steps`` per sample."""

    masks: Tensor
    logits_masked: Tensor
    loss: dict[str, Tensor]
    steps: Tensor


class MaskOptimisation:
    """The masks of one batch being learned: :meth:`step` once per optimisation step, then :meth:`result`.

    The summed loss is minimised; since every term is per sample and the optimisers are element-wise,
    each mask follows exactly the path it would follow alone. Samples that early stopping has stopped
    leave the forward passes and keep their weights; with ``few_batch_sizes`` (for CUDA graphs) the rows
    that run are topped up to a power of two, see :func:`running_rows`. With ``explicit`` (see
    :func:`~neuromask_pl.maths.explicit.uses_explicit_gradient`), steps whose settings it
    :func:`~neuromask_pl.maths.explicit.covers` compute their gradient by
    :func:`~neuromask_pl.maths.explicit.explicit_mask_step` (the same maths, half the kernels), except under float16
    loss scaling. The classifier must
    already be frozen (eval mode, no parameter gradients) by the caller; it may be a fast copy (see
    :mod:`neuromask_pl.fastcopy`).
    """

    def __init__(
        self,
        classifier: nn.Module,
        images: Tensor,
        targets: Tensor,
        ids: Tensor,
        settings: MaskSettings,
        seed: int,
        few_batch_sizes: bool = False,
        explicit: bool = False,
    ) -> None:
        self.classifier, self.images, self.targets = classifier, images, targets
        self.settings, self.seed, self.few_batch_sizes = settings, seed, few_batch_sizes
        height, width = images.shape[-2:]
        mask_height, mask_width = mask_shape(height, width, settings.scale_for(height, width))
        self.kernel = laplacian_kernel(laplacian_size(settings.laplacian, mask_height, mask_width)).to(images.device)
        if settings.baseline == "blur" and blur_kernel_size(height, width) < 3:
            raise ValueError(
                f"images of {height}x{width} pixels are too small for the blur baseline (the blurred copy would be "
                "the image itself, so no mask could hide anything); use baseline='black' or 'mean'"
            )
        noise = settings.baseline == "noise"  # drawn per step in evaluate()
        self.baseline = make_baseline(images, "black" if noise else settings.baseline)
        self._hiding = None if settings.baseline in ("black", "noise") else self.baseline  # None: no zeros added
        weights = init_weights(ids.cpu(), mask_height, mask_width, settings.weight_limit, seed).to(images.device)
        self.grids: tuple[tuple[int, int], tuple[int, int]] | None = None  # two-scale: (fine, coarse) shapes
        if settings.mask_coarse:  # one joined tensor, so the step below treats both grids alike
            coarse = mask_shape(height, width, settings.coarse_scale_for(height, width))
            self.grids = ((mask_height, mask_width), coarse)
            weights = join_grids(weights, weights.new_zeros(len(ids), 1, *coarse))
        self.weights = weights.requires_grad_(True)
        self.explicit_grids = None  # the resizes of the explicit step, when it runs
        if explicit and covers(settings):  # never for settings it does not cover (other maths)
            coarse = self.grids[1] if self.grids is not None else None
            self.explicit_grids = MaskGrids.of((mask_height, mask_width), coarse, (height, width), weights)
        self.optimizer = make_optimizer([self.weights], settings)
        batch = images.shape[0]
        self.steps_run = torch.zeros(batch, dtype=torch.long, device=images.device)
        self.active = torch.ones(batch, dtype=torch.bool, device=images.device)
        self.best = torch.full((batch,), float("inf"), device=images.device)
        self.stale = torch.zeros(batch, dtype=torch.long, device=images.device)
        self.loss_scale: SampleLossScale | None = None  # made at the first step run under float16 autocast
        self.path = torch.zeros(batch, 1, height, width, device=images.device) if settings.tie_break else None
        self.last_temperature = torch.full((batch,), settings.temperature, device=images.device)
        self._step = 0
        self._all_active = True  # host-side flag: no indexing while every sample still runs

    def evaluate(
        self,
        rows: Tensor | None = None,
        shift: tuple[int, int] = (0, 0),
        step: int | None = None,
        weights: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Mask, logits of the masked image and loss terms for the samples ``rows`` (None = all), at the
        temperature of optimisation step ``step`` (None = the final temperature), of ``weights``
        (default: the weights being learned)."""
        images, baseline, targets = self.images, self._hiding, self.targets
        weights = self.weights if weights is None else weights
        if rows is not None:
            images, targets, weights = images[rows], targets[rows], weights[rows]
            baseline = baseline[rows] if baseline is not None else None
        if self.settings.baseline == "noise":  # after the last step (step None): one more draw
            baseline = noise_baseline(images, self.seed, self.settings.steps if step is None else step)
        current = settings_at(self.settings, step)
        deleting = current.l_delete > 0
        noise = self.draw(step)
        sample = (noise, self.settings.sample_temperature) if noise is not None else None
        mask, masked, weights, fine = masked_batch(
            weights, images, baseline, self.grids, current.temperature, current.upsample_weights, deleting, sample
        )
        if shift != (0, 0):
            masked = torch.roll(masked, shifts=shift, dims=(-2, -1))
        logits = self.classifier(masked)
        logits, logits_deleted = logits.chunk(2) if deleting else (logits, None)
        terms = loss_terms(logits, targets, weights, mask, self.kernel, current, fine, logits_deleted)
        return mask, logits, terms

    def draw(self, step: int | None) -> Tensor | None:
        """The logistic noise of step ``step`` at the (fine) weights' grid, or None without sampled masks (and
        after the last step)."""
        if not self.settings.sample_temperature or step is None:
            return None
        grid = self.grids[0] if self.grids is not None else tuple(self.weights.shape[-2:])
        return logistic_noise(self.seed, step, grid).to(self.images.device, self.weights.dtype)

    def loss_and_grad(self, rows: Tensor | None) -> tuple[Tensor, dict[str, Tensor] | None, Tensor]:
        """The mask, loss terms and gradient (of the summed, loss-scaled total, for all weights) of this step for
        the samples ``rows`` (None = all): explicit where it runs (the terms only with early stopping, which reads
        them), else by autograd."""
        if self.explicit_grids is not None and self.loss_scale is None:  # float16 loss scaling: autograd
            images, targets, weights = self.images, self.targets, self.weights
            if rows is not None:
                images, targets, weights = images[rows], targets[rows], weights[rows]
            temperature = temperature_at(self.settings, self._step)
            mask, terms, grad = explicit_mask_step(
                self.classifier, images, targets, weights, self.explicit_grids, self.settings, temperature,
                self.draw(self._step), with_terms=bool(self.settings.stop_patience),
            )  # fmt: skip
            if rows is not None:
                grad = torch.zeros_like(self.weights).index_copy_(0, rows, grad)
            return mask, terms, grad
        mask, _, terms = self.evaluate(rows, jitter_shift(self.seed, self._step, self.settings.jitter), self._step)
        total = terms["total"]
        if self.loss_scale is not None:
            total = total * (self.loss_scale.scale if rows is None else self.loss_scale.scale[rows])
        (grad,) = torch.autograd.grad(total.sum(), [self.weights])
        return mask, terms, grad

    def step(self) -> None:
        """One optimisation step of every sample still running."""
        settings = self.settings
        rows = None if self._all_active else running_rows(self.active, self.few_batch_sizes)
        if rows is not None and rows.numel() == 0:
            return
        if rows is not None and rows.numel() == len(self.images):  # topped up to the whole batch
            rows = None
        if self.images.is_cuda:  # a new iteration for CUDA graphs (compile=True): earlier outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        if self.loss_scale is None and autocast_float16(self.images.device):
            self.loss_scale = SampleLossScale(len(self.images), self.images.device)
        mask, terms, grad = self.loss_and_grad(rows)
        if self.path is not None:  # the masks summed over each sample's (active) steps, for the tie-free map
            contribution = mask.detach().float()
            if not self._all_active:  # rows topped up with stopped samples: their paths stay as they are
                running = self.active if rows is None else self.active[rows]
                contribution = contribution * running.view(-1, 1, 1, 1)
            if rows is None:
                self.path += contribution
            else:
                self.path[rows] += contribution
        step_rows = self.active
        if self.loss_scale is not None:
            grad, finite = self.loss_scale.unscale(grad)
            step_rows = step_rows & finite
        self.weights.grad = grad
        # Only when some sample may have to sit this step out (no host sync otherwise).
        keep = None if self._all_active and self.loss_scale is None else self.weights.detach().clone()
        if settings.lr_end:  # the annealed learning rate of this step
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(settings, self._step)
        self.optimizer.step()
        if keep is not None:  # samples that stopped (or overflowed) keep their weights
            with torch.no_grad():
                self.weights.copy_(torch.where(step_rows.view(-1, 1, 1, 1), self.weights, keep))
        self.steps_run += self.active.long()
        if settings.stop_patience and settings.temperature_start:  # the temperature each sample last ran at
            temperature = temperature_at(settings, self._step)
            self.last_temperature.masked_fill_(self.active, temperature)
        self._step += 1
        if settings.stop_patience:
            self._update_stopping(terms["total"].detach().float(), rows)

    def _update_stopping(self, loss: Tensor, rows: Tensor | None) -> None:
        full = self.best.clone()
        full[rows if rows is not None else slice(None)] = loss
        best, stale = update_patience(full, self.best, self.stale, self.settings.stop_tolerance)
        self.best = torch.where(self.active, best, self.best)
        self.stale = torch.where(self.active, stale, self.stale)
        self.active = self.active & (self.stale < self.settings.stop_patience)
        self._all_active = bool(self.active.all())
        if not self.active.any():
            self._step = self.settings.steps

    def run(self, on_step: Callable[[int, int], None] | None = None) -> MaskOptimisation:
        """Step until every sample has run its steps or stopped; ``on_step(step, steps)`` after each step (for
        progress reports: it is given the two counts only, so the masks are the same with or without it)."""
        while self._step < self.settings.steps:
            self.step()
            if on_step is not None:
                on_step(self._step, self.settings.steps)
        return self

    def result(self) -> MaskFit:
        """Final masks, logits of the soft-masked images and loss terms (no gradient)."""
        with torch.no_grad():
            # A sample that stopped early while the temperature was still being annealed keeps the temperature
            # it last ran at: sigmoid(w / T_i) = sigmoid((w * T / T_i) / T), with T the final temperature.
            weights = self.weights * (self.settings.temperature / self.last_temperature).view(-1, 1, 1, 1)
            mask, logits, terms = self.evaluate(weights=weights)
            if self.path is not None:
                path_mean = self.path / self.steps_run.clamp_min(1).view(-1, 1, 1, 1)
                mask = tie_free_map(mask, path_mean, self.settings.tie_break)
        return MaskFit(
            masks=mask.detach().float().clone(),
            logits_masked=logits.detach().float().clone(),
            loss={k: v.detach().float().clone() for k, v in terms.items()},
            steps=self.steps_run.clone(),
        )


def learn_masks(
    classifier: nn.Module,
    images: Tensor,
    targets: Tensor,
    ids: Tensor,
    settings: MaskSettings,
    seed: int,
    few_batch_sizes: bool = False,
    explicit: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> MaskFit:
    """Optimise one mask per image for ``settings.steps`` steps (fewer for samples that stop early); ``on_step(step,
    steps)`` is called after each step (:meth:`MaskOptimisation.run`)."""
    optimisation = MaskOptimisation(classifier, images, targets, ids, settings, seed, few_batch_sizes, explicit)
    return optimisation.run(on_step).result()
