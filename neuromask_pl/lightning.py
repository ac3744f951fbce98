"""neuromask-pl's Lightning classes for either Lightning package.

``lightning.pytorch`` and ``pytorch_lightning`` hold the same code under two names, and each Trainer accepts only
classes derived from its own LightningModule, Callback and LightningDataModule. neuromask-pl's LightningModule,
callbacks and DataModules derive from both packages' classes, so either Trainer, LightningCLI (jsonargparse's
subclass checks) and Hydra accept them, from either import::

    from neuromask_pl import NeuroMask, MaskWriter, ExplanationLogger      # pytorch_lightning's code first
    from neuromask_pl.lightning import NeuroMask, MaskWriter, ...          # lightning.pytorch's code first

    L.Trainer(inference_mode=False, callbacks=[MaskWriter()]).predict(NeuroMask(net), datamodule=...)

The two imports differ only in which package's inherited code comes first. Lightning checks which hooks a module
overrides by comparing code with its own LightningModule's, so a NeuroMask takes the class of the Trainer's package
(the other import's) when a Trainer attaches itself to it: ``type(module)`` may change from one to the other. A
subclass of one of them runs under its own package's Trainer only; under the other's, it is told which to derive from.
Everything else (settings, Explanation, classifiers, metrics, the store) is shared: import it from
:mod:`neuromask_pl`.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

try:
    import lightning.pytorch
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "neuromask_pl.lightning needs the `lightning` package (pip install lightning); "
        "projects on `pytorch_lightning` import from neuromask_pl directly"
    ) from error

import pytorch_lightning as pl

import neuromask_pl.callbacks as _callbacks
import neuromask_pl.data as _data
import neuromask_pl.data.localisation as _localisation
import neuromask_pl.module as _module

_OURS = "neuromask_pl"
_REBASED: dict[type, type] = {}


def rebase(cls: type) -> type:
    """``cls`` with every ``pytorch_lightning`` class among its ancestors replaced by its ``lightning.pytorch`` twin."""
    if cls in _REBASED:
        return _REBASED[cls]
    module = cls.__module__
    if module == "pytorch_lightning" or module.startswith("pytorch_lightning."):
        twin_module = importlib.import_module("lightning.pytorch" + module[len("pytorch_lightning") :])
        twin = getattr(twin_module, cls.__qualname__)
    elif module.startswith(_OURS) and any(b is not rebase(b) for b in cls.__bases__):
        namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        twin = type(cls)(cls.__name__, tuple(rebase(b) for b in cls.__bases__), namespace)
        twin.__module__, twin.__qualname__ = __name__, cls.__name__
        for name, value in namespace.items():  # zero-argument super() must see the twin, not cls
            rebound = _rebind(value, twin)
            if rebound is not value:
                setattr(twin, name, rebound)
    else:
        twin = cls
    _REBASED[cls] = twin
    return twin


def _rebind(value: Any, owner: type) -> Any:
    """A copy of a function (or property, static- or classmethod) whose ``__class__`` cell names ``owner``."""
    if isinstance(value, (staticmethod, classmethod)):
        func = _rebind(value.__func__, owner)
        return value if func is value.__func__ else type(value)(func)
    if isinstance(value, property):
        parts = [_rebind(f, owner) if f is not None else None for f in (value.fget, value.fset, value.fdel)]
        return value if parts == [value.fget, value.fset, value.fdel] else property(*parts, doc=value.__doc__)
    if not isinstance(value, types.FunctionType) or "__class__" not in value.__code__.co_freevars:
        return value
    cells = tuple(
        types.CellType(owner) if name == "__class__" else cell
        for name, cell in zip(value.__code__.co_freevars, value.__closure__)
    )
    func = types.FunctionType(value.__code__, value.__globals__, value.__name__, value.__defaults__, cells)
    func.__kwdefaults__, func.__qualname__, func.__doc__ = value.__kwdefaults__, value.__qualname__, value.__doc__
    func.__dict__.update(value.__dict__)
    return func


def both(cls: type, lightning_first: bool) -> type:
    """``cls`` (a class of neuromask_pl on ``pytorch_lightning``) derived from both packages' Lightning class.

    With ``lightning_first``, ``lightning.pytorch``'s code comes first (``rebase(cls)`` and then ``pytorch_lightning``'s
    class); without, ``cls`` and then ``lightning.pytorch``'s class.
    """
    plain = next(base for base in _LIGHTNING_BASES if issubclass(cls, base))
    bases = (rebase(cls), plain) if lightning_first else (cls, rebase(plain))
    namespace = {"__module__": __name__ if lightning_first else _OURS, "__qualname__": cls.__qualname__}
    namespace["__doc__"] = cls.__doc__
    return type(cls)(cls.__name__, bases, namespace)


_LIGHTNING_BASES = (pl.LightningModule, pl.LightningDataModule, pl.Callback)
_CLASSES = {
    "NeuroMask": _module.NeuroMask,
    "MaskWriter": _callbacks.MaskWriter,
    "ExplanationLogger": _callbacks.ExplanationLogger,
    "ExplainDuringTraining": _callbacks.ExplainDuringTraining,
    "ImageFolderDataModule": _data.ImageFolderDataModule,
    "TensorDataModule": _data.TensorDataModule,
    "DemoDataModule": _data.DemoDataModule,
    "LocalisationDataModule": _localisation.LocalisationDataModule,
}
PYTORCH_LIGHTNING_FIRST = {name: both(cls, lightning_first=False) for name, cls in _CLASSES.items()}
"""The classes that :mod:`neuromask_pl` exports: ``pytorch_lightning``'s code first, accepted by either Trainer."""
LIGHTNING_FIRST = {name: both(cls, lightning_first=True) for name, cls in _CLASSES.items()}
"""The classes exported here: ``lightning.pytorch``'s code first, accepted by either Trainer."""
_TWIN = {
    PYTORCH_LIGHTNING_FIRST["NeuroMask"]: LIGHTNING_FIRST["NeuroMask"],
    LIGHTNING_FIRST["NeuroMask"]: PYTORCH_LIGHTNING_FIRST["NeuroMask"],
}


