"""The classifiers shipped for the localisation benchmark (:mod:`neuromask_pl.data.localisation`)."""

from __future__ import annotations

from torch import nn

from neuromask_pl.classifiers.wrappers import FactoryClassifier
from neuromask_pl.data.localisation import CLASS_NAMES, checkpoint_path


def load_benchmark_classifier(variant: str = "clean") -> nn.Module:
    """The shipped SmallCNN trained on the ``clean``, the ``spurious`` or the ``planted`` variant, in eval mode.

    Loaded with ``weights_only=True`` and ``strict=True`` through
    :class:`~neuromask_pl.classifiers.FactoryClassifier`; ``class_names`` are ``"0"``..``"9"`` and
    ``source_file`` is the checkpoint. Its accuracy is in ``neuromask_pl/assets/localisation_metrics.json``
    (written by ``benchmarks/train_localisation_classifier.py``).

    Raises:
        ValueError: for an unknown variant.
        FileNotFoundError: if the checkpoint is missing.
    """
    return FactoryClassifier(
        "neuromask_pl.data.localisation:SmallCNN",
        {"num_classes": 10},
        weights=checkpoint_path(variant),
        class_names=CLASS_NAMES,
    )
