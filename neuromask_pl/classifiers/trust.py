"""What a checkpoint could make us run, found without running it, and the user's allow-list.

A checkpoint is data until the user says it is trusted. Two things in one can name code: pickled
Python objects (refused by ``torch.load(weights_only=True)``) and ``class_path`` entries in its
hyper-parameters, plain dicts and strings that Lightning's instantiator (jsonargparse) imports and
calls. This module finds both, so that a loader can refuse them with the key that holds them, and
builds exactly the classes a user has listed as trusted.
"""

from __future__ import annotations

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
