"""BatchNorm folding: an eval-mode BatchNorm is a per-channel affine map, so it folds into a linear layer beside it.

Folded (in a copy; the user's model is untouched), each exact up to float rounding:

- a convolution, then a BatchNorm of the same dimension (also timm's ``BatchNormAct2d`` and other norm + activation
  modules: the norm folds, their drop and activation stay; also frozen BatchNorms such as torchvision's
  ``FrozenBatchNorm2d``);
- a ``Linear``, then a ``BatchNorm1d`` that normalises its last dimension, directly or through reshapes that keep
  the order of the elements (LeViT's ``LinearNorm``: ``bn(linear(x).flatten(0, 1)).reshape_as(...)``);
- a BatchNorm, then (through eval-mode dropout) a convolution *without padding*, or a ``Linear`` over the channels
  (LeViT's ``NormLinear``, MaxViT's ``pre_norm`` before a 1x1 convolution). With zero padding the border outputs
  would see zeros where the BatchNorm's shift belongs, so a padded convolution after a BatchNorm is left alone.

A BatchNorm next to anything else (e.g. DenseNet's BatchNorm between a concatenation and a ReLU) cannot be folded
and stays. Norm subclasses are checked numerically before they are folded; a convolution subclass is folded into
only if it computes a plain convolution (see :func:`~neuromask_pl.fastcopy.surgery.zero_padding`).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from neuromask_pl.fastcopy.surgery import structural_copy, zero_padding

log = logging.getLogger(__name__)

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_EVAL_IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
# Tensor methods and functions that change a shape but keep the elements' row-major order: after any chain of them,
# an element's index in the last dimension is its flat index modulo that dimension's size.
_RESHAPES = {"flatten", "reshape", "view", "unflatten", "contiguous", "reshape_as", "view_as"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.unflatten}
_OWN_SHAPE_METHODS = {"size", "dim"}  # methods that read only the shape of the tensor they are called on
_OTHER_SHAPE_METHODS = {"reshape_as", "view_as", "expand_as", "type_as"}  # ... of their argument


@dataclass(frozen=True)
class _Norm:
    """An eval-mode BatchNorm as the statistics ``F.batch_norm`` uses, ``spatial`` dimensions (1 for BatchNorm1d),
    and ``tail``, what the module applies after the normalisation (timm's drop + activation), or None."""

    mean: Tensor
    var: Tensor
    eps: float
    weight: Tensor | None
    bias: Tensor | None
    spatial: int
    tail: nn.Module | None

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        scale = torch.rsqrt(self.var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.mean * scale
        return scale, shift + self.bias if self.bias is not None else shift

    def apply(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, False, 0.0, self.eps)


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm (any subclass, e.g. timm's ``BatchNormAct2d``) or a frozen BatchNorm
    (running statistics and an affine map held as buffers: torchvision's ``FrozenBatchNorm2d``, timm's
    ``FrozenBatchNormAct2d``)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    buffers = {name for name, _ in module.named_buffers(recurse=False)}
    frozen_statistics = {"running_mean", "running_var", "weight", "bias"} <= buffers
    return frozen_statistics and isinstance(getattr(module, "eps", None), float)


def _norm_of(module: nn.Module) -> _Norm | None:
    """The eval-mode affine map of a BatchNorm-like module and what it applies after it, or None (training
    mode, no running statistics, or a subclass whose forward is not ``tail(batch_norm(x))``)."""
    if not is_batchnorm(module) or module.training or getattr(module, "running_mean", None) is None:
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
        return None
    spatial = next((n for cls, n in _BATCHNORMS.items() if isinstance(module, cls)), 2)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    norm = _Norm(module.running_mean, module.running_var, module.eps, weight, bias, spatial, None)
    if type(module) in _BATCHNORMS:
        return norm
    parts = [getattr(module, name) for name in ("drop", "act") if isinstance(getattr(module, name, None), nn.Module)]
    tail = nn.Sequential(*parts) if any(not isinstance(p, nn.Identity) for p in parts) else None
    norm = _Norm(norm.mean, norm.var, norm.eps, weight, bias, spatial, tail)
    return norm if _reproduces(module, norm) else None


def _reproduces(module: nn.Module, norm: _Norm) -> bool:
    """Whether ``module(x) == tail(batch_norm(x))`` on a seeded random input, up to a few float roundings."""
    channels = norm.mean.shape[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, *[5] * norm.spatial, generator=generator).to(norm.mean)
    with torch.no_grad():
        try:
            own = module(x.clone())
        except Exception:  # noqa: BLE001 - a forward that cannot run here is not one we can fold
            return False
        expected = norm.apply(x)
        expected = norm.tail(expected) if norm.tail is not None else expected
    if not isinstance(own, Tensor) or own.shape != expected.shape:
        return False
    # The same maths in another order (e.g. x * scale + shift): a few roundings of values of the output's size.
    scale = 32 * torch.finfo(expected.dtype).eps * expected.abs().max().clamp_min(1.0)
    return bool(((own - expected).abs().max() <= scale).item())


def _is_plain_conv(module: nn.Module, spatial: int) -> bool:
    """A convolution of ``spatial`` dimensions whose forward is the convolution its class says (no subclass
    that changes the maths, such as weight standardisation)."""
    conv_type = _CONVS[spatial]
    if not isinstance(module, conv_type) or module.transposed:
        return False
    return type(module) is conv_type or (spatial == 2 and zero_padding(module) is not None)


def _fold_after(layer: nn.Module, norm: _Norm, norm_input_ndims: set[int]) -> nn.Module | None:
    """``layer`` with ``norm`` (which follows it) folded in, or None where that is not exact."""
    if layer.training or getattr(layer, "weight", None) is None or layer.weight.shape[0] != norm.mean.shape[0]:
        return None  # (a Linear's outputs reshaped to other rows: channel j is its output j mod C; not folded)
    if _is_plain_conv(layer, norm.spatial):
        folded_layer = copy.deepcopy(layer)
        folded_layer.weight, folded_layer.bias = fuse_conv_bn_weights(
            layer.weight, layer.bias, norm.mean, norm.var, norm.eps, norm.weight, norm.bias
        )
    elif type(layer) is nn.Linear and norm.spatial == 1 and norm_input_ndims == {2}:
        # The BatchNorm1d's input is (N, C): its channels are the Linear's last dimension.
        ones = torch.ones_like(norm.mean)
        folded_layer = copy.deepcopy(layer)
        folded_layer.weight, folded_layer.bias = fuse_linear_bn_weights(
            layer.weight, layer.bias, norm.mean, norm.var, norm.eps,
            norm.weight if norm.weight is not None else ones, norm.bias if norm.bias is not None else 0 * ones,
        )  # fmt: skip
    else:
        return None
    return folded_layer.requires_grad_(False)


def _fold_before(norm: _Norm, layer: nn.Module, norm_input_ndims: set[int]) -> nn.Module | None:
    """``layer`` with ``norm`` (which precedes it) folded in, or None where that is not exact: a convolution must
    not pad (its border outputs would see zeros, not the shift), a Linear must act on the BatchNorm's channels."""
    if norm.tail is not None or layer.training or getattr(layer, "weight", None) is None:
        return None
    if _is_plain_conv(layer, norm.spatial):
        if isinstance(layer.padding, str):
            padding = [0] if layer.padding == "valid" else [1]
        else:
            padding = list(layer.padding) if type(layer) is _CONVS[norm.spatial] else zero_padding(layer)
        if any(padding):
            return None
    elif not (type(layer) is nn.Linear and norm.spatial == 1 and norm_input_ndims == {2}):
        return None
    scale, shift = norm.scale_shift()
    weight = layer.weight
    out_channels, in_per_group = weight.shape[:2]
    groups = getattr(layer, "groups", 1)
    if in_per_group * groups != scale.shape[0]:
        return None
    # The input channel that weight[o, i] reads: group (o // (out_channels / groups)), channel i within it.
    per_weight = lambda v: v.view(groups, 1, in_per_group).expand(groups, out_channels // groups, in_per_group)  # noqa: E731
    scale, shift = per_weight(scale).reshape(out_channels, in_per_group), per_weight(shift).reshape(out_channels, -1)
    folded_layer = copy.deepcopy(layer)
    spatial_dims = [1] * (weight.ndim - 2)
    bias = (weight.reshape(out_channels, in_per_group, -1).sum(2) * shift).sum(1)
    scaled = weight * scale.view(out_channels, in_per_group, *spatial_dims)
    folded_layer.weight = nn.Parameter(scaled, requires_grad=False)
    folded_layer.bias = nn.Parameter(bias + layer.bias if layer.bias is not None else bias, requires_grad=False)
    return folded_layer


class _Leaves(torch.fx.Tracer):
    """fx tracer that keeps every convolution, Linear and BatchNorm a module call, also subclasses defined outside
    torch (e.g. ``Conv2dStaticSamePadding``, ``BatchNormAct2d``), so that the pairs to fold are visible."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        leaf = isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or is_batchnorm(module)
        return leaf or super().is_leaf_module(module, qualified_name)


def _is_reshape(node: torch.fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _RESHAPES) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS
    )


def _shape_only(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """Whether ``user`` reads only the shape (or dtype, device) of ``node``, which folding does not change."""
    if user.op == "call_method" and user.target in _OWN_SHAPE_METHODS:
        return True
    if user.op == "call_method" and user.target in _OTHER_SHAPE_METHODS:
        return user.args[0] is not node
    return user.op == "call_function" and user.target is getattr and user.args[1] in ("shape", "dtype", "device")


def _value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [user for user in node.users if not _shape_only(user, node)]


class _Graph:
    """The fx graph of a module, with its submodules and how often each is called."""

    def __init__(self, module: nn.Module) -> None:
        self.module = torch.fx.GraphModule(module, _Leaves().trace(module))
        self.modules = dict(self.module.named_modules())
        self.calls: dict[str, int] = {}
        for node in self.module.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    def called_once(self, node: torch.fx.Node) -> nn.Module | None:
        """The module a ``call_module`` node with one argument calls, if no other node calls it."""
        if node.op != "call_module" or self.calls[node.target] != 1 or len(node.args) != 1 or node.kwargs:
            return None
        return self.modules[node.target]

    def replace(self, target: str, module: nn.Module) -> None:
        parent_name, _, name = target.rpartition(".")
        setattr(self.module.get_submodule(parent_name) if parent_name else self.module, name, module)
        self.modules[target] = module

    def producer(self, node: torch.fx.Node, through_reshapes: bool) -> tuple[torch.fx.Node, bool] | None:
        """The module call whose output reaches ``node``'s input (through reshapes, if allowed) with no other use
        of its values, and whether reshapes lay between."""
        current, reshaped = node.args[0], False
        while isinstance(current, torch.fx.Node) and through_reshapes and _is_reshape(current):
            if len(_value_users(current)) != 1:
                return None
            current, reshaped = current.args[0], True
        if not isinstance(current, torch.fx.Node) or current.op != "call_module" or len(_value_users(current)) != 1:
            return None
        return current, reshaped

    def consumer(self, node: torch.fx.Node) -> tuple[torch.fx.Node, bool] | None:
        """The module call that alone reads ``node``'s values (through eval-mode dropout and reshapes), and whether
        reshapes lay between."""
        current, reshaped = node, False
        while True:
            users = _value_users(current)
            if len(users) != 1 or users[0].args[:1] != (current,):
                return None
            user = users[0]
            if user.op == "call_module" and isinstance(self.modules[user.target], _EVAL_IDENTITY):
                current = user
            elif _is_reshape(user):
                current, reshaped = user, True
            elif user.op == "call_module":
                return user, reshaped
            else:
                return None


def _fold_graph(graph: _Graph, ndims: dict[nn.Module, set[int]]) -> int:
    """Fold every foldable pair in ``graph`` (in place); returns how many BatchNorms were folded."""
    folded = 0
    for node in list(graph.module.graph.nodes):  # a BatchNorm after a layer
        norm_module = graph.called_once(node)
        norm = _norm_of(norm_module) if norm_module is not None else None
        found = graph.producer(node, through_reshapes=True) if norm is not None else None
        layer = graph.called_once(found[0]) if found is not None else None
        if layer is None or (found[1] and not isinstance(layer, nn.Linear)):  # convolutions: no reshapes between
            continue
        folded_layer = _fold_after(layer, norm, ndims.get(norm_module, set()))
        if folded_layer is None:
            continue
        graph.replace(found[0].target, folded_layer)
        if norm.tail is not None:
            graph.replace(node.target, norm.tail)  # the norm + activation module keeps its activation
        else:
            node.replace_all_uses_with(node.args[0])
            graph.module.graph.erase_node(node)
        folded += 1
    for node in list(graph.module.graph.nodes):  # a BatchNorm before a layer
        norm_module = graph.called_once(node)
        norm = _norm_of(norm_module) if norm_module is not None else None
        found = graph.consumer(node) if norm is not None else None
        layer = graph.called_once(found[0]) if found is not None else None
        if layer is None or (found[1] and not isinstance(layer, nn.Linear)):
            continue
        folded_layer = _fold_before(norm, layer, ndims.get(norm_module, set()))
        if folded_layer is None:
            continue
        graph.replace(found[0].target, folded_layer)
        node.replace_all_uses_with(node.args[0])
        graph.module.graph.erase_node(node)
        folded += 1
    graph.module.graph.lint()
    graph.module.delete_all_unused_submodules()
    graph.module.recompile()
    return folded


def _fold_sequential(module: nn.Sequential, ndims: dict[nn.Module, set[int]]) -> int:
    """Fold adjacent (layer, BatchNorm) and (BatchNorm, layer) children of a Sequential fx cannot trace."""
    folded = 0
    names = list(module._modules)
    for first, second in zip(names, names[1:]):
        layer, norm_module = module._modules[first], module._modules[second]
        norm = _norm_of(norm_module) if norm_module is not None else None
        folded_layer = _fold_after(layer, norm, ndims.get(norm_module, set())) if norm and layer is not None else None
        if folded_layer is not None:
            module._modules[first], module._modules[second] = folded_layer, norm.tail or nn.Identity()
            folded += 1
    for first, second in zip(names, names[1:]):
        norm_module, layer = module._modules[first], module._modules[second]
        norm = _norm_of(norm_module) if norm_module is not None else None
        folded_layer = _fold_before(norm, layer, ndims.get(norm_module, set())) if norm and layer is not None else None
        if folded_layer is not None:
            module._modules[first], module._modules[second] = nn.Identity(), folded_layer
            folded += 1
    return folded


def _fold_in_place(module: nn.Module, ndims: dict[nn.Module, set[int]]) -> tuple[nn.Module, int]:
    if not any(is_batchnorm(m) for m in module.modules()):
        return module, 0
    try:
        graph = _Graph(module)
    except Exception as error:  # noqa: BLE001 - untraceable python: fold inside the children instead
        log.debug("fx cannot trace %s (%s); folding inside its children", type(module).__name__, error)
    else:
        return graph.module, _fold_graph(graph, ndims)
    folded = _fold_sequential(module, ndims) if isinstance(module, nn.Sequential) else 0
    for name, child in list(module.named_children()):
        new_child, count = _fold_in_place(child, ndims)
        if new_child is not child:
            setattr(module, name, new_child)
        folded += count
    return module, folded


def _batchnorm_input_ndims(module: nn.Module, example: Tensor | None) -> dict[nn.Module, set[int]]:
    """The number of dimensions of each BatchNorm's inputs when ``module`` runs on ``example`` (empty without)."""
    ndims: dict[nn.Module, set[int]] = {}
    if example is None:
        return ndims

    def record(norm: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor):
            ndims.setdefault(norm, set()).add(args[0].ndim)

    hooks = [m.register_forward_pre_hook(record) for m in module.modules() if is_batchnorm(m)]
    try:
        with torch.no_grad():
            module(example)
    except Exception as error:  # noqa: BLE001 - without the shapes, only the shape-free pairs are folded
        log.debug("the classifier does not run on the example (%s); BatchNorm1d beside a Linear stays", error)
        ndims.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return ndims


def fold_batchnorm(module: nn.Module, example: Tensor | None = None) -> tuple[nn.Module, int]:
    """A copy of an eval-mode ``module`` with every BatchNorm that can be folded into the layer before or after it
    folded (see the module's docstring); returns ``(copy, number of folded BatchNorms)``. Where fx cannot trace a
    module, its children are folded separately (and adjacent pairs of its Sequentials).

    Args:
        module: the frozen classifier (not modified).
        example: an input it accepts (e.g. two images); it tells which ``BatchNorm1d`` normalise the last
            dimension, so that those beside a ``Linear`` fold. Without it, they stay.
    """
    module = structural_copy(module)
    return _fold_in_place(module, _batchnorm_input_ndims(module, example))
