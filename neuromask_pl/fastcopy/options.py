"""FastPath: the switches of the fast copy of a frozen classifier (none of them changes the maths)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch


@dataclass(frozen=True)
class FastPath:
    """How the frozen classifier is run while masks are learned: a copy with some layers replaced.

    Attributes:
        fold_batchnorm: fold eval-mode BatchNorm layers into the layers beside them.
        channels_last: run the copy in channels_last memory format; None = on CUDA only (slower on the CPU).
        compile: ``torch.compile`` the copy (mode ``reduce-overhead``, i.e. with CUDA graphs, on CUDA).
        pack_convolutions: on the CPU, run the convolutions for which packing pays
            (:func:`~neuromask_pl.fastcopy.packed.packing_pays`) with their weights packed once for oneDNN and no
            weight gradient (:class:`~neuromask_pl.fastcopy.packed.FrozenConv2d`); None = on unless ``compile``.
        pack_linears: the same for ``nn.Linear`` layers with at least
            :data:`~neuromask_pl.fastcopy.packed.MIN_PACKED_LINEAR_WEIGHTS` weights; None = as ``pack_convolutions``.
        batch_invariant: on the CPU, make each image's logits and input gradient the same bit for bit alone or in any
            batch (and so its mask), by the passes of :data:`~neuromask_pl.fastcopy.passes.PASSES` that claim it;
            what they cannot cover is named in the report. None = on unless ``compile``. Independent of the speed
            switches: it packs the convolutions packing pays for even with ``pack_convolutions=False`` (oneDNN's
            packed kernels are the batch-invariant ones).
        auto: time, on the first batch of each image shape, the copies the switches allow (the classifier as it is,
            BatchNorm folded, folded and with layers replaced) and run the fastest. Off by default: the copies
            differ by float rounding, so a choice made by timing would make masks depend on the machine's load.
            Not with ``compile``, which runs as given.

    Replacement layers compute float32 CPU inputs outside autocast only; anything else runs the original layers
    (the report then says so).
    """

    fold_batchnorm: bool = True
    channels_last: bool | None = None
    compile: bool = False
    pack_convolutions: bool | None = None
    pack_linears: bool | None = None
    batch_invariant: bool | None = None
    auto: bool = False

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

    @classmethod
    def off(cls) -> FastPath:
        """No copy: the classifier itself runs (every switch off)."""
        return cls(fold_batchnorm=False, channels_last=False, pack_convolutions=False, pack_linears=False,
                   batch_invariant=False)  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def uses_channels_last(self, device: torch.device) -> bool:
        return self.channels_last if self.channels_last is not None else device.type == "cuda"

    def records_cuda_graphs(self, device: torch.device) -> bool:
        """Whether the compiled copy runs as CUDA graphs (one recording per batch size): compile on CUDA."""
        return self.compile and device.type == "cuda"

    def packs_convolutions(self, device: torch.device) -> bool:
        return self._on_cpu(self.pack_convolutions, device)

    def packs_linears(self, device: torch.device) -> bool:
        return self._on_cpu(self.pack_convolutions if self.pack_linears is None else self.pack_linears, device)

    def invariant(self, device: torch.device) -> bool:
        return self._on_cpu(self.batch_invariant, device)

    def replaces_layers(self, device: torch.device) -> bool:
        """Whether any layer-replacing switch is on for ``device``."""
        return self.packs_convolutions(device) or self.packs_linears(device) or self.invariant(device)

    def _on_cpu(self, switch: bool | None, device: torch.device) -> bool:
        """A layer-replacing switch on ``device``: only on the CPU with oneDNN; None = on unless ``compile``."""
        if device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        return switch if switch is not None else not self.compile

    def measures(self) -> bool:
        """Whether the copy to run is chosen by timing them (``auto``, without ``compile``)."""
        return self.auto and not self.compile