def _attach_trainer(self: Any, trainer: Any) -> None:
    """NeuroMask's ``trainer`` setter: under a Trainer of the package whose code does not come first, the module first
    becomes its twin whose code does, so Lightning's checks of which hooks it overrides compare like with like."""
    first = {True: LIGHTNING_FIRST["NeuroMask"], False: PYTORCH_LIGHTNING_FIRST["NeuroMask"]}
    on_lightning = isinstance(trainer, lightning.pytorch.Trainer)
    if (on_lightning or isinstance(trainer, pl.Trainer)) and not isinstance(self, first[on_lightning]):
        twin = _TWIN.get(type(self))
        if twin is None:
            imports = ["neuromask_pl", "neuromask_pl.lightning"]
            ours, theirs = imports[::-1] if on_lightning else imports
            raise TypeError(
                f"{type(self).__qualname__} derives from {theirs}.NeuroMask, whose subclasses run under "
                f"{'pytorch_lightning' if on_lightning else 'lightning'}'s Trainer; to run under "
                f"{'lightning' if on_lightning else 'pytorch_lightning'}'s, derive it from {ours}.NeuroMask"
            )
        self.__class__ = twin
    base = lightning.pytorch.LightningModule if isinstance(self, first[True]) else pl.LightningModule
    base.trainer.fset(self, trainer)


for _cls, _base in ((PYTORCH_LIGHTNING_FIRST["NeuroMask"], pl), (LIGHTNING_FIRST["NeuroMask"], lightning.pytorch)):
    _cls.trainer = property(_base.LightningModule.trainer.fget, _attach_trainer, doc="The Trainer attached, if any.")

NeuroMask = LIGHTNING_FIRST["NeuroMask"]
MaskWriter = LIGHTNING_FIRST["MaskWriter"]
ExplanationLogger = LIGHTNING_FIRST["ExplanationLogger"]
ExplainDuringTraining = LIGHTNING_FIRST["ExplainDuringTraining"]
ImageFolderDataModule = LIGHTNING_FIRST["ImageFolderDataModule"]
TensorDataModule = LIGHTNING_FIRST["TensorDataModule"]
DemoDataModule = LIGHTNING_FIRST["DemoDataModule"]
LocalisationDataModule = LIGHTNING_FIRST["LocalisationDataModule"]

__all__ = [
    "LIGHTNING_FIRST",
    "PYTORCH_LIGHTNING_FIRST",
    "DemoDataModule",
    "ExplainDuringTraining",
    "ExplanationLogger",
    "ImageFolderDataModule",
    "LocalisationDataModule",
    "MaskWriter",
    "NeuroMask",
    "TensorDataModule",
    "both",
    "rebase",
]
