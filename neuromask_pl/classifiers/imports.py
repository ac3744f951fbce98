"""Importing what a user names: ``"package.module:callable"`` factories and ``"package.module.Class"`` paths."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from typing import Any


def resolve_factory(factory: str) -> Callable[..., Any]:
    """Import the callable named by ``"package.module:attribute"`` (the attribute may be dotted)."""
    module_name, sep, attr = str(factory).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"factory must look like 'package.module:callable', got {factory!r}")
    obj = import_attribute(module_name, attr, f"factory {factory!r}")
    if not callable(obj):
        raise ValueError(f"factory {factory!r} names a {type(obj).__name__}, not a callable")
    return obj


def import_object(spec: str, what: str) -> Any:
    """Import the object named ``"package.module.Name"`` or ``"package.module:Name"``.

    Args:
        spec: the dotted or colon-separated path.
        what: the argument's name, for error messages (e.g. ``"module_class"``).
    """
    text = str(spec)
    module_name, sep, attr = text.partition(":") if ":" in text else text.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"{what} must look like 'package.module.ClassName' or 'package.module:ClassName', got {spec!r}"
        )
    return import_attribute(module_name, attr, f"{what} {spec!r}")


def import_attribute(module_name: str, attr: str, what: str) -> Any:
    """Import ``module_name`` and return its (dotted) attribute ``attr``; ``what`` names it in errors."""
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"could not import module {module_name!r} of {what}: {e}; is the package installed and on the Python path?"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} ({what})")
        obj = getattr(obj, part)
    return obj


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` Did you mean 'a', 'b'?`` for up to three choices close to ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), list(choices), n=3)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""
