"""benchmarks/speed.py runs end to end (its GPU runs are prepared in scripts/gpu_checks.sh, so it must not
break unnoticed on the CPU): one model with every variant, each spelling of --model, and the matrix."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_script

from neuromask_pl.fastcopy import autotune, copies

REAL_FASTEST_VARIANT = autotune.fastest_variant  # the suite may pin the choice; the benchmark measures it

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN (mkldnn)")


@pytest.fixture(scope="module")
def benchmark():
    return load_script("benchmarks/speed.py")


@needs_onednn
@pytest.mark.parametrize("target_ms, met", [(1e9, True), (1e-9, False)])
def test_benchmark_writes_rows_ratios_and_the_target(benchmark, tmp_path, capsys, monkeypatch, target_ms, met):
    monkeypatch.setattr(copies, "fastest_variant", REAL_FASTEST_VARIANT)  # the default's choice timed for real
    out = tmp_path / "bench.json"
    args = "--model resnet18 --size 32 --batch 2 --rounds 2 --steps 1 --no-compile --reference-images 1 --auto"
    result = benchmark.main([*args.split(), "--target-ms", str(target_ms), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["floor", "plain", "folded", "folded+packed", "default", benchmark.AUTOGRAD_STEP, "reference"]
    assert rows["floor"]["ratio_to_floor"] == 1.0
    assert all(row["ms_per_image_step"] > 0 and row["ratio_min"] <= row["ratio_max"] for row in rows.values())
    assert rows["reference"]["batch"] == 1 and rows["default"]["batch"] == 2
    assert result["folded_batchnorm_layers"] == 20
    report = result["fast_path"]
    assert report["measured"] and report["variant"] in ("original", "folded", "folded+packed")
    assert set(report["forward_backward_ms"]) == {"original", "folded", "folded+packed"}
    assert set(result["saved_activation_bytes_per_image"]) == {"floor", "plain", "default"}
    assert result["target"] == {"ms_per_image_step": target_ms, "met": met, "by": "default"}
    printed = capsys.readouterr().out
    assert "| default |" in printed and ("MET" if met else "MISSED") in printed


def test_model_spellings_build_the_same_classes(benchmark) -> None:
    import torchvision

    assert type(benchmark.build_model("resnet18", 10)) is torchvision.models.ResNet
    model = benchmark.build_model("torchvision.models:resnet18", 10, {"num_classes": 7})
    assert type(model) is torchvision.models.ResNet and model.fc.out_features == 7 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    timm = pytest.importorskip("timm")
    model = benchmark.build_model("timm:efficientnet_b0", 10)
    assert type(model) is timm.models.EfficientNet and model.classifier.out_features == 10
    with pytest.raises(ValueError, match="timm:<name>, module:factory"):
        benchmark.build_model("no_such_model", 10)


def test_the_matrix_prints_one_table_with_counts_choices_and_targets(benchmark, tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "matrix.json"
    args = "--matrix --size 32 --rounds 1 --steps 1 --only mobilenet_v3_small".split()
    result = benchmark.main([*args, "Hugging Face", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    labels = [model["label"] for model in result["models"]]
    assert labels == ["torchvision mobilenet_v3_small", "Hugging Face tiny ViT"]
    mobilenet, vit = result["models"]
    assert mobilenet["fast_path"]["batchnorm_layers"] == 34
    assert mobilenet["fast_path"]["variant"] in {"original", *mobilenet["pinned"]}
    assert mobilenet["pinned"]["folded"]["folded_batchnorm"] == 34 and "folded+packed" in mobilenet["pinned"]
    assert vit["fast_path"]["batchnorm_layers"] == 0 and vit["target"] == 1.2 and vit["kind"] == "tiny"
    for model in result["models"]:
        default = next(row for row in model["rows"] if row["variant"] == "default")
        assert model["met"] == (default["ratio_to_floor"] <= model["target"])
    table = capsys.readouterr().out
    assert "| torchvision mobilenet_v3_small |" in table and "| Hugging Face tiny ViT |" in table
    assert " 34/34 " in table
