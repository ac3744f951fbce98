"""benchmarks/speed.py runs end to end (its GPU runs are prepared in scripts/gpu_checks.sh, so it must not
break unnoticed on the CPU)."""

from __future__ import annotations

import json

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def benchmark():
    return load_script("benchmarks/speed.py")


@pytest.mark.parametrize("target_ms, met", [(1e9, True), (1e-9, False)])
def test_benchmark_writes_rows_ratios_and_the_target(benchmark, tmp_path, capsys, target_ms, met) -> None:
    out = tmp_path / "bench.json"
    args = "--model resnet18 --size 32 --batch 2 --rounds 2 --steps 1 --no-compile --reference-images 1"
    result = benchmark.main([*args.split(), "--target-ms", str(target_ms), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["floor", "plain", "default", "reference"]
    assert rows["floor"]["ratio_to_floor"] == 1.0
    assert all(row["ms_per_image_step"] > 0 and row["ratio_min"] <= row["ratio_max"] for row in rows.values())
    assert rows["reference"]["batch"] == 1 and rows["default"]["batch"] == 2
    assert result["folded_batchnorm_layers"] == 20
    assert set(result["saved_activation_bytes_per_image"]) == {"floor", "plain", "default"}
    assert result["target"] == {"ms_per_image_step": target_ms, "met": met, "by": "default"}
    printed = capsys.readouterr().out
    assert "| default |" in printed and ("MET" if met else "MISSED") in printed
