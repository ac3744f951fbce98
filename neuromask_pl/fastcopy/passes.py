"""The layer passes of the fast copy: one table, one orchestrator.

Each row of :data:`PASSES` names a replacement: which modules it may apply to, under which switches of
:class:`~neuromask_pl.fastcopy.options.FastPath`, how it builds the replacement from a module and what the module
received in one recorded run, and whether its layers give an image the same result in any batch. :func:`apply_passes`
runs them over a copy (the first row that replaces a module wins) and records which pass touched which layer. A new
replacement is one row here and one row in ``tests/fastcopy/test_conformance.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import Tensor, nn

from neuromask_pl.fastcopy.invariant import (
    ROUNDING_ACTIVATIONS,
    PerImageConv2d,
    PlanewiseActivation,
    coverable,
    few_rows,
    graph_modules,
    rewrite_functional_calls,
    unaligned,
    uncovered_calls,
)
from neuromask_pl.fastcopy.packed import FrozenConv2d, FrozenLinear, packing_pays
from neuromask_pl.fastcopy.surgery import children, is_cpu_convolution, record_inputs


@dataclass(frozen=True)
class Site:
    """What a pass decides by: the module's first input in the recorded run (None if not recorded), the number of
    images of that run, and the switches that are on (``pack_convolutions``, ``pack_linears``, ``batch_invariant``)."""

    shape: torch.Size | None
    images: int
    switches: frozenset[str]

    def on(self, *names: str) -> bool:
        return any(name in self.switches for name in names)


@dataclass(frozen=True)
class LayerPass:
    """One replacement: ``selects`` the modules it may apply to (by type and parameters), ``replace`` builds the
    replacement for one of them at its ``Site`` (None: leave it), ``batch_invariant`` whether the layers it builds give
    an image the same result in any batch."""

    name: str
    selects: Callable[[nn.Module], bool]
    replace: Callable[[nn.Module, Site], nn.Module | None]
    batch_invariant: bool


def _packed_convolution(conv: nn.Module, site: Site) -> nn.Module | None:
    padding = FrozenConv2d.padding_of(conv)
    if padding is None or not site.on("pack_convolutions", "batch_invariant"):
        return None
    return FrozenConv2d(conv, padding) if site.shape is None or packing_pays(conv, site.shape) else None


def _per_image_pointwise(conv: nn.Module, site: Site) -> nn.Module | None:
    padding = FrozenConv2d.padding_of(conv)
    if padding is None or not site.on("batch_invariant") or not PerImageConv2d.applies_to(conv, padding):
        return None
    return PerImageConv2d(conv, padding)


def _linear(linear: nn.Module, site: Site) -> nn.Module | None:
    """Packed where it pays and ``pack_linears`` is on (and the run called it); with ``batch_invariant``, blocked where
    it gets at most :data:`~neuromask_pl.fastcopy.invariant.ROW_BLOCK` rows an image, else (unpacked, on inputs of
    images x tokens x features) each image's rows as their own product."""
    called = site.shape is not None or site.images == 0
    packed = site.on("pack_linears") and called and FrozenLinear.packing_pays(linear)
    invariant = site.on("batch_invariant") and site.shape is not None
    blocked = invariant and few_rows(site.shape, site.images)
    per_image = invariant and not (packed or blocked) and len(site.shape) >= 3  # (images, tokens, features)
    if not (packed or blocked or per_image):
        return None
    return FrozenLinear(linear, packed=packed, blocked=blocked, per_image=per_image)


def _planewise_activation(activation: nn.Module, site: Site) -> nn.Module | None:
    return PlanewiseActivation(activation) if site.on("batch_invariant") and unaligned(site.shape) else None


