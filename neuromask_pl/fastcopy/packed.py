"""Frozen CPU convolutions and Linear layers with their weights packed once for oneDNN, and a cheap gradient to
their input.

A mask step needs the gradient of the classifier's output with respect to its input, never with respect to its
weights, so a frozen convolution or Linear layer can keep its weights in oneDNN's blocked layout and skip the
weight gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuromask_pl.fastcopy.invariant import ROW_BLOCK, by_blocks, per_image_linear
from neuromask_pl.fastcopy.surgery import sides, takes_replacement, zero_padding


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
        left, right, top, bottom = padding if padding is not None else sides(conv.padding)  # type: ignore[arg-type]
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
        """The padding with which this class runs ``conv`` (:func:`~neuromask_pl.fastcopy.surgery.zero_padding`), or
        None to leave it as it is."""
        return zero_padding(conv)

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
        if not takes_replacement(x):
            return self.conv(x)
        return _FrozenConvFunction.apply(F.pad(x, self.pre_pad) if self.pre_pad else x, self)


def _flipped_transposed(weight: Tensor, groups: int) -> Tensor:
    """The kernel of a stride-1 convolution's input gradient: in and out channels swapped within each group,
    spatially flipped; (C_out, C_in / g, kh, kw) -> (C_in, C_out / g, kh, kw)."""
    out_channels, in_per_group, height, width = weight.shape
    grouped = weight.reshape(groups, out_channels // groups, in_per_group, height, width).transpose(1, 2)
    return grouped.reshape(groups * in_per_group, out_channels // groups, height, width).flip(-1, -2).contiguous()


#: (cells per image of a 1x1 convolution's input, at most; weights from which packing pays there, None: never):
#: docs/results/MODEL_MATRIX.md, "Convolutions packed only where it pays".
PACKED_POINTWISE_MIN_WEIGHTS: tuple[tuple[float, int | None], ...] = (
    (1, None),
    (16, 32768),
    (float("inf"), 16384),
)


def packing_pays(conv: nn.Conv2d, input_shape: torch.Size) -> bool:
    """Whether :class:`FrozenConv2d` measured faster than the original layer (forward and input gradient) for layers
    like ``conv`` at an input of ``input_shape``; by the layer's shape only, so the same on every run.

    Depthwise convolutions pay at stride 1 only, 1x1 ones from :data:`PACKED_POINTWISE_MIN_WEIGHTS` weights by the
    cells per image (never at one cell: squeeze-and-excitation), every other kind always. The measurements behind it:
    docs/results/MODEL_MATRIX.md, "Convolutions packed only where it pays" (``benchmarks/speed.py --matrix``).
    """
    if conv.groups > 1 and conv.groups == conv.in_channels:  # depthwise
        return tuple(conv.stride) == (1, 1)
    if tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
        return True
    cells = input_shape[-2] * input_shape[-1]
    least = next(weights for most_cells, weights in PACKED_POINTWISE_MIN_WEIGHTS if cells <= most_cells)
    return least is not None and conv.weight.numel() >= least


#: Linear layers with fewer weights stay as they are: their weights stay in the CPU's caches, where ATen's product
#: measured faster than oneDNN's packed one (docs/results/MODEL_MATRIX.md, "Packed Linear layers").
MIN_PACKED_LINEAR_WEIGHTS = 65536


class _FrozenLinearFunction(torch.autograd.Function):
    """Linear map of a frozen layer (see :class:`FrozenLinear`); backward gives the input's gradient only."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: FrozenLinear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        out = by_blocks(layer.product, x, layer.blocked)
        return out if out._base is None else out.clone()  # not a view: the next layer may work in place (Hardswish)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return by_blocks(ctx.layer.input_gradient, grad, ctx.layer.blocked), None


class FrozenLinear(nn.Module):
    """A frozen ``nn.Linear`` for the CPU: ``x W^T + b`` and the gradient to its input ``g W`` (mathematically the
    same as autograd's; the weight gradient is skipped). With ``packed``, ``W`` and ``W^T`` are packed once for
    oneDNN (faster for large layers); else ATen's products run. With ``blocked`` (for a layer that gets at most
    :data:`ROW_BLOCK` rows an image, a classifier's head), the rows run in blocks of :data:`ROW_BLOCK`, so that a
    row's result does not depend on how many rows run. With ``per_image`` (unpacked, for inputs whose first dimension
    is the images), each image's rows are their own product (:func:`per_image_linear`).

    The layer keeps ``weight`` and ``bias`` (the same tensors), so code that reads them still works. Only float32
    CPU inputs outside autocast take this path; anything else runs the original layer.
    """

    def __init__(self, linear: nn.Linear, packed: bool = True, blocked: bool = False, per_image: bool = False) -> None:
        super().__init__()
        self.linear = linear
        self.weight = linear.weight.detach()
        self.bias = linear.bias.detach() if linear.bias is not None else None
        self.packed, self.blocked, self.per_image = packed, blocked, per_image
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
        sample = torch.randn(ROW_BLOCK, module.in_features, generator=torch.Generator().manual_seed(0))
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
        if not takes_replacement(x):
            return self.linear(x)
        if self.per_image and x.ndim >= 3:  # never packed (the pass builds it unpacked)
            return per_image_linear(x, self.weight, self.bias)
        if not self.packed:  # ATen's products: autograd runs the blocks' input gradients (blocks of the same shape)
            return by_blocks(self.product, x, self.blocked)
        return _FrozenLinearFunction.apply(x, self)
