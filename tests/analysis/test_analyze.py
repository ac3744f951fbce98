"""neuromask_pl.analyze end to end: stores of generated masks with a planted cue (known answer), stores with bad
or odd content, the command line, TensorBoard, and MaskWriter(analyze=True) at the end of a real job."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from neuromask_pl import MaskWriter, NeuroMask, TensorDataModule, analyze
from neuromask_pl.analysis.synthetic import write_synthetic_store
from neuromask_pl.cli import main as cli_main
from neuromask_pl.store import ShardWriter, StoreWriteError, merge_index, open_store


def f1(found: np.ndarray, truth: np.ndarray) -> float:
    found, truth = set(found.tolist()), set(truth.tolist())
    return 2 * len(found & truth) / (len(found) + len(truth))


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict[int, np.ndarray]]:
    root = tmp_path_factory.mktemp("planted")
    cue_ids = write_synthetic_store(root, classes=8, per_class=40, size=32, planted={3: ("frame", 0.3)}, seed=1)
    return root, cue_ids


def write_store(root: Path, samples: list[tuple[int, np.ndarray | None, dict]], merge: bool = True) -> Path:
    open_store(root, {"test": str(root)})
    with ShardWriter(root, 0, chunk_size=8) as writer:
        for sample_id, mask, row in samples:
            writer.add(sample_id, None if mask is None else mask.astype(np.float16), {"status": "ok", **row})
    if merge:
        merge_index(root)
    return root


def blob(rng: np.random.Generator, shape=(32, 32)) -> np.ndarray:
    mask = np.zeros(shape)
    y, x = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
    mask[y : y + 8, x : x + 8] = 1.0
    return mask


def test_the_planted_cue_is_one_cluster_ranked_first(planted) -> None:
    root, cue_ids = planted
    analysis = analyze(root, layout="spectral", report=False)
    top = analysis.clusters[0]
    assert (top["target"], top["rank"]) == (3, 1)
    assert f1(analysis.members(3, top["cluster"]), cue_ids[3]) >= 0.9
    assert top["mass_border"] > 0.5  # the frame
    assert analysis.classes[0]["target"] == 3
    assert set(top["exemplars"].tolist()) <= set(cue_ids[3].tolist())


def test_files_on_disk_match_the_analysis(planted) -> None:
    root, _ = planted
    analysis = analyze(root, layout="spectral", report=False)
    out = root / "analysis"
    with open(out / "strategies.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["sample_id"]) for r in rows] == analysis.table.ids.tolist() == list(range(320))
    assert {r["target_name"] for r in rows} == {f"class {k}" for k in range(8)}
    by_id = {int(r["sample_id"]): r for r in rows}
    for i in (0, 150, 319):
        assert int(by_id[i]["cluster"]) == analysis.labels[i]
        assert float(by_id[i]["suspicion"]) == pytest.approx(float(analysis.suspicion[i]), rel=1e-5)
    with open(out / "clusters.csv", newline="") as f:
        clusters = list(csv.DictReader(f))
    assert [int(c["rank"]) for c in clusters] == list(range(1, len(analysis.clusters) + 1))
    assert sum(int(c["size"]) for c in clusters) == 320
    assert [float(c["suspicion"]) for c in clusters] == sorted((float(c["suspicion"]) for c in clusters), reverse=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 320 and summary["store"]["complete"] is True
    assert summary["top_clusters"][0]["target"] == 3 and len(summary["class_ranking"]) == 8
    means = np.load(out / "means.npz")
    assert means["class_means"].shape == (8, 16, 16) and means["cluster_keys"].shape[1] == 2
    np.testing.assert_array_equal(means["class_means"][3], analysis.class_means[3])
    # a class's mean mask is the mean of its members' grids, computed here from the table
    np.testing.assert_allclose(
        means["class_means"][3].ravel(), analysis.table.features[analysis.table.targets == 3].mean(0), rtol=1e-6
    )


def test_a_partly_written_store_is_analysed_with_a_warning(tmp_path) -> None:
    rng = np.random.default_rng(0)
    write_store(tmp_path, [(i, blob(rng), {"target": i % 2}) for i in range(12)], merge=False)
    with pytest.warns(UserWarning, match="index.npz is missing"):
        analysis = analyze(tmp_path, report=False)
    assert len(analysis.table) == 12 and analysis.store["complete"] is False


def test_failed_skipped_and_broken_samples_are_left_out_and_counted(tmp_path) -> None:
    rng = np.random.default_rng(1)
    nan = blob(rng)
    nan[0, 0] = np.nan
    samples = [(i, blob(rng), {"target": 0}) for i in range(10)]
    samples += [
        (10, None, {"status": "skipped", "target": None}),
        (11, blob(rng), {"status": "failed", "target": 0}),
        (12, nan, {"target": 0}),
        (13, blob(rng), {"target": "cat"}),
    ]
    write_store(tmp_path, samples)
    with pytest.warns(UserWarning, match="4 of 14 samples left out"):
        analysis = analyze(tmp_path, report=False)
    assert analysis.table.ids.tolist() == list(range(10))
    assert analysis.store["left_out"] == {
        "status skipped": 1,
        "status failed": 1,
        "mask not finite or outside [0, 1]": 1,
        "no integer target": 1,
    }


def test_tiny_classes_identical_masks_and_mixed_sizes(tmp_path) -> None:
    rng = np.random.default_rng(2)
    samples = [(0, blob(rng), {"target": 0})]  # one image
    samples += [(1, blob(rng), {"target": 1}), (2, blob(rng, (48, 40)), {"target": 1})]  # two, of two sizes
    samples += [(3 + i, np.full((20, 20), 0.5), {"target": 2}) for i in range(8)]  # identical masks
    samples += [(20 + i, blob(rng, (64, 48) if i % 2 else (32, 32)), {"target": 3}) for i in range(12)]
    write_store(tmp_path, samples)
    analysis = analyze(tmp_path, report=False)
    by_class = {c["target"]: c for c in analysis.classes}
    assert by_class[0]["clusters"] == 1 and by_class[0]["chosen_by"] == "too few samples"
    assert by_class[1]["clusters"] == 1 and by_class[2]["chosen_by"] == "identical masks"
    assert by_class[2]["suspicion"] == 0.0
    assert analysis.store["mask_shapes"] == {"20x20": 8, "32x32": 8, "48x40": 1, "64x48": 6}
    assert np.isfinite(analysis.layout).all()


def test_nothing_to_analyse_and_impossible_settings_say_what_to_do(tmp_path) -> None:
    write_store(tmp_path / "empty", [(0, None, {"status": "skipped", "target": None})])
    with pytest.raises(ValueError, match="nothing to analyse.*1 status skipped"):
        analyze(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no results at"):
        analyze(tmp_path / "nowhere")
    for bad, match in [({"grid": 1}, "grid"), ({"k": 0}, "k must"), ({"layout": "pca"}, "layout"),
                       ({"neighbours": True}, "neighbours"), ({"distinct": 2.0}, "distinct must")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            analyze(tmp_path / "empty", **bad)


def test_object_boxes_give_the_mass_off_the_object(tmp_path) -> None:
    mask = np.zeros((10, 10))
    mask[2:4, 2:4] = 1.0  # 4 pixels in the box
    mask[8, 8] = 1.0  # 1 outside
    write_store(tmp_path, [(i, mask, {"target": 0}) for i in range(3)])
    analysis = analyze(tmp_path, report=False, truth=lambda sample_id, row: (2, 2, 5, 5) if sample_id < 2 else None)
    assert analysis.table.off_object[:2].tolist() == pytest.approx([0.2, 0.2]) and np.isnan(
        analysis.table.off_object[2]
    )
    assert analysis.clusters[0]["off_object"] == pytest.approx(0.2)


def test_csv_cells_a_spreadsheet_would_run_are_quoted(tmp_path) -> None:
    rng = np.random.default_rng(3)
    write_store(tmp_path, [(i, blob(rng), {"target": 0, "target_name": "=HYPERLINK(1)"}) for i in range(4)])
    analyze(tmp_path, report=False)
    text = (tmp_path / "analysis" / "clusters.csv").read_text()
    assert "'=HYPERLINK(1)" in text


def test_a_folder_that_cannot_be_written_is_one_clear_error(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(4)
    write_store(tmp_path, [(i, blob(rng), {"target": 0}) for i in range(4)])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "analysis").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreWriteError, match="could not write the analysis"):
        analyze(tmp_path, report=False)


def test_command_line_and_tensorboard(planted, tmp_path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = planted
    cli_main(["analyze", str(root), "--output-dir", str(tmp_path / "out"), "--layout", "spectral", "--no-report",
              "--tensorboard", str(tmp_path / "tb")])  # fmt: skip
    printed = capsys.readouterr().out
    assert "320 masks of 8 classes" in printed and "class class 3 cluster" in printed
    assert (tmp_path / "out" / "clusters.csv").is_file()
    projector = (tmp_path / "tb" / "projector_config.pbtxt").read_text()
    assert "analysis/masks" in projector
    metadata = next((tmp_path / "tb").rglob("metadata.tsv")).read_text().splitlines()
    assert metadata[0].split("\t") == ["sample_id", "class", "cluster", "suspicion", "mask_area"]
    assert len(metadata) == 321
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert {"analysis/class_means", "analysis/suspicious_clusters"} <= set(events.Tags()["images"])
    assert "analysis/suspicious_clusters" in events.Tags()["scalars"]


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning"])
def test_mask_writer_analyses_the_completed_job(tmp_path, package) -> None:
    pl = pytest.importorskip(package)
    images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    data = TensorDataModule(images, labels=torch.arange(12) % 2, batch_size=4, pin_memory=False)
    logger = pl.pytorch.loggers.TensorBoardLogger if package == "lightning" else TensorBoardLogger
    logger = logger(tmp_path / "logs", name="explain")
    writer = MaskWriter(write_overlays=False, analyze={"layout": "spectral"})
    trainer = helpers.make_trainer(pl.pytorch if package == "lightning" else pl, logger=logger,
                                   default_root_dir=tmp_path, callbacks=[writer])  # fmt: skip
    trainer.predict(NeuroMask(helpers.make_tiny_cnn(0), steps=3), datamodule=data, return_predictions=False)
    out = Path(trainer.log_dir) / "explanations" / "analysis"
    assert writer.analysis is not None and len(writer.analysis.table) == 12
    assert (out / "strategies.csv").is_file() and (out / "report.html").is_file()
    assert (Path(trainer.log_dir) / "projector_config.pbtxt").is_file()  # the run's own TensorBoard log


def test_mask_writer_refuses_a_bad_analyze_option() -> None:
    with pytest.raises(ValueError, match="analyze must be"):
        MaskWriter(analyze="yes")  # type: ignore[arg-type]


def test_a_job_stopped_early_is_analysed_when_the_same_command_completes_it(tmp_path) -> None:
    import signal

    from pytorch_lightning.callbacks import Callback

    class CtrlCAt(Callback):
        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            if batch_idx == 2:
                raise KeyboardInterrupt

    images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def run(*callbacks) -> MaskWriter:
        writer = MaskWriter(str(tmp_path / "out"), write_overlays=False, analyze={"layout": "spectral"})
        data = TensorDataModule(images, labels=torch.arange(12) % 2, batch_size=2, pin_memory=False)
        trainer = helpers.make_trainer(default_root_dir=tmp_path, callbacks=[writer, *callbacks])
        trainer.predict(NeuroMask(helpers.make_tiny_cnn(0), steps=2), datamodule=data, return_predictions=False)
        return writer

    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            run(CtrlCAt())
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert not (tmp_path / "out" / "analysis").exists()  # 4 of 12 explained: not analysed
    writer = run()
    assert len(writer.analysis.table) == 12
    assert json.loads((tmp_path / "out" / "analysis" / "summary.json").read_text())["samples"] == 12


def test_a_store_written_by_several_ranks_is_analysed_whole(tmp_path) -> None:
    rng = np.random.default_rng(5)
    open_store(tmp_path, {"test": "ranks"})
    for rank in range(3):  # each rank its own shards, ids interleaved as a DistributedSampler gives them
        with ShardWriter(tmp_path, rank, chunk_size=4, session=f"s{rank}") as writer:
            for i in range(rank, 30, 3):
                writer.add(i, blob(rng).astype(np.float16), {"status": "ok", "target": i % 2})
    merge_index(tmp_path)
    analysis = analyze(tmp_path, report=False)
    assert analysis.table.ids.tolist() == list(range(30))
    assert sorted(c["samples"] for c in analysis.classes) == [15, 15]


def test_command_line_boxes_give_the_mass_off_the_object(tmp_path, capsys) -> None:
    mask = np.zeros((10, 10))
    mask[2:4, 2:4] = 1.0
    mask[8, 8] = 1.0
    write_store(tmp_path / "store", [(i, mask, {"target": 0}) for i in range(3)])
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("sample_id,x0,y0,x1,y1\n0,2,2,5,5\n1,0,0,10,10\n")
    cli_main(["analyze", str(tmp_path / "store"), "--boxes", str(boxes), "--no-report", "--layout", "spectral"])
    with open(tmp_path / "store" / "analysis" / "strategies.csv", newline="") as f:
        off = {int(r["sample_id"]): r["off_object"] for r in csv.DictReader(f)}
    assert float(off[0]) == pytest.approx(0.2) and float(off[1]) == 0.0 and off[2] == ""
    boxes.write_text("sample_id,x0,y0\n0,1,1\n")
    with pytest.raises(ValueError, match="the boxes need the columns"):
        cli_main(["analyze", str(tmp_path / "store"), "--boxes", str(boxes)])
    boxes.write_text("sample_id,x0,y0,x1,y1\n0,a,1,2,3\n")
    with pytest.raises(ValueError, match="line 2: sample_id, x0, y0, x1, y1 must be numbers"):
        cli_main(["analyze", str(tmp_path / "store"), "--boxes", str(boxes)])