#: The layer passes, in the order they are tried on each module.
PASSES: tuple[LayerPass, ...] = (
    LayerPass("packed_convolution", is_cpu_convolution, _packed_convolution, batch_invariant=True),
    LayerPass("per_image_pointwise", is_cpu_convolution, _per_image_pointwise, batch_invariant=True),
    LayerPass("frozen_linear", FrozenLinear.applies_to, _linear, batch_invariant=True),
    LayerPass("planewise_activation", lambda m: type(m) in ROUNDING_ACTIVATIONS, _planewise_activation, True),
)

#: The layer classes the passes put in (kept whole when a model is traced: their forward checks its input).
REPLACEMENT_LAYERS = (FrozenConv2d, FrozenLinear, PerImageConv2d, PlanewiseActivation)


class _KeepLayers(torch.fx.Tracer):
    """fx tracer that keeps torch's layers, their subclasses (which may change the maths: their calls are theirs) and
    the replacement layers as calls."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        kept = REPLACEMENT_LAYERS + (nn.Linear, nn.modules.conv._ConvNd)
        return isinstance(module, kept) or super().is_leaf_module(module, qualified_name)


def traced(module: nn.Module) -> torch.fx.GraphModule | None:
    """``module`` as a ``torch.fx.GraphModule`` (its layers kept as calls), or None where fx cannot trace it."""
    try:
        return torch.fx.GraphModule(module, _KeepLayers().trace(module))
    except Exception:  # noqa: BLE001 - Python that fx cannot follow (data-dependent control flow, ...)
        return None


#: Passes that only serve batch invariance (no speed-up): named ``invariant`` in a copy's variant name.
INVARIANCE_ONLY = frozenset({"per_image_pointwise", "planewise_activation"})


@dataclass
class PassRecord:
    """What :func:`apply_passes` did: the layers each pass replaced (qualified names), the inline calls the graph pass
    rewrote, and the calls left that no pass covers (by name and count)."""

    layers: dict[str, list[str]] = field(default_factory=dict)
    functional: dict[str, list[str]] = field(default_factory=dict)
    uncovered: dict[str, int] = field(default_factory=dict)

    def count(self, *names: str) -> int:
        return sum(len(self.layers.get(name, [])) for name in names)

    def as_dict(self) -> dict[str, object]:
        return {
            "layers": {name: len(layers) for name, layers in self.layers.items()},
            "functional": {name: len(nodes) for name, nodes in self.functional.items()},
            "uncovered": dict(self.uncovered),
        }


def apply_passes(module: nn.Module, example: Tensor | None, switches: frozenset[str]) -> tuple[nn.Module, PassRecord]:
    """Run :data:`PASSES` over ``module`` (a copy; changed in place) with ``switches`` on; with ``batch_invariant``,
    also the graph pass over inline calls (tracing the module with fx where it has inline calls to rewrite and is not
    traced yet), and a check for calls left uncovered. ``example``: a batch the module runs (two images), whose
    recorded run tells each pass what its layers receive. Returns the module (a traced one where it was traced) and
    what was done."""
    record = PassRecord()
    if not switches:
        return module, record
    candidates = children(module, lambda child: any(p.selects(child) for p in PASSES))
    inputs = record_inputs(module, [child for _, _, child in candidates], example) or {}
    images = len(example) if example is not None and inputs else 0
    names = {child: name for name, child in module.named_modules()}
    for parent, attribute, child in candidates:
        site = Site(inputs.get(child), images, switches)
        for layer_pass in PASSES:
            replacement = layer_pass.replace(child, site) if layer_pass.selects(child) else None
            if replacement is not None:
                setattr(parent, attribute, replacement)
                record.layers.setdefault(layer_pass.name, []).append(names.get(child, attribute))
                break
    if "batch_invariant" in switches and example is not None:
        record.functional = rewrite_functional_calls(module, example)
        record.uncovered = uncovered_calls(module, example)
        graph = traced(module) if coverable(record.uncovered) and not graph_modules(module) else None
        rewritten = rewrite_functional_calls(graph, example) if graph is not None else {}
        if rewritten:
            module, record.functional = graph, rewritten
            record.uncovered = uncovered_calls(module, example)
    return module, record
