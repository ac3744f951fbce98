"""Lightning checkpoints (``.ckpt``) as classifiers: ``LightningModule.load_from_checkpoint`` with readable errors."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import pickle
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.migration import migrate_checkpoint, pl_legacy_patch
from torch import nn

from neuromask_pl.classifiers.files import existing_file, load_failure_reason, read_class_names
from neuromask_pl.classifiers.imports import import_object
from neuromask_pl.classifiers.trust import (
    Inert,
    build_class_paths,
    find_class_paths,
    find_inert,
    held_objects,
    inert_in_network,
    inert_stand_ins,
    resolve_trusted,
    top_package,
    torch_layer_classes,
    unsafe_globals,
    ways_on,
)
from neuromask_pl.classifiers.weights import load_state_dict_strict
from neuromask_pl.classifiers.wrappers import ClassifierWrapper, Normalize

logger = logging.getLogger(__name__)

# Modules whose objects torch's weights_only unpickler refuses outright, even when allowed (its blocklist).
_NEVER_UNPICKLED = ("os", "posix", "nt", "sys")
# Instantiators that Lightning itself trusts in checkpoints written under LightningCLI.
_LIGHTNING_INSTANTIATORS = ("pytorch_lightning.cli.instantiate_module", "lightning.pytorch.cli.instantiate_module")


class LightningCheckpointClassifier(ClassifierWrapper):
    """A LightningModule restored from a Lightning checkpoint (``.ckpt``), loaded on CPU.

    The class is imported, built from the checkpoint's ``hyper_parameters`` (what
    ``save_hyperparameters()`` recorded) and given its ``state_dict`` with ``strict=True``, as
    ``LightningModule.load_from_checkpoint`` does, but with a readable error for each way
    this can fail. ``on_load_checkpoint`` and ``configure_model`` are called if overridden.

    The checkpoint is data unless you say it is trusted: by default nothing it names is
    imported or called. The module is built as ``module_class(**hyper_parameters)`` from plain
    values; a file that holds pickled objects (a network saved among the hyper-parameters) or a
    ``class_path`` in the hyper-parameters (a LightningCLI checkpoint whose module takes a class)
    is refused, saying what it holds. Three ways on (docs/checkpoints.md): the network's weights
    alone with ``FactoryClassifier(..., weights=<ckpt>, state_dict_prefix="net.")``; for a file you
    trust, ``trusted=[...]`` names the classes it may unpickle and build (``weights_only`` stays on,
    torch.nn's own layer classes come with them, and every other pickled object, such as the
    template's Hydra partials of the optimiser and scheduler, is read as inert data that is never
    called: explaining needs only the network); or ``weights_only=False`` trusts the whole file as
    Lightning does: full unpickling, and LightningCLI's instantiator builds the classes it names.

    Args:
        module_class: the LightningModule class, ``"package.module.ClassName"`` or
            ``"package.module:ClassName"``.
        checkpoint: the ``.ckpt`` file (``Trainer.save_checkpoint`` or ``ModelCheckpoint``).
        weights_only: treat the file as data: unpickle only tensors and plain containers, and
            instantiate no class path found in it (safe). ``False`` trusts the file, which can then
            run any code it asks for: use it only for a file you trust.
        model_attribute: dotted attribute of the LightningModule to explain (e.g. ``"net"``)
            instead of the LightningModule's own forward.
        output: index or key of the logits if the model returns a tuple or dict.
        mean: per-channel input mean, or None for no normalisation.
        std: per-channel input standard deviation, or None.
        class_names: list of names, a text file with one name per line, or None.
        trusted: classes (or functions) the checkpoint may hold pickled or name as a class_path,
            e.g. ``["my_project.models.SimpleConvNet"]`` for a network saved among the
            hyper-parameters; the file is loaded with ``weights_only=True`` plus exactly these and
            the torch.nn layer classes (``nn.Module`` subclasses of ``torch.nn``) it holds pickled;
            any other pickled object is read as inert data (never called; the network may not hold
            one). Not with ``weights_only=False``, which trusts everything.
        in_channels: image channels the network takes (1 grey, 3 RGB); default: inferred (see
            ``ClassifierWrapper``), e.g. 1 from ``mean=0.1307``.
    """

    def __init__(
        self,
        module_class: str,
        checkpoint: str,
        weights_only: bool = True,
        model_attribute: str | None = None,
        output: int | str | None = None,
        mean: Sequence[float] | float | None = None,
        std: Sequence[float] | float | None = None,
        class_names: list[str] | str | None = None,
        trusted: list[str] | None = None,
        in_channels: int | None = None,
    ) -> None:
        cls = _lightning_module_class(module_class)
        path = _checkpoint_file(checkpoint)
        names = read_class_names(class_names)
        allowed = resolve_trusted(trusted)
        if trusted and not weights_only:
            raise ValueError(
                "trusted= names the only classes a checkpoint may unpickle and build, with weights_only=True; "
                "weights_only=False trusts every class instead: give one of them"
            )
        # The user's own packages: the LightningModule's. Only their classes are ever suggested for trust.
        reading = _Reading(path, {top_package(module_class), top_package(cls.__module__)}, model_attribute)
        ckpt = _load_lightning_checkpoint(reading, bool(weights_only), allowed)
        module = _instantiate_from_checkpoint(cls, ckpt, reading, trust_all=not weights_only, allowed=allowed)
        _refuse_inert_network(module, reading)
        if type(module).configure_model is not _lightning_base(cls).configure_model:
            module.configure_model()
        module.on_load_checkpoint(ckpt)
        load_state_dict_strict(module, ckpt["state_dict"], path)
        model = submodule(module, model_attribute) if model_attribute else module
        _refuse_inert_network(model, reading, model_attribute)
        super().__init__(model, Normalize(mean, std), names, source_file=path, in_channels=in_channels, output=output)


class _Reading:
    """What a refusal names: the checkpoint file, the user's own packages and the network's attribute."""

    def __init__(self, path: str, own: set[str], model_attribute: str | None) -> None:
        self.path, self.own, self.model_attribute = path, own, model_attribute

    def ways_on(self, names: list[str]) -> str:
        return ways_on(self.path, names, self.own, self.model_attribute)


def _refuse_inert_network(module: nn.Module, reading: _Reading, model_attribute: str | None = None) -> None:
    """A network cannot run with an object read as inert data in it: refuse, naming where each is."""
    held = inert_in_network(module, model_attribute or "")
    if held:
        where = ", ".join(f"{key} ({name})" for key, name in held)
        raise ValueError(
            f"{reading.path}: the network holds pickled objects that are neither torch.nn layers nor trusted, read as "
            f"inert data: {where}. Unpickling them runs code that the file chooses; "
            + reading.ways_on(sorted({name for _, name in held}))
        )


def _lightning_module_class(spec: str) -> type[pl.LightningModule]:
    """Import the LightningModule class named ``"package.module.Class"`` or ``"package.module:Class"``.

    A subclass of ``pytorch_lightning.LightningModule`` or of ``lightning.pytorch.LightningModule``
    (two different classes) is accepted.
    """
    cls = import_object(spec, "module_class")
    if not isinstance(cls, type) or _lightning_base(cls) is None:
        kind = "a torch.nn.Module class" if isinstance(cls, type) and issubclass(cls, nn.Module) else type(cls).__name__
        raise TypeError(
            f"module_class {spec!r} names {kind}, not a LightningModule subclass; for a plain nn.Module "
            "with a state_dict file use FactoryClassifier(factory, kwargs, weights)"
        )
    return cls


def _lightning_base(cls: type) -> type[pl.LightningModule] | None:
    """The LightningModule class of either package that ``cls`` derives from, or None.

    ``lightning`` is never imported here: a class derived from its LightningModule was defined
    by code that imported it already.
    """
    unified = sys.modules.get("lightning.pytorch")
    bases = [pl.LightningModule] + ([unified.LightningModule] if unified is not None else [])
    return next((base for base in bases if issubclass(cls, base)), None)


def _checkpoint_file(path: str | os.PathLike[str]) -> str:
    """The checkpoint path, checked to be a single file."""
    resolved = os.path.expanduser(os.fspath(path))
    if os.path.isdir(resolved):
        raise ValueError(
            f"checkpoint {resolved!r} is a directory (a sharded DeepSpeed/FSDP checkpoint?); consolidate it into "
            "a single .ckpt file first (see Lightning's docs on consolidating sharded checkpoints)"
        )
    return existing_file(resolved, "checkpoint")


def _load_lightning_checkpoint(reading: _Reading, weights_only: bool, allowed: Mapping[str, Any]) -> dict[str, Any]:
    """Load and migrate a Lightning checkpoint on CPU; it must hold a ``state_dict``.

    With ``weights_only``, the objects in ``allowed`` (the user's trusted classes) may be unpickled too,
    and with them the torch.nn layer classes that the file names; every other object the file pickles is
    then read as inert data (never called).
    """
    path = reading.path
    safe: dict[str, Any] = dict(allowed)
    stand_ins: list[Any] = []
    if allowed and weights_only:
        names = unsafe_globals(path)
        safe |= torch_layer_classes(names)
        stand_ins = inert_stand_ins([name for name in names if name not in safe])
    objects = list({id(v): v for v in safe.values()}.values()) + stand_ins
    try:
        with pl_legacy_patch(), _safe_globals(objects):
            ckpt = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        text = str(e)
        rejected = weights_only and isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text
        found = (unsafe_globals(path) or sorted(set(re.findall(r"GLOBAL ([\w.]+)", text)))) if rejected else []
        refused = [name for name in found if name not in safe]
        blocked = [name for name in refused if top_package(name) in _NEVER_UNPICKLED]
        if blocked:
            raise ValueError(
                f"{path} holds pickled Python objects besides tensors: {held_objects(found, reading.own)}. "
                f"{', '.join(blocked)} belong to modules that torch's safe unpickler never reads, not even as inert "
                "data, and that no model checkpoint needs: treat the file as hostile, and never load it with "
                "weights_only=False"
            ) from e
        if refused:
            raise ValueError(
                f"{path} holds pickled Python objects besides tensors: {held_objects(found, reading.own)}. "
                "Unpickling them runs code that the file chooses, so they are refused unless trusted. "
                + reading.ways_on(found)
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
            reason, trust = load_failure_reason(e), ""
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
    inert = find_inert({key: value for key, value in ckpt.items() if key != "state_dict"})
    if inert:
        logger.info(
            "%s: read as inert data, never called (not trusted; explaining needs only the network): %s",
            path,
            ", ".join(f"{key} ({name})" for key, name in inert),
        )
    return ckpt


def _safe_globals(objects: list[Any]) -> contextlib.AbstractContextManager[Any]:
    """``torch.serialization.safe_globals(objects)``: what ``weights_only`` loading may unpickle besides tensors."""
    if not objects:
        return contextlib.nullcontext()
    if not hasattr(torch.serialization, "safe_globals"):
        raise ValueError(f"trusted= needs torch >= 2.5 (torch.serialization.safe_globals); this is {torch.__version__}")
    return torch.serialization.safe_globals(objects)


def _instantiate_from_checkpoint(
    cls: type[pl.LightningModule], ckpt: dict[str, Any], reading: _Reading, trust_all: bool, allowed: Mapping[str, Any]
) -> pl.LightningModule:
    """Build ``cls`` from the checkpoint's hyper-parameters, after checking that ``cls`` takes them.

    Unless ``trust_all``, nothing the file names is imported or called: a ``class_path`` in the
    hyper-parameters is built only if its class is in ``allowed`` (the user's trusted classes) and
    refused otherwise, and the module is built as ``cls(**hyper_parameters)`` (never through
    Lightning's instantiator, which imports whatever a value names).
    """
    path = reading.path
    raw = ckpt.get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {}
    if isinstance(raw, Inert):  # e.g. an OmegaConf DictConfig that save_hyperparameters(cfg) kept
        raise ValueError(
            f"{path}: the hyper-parameters are a pickled {raw.global_name}, read as inert data since it is not "
            "trusted. " + reading.ways_on([raw.global_name])
        )
    hparams = dict(raw if isinstance(raw, Mapping) else vars(raw))  # vars: an argparse.Namespace (old checkpoints)
    instantiator = hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path", None)
    if class_path is not None and class_path != f"{cls.__module__}.{cls.__qualname__}":
        logger.warning("%s was saved from %s; building %s as asked", path, class_path, cls.__qualname__)
    if instantiator is not None and instantiator not in _LIGHTNING_INSTANTIATORS:
        raise ValueError(
            f"{path} asks for the instantiator {instantiator!r}, which is not Lightning's; refusing to call it"
        )
    specs = [] if trust_all else [(key, spec) for key, spec in find_class_paths(hparams) if spec not in allowed]
    if specs:
        listing = "; ".join(f"hyper-parameter {key!r} names the class {spec!r} (class_path)" for key, spec in specs)
        raise ValueError(
            f"{path}: {listing}. Loading would import and instantiate it, running code that the file chooses, so it "
            "is refused for a file not marked as trusted. " + reading.ways_on(sorted({spec for _, spec in specs}))
        )
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    required = [p.name for p in params if p.name in named and p.default is p.empty]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    kwargs: dict[str, Any] = hparams
    hparams_name = ckpt.get(cls.CHECKPOINT_HYPER_PARAMS_NAME)
    if hparams_name and hparams_name in named:  # __init__(self, hparams) style: the dict is one argument
        hp_type = ckpt.get(cls.CHECKPOINT_HYPER_PARAMS_TYPE)
        trusted_type = trust_all or any(hp_type is obj for obj in allowed.values())
        kwargs = {hparams_name: hp_type(hparams) if trusted_type and callable(hp_type) else hparams}
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
    if instantiator is not None and trust_all:
        from pytorch_lightning.cli import instantiate_module

        return instantiate_module(cls, kwargs)
    return cls(**(kwargs if trust_all else build_class_paths(kwargs, allowed)))


def submodule(module: nn.Module, attribute: str) -> nn.Module:
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
