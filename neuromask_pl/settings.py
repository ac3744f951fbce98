"""MaskSettings, the one home of every setting of the mask optimisation, and its named presets."""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

import numpy as np

OPTIMIZERS = ("rmsprop_tf", "adam")
BASELINES = ("black", "mean", "blur", "noise")
SPARSITY_TARGETS = ("weights", "mask", "area")


@dataclass(frozen=True)
class MaskSettings:
    """Everything that defines the mask optimisation for one image.

    Attributes:
        steps: optimisation steps per image.
        l_pred: weight of the cross-entropy that keeps the target class.
        l_sparse: weight of the sparsity penalty.
        l_smooth: weight of the Laplacian smoothness penalty.
        temperature: mask ``m = sigmoid(w / temperature)``.
        weight_limit: ``W``; weights start uniform in (-W, W) and the paper's
            sparsity penalty is ``mean|w + W|``.
        laplacian: 3 or 5 (kernel size), or 0 for automatic (5 when both sides
            are at least 64 pixels, else 3), as in the reference code.
        laplacian_padding: ``"none"`` (reference: border pixels are never a window's centre)
            or ``"replicate"`` (border pixels are smoothed too).
        smooth_penalty: ``"laplacian"`` (reference: mean squared Laplacian) or ``"tv"``
            (total variation: mean absolute difference of neighbouring pixels).
        smooth_on: ``"weights"`` (reference) or ``"mask"`` (``sigmoid(w / T)``, at the mask's resolution).
        jitter: during optimisation, shift the masked image by up to this many pixels each step
            (the same shift for every image of a step, drawn from ``(seed, step)``); 0 = off.
        sparsity_on: ``"weights"`` (reference: ``mean|w + W|``), ``"mask"`` (``mean m``) or
            ``"area"``: the sorted mask values should match a binary mask that keeps
            ``area_target`` of the pixels (as TorchRay's extremal perturbations).
        area_target: share of pixels to keep with ``sparsity_on="area"``.
        baseline: what hidden pixels become: ``"black"`` (reference), ``"mean"``
            (each image's mean colour), ``"blur"`` (a strongly blurred copy) or ``"noise"`` (uniform noise over each
            image's value range, a new draw every step, from ``(seed, step)`` only: no faint residue of a hidden
            pixel can steer the classifier, so masks stay binary and reproducible under a contractive schedule;
            docs/results/STABILITY.md).
        optimizer: ``"rmsprop_tf"`` (TensorFlow 1 RMSProp, as the reference) or ``"adam"``.
        lr: learning rate.
        mask_scale: the mask is learned at 1/mask_scale of the image's resolution and
            upsampled bilinearly (1 = full resolution, as the reference).
        mask_size: if > 0, overrides ``mask_scale``: the scale is chosen so that the mask's
            shorter side is about ``mask_size`` pixels, whatever the image size.
        stop_patience: per-sample early stopping: an image stops (its mask is kept as it is and it
            leaves the batch's forward passes) once its total loss has not improved by more than
            ``stop_tolerance`` (relative) for this many steps; 0 = off, every image runs ``steps``.
        stop_tolerance: the relative improvement that counts for ``stop_patience``.
        temperature_start: if > 0, the temperature is annealed geometrically from
            ``temperature_start`` (first step) to ``temperature`` (last step); 0 = a fixed temperature.
        tie_break: weight ``d`` in [0, 0.5) of a tie-breaking term in the returned map:
            ``(1 - d) * mask + d * path_mean``, where ``path_mean`` is the (image-resolution) mask averaged
            over all optimisation steps. A near-binary mask saturates to exactly 0 or 1 in float32, so
            ranking metrics (deletion, insertion) would order its many tied pixels by raster position;
            with ``d > 0`` they are ordered by how long each pixel stayed in the shrinking mask instead
            (as variables leave a lasso path). A saturated pixel stays on its side of 0.5, so the mask
            thresholded at 0.5 is unchanged; a small ``d`` (1e-3) leaves every value within ``d`` of the
            mask. 0 = return the mask itself (reference).
        mask_coarse: if > 0, a two-scale mask: a coarse grid whose shorter side has about this many cells
            (starting at zero) is upsampled and added to the weights before the sigmoid; 0 = one grid.
        l_detail: weight of ``mean|w_fine|``, the detail the fine grid adds to the coarse one (needs
            ``mask_coarse``), so detail appears only where the coarse grid cannot draw it.
        l_delete: weight of the deletion game, ``-log(1 - p_target)`` of the image with the mask's region
            hidden: the mask must also hold what the class needs (as TorchRay's "dual" extremal
            perturbation). It runs the classifier on twice the images; 0 = off (reference).
        upsample_weights: upsample the weights, not the mask, to the image before the sigmoid (a binary
            mask at every pixel, with smooth contours, at a low temperature).
        lr_end: if > 0, the learning rate is annealed geometrically from ``lr`` (first step) to ``lr_end``
            (last step), as the temperature with ``temperature_start``; 0 = a fixed learning rate. With the
            temperature annealed and ``lr_end / lr`` about ``temperature / temperature_start``, a step moves the
            mask's logits ``w / T`` by about the same amount all along, instead of 200 times more at the end,
            where float rounding would then decide which pixels flip.
        lr_hold: with ``lr_end > 0``, the share of the steps (in [0, 1)) run at ``lr`` before the annealing
            starts: the mask forms at the full rate, then settles.
        sample_temperature: if > 0, during optimisation the classifier sees a random draw of the mask instead of
            the mask itself: ``sigmoid((w / T + noise) / sample_temperature)`` with logistic noise at the weights'
            grid (binary concrete), a new draw every step from ``(seed, step)`` only. A kept cell must be kept for
            sure (a faint, adversarial mask cannot hold the class) and every run of an image is driven by the same
            draws, which makes the default's runs agree alone or in any batch, on any path and CPU
            (docs/results/STABILITY.md). The returned mask is ``sigmoid(w / T)``; 0 = the mask itself (reference).
    """

    steps: int = 1000
    l_pred: float = 0.4
    l_sparse: float = 0.35
    l_smooth: float = 0.03
    temperature: float = 0.3
    weight_limit: float = 10.0
    laplacian: int = 0
    laplacian_padding: str = "none"
    smooth_penalty: str = "laplacian"
    smooth_on: str = "weights"
    jitter: int = 0
    sparsity_on: str = "weights"
    area_target: float = 0.1
    baseline: str = "black"
    optimizer: str = "rmsprop_tf"
    lr: float = 0.03
    mask_scale: int = 1
    mask_size: int = 0
    stop_patience: int = 0
    stop_tolerance: float = 1e-3
    temperature_start: float = 0.0
    tie_break: float = 0.0
    mask_coarse: int = 0
    l_detail: float = 0.0
    l_delete: float = 0.0
    upsample_weights: bool = False
    lr_end: float = 0.0
    lr_hold: float = 0.0
    sample_temperature: float = 0.0

    def __post_init__(self) -> None:
        self._check_types()
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.weight_limit > 0, f"weight_limit must be > 0, got {self.weight_limit}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 < self.area_target <= 1, f"area_target must be in (0, 1], got {self.area_target}"),
            (self.mask_scale >= 1, f"mask_scale must be >= 1, got {self.mask_scale}"),
            (self.mask_size >= 0, f"mask_size must be >= 0 (0 = use mask_scale), got {self.mask_size}"),
            (self.stop_patience >= 0, f"stop_patience must be >= 0 steps (0 = off), got {self.stop_patience}"),
            (self.stop_tolerance >= 0, f"stop_tolerance must be >= 0, got {self.stop_tolerance}"),
            (
                self.temperature_start >= 0,
                f"temperature_start must be >= 0 (0 = fixed temperature), got {self.temperature_start}",
            ),
            (0 <= self.tie_break < 0.5, f"tie_break must be in [0, 0.5), got {self.tie_break}"),
            (self.mask_coarse >= 0, f"mask_coarse must be >= 0 cells (0 = one grid), got {self.mask_coarse}"),
            (self.l_detail >= 0, f"l_detail must be >= 0, got {self.l_detail}"),
            (self.l_delete >= 0, f"l_delete must be >= 0 (0 = off), got {self.l_delete}"),
            (self.lr_end >= 0, f"lr_end must be >= 0 (0 = fixed learning rate), got {self.lr_end}"),
            (0 <= self.lr_hold < 1, f"lr_hold must be in [0, 1) (a share of the steps), got {self.lr_hold}"),
            (
                self.sample_temperature >= 0,
                f"sample_temperature must be >= 0 (0 = no sampling), got {self.sample_temperature}",
            ),
            (
                self.l_detail == 0 or self.mask_coarse > 0,
                f"l_detail={self.l_detail} penalises the fine grid of a two-scale mask: set mask_coarse > 0 too",
            ),
            (
                min(self.l_pred, self.l_sparse, self.l_smooth) >= 0,
                "loss weights l_pred, l_sparse, l_smooth must be >= 0",
            ),
            (self.laplacian in (0, 3, 5), f"laplacian must be 3, 5 or 0 (automatic), got {self.laplacian}"),
            (
                self.laplacian_padding in ("none", "replicate"),
                f"laplacian_padding must be 'none' or 'replicate', got {self.laplacian_padding!r}",
            ),
            (
                self.smooth_penalty in ("laplacian", "tv"),
                f"smooth_penalty must be 'laplacian' or 'tv', got {self.smooth_penalty!r}",
            ),
            (self.smooth_on in ("weights", "mask"), f"smooth_on must be 'weights' or 'mask', got {self.smooth_on!r}"),
            (self.jitter >= 0, f"jitter must be >= 0 pixels, got {self.jitter}"),
            (
                self.sparsity_on in SPARSITY_TARGETS,
                f"sparsity_on must be one of {SPARSITY_TARGETS}, got {self.sparsity_on!r}",
            ),
            (self.baseline in BASELINES, f"baseline must be one of {BASELINES}, got {self.baseline!r}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _check_types(self) -> None:
        """Each field of its declared type: integers integral (not bool, not 2.5), numbers finite, flags bool.
        Integers given for float fields become floats."""
        for f, kind in zip(fields(self), _field_types(type(self))):
            value = getattr(self, f.name)
            if kind is bool:
                ok = isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                if ok:
                    object.__setattr__(self, f.name, int(value))
            elif kind is float:
                ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
                if ok and not math.isfinite(value):
                    raise ValueError(f"{f.name} must be a finite number, got {value}")
                if ok:
                    object.__setattr__(self, f.name, float(value))
            else:
                ok = isinstance(value, kind)
            if not ok:
                raise TypeError(f"{f.name} must be {kind.__name__}, got {type(value).__name__} {value!r}")

    def scale_for(self, height: int, width: int) -> int:
        """The down-scaling factor of the mask for an image of ``height`` x ``width``."""
        return _scale_for_cells(height, width, self.mask_size) if self.mask_size else self.mask_scale

    def coarse_scale_for(self, height: int, width: int) -> int:
        """The down-scaling factor of the coarse grid of a two-scale mask (``mask_coarse > 0``)."""
        return _scale_for_cells(height, width, self.mask_coarse) if self.mask_coarse else 1

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the settings (for run records and logs)."""
        return asdict(self)


@functools.cache
def _field_types(cls: type) -> tuple[type, ...]:
    """The declared type of each field of a dataclass, in field order (resolved once: a step's settings are
    made every step, and resolving the annotations is most of what that costs)."""
    return tuple(typing.get_type_hints(cls).values())


# The default preset (see its comment in PRESETS); the presets built on it change only what they name.
_DEFAULT = MaskSettings(
    steps=300,
    l_pred=1.0,
    l_sparse=1.5,
    l_smooth=1.0,
    temperature=0.01,
    temperature_start=2.0,
    weight_limit=0.01,
    laplacian=3,
    laplacian_padding="replicate",
    smooth_penalty="tv",
    smooth_on="mask",
    sparsity_on="mask",
    baseline="black",
    optimizer="adam",
    lr=0.1,
    mask_size=32,
    tie_break=0.001,
    mask_coarse=16,
    l_detail=10.0,
    upsample_weights=True,
    sample_temperature=1.0,
)


PRESETS: dict[str, MaskSettings] = {
    # The reference implementation with the paper's ImageNet / Inception-v3 settings.
    "paper": MaskSettings(),
    # The paper's CIFAR-10 settings: 3x3 Laplacian, T = 1, 2000 iterations.
    "paper_cifar": MaskSettings(steps=2000, l_smooth=0.15, temperature=1.0, laplacian=3),
    # The default, chosen on the localisation benchmark and the demo photos (docs/results/SUMMARY.md, STABILITY.md):
    # a sharp, adaptive-area mask at about 32 x 32 cells with the temperature annealed from 2 (a soft mask that can
    # still move) to 0.01 (nearly binary, so what the classifier sees is what a 0.5 threshold keeps), total
    # variation of the mask, ties broken by the optimisation path, a two-scale mask (a 16-cell grid plus the
    # 32-cell one, whose detail costs l_detail: regions rather than dots on photos), the weights, not the mask,
    # upsampled (a binary mask with smooth contours at every pixel), and the classifier shown a draw of the mask
    # each step (sample_temperature: no faint adversarial mask, and the same masks alone or in any batch, on any
    # path and CPU). Former presets live on as settings in docs/results/SUMMARY.md.
    "default": _DEFAULT,
    # For a dataset-level analysis of strategies (SpRAy over a job's masks, neuromask_pl.analysis): the default with
    # the deletion game (l_delete=10). A preservation mask keeps the least that suffices, so of an image with two
    # sufficient regions (a shortcut cue beside the object) it shows one, and which one varies from image to image;
    # with the deletion game the image without the mask's region must lose the class too, so the mask holds both and
    # the cue images of a class form a cluster of their own. On the planted shortcuts
    # (docs/results/planted_objectives.md) the analysis finds both cues (F1 1.00, ranked first and second, no class
    # without a cue flagged), the default misses the frame (F1 0.47); through PNG files and a store the
    # same (docs/presets.md). What it costs: the classifier runs on twice
    # the images each step (1.6-2.9x the default's time there), masks about 1.7x larger, less on the object.
    "analysis": dataclasses.replace(_DEFAULT, l_delete=10.0),
}


SettingsOverrides = dataclasses.make_dataclass(
    "SettingsOverrides",
    [
        (f.name, Optional[hint], dataclasses.field(default=None))  # noqa: UP045 (a runtime type for jsonargparse)
        for f, hint in zip(fields(MaskSettings), _field_types(MaskSettings))
    ],
    frozen=True,
)
SettingsOverrides.__module__ = __name__
SettingsOverrides.__doc__ = """Fields of :class:`MaskSettings` that override a preset; None keeps the preset's value.

Built from MaskSettings, so every setting has one home; configs and the CLI type each field through it
(``--model.settings.lr 0.1``).
"""


def overrides_of(settings: Mapping[str, Any] | SettingsOverrides | None) -> dict[str, Any]:
    """The fields set in ``settings`` (a mapping of MaskSettings fields or a SettingsOverrides), None dropped."""
    if settings is None:
        return {}
    if isinstance(settings, SettingsOverrides):
        settings = asdict(settings)
    if not isinstance(settings, Mapping):
        raise TypeError(
            f"settings must be a dict of MaskSettings fields, a SettingsOverrides or a MaskSettings, "
            f"got {type(settings).__name__}"
        )
    known = {f.name for f in fields(MaskSettings)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown mask settings {unknown}; known: {sorted(known)}")
    return {k: v for k, v in settings.items() if v is not None}


def resolve_settings(
    preset: str | None = "default",
    steps: int | None = None,
    settings: Mapping[str, Any] | SettingsOverrides | MaskSettings | None = None,
) -> MaskSettings:
    """The settings that run: ``preset`` with the fields of ``settings``, then ``steps`` (when not None), replaced.

    A complete :class:`MaskSettings` as ``settings`` is used as it is, in place of the preset; ``preset`` None
    starts from :class:`MaskSettings`' own defaults (for settings recorded complete, see :func:`recorded_preset`).
    """
    if isinstance(settings, MaskSettings):
        base, overrides = settings, {}
    elif preset is None:
        base, overrides = MaskSettings(), overrides_of(settings)
    else:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        base, overrides = PRESETS[preset], overrides_of(settings)
    if steps is not None:
        overrides["steps"] = steps
    return replace(base, **overrides)


def recorded_preset(
    preset: str | None, settings: Mapping[str, Any] | SettingsOverrides | MaskSettings | None, resolved: MaskSettings
) -> str | None:
    """The preset name a record of ``resolved`` may carry: ``preset`` when the settings are that preset with
    overrides, else (a complete ``MaskSettings`` given) the name of a preset equal to it, or None."""
    if not isinstance(settings, MaskSettings) and preset is not None:
        return preset
    return next((name for name, values in PRESETS.items() if values == resolved), None)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings (a script's ``--set``) as MaskSettings fields, each value of its field's type."""
    hints = dict(zip((f.name for f in fields(MaskSettings)), _field_types(MaskSettings)))
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"expected key=value with a MaskSettings field as key (e.g. l_smooth=0.5), got {item!r}")
        kind = hints[key]
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{key} takes true or false, got {text!r}")
            parsed[key] = text.lower() in ("true", "1")
        else:
            parsed[key] = kind(text)
    return overrides_of(parsed)


def _scale_for_cells(height: int, width: int, cells: int) -> int:
    """The down-scaling factor that leaves about ``cells`` cells along the image's shorter side."""
    return max(1, round(min(height, width) / cells))
