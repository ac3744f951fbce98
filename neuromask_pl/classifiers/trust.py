"""What a checkpoint could make us run, found without running it, and the user's allow-list.

A checkpoint is data until the user says it is trusted. Two things in one can name code: pickled
Python objects (refused by ``torch.load(weights_only=True)``) and ``class_path`` entries in its
hyper-parameters, plain dicts and strings that Lightning's instantiator (jsonargparse) imports and
calls. This module finds both, so that a loader can refuse them with the key that holds them, and
builds exactly the classes a user has listed as trusted. A pickled object that is not trusted can
also be read as :class:`Inert` data, which takes its place and runs nothing.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from neuromask_pl.classifiers.imports import import_object


def find_class_paths(value: Any, key: str = "") -> list[tuple[str, str]]:
    """Every ``{"class_path": ...}`` spec inside ``value``, as ``(key, class_path)``.

    Args:
        value: hyper-parameters (dicts, lists, tuples and plain values, at any depth).
        key: the name of ``value`` itself; nested keys are written ``a.b[0].c``.
    """
    found: list[tuple[str, str]] = []
    if isinstance(value, Mapping):
        if "class_path" in value:
            found.append((key or "class_path", str(value["class_path"])))
        for name, item in value.items():
            if name != "class_path":
                found += find_class_paths(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found += find_class_paths(item, f"{key}[{i}]")
    return found


def unsafe_globals(path: str | os.PathLike[str]) -> list[str]:
    """The Python objects that unpickling a ``torch.save`` file would import beyond ``weights_only``'s
    defaults, found by reading its pickle without running it; [] when the file cannot be scanned."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.6
    if scan is None:
        return []
    try:
        return sorted(set(scan(os.fspath(path))))
    except Exception:  # not a zip-format torch.save file: the load itself reports what is wrong
        return []


def torch_layer_classes(names: Iterable[str]) -> dict[str, type]:
    """The names among ``names`` that are torch's own layer classes (``nn.Module`` subclasses of ``torch.nn``).

    A network pickled into a checkpoint names the torch.nn layers it is built of; once a user trusts
    the file's own classes, these come with them. Only modules loaded already are looked in: a name
    never makes anything be imported.
    """
    layers: dict[str, type] = {}
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = sys.modules.get(module_name) if module_name.startswith("torch.nn.") else None
        obj = getattr(module, attr, None)
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module_name:
            layers[name] = obj
    return layers


def resolve_trusted(names: Sequence[str] | None) -> dict[str, Any]:
    """Import the classes (or functions) a user trusts, keyed by the name given and by their own path.

    ``"torch.nn.Conv2d"`` is also found as ``"torch.nn.modules.conv.Conv2d"``, the name a pickle
    and a class_path use.
    """
    if names is None:
        return {}
    if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in names):
        raise TypeError(
            f"trusted must be a list of class paths such as ['torch.nn.Linear'], got {type(names).__name__} {names!r}"
        )
    allowed: dict[str, Any] = {}
    for name in names:
        obj = import_object(name, "trusted")
        allowed[name] = obj
        allowed[f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"] = obj
    return allowed


def build_class_paths(value: Any, allowed: Mapping[str, Any], key: str = "") -> Any:
    """``value`` with every ``{"class_path": C, "init_args": {...}}`` replaced by ``C(**init_args)``.

    Every class path must be in ``allowed`` (see :func:`resolve_trusted`); the init args are built
    the same way, depth first. Plain values are returned as they are: nothing else is imported.
    """
    if not find_class_paths(value, key):
        return value
    if isinstance(value, Mapping) and "class_path" in value:
        spec = str(value["class_path"])
        if spec not in allowed:
            raise ValueError(f"hyper-parameter {key!r} names the class {spec!r}, which is not in trusted")
        extra = sorted(set(value) - {"class_path", "init_args", "dict_kwargs"})
        if extra:
            raise ValueError(f"hyper-parameter {key!r}: a class_path entry holds only init_args, not {extra}")
        kwargs = {**(value.get("init_args") or {}), **(value.get("dict_kwargs") or {})}
        return allowed[spec](**{name: build_class_paths(v, allowed, f"{key}.{name}") for name, v in kwargs.items()})
    if isinstance(value, Mapping):
        return {name: build_class_paths(v, allowed, f"{key}.{name}" if key else str(name)) for name, v in value.items()}
    return type(value)(build_class_paths(v, allowed, f"{key}[{i}]") for i, v in enumerate(value))


class Inert:
    """What a pickled object that is not trusted is read as: built from any arguments, it keeps nothing and runs
    nothing; calling it is an error that names it.

    Explaining needs only the network: a checkpoint's Hydra partials of the optimiser and scheduler, OmegaConf
    containers of the DataModule's settings, or a gadget such as ``posix.system`` read as inert data.
    """

    global_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{self.global_name} was read from the checkpoint as inert data, since it is not trusted: it cannot be "
            "called (list its class in trusted only if you trust the file)"
        )

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return inert, (self.global_name,)


