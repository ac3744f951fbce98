"""NeuroMask as a LightningModule: a frozen classifier and an inner mask optimisation per batch."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from neuromask_pl.data.batch import unpack_batch
from neuromask_pl.explainer import INFERENCE_MODE_MESSAGE, Explainer, TargetOutOfRange
from neuromask_pl.explanation import Explanation
from neuromask_pl.fastcopy import FastPath
from neuromask_pl.maths.explicit import MaskGradient
from neuromask_pl.metrics import explanation_metrics, update_explanation_metrics
from neuromask_pl.settings import MaskSettings, SettingsOverrides

log = logging.getLogger(__name__)


class NeuroMask(pl.LightningModule):
    """Explain a classifier's predictions by learning one mask per image: an
    :class:`~neuromask_pl.explainer.Explainer` as a LightningModule, for ``Trainer.predict`` and ``Trainer.test``.

    The arguments are the Explainer's (see there). The classifier is registered as a submodule, so the Trainer moves
    it to the device, but it is never part of this module's ``state_dict``.
    """

    def __init__(
        self,
        classifier: nn.Module,
        preset: str | None = "default",
        steps: int | None = None,
        settings: SettingsOverrides | None = None,
        seed: int = 0,
        target_class: int | None = None,
        fast_path: FastPath | None = None,
        mask_gradient: MaskGradient = "auto",
    ) -> None:
        super().__init__()
        self.explainer = Explainer(classifier, preset, steps, settings, seed, target_class, fast_path, mask_gradient)
        self.classifier = classifier
        # The classifier is the user's (a reference): never part of this module's state_dict, so a host module
        # holding a NeuroMask saves and strictly loads the same checkpoints as without it.
        self._state_prefix = ""  # where this module sits in the state_dict being loaded
        self._register_state_dict_hook(_drop_classifier_state)
        self._register_load_state_dict_pre_hook(_note_state_prefix, with_module=True)
        self.register_load_state_dict_post_hook(_ignore_missing_classifier_state)
        self._next_id = 0  # ids for batches that carry none (reset at each predict/test start)
        self.test_metrics = explanation_metrics(classifier, localisation=True, prefix="test/")
        self.save_hyperparameters(self.explainer.record())

    @property
    def settings(self) -> MaskSettings:
        return self.explainer.settings

    @property
    def fast_path(self) -> FastPath:
        return self.explainer.fast_path

    @property
    def target_class(self) -> int | None:
        return self.explainer.target_class

    @property
    def max_chunk(self) -> int | None:
        return self.explainer.max_chunk

    @property
    def fast_path_report(self) -> dict[str, Any]:
        """What the last batch ran: the fast copy and the mask gradient (see :meth:`Explainer.report`)."""
        return self.explainer.report()

    @property
    def class_names(self) -> list[str] | None:
        """The classifier's class names, when it has them."""
        return self.explainer.class_names

    def forward(self, images: Tensor) -> Tensor:
        """The classifier's logits."""
        return self.classifier(images)

    def explain(
        self, images: Tensor, targets: Tensor | int | None = None, ids: Tensor | None = None, progress: Any = None
    ) -> Explanation:
        """Learn masks for a batch of [0, 1] images (:meth:`Explainer.explain`); no Trainer needed."""
        return self.explainer.explain(images, targets, ids, progress=progress)

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
