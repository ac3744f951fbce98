"""Frozen CPU convolutions and Linear layers with their weights packed once for oneDNN, and a cheap gradient to
their input.

A mask step needs the gradient of the classifier's output with respect to its input, never with respect to its
weights, so a frozen convolution or Linear layer can keep its weights in oneDNN's blocked layout and skip the
weight gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: A layer's first input shape in a recorded run (None where it is not a tensor), by layer: see :func:`layer_inputs`.
LayerInputs = dict[nn.Module, "torch.Size | None"]


class _FrozenConvFunction(torch.autograd.Function):
    """Convolution with packed weights; backward gives the input's gradient only (the weights are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: FrozenConv2d) -> Tensor:  # type: ignore[override]
        ctx.layer, ctx.input_size = layer, x.shape[-2:]
        return layer.run(x, layer.packed_weight(x.shape), layer.bias, layer.padding, layer.stride)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.layer.input_gradient(grad, ctx.input_size), None


class FrozenConv2d(nn.Module):
    """A frozen ``nn.Conv2d`` for the CPU: its weights packed once for oneDNN, and the gradient to its
    input computed as cheaply as the layer allows (mathematically the same as autograd's):

    - stride 1: a convolution of the gradient with the flipped, transposed kernel (packed too);
    - strided with at most 4 input channels (an image stem): a matrix product and ``fold`` (col2im);
    - other strided layers: oneDNN's transposed convolution, packed too (``F.conv_transpose2d`` takes another
      kernel for one or two images than for more, which would round an image's gradient by the batch), image by
      image where several threads run (oneDNN then splits its work by the batch, which rounds by it too).

    Grouped (e.g. depthwise) convolutions are packed too. ``padding`` is the layer's effective zero padding
    as ``[left, right, top, bottom]`` (see :meth:`padding_of`; default: the layer's own): a conv subclass that
    pads in its forward runs as one padded convolution, or, where the padding is uneven, as ``F.pad`` and an
    unpadded convolution. Only float32 CPU inputs outside autocast take this path; anything else runs the
    original layer.
    """

    def __init__(self, conv: nn.Conv2d, padding: list[int] | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.weight = conv.weight.detach()
        self.bias = conv.bias.detach() if conv.bias is not None else None
        left, right, top, bottom = padding if padding is not None else _sides(conv.padding)  # type: ignore[arg-type]
        even = left == right and top == bottom
        self.padding = [top, left] if even else [0, 0]  # the convolution's own (symmetric) padding
        self.pre_pad = None if even else [left, right, top, bottom]  # F.pad before it, where uneven
        self.stride, self.groups = list(conv.stride), conv.groups
        self.kernel_size = list(conv.kernel_size)
        self._packed: Tensor | None = None
        self._packed_flipped: Tensor | None = None
        self._packed_transposed: dict[tuple[int, ...], Tensor] = {}  # by output padding
        # (C_in * kh * kw, C_out), for the col2im gradient of image stems
        stem = self.weight.shape[1] <= 4 and self.groups == 1
        self.columns = self.weight.flatten(1).t().contiguous() if stem else None

    @staticmethod
    def padding_of(conv: nn.Module) -> list[int] | None:
        """The padding with which this class runs ``conv`` (:func:`plain_padding`), or None to leave it as it is."""
        return plain_padding(conv)

    def run(self, x: Tensor, packed: Tensor, bias: Tensor | None, padding: list[int], stride: list[int]) -> Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, bias, padding, stride, [1, 1], self.groups, "none", [], ""
        )

    def packed_weight(self, input_shape: torch.Size) -> Tensor:
        if self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, self.padding, self.stride, [1, 1], self.groups, list(input_shape)
            )
        return self._packed

    def input_gradient(self, grad: Tensor, input_size: torch.Size) -> Tensor:
        if self.stride == [1, 1]:
            padding = [k - 1 - p for k, p in zip(self.kernel_size, self.padding)]
            if self._packed_flipped is None:
                self._packed_flipped = torch.ops.mkldnn._reorder_convolution_weight(
                    _flipped_transposed(self.weight, self.groups),
                    padding,
                    [1, 1],
                    [1, 1],
                    self.groups,
                    list(grad.shape),
                )
            return self.run(grad, self._packed_flipped, None, padding, [1, 1])
        if self.columns is not None:
            columns = torch.matmul(self.columns, grad.reshape(grad.shape[0], grad.shape[1], -1))
            return F.fold(columns, tuple(input_size), self.kernel_size, padding=self.padding, stride=self.stride)
        output_padding = [
            (size + 2 * p - k) % s for size, p, k, s in zip(input_size, self.padding, self.kernel_size, self.stride)
        ]
        key = tuple(output_padding)
        if key not in self._packed_transposed:  # oneDNN's transposed convolution, as F.conv_transpose2d runs it
            self._packed_transposed[key] = torch.ops.mkldnn._reorder_convolution_transpose_weight(
                self.weight, self.padding, output_padding, self.stride, [1, 1], self.groups, list(grad.shape)
            )
        packed = self._packed_transposed[key]

        def transposed(planes: Tensor) -> Tensor:
            return torch.ops.mkldnn._convolution_transpose_pointwise(
                planes, packed, None, self.padding, output_padding, self.stride, [1, 1], self.groups, "none", [], ""
            )

        if torch.get_num_threads() > 1 and len(grad) > 1:  # with threads, oneDNN splits its work by the batch
            return torch.cat([transposed(image) for image in grad.split(1)])
        return transposed(grad)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return self.conv(x)
        return _FrozenConvFunction.apply(F.pad(x, self.pre_pad) if self.pre_pad else x, self)


