"""neuromask-pl: explain image classifiers by mask learning (NeuroMask) with PyTorch Lightning."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"
DEMO_INSTALL_HINT = "pip install 'neuromask-pl[demo]'"  # what the demo's extra packages need

# Public names and the module that defines each; imported on first use so that
# `import neuromask_pl` stays light.
_EXPORTS = {
    "NeuroMask": "neuromask_pl.module",
    "Explainer": "neuromask_pl.explainer",
    "FastPath": "neuromask_pl.fastcopy",
    "Explanation": "neuromask_pl.explanation",
    "MaskSettings": "neuromask_pl.settings",
    "PRESETS": "neuromask_pl.settings",
    "DemoDataModule": "neuromask_pl.data",
    "ImageFolderDataModule": "neuromask_pl.data",
    "TensorDataModule": "neuromask_pl.data",
    "EfficientNetLite0": "neuromask_pl.classifiers",
    "TorchvisionClassifier": "neuromask_pl.classifiers",
    "TorchScriptClassifier": "neuromask_pl.classifiers",
    "FactoryClassifier": "neuromask_pl.classifiers",
    "LightningCheckpointClassifier": "neuromask_pl.classifiers",
    "ClassifierWrapper": "neuromask_pl.classifiers",
    "Normalize": "neuromask_pl.classifiers",
    "HuggingFaceClassifier": "neuromask_pl.classifiers",
    "TimmClassifier": "neuromask_pl.classifiers",
    "MaskWriter": "neuromask_pl.callbacks",
    "ExplanationLogger": "neuromask_pl.callbacks",
    "ExplainDuringTraining": "neuromask_pl.callbacks",
    "load_results": "neuromask_pl.results",
    "explain_folder": "neuromask_pl.explain",
    "explain_checkpoint": "neuromask_pl.explain",
    "LocalisationDataModule": "neuromask_pl.data.localisation",
    "load_benchmark_classifier": "neuromask_pl.classifiers.benchmark",
    "analyze": "neuromask_pl.analysis",
    "StrategyAnalysis": "neuromask_pl.analysis",
}

# The Lightning classes: where the `lightning` package is installed too, these are derived from both packages'
# classes (neuromask_pl.lightning.PYTORCH_LIGHTNING_FIRST), so that either Trainer accepts them.
_EITHER_TRAINER = {
    "NeuroMask",
    "MaskWriter",
    "ExplanationLogger",
    "ExplainDuringTraining",
    "ImageFolderDataModule",
    "TensorDataModule",
    "DemoDataModule",
    "LocalisationDataModule",
}

__all__ = [*_EXPORTS, "DEMO_INSTALL_HINT", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EITHER_TRAINER and importlib.util.find_spec("lightning") is not None:
        value = importlib.import_module("neuromask_pl.lightning").PYTORCH_LIGHTNING_FIRST[name]
        globals()[name] = value  # one class, however often it is asked for
        return value
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'neuromask_pl' has no attribute {name!r}")
