"""A faster copy of a frozen classifier: BatchNorm folded, channels_last, optionally compiled.

A mask step is one forward and one backward-to-input of a classifier whose weights never change.
That allows what a training step cannot use: an eval-mode BatchNorm is an affine map, so it folds
into the convolution before it. Everything here works on a *copy*; the user's model is untouched.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

_CONV_BN = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


@dataclass(frozen=True)
class FastPath:
    """How the frozen classifier is run while masks are learned (none of it changes the maths).

    Attributes:
        fold_batchnorm: fold eval-mode BatchNorm layers into the convolutions before them (in a copy).
        channels_last: run the copy in channels_last memory format; None = on CUDA only
            (measured slower on the CPU).
        compile: ``torch.compile`` the copy (mode ``reduce-overhead``, i.e. with CUDA graphs, on CUDA).
        pack_convolutions: on the CPU, run the convolutions :meth:`FrozenConv2d.padding_of` accepts as
            :class:`FrozenConv2d` (weights
            packed once for oneDNN; backward to the input only); None = on for the CPU when oneDNN is
            available and ``compile`` is off. Float32 only: under autocast the layers run as they are.
    """

    fold_batchnorm: bool = True
    channels_last: bool | None = None
    compile: bool = False
    pack_convolutions: bool | None = None

    @classmethod
    def of(cls, value: FastPath | Mapping[str, Any] | None) -> FastPath:
        """A FastPath from itself, a dict of its fields, or None (the defaults)."""
        if value is None or isinstance(value, cls):
            return value or cls()
        if not isinstance(value, Mapping):
            raise TypeError(f"fast_path must be a FastPath or a dict of its fields, got {type(value).__name__}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown fast_path fields {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**value)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def uses_channels_last(self, device: torch.device) -> bool:
        return self.channels_last if self.channels_last is not None else device.type == "cuda"

    def records_cuda_graphs(self, device: torch.device) -> bool:
        """Whether the compiled copy runs as CUDA graphs (one recording per batch size): compile on CUDA."""
        return self.compile and device.type == "cuda"

    def packs_convolutions(self, device: torch.device) -> bool:
        if device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        return self.pack_convolutions if self.pack_convolutions is not None else not self.compile


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        any(isinstance(conv, c) and type(bn) is b for c, b in _CONV_BN)
        and not conv.training
        and not bn.training
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
    )


class _ConvBatchNormLeaves(torch.fx.Tracer):
    """fx tracer that keeps every convolution and BatchNorm a module call, also subclasses defined
    outside torch (e.g. ``Conv2dStaticSamePadding``), so that conv -> BN pairs are visible."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        leaves = tuple(cls for pair in _CONV_BN for cls in pair)
        return isinstance(module, leaves) or super().is_leaf_module(module, qualified_name)


def _fold_traced(module: nn.Module) -> tuple[nn.Module, int]:
    """Fold conv -> BN pairs in the fx graph of ``module`` (in place on its submodules)."""
    graph_module = torch.fx.GraphModule(module, _ConvBatchNormLeaves().trace(module))
    modules = dict(graph_module.named_modules())
    folded = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
            continue
        producer = node.args[0]
        if producer.op != "call_module" or len(producer.users) != 1:
            continue
        conv, bn = modules[producer.target], modules[node.target]
        if not _foldable(conv, bn):
            continue
        fused = fuse_conv_bn_eval(conv, bn)
        fused.requires_grad_(False)
        parent_name, _, name = producer.target.rpartition(".")
        setattr(graph_module.get_submodule(parent_name) if parent_name else graph_module, name, fused)
        modules[producer.target] = fused
        node.replace_all_uses_with(producer)
        graph_module.graph.erase_node(node)
        folded += 1
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module, folded


def _fold_sequential(module: nn.Sequential) -> int:
    """Fold adjacent conv, BN children of a Sequential (for models fx cannot trace)."""
    names = list(module._modules)
    folded = 0
    for first, second in zip(names, names[1:]):
        conv, bn = module._modules[first], module._modules[second]
        if conv is not None and bn is not None and _foldable(conv, bn):
            module._modules[first] = fuse_conv_bn_eval(conv, bn).requires_grad_(False)
            module._modules[second] = nn.Identity()
            folded += 1
    return folded


