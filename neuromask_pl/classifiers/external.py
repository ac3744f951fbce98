"""Classifiers of other libraries: Hugging Face ``transformers`` image classifiers and timm models.

Neither library is a dependency: each is imported only when its wrapper is built. Nothing is
downloaded: a Hugging Face model is given in memory or as a local ``save_pretrained`` folder, a
timm model is built with ``pretrained=False`` and given its weights from a local file.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from neuromask_pl.classifiers.files import existing_file, read_class_names
from neuromask_pl.classifiers.imports import did_you_mean
from neuromask_pl.classifiers.weights import load_weights
from neuromask_pl.classifiers.wrappers import ClassifierWrapper, Normalize, imagenet_class_names

logger = logging.getLogger(__name__)


class HuggingFaceClassifier(ClassifierWrapper):
    """A Hugging Face image classifier (``AutoModelForImageClassification``): its ``.logits`` explained.

    The input normalisation is the model's own when it says it: ``image_mean``/``image_std`` of
    its config, or of the ``preprocessor_config.json`` beside a saved model; [0, 1] images are
    what its processor gives after ``rescale_factor`` 1/255. Class names come from ``id2label``.

    Args:
        model_or_path: the model (an ``nn.Module`` whose forward returns an output with
            ``logits``), or a local folder written by ``save_pretrained`` (loaded on CPU with
            ``local_files_only=True``; no remote code; ``source_file``, hashed in run records, is
            its weights file).
        mean: per-channel input mean, overriding the model's own.
        std: per-channel input standard deviation, overriding the model's own.
        class_names: list of names, a text file with one name per line, or None (``id2label``).
        output: where the logits are in the model's output (``"logits"``; an index if its
            config has ``return_dict=False``).
        resize_to: the size a fixed-size model takes (e.g. 224 for a ViT); see :class:`ClassifierWrapper`.
    """

    def __init__(
        self,
        model_or_path: nn.Module | str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: list[str] | str | None = None,
        output: int | str | None = "logits",
        resize_to: int | tuple[int, int] | None = None,
    ) -> None:
        source = None
        processor: dict[str, Any] = {}
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            source = os.path.expanduser(os.fspath(model_or_path))
            model = _load_pretrained(source)
            processor = _read_json(os.path.join(source, "preprocessor_config.json"))
        config = getattr(model, "config", None)
        if mean is None and std is None:
            mean, std = _model_normalisation(config, processor, source or type(model).__name__)
        names = read_class_names(class_names) if class_names is not None else _id2label_names(config)
        channels = getattr(config, "num_channels", None)
        weights = _weights_file(source) if source is not None else None
        super().__init__(
            model, Normalize(mean, std), names, source_file=weights, in_channels=channels, output=output,
            resize_to=resize_to,
        )  # fmt: skip


class TimmClassifier(ClassifierWrapper):
    """A timm architecture (``timm.create_model(name, pretrained=False)``) with weights from a local file.

    The input normalisation is the model's ``pretrained_cfg`` mean and std unless given.

    Args:
        name: timm model name, e.g. ``"resnet18d"`` (see ``timm.list_models()``).
        weights: a state_dict file (``torch.save`` or ``.safetensors``), or a checkpoint with a
            ``"state_dict"`` key; None keeps the random initialisation.
        num_classes: number of outputs of the classification head (default: the model's).
        mean: per-channel input mean (default: the model's ``pretrained_cfg``).
        std: per-channel input standard deviation (default: the model's ``pretrained_cfg``).
        class_names: list of names, a text file with one name per line, or None (ImageNet names
            when the model has 1000 classes).
        kwargs: further keyword arguments of ``timm.create_model`` (e.g. ``in_chans``).
        state_dict_prefix: take only the weights whose keys start with it (e.g. ``"net."``).
        resize_to: the size a fixed-size model takes; see :class:`ClassifierWrapper`.
    """

    def __init__(
        self,
        name: str,
        weights: str | None = None,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: list[str] | str | None = None,
        kwargs: dict[str, Any] | None = None,
        state_dict_prefix: str | None = None,
        resize_to: int | tuple[int, int] | None = None,
    ) -> None:
        timm = _import("timm", "TimmClassifier")
        if not timm.is_model(name):
            hint = did_you_mean(name, timm.list_models())
            raise ValueError(f"unknown timm model {name!r}.{hint} List the valid names with timm.list_models().")
        options = dict(kwargs or {}) | ({"num_classes": num_classes} if num_classes is not None else {})
        model = timm.create_model(name, pretrained=False, **options)
        if weights is not None:
            weights = existing_file(weights, "weights")
            load_weights(model, weights, state_dict_prefix)
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        if mean is None and std is None:
            mean, std = cfg.get("mean"), cfg.get("std")
        classes = getattr(model, "num_classes", None)
        if class_names is None and classes == 1000:
            class_names = imagenet_class_names()
        names = read_class_names(class_names, classes)
        super().__init__(
            model, Normalize(mean, std), names, source_file=weights, in_channels=options.get("in_chans"),
            resize_to=resize_to,
        )  # fmt: skip


def _import(package: str, needed_by: str) -> Any:
    """Import an optional library, or say how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(
            f"{needed_by} needs the package {package!r} ({e}); install it with: pip install {package}"
        ) from e


def _load_pretrained(folder: str) -> nn.Module:
    """``AutoModelForImageClassification.from_pretrained(folder)`` from local files only, on CPU."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Hugging Face model folder not found: {folder!r}; give a folder written by save_pretrained, or the model"
        )
    transformers = _import("transformers", "HuggingFaceClassifier")
    try:
        return transformers.AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"could not load an image classifier from {folder}: {str(e).splitlines()[0][:300]}; is it a folder "
            "written by save_pretrained of a model for image classification?"
        ) from e


def _weights_file(folder: str) -> str | None:
    """The weights file of a ``save_pretrained`` folder (the index of sharded weights), hashed in run records."""
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _model_normalisation(config: Any, processor: dict[str, Any], where: str) -> tuple[Any, Any]:
    """``(image_mean, image_std)`` from the model's config, else from its processor config; else none."""
    for source in (vars(config) if config is not None else {}, processor):
        if source.get("image_mean") is not None and source.get("image_std") is not None:
            if source.get("do_normalize", True) is False:
                return None, None
            return source["image_mean"], source["image_std"]
    logger.info("%s says no image_mean/image_std: its inputs are not normalised (give mean= and std=)", where)
    return None, None


def _id2label_names(config: Any) -> list[str] | None:
    """Class names from ``config.id2label`` when it names every index 0..n-1."""
    labels = getattr(config, "id2label", None) or {}
    names = {int(k): str(v) for k, v in labels.items()}
    return [names[i] for i in range(len(names))] if names and set(names) == set(range(len(names))) else None
