"""Layers and a graph pass that give each image the same result alone or in any batch, bit for bit, on the CPU.

CPU kernels can round an image's values by what runs beside it: matrix products take other kernels under a few
rows, ``F.conv2d`` switches kernels by the batch and thread count, and an elementwise kernel runs a tensor's last
values in a scalar loop that rounds transcendental functions differently. The pieces here remove each cause:

- :class:`PerImageConv2d`: 1x1 convolutions by ATen's per-image kernel;
- blocked rows (:func:`by_blocks`, used by :class:`~neuromask_pl.fastcopy.packed.FrozenLinear` and
  :func:`blocked_linear`): products of exactly :data:`ROW_BLOCK` rows;
- :func:`per_image_linear`: a token layer's rows as one product per image (matrix products over all rows take
  kernels by the row count on some CPUs);
- :func:`planewise` (and :class:`PlanewiseActivation`): each image's values padded to whole vector iterations;
- :func:`rewrite_functional_calls`: the same for functions called inline in a traced model's forward
  (``x.sigmoid()``, ``F.linear``), which no module swap reaches;
- :func:`uncovered_calls`: what is left that nothing here covers (batched ``matmul``/``einsum``), for the report.

The measurements behind each rule: ``python benchmarks/batch_invariance.py`` (docs/results/batch_invariance.md,
docs/results/STABILITY.md); every replacement is checked by tests/fastcopy/test_conformance.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from neuromask_pl.fastcopy.surgery import takes_replacement

#: Matrix products take other kernels below this many rows on the CPU (ATen: one row a vector product, two or three
#: a small-matrix kernel; oneDNN: one row), and round a few rows an image differently among more rows (MobileViT's
#: transformer at 4 rows an image), so a layer that gets at most this many rows per image (a classifier's head) runs
#: its rows in blocks of exactly this many (zero rows added to the last): every product has the same shape.
ROW_BLOCK = 4

#: Values per vectorised iteration of ATen's elementwise CPU kernels, at most (two 512-bit vectors of float32; 64 is a
#: multiple of every width times two). A tensor's last values short of a full iteration run a scalar loop.
VECTOR_SPAN = 64

#: Elementwise activations whose CPU kernels can round a value differently in the vectorised and the scalar loop.
ROUNDING_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.SiLU, nn.GELU, nn.Tanh, nn.Hardsigmoid, nn.Hardswish, nn.Mish, nn.ELU, nn.Softplus,
)  # fmt: skip

#: The same as functions and Tensor methods, as they appear in a traced graph.
ROUNDING_FUNCTIONS: tuple[Callable[..., Tensor], ...] = (
    torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.silu, F.gelu, F.hardsigmoid, F.hardswish, F.mish, F.elu,
    F.softplus,
)  # fmt: skip
ROUNDING_METHODS = ("sigmoid", "tanh")

#: Batched products that no pass makes batch invariant (their kernels may split by the batch); named in the report.
UNCOVERED_PRODUCTS: tuple[Callable[..., Tensor], ...] = (
    torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm, torch.baddbmm, torch.einsum,
)  # fmt: skip


class PerImageConv2d(nn.Module):
    """A frozen 1x1 ``nn.Conv2d`` that always runs ATen's per-image kernel (``thnn_conv2d``: one matrix product per
    image), for the 1x1 convolutions where packing does not pay: ``F.conv2d`` picks its CPU kernel by the batch and
    the thread count, and the kernels round differently. Only float32 CPU inputs outside autocast take this path."""

    def __init__(self, conv: nn.Conv2d, padding: list[int]) -> None:
        super().__init__()
        self.conv = conv
        self.weight = conv.weight.detach()
        self.bias = conv.bias.detach() if conv.bias is not None else None
        self.stride = list(conv.stride)
        self.padding = [padding[2], padding[0]]  # symmetric: see applies_to

    @staticmethod
    def applies_to(conv: nn.Conv2d, padding: list[int]) -> bool:
        """Whether ``conv`` is a 1x1, ungrouped convolution with even padding."""
        left, right, top, bottom = padding
        return tuple(conv.kernel_size) == (1, 1) and conv.groups == 1 and left == right and top == bottom

    def forward(self, x: Tensor) -> Tensor:
        if not takes_replacement(x):
            return self.conv(x)
        return torch._C._nn.thnn_conv2d(x, self.weight, [1, 1], self.bias, self.stride, self.padding)


def by_blocks(product: Callable[[Tensor], Tensor], x: Tensor, blocked: bool) -> Tensor:
    """``product`` of the rows of ``x`` (the last dimension the features), shaped as ``x`` with the product's
    features; with ``blocked``, run on blocks of exactly :data:`ROW_BLOCK` rows (autograd follows it)."""
    rows = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if not blocked or count == ROW_BLOCK:
        out = product(rows)
    elif count < ROW_BLOCK:
        out = product(F.pad(rows, (0, 0, 0, ROW_BLOCK - count)))[:count]
    else:
        padded = F.pad(rows, (0, 0, 0, -count % ROW_BLOCK)) if count % ROW_BLOCK else rows
        out = torch.cat([product(block) for block in padded.split(ROW_BLOCK)])[:count]
    return out if x.ndim == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


def rows_per_image(shape: torch.Size, images: int) -> float:
    """Rows a product whose input has ``shape`` gets per image, for ``images`` images."""
    return (shape.numel() // shape[-1] if shape[-1] else 0) / max(images, 1)


def per_image_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` of (B, ..., features) inputs with each image's rows as their own product (``torch.baddbmm``: the
    same shape of product whatever the batch). One matrix product over all rows takes kernels by the row count on
    some CPUs (MKL's AVX2 ones); on others (AVX-512) the two are the same bit for bit."""
    images = x.reshape(x.shape[0], -1, x.shape[-1])
    count, rows = images.shape[:2]
    weight_t = weight.t().expand(count, *weight.t().shape)
    # the ATen operators themselves: uncovered_calls watches the torch functions that models call
    if bias is None:
        out = torch.ops.aten.bmm(images, weight_t)
    else:
        out = torch.ops.aten.baddbmm(bias.expand(count, rows, bias.shape[0]), images, weight_t)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def few_rows(shape: torch.Size, images: int) -> bool:
    """Whether a product whose input has ``shape`` gets at most :data:`ROW_BLOCK` rows per image (so runs blocked)."""
    return rows_per_image(shape, images) <= ROW_BLOCK


