"""NeuroMask as a LightningModule: a frozen classifier and an inner mask optimisation per batch."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from neuromask_pl.data.batch import unpack_batch
from neuromask_pl.data.checks import (
    check_images,
    check_images_fit,
    check_logits,
    check_target_class,
    device_of,
    frozen,
    integral_ids,
)
from neuromask_pl.explanation import Explanation
from neuromask_pl.maths.fastpath import FastPath, FastPathCache
from neuromask_pl.maths.fused import fuses
from neuromask_pl.maths.optimize import MaskFit, learn_masks
from neuromask_pl.metrics import explanation_metrics, update_explanation_metrics
from neuromask_pl.settings import MaskSettings, SettingsOverrides, resolve_settings

log = logging.getLogger(__name__)

INFERENCE_MODE_MESSAGE = (
    "NeuroMask learns masks by gradient descent, which is impossible under torch.inference_mode. "
    "Build the Trainer with inference_mode=False, e.g. pl.Trainer(inference_mode=False), "
    "and do not call explain() inside a torch.inference_mode() block."
)


DIVERGED = (
    "the mask optimisation diverged (NaN or inf in the mask or loss); lower the learning rate (settings lr) "
    "or check the classifier on masked images"
)


class TargetOutOfRange(ValueError):
    """A target class the classifier does not have; ``position`` is the sample's place in its batch."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


