"""neuromask_pl.settings: MaskSettings and its validation, the presets, resolve_settings, SettingsOverrides and
the ``--set`` parser, checked against the paper's published settings and the named settings documented in SUMMARY.md."""

from __future__ import annotations

import re
import typing
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Optional

import pytest
from helpers import BLUR_AREA, SHARP

from neuromask_pl.settings import PRESETS, MaskSettings, SettingsOverrides, parse_overrides, resolve_settings

SUMMARY = Path(__file__).resolve().parents[1] / "docs" / "results" / "SUMMARY.md"

# ----------------------------------------------------------------------------- presets


def test_presets_are_paper_paper_cifar_default_and_analysis() -> None:
    assert set(PRESETS) == {"paper", "paper_cifar", "default", "analysis"}


def test_analysis_preset_is_the_default_with_the_deletion_game() -> None:
    """docs/results/planted_objectives.md: the deletion game makes the masks hold a shortcut cue beside the object."""
    assert PRESETS["analysis"] == replace(PRESETS["default"], l_delete=10.0)


def test_paper_preset_is_the_reference_configuration() -> None:
    paper = PRESETS["paper"]
    assert (paper.l_pred, paper.l_sparse, paper.l_smooth) == (0.4, 0.35, 0.03)
    assert (paper.temperature, paper.weight_limit, paper.steps, paper.lr) == (0.3, 10.0, 1000, 0.03)
    assert (paper.optimizer, paper.baseline, paper.sparsity_on) == ("rmsprop_tf", "black", "weights")
    assert (paper.mask_scale, paper.laplacian) == (1, 0)


def test_paper_cifar_preset_is_the_papers_cifar_configuration() -> None:
    """The paper's CIFAR-10 settings (0.4, 0.35, 0.15), T = 1, 2000 iterations, the small images' 3x3 Laplacian;
    everything else as the reference."""
    cifar = PRESETS["paper_cifar"]
    assert (cifar.l_pred, cifar.l_sparse, cifar.l_smooth) == (0.4, 0.35, 0.15)
    assert (cifar.temperature, cifar.steps, cifar.laplacian) == (1.0, 2000, 3)
    assert replace(cifar, l_smooth=0.03, temperature=0.3, steps=1000, laplacian=0) == PRESETS["paper"]


@pytest.mark.parametrize(
    ("names", "off"),
    [
        (("temperature_start", "tie_break"), (0.0, 0.0)),
        (("mask_coarse", "l_detail", "upsample_weights"), (0, 0.0, False)),
    ],
    ids=["annealing_and_tie_break", "two_scale_and_upsampled_weights"],
)
def test_new_options_default_to_off_and_paper_is_unchanged(names: tuple[str, ...], off: tuple) -> None:
    settings = MaskSettings()
    assert tuple(getattr(settings, name) for name in names) == off
    assert PRESETS["paper"] == MaskSettings()


def test_default_preset_anneals_and_breaks_ties() -> None:
    default = PRESETS["default"]
    assert (default.temperature_start, default.temperature) == (2.0, 0.01)
    assert (default.smooth_penalty, default.smooth_on) == ("tv", "mask")
    assert (default.baseline, default.mask_size) == ("black", 32)
    assert 0 < default.tie_break < 0.01


def test_default_preset_is_two_scale_with_upsampled_weights() -> None:
    default = PRESETS["default"]
    assert (default.mask_size, default.mask_coarse, default.l_detail, default.upsample_weights) == (32, 16, 10.0, True)
    assert (default.l_pred, default.l_sparse, default.l_smooth) == (1.0, 1.5, 1.0)
    assert default.sample_temperature == 1.0
    assert (default.temperature_start, default.temperature, default.tie_break) == (2.0, 0.01, 0.001)
    # a 224 px photo: fine cells of 7 px, coarse cells of 14 px; a 64 px canvas: 2 px and 4 px
    assert (default.scale_for(224, 224), default.coarse_scale_for(224, 224)) == (7, 14)
    assert (default.scale_for(64, 64), default.coarse_scale_for(64, 64)) == (2, 4)
    assert MaskSettings().coarse_scale_for(224, 224) == 1  # off: unused


