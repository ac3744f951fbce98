"""benchmarks/compare_methods.py: a smoke run on 4 benchmark images plus its helpers, checked independently."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import load_script

pytest.importorskip("captum")
pytest.importorskip("torchray")

from neuromask_pl.classifiers.benchmark import load_benchmark_classifier  # noqa: E402
from neuromask_pl.data.localisation import make_localisation_set  # noqa: E402
from neuromask_pl.metrics import energy_pointing, pointing_game  # noqa: E402


@pytest.fixture(scope="module")
def compare():
    return load_script("benchmarks/compare_methods.py")


def test_minmax_per_image(compare):
    maps = torch.tensor([[[[1.0, 3.0], [2.0, 5.0]]], [[[-2.0, -2.0], [-2.0, -2.0]]]])
    out = compare.minmax(maps)
    assert torch.allclose(out[0, 0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(out[1], torch.zeros(1, 2, 2))  # constant map: nothing selected


def test_smoke_spurious_four_images(compare, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = [
        "--variant", "spurious", "--n", "4", "--batch-size", "4",
        "--methods", "neuromask,saliency,gradcam,occlusion,extremal_perturbation,rise",
        "--presets", "default", "--steps-list", "3,5", "--set", "lr=0.05",
        "--ep-max-iter", "3", "--ep-n", "2", "--rise-masks", "16", "--label", "smoke",
        "--reference", "neuromask:default@5 [smoke]",
        "--out", str(out), "--markdown", str(md),
    ]  # fmt: skip
    result = compare.main(argv)
    saved = json.loads(out.read_text())
    assert saved["config"]["n"] == 4 and saved["config"]["overrides"] == {"lr": 0.05}
    names = [r["name"] for r in saved["rows"]]
    assert names == [
        "neuromask:default@3 [smoke]",
        "neuromask:default@5 [smoke]",
        "saliency",
        "gradcam",
        "occlusion",
        "extremal_perturbation",
        "rise",
    ]
    rows = {r["name"]: r for r in saved["rows"]}
    assert rows["neuromask:default@5 [smoke]"]["settings"]["resolved"]["lr"] == 0.05
    assert rows["extremal_perturbation"]["n"] == 2 and rows["saliency"]["n"] == 4
    table = md.read_text()
    for name in names:
        assert f"| {name} |" in table

    # Recompute the saliency row's localisation numbers independently of the script's evaluation.
    data = make_localisation_set("test", 4, spurious=True)
    classifier = load_benchmark_classifier("spurious")
    x = data["image"].clone().requires_grad_(True)
    logits = classifier(x)
    predicted = logits.argmax(-1)
    logits.gather(1, predicted[:, None]).sum().backward()
    grad_map = x.grad.abs().amax(1, keepdim=True)
    sal = rows["saliency"]["metrics"]
    assert sal["pointing_game"] == pytest.approx(float(pointing_game(grad_map, data["gt_mask"], 3).float().mean()))
    assert sal["energy_pointing"] == pytest.approx(float(energy_pointing(grad_map, data["gt_mask"]).mean()), abs=1e-4)
    cue = (predicted == data["cue_label"]) & (data["cue_label"] != data["label"])
    assert sal["n_cue"] == int(cue.sum())
    if cue.any():
        energy = energy_pointing(grad_map, data["cue_mask"])[cue]
        assert sal["cue_energy_mean"] == pytest.approx(float(energy.mean()), abs=1e-4)
        assert sal["cue_energy_gt_half_rate"] == pytest.approx(float((energy > 0.5).float().mean()))
    for row in saved["rows"]:
        for key in ("pointing_game", "energy_pointing", "selection_rate", "preservation_rate", "mask_area"):
            assert 0.0 <= row["metrics"][key] <= 1.0
        assert row["seconds_per_image"] > 0 and not math.isnan(row["metrics"]["deletion_auc"])
    check = result["targets"]["checks"]["cue_energy_gt_half_rate"]
    ref = rows["neuromask:default@5 [smoke]"]["metrics"]
    assert check["value"] == ref.get("cue_energy_gt_half_rate", math.nan) or math.isnan(check["value"])
    assert check["met"] == (check["value"] >= 0.9)