def _fold_in_place(module: nn.Module) -> tuple[nn.Module, int]:
    if not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) for m in module.modules()):
        return module, 0
    try:
        return _fold_traced(module)
    except Exception as error:  # noqa: BLE001 - untraceable python: fold inside the children instead
        log.debug("fx cannot trace %s (%s); folding inside its children", type(module).__name__, error)
    folded = _fold_sequential(module) if isinstance(module, nn.Sequential) else 0
    for name, child in list(module.named_children()):
        new_child, count = _fold_in_place(child)
        if new_child is not child:
            setattr(module, name, new_child)
        folded += count
    return module, folded


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """A copy of an eval-mode ``module`` with every BatchNorm that directly follows a convolution
    folded into it; returns ``(copy, number of folded layers)``. Where fx cannot trace a module,
    its children are folded separately (and adjacent conv, BN pairs of Sequentials)."""
    return _fold_in_place(copy.deepcopy(module))


def _close(fast: Tensor, reference: Tensor) -> bool:
    fast, reference = fast.float(), reference.float()
    scale = reference.abs().max().clamp_min(1.0)
    # 1e-2: room for TF32 convolutions on GPUs; a wrongly folded layer is off by far more.
    return fast.shape == reference.shape and bool(((fast - reference).abs().max() <= 1e-2 * scale).item())


