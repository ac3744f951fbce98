"""The explanation metrics as :class:`torchmetrics.Metric` classes, and one collection of them.

Each class is a thin wrapper over its functional twin in :mod:`neuromask_pl.metrics.functional`:
it averages the per-sample values over batches, and over DDP ranks through its sum-reduced
``total`` and ``count`` states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from neuromask_pl.metrics.functional import (
    DELETION_BASELINE,
    ENERGY_MODES,
    INSERTION_BASELINE,
    MASK_BASELINE,
    TIE_RULES,
    _check_choice,
    _check_classifier,
    _check_steps,
    deletion_auc,
    energy_pointing,
    insertion_auc,
    mask_area,
    pointing_game,
    preservation,
    selection,
)

__all__ = [
    "DeletionAUC",
    "EnergyPointing",
    "InsertionAUC",
    "MaskArea",
    "PointingGame",
    "PreservationRate",
    "SelectionRate",
    "explanation_metrics",
    "update_explanation_metrics",
]


class _SharedClassifier:
    """Holds a classifier without registering it as a sub-module of the metric.

    So the classifier is not in the metric's ``state_dict``, is not moved by ``metric.to()``, and
    ``deepcopy`` of the metric alone (``MetricCollection.clone``) shares it instead of copying its
    weights. A deepcopy of a module that holds both the classifier (registered before the metrics)
    and the metrics points the copied metrics at the copied classifier.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict) -> _SharedClassifier:
        copied = memo.get(id(self.module))
        return self if copied is None else _SharedClassifier(copied)


class _MeanMetric(Metric):
    """Mean of a per-sample value: ``total`` and ``count`` states, summed over DDP ranks."""

    full_state_update = False
    is_differentiable = False
    higher_is_better: bool | None = True

    total: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def _accumulate(self, values: Tensor) -> None:
        values = values.detach().to(self.total.device)
        self.total += values.to(self.total.dtype).sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        """The mean over every sample seen (NaN before any)."""
        return self.total / self.count

    def _update_explanation(self, images: Tensor, masks: Tensor, targets: Tensor, ground_truth: Any) -> None:
        """Update from one batch of explanations (see :func:`update_explanation_metrics`)."""
        raise NotImplementedError


