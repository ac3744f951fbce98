"""Model surgery shared by the passes: finding layers, recording what they receive, reading a convolution's padding,
and the one rule for when a replacement layer runs (float32 on the CPU outside autocast)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

#: A layer's first input shape in a recorded run (None where it is not a tensor), by layer: see :func:`record_inputs`.
LayerInputs = dict[nn.Module, "torch.Size | None"]


def structural_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree of modules that the passes may change freely: every module object is its own (a
    shallow copy, with its own dicts of children, parameters, buffers and hooks, and its own copy of every dict, list
    or set attribute, which a forward may fill, e.g. with fx proxies while it is traced), every parameter a new
    ``Parameter`` on the same storage, and everything else shared: tensors are never copied, nor anything that is not a
    module (a LightningModule's Trainer, its metrics' states, a logger), so it works where ``copy.deepcopy`` cannot or
    would copy a whole training run."""
    copies: dict[int, nn.Module] = {}

    def clone(original: nn.Module) -> nn.Module:
        if id(original) in copies:
            return copies[id(original)]
        twin = original.__class__.__new__(original.__class__)
        twin.__dict__.update(original.__dict__)
        copies[id(original)] = twin
        for name, value in original.__dict__.items():  # hooks, and caches a forward fills (LeViT's attention biases)
            if isinstance(value, (dict, list, set)) and name not in ("_parameters", "_buffers", "_modules"):
                twin.__dict__[name] = value.copy()
        twin._parameters = {
            name: None if p is None else nn.Parameter(p.data, requires_grad=p.requires_grad)
            for name, p in original._parameters.items()
        }
        twin._buffers = dict(original._buffers)
        twin._modules = {name: None if c is None else clone(c) for name, c in original._modules.items()}
        if isinstance(original, torch.fx.GraphModule):  # its graph and generated class are its own too
            twin = torch.fx.GraphModule(twin, copy.deepcopy(original.graph), type(original).__name__)
            copies[id(original)] = twin
        return twin

    return clone(module)


def takes_replacement(x: Tensor) -> bool:
    """Whether a replacement layer computes ``x`` itself: float32 CPU tensors outside autocast. Anything else (float64,
    half precision, autocast, CUDA) runs the original layer it wraps."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


def children(module: nn.Module, keep: Callable[[nn.Module], bool]) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, child)`` of every module of ``module`` (itself included) whose child ``keep`` accepts."""
    return [(parent, name, child) for parent in list(module.modules()) for name, child in list(parent.named_children())
            if keep(child)]  # fmt: skip


def record_inputs(module: nn.Module, watched: list[nn.Module], example: Tensor | None) -> LayerInputs | None:
    """Which of ``watched`` ``module(example)`` calls, with the shape of its first input (None if not a tensor), or
    None without an example or where it does not run. Run as in a mask step, on inputs that require a gradient
    (some modules take another path without one)."""
    if example is None or not watched:
        return None
    called: LayerInputs = {}

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


def is_cpu_convolution(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.weight.device.type == "cpu"


def zero_padding(conv: nn.Module) -> list[int] | None:
    """The zero padding ``[left, right, top, bottom]`` under which ``conv`` is an ordinary convolution (no
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
        return sides(conv.padding) if fits else None  # type: ignore[arg-type]
    return _subclass_padding(conv)


def sides(padding: tuple[int, int] | list[int]) -> list[int]:
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
        except Exception:  # noqa: BLE001 - a forward that cannot run on these inputs is not an ordinary convolution
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
    options = [
        sorted(
            ((a, b) for a in range(k) for b in range(k) if (n + a + b - k) // s + 1 == n_out),
            key=lambda ab: (ab[0] != ab[1], ab[0] + ab[1], ab[0]),
        )
        for n, k, s, n_out in zip(size, conv.kernel_size, conv.stride, out_size)
    ]
    return [[left, right, top, bottom] for top, bottom in options[0] for left, right in options[1]]


def _reproduces(conv: nn.Conv2d, sample: Tensor, own: Tensor, padding: list[int]) -> bool:
    ordinary = F.conv2d(F.pad(sample, padding), conv.weight, conv.bias, conv.stride, 0, 1, conv.groups)
    return ordinary.shape == own.shape and torch.allclose(ordinary, own, rtol=1e-5, atol=1e-6)