@functools.cache
def inert_class(name: str) -> type[Inert]:
    """The :class:`Inert` class that stands for the pickled global ``name`` (one per name)."""
    return type("Inert", (Inert,), {"global_name": name})


def inert(name: str) -> Inert:
    """An :class:`Inert` object standing for ``name`` (how one is unpickled again)."""
    return inert_class(name)()


def inert_stand_ins(names: Iterable[str]) -> list[tuple[type[Inert], str]]:
    """``(class, name)`` pairs for ``torch.serialization.safe_globals``: each name is read as inert data."""
    return [(inert_class(name), name) for name in names]


def find_inert(value: Any, key: str = "") -> list[tuple[str, str]]:
    """Every :class:`Inert` object (or class) in plain data (mappings, lists, tuples, sets, ``functools.partial``
    objects, at any depth), as ``(key, global name)``; nested keys are written ``a.b[0].c``."""
    if isinstance(value, Inert) or (isinstance(value, type) and issubclass(value, Inert)):
        return [(key or "(top)", value.global_name)]
    found: list[tuple[str, str]] = []
    if isinstance(value, Mapping):
        for name, item in value.items():
            found += find_inert(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple, set, frozenset)):
        for i, item in enumerate(value):
            found += find_inert(item, f"{key}[{i}]")
    elif isinstance(value, functools.partial):
        found += find_inert([value.func, *value.args, value.keywords], key)
    return found


def inert_in_network(module: nn.Module, key: str = "") -> list[tuple[str, str]]:
    """Every :class:`Inert` object that ``module`` holds as a sub-module, or in a public attribute of one of its
    modules (of ``module`` itself too unless it is a LightningModule, whose attributes are its training set-up):
    what a network cannot run with."""
    found: list[tuple[str, str]] = []
    todo: list[tuple[str, Any]] = [(key, module)]
    seen: set[int] = set()
    while todo:
        path, sub = todo.pop()
        if isinstance(sub, Inert):
            found.append((path, sub.global_name))
            continue
        if not isinstance(sub, nn.Module) or id(sub) in seen:
            continue
        seen.add(id(sub))
        todo += [(f"{path}.{name}" if path else name, child) for name, child in vars(sub).get("_modules", {}).items()]
        if sub is not module or not _is_lightning_module(sub):
            for name, item in vars(sub).items():
                if not name.startswith("_"):
                    found += find_inert(item, f"{path}.{name}" if path else name)
    return sorted(found)


def _is_lightning_module(module: nn.Module) -> bool:
    return any(
        cls.__name__ == "LightningModule" and cls.__module__.endswith(".core.module") for cls in type(module).__mro__
    )


def top_package(name: str) -> str:
    """The top-level package of a dotted or ``module:attribute`` path."""
    return str(name).replace(":", ".").split(".")[0]


def held_objects(names: Sequence[str], own: Iterable[str]) -> str:
    """What a file's pickled globals are, grouped: the classes of the user's own packages ``own``, torch.nn's layer
    classes, and the other objects (named, never suggested for trust)."""
    own = set(own)
    layers = torch_layer_classes(names)
    mine = [name for name in names if top_package(name) in own and name not in layers]
    others = [name for name in names if name not in layers and name not in mine]
    groups = []
    if mine:
        groups.append(f"objects of your package {' and '.join(sorted(own))} ({', '.join(mine)})")
    if layers:
        groups.append(f"torch.nn layers ({', '.join(sorted(name.rpartition('.')[2] for name in layers))})")
    if others:
        groups.append(f"other objects ({', '.join(others)})")
    return ", ".join(groups[:-1]) + (" and " if len(groups) > 1 else "") + groups[-1] if groups else "objects"


def ways_on(path: str, names: Sequence[str], own: Iterable[str], model_attribute: str | None) -> str:
    """The ways to load a refused checkpoint, as docs/checkpoints.md gives them.

    Only classes of the user's own packages (``own``, e.g. the LightningModule's) are written out for ``trusted``:
    a name that the file chose elsewhere (``posix.system``) is never suggested.
    """
    own = set(own)
    mine = sorted(name for name in names if top_package(name) in own and name not in torch_layer_classes(names))
    trust = f"trusted={mine!r}" if mine else "trusted=[the network's own classes]"
    prefix = repr(f"{model_attribute}.") if model_attribute else "'net.' (the network's attribute and a dot)"
    return (
        "Three ways on: (1) the network's weights alone, nothing unpickled: FactoryClassifier(factory, kwargs, "
        f"weights={path!r}, state_dict_prefix={prefix}); (2) for a file you trust, {trust} builds the classes you "
        "list and torch.nn's layers, and reads every other object as inert data that is never called; (3) for a file "
        "you trust entirely, weights_only=False (weights_only: false in a config) unpickles everything, as "
        "LightningModule.load_from_checkpoint does"
    )
