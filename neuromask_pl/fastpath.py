"""A faster copy of a frozen classifier: BatchNorm folded, channels_last, optionally compiled.

A mask step is one forward and one backward-to-input of a classifier whose weights never change.
That allows what a training step cannot use: an eval-mode BatchNorm is an affine map, so it folds
into the convolution before it. Everything here works on a *copy*; the user's model is untouched.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx
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
        verify: check the copy's logits against the original's on the first batch it sees,
            and use the original (with a warning) if they differ by more than float rounding.
    """

    fold_batchnorm: bool = True
    channels_last: bool | None = None
    compile: bool = False
    verify: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def uses_channels_last(self, device: torch.device) -> bool:
        return self.channels_last if self.channels_last is not None else device.type == "cuda"


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
    return fast.shape == reference.shape and bool(((fast - reference).abs().max() <= 1e-3 * scale).item())


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
        self.folded = 0

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
        if not (options.fold_batchnorm or channels_last or options.compile):
            return classifier
        key = self._state_key(classifier, images.device)
        if key != self._key:
            self._module, self._key = self._build(classifier, images, channels_last), key
        return self._module  # type: ignore[return-value]

    def _build(self, classifier: nn.Module, images: Tensor, channels_last: bool) -> nn.Module:
        module, self.folded = fold_batchnorm(classifier) if self.options.fold_batchnorm else (classifier, 0)
        if channels_last:
            if module is classifier:
                module = copy.deepcopy(classifier)
            module = module.to(memory_format=torch.channels_last)
        if self.options.verify and module is not classifier:
            sample = images[:2]
            with torch.no_grad():
                reference = classifier(sample)
                try:
                    fed = sample.contiguous(memory_format=torch.channels_last) if channels_last else sample
                    candidate = module(fed)
                    ok = isinstance(candidate, Tensor) and _close(candidate, reference)
                except Exception as error:  # noqa: BLE001 - any failure of the copy means: use the original
                    log.warning("the fast copy of the classifier failed (%s); using the classifier as it is", error)
                    ok, module = False, classifier
            if not ok and module is not classifier:
                log.warning(
                    "the BatchNorm-folded copy of the classifier changes its logits beyond float rounding; "
                    "using the classifier as it is (set fold_batchnorm=False to silence this)"
                )
                module, self.folded = classifier, 0
        if self.options.compile:
            mode = "reduce-overhead" if images.device.type == "cuda" else "default"
            module = torch.compile(module, mode=mode)
        return _ChannelsLast(module) if channels_last else module


class _ChannelsLast(nn.Module):
    """Feeds its module channels_last inputs."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: Tensor) -> Tensor:
        return self.module(images.contiguous(memory_format=torch.channels_last))