class PerImageConv2d(nn.Module):
    """A frozen 1x1 ``nn.Conv2d`` that always runs ATen's per-image kernel (``thnn_conv2d``: one matrix product per
    image), for the 1x1 convolutions where packing does not pay.

    ``F.conv2d`` picks its CPU kernel by the batch and the thread count (oneDNN from 16 images or 2 threads on, the
    per-image kernel below), and the two round differently, so a 1x1 layer's output for an image would depend on
    how many images run with it. The per-image kernel gives each image the same result in any batch, on any
    number of threads. Only float32 CPU inputs outside autocast take this path; anything else runs the original
    layer.
    """

    def __init__(self, conv: nn.Conv2d, padding: list[int]) -> None:
        super().__init__()
        self.conv = conv
        self.weight = conv.weight.detach()
        self.bias = conv.bias.detach() if conv.bias is not None else None
        self.stride = list(conv.stride)
        self.padding = [padding[2], padding[0]]  # symmetric: see applies_to

    @staticmethod
    def applies_to(conv: nn.Conv2d, padding: list[int]) -> bool:
        """Whether ``conv`` is a 1x1, ungrouped convolution with even padding (as :meth:`FrozenConv2d.padding_of`)."""
        left, right, top, bottom = padding
        return tuple(conv.kernel_size) == (1, 1) and conv.groups == 1 and left == right and top == bottom

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return self.conv(x)
        return torch._C._nn.thnn_conv2d(x, self.weight, [1, 1], self.bias, self.stride, self.padding)


def plain_padding(conv: nn.Module) -> list[int] | None:
    """The zero padding ``[left, right, top, bottom]`` under which ``conv`` is a plain convolution (no
    dilation, no side wider than the kernel), or None if it is not one: ``nn.Conv2d``'s own padding, or for
    a subclass with its own forward, the padding with which an unpadded convolution of the zero-padded
    input computes what that forward does on random inputs of an even and an odd size (e.g. EfficientNet's
    convolutions with TensorFlow's "same" padding, which pad before convolving)."""
    if not (
        isinstance(conv, nn.Conv2d)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    ):
        return None
    if type(conv) is nn.Conv2d:
        fits = all(p <= k - 1 for p, k in zip(conv.padding, conv.kernel_size))  # type: ignore[arg-type]
        return _sides(conv.padding) if fits else None  # type: ignore[arg-type]
    return _subclass_padding(conv)


