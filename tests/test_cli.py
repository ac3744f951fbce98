"""The `neuromask-pl` command on a tiny config: files on disk and TensorBoard content."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import write_cli_config
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from neuromask_pl.cli import main
from neuromask_pl.store import load_results


def _make_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 48), (32, 32), (64, 40), (36, 36), (50, 33)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")


def _config(tmp_path: Path, images: Path, out: Path) -> Path:
    return write_cli_config(
        tmp_path / "tiny.yaml",
        images,
        steps=5,
        batch_size=4,
        trainer={"default_root_dir": str(tmp_path)},
        writer={"output_dir": str(out)},
    )


def _events(tmp_path: Path) -> EventAccumulator:
    (event_file,) = (tmp_path / "lightning_logs").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("stage", ["predict", "test"])
def test_cli_writes_outputs_and_tensorboard(tmp_path: Path, stage: str, capsys: pytest.CaptureFixture) -> None:
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    _make_images(images)
    main([stage, "--config", str(_config(tmp_path, images, out))])

    rows = list(csv.DictReader(open(out / "manifest.csv")))
    # files sorted by name: broken.jpg is sample 0, img0..img4 are samples 1..5
    assert [r["sample_id"] for r in rows] == [str(i) for i in range(6)]
    assert rows[0]["status"] == "skipped" and rows[0]["path"].endswith("broken.jpg") and rows[0]["error"]
    results = load_results(out)
    assert sorted(results.ids.tolist()) == list(range(6)) and results.mask(0) is None
    for row in rows[1:]:
        assert row["status"] == "ok"
        mask = results.mask(int(row["sample_id"]))
        assert mask.shape == (32, 32) and 0 <= mask.min() <= mask.max() <= 1
        assert abs(float(mask.mean()) - float(row["mask_area"])) < 1e-3
        assert Image.open(out / row["overlay_file"]).size[1] > 32  # the panel, its caption below
        assert 0 <= int(row["target"]) < 10
    record = json.loads((out / "run.json").read_text())
    assert record["counts"] == {"explained": 5, "skipped": 1}
    assert record["hparams"]["settings"]["steps"] == 5 and record["hparams"]["preset"] == "default"
    assert record["hparams"]["settings"]["mask_size"] == 32  # resolved from the preset, not None
    assert "FactoryClassifier" in record["classifier"]["class"] and "torchvision" in record["versions"]
    fast = record["fast_path"]  # what the fast path ran: resnet18's 20 BatchNorms folded, its convolutions packed
    assert (fast["variant"], fast["folded_batchnorm"], fast["batchnorm_layers"]) == ("folded+packed", 20, 20)
    assert fast["mask_gradient"] == "explicit" and fast["batch_invariant"]  # the default preset on the CPU
    assert str(out) in capsys.readouterr().out

    acc = _events(tmp_path)
    scalars = acc.Tags()["scalars"]
    for name in ("loss_pred", "loss_sparse", "loss_smooth", "loss_total", "mask_area", "preservation_rate"):
        assert f"explain/{name}" in scalars
    assert len(acc.Scalars("explain/mask_area")) == 2  # two batches
    assert "explain/overlays" in acc.Tags()["images"]
    areas = [float(r["mask_area"]) for r in rows[1:]]
    assert acc.Scalars("explain/run/samples")[-1].value == 5
    assert acc.Scalars("explain/fast_path/folded_batchnorm")[-1].value == 20
    assert acc.Scalars("explain/fast_path/explicit_mask_gradient")[-1].value == 1.0
    assert acc.Scalars("explain/run/mask_area")[-1].value == pytest.approx(np.mean(areas), abs=1e-5)
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info
    assert start.hparams["settings/steps"].number_value == 5 and start.hparams["preset"].string_value == "default"
    if stage == "test":
        for name in ("mask_area", "preservation_rate", "selection_rate", "deletion_auc", "insertion_auc"):
            assert f"test/{name}" in scalars
        assert "test/pointing_game" not in scalars  # no ground truth in a plain image folder
        assert acc.Scalars("test/mask_area")[-1].value == pytest.approx(np.mean(areas), abs=1e-4)


def test_cli_refuses_inference_mode(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    _make_images(images)
    config = _config(tmp_path, images, tmp_path / "out")
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        main(["predict", "--config", str(config), "--trainer.inference_mode", "true"])


def test_cli_rejects_unknown_preset(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    _make_images(images)
    config = _config(tmp_path, images, tmp_path / "out")
    with pytest.raises(ValueError, match="unknown preset"):
        main(["predict", "--config", str(config), "--model.preset", "nonsense"])
