"""Classifier wrappers: [0, 1] RGB images in, logits out, input normalisation inside.

Every wrapper is an ``nn.Module`` in eval mode with the attributes ``class_names``
(``list[str] | None``), ``source_file`` (the weights/model file it was loaded from, or None)
and ``in_channels``. Files are loaded on CPU with ``weights_only=True`` (no arbitrary code
runs, unless a Lightning checkpoint is explicitly trusted) and ``strict=True``; bad files raise
``FileNotFoundError``/``ValueError`` naming the path. A model whose forward returns a tuple or a
dict is explained through ``output``, the index or key of its logits.

Modules: ``wrappers`` (the wrappers and ``Normalize``), ``checkpoint`` (Lightning checkpoints),
``external`` (Hugging Face and timm models), ``weights`` (state_dict files), ``trust`` (what a
checkpoint could make us run, and the user's allow-list), ``files`` (paths, class-name files,
hashes), ``imports`` (``module:factory`` and dotted class paths).
"""

from __future__ import annotations

from neuromask_pl.classifiers.checkpoint import LightningCheckpointClassifier, submodule
from neuromask_pl.classifiers.external import HuggingFaceClassifier, TimmClassifier
from neuromask_pl.classifiers.files import file_sha256
from neuromask_pl.classifiers.imports import resolve_factory
from neuromask_pl.classifiers.wrappers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassifierWrapper,
    EfficientNetLite0,
    FactoryClassifier,
    Normalize,
    TorchScriptClassifier,
    TorchvisionClassifier,
    describe_classifier,
    imagenet_class_names,
    select_output,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClassifierWrapper",
    "EfficientNetLite0",
    "FactoryClassifier",
    "HuggingFaceClassifier",
    "LightningCheckpointClassifier",
    "Normalize",
    "TimmClassifier",
    "TorchScriptClassifier",
    "TorchvisionClassifier",
    "describe_classifier",
    "file_sha256",
    "imagenet_class_names",
    "resolve_factory",
    "select_output",
    "submodule",
]
