"""The fast copy of a frozen classifier: BatchNorm folded, layers replaced by the passes, optionally compiled.

A mask step is one forward and one backward-to-input of a classifier whose weights never change. That allows what a
training step cannot use: an eval-mode BatchNorm folds into the layer beside it (:mod:`.folding`), and a frozen CPU
layer can keep its weights packed for oneDNN, skip its weight gradient and give each image the same result in any
batch (:mod:`.passes`). :class:`FastCopies` builds the copy the switches of :class:`~.options.FastPath` ask for, checks
its logits against the classifier's, keeps it while the classifier's weights stay the same, and reports what ran.
The user's model is never changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from neuromask_pl.fastcopy.autotune import fastest_variant
from neuromask_pl.fastcopy.folding import fold_batchnorm, is_batchnorm
from neuromask_pl.fastcopy.options import FastPath
from neuromask_pl.fastcopy.packed import FrozenLinear
from neuromask_pl.fastcopy.passes import INVARIANCE_ONLY, PASSES, PassRecord, apply_passes
from neuromask_pl.fastcopy.surgery import structural_copy, takes_replacement

log = logging.getLogger(__name__)

ORIGINAL = "original"  # the variant that is the classifier itself
#: Images of the first batch on which a batch-invariant copy is checked: the first alone and the first two as a pair
#: against them among these.
CHECKED_IMAGES = 5
#: The report's name for what the check found where no pass named a cause.
MOVED = "an image's logits or input gradient moved with its batch (measured; cause not named)"
SCALAR_KERNELS = "CPU kernels without AVX2 (batch invariance is built for AVX2 and AVX-512 kernels)"


@dataclass(frozen=True)
class _Copy:
    """One way to run the classifier: the module, how many BatchNorms are folded, and what the passes replaced."""

    module: nn.Module
    folded: int = 0
    passes: PassRecord = field(default_factory=PassRecord)
    invariant: bool = False  # whether it claims batch invariance (the switch on, every pass applied claims it)

    @property
    def replaced(self) -> bool:
        return bool(self.passes.layers or self.passes.functional)


def _close(fast: Tensor, reference: Tensor) -> bool:
    fast, reference = fast.float(), reference.float()
    scale = reference.abs().max().clamp_min(1.0)
    # 1e-2: room for TF32 convolutions on GPUs; a wrongly folded layer is off by far more.
    return fast.shape == reference.shape and bool(((fast - reference).abs().max() <= 1e-2 * scale).item())


class FastCopies:
    """Builds and caches the fast copies of a frozen classifier, chooses which one runs, and reports what ran.

    The copies are keyed by the classifier's identity, device and the in-place version counters of its parameters and
    buffers, so a classifier that was trained further (e.g. between the epochs of
    :class:`~neuromask_pl.callbacks.ExplainDuringTraining`) gets fresh copies. With ``FastPath.auto``, the choice is
    measured once per model architecture, image shape (without the batch size), dtype, autocast dtype, device and
    thread count, and kept (also through pickling and deep copies).
    """

    def __init__(self, options: FastPath) -> None:
        self.options = options
        self._key: tuple | None = None
        self._copies: dict[str, _Copy] = {}
        self._choices: dict[tuple, str] = {}  # input key -> copy name
        self._timings: dict[tuple, dict[str, float]] = {}  # input key -> seconds per forward + backward
        self._last: tuple[str, _Copy, tuple | None, bool] = (ORIGINAL, _Copy(nn.Identity()), None, False)
        self._totals = (0, 0, 0)  # BatchNorm layers, 2-D convolutions and Linear layers of the classifier

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (and deepcopy) the options and choices only: the copies are rebuilt where they are needed."""
        return {**self.__dict__, "_key": None, "_copies": {}, "_last": (ORIGINAL, _Copy(nn.Identity()), None, False)}

    @staticmethod
    def _state_key(classifier: nn.Module, device: torch.device) -> tuple:
        tensors = [*classifier.parameters(), *classifier.buffers()]
        return (id(classifier), str(device), tuple((t.data_ptr(), t._version) for t in tensors))

    @staticmethod
    def _input_key(classifier: nn.Module, images: Tensor) -> tuple:
        """What the speed of a copy depends on: the model, the images but their number, the arithmetic, where."""
        device = images.device
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        cpu = torch.backends.cpu.get_cpu_capability()
        machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
        model = (type(classifier).__qualname__, sum(p.numel() for p in classifier.parameters()))
        return (model, tuple(images.shape[1:]), images.dtype, autocast, str(device), machine, torch.get_num_threads())

    def get(self, classifier: nn.Module, images: Tensor) -> nn.Module:
        """The module to run in the mask steps: a fast copy, or ``classifier`` itself when no switch applies or
        (``auto``) when it measured fastest.

        ``classifier`` must already be frozen (eval mode, no parameter gradients); ``images`` is a batch used to
        check the copies against the original and, with ``auto``, to time them (on detached images, changing no
        state).
        """
        options, device = self.options, images.device
        channels_last = options.uses_channels_last(device) and images.ndim == 4
        replaces = options.replaces_layers(device)
        if not (options.fold_batchnorm or channels_last or options.compile or replaces):
            return self._use(ORIGINAL, _Copy(classifier), None, images)
        key = self._state_key(classifier, device)
        if key != self._key:
            self._copies, self._key = self._build(classifier, images, channels_last), key
            self._totals = (
                sum(is_batchnorm(m) for m in classifier.modules()),
                sum(isinstance(m, nn.Conv2d) for m in classifier.modules()),
                sum(isinstance(m, nn.Linear) for m in classifier.modules()),
            )
        usable = self._usable(images)
        if len(usable) == 1:
            return self._use(usable[0], self._copies[usable[0]], None, images)
        input_key = self._input_key(classifier, images)
        if input_key not in self._choices or self._choices[input_key] not in usable:
            candidates = {name: self._copies[name].module for name in usable}
            self._choices[input_key], seconds = fastest_variant(candidates, images)
            self._timings[input_key] = seconds
            log.info(
                "fast path for %s: %s (forward + backward ms: %s)", type(classifier).__name__,
                self._choices[input_key], ", ".join(f"{k} {1e3 * v:.2f}" for k, v in seconds.items()),
            )  # fmt: skip
        name = self._choices[input_key]
        return self._use(name, self._copies[name], input_key, images)

    def _usable(self, images: Tensor) -> list[str]:
        """The copies worth timing for these images: replaced layers only compute float32 outside autocast."""
        if len(self._copies) == 1 or takes_replacement(images):
            return list(self._copies)
        return [name for name, c in self._copies.items() if not c.replaced] or list(self._copies)

    def _use(self, name: str, chosen: _Copy, input_key: tuple | None, images: Tensor) -> nn.Module:
        self._last = (name, chosen, input_key, takes_replacement(images))
        return chosen.module

    def report(self) -> dict[str, Any]:
        """What the last :meth:`get` ran, for logs and run records.

        ``variant`` (``original``, ``folded``, ``folded+packed``, ``folded+invariant``, ...), BatchNorms folded of all,
        convolutions and Linear layers packed of all, ``passes`` (how many layers each pass replaced) and
        ``replaced_layers`` (their qualified names), ``functional`` (inline
        calls rewritten), ``replaced_layers_ran`` (False where the images were not float32 on the CPU outside
        autocast: the original layers ran, and the counts of replaced layers are 0), ``batch_invariant`` (whether an
        image's result is the same in any batch: the switch on, the replaced layers ran and no call was left
        uncovered), ``not_covered`` (the calls no pass covers), and with ``auto`` the measured forward + backward
        milliseconds of each copy."""
        name, chosen, input_key, ran = self._last
        passes = chosen.passes if ran else PassRecord()
        if not ran:  # the replaced layers fell back to the original ones
            name = "+".join(part for part in name.split("+") if part not in ("packed", "invariant")) or ORIGINAL
        return {
            "variant": name,
            "folded_batchnorm": chosen.folded,
            "batchnorm_layers": self._totals[0],
            "packed_convolutions": passes.count("packed_convolution"),
            "convolutions": self._totals[1],
            "packed_linears": sum(isinstance(m, FrozenLinear) and m.packed for m in chosen.module.modules()) * ran,
            "linears": self._totals[2],
            "passes": passes.as_dict()["layers"],
            "replaced_layers": {name: list(layers) for name, layers in passes.layers.items()},
            "functional": passes.as_dict()["functional"],
            "replaced_layers_ran": ran and chosen.replaced,
            "batch_invariant": ran and chosen.invariant and not chosen.passes.uncovered,
            "not_covered": dict(chosen.passes.uncovered),
            "measured": input_key is not None,
            "forward_backward_ms": {k: 1e3 * v for k, v in self._timings.get(input_key, {}).items()},
        }

    def _build(self, classifier: nn.Module, images: Tensor, channels_last: bool) -> dict[str, _Copy]:
        """The copies to choose from, in order: the original (with ``auto``), folded, folded with layers replaced;
        without ``auto`` only the last. A copy that changes the classifier's logits beyond rounding is left out."""
        options, device = self.options, images.device
        original = {ORIGINAL: _Copy(classifier)}
        switches = frozenset(
            name
            for name, on in (
                ("pack_convolutions", options.packs_convolutions(device)),
                ("pack_linears", options.packs_linears(device)),
                ("batch_invariant", options.invariant(device)),
            )
            if on
        )
        try:
            module, folded = fold_batchnorm(classifier, images[:2]) if options.fold_batchnorm else (classifier, 0)
            if module is classifier and (switches or channels_last):
                module = structural_copy(classifier)
        except Exception as error:  # noqa: BLE001 - e.g. a module holding tensors that cannot be deep-copied
            log.warning(
                "the classifier cannot be copied for the fast path (%s); using it as it is "
                "(fast_path=FastPath.off() silences this)",
                error,
            )
            return original
        candidates: list[_Copy] = []
        if options.measures() and (folded or channels_last):
            candidates.append(_Copy(module, folded))
        if switches:
            replaced = structural_copy(module) if options.measures() else module
            replaced, passes = apply_passes(replaced, images[:2], switches)
            if passes.layers or passes.functional or not options.measures():
                claimed = {p.name for p in PASSES if p.batch_invariant}
                invariant = "batch_invariant" in switches and set(passes.layers) <= claimed
                candidates.append(_Copy(replaced, folded, passes, invariant))
        elif not options.measures():
            candidates.append(_Copy(module, folded))
        copies = dict(original) if options.measures() else {}
        for candidate in candidates:
            if not (candidate.folded or candidate.replaced or channels_last or options.compile):
                continue  # nothing changed: the classifier itself runs
            if channels_last:
                candidate.module.to(memory_format=torch.channels_last)
            if not _same_logits(classifier, candidate.module, images[:2], channels_last):
                continue
            fast = candidate.module
            if options.compile:
                graphs = options.records_cuda_graphs(device)
                compiled = torch.compile(fast, mode="reduce-overhead" if graphs else "default")
                # Checked too: a compiled kernel is cached on disk, and one cached under other CPU kernels
                # (ATEN_CPU_CAPABILITY) has given NaN here (torch 2.14): fall back rather than learn NaN masks.
                if _same_logits(classifier, compiled, images[:2], channels_last, "compiled"):
                    fast = compiled
            fast = _ChannelsLast(fast) if channels_last else fast
            name = _variant_name(candidate, channels_last, options.compile)
            invariant = candidate.invariant
            if invariant and not vector_kernels():
                candidate.passes.uncovered[SCALAR_KERNELS] = 1
            if invariant and not candidate.passes.uncovered and not options.compile:
                invariant = _same_alone_and_in_a_batch(fast, images[:CHECKED_IMAGES])
                if not invariant:
                    candidate.passes.uncovered[MOVED] = 1
            copies[name] = _Copy(fast, candidate.folded, candidate.passes, invariant)
        return copies or original


