"""neuromask-pl for projects on the unified ``lightning`` package.

``lightning.pytorch`` and ``pytorch_lightning`` hold the same code under two names, and each Trainer accepts only
its own LightningModule class. So a project on ``lightning`` imports from here::

    import lightning as L
    from neuromask_pl.lightning import NeuroMask, MaskWriter, ExplanationLogger, ExplainDuringTraining

    L.Trainer(inference_mode=False, callbacks=[MaskWriter()]).predict(NeuroMask(net), datamodule=...)

These are the classes of :mod:`neuromask_pl` (the same code, the same behaviour) re-based on ``lightning.pytorch``'s
LightningModule, LightningDataModule and Callback classes. Everything else (settings, Explanation, classifiers,
metrics, the store) is shared: import it from :mod:`neuromask_pl`.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

try:
    import lightning.pytorch  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "neuromask_pl.lightning needs the `lightning` package (pip install lightning); "
        "projects on `pytorch_lightning` import from neuromask_pl directly"
    ) from error

import neuromask_pl.callbacks as _callbacks
import neuromask_pl.data as _data
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


NeuroMask = rebase(_module.NeuroMask)
MaskWriter = rebase(_callbacks.MaskWriter)
ExplanationLogger = rebase(_callbacks.ExplanationLogger)
ExplainDuringTraining = rebase(_callbacks.ExplainDuringTraining)
ImageFolderDataModule = rebase(_data.ImageFolderDataModule)
TensorDataModule = rebase(_data.TensorDataModule)
DemoDataModule = rebase(_data.DemoDataModule)

__all__ = [
    "DemoDataModule",
    "ExplainDuringTraining",
    "ExplanationLogger",
    "ImageFolderDataModule",
    "MaskWriter",
    "NeuroMask",
    "TensorDataModule",
    "rebase",
]