class FastClassifier:
    """Builds and caches the fast copy of a frozen classifier.

    The cache is keyed by the classifier's identity, device and the in-place version counters of its
    parameters and buffers, so a classifier that was trained further (e.g. between the epochs of
    :class:`~neuromask_pl.callbacks.ExplainDuringTraining`) gets a fresh copy.
    """

    def __init__(self, options: FastPath) -> None:
        self.options = options
        self._key: tuple | None = None
        self._module: nn.Module | None = None
        self.folded = 0  # BatchNorm layers folded into the current copy
        self.packed = 0  # convolutions of the current copy run as FrozenConv2d

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (and deepcopy) the options only: the cached copy is rebuilt where it is needed."""
        return {"options": self.options, "_key": None, "_module": None, "folded": 0, "packed": 0}

    @staticmethod
    def _state_key(classifier: nn.Module, device: torch.device) -> tuple:
        tensors = [*classifier.parameters(), *classifier.buffers()]
        return (id(classifier), str(device), tuple((t.data_ptr(), t._version) for t in tensors))

    def get(self, classifier: nn.Module, images: Tensor) -> nn.Module:
        """The module to run in the mask steps: the fast copy, or ``classifier`` itself when no option applies.

        ``classifier`` must already be frozen (eval mode, no parameter gradients); ``images``
        is a batch used to check the copy against the original.
        """
        options = self.options
        channels_last = options.uses_channels_last(images.device) and images.ndim == 4
        pack = options.packs_convolutions(images.device)
        if not (options.fold_batchnorm or channels_last or options.compile or pack):
            return classifier
        key = self._state_key(classifier, images.device)
        if key != self._key:
            self._module, self._key = self._build(classifier, images, channels_last, pack), key
        return self._module  # type: ignore[return-value]

    def _build(self, classifier: nn.Module, images: Tensor, channels_last: bool, pack: bool) -> nn.Module:
        try:
            module, self.folded = fold_batchnorm(classifier) if self.options.fold_batchnorm else (classifier, 0)
            if module is classifier and (pack or channels_last):
                module = copy.deepcopy(classifier)
        except Exception as error:  # noqa: BLE001 - e.g. a module holding tensors that cannot be deep-copied
            log.warning(
                "the classifier cannot be copied for the fast path (%s); using it as it is "
                "(fast_path={'fold_batchnorm': False, 'pack_convolutions': False} silences this)", error
            )
            self.folded = self.packed = 0
            return classifier
        self.packed = pack_convolutions(module) if pack else 0
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        if module is not classifier and not _same_logits(classifier, module, images[:2], channels_last):
            module, self.folded, self.packed = classifier, 0, 0
        if self.options.compile:
            mode = "reduce-overhead" if self.options.records_cuda_graphs(images.device) else "default"
            compiled = torch.compile(module, mode=mode)
            # Checked too: a compiled kernel is cached on disk, and one cached under other CPU kernels
            # (ATEN_CPU_CAPABILITY) has given NaN here (torch 2.14): fall back rather than learn NaN masks.
            if _same_logits(classifier, compiled, images[:2], channels_last, "compiled"):
                module = compiled
        return _ChannelsLast(module) if channels_last else module


def _same_logits(
    classifier: nn.Module, fast: nn.Module, sample: Tensor, channels_last: bool, what: str = "fast"
) -> bool:
    """Whether the ``what`` copy gives the classifier's logits on ``sample`` (up to float rounding); warns if not.

    Checked without autocast, also under mixed precision: folding and packing are exact up to float rounding.
    """
    fallback = "the uncompiled copy" if what == "compiled" else "the classifier as it is"
    with torch.no_grad(), torch.autocast(sample.device.type, enabled=False):
        reference = classifier(sample)
        try:
            candidate = fast(sample.contiguous(memory_format=torch.channels_last) if channels_last else sample)
        except Exception as error:  # noqa: BLE001 - any failure of the copy means: use the original
            log.warning("the %s copy of the classifier failed (%s); using %s", what, error, fallback)
            return False
    if isinstance(candidate, Tensor) and _close(candidate, reference):
        return True
    log.warning(
        "the %s copy of the classifier changes its logits beyond float rounding; using %s "
        "(fast_path={'fold_batchnorm': False, 'pack_convolutions': False, 'compile': False} silences this)",
        what,
        fallback,
    )
    return False


class _ChannelsLast(nn.Module):
    """Feeds its module channels_last inputs."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: Tensor) -> Tensor:
        return self.module(images.contiguous(memory_format=torch.channels_last))


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
    - other strided layers: ``conv_transpose2d``.

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
        # (C_in * kh * kw, C_out), for the col2im gradient of image stems
        stem = self.weight.shape[1] <= 4 and self.groups == 1
        self.columns = self.weight.flatten(1).t().contiguous() if stem else None

    @staticmethod
    def padding_of(conv: nn.Module) -> list[int] | None:
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
        return _plain_padding(conv)

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
                    _flipped_transposed(self.weight, self.groups), padding, [1, 1], [1, 1], self.groups,
                    list(grad.shape),
                )
            return self.run(grad, self._packed_flipped, None, padding, [1, 1])
        if self.columns is not None:
            columns = torch.matmul(self.columns, grad.reshape(grad.shape[0], grad.shape[1], -1))
            return F.fold(columns, tuple(input_size), self.kernel_size, padding=self.padding, stride=self.stride)
        output_padding = [
            (size + 2 * p - k) % s for size, p, k, s in zip(input_size, self.padding, self.kernel_size, self.stride)
        ]
        return F.conv_transpose2d(grad, self.weight, None, self.stride, self.padding, output_padding, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return self.conv(x)
        return _FrozenConvFunction.apply(F.pad(x, self.pre_pad) if self.pre_pad else x, self)


def _flipped_transposed(weight: Tensor, groups: int) -> Tensor:
    """The kernel of a stride-1 convolution's input gradient: in and out channels swapped within each group,
    spatially flipped; (C_out, C_in / g, kh, kw) -> (C_in, C_out / g, kh, kw)."""
    out_channels, in_per_group, height, width = weight.shape
    grouped = weight.reshape(groups, out_channels // groups, in_per_group, height, width).transpose(1, 2)
    return grouped.reshape(groups * in_per_group, out_channels // groups, height, width).flip(-1, -2).contiguous()


def _sides(padding: tuple[int, int] | list[int]) -> list[int]:
    """A convolution's (height, width) padding as ``[left, right, top, bottom]``."""
    return [padding[1], padding[1], padding[0], padding[0]]


def _plain_padding(conv: nn.Conv2d) -> list[int] | None:
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


def pack_convolutions(module: nn.Module) -> int:
    """Replace, in place, every convolution of a frozen CPU module that :class:`FrozenConv2d` applies to;
    returns how many. Only for copies: the layers lose their weight gradients."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Conv2d) or child.weight.device.type != "cpu":
                continue
            padding = FrozenConv2d.padding_of(child)
            if padding is not None:
                setattr(parent, name, FrozenConv2d(child, padding))
                replaced += 1
    return replaced