def test_blur_area_preset_uses_low_resolution_blur_area_and_adam() -> None:
    default = resolve_settings("paper", None, BLUR_AREA)
    assert (default.mask_scale, default.baseline, default.sparsity_on, default.optimizer) == (8, "blur", "area", "adam")
    assert 0 < default.area_target < 1


def documented_named_settings() -> dict[str, dict]:
    """The ``--set`` lines of each named setting in SUMMARY.md's list (its section "Former presets"), parsed as a
    script parses them."""
    text = SUMMARY.read_text(encoding="utf-8")
    section = text[text.index("Former presets") :].split("\n\n")[1]
    bullets = re.split(r"^- `(\w+)`", section, flags=re.MULTILINE)[1:]
    return {name: parse_overrides(re.findall(r"--set (\w+=[\w.]+)", body)) for name, body in zip(*[iter(bullets)] * 2)}


def test_named_settings_documented_as_set_lines_are_the_tests_settings() -> None:
    documented = documented_named_settings()
    assert set(documented) == {"reference_default", "sharp", "blur_area"}
    for name, ours in (("sharp", SHARP), ("blur_area", BLUR_AREA)):
        assert resolve_settings("paper", None, documented[name]) == resolve_settings("paper", None, ours), name
    # The reference code's class defaults: (50, 16, 3), T = 0.3, 1000 iterations (the paper's other settings).
    expected = replace(PRESETS["paper"], l_pred=50.0, l_sparse=16.0, l_smooth=3.0)
    assert resolve_settings("paper", None, documented["reference_default"]) == expected


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "steps must be >= 1"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"weight_limit": 0.0}, "weight_limit must be > 0"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"area_target": 0.0}, r"area_target must be in \(0, 1\]"),
        ({"area_target": 1.5}, r"area_target must be in \(0, 1\]"),
        ({"mask_scale": 0}, "mask_scale must be >= 1"),
        ({"l_sparse": -0.1}, "loss weights .* must be >= 0"),
        ({"laplacian": 4}, "laplacian must be 3, 5 or 0"),
        ({"laplacian_padding": "zeros"}, "laplacian_padding must be 'none' or 'replicate'"),
        ({"sparsity_on": "pixels"}, "sparsity_on must be one of"),
        ({"baseline": "white"}, "baseline must be one of"),
        ({"optimizer": "sgd"}, "optimizer must be one of"),
        ({"temperature_start": -0.1}, "temperature_start must be >= 0"),
        ({"tie_break": -0.01}, r"tie_break must be in \[0, 0\.5\)"),
        ({"tie_break": 0.5}, r"tie_break must be in \[0, 0\.5\)"),
        ({"mask_coarse": -1}, "mask_coarse must be >= 0"),
        ({"mask_coarse": 8, "l_detail": -0.5}, "l_detail must be >= 0"),
        ({"l_detail": 1.0}, "set mask_coarse > 0 too"),
        ({"stop_patience": -1}, "stop_patience"),
        ({"stop_tolerance": -0.1}, "stop_tolerance"),
        ({"l_delete": -1}, "l_delete must be >= 0"),
        ({"sample_temperature": -0.5}, "sample_temperature must be >= 0"),
    ],
)
def test_mask_settings_validation(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MaskSettings(**changes)


def test_mask_settings_as_dict_round_trips() -> None:
    settings = resolve_settings("default", 11)
    assert MaskSettings(**settings.as_dict()) == settings
    assert settings.as_dict()["steps"] == 11


# ----------------------------------------------------------------------------- resolve_settings


def test_resolve_settings_applies_overrides_and_ignores_none() -> None:
    settings = resolve_settings("paper", 7, {"lr": None, "laplacian": 5, "baseline": "mean"})
    paper = PRESETS["paper"]
    assert (settings.steps, settings.laplacian, settings.baseline) == (7, 5, "mean")
    for f in fields(MaskSettings):
        if f.name not in ("steps", "laplacian", "baseline"):
            assert getattr(settings, f.name) == getattr(paper, f.name), f.name
    assert PRESETS["paper"].steps == 1000  # the preset itself is untouched


def test_explicit_steps_override_the_settings_and_a_complete_mask_settings_replaces_the_preset() -> None:
    assert resolve_settings("paper", None, BLUR_AREA).steps == 300
    assert resolve_settings("paper", 25, BLUR_AREA) == replace(resolve_settings("paper", None, BLUR_AREA), steps=25)
    complete = MaskSettings(lr=0.2, baseline="mean")
    assert resolve_settings("default", None, complete) == complete
    assert resolve_settings("default", 7, complete) == replace(complete, steps=7)


def test_resolve_settings_errors() -> None:
    with pytest.raises(ValueError, match="unknown preset 'nope'.*paper"):
        resolve_settings("nope")
    with pytest.raises(ValueError, match=r"unknown mask settings \['stpes'\]"):
        resolve_settings("paper", None, {"stpes": 3})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        resolve_settings("default", None, {"temperature": 0.0})
    with pytest.raises(TypeError, match="settings must be a dict of MaskSettings fields.*got list"):
        resolve_settings("paper", None, [("lr", 0.1)])  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- SettingsOverrides


def test_settings_overrides_mirror_mask_settings_with_none_defaults() -> None:
    names = [f.name for f in fields(MaskSettings)]
    assert [f.name for f in fields(SettingsOverrides)] == names
    assert all(value is None for value in asdict(SettingsOverrides()).values())
    hints, types = typing.get_type_hints(SettingsOverrides), typing.get_type_hints(MaskSettings)
    assert all(hints[name] == Optional[types[name]] for name in names)  # noqa: UP045 (what jsonargparse reads)


def test_settings_overrides_change_only_the_fields_they_set() -> None:
    # upsample_weights=False overrides the default's True: only None means "keep the preset's value".
    overrides = SettingsOverrides(lr=0.05, upsample_weights=False)
    assert resolve_settings("default", None, overrides) == replace(PRESETS["default"], lr=0.05, upsample_weights=False)
    assert resolve_settings("default", None, SettingsOverrides()) == PRESETS["default"]


# ----------------------------------------------------------------------------- --set parser


def test_set_values_get_their_fields_type() -> None:
    parsed = parse_overrides(["steps=25", "lr=0.05", "l_pred=1", "baseline=blur", "upsample_weights=true"])
    assert parsed == {"steps": 25, "lr": 0.05, "l_pred": 1.0, "baseline": "blur", "upsample_weights": True}
    types = {name: type(value) for name, value in parsed.items()}  # 1 == 1.0: the types tell them apart
    assert types == {"steps": int, "lr": float, "l_pred": float, "baseline": str, "upsample_weights": bool}
    assert parse_overrides(["upsample_weights=0"]) == {"upsample_weights": False}
    assert parse_overrides(["upsample_weights=False"]) == {"upsample_weights": False}
    # Every field, written as str() writes it, reads back with its value and its type.
    default = PRESETS["default"].as_dict()
    every = parse_overrides([f"{name}={value}" for name, value in default.items()])
    assert every == default and all(type(every[name]) is type(value) for name, value in default.items())


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("stpes=3", r"MaskSettings field as key.*'stpes=3'"),
        ("lr", r"expected key=value.*'lr'"),
        ("upsample_weights=yes", "upsample_weights takes true or false, got 'yes'"),
        ("steps=2.5", "2.5"),
    ],
    ids=["unknown_key", "no_value", "not_a_bool", "not_an_int"],
)
def test_set_refuses_unknown_keys_and_values_of_the_wrong_type(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_overrides([item])