def _variant_name(candidate: _Copy, channels_last: bool, compiled: bool) -> str:
    """``folded``, ``packed`` (a pass that speeds layers up replaced some), ``invariant`` (only batch-invariance
    passes did), ``channels_last``, ``compiled``, joined by ``+``."""
    layers = set(candidate.passes.layers)
    parts = ["folded"] * bool(candidate.folded)
    if layers - INVARIANCE_ONLY:
        parts.append("packed")
    elif layers or candidate.passes.functional:
        parts.append("invariant")
    parts += ["channels_last"] * channels_last + ["compiled"] * compiled
    return "+".join(parts) or ORIGINAL


def vector_kernels() -> bool:
    """Whether ATen runs AVX2 or AVX-512 kernels: batch invariance is built and measured for those (with SSE4.1
    kernels, matrix products also round by where their rows lie in memory)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX")


def _same_alone_and_in_a_batch(module: nn.Module, images: Tensor) -> bool:
    """Whether the logits and input gradient of the first images are the same bit for bit alone, as a pair and among
    all of ``images`` (True where there is only one image, or where the images do not take the replaced layers)."""
    if len(images) < 2 or not takes_replacement(images):
        return True

    def run(batch: Tensor) -> tuple[Tensor, Tensor]:
        batch = batch.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = module(batch)
            (grad,) = torch.autograd.grad(logits, batch, torch.ones_like(logits))
        return logits.detach(), grad

    try:
        together = run(images)
        parts = [(run(images[:count]), count) for count in (1, 2) if count < len(images)]
    except Exception:  # noqa: BLE001 - a copy that fails here was already checked to run; claim nothing
        return False
    return all(torch.equal(part[k], together[k][:count]) for part, count in parts for k in (0, 1))


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
        "(fast_path=FastPath.off() silences this)",
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