def blocked_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` on blocks of :data:`ROW_BLOCK` rows (float32 CPU inputs outside autocast; else as it is)."""
    if not takes_replacement(x):
        return F.linear(x, weight, bias)
    return by_blocks(lambda rows: F.linear(rows, weight, bias), x, blocked=True)


def planewise(function: Callable[..., Tensor], planes: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """``function`` (elementwise) of (B, ...) planes, each plane's values padded to a multiple of
    :data:`VECTOR_SPAN`, so that every value takes the vectorised loop: a plane's result is then the same alone or
    in any batch."""
    count = planes[0].numel() if len(planes) else 0
    if count % VECTOR_SPAN == 0:
        return function(planes, *args, **kwargs)
    padded = F.pad(planes.reshape(len(planes), count), (0, -count % VECTOR_SPAN))
    return function(padded, *args, **kwargs)[:, :count].reshape(planes.shape)


def planewise_call(function: Callable[..., Tensor], planes: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """:func:`planewise` for float32 CPU inputs outside autocast, else ``function`` as it is (what the graph pass
    puts in place of an inline call)."""
    if not takes_replacement(planes):
        return function(planes, *args, **kwargs)
    return planewise(function, planes, *args, **kwargs)


def planewise_method(planes: Tensor, method: str) -> Tensor:
    """A Tensor method of :data:`ROUNDING_METHODS` (``x.sigmoid()``) by :func:`planewise_call`."""
    return planewise_call(getattr(torch, method), planes)


def unaligned(shape: torch.Size | None) -> bool:
    """Whether a tensor of ``shape`` has a number of values per image (its first dimension) that is no multiple of
    :data:`VECTOR_SPAN`, so that an elementwise kernel would run some of an image's values in its scalar loop."""
    return shape is not None and len(shape) > 0 and bool(shape[0]) and (shape.numel() // shape[0]) % VECTOR_SPAN != 0


class PlanewiseActivation(nn.Module):
    """An elementwise activation run by :func:`planewise` (for inputs with a few values an image, as a
    squeeze-and-excitation gate's sigmoid). Only float32 CPU inputs outside autocast take this path."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return planewise(self.activation, x) if takes_replacement(x) else self.activation(x)


def graph_modules(module: nn.Module) -> list[torch.fx.GraphModule]:
    """The traced parts of ``module`` (``torch.fx.GraphModule``s, e.g. from BatchNorm folding), outermost first."""
    return [m for m in module.modules() if isinstance(m, torch.fx.GraphModule)]


def coverable(calls: dict[str, int]) -> bool:
    """Whether some of :func:`uncovered_calls`' calls are of a kind :func:`rewrite_functional_calls` rewrites."""
    return any(name.endswith(("(unaligned)", "(few rows)")) for name in calls)


def rewrite_functional_calls(module: nn.Module, example: Tensor) -> dict[str, list[str]]:
    """Rewrite, in the traced parts of ``module``, the inline calls that would make an image's result depend on its
    batch at ``example``'s shapes: elementwise functions of :data:`ROUNDING_FUNCTIONS`/:data:`ROUNDING_METHODS` on
    unaligned inputs to :func:`planewise`, and ``F.linear`` with at most :data:`ROW_BLOCK` rows per image to
    :func:`blocked_linear`. Returns the rewritten nodes by replacement (``planewise``, ``blocked_linear``)."""
    traced = graph_modules(module)
    shapes = _node_shapes(module, traced, example)
    rewritten: dict[str, list[str]] = {}
    for gm in traced:
        changed = False
        for node in list(gm.graph.nodes):
            shape = shapes.get(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) else None
            if shape is None:
                continue
            if _is_rounding_call(node) and unaligned(shape):
                with gm.graph.inserting_after(node):
                    if node.op == "call_method":
                        new = gm.graph.call_function(planewise_method, (node.args[0], node.target))
                    else:
                        new = gm.graph.call_function(planewise_call, (node.target, *node.args), dict(node.kwargs))
                kind = "planewise"
            elif _is_linear_call(node) and few_rows(shape, len(example)):
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(blocked_linear, tuple(node.args), dict(node.kwargs))
                kind = "blocked_linear"
            else:
                continue
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            rewritten.setdefault(kind, []).append(f"{type(gm).__name__}.{node.name}")
            changed = True
        if changed:
            gm.graph.lint()
            gm.recompile()
    return rewritten


def _is_linear_call(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.linear


def _is_rounding_call(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ROUNDING_FUNCTIONS) or (
        node.op == "call_method" and node.target in ROUNDING_METHODS
    )


def _node_shapes(module: nn.Module, traced: list[torch.fx.GraphModule], example: Tensor) -> dict[torch.fx.Node, Any]:
    """The output shape of every node of the ``traced`` graphs when ``module(example)`` runs (run once, as a mask step
    runs it: on inputs that require a gradient)."""
    shapes: dict[torch.fx.Node, Any] = {}
    if not traced:
        return shapes

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            value = super().run_node(node)
            if isinstance(value, Tensor):
                shapes[node] = value.shape
            return value

    def interpret(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> Any:
        return Recorder(gm).run(*args, **kwargs)

    try:
        for gm in traced:
            gm.forward = lambda *args, _gm=gm, **kwargs: interpret(_gm, args, kwargs)  # type: ignore[method-assign]
        with torch.enable_grad():
            module(example.detach().requires_grad_(True))
    except Exception:  # noqa: BLE001 - without shapes nothing is rewritten; the copy's logits are checked anyway
        shapes.clear()
    finally:
        for gm in traced:
            del gm.forward  # the class's forward again (recompile() replaces that one)
    return shapes


class _CallRecorder(TorchFunctionMode):
    """Counts the calls of a run that no pass makes batch invariant (see :func:`uncovered_calls`)."""

    def __init__(self, images: int) -> None:
        super().__init__()
        self.images, self.calls = images, Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        tensors = [a for a in args if isinstance(a, Tensor)] + [
            t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, Tensor)
        ]  # einsum takes its equation first, and may take its operands as a list
        first = tensors[0] if tensors else None
        if first is not None and takes_replacement(first):
            name = getattr(func, "__name__", str(func))
            if func in UNCOVERED_PRODUCTS and max(t.ndim for t in tensors) >= 3:
                self.calls[name] += 1
            elif (func in ROUNDING_FUNCTIONS or name in ROUNDING_METHODS) and unaligned(first.shape):
                self.calls[f"{name} (unaligned)"] += 1
            elif func is F.linear and first.ndim >= 2 and few_rows(first.shape, self.images):
                if first.numel() // first.shape[-1] != ROW_BLOCK:  # a blocked product runs exactly ROW_BLOCK rows
                    self.calls["linear (few rows)"] += 1
        return func(*args, **(kwargs or {}))


def uncovered_calls(module: nn.Module, example: Tensor) -> dict[str, int]:
    """The calls of ``module(example)`` whose result for an image may depend on its batch and that no pass covers
    (batched ``matmul``/``einsum``/``bmm``, elementwise functions on unaligned inputs, ``F.linear`` on few rows), by
    name and count; empty where every call is covered (or the module does not run)."""
    recorder = _CallRecorder(len(example))
    try:
        with torch.no_grad(), recorder:
            module(example)
    except Exception:  # noqa: BLE001 - reported as nothing found; the copy's logits are checked anyway
        return {}
    return dict(recorder.calls)
