"""The explainer without Lightning: a classifier and settings in, :class:`~neuromask_pl.explanation.Explanation` out.

Built like an attribution method of captum (``Explainer(classifier, ...).explain(images, targets)``); the
LightningModule :class:`~neuromask_pl.module.NeuroMask`, the callback
:class:`~neuromask_pl.callbacks.ExplainDuringTraining` and :func:`~neuromask_pl.explain.explain_folder` all run one.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from neuromask_pl.data.checks import (
    check_images,
    check_images_fit,
    check_logits,
    check_target_class,
    device_of,
    frozen,
    integral_ids,
    targets_by_name,
)
from neuromask_pl.explanation import Explanation, baseline_check
from neuromask_pl.fastcopy import FastCopies, FastPath
from neuromask_pl.maths.explicit import MASK_GRADIENTS, MaskGradient, uses_explicit_gradient
from neuromask_pl.maths.optimize import MaskFit, learn_masks
from neuromask_pl.settings import MaskSettings, SettingsOverrides, recorded_preset, resolve_settings

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


class Explainer:
    """Explain a classifier's predictions by learning one mask per image.

    Args:
        classifier: the model to explain; takes [0, 1] images B x C x H x W, returns logits B x K.
            It is frozen while explaining and restored exactly afterwards.
        preset: named settings, one of ``neuromask_pl.PRESETS``: ``default``, ``analysis`` (for a dataset-level
            analysis of strategies), ``paper`` (the reference implementation) or ``paper_cifar``; None with a
            complete ``MaskSettings`` as ``settings``.
        steps: optimisation steps per image (overrides the preset's and ``settings``').
        settings: fields of :class:`~neuromask_pl.settings.MaskSettings` that override the preset
            (a dict such as ``{"lr": 0.05}`` or a ``SettingsOverrides``), or a complete ``MaskSettings``
            used as it is; ``stop_patience`` turns on per-sample early stopping.
        seed: masks start from noise derived from ``(seed, sample id)``.
        target_class: explain this class for every image; by default the labels given, else the predicted class.
        fast_path: how the frozen classifier runs during the mask steps (a fast copy; the classifier itself is
            untouched): a :class:`~neuromask_pl.fastcopy.FastPath` or a dict of its fields.
        mask_gradient: how the gradient of the mask step is computed: ``explicit`` (the derivative written out,
            :mod:`~neuromask_pl.maths.explicit`; the same maths with half the kernels), ``autograd``, or ``auto``
            (explicit on the CPU where the settings allow it, autograd elsewhere).

    Batches that run out of memory are split in halves (results do not depend on the batch) and later batches are
    learned in chunks of the size that fitted.
    """

    def __init__(
        self,
        classifier: nn.Module,
        preset: str | None = "default",
        steps: int | None = None,
        settings: SettingsOverrides | MaskSettings | dict[str, Any] | None = None,
        seed: int = 0,
        target_class: int | None = None,
        fast_path: FastPath | dict[str, Any] | None = None,
        mask_gradient: MaskGradient = "auto",
    ) -> None:
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
        check_target_class(target_class)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        self.classifier = classifier
        self.settings: MaskSettings = resolve_settings(preset, steps, settings)
        self.preset = recorded_preset(preset, settings, self.settings)
        self.fast_path = FastPath.of(fast_path)
        uses_explicit_gradient(mask_gradient, self.settings, torch.device("cpu"))  # a bad choice fails here
        self.mask_gradient = mask_gradient
        self.seed = seed
        self.target_class = target_class
        self.copies = FastCopies(self.fast_path)
        self.max_chunk: int | None = None  # set when a batch ran out of memory
        self._explicit_ran: bool | None = None  # how the last batch's mask gradient was computed
        self.progress: bool | Callable[[int, int], None] = False  # explain()'s default for ``progress``

    def with_classifier(self, classifier: nn.Module) -> Explainer:
        """This explainer (its settings, resolved once) for another classifier, with copies of its own."""
        twin = copy.copy(self)
        twin.classifier, twin.copies, twin._explicit_ran = classifier, FastCopies(self.fast_path), None
        return twin

    def record(self) -> dict[str, Any]:
        """The arguments that rebuild this explainer (with its classifier): the resolved settings, and the preset
        only when the settings are that preset with the recorded settings as overrides."""
        return {
            "preset": self.preset,
            "settings": self.settings.as_dict(),
            "seed": self.seed,
            "target_class": self.target_class,
            "fast_path": self.fast_path.as_dict(),
            "mask_gradient": self.mask_gradient,
        }

    def report(self) -> dict[str, Any]:
        """What the last :meth:`explain` ran: the fast copy (:meth:`FastCopies.report`) and ``mask_gradient``
        (``explicit`` or ``autograd``; None before the first batch)."""
        ran = {True: "explicit", False: "autograd", None: None}[self._explicit_ran]
        return {**self.copies.report(), "mask_gradient": ran}

    @property
    def class_names(self) -> list[str] | None:
        """The classifier's class names, when it has them."""
        return getattr(self.classifier, "class_names", None)

    def explain(
        self,
        images: Tensor,
        targets: Tensor | int | None = None,
        ids: Tensor | None = None,
        progress: bool | Callable[[int, int], None] | None = None,
    ) -> Explanation:
        """Learn masks for a batch of [0, 1] images.

        Args:
            images: B x C x H x W floats in [0, 1].
            targets: class per image (B,), one class for all, or None for ``target_class`` or else the
                predicted class; classes may be given by name (``"cat"``, ``["cat", "dog"]``) when the classifier
                has ``class_names``.
            ids: sample ids (B,) that seed each mask; default 0..B-1.
            progress: True shows the mask steps of the batch as a progress bar with an ETA (tqdm, on stderr); a
                function is called as ``progress(step, steps)`` after each step; None: the attribute ``progress``
                (False unless set). The masks are the same either way.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(INFERENCE_MODE_MESSAGE)
        images = check_images(images).to(device_of(self.classifier, images.device))
        check_images_fit(images, self.classifier)
        batch = images.shape[0]
        ids = torch.arange(batch) if ids is None else integral_ids(ids, "ids")
        if ids.shape[0] != batch or ids.unique().numel() != batch:
            raise ValueError(f"ids must be {batch} distinct sample ids, one per image, got {ids.tolist()[:10]}")
        with frozen(self.classifier), torch.enable_grad():
            with torch.no_grad():
                logits = self._logits(images)
            targets = self._targets(targets, logits)
            report = self.progress if progress is None else progress
            on_step = StepBar(f"explaining {batch} image(s)") if report is True else (report or None)
            try:
                fit = self._learn(self.copies.get(self.classifier, images), images, targets, ids, on_step)
            finally:
                if isinstance(on_step, StepBar):
                    on_step.close()
            checks = baseline_check(self.classifier, images, logits, targets, self.settings.baseline, self.seed)
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
            **checks,
        )

    def _learn(
        self,
        classifier: nn.Module,
        images: Tensor,
        targets: Tensor,
        ids: Tensor,
        on_step: Callable[[int, int], None] | None = None,
    ) -> MaskFit:
        """learn_masks in chunks of at most ``max_chunk`` images, halving the chunk on out-of-memory."""
        explicit = uses_explicit_gradient(self.mask_gradient, self.settings, images.device)
        self._explicit_ran = explicit
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
                        explicit=explicit,
                        on_step=on_step,
                    )  # fmt: skip
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
        targets = targets_by_name(targets, self.class_names)  # "cat" or ["cat", "dog"]: their indices
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


class StepBar:
    """A progress bar of the mask steps of a batch, with an ETA (tqdm), as an ``on_step(step, steps)`` function: a
    bar opens at a batch's first step and closes at its last (a batch learned in chunks shows one bar a chunk).

    Args:
        description: the bar's label.
        tqdm_args: more arguments of ``tqdm.tqdm`` (``position``, ``file``, ``leave``, ...).
    """

    def __init__(self, description: str = "mask steps", **tqdm_args: Any) -> None:
        self.description = description
        self.tqdm_args = {"unit": "step", "leave": False, "file": sys.stderr, "dynamic_ncols": True} | tqdm_args
        self._bar: Any = None

    def __call__(self, step: int, steps: int) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm  # installed with Lightning; needed only when a bar is asked for

            self._bar = tqdm(total=steps, desc=self.description, **self.tqdm_args)
        self._bar.update(step - self._bar.n)
        if step >= steps:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _out_of_memory(error: BaseException) -> bool:
    """Whether an error means the device ran out of memory: CUDA's OutOfMemoryError, or the CPU allocator's."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error)
    return "DefaultCPUAllocator" in message or "can't allocate memory" in message or "not enough memory" in message


__all__ = ["DIVERGED", "INFERENCE_MODE_MESSAGE", "MASK_GRADIENTS", "Explainer", "StepBar", "TargetOutOfRange"]
