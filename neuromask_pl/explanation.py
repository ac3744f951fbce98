"""The result of explaining a batch: masks plus everything needed to read them."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from neuromask_pl.maths.losses import LOSS_TERMS

# The keys of Explanation.summary(), in order.
SUMMARY_KEYS = (
    *(f"loss_{t}" for t in LOSS_TERMS),
    "mask_area",
    "preservation_rate",
    "prob_original",
    "prob_masked",
    "steps",
)


@dataclass
class Explanation:
    """Masks and per-sample statistics for one batch of images.

    Every tensor has the batch as its first dimension, in the order of ``ids``.

    Attributes:
        ids: sample ids, shape (B,).
        masks: learned masks in [0, 1], shape (B, 1, H, W); 1 keeps a pixel, 0 hides it.
        targets: explained class per sample, shape (B,).
        prob_original: target-class probability on the original image, shape (B,).
        prob_masked: target-class probability on the soft-masked image, shape (B,).
        loss: final loss terms ``pred``, ``sparse``, ``smooth``, ``detail``, ``delete`` (unweighted) and
            ``total`` (weighted sum), each (B,).
        mask_area: mean mask value per sample, shape (B,).
        preserved: whether the masked image is still classified as the target, shape (B,).
        steps: optimisation steps each mask got (fewer than the setting when it stopped early), shape (B,).
        images: the original images in [0, 1], shape (B, C, H, W), or None.
        paths: source file of each sample, or None for in-memory data.
        skipped: samples of the batch that could not be read: dicts with
            ``index``, ``path`` and ``error``.
        errors: per sample, why its optimisation failed ("" when it did not), or None when none failed.
            A failed sample's mask is not finite; summaries leave it out.
    """

    ids: Tensor
    masks: Tensor
    targets: Tensor
    prob_original: Tensor
    prob_masked: Tensor
    loss: dict[str, Tensor]
    mask_area: Tensor
    preserved: Tensor
    steps: Tensor
    images: Tensor | None = None
    paths: list[str] | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] | None = None

    @classmethod
    def empty(cls, images: Tensor) -> Explanation:
        """An Explanation with zero samples (a batch whose every file was unreadable)."""
        empty = torch.empty(0)
        return cls(
            ids=empty.long(),
            masks=torch.empty(0, 1, *images.shape[-2:]),
            targets=empty.long(),
            prob_original=empty,
            prob_masked=empty,
            loss={k: empty for k in LOSS_TERMS},
            mask_area=empty,
            preserved=empty.bool(),
            steps=empty.long(),
            images=images,
        )

    @property
    def ok(self) -> Tensor:
        """Which samples did not fail (bool, (B,), on the CPU)."""
        if self.errors:
            return torch.tensor([not error for error in self.errors])
        return torch.ones(len(self), dtype=torch.bool)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device | str) -> Explanation:
        """Return a copy with every tensor moved to ``device`` (and detached)."""
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.detach().to(device)
            elif f.name == "loss":
                changes[f.name] = {k: v.detach().to(device) for k, v in value.items()}
        return replace(self, **changes)

    def cpu(self) -> Explanation:
        """Return a copy with every tensor on the CPU."""
        return self.to("cpu")

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of tensors, lists and dicts (for logging, pickling or ``torch.save``)."""
        return asdict(self.cpu())

    def save(self, path: str | os.PathLike) -> None:
        """Save to a file that :meth:`load` reads back (``torch.save`` of :meth:`as_dict`)."""
        torch.save(self.as_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Explanation:
        """Read an Explanation written by :meth:`save` (loaded with ``weights_only=True``)."""
        data = torch.load(path, map_location="cpu", weights_only=True)
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not {"ids", "masks"} <= set(data) or set(data) - known:
            raise ValueError(f"{path} does not hold a saved Explanation (expected keys {sorted(known)})")
        return cls(**data)

    def records(self, class_names: list[str] | None = None) -> list[dict[str, Any]]:
        """One flat dict per sample (ids, target, probabilities, area, loss terms)."""
        rows = []
        for i in range(len(self)):
            target = int(self.targets[i])
            row: dict[str, Any] = {
                "sample_id": int(self.ids[i]),
                "path": self.paths[i] if self.paths else "",
                "target": target,
                "target_name": class_names[target] if class_names and target < len(class_names) else "",
                "prob_original": float(self.prob_original[i]),
                "prob_masked": float(self.prob_masked[i]),
                "preserved": bool(self.preserved[i]),
                "mask_area": float(self.mask_area[i]),
                "steps": int(self.steps[i]),
                "status": "failed" if self.errors and self.errors[i] else "ok",
                "error": self.errors[i] if self.errors else "",
            }
            for term in LOSS_TERMS:
                row[f"loss_{term}"] = float(self.loss[term][i])
            rows.append(row)
        return rows

    def summary(self) -> dict[str, float]:
        """Batch means of the loss terms, mask area, preservation rate, probabilities and steps run (over the
        samples that did not fail)."""
        ok = self.ok
        if not ok.any():
            return {}
        values = [*(self.loss[t] for t in LOSS_TERMS), self.mask_area, self.preserved, self.prob_original,
                  self.prob_masked, self.steps]  # fmt: skip
        return {key: float(v[ok.to(v.device)].float().mean()) for key, v in zip(SUMMARY_KEYS, values)}
