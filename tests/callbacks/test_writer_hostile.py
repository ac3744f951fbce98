"""MaskWriter under hostile conditions: SIGTERM, another job on the same folders, a full disk, formula class names."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import signal
import socket
import time
from fnmatch import fnmatch
from pathlib import Path

import helpers
import pytest
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

import neuromask_pl.store.io as store_io
from neuromask_pl import NeuroMask
from neuromask_pl.callbacks import MaskWriter
from neuromask_pl.data import TensorDataModule
from neuromask_pl.store import StoreWriteError, load_results, read_manifest

N = 6


def data(batch_size: int = 2) -> TensorDataModule:
    images = helpers.make_images(N, size=12)
    return TensorDataModule(images, labels=torch.arange(N) % 3, batch_size=batch_size, pin_memory=False)


def explainer(classifier=None) -> NeuroMask:
    return NeuroMask(classifier if classifier is not None else helpers.make_tiny_cnn(), steps=2)


# ----------------------------------------------------------------------------- SIGTERM


class SigtermAt(Callback):
    """Sends this process SIGTERM when batch ``batch`` starts (as a scheduler's preemption would)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def _maybe(self, batch_idx: int) -> None:
        if batch_idx == self.batch:
            handler = signal.getsignal(signal.SIGTERM)
            assert handler not in (signal.SIG_DFL, signal.SIG_IGN, None), "Lightning must have its SIGTERM handler"
            signal.raise_signal(signal.SIGTERM)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._maybe(batch_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._maybe(batch_idx)


@pytest.mark.parametrize("stage", ["predict", "test"])
def test_sigterm_stops_after_the_current_batch_with_a_finished_manifest(tmp_path, stage):
    out = tmp_path / "out"
    trainer = helpers.make_trainer(callbacks=[MaskWriter(str(out)), SigtermAt(batch=1)], default_root_dir=tmp_path)
    with pytest.raises(SystemExit) as stopped:
        getattr(trainer, stage)(explainer(), datamodule=data())
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "Lightning's handler is put back"
    # batches 0 and 1 (the one running when SIGTERM came) are finished, merged and recorded; the lock is released
    assert [int(row["sample_id"]) for row in read_manifest(out)] == [0, 1, 2, 3]
    with load_results(out) as results:
        assert results.indexed and list(results.ids) == [0, 1, 2, 3]
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["explained"] == 4 and run["stopped"] == "SIGTERM"
    assert not (out / ".lock").exists()

    # the same command again explains only the rest
    module = explainer()
    helpers.make_trainer(callbacks=[MaskWriter(str(out))]).predict(module, datamodule=data(), return_predictions=False)
    assert [int(row["sample_id"]) for row in read_manifest(out)] == list(range(N))
    assert json.loads((out / "run.json").read_text())["stopped"] is None


def test_sigterm_during_the_last_batch_finishes_normally(tmp_path):
    out = tmp_path / "out"
    trainer = helpers.make_trainer(callbacks=[MaskWriter(str(out)), SigtermAt(batch=2)])
    trainer.predict(explainer(), datamodule=data(), return_predictions=False)  # nothing left to stop
    assert [int(row["sample_id"]) for row in read_manifest(out)] == list(range(N))


class CtrlCAt(Callback):
    """Raises KeyboardInterrupt (as Ctrl-C does) when batch ``batch`` starts."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == self.batch:
            raise KeyboardInterrupt

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)


@pytest.mark.parametrize("stage", ["predict", "test"])
def test_ctrl_c_finishes_the_manifest_and_says_what_was_done(tmp_path, stage, caplog):
    out = tmp_path / "out"
    trainer = helpers.make_trainer(callbacks=[MaskWriter(str(out)), CtrlCAt(batch=2)], default_root_dir=tmp_path)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit), caplog.at_level("WARNING", logger="neuromask_pl.callbacks.writer"):
            getattr(trainer, stage)(explainer(), datamodule=data())
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning ignores further Ctrl-C while it shuts down
    # batches 0 and 1 are finished, merged and recorded; batch 2 never ran; the lock is released
    assert [int(row["sample_id"]) for row in read_manifest(out)] == [0, 1, 2, 3]
    with load_results(out) as results:
        assert results.indexed and list(results.ids) == [0, 1, 2, 3]
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"explained": 4, "skipped": 0} and run["stopped"] == "KeyboardInterrupt"
    assert run["finished"] is not None and not (out / ".lock").exists()
    assert any("interrupted (Ctrl-C): 4 explained, 0 skipped" in r.getMessage() for r in caplog.records)

    # the same command again explains only the rest
    module = explainer()
    helpers.make_trainer(callbacks=[MaskWriter(str(out))]).predict(module, datamodule=data(), return_predictions=False)
    assert [int(row["sample_id"]) for row in read_manifest(out)] == list(range(N))


def test_ctrl_c_before_the_first_result_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    trainer = helpers.make_trainer(callbacks=[MaskWriter(str(out)), CtrlCAt(batch=0)], default_root_dir=tmp_path)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            trainer.predict(explainer(), datamodule=data())
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert not out.exists()


# ----------------------------------------------------------------------------- two jobs on one folder


def test_a_job_refused_by_the_lock_touches_nothing_of_the_job_that_holds_it(tmp_path):
    """Two jobs started together with one output folder and one logger version: the refused one leaves the other's
    lock, store and logger files (its TensorBoard events file among them) exactly as they are."""
    out = tmp_path / "out"
    out.mkdir()
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2030-01-01T00:00:00+00:00", "token": "f" * 16}
    (out / ".lock").write_text(json.dumps(lock))  # held by a live process; it has not written store.json yet
    version = tmp_path / "logs" / "explain" / "version_0"
    version.mkdir(parents=True)
    theirs = [
        version / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid() + 1}.0",
        version / "hparams.yaml",
        version / "config.yaml",
    ]
    for path in theirs:
        path.write_text("theirs")
    logger = TensorBoardLogger(tmp_path / "logs", name="explain", version=0)
    module = explainer()
    trainer = helpers.make_trainer(logger=logger, callbacks=[MaskWriter(str(out))])
    with pytest.raises(RuntimeError, match="another neuromask-pl job"):
        trainer.predict(module, datamodule=data(), return_predictions=False)
    assert all(path.exists() for path in theirs), "the other job's logger files must stay"
    assert json.loads((out / ".lock").read_text()) == lock
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# ----------------------------------------------------------------------------- a full disk


def full_disk_for(pattern: str):
    """An ``open`` for neuromask_pl.store.io whose files named like ``pattern`` fail to be written with ENOSPC."""
    real_open = open

    class Full(io.BufferedWriter):
        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def opener(file, mode="r", *args, **kwargs):
        name = Path(file).name
        if not any(c in mode for c in "wxa") or not fnmatch(name, pattern):
            return real_open(file, mode, *args, **kwargs)
        raw = io.FileIO(file, mode.replace("b", "").replace("t", ""))
        buffered = Full(raw)
        if "b" in mode:
            return buffered
        return io.TextIOWrapper(buffered, encoding=kwargs.get("encoding"), newline=kwargs.get("newline"))

    return opener


@pytest.mark.parametrize(
    ("pattern", "named"),
    [
        (".00000000.png.*.tmp", "overlays/00000000.png"),
        (".run.json.*.tmp", "run.json"),
        (".r00000-*.npz.*.tmp", "shards/r00000-000000-"),
        (".manifest.csv.*.tmp", "manifest.csv"),
        (".store.json.*.tmp", "store.json"),
    ],
    ids=["overlay", "run-record", "shard", "manifest", "store"],
)
def test_a_full_disk_anywhere_is_one_store_write_error_naming_the_path(tmp_path, monkeypatch, pattern, named):
    out = tmp_path / "out"
    monkeypatch.setattr(store_io, "open", full_disk_for(pattern), raising=False)
    trainer = helpers.make_trainer(callbacks=[MaskWriter(str(out), chunk_size=64)])
    with pytest.raises(StoreWriteError) as raised:
        trainer.predict(explainer(), datamodule=data(), return_predictions=False)
    message = str(raised.value)
    assert "no space left on device while writing" in message and named in message, message
    assert "\n" not in message and not (out / ".lock").exists()
    assert not list(out.rglob(".*.tmp")), "no temporary file may be left"


def test_store_write_error_raised_again_on_every_rank_keeps_its_message():
    from neuromask_pl.callbacks.writer import _rebuild_error

    error = _rebuild_error("StoreWriteError: no space left on device while writing shard x")
    assert isinstance(error, StoreWriteError) and str(error) == "no space left on device while writing shard x"


# ----------------------------------------------------------------------------- class names that are formulas


class Named(helpers.TinyCNN):
    class_names = ["=cmd|' /C calc'!A0", "@SUM(1)", "-2+3"]


def test_class_names_that_are_formulas_are_quoted_in_the_manifest(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "out"
    helpers.make_trainer(callbacks=[MaskWriter(str(out), write_overlays=False)]).predict(
        explainer(Named().eval()), datamodule=data(), return_predictions=False
    )
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = {row["target_name"] for row in rows}
    assert names and all(name[:1] == "'" for name in names), names
    assert all(not row["prob_original"].startswith("'") for row in rows)
    assert {row["target_name"] for row in read_manifest(out)} <= set(Named.class_names)