class _ClassifierMetric(_MeanMetric):
    """A mean metric that runs the classifier on images, masks (or saliency) and targets."""

    def __init__(self, classifier: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._classifier = _SharedClassifier(_check_classifier(classifier))

    @property
    def classifier(self) -> nn.Module:
        """The classifier (shared, not a sub-module)."""
        return self._classifier.module

    def _update_explanation(self, images: Tensor, masks: Tensor, targets: Tensor, ground_truth: Any) -> None:
        self.update(images, masks, targets)


class _LocalisationMetric(_MeanMetric):
    """A mean metric of saliency maps against ground truth; skipped for batches without it."""

    def _update_explanation(self, images: Tensor, masks: Tensor, targets: Tensor, ground_truth: Any) -> None:
        if ground_truth is not None:
            self.update(masks, ground_truth)


class _AUCMetric(_ClassifierMetric):
    """Mean area under a deletion or insertion curve (``_area``, with ``_default_baseline``)."""

    _area: Callable[..., Tensor]
    _default_baseline: str

    def __init__(self, classifier: nn.Module, steps: int = 20, baseline: str | Tensor | None = None, **kwargs: Any):
        super().__init__(classifier, **kwargs)
        _check_steps(steps)
        self.steps = steps
        self.baseline = self._default_baseline if baseline is None else baseline

    def update(self, images: Tensor, saliency: Tensor, targets: Tensor | int) -> None:  # type: ignore[override]
        """Add a batch: images B x C x H x W, saliency maps, target classes."""
        self._accumulate(self._area(self.classifier, images, saliency, targets, self.steps, self.baseline))


class DeletionAUC(_AUCMetric):
    """Mean area under the deletion curve (:func:`deletion_auc`); lower is better.

    Args:
        classifier: the model, used frozen and restored; not registered as a sub-module.
        steps: number of deletion steps (the curve has ``steps + 1`` points).
        baseline: what removed pixels become; default ``"black"`` (Petsiuk et al.).
    """

    higher_is_better = False
    _area = staticmethod(deletion_auc)
    _default_baseline = DELETION_BASELINE


class InsertionAUC(_AUCMetric):
    """Mean area under the insertion curve (:func:`insertion_auc`); higher is better.

    Args:
        classifier: the model, used frozen and restored; not registered as a sub-module.
        steps: number of insertion steps (the curve has ``steps + 1`` points).
        baseline: the starting image; default ``"blur"`` (Petsiuk et al.).
    """

    _area = staticmethod(insertion_auc)
    _default_baseline = INSERTION_BASELINE


class PointingGame(_LocalisationMetric):
    """Share of samples whose saliency maximum hits the object (:func:`pointing_game`).

    Args:
        tolerance: margin in pixels around the ground truth (15, as Zhang et al.).
        ties: ``"first"``, ``"any"`` or ``"all"`` maxima.
    """

    def __init__(self, tolerance: float = 15, ties: str = "first", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_choice(ties, TIE_RULES, "tie rule")
        self.tolerance = tolerance
        self.ties = ties

    def update(self, saliency: Tensor, ground_truth: Tensor | Sequence[Tensor]) -> None:  # type: ignore[override]
        """Add a batch of saliency maps and their ground truth (masks or boxes)."""
        self._accumulate(pointing_game(saliency, ground_truth, self.tolerance, self.ties))


class EnergyPointing(_LocalisationMetric):
    """Mean share of saliency inside the object (:func:`energy_pointing`).

    Args:
        energy: ``"shift"`` (minus each map's minimum) or ``"clamp"`` (positive part).
    """

    def __init__(self, energy: str = "shift", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_choice(energy, ENERGY_MODES, "energy")
        self.energy = energy

    def update(self, saliency: Tensor, ground_truth: Tensor | Sequence[Tensor]) -> None:  # type: ignore[override]
        """Add a batch of saliency maps and their ground truth (masks or boxes)."""
        self._accumulate(energy_pointing(saliency, ground_truth, self.energy))


class MaskArea(_MeanMetric):
    """Mean mask area (:func:`mask_area`): the kept share of the image."""

    higher_is_better = None

    def update(self, masks: Tensor) -> None:  # type: ignore[override]
        """Add a batch of masks in [0, 1]."""
        self._accumulate(mask_area(masks))

    def _update_explanation(self, images: Tensor, masks: Tensor, targets: Tensor, ground_truth: Any) -> None:
        self.update(masks)


class PreservationRate(_ClassifierMetric):
    """Share of samples whose soft-masked image keeps the target class (:func:`preservation`).

    Args:
        classifier: the model, used frozen and restored; not registered as a sub-module.
        baseline: what hidden pixels become (default ``"black"``).
    """

    def __init__(self, classifier: nn.Module, baseline: str | Tensor = MASK_BASELINE, **kwargs: Any) -> None:
        super().__init__(classifier, **kwargs)
        self.baseline = baseline

    def update(self, images: Tensor, masks: Tensor, targets: Tensor | int) -> None:  # type: ignore[override]
        """Add a batch: images, masks in [0, 1], target classes."""
        self._accumulate(preservation(self.classifier, images, masks, targets, self.baseline))


class SelectionRate(_ClassifierMetric):
    """Share of samples that keep the target class with only the pixels where ``mask > threshold``
    (:func:`selection`).

    Args:
        classifier: the model, used frozen and restored; not registered as a sub-module.
        threshold: pixels with a mask value above it are kept.
        baseline: what the other pixels become (default ``"black"``).
    """

    def __init__(
        self, classifier: nn.Module, threshold: float = 0.5, baseline: str | Tensor = MASK_BASELINE, **kwargs: Any
    ) -> None:
        super().__init__(classifier, **kwargs)
        self.threshold = float(threshold)
        self.baseline = baseline

    def update(self, images: Tensor, masks: Tensor, targets: Tensor | int) -> None:  # type: ignore[override]
        """Add a batch: images, masks in [0, 1], target classes."""
        self._accumulate(selection(self.classifier, images, masks, targets, self.threshold, self.baseline))


# ------------------------------------------------------------------------------------------ collection


def explanation_metrics(
    classifier: nn.Module,
    steps: int = 20,
    baseline: str | Tensor | None = None,
    threshold: float = 0.5,
    tolerance: float = 15,
    localisation: bool = False,
    prefix: str | None = None,
) -> MetricCollection:
    """The metrics of explanations by masks, as one :class:`~torchmetrics.MetricCollection`.

    Keys: ``deletion_auc``, ``insertion_auc``, ``mask_area``, ``preservation_rate``, ``selection_rate``,
    plus ``pointing_game`` and ``energy_pointing`` with ``localisation=True`` (for data with ground
    truth). Update it with :func:`update_explanation_metrics`.

    Args:
        classifier: the explained model (shared by the metrics, not copied or registered).
        steps: deletion and insertion steps.
        baseline: one baseline for every metric; None keeps each metric's default (deletion
            ``black``, insertion ``blur``, preservation and selection ``black``).
        threshold: mask threshold of the selection rate.
        tolerance: pointing-game margin in pixels.
        localisation: include the pointing game and energy pointing.
        prefix: prepended to every key, e.g. ``"test/"``.
    """
    mask_baseline = MASK_BASELINE if baseline is None else baseline
    metrics: dict[str, Metric] = {
        "deletion_auc": DeletionAUC(classifier, steps, baseline),
        "insertion_auc": InsertionAUC(classifier, steps, baseline),
        "mask_area": MaskArea(),
        "preservation_rate": PreservationRate(classifier, mask_baseline),
        "selection_rate": SelectionRate(classifier, threshold, mask_baseline),
    }
    if localisation:
        metrics["pointing_game"] = PointingGame(tolerance=tolerance)
        metrics["energy_pointing"] = EnergyPointing()
    # compute_groups=False: torchmetrics would otherwise merge metrics whose states happen to be
    # equal after the first batch (e.g. preservation and selection rates both 1.0) and stop
    # updating all but one of them.
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def update_explanation_metrics(
    collection: MetricCollection | Metric,
    images: Tensor,
    masks: Tensor,
    targets: Tensor | int,
    ground_truth: Tensor | Sequence[Tensor] | None = None,
) -> None:
    """Update every metric of :mod:`neuromask_pl.metrics` in ``collection`` with one batch of explanations.

    ``masks`` (in [0, 1]) are the saliency maps of the deletion, insertion and pointing metrics too.
    The pointing game and energy pointing are updated only when ``ground_truth`` is given.
    An empty batch is ignored; metrics from elsewhere in the collection are left alone.
    """
    if isinstance(masks, Tensor) and masks.shape[0] == 0:
        return
    metrics = collection.values() if isinstance(collection, MetricCollection) else [collection]
    for metric in metrics:
        if isinstance(metric, _MeanMetric):
            metric._update_explanation(images, masks, targets, ground_truth)
