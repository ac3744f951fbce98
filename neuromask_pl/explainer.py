"""NeuroMask as a LightningModule: a frozen classifier and an inner mask optimisation per batch."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from neuromask_pl.fastpath import FastClassifier, FastPath
from neuromask_pl.inputs import check_images, frozen
from neuromask_pl.metrics import explanation_metrics, update_explanation_metrics
from neuromask_pl.objective import MaskSettings, resolve_settings
from neuromask_pl.optimize import MaskFit, learn_masks
from neuromask_pl.result import LOSS_TERMS, Explanation

log = logging.getLogger(__name__)

INFERENCE_MODE_MESSAGE = (
    "NeuroMask learns masks by gradient descent, which is impossible under torch.inference_mode. "
    "Build the Trainer with inference_mode=False, e.g. pl.Trainer(inference_mode=False), "
    "and do not call explain() inside a torch.inference_mode() block."
)


class NeuroMask(pl.LightningModule):
    """Explain a classifier's predictions by learning one mask per image.

    Args:
        classifier: the model to explain; takes [0, 1] images B x C x H x W, returns logits B x K.
            It is frozen while explaining and restored exactly afterwards.
        preset: named settings, one of ``neuromask_pl.objective.PRESETS``
            (``paper`` reproduces the reference implementation).
        steps: optimisation steps per image (overrides the preset).
        seed: masks start from noise derived from ``(seed, sample id)``.
        target_class: explain this class for every image; by default the batch's labels
            when present, else the classifier's predicted class.
        l_pred, l_sparse, l_smooth, temperature, weight_limit, laplacian, laplacian_padding, smooth_penalty,
            smooth_on, jitter, sparsity_on,
            baseline, optimizer, lr, mask_scale, mask_size, area_target, temperature_start, tie_break, mask_coarse,
            l_detail, l_delete, upsample_weights: override
            single settings of the preset (see :class:`neuromask_pl.objective.MaskSettings`);
            ``stop_patience`` and ``stop_tolerance`` turn on per-sample early stopping.
        fold_batchnorm, channels_last, compile, pack_convolutions: how the frozen classifier runs during the
            mask steps (a fast copy; the classifier itself is untouched), see
            :class:`neuromask_pl.fastpath.FastPath`. Folding is on by default, and on the CPU packed
            convolutions; ``compile=True`` adds ``torch.compile`` (with CUDA graphs on GPU).

    Batches that run out of GPU memory are split in halves (results do not depend on the batch) and
    later batches are learned in chunks of the size that fitted.
    """

    def __init__(
        self,
        classifier: nn.Module,
        preset: str = "default",
        steps: int | None = None,
        seed: int = 0,
        target_class: int | None = None,
        l_pred: float | None = None,
        l_sparse: float | None = None,
        l_smooth: float | None = None,
        temperature: float | None = None,
        weight_limit: float | None = None,
        laplacian: int | None = None,
        laplacian_padding: str | None = None,
        smooth_penalty: str | None = None,
        smooth_on: str | None = None,
        jitter: int | None = None,
        sparsity_on: str | None = None,
        baseline: str | None = None,
        optimizer: str | None = None,
        lr: float | None = None,
        mask_scale: int | None = None,
        mask_size: int | None = None,
        area_target: float | None = None,
        temperature_start: float | None = None,
        tie_break: float | None = None,
        mask_coarse: int | None = None,
        l_detail: float | None = None,
        l_delete: float | None = None,
        upsample_weights: bool | None = None,
        stop_patience: int | None = None,
        stop_tolerance: float | None = None,
        fold_batchnorm: bool = True,
        channels_last: bool | None = None,
        compile: bool = False,
        pack_convolutions: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
        self.classifier = classifier
        self.settings: MaskSettings = resolve_settings(
            preset,
            steps=steps,
            l_pred=l_pred,
            l_sparse=l_sparse,
            l_smooth=l_smooth,
            temperature=temperature,
            weight_limit=weight_limit,
            laplacian=laplacian,
            laplacian_padding=laplacian_padding,
            smooth_penalty=smooth_penalty,
            smooth_on=smooth_on,
            jitter=jitter,
            sparsity_on=sparsity_on,
            baseline=baseline,
            optimizer=optimizer,
            lr=lr,
            mask_scale=mask_scale,
            mask_size=mask_size,
            area_target=area_target,
            stop_patience=stop_patience,
            stop_tolerance=stop_tolerance,
            temperature_start=temperature_start,
            tie_break=tie_break,
            mask_coarse=mask_coarse,
            l_detail=l_detail,
            l_delete=l_delete,
            upsample_weights=upsample_weights,
        )
        self.fast_path = FastPath(
            fold_batchnorm=fold_batchnorm,
            channels_last=channels_last,
            compile=compile,
            pack_convolutions=pack_convolutions,
        )
        self._fast_classifier = FastClassifier(self.fast_path)
        self.max_chunk: int | None = None  # set when a batch ran out of memory
        if target_class is not None and target_class < 0:
            raise ValueError(f"target_class must be a class index >= 0, got {target_class}")
        self.seed = seed
        self.target_class = target_class
        self._next_id = 0  # ids for batches that carry none (reset at each predict/test start)
        self.test_metrics = explanation_metrics(classifier, localisation=True, prefix="test/")
        # Saved resolved, so logs and run records show the values actually used.
        self.save_hyperparameters(
            {
                "preset": preset,
                "seed": seed,
                "target_class": target_class,
                **self.settings.as_dict(),
                **self.fast_path.as_dict(),
            }
        )

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
        batch = images.shape[0]
        ids = torch.arange(batch) if ids is None else torch.as_tensor(ids).long().view(-1).cpu()
        if ids.shape[0] != batch or ids.unique().numel() != batch:
            raise ValueError(f"ids must be {batch} distinct sample ids, one per image, got {ids.tolist()[:10]}")
        with frozen(self.classifier), torch.enable_grad():
            with torch.no_grad():
                logits = self._logits(images)
            targets = self._targets(targets, logits)
            fit = self._learn(self._fast_classifier.get(self.classifier, images), images, targets, ids)
        prob_original = logits.float().softmax(-1).gather(1, targets[:, None])[:, 0]
        prob_masked = fit.logits_masked.softmax(-1).gather(1, targets[:, None])[:, 0]
        return Explanation(
            ids=ids.to(images.device),
            masks=fit.masks,
            targets=targets,
            prob_original=prob_original,
            prob_masked=prob_masked,
            loss={k: v.detach() for k, v in fit.loss.items()},
            mask_area=fit.masks.flatten(1).mean(1),
            preserved=fit.logits_masked.argmax(-1) == targets,
            steps=fit.steps,
            images=images,
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
                        classifier, images[part], targets[part], ids[part], self.settings, self.seed,
                        few_batch_sizes=self.fast_path.records_cuda_graphs(images.device),  # fewer recordings
                    )
                )
                start += size
            except torch.OutOfMemoryError:
                if size == 1:
                    raise RuntimeError(
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
        tensor = next(self.classifier.parameters(), None)
        if tensor is None:
            tensor = next(self.classifier.buffers(), None)
        return tensor.device if tensor is not None else self.device

    def _logits(self, images: Tensor) -> Tensor:
        try:
            logits = self.classifier(images)
        except RuntimeError as error:
            raise ValueError(
                f"the classifier failed on images of shape {tuple(images.shape)}: {error}. "
                "Check the channel count and size the classifier expects."
            ) from error
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != images.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise TypeError(
                f"the classifier must return logits of shape B x K, got {got}; "
                "wrap it so that forward returns the class logits tensor, e.g. "
                "neuromask_pl.classifiers.FactoryClassifier(..., output=<index or key>)"
            )
        return logits

    def _targets(self, targets: Tensor | int | None, logits: Tensor) -> Tensor:
        batch, num_classes = logits.shape
        if targets is None:
            targets = self.target_class
        if targets is None:
            return logits.argmax(-1)
        targets = torch.as_tensor(targets, device=logits.device).long().view(-1)
        if targets.numel() not in (1, batch):
            raise ValueError(f"targets must be one class or {batch} classes (one per image), got {targets.numel()}")
        targets = targets.expand(batch).clone()
        bad = targets[(targets < 0) | (targets >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"target class {int(bad[0])} is outside the classifier's {num_classes} classes (0..{num_classes - 1})"
            )
        return targets

    def _explain_batch(self, batch: Any) -> Explanation:
        images, labels, ids, paths, skipped = unpack_batch(batch)
        if ids is None:  # batches without sample ids: number samples in the order they come
            ids = torch.arange(self._next_id, self._next_id + images.shape[0])
        self._next_id = int(ids.max()) + 1 if len(ids) else self._next_id
        targets = labels if self.target_class is None else None
        if images.shape[0] == 0:
            result = empty_explanation(images)
        else:
            result = self.explain(images, targets=targets, ids=ids)
        result.paths, result.skipped = paths, skipped
        return result.cpu()

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
        if len(result):
            own = {f"test/{k}": v for k, v in result.summary().items() if k not in ("mask_area", "preservation_rate")}
            self.log_dict(own, batch_size=len(result), sync_dist=True)
            ground_truth = batch.get("gt_mask") if isinstance(batch, dict) else None
            update_explanation_metrics(self.test_metrics, result.images, result.masks, result.targets, ground_truth)
            updated = {name: metric for name, metric in self.test_metrics.items() if metric.update_called}
            self.log_dict(updated, batch_size=len(result))
        return result


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None, list[str] | None, list]:
    """(images, labels, ids, paths, skipped) from a dict batch, an (images, labels) pair or a tensor.

    Dict batches from this package's DataModules carry sample ids; the other forms carry none
    (ids None): NeuroMask then numbers samples in arrival order, which is stable only
    without shuffling or sharding.
    """
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(f"a dict batch needs an 'image' entry, got keys {sorted(batch)}")
        return batch["image"], batch.get("label"), batch.get("index"), batch.get("path"), list(batch.get("skipped", []))
    if isinstance(batch, (list, tuple)):
        images, labels = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        images, labels = batch, None
    if not isinstance(images, Tensor):
        raise TypeError(f"batches must be dicts, (images, labels) pairs or image tensors, got {type(images).__name__}")
    return images, labels, None, None, []


def empty_explanation(images: Tensor) -> Explanation:
    """An Explanation with zero samples (a batch whose every file was unreadable)."""
    empty = torch.empty(0)
    return Explanation(
        ids=empty.long(),
        masks=torch.empty(0, 1, *images.shape[-2:]),
        targets=empty.long(),
        prob_original=empty,
        prob_masked=empty,
        loss={k: empty for k in LOSS_TERMS},
        mask_area=empty,
        preserved=empty.bool(),
        steps=empty.long(),
        images=images,
    )
