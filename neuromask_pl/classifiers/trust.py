"""What a checkpoint could make us run, found without running it.

A checkpoint is data until the user says it is trusted. Two things in one can name code: pickled
Python objects (refused by ``torch.load(weights_only=True)``) and ``class_path`` entries in its
hyper-parameters, plain dicts and strings that Lightning's instantiator (jsonargparse) imports and
calls. This module finds both, so that a loader can refuse them with the key that holds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


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