def _flipped_transposed(weight: Tensor, groups: int) -> Tensor:
    """The kernel of a stride-1 convolution's input gradient: in and out channels swapped within each group,
    spatially flipped; (C_out, C_in / g, kh, kw) -> (C_in, C_out / g, kh, kw)."""
    out_channels, in_per_group, height, width = weight.shape
    grouped = weight.reshape(groups, out_channels // groups, in_per_group, height, width).transpose(1, 2)
    return grouped.reshape(groups * in_per_group, out_channels // groups, height, width).flip(-1, -2).contiguous()


def _sides(padding: tuple[int, int] | list[int]) -> list[int]:
    """A convolution's (height, width) padding as ``[left, right, top, bottom]``."""
    return [padding[1], padding[1], padding[0], padding[0]]


def _subclass_padding(conv: nn.Conv2d) -> list[int] | None:
    """The zero padding ``[left, right, top, bottom]`` with which an unpadded ``nn.Conv2d`` convolution of the
    padded input equals a subclass's own forward on seeded random inputs of an even and an odd size, or None (a
    forward that changes the maths, pads differently for different sizes, or cannot run)."""
    generator = torch.Generator().manual_seed(0)
    sizes = [[max(8, 2 * k) + extra for k in conv.kernel_size] for extra in (0, 1)]
    samples = [torch.randn(2, conv.in_channels, *size, generator=generator).to(conv.weight) for size in sizes]
    with torch.no_grad():
        try:
            owns = [conv(sample) for sample in samples]
        except Exception:  # noqa: BLE001 - a forward that cannot run on these inputs is not a plain convolution
            return None
        if not all(isinstance(own, Tensor) and own.ndim == 4 for own in owns):
            return None
        for padding in _candidate_paddings(conv, sizes[0], owns[0].shape[-2:]):
            if all(_reproduces(conv, sample, own, padding) for sample, own in zip(samples, owns)):
                return padding
    return None


def _candidate_paddings(conv: nn.Conv2d, size: list[int], out_size: torch.Size) -> list[list[int]]:
    """Paddings ``[left, right, top, bottom]``, no side wider than k - 1, under which the convolution's output
    has ``out_size`` for an input of ``size``: even ones first, then the narrowest."""
    sides = [
        sorted(
            ((a, b) for a in range(k) for b in range(k) if (n + a + b - k) // s + 1 == n_out),
            key=lambda ab: (ab[0] != ab[1], ab[0] + ab[1], ab[0]),
        )
        for n, k, s, n_out in zip(size, conv.kernel_size, conv.stride, out_size)
    ]
    return [[left, right, top, bottom] for top, bottom in sides[0] for left, right in sides[1]]


def _reproduces(conv: nn.Conv2d, sample: Tensor, own: Tensor, padding: list[int]) -> bool:
    plain = F.conv2d(F.pad(sample, padding), conv.weight, conv.bias, conv.stride, 0, 1, conv.groups)
    return plain.shape == own.shape and torch.allclose(plain, own, rtol=1e-5, atol=1e-6)


def pack_convolutions(module: nn.Module, example: Tensor | None = None, inputs: LayerInputs | None = None) -> int:
    """Replace, in place, every convolution of a frozen CPU module that :class:`FrozenConv2d` applies to and, where
    ``module(example)`` runs, that :func:`packing_pays` for at the input it gets there; returns how many. The 1x1
    ones packing does not pay for run as :class:`PerImageConv2d` (not counted). ``inputs``: the layers' inputs as
    :func:`layer_inputs` recorded them, if it did (else they are recorded here). Only for copies: the layers lose
    their weight gradients."""
    candidates = []
    for parent, name, child in _children(module, _is_cpu_convolution):
        padding = FrozenConv2d.padding_of(child)
        if padding is not None:
            candidates.append((parent, name, child, padding))
    if inputs is None:
        inputs = _called_modules(module, [child for _, _, child, _ in candidates], example)
    replaced = 0
    for parent, name, child, padding in candidates:
        shape = inputs.get(child) if inputs is not None else None
        if shape is None or packing_pays(child, shape):
            setattr(parent, name, FrozenConv2d(child, padding))
            replaced += 1
        elif PerImageConv2d.applies_to(child, padding):
            setattr(parent, name, PerImageConv2d(child, padding))
    return replaced


#: (cells per image of a 1x1 convolution's input, at most; weights from which packing pays there, None: never):
#: docs/results/MODEL_MATRIX.md, section "speed16".
PACKED_POINTWISE_MIN_WEIGHTS: tuple[tuple[float, int | None], ...] = (
    (1, None),
    (16, 32768),
    (float("inf"), 16384),
)


def packing_pays(conv: nn.Conv2d, input_shape: torch.Size) -> bool:
    """Whether :class:`FrozenConv2d` measured faster than the plain layer (forward and input gradient, 1 thread)
    for layers like ``conv`` at an input of ``input_shape``; by the layer's shape only, so the same on every run.

    Timed layer by layer on all 809 convolutions of the 18 models of docs/results/MODEL_MATRIX.md (64 px, batch 2)
    and checked on the whole models (section "speed16"): a packed 1x1 convolution costs about 100 us more than
    ATen's (the activations' reorders) unless it has many weights for its input's size (ATen's own is slow there:
    EfficientNet-B0's 1152 -> 192 at 2 x 2 cells, 1130 us plain, 290 packed), so 1x1 layers stay unpacked at one
    cell per image (squeeze-and-excitation) and below 32,768 weights at up to 16 cells or 16,384 beyond (the
    thresholds are those at which no whole model measured slower: DenseNet-121's bottlenecks measured faster
    unpacked alone, 2% slower inside the model). Depthwise convolutions of stride 2 measured slower packed (26 of
    28), of stride 1 as fast or faster; every other kind (k x k, grouped, patch embeddings) faster packed.
    """
    if conv.groups > 1 and conv.groups == conv.in_channels:  # depthwise
        return tuple(conv.stride) == (1, 1)
    if tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
        return True
    cells = input_shape[-2] * input_shape[-1]
    least = next(weights for most_cells, weights in PACKED_POINTWISE_MIN_WEIGHTS if cells <= most_cells)
    return least is not None and conv.weight.numel() >= least


# Linear layers with fewer weights stay as they are: at the token counts of a mask step (tens to hundreds of rows)
# their weights stay in the CPU's caches, and oneDNN's packed product measured slower than ATen's there (MobileViT's
# 64 x 64 to 96 x 288 layers: +7 to +13% for the model); from 256 KiB of float32 weights on, which a forward and a
# backward read from memory once each, the packed product measured 20-27% faster (ViT-Tiny's layers; whole copies:
# ConvNeXt-T -25%, Swin-T -10%, ViT-Tiny -6%; docs/results/MODEL_MATRIX.md, "speed15").
MIN_PACKED_LINEAR_WEIGHTS = 65536


#: Matrix products take other kernels below this many rows on the CPU (ATen: one row a vector product, two or three
#: a small-matrix kernel; oneDNN: one row), and with several threads they split a product with few columns
#: differently for different row counts (5-7 and 9-11 rows against 17, for a 10-class head's input gradient), so a
#: row's result would depend on how many others run with it. A classifier's head therefore runs its rows in blocks of
#: exactly this many (zero rows added to the last): every product it runs has the same shape, whatever the batch.
MIN_ROWS = 4


def _by_blocks(product: Callable[[Tensor], Tensor], x: Tensor, blocked: bool) -> Tensor:
    """``product`` of the rows of ``x`` (the last dimension the features), shaped as ``x`` with the product's
    features; with ``blocked``, run on blocks of exactly :data:`MIN_ROWS` rows (autograd follows it)."""
    rows = x if x.ndim == 2 else x.reshape(-1, x.shape[-1])
    count = rows.shape[0]
    if not blocked or count == MIN_ROWS:
        out = product(rows)
    elif count < MIN_ROWS:
        out = product(F.pad(rows, (0, 0, 0, MIN_ROWS - count)))[:count]
    else:
        padded = F.pad(rows, (0, 0, 0, -count % MIN_ROWS)) if count % MIN_ROWS else rows
        out = torch.cat([product(block) for block in padded.split(MIN_ROWS)])[:count]
    return out if x.ndim == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


class _FrozenLinearFunction(torch.autograd.Function):
    """Linear map of a frozen layer (see :class:`FrozenLinear`); backward gives the input's gradient only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: FrozenLinear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        out = _by_blocks(layer.product, x, layer.blocked)
        return out if out._base is None else out.clone()  # not a view: the next layer may work in place (Hardswish)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return _by_blocks(ctx.layer.input_gradient, grad, ctx.layer.blocked), None


class FrozenLinear(nn.Module):
    """A frozen ``nn.Linear`` for the CPU: ``x W^T + b`` and the gradient to its input ``g W`` (mathematically the
    same as autograd's; the weight gradient is skipped). With ``packed``, ``W`` and ``W^T`` are packed once for
    oneDNN (faster for large layers); else ATen's products run. With ``blocked`` (for a layer that gets fewer than
    :data:`MIN_ROWS` rows an image, a classifier's head), the rows run in blocks of :data:`MIN_ROWS`, so that a
    row's result does not depend on how many rows run.

    The layer keeps ``weight`` and ``bias`` (the same tensors), so code that reads them still works. Only float32
    CPU inputs outside autocast take this path; anything else runs the original layer.
    """

    def __init__(self, linear: nn.Linear, packed: bool = True, blocked: bool = False) -> None:
        super().__init__()
        self.linear = linear
        self.weight = linear.weight.detach()
        self.bias = linear.bias.detach() if linear.bias is not None else None
        self.packed, self.blocked = packed, blocked
        self._packed: Tensor | None = None
        self._packed_transposed: Tensor | None = None

    @staticmethod
    def applies_to(module: nn.Module) -> bool:
        """Whether ``module`` is a CPU ``nn.Linear``, or a subclass whose forward gives ``F.linear``'s output on
        seeded random inputs (e.g. timm's ``Linear``; not one that changes the maths)."""
        if not isinstance(module, nn.Linear) or module.weight.device.type != "cpu":
            return False
        if type(module) is nn.Linear:
            return True
        sample = torch.randn(MIN_ROWS, module.in_features, generator=torch.Generator().manual_seed(0))
        sample = sample.to(module.weight.dtype)
        with torch.no_grad():
            try:
                own = module(sample)
            except Exception:  # noqa: BLE001 - a forward that cannot run on a plain input is not a plain Linear
                return False
            return isinstance(own, Tensor) and torch.equal(own, F.linear(sample, module.weight, module.bias))

    @staticmethod
    def packing_pays(module: nn.Linear) -> bool:
        """Whether the layer holds enough weights (:data:`MIN_PACKED_LINEAR_WEIGHTS`) for packing to pay."""
        return module.weight.numel() >= MIN_PACKED_LINEAR_WEIGHTS

    def product(self, rows: Tensor) -> Tensor:
        if not self.packed:
            return F.linear(rows, self.weight, self.bias)
        if self._packed is None:  # packed for the first call's number of rows (any number runs)
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, len(rows))
        return torch.ops.mkldnn._linear_pointwise.default(rows, self._packed, self.bias, "none", [], "")

    def input_gradient(self, grad_rows: Tensor) -> Tensor:
        if not self.packed:
            return grad_rows.mm(self.weight)
        if self._packed_transposed is None:
            self._packed_transposed = torch.ops.mkldnn._reorder_linear_weight(
                self.weight.t().contiguous(), len(grad_rows)
            )
        return torch.ops.mkldnn._linear_pointwise.default(grad_rows, self._packed_transposed, None, "none", [], "")

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return self.linear(x)
        if not self.packed:  # ATen's products: autograd runs the blocks' input gradients (blocks of the same shape)
            return _by_blocks(self.product, x, self.blocked)
        return _FrozenLinearFunction.apply(x, self)


def pack_linears(module: nn.Module, example: Tensor | None = None, inputs: LayerInputs | None = None) -> int:
    """Replace, in place, the Linear layers of a frozen CPU module that :class:`FrozenLinear` applies to and that
    ``module(example)`` calls as a module (not one whose weights another layer reads, as ``nn.MultiheadAttention``
    does with its ``out_proj``): packed where :meth:`FrozenLinear.packing_pays`, and ``blocked`` where an image
    gives the layer fewer than :data:`MIN_ROWS` rows (a classifier's head); returns how many were packed. Without
    ``example`` (or if it does not run), every large one is packed. ``inputs`` as for :func:`pack_convolutions`.
    Only for copies: the layers lose their weight gradients."""
    candidates = _children(module, FrozenLinear.applies_to)
    called = inputs if inputs is not None else _called_modules(module, [child for _, _, child in candidates], example)
    packed = 0
    for parent, name, child in candidates:
        if called is None:
            pack, blocked = FrozenLinear.packing_pays(child), False
        else:
            shape = called.get(child)
            pack = child in called and FrozenLinear.packing_pays(child)
            blocked = shape is not None and _rows_per_image(shape, len(example)) < MIN_ROWS  # type: ignore[arg-type]
        if pack or blocked:
            setattr(parent, name, FrozenLinear(child, packed=pack, blocked=blocked))
            packed += pack
    return packed


def _rows_per_image(shape: torch.Size, images: int) -> float:
    """Rows a Linear layer's input of ``shape`` gives it per image, for ``images`` images."""
    return (shape.numel() // shape[-1] if shape[-1] else 0) / max(images, 1)


#: Values per vectorised iteration of ATen's elementwise CPU kernels, at most (two 512-bit vectors of float32; 64 is a
#: multiple of every width times two). A tensor's last values short of a full iteration run a scalar loop, which
#: rounds a transcendental function (``sigmoid``, ``exp``, ...) differently, so an image's values would round by
#: where they fall in the batch's tensor.
VECTOR_SPAN = 64

#: Elementwise activations whose CPU kernels can round a value differently in the vectorised and the scalar loop.
ROUNDING_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.SiLU, nn.GELU, nn.Tanh, nn.Hardsigmoid, nn.Hardswish, nn.Mish, nn.ELU, nn.Softplus,
)  # fmt: skip


def planewise(function: Callable[[Tensor], Tensor], planes: Tensor) -> Tensor:
    """``function`` (elementwise) of (B, ...) planes, each plane's values padded to a multiple of
    :data:`VECTOR_SPAN`, so that every value takes the vectorised loop: a plane's result is then the same alone or
    in any batch."""
    count = planes[0].numel() if len(planes) else 0
    if count % VECTOR_SPAN == 0:
        return function(planes)
    padded = F.pad(planes.reshape(len(planes), count), (0, -count % VECTOR_SPAN))
    return function(padded)[:, :count].reshape(planes.shape)


class PlanewiseActivation(nn.Module):
    """An elementwise activation run by :func:`planewise` (for inputs with a few values an image, as a
    squeeze-and-excitation gate's sigmoid, whose values would otherwise take the scalar loop alone and the
    vectorised one in a batch)."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return planewise(self.activation, x)


def align_activations(module: nn.Module, example: Tensor | None, inputs: LayerInputs | None = None) -> int:
    """Replace, in place, the activations of :data:`ROUNDING_ACTIVATIONS` that ``module(example)`` calls on inputs
    of a number of values per image that is no multiple of :data:`VECTOR_SPAN` by :class:`PlanewiseActivation`;
    returns how many. ``inputs`` as for :func:`pack_convolutions`. Only for copies (the module's function is
    unchanged)."""
    candidates = _children(module, _is_rounding_activation)
    called = inputs if inputs is not None else _called_modules(module, [child for _, _, child in candidates], example)
    replaced = 0
    for parent, name, child in candidates:
        shape = called.get(child) if called is not None else None
        if shape is not None and len(shape) > 0 and shape[0] and (shape.numel() // shape[0]) % VECTOR_SPAN:
            setattr(parent, name, PlanewiseActivation(child))
            replaced += 1
    return replaced


def layer_inputs(module: nn.Module, example: Tensor | None) -> LayerInputs | None:
    """The input shape of every layer :func:`pack_convolutions`, :func:`pack_linears` and :func:`align_activations`
    may replace, from one run of ``module(example)`` (as they record it each, see :func:`_called_modules`), so that
    a copy prepared by all three runs the classifier once."""
    watched = _children(
        module,
        lambda child: _is_cpu_convolution(child) or FrozenLinear.applies_to(child) or _is_rounding_activation(child),
    )
    return _called_modules(module, [child for _, _, child in watched], example)


def _children(module: nn.Module, keep: Callable[[nn.Module], bool]) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, child)`` of every module of ``module`` (itself included) whose child ``keep`` accepts."""
    return [(parent, name, child) for parent in list(module.modules()) for name, child in list(parent.named_children())
            if keep(child)]  # fmt: skip


def _is_cpu_convolution(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.weight.device.type == "cpu"


def _is_rounding_activation(module: nn.Module) -> bool:
    return type(module) in ROUNDING_ACTIVATIONS


def _called_modules(module: nn.Module, watched: list[nn.Module], example: Tensor | None) -> LayerInputs | None:
    """Which of ``watched`` ``module(example)`` calls, with the shape of its first input (None if not a tensor), or
    None without an example or where it does not run. Run as in a mask step, on inputs that require a gradient
    (some modules take another path without one)."""
    if example is None or not watched:
        return None
    called: dict[nn.Module, torch.Size | None] = {}

    def record(layer: nn.Module, args: Any) -> None:
        if layer not in called:
            called[layer] = args[0].shape if args and isinstance(args[0], Tensor) else None

    hooks = [layer.register_forward_pre_hook(record) for layer in watched]
    try:
        with torch.enable_grad():
            module(example.detach().requires_grad_(True))
    except Exception:  # noqa: BLE001 - the caller checks the copy's logits anyway
        return None
    finally:
        for hook in hooks:
            hook.remove()
    return called
