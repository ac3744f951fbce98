"""A faster copy of a frozen classifier: BatchNorm folded, convolutions and large Linear layers packed,
channels_last, optionally compiled.

A mask step is one forward and one backward-to-input of a classifier whose weights never change. That allows
what a training step cannot use: an eval-mode BatchNorm is an affine map, so it folds into the layer beside it
(:mod:`~neuromask_pl.maths.folding`), and a frozen CPU convolution or Linear layer can keep its weights packed for
oneDNN and skip its weight gradient (:mod:`~neuromask_pl.maths.packing`). Which of these pays depends on the model
and the CPU, so with ``FastPath.auto`` the copies the switches allow are timed on the first batch and the fastest
runs. Everything here works on *copies*; the user's model is untouched.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from neuromask_pl.maths.folding import fold_batchnorm, is_batchnorm
from neuromask_pl.maths.packing import (
    FrozenConv2d,
    FrozenLinear,
    PerImageConv2d,
    PlanewiseActivation,
    align_activations,
    layer_inputs,
    pack_convolutions,
    pack_linears,
)

__all__ = [
    "FastPathCache", "FastPath", "FrozenConv2d", "FrozenLinear", "PerImageConv2d", "fastest_variant",
    "fold_batchnorm", "pack_convolutions", "pack_linears",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Layers the packed copy runs only so that an image's result does not depend on its batch (no speed-up).
BATCH_INVARIANT_LAYERS = (FrozenLinear, PerImageConv2d, PlanewiseActivation)

# Timed forward + backward steps per variant when choosing (after one warm-up each): at least MEASURED_ROUNDS, more
# while all rounds so far took less than MEASURED_SECONDS (cheap models: more samples, hence a steadier choice).
MEASURED_ROUNDS, MAX_MEASURED_ROUNDS, MEASURED_SECONDS = 3, 10, 0.5


@dataclass(frozen=True)
class FastPath:
    """How the frozen classifier is run while masks are learned (none of it changes the maths).

    Attributes:
        fold_batchnorm: fold eval-mode BatchNorm layers into the layers beside them (in a copy).
        channels_last: run the copy in channels_last memory format; None = on CUDA only
            (measured slower on the CPU).
        compile: ``torch.compile`` the copy (mode ``reduce-overhead``, i.e. with CUDA graphs, on CUDA).
        pack_convolutions: on the CPU, run the convolutions :meth:`FrozenConv2d.padding_of` accepts and for which
            :func:`~neuromask_pl.maths.packing.packing_pays` at the first batch's shape as :class:`FrozenConv2d`
            (weights packed once for oneDNN; backward to the input only), and the other 1x1 ones as
            :class:`PerImageConv2d` (the same kernel at any batch size); None = on for the CPU when oneDNN is
            available and ``compile`` is off. Float32 only: under autocast the layers run as they are.
        pack_linears: on the CPU, run the ``nn.Linear`` layers the classifier calls that hold at least
            :data:`~neuromask_pl.maths.packing.MIN_PACKED_LINEAR_WEIGHTS` weights as :class:`FrozenLinear`
            (weights packed once for oneDNN; backward to the input only), and those that get under
            :data:`~neuromask_pl.maths.packing.MIN_ROWS` rows an image (a head) as a ``blocked`` FrozenLinear
            (the same products at any batch size); None = as ``pack_convolutions`` (so ``pack_convolutions=False``
            alone turns packing off). Float32 only, as there. With both, each image's logits and input gradient are
            the same bit for bit alone or in any batch on the CPU, for the layers measured
            (docs/results/STABILITY.md, "Bit for bit alone or in any batch").
        auto: time, on the first batch of each image shape and dtype, the variants the switches above allow (the
            classifier as it is, BatchNorm folded, folded and packed (convolutions and Linear layers): a few
            forward + backward steps of each) and
            run the fastest, so the fast path is never slower than the plain one. Off by default: the variants
            differ by float rounding, and at the ``default`` preset's final temperature rounding can move a mask
            (docs/results/STABILITY.md), so a choice made by timing would make masks depend on the machine's load
            from run to run; False runs the switches as given (bit-reproducible from run to run). Not with
            ``compile``, which runs as given.
        fuse_mask_step: compute the mask step's gradient by hand where its settings allow
            (:func:`~neuromask_pl.maths.fused.fuses`; the ``default`` preset does): the same maths with half the
            kernels of autograd, which around a small classifier is most of the step (:mod:`~neuromask_pl.maths.fused`);
            None = on the CPU (on CUDA the kernels run asynchronously and ``compile`` fuses them).
    """

    fold_batchnorm: bool = True
    channels_last: bool | None = None
    compile: bool = False
    pack_convolutions: bool | None = None
    auto: bool = False
    pack_linears: bool | None = None
    fuse_mask_step: bool | None = None

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
        return self._packs(self.pack_convolutions, device)

    def packs_linears(self, device: torch.device) -> bool:
        return self._packs(self.pack_convolutions if self.pack_linears is None else self.pack_linears, device)

    def _packs(self, switch: bool | None, device: torch.device) -> bool:
        """A packing switch on ``device``: only on the CPU with oneDNN; None = on unless ``compile``."""
        if device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        return switch if switch is not None else not self.compile

    def fuses_mask_step(self, device: torch.device) -> bool:
        return self.fuse_mask_step if self.fuse_mask_step is not None else device.type == "cpu"

    def measures(self) -> bool:
        """Whether the variant to run is chosen by timing them (``auto``, without ``compile``)."""
        return self.auto and not self.compile


@dataclass(frozen=True)
class _Variant:
    """One way to run the classifier: the module, and how many BatchNorms are folded, convolutions and Linear layers
    packed."""

    module: nn.Module
    folded: int
    packed: int
    linears: int = 0


def _close(fast: Tensor, reference: Tensor) -> bool:
    fast, reference = fast.float(), reference.float()
    scale = reference.abs().max().clamp_min(1.0)
    # 1e-2: room for TF32 convolutions on GPUs; a wrongly folded layer is off by far more.
    return fast.shape == reference.shape and bool(((fast - reference).abs().max() <= 1e-2 * scale).item())


class FastPathCache:
    """Builds and caches the fast copies of a frozen classifier, and chooses which one runs.

    The copies are keyed by the classifier's identity, device and the in-place version counters of its
    parameters and buffers, so a classifier that was trained further (e.g. between the epochs of
    :class:`~neuromask_pl.callbacks.ExplainDuringTraining`) gets fresh copies. With ``FastPath.auto``, the choice
    is measured once per model architecture, image shape (without the batch size), dtype, autocast dtype, device
    and thread count, and kept (also through pickling and deep copies, so a copy of an explainer runs what the
    original chose).
    """

    def __init__(self, options: FastPath) -> None:
        self.options = options
        self._key: tuple | None = None
        self._variants: dict[str, _Variant] = {}
        self._choices: dict[tuple, str] = {}  # input key -> variant name
        self._timings: dict[tuple, dict[str, float]] = {}  # input key -> seconds per forward + backward
        self._last: tuple[str, tuple | None] = ("plain", None)  # the variant last returned, and its input key
        self._totals = (0, 0, 0)  # BatchNorm layers, 2-D convolutions and Linear layers of the classifier
        self.folded = 0  # BatchNorm layers folded into the copy last returned
        self.packed = 0  # convolutions of the copy last returned run as FrozenConv2d
        self.packed_linears = 0  # Linear layers of the copy last returned run as FrozenLinear

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (and deepcopy) the options and choices only: the copies are rebuilt where they are needed."""
        return {**self.__dict__, "_key": None, "_variants": {}}

    @staticmethod
    def _state_key(classifier: nn.Module, device: torch.device) -> tuple:
        tensors = [*classifier.parameters(), *classifier.buffers()]
        return (id(classifier), str(device), tuple((t.data_ptr(), t._version) for t in tensors))

    @staticmethod
    def _input_key(classifier: nn.Module, images: Tensor) -> tuple:
        """What the speed of a variant depends on: the model, the images but their number, the arithmetic, where."""
        device = images.device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        cpu = torch.backends.cpu.get_cpu_capability()
        machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
        model = (type(classifier).__qualname__, sum(p.numel() for p in classifier.parameters()))
        return (model, tuple(images.shape[1:]), images.dtype, autocast, str(device), machine, torch.get_num_threads())

    def get(self, classifier: nn.Module, images: Tensor) -> nn.Module:
        """The module to run in the mask steps: a fast copy, or ``classifier`` itself when no option applies or
        (``auto``) when it measured fastest.

        ``classifier`` must already be frozen (eval mode, no parameter gradients); ``images`` is a batch used to
        check the copies against the original and, with ``auto``, to time them. Timing runs each variant's forward
        and backward on detached images and changes no state, so no mask depends on it beyond float rounding.
        """
        options = self.options
        channels_last = options.uses_channels_last(images.device) and images.ndim == 4
        pack = options.packs_convolutions(images.device)
        pack_linear = options.packs_linears(images.device)
        if not (options.fold_batchnorm or channels_last or options.compile or pack or pack_linear):
            return self._use("plain", _Variant(classifier, 0, 0), None)
        key = self._state_key(classifier, images.device)
        if key != self._key:
            self._variants, self._key = self._build(classifier, images, channels_last, pack, pack_linear), key
            self._totals = (
                sum(is_batchnorm(m) for m in classifier.modules()),
                sum(isinstance(m, nn.Conv2d) for m in classifier.modules()),
                sum(isinstance(m, nn.Linear) for m in classifier.modules()),
            )
        if len(self._variants) == 1:
            name = next(iter(self._variants))
            return self._use(name, self._variants[name], None)
        input_key = self._input_key(classifier, images)
        usable = self._usable(images)
        if len(usable) == 1:
            return self._use(usable[0], self._variants[usable[0]], None)
        if input_key not in self._choices or self._choices[input_key] not in usable:
            candidates = {name: self._variants[name].module for name in usable}
            self._choices[input_key], seconds = fastest_variant(candidates, images)
            self._timings[input_key] = seconds
            log.info(
                "fast path for %s: %s (forward + backward ms: %s)", type(classifier).__name__,
                self._choices[input_key], ", ".join(f"{k} {1e3 * v:.2f}" for k, v in seconds.items()),
            )  # fmt: skip
        name = self._choices[input_key]
        return self._use(name, self._variants[name], input_key)

    def _usable(self, images: Tensor) -> list[str]:
        """The variants worth timing for these images: packed layers only run on float32 outside autocast."""
        float32 = images.dtype == torch.float32 and not torch.is_autocast_enabled(images.device.type)
        return [name for name, v in self._variants.items() if float32 or not (v.packed or v.linears)]

    def _use(self, name: str, variant: _Variant, input_key: tuple | None) -> nn.Module:
        self._last = (name, input_key)
        self.folded, self.packed, self.packed_linears = variant.folded, variant.packed, variant.linears
        return variant.module

    def report(self) -> dict[str, Any]:
        """What the last :meth:`get` ran, for logs and run records: the variant (``plain``, ``folded``,
        ``folded+packed``, ...), BatchNorms folded of all, convolutions packed of all 2-D ones, Linear layers packed
        of all, whether it was measured, and the measured forward + backward milliseconds of each variant (empty if
        not measured)."""
        name, input_key = self._last
        return {
            "variant": name,
            "folded_batchnorm": self.folded,
            "batchnorm_layers": self._totals[0],
            "packed_convolutions": self.packed,
            "convolutions": self._totals[1],
            "packed_linears": self.packed_linears,
            "linears": self._totals[2],
            "measured": input_key is not None,
            "forward_backward_ms": {k: 1e3 * v for k, v in self._timings.get(input_key, {}).items()},
        }

    def _build(
        self, classifier: nn.Module, images: Tensor, channels_last: bool, pack: bool, pack_linear: bool
    ) -> dict[str, _Variant]:
        """The variants to choose from, in order: ``plain`` (with ``auto``), folded, folded and packed; without
        ``auto`` only the last. A copy that changes the classifier's logits beyond rounding is left out."""
        options, plain = self.options, {"plain": _Variant(classifier, 0, 0)}
        try:
            module, folded = fold_batchnorm(classifier, images[:2]) if options.fold_batchnorm else (classifier, 0)
            if module is classifier and (pack or pack_linear or channels_last):
                module = copy.deepcopy(classifier)
        except Exception as error:  # noqa: BLE001 - e.g. a module holding tensors that cannot be deep-copied
            log.warning(
                "the classifier cannot be copied for the fast path (%s); using it as it is "
                "(fast_path={'fold_batchnorm': False, 'pack_convolutions': False, 'pack_linears': False} "
                "silences this)",
                error,
            )
            return plain
        copies: list[_Variant] = []
        if options.measures() and (folded or channels_last):
            copies.append(_Variant(module, folded, 0))
        if pack or pack_linear:
            packed_module = _sharing_tensors(module) if options.measures() else module
            inputs = layer_inputs(packed_module, images[:2])  # one run of the classifier for the three
            packed = pack_convolutions(packed_module, images[:2], inputs) if pack else 0
            linears = pack_linears(packed_module, images[:2], inputs) if pack_linear else 0
            align_activations(
                packed_module, images[:2], inputs
            )  # the same rounding alone or in any batch (not counted)
            if packed or linears or not options.measures():
                copies.append(_Variant(packed_module, folded, packed, linears))
        elif not options.measures():
            copies.append(_Variant(module, folded, 0))
        variants = plain if options.measures() else {}
        for variant in copies:
            invariant = any(isinstance(m, BATCH_INVARIANT_LAYERS) for m in variant.module.modules())
            changed = variant.folded or variant.packed or variant.linears or invariant
            if not (changed or channels_last or options.compile):
                continue  # nothing changed: the classifier itself runs
            if channels_last:
                variant.module.to(memory_format=torch.channels_last)
            if not _same_logits(classifier, variant.module, images[:2], channels_last):
                continue
            fast = variant.module
            if options.compile:
                graphs = options.records_cuda_graphs(images.device)
                compiled = torch.compile(fast, mode="reduce-overhead" if graphs else "default")
                # Checked too: a compiled kernel is cached on disk, and one cached under other CPU kernels
                # (ATEN_CPU_CAPABILITY) has given NaN here (torch 2.14): fall back rather than learn NaN masks.
                if _same_logits(classifier, compiled, images[:2], channels_last, "compiled"):
                    fast = compiled
            fast = _ChannelsLast(fast) if channels_last else fast
            parts = ["folded"] * bool(variant.folded) + ["packed"] * bool(variant.packed or variant.linears)
            parts += ["channels_last"] * channels_last + ["compiled"] * options.compile
            variants["+".join(parts)] = _Variant(fast, variant.folded, variant.packed, variant.linears)
        return variants or plain


