"""The result of explaining a batch: masks plus everything needed to read them, and the sanity checks that say
when a result only looks like an explanation (:data:`FLAGS`, :func:`sanity_report`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from neuromask_pl.maths.losses import LOSS_TERMS
from neuromask_pl.maths.mask import make_baseline, noise_baseline

# The keys of Explanation.summary(), in order.
SUMMARY_KEYS = (
    *(f"loss_{t}" for t in LOSS_TERMS),
    "mask_area",
    "preservation_rate",
    "prob_original",
    "prob_masked",
    "steps",
)

# ------------------------------------------------------------------------------------------------ sanity checks

EMPTY_AREA = 0.001
"""A mask whose area (mean value) is below this keeps less than 0.1 % of the image: ``empty_mask``."""
FULL_AREA = 0.95
"""A mask whose area is above this keeps more than 95 % of the image: ``full_mask``."""
PROB_RISE = 0.25
"""``prob_masked`` more than this above ``prob_original`` (absolute): ``prob_rise``."""
MOST = 0.5
"""A flag that holds on more than this share of the samples is warned about for the whole run (``prob_rise``)."""
ONE_CLASS_MIN_SAMPLES = 10
"""Fewer samples than this all predicted as one class is no warning (a small folder of one class is common)."""

FLAGS = {
    "baseline_keeps_class": "the baseline alone (every pixel hidden) is classified as the target, so the mask "
    "need not keep anything",
    "empty_mask": f"the mask keeps less than {EMPTY_AREA:.1%} of the image",
    "full_mask": f"the mask keeps more than {FULL_AREA:.0%} of the image",
    "prob_rise": f"the target's probability on the masked image is more than {PROB_RISE} above the original's: "
    "the mask adds evidence instead of selecting it",
}
"""The per-sample sanity flags and what each means, in the order they are listed in a row's ``flags``."""

FLAG_SEPARATOR = ";"
"""Between the flags of one sample in a row's ``flags`` (``"empty_mask;baseline_keeps_class"``)."""


def baseline_check(
    classifier: nn.Module, images: Tensor, logits: Tensor, targets: Tensor, baseline: str, seed: int = 0
) -> dict[str, Tensor]:
    """The classifier on the baseline alone (the image with every pixel hidden: black, the mean colour, the blurred
    copy, or the noise baseline's first draw), for :meth:`Explanation.flags`.

    Call it with the classifier frozen (eval mode), as the explanation's first forward pass was.

    Args:
        classifier: the classifier explained.
        images: the batch, B x C x H x W in [0, 1].
        logits: the classifier's logits on ``images`` (B x K).
        targets: the explained class of each image (B,).
        baseline: the settings' ``baseline``.
        seed: the settings' seed (the noise baseline's draw).

    Returns:
        The Explanation's fields ``predicted`` (the class predicted on each original image), ``prob_baseline``
        (the target's probability on the baseline alone) and ``baseline_preserved`` (whether the baseline alone
        is classified as the target).
    """
    hidden = noise_baseline(images, seed, 0) if baseline == "noise" else make_baseline(images, baseline)
    with torch.no_grad():
        on_baseline = classifier(hidden).float()
    picked = targets[:, None].to(on_baseline.device)
    return {
        "predicted": logits.argmax(-1),
        "prob_baseline": on_baseline.softmax(-1).gather(1, picked)[:, 0],
        "baseline_preserved": on_baseline.argmax(-1) == picked[:, 0],
    }


def sample_flags(
    mask_area: float, prob_original: float, prob_masked: float, baseline_preserved: bool | None
) -> list[str]:
    """The :data:`FLAGS` that hold for one sample (``baseline_preserved`` None: not known, not flagged)."""
    found = {
        "baseline_keeps_class": bool(baseline_preserved),
        "empty_mask": mask_area < EMPTY_AREA,
        "full_mask": mask_area > FULL_AREA,
        "prob_rise": prob_masked > prob_original + PROB_RISE,
    }
    return [name for name in FLAGS if found[name]]


def sanity_warnings(
    samples: int, flag_counts: Mapping[str, int], one_class: int | None = None, class_name: str = ""
) -> list[str]:
    """One line per sanity problem of a run, for people: the counts of the sample flags that need a word, and
    whether every image was predicted as one class.

    Args:
        samples: the samples explained (status ``ok``).
        flag_counts: how many of them carry each flag of :data:`FLAGS`.
        one_class: the class every one of them was predicted as, or None when they were not all one class.
        class_name: that class's name, if known.
    """
    if samples == 0:
        return []
    lines = []
    count = {name: int(flag_counts.get(name, 0)) for name in FLAGS}
    if count["baseline_keeps_class"]:
        lines.append(
            f"{count['baseline_keeps_class']} of {samples} image(s): the baseline alone (every pixel hidden) is "
            "classified as the target, so their masks need not keep anything (flag baseline_keeps_class); try "
            "another baseline (blur, mean, noise) or check the classifier"
        )
    if count["empty_mask"]:
        lines.append(
            f"{count['empty_mask']} of {samples} mask(s) are empty (keep less than {EMPTY_AREA:.1%} of the image; "
            "flag empty_mask): they explain nothing, even where the class is preserved"
        )
    if count["full_mask"]:
        lines.append(
            f"{count['full_mask']} of {samples} mask(s) are full (keep more than {FULL_AREA:.0%} of the image; flag "
            "full_mask): raise l_sparse or the steps"
        )
    if count["prob_rise"] > MOST * samples:
        lines.append(
            f"on {count['prob_rise']} of {samples} image(s) the target's probability on the masked image is more "
            f"than {PROB_RISE} above the original's (flag prob_rise): either the masks keep the class's evidence and "
            "hide what competed with it (common on cluttered photos), or their edges draw evidence of their own; "
            "look at the overlays (a classifier unsure of every image may also have wrong preprocessing)"
        )
    if one_class is not None and samples >= ONE_CLASS_MIN_SAMPLES:
        name = f" ({class_name})" if class_name else ""
        lines.append(
            f"every one of the {samples} images is predicted as class {one_class}{name}: a classifier with random "
            "weights, or images preprocessed differently from its training (normalisation, channels, size), does "
            "that"
        )
    return lines


