"""State_dict files: safe loading (``weights_only``), key prefixes, strict loading with readable errors."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from neuromask_pl.classifiers.files import load_failure_reason
from neuromask_pl.classifiers.trust import Inert, inert_stand_ins, unsafe_globals

_STRIPPABLE_PREFIXES = ("module.", "model.")


def load_weights(model: nn.Module, path: str, prefix: str | None = None) -> None:
    """Load a state_dict file into ``model`` (weights_only, strict), with readable errors.

    Args:
        model: the network to load into.
        path: a state_dict file, or a dict with a ``"state_dict"`` key (a Lightning checkpoint).
            Python objects elsewhere in the file (a network among a checkpoint's
            hyper-parameters) are never unpickled: inert stand-ins take their place and are dropped.
        prefix: take only the keys that start with it, without it (``"net."`` for the weights of a
            LightningModule's ``net`` attribute). A ``module.``/``model.`` prefix on every key is
            removed in any case.
    """
    try:
        obj = _load_tensors(path)
    except ImportError:
        raise
    except Exception as e:
        raise ValueError(
            f"could not load {path}: {load_failure_reason(e)}; is it a PyTorch state_dict file (saved with "
            "torch.save(model.state_dict(), path))?"
        ) from e
    if isinstance(obj, Inert):
        raise ValueError(
            f"could not load {path}: it holds a pickled {obj.global_name} object, not a state_dict (e.g. a whole "
            "model saved with torch.save(model)); save model.state_dict() instead"
        )
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"{path} does not hold a state_dict (a non-empty dict of tensors, or a dict with a "
            "'state_dict' key); save one with torch.save(model.state_dict(), path)"
        )
    state = dict(obj)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in obj.items() if k.startswith(prefix)}
        if not state:
            starts = sorted({k.split(".")[0] + "." for k in obj})
            raise ValueError(
                f"no key of the state_dict in {path} starts with state_dict_prefix={prefix!r}; its keys start with "
                f"{', '.join(map(repr, starts[:10]))}"
            )
    expected = set(model.state_dict())
    state = _strip_prefixes(state, expected)
    held_under = _prefix_holding(state, expected)
    if held_under:
        raise ValueError(
            f"the weights in {path} are under the prefix {held_under!r} (e.g. an attribute of a LightningModule); "
            f"pass state_dict_prefix={held_under!r} to take them out"
        )
    load_state_dict_strict(model, state, path)


def _load_tensors(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, every other object the pickle names read as inert data.

    A ``.safetensors`` file (tensors only, by design) is read with the ``safetensors`` package.
    """
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"reading {path} needs the package safetensors: pip install safetensors") from e
        return load_file(path, device="cpu")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as refused:
        names = unsafe_globals(path)
        if not names or not hasattr(torch.serialization, "safe_globals"):
            raise
        try:
            with torch.serialization.safe_globals(inert_stand_ins(names)):
                return torch.load(path, weights_only=True, map_location="cpu")
        except Exception:
            raise refused from None


def _prefix_holding(state: Mapping[str, Any], expected: set[str]) -> str | None:
    """A prefix under which ``state`` holds every expected key, if the keys do not match as they are."""
    if not expected or expected <= set(state):
        return None
    first = next(iter(expected))
    for key in state:
        prefix = key[: len(key) - len(first)]
        if key.endswith("." + first) and all(prefix + k in state for k in expected):
            return prefix
    return None


def load_state_dict_strict(model: nn.Module, state: Mapping[str, Any], path: str) -> None:
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