def _sharing_tensors(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that shares its parameters and buffers (its own modules, the same weights)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def fastest_variant(variants: Mapping[str, nn.Module], images: Tensor) -> tuple[str, dict[str, float]]:
    """The name of the variant whose forward + backward-to-input on ``images`` is fastest, and each one's seconds.

    Each variant runs one warm-up step (packing happens there), then timed steps in rounds, interleaved over the
    variants so that a busy machine slows them alike: :data:`MEASURED_ROUNDS` rounds, more (up to
    :data:`MAX_MEASURED_ROUNDS`) while they took less than :data:`MEASURED_SECONDS` in all. A variant's time is its
    fastest step, and a tie goes to the earlier variant (``plain`` first). A variant that fails is left out; where
    all fail (e.g. the batch does not fit in memory with gradients), they are timed on half the images, down to one.
    """
    steps = _running(variants, images)
    while not steps and len(images) > 1:
        images = images[: len(images) // 2]
        steps = _running(variants, images)
    if not steps:
        return next(iter(variants)), {}
    seconds = {name: float("inf") for name in steps}
    spent = 0.0
    for round_ in range(MAX_MEASURED_ROUNDS):
        if round_ >= MEASURED_ROUNDS and spent >= MEASURED_SECONDS:
            break
        for name, step in steps.items():
            _synchronize(images.device)
            start = time.perf_counter()
            step()
            _synchronize(images.device)
            elapsed = time.perf_counter() - start
            seconds[name], spent = min(seconds[name], elapsed), spent + elapsed
    return min(seconds, key=seconds.__getitem__), seconds


def _running(variants: Mapping[str, nn.Module], images: Tensor) -> dict[str, Callable[[], None]]:
    """The forward + backward step of each variant that runs on ``images`` (after running it once)."""
    steps = {}
    for name, module in variants.items():
        step = _forward_backward(module, images)
        try:
            step()
        except Exception as error:  # noqa: BLE001 - a variant that cannot run is not chosen
            log.debug("fast path variant %s fails on %d images (%s); left out", name, len(images), error)
            continue
        steps[name] = step
    return steps


def _forward_backward(module: nn.Module, images: Tensor) -> Callable[[], None]:
    def step() -> None:
        inputs = images.detach().requires_grad_(True)
        with torch.enable_grad():
            torch.autograd.grad(module(inputs).float().logsumexp(-1).sum(), inputs)

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        "(fast_path={'fold_batchnorm': False, 'pack_convolutions': False, 'pack_linears': False, 'compile': False} "
        "silences this)",
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