class NeuroMask(pl.LightningModule):
    """Explain a classifier's predictions by learning one mask per image.

    Args:
        classifier: the model to explain; takes [0, 1] images B x C x H x W, returns logits B x K.
            It is frozen while explaining and restored exactly afterwards.
        preset: named settings, one of ``neuromask_pl.PRESETS``: ``default``, ``paper`` (the reference
            implementation) or ``paper_cifar``.
        steps: optimisation steps per image (overrides the preset's and ``settings``').
        settings: fields of :class:`~neuromask_pl.settings.MaskSettings` that override the preset
            (a dict such as ``{"lr": 0.05}`` or a ``SettingsOverrides``), or a complete ``MaskSettings``
            used as it is; ``stop_patience`` turns on per-sample early stopping.
        seed: masks start from noise derived from ``(seed, sample id)``.
        target_class: explain this class for every image; by default the batch's labels
            when present, else the classifier's predicted class.
        fast_path: how the frozen classifier runs during the mask steps (a fast copy; the classifier
            itself is untouched): a :class:`~neuromask_pl.maths.fastpath.FastPath` or a dict of its fields.
            By default BatchNorm is folded and, on the CPU, convolutions packed.

    Batches that run out of memory (GPU or CPU) are split in halves (results do not depend on the batch) and
    later batches are learned in chunks of the size that fitted.
    """

    def __init__(
        self,
        classifier: nn.Module,
        preset: str = "default",
        steps: int | None = None,
        settings: SettingsOverrides | None = None,
        seed: int = 0,
        target_class: int | None = None,
        fast_path: FastPath | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
        self.classifier = classifier
        # The classifier is the user's (a reference): never part of this module's state_dict, so a host module
        # holding a NeuroMask saves and strictly loads the same checkpoints as without it.
        self._state_prefix = ""  # where this module sits in the state_dict being loaded
        self._register_state_dict_hook(_drop_classifier_state)
        self._register_load_state_dict_pre_hook(_note_state_prefix, with_module=True)
        self.register_load_state_dict_post_hook(_ignore_missing_classifier_state)
        self.settings: MaskSettings = resolve_settings(preset, steps, settings)
        self.fast_path = FastPath.of(fast_path)
        self._fast_copies = FastPathCache(self.fast_path)
        self.max_chunk: int | None = None  # set when a batch ran out of memory
        check_target_class(target_class)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        self.seed = seed
        self.target_class = target_class
        self._next_id = 0  # ids for batches that carry none (reset at each predict/test start)
        self.test_metrics = explanation_metrics(classifier, localisation=True, prefix="test/")
        # Saved resolved, so logs and run records show the values actually used, in the constructor's shape.
        self.save_hyperparameters(
            {
                "preset": preset,
                "steps": self.settings.steps,
                "settings": self.settings.as_dict(),
                "seed": seed,
                "target_class": target_class,
                "fast_path": self.fast_path.as_dict(),
            }
        )

    @property
    def fast_path_report(self) -> dict[str, Any]:
        """What the fast path ran for the last batch: the variant, BatchNorms folded and convolutions packed (of
        all), the timings it was chosen by with ``auto`` (see FastPathCache.report), and how the mask step's
        gradient is computed (``mask_step``: ``fused`` by hand, except under float16 loss scaling, or ``autograd``)."""
        fused = self.fast_path.fuses_mask_step(self.device) and fuses(self.settings)
        return {**self._fast_copies.report(), "mask_step": "fused" if fused else "autograd"}

    @property
    def class_names(self) -> list[str] | None:
        """The classifier's class names, when it has them."""
        return getattr(self.classifier, "class_names", None)

    def forward(self, images: Tensor) -> Tensor:
        """The classifier's logits."""
        return self.classifier(images)

    def explain(self, images: Tensor, targets: Tensor | int | None = None, ids: Tensor | None = None) -> Explanation:
        """Learn masks for a batch of [0, 1] images; no Trainer needed.

        Args:
            images: B x C x H x W floats in [0, 1].
            targets: class per image (B,), one class for all, or None for the module's
                ``target_class`` or else the predicted class.
            ids: sample ids (B,) that seed each mask; default 0..B-1.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(INFERENCE_MODE_MESSAGE)
        images = check_images(images).to(self._classifier_device())
        check_images_fit(images, self.classifier)
        batch = images.shape[0]
        ids = torch.arange(batch) if ids is None else integral_ids(ids, "ids")
        if ids.shape[0] != batch or ids.unique().numel() != batch:
            raise ValueError(f"ids must be {batch} distinct sample ids, one per image, got {ids.tolist()[:10]}")
        with frozen(self.classifier), torch.enable_grad():
            with torch.no_grad():
                logits = self._logits(images)
            targets = self._targets(targets, logits)
            fit = self._learn(self._fast_copies.get(self.classifier, images), images, targets, ids)
        prob_original = logits.float().softmax(-1).gather(1, targets[:, None])[:, 0]
        prob_masked = fit.logits_masked.softmax(-1).gather(1, targets[:, None])[:, 0]
        diverged = ~(torch.isfinite(fit.masks).flatten(1).all(1) & torch.isfinite(fit.loss["total"]))
        errors = None
        if diverged.any():
            errors = [DIVERGED if bad else "" for bad in diverged.tolist()]
            log.warning("the mask optimisation of sample(s) %s diverged (NaN or inf)", ids[diverged.cpu()].tolist())
        return Explanation(
            ids=ids.to(images.device),
            masks=fit.masks,
            targets=targets,
            prob_original=prob_original,
            prob_masked=prob_masked,
            loss={k: v.detach() for k, v in fit.loss.items()},
            mask_area=fit.masks.flatten(1).mean(1),
            preserved=(fit.logits_masked.argmax(-1) == targets) & ~diverged,
            steps=fit.steps,
            images=images,
            errors=errors,
        )

    def _learn(self, classifier: nn.Module, images: Tensor, targets: Tensor, ids: Tensor) -> MaskFit:
        """learn_masks in chunks of at most ``max_chunk`` images, halving the chunk on out-of-memory."""
        fits: list[MaskFit] = []
        start = 0
        while start < len(images):
            size = min(self.max_chunk or len(images), len(images) - start)
            part = slice(start, start + size)
            out_of_memory = False
            try:
                fits.append(
                    learn_masks(
                        classifier,
                        images[part],
                        targets[part],
                        ids[part],
                        self.settings,
                        self.seed,
                        few_batch_sizes=self.fast_path.records_cuda_graphs(images.device),  # fewer recordings
                        fused=self.fast_path.fuses_mask_step(images.device),
                    )
                )
                start += size
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not _out_of_memory(error):
                    raise
                if size == 1:
                    raise MemoryError(
                        "one image alone does not fit in memory while learning its mask; use smaller images, "
                        "a smaller model, precision='bf16-mixed', or a larger device"
                    ) from None
                out_of_memory = True  # handled outside the except block, so the failed step's tensors are freed
            if out_of_memory:
                self.max_chunk = (size + 1) // 2
                log.warning("out of memory with %d images at once; continuing in chunks of %d", size, self.max_chunk)
                if images.is_cuda:
                    torch.cuda.empty_cache()
        if len(fits) == 1:
            return fits[0]
        return MaskFit(
            masks=torch.cat([f.masks for f in fits]),
            logits_masked=torch.cat([f.logits_masked for f in fits]),
            loss={k: torch.cat([f.loss[k] for f in fits]) for k in fits[0].loss},
            steps=torch.cat([f.steps for f in fits]),
        )

    def _classifier_device(self) -> torch.device:
        """Where the classifier lives (it may have been moved without this module, e.g. as a callback's)."""
        return device_of(self.classifier, self.device)

    def _logits(self, images: Tensor) -> Tensor:
        try:
            logits = self.classifier(images)
        except (RuntimeError, ValueError, AssertionError, IndexError) as error:  # fixed-size models raise their own
            raise ValueError(
                f"the classifier failed on images of shape {tuple(images.shape)}: {type(error).__name__}: {error}. "
                "Check the image size the classifier expects (fixed-size models such as ViT take only their own "
                "size: set the DataModule's image_size)."
            ) from error
        return check_logits(logits, images.shape[0])

    def _targets(self, targets: Tensor | int | None, logits: Tensor) -> Tensor:
        batch, num_classes = logits.shape
        if targets is None:
            targets = self.target_class
        if targets is None:
            return logits.argmax(-1)
        targets = integral_ids(targets, "targets", nonnegative=False)  # the range check below names the classes
        if targets.numel() not in (1, batch):
            raise ValueError(f"targets must be one class or {batch} classes (one per image), got {targets.numel()}")
        targets = targets.to(logits.device).expand(batch).clone()
        bad = ((targets < 0) | (targets >= num_classes)).nonzero()[:, 0]
        if bad.numel():
            position = int(bad[0])
            raise TargetOutOfRange(
                f"target class {int(targets[position])} is outside the classifier's {num_classes} classes "
                f"(0..{num_classes - 1})",
                position,
            )
        return targets

    def _explain_batch(self, batch: Any) -> Explanation:
        images, labels, ids, paths, skipped = unpack_batch(batch)
        if ids is None:  # batches without sample ids: number samples in the order they come
            ids = torch.arange(self._next_id, self._next_id + images.shape[0])
        self._next_id = int(ids.max()) + 1 if len(ids) else self._next_id
        targets = labels if self.target_class is None else None
        if images.shape[0] == 0:
            result = Explanation.empty(images)
        else:
            try:
                result = self.explain(images, targets=targets, ids=ids)
            except TargetOutOfRange as error:
                if not paths:
                    raise
                raise TargetOutOfRange(f"{error} (the label of {paths[error.position]})", error.position) from None
        result.paths, result.skipped = paths, skipped
        return result.cpu()

    def setup(self, stage: str) -> None:
        """Map a DataModule's label folders onto the classifier's class names before any sample is loaded."""
        match = getattr(getattr(self._trainer, "datamodule", None), "match_class_names", None)
        if callable(match):
            match(self.class_names)

    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(INFERENCE_MODE_MESSAGE)
        self._next_id = 0

    on_test_start = on_predict_start

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Explanation:
        """Explain one batch; returns the :class:`Explanation` on the CPU."""
        return self._explain_batch(batch)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Explanation:
        """Explain one batch; log its loss terms and probabilities, and the faithfulness metrics
        (deletion/insertion AUC, mask area, preservation and selection rates; with a ``gt_mask``
        in the batch also the pointing game and energy pointing)."""
        result = self._explain_batch(batch)
        ok = result.ok
        if ok.any():
            own = {f"test/{k}": v for k, v in result.summary().items() if k not in ("mask_area", "preservation_rate")}
            self.log_dict(own, batch_size=int(ok.sum()), sync_dist=True)
            ground_truth = batch.get("gt_mask") if isinstance(batch, dict) else None
            if isinstance(ground_truth, Tensor):
                ground_truth = ground_truth[ok.to(ground_truth.device)]
            elif ground_truth is not None:
                ground_truth = [g for g, keep in zip(ground_truth, ok.tolist()) if keep]
            update_explanation_metrics(
                self.test_metrics, result.images[ok], result.masks[ok], result.targets[ok], ground_truth
            )
            updated = {name: metric for name, metric in self.test_metrics.items() if metric.update_called}
            self.log_dict(updated, batch_size=len(result))
        return result


def _out_of_memory(error: BaseException) -> bool:
    """Whether an error means the device ran out of memory: CUDA's OutOfMemoryError, or the CPU allocator's."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return "DefaultCPUAllocator" in message or "can't allocate memory" in message or "not enough memory" in message


def _drop_classifier_state(module: NeuroMask, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """state_dict hook: leave the classifier's entries out (they belong to the classifier's owner)."""
    for key in [k for k in state if k.startswith(f"{prefix}classifier.")]:
        del state[key]


def _note_state_prefix(module: NeuroMask, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: remember this module's prefix for :func:`_ignore_missing_classifier_state`."""
    module._state_prefix = prefix


def _ignore_missing_classifier_state(module: NeuroMask, incompatible_keys: Any) -> None:
    """load_state_dict post-hook: the classifier's entries are never saved, so they are never missing."""
    own = f"{module._state_prefix}classifier."
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(own)]
