"""Faithfulness and localisation metrics for masks and saliency maps, the torchmetrics way.

Every metric has a functional form that holds the maths and returns one value per sample
(:mod:`neuromask_pl.metrics.functional`), and a :class:`torchmetrics.Metric` that averages it over
batches (and over DDP ranks: its ``total`` and ``count`` states are sum-reduced;
:mod:`neuromask_pl.metrics.classes`). They work on any saliency map, not only NeuroMask's masks.

Inputs, everywhere:

- ``images``: float B x C x H x W in [0, 1] (the pixel space masks act on).
- ``saliency``: B x 1 x H x W or B x H x W at the images' size, any scale and sign (higher = more
  important). Upsample coarse maps first, e.g. with :func:`neuromask_pl.maths.mask.upsample_mask`.
- ``masks``: like ``saliency`` but in [0, 1] (1 keeps a pixel).
- ``targets``: the explained class, a LongTensor (B,) or one int for all.
- ``classifier``: any ``nn.Module`` mapping [0, 1] images to logits B x K. It is run in eval mode
  without gradients (:func:`neuromask_pl.data.checks.frozen`) and left exactly as it was.
- ``ground_truth``: where the object is: a bool (or 0/1) mask B x 1 x H x W or B x H x W, boxes
  B x 4 as ``(x0, y0, x1, y1)`` in pixels, or a list of B tensors of boxes K x 4 (their union). A pixel
  ``(x, y)`` is in a box when its centre ``(x + 0.5, y + 0.5)`` is, so integer boxes act like slices
  ``[y0:y1, x0:x1]``.
- ``baseline``: what removed pixels become: ``"black"``, ``"mean"`` (each image's mean colour),
  ``"blur"`` (see :func:`neuromask_pl.maths.mask.make_baseline`) or a tensor broadcastable to the images.

Example, in a LightningModule::

    self.test_metrics = explanation_metrics(classifier, prefix="test/")      # in __init__
    update_explanation_metrics(self.test_metrics, images, masks, targets)    # in test_step
    self.log_dict(self.test_metrics)
"""

from neuromask_pl.metrics.classes import (
    DeletionAUC,
    EnergyPointing,
    InsertionAUC,
    MaskArea,
    PointingGame,
    PreservationRate,
    SelectionRate,
    explanation_metrics,
    update_explanation_metrics,
)
from neuromask_pl.metrics.functional import (
    DELETION_BASELINE,
    ENERGY_MODES,
    INSERTION_BASELINE,
    MASK_BASELINE,
    TIE_RULES,
    auc,
    boxes_to_masks,
    deletion_auc,
    deletion_curve,
    energy_pointing,
    insertion_auc,
    insertion_curve,
    mask_area,
    pointing_game,
    preservation,
    saliency_ranks,
    selection,
)

__all__ = [
    "DELETION_BASELINE",
    "ENERGY_MODES",
    "INSERTION_BASELINE",
    "MASK_BASELINE",
    "TIE_RULES",
    "DeletionAUC",
    "EnergyPointing",
    "InsertionAUC",
    "MaskArea",
    "PointingGame",
    "PreservationRate",
    "SelectionRate",
    "auc",
    "boxes_to_masks",
    "deletion_auc",
    "deletion_curve",
    "energy_pointing",
    "explanation_metrics",
    "insertion_auc",
    "insertion_curve",
    "mask_area",
    "pointing_game",
    "preservation",
    "saliency_ranks",
    "selection",
    "update_explanation_metrics",
]
