"""State_dict files: safe loading (``weights_only``), key prefixes, strict loading with readable errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from neuromask_pl.classifiers.files import load_failure_reason

_STRIPPABLE_PREFIXES = ("module.", "model.")


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state_dict file into ``model`` (weights_only, strict), with readable errors."""
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(
            f"could not load {path}: {load_failure_reason(e)}; is it a PyTorch state_dict file (saved with "
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
    load_state_dict_strict(model, state, path)


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