def sanity_report(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The sanity checks of a whole run from its manifest rows (e.g. ``load_results(dir).rows()``).

    Returns:
        ``samples`` (rows with status ``ok``), ``flags`` (how many carry each flag of :data:`FLAGS`),
        ``predicted_classes`` (how many classes the classifier predicted, None when the rows do not say),
        ``one_class`` (True when every image is predicted as one class, with at least
        :data:`ONE_CLASS_MIN_SAMPLES` images) and ``warnings`` (:func:`sanity_warnings`).
    """
    samples, counts = 0, dict.fromkeys(FLAGS, 0)
    predicted: set[int] = set()
    names: dict[int, str] = {}
    for row in rows:
        if row.get("status", "ok") != "ok":
            continue
        samples += 1
        for flag in str(row.get("flags") or "").split(FLAG_SEPARATOR):
            if flag in counts:
                counts[flag] += 1
        if isinstance(row.get("predicted"), int):
            predicted.add(row["predicted"])
        if row.get("target_name") and isinstance(row.get("target"), int):
            names[row["target"]] = row["target_name"]
    one = next(iter(predicted)) if len(predicted) == 1 else None
    return {
        "samples": samples,
        "flags": counts,
        "predicted_classes": len(predicted) or None,
        "one_class": one is not None and samples >= ONE_CLASS_MIN_SAMPLES,
        "warnings": sanity_warnings(samples, counts, one, names.get(one, "") if one is not None else ""),
    }


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
        predicted: the class the classifier predicts for each original image (B,), or None when not known.
        prob_baseline: the target's probability on the baseline alone (every pixel hidden), (B,), or None.
        baseline_preserved: whether the baseline alone is classified as the target, (B,), or None. Where it is,
            the mask need not keep anything to preserve the class (flag ``baseline_keeps_class``, :meth:`flags`).
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
    predicted: Tensor | None = None
    prob_baseline: Tensor | None = None
    baseline_preserved: Tensor | None = None

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

    def flags(self) -> list[list[str]]:
        """Per sample, the sanity :data:`FLAGS` that hold (none for a failed sample): the baseline alone keeps the
        class, the mask is empty (area below :data:`EMPTY_AREA`) or full (above :data:`FULL_AREA`), ``prob_masked``
        more than :data:`PROB_RISE` above ``prob_original``. A flagged sample is not an explanation to trust, even
        when ``preserved`` is True."""
        ok = self.ok.tolist()
        kept = self.baseline_preserved.tolist() if self.baseline_preserved is not None else [None] * len(self)
        area, before, after = self.mask_area.tolist(), self.prob_original.tolist(), self.prob_masked.tolist()
        return [sample_flags(area[i], before[i], after[i], kept[i]) if ok[i] else [] for i in range(len(self))]

    def records(self, class_names: list[str] | None = None) -> list[dict[str, Any]]:
        """One flat dict per sample (ids, target, prediction, probabilities, area, loss terms, sanity flags)."""
        rows = []
        flags = self.flags()
        for i in range(len(self)):
            target = int(self.targets[i])
            row: dict[str, Any] = {
                "sample_id": int(self.ids[i]),
                "path": self.paths[i] if self.paths else "",
                "target": target,
                "target_name": class_names[target] if class_names and target < len(class_names) else "",
                "predicted": int(self.predicted[i]) if self.predicted is not None else None,
                "prob_original": float(self.prob_original[i]),
                "prob_masked": float(self.prob_masked[i]),
                "prob_baseline": float(self.prob_baseline[i]) if self.prob_baseline is not None else None,
                "preserved": bool(self.preserved[i]),
                "mask_area": float(self.mask_area[i]),
                "steps": int(self.steps[i]),
                "status": "failed" if self.errors and self.errors[i] else "ok",
                "flags": FLAG_SEPARATOR.join(flags[i]),
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

    def flag_counts(self) -> dict[str, int]:
        """How many samples carry each of the sanity :data:`FLAGS` (every flag, zeros included)."""
        counts = dict.fromkeys(FLAGS, 0)
        for flags in self.flags():
            for flag in flags:
                counts[flag] += 1
        return counts

    def sanity(self, class_names: list[str] | None = None) -> dict[str, Any]:
        """The sanity checks of this batch as of a whole run (:func:`sanity_report` of :meth:`records`)."""
        return sanity_report(self.records(class_names))
