"""MaskWriter: every explained sample into the sharded, resumable store, with overlays, manifest and run record."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from neuromask_pl.classifiers import describe_classifier
from neuromask_pl.explanation import LOSS_TERMS, Explanation, sanity_report
from neuromask_pl.store import (
    ShardWriter,
    StoreLock,
    StoreWriteError,
    atomic_write,
    load_results,
    merge_index,
    open_store,
    resume_state,
    scan_shards,
    source_fingerprint,
)
from neuromask_pl.store.io import package_versions, reporting_write_errors, utc_now, write_error
from neuromask_pl.viz import captioned_panel, save_png

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "sample_id",
    "status",
    "flags",
    "path",
    "target",
    "target_name",
    "predicted",
    "prob_original",
    "prob_masked",
    "prob_baseline",
    "preserved",
    "mask_area",
    "steps",
    *(f"loss_{term}" for term in LOSS_TERMS),
    "overlay_file",
    "error",
)
_STAGES = ("predict", "test")
_VERSIONED = ("torch", "torchvision", "pytorch_lightning", "torchmetrics", "numpy", "neuromask_pl")


# DataModule settings that change how samples are loaded but never a mask (left out of the config hash).
_LOADING_ONLY = {"batch_size", "num_workers", "pin_memory", "max_pixels", "max_decode_bytes"}


def explanation_config(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """What determines every mask of a run: NeuroMask settings, classifier file, data settings, precision."""
    datamodule = getattr(trainer, "datamodule", None)
    data = dict(datamodule.hparams) if datamodule is not None else {}
    fingerprint = getattr(datamodule, "fingerprint", None)
    module = getattr(pl_module, "classifier", None)
    classifier = describe_classifier(module) if module is not None else {}
    if classifier.get("sha256") is None and isinstance(module, torch.nn.Module):
        classifier["sha256"] = _state_sha256(module)  # no model file: hash the weights themselves
    return {
        "hparams": dict(pl_module.hparams),
        "classifier": {k: classifier.get(k) for k in ("class", "sha256", "num_parameters", "num_classes")},
        "data": {"class": type(datamodule).__qualname__ if datamodule is not None else None}
        | {k: v for k, v in data.items() if k not in _LOADING_ONLY}
        | {"fingerprint": fingerprint() if callable(fingerprint) else None},
        "precision": str(trainer.precision),
    }


def _state_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class MaskWriter(BasePredictionWriter):
    """Write every explained sample to a sharded, resumable store, plus overlays and a manifest.

    Works in the predict and test stages, on one process or many (DDP: each rank writes its own
    shards). Layout of ``output_dir``::

        store.json                      format version and the hash of the run's configuration
        shards/r<rank>-<seq>-<session>.npz (+ .sha256)   masks (float16) and manifest rows,
                                        ``chunk_size`` samples each, written atomically with a checksum
        index.npz, manifest.csv         merged when the job completes (one row per sample id)
        overlays/<sample_id:08d>.png    original | heat-map overlay | image * mask
        run.json                        configuration, trainer, versions, classifier, times, counts,
                                        sanity checks (``sanity``)

    Each manifest row carries the sample's sanity ``flags`` (:data:`~neuromask_pl.explanation.FLAGS`); when the job
    ends, a warning names what the sanity checks of the whole run found. Read results with
    :func:`neuromask_pl.load_results`. Rerunning the same command on the same
    directory explains only the samples that are missing (matched by sample id; the configuration
    and model must be the same, else the run is refused unless ``overwrite=True``). Damaged or
    incomplete shards (a killed job, a full disk) are detected by checksum and redone. Two jobs on
    one directory at once are refused (``.lock``).

    Args:
        output_dir: where to write; None means ``<trainer.log_dir>/explanations``.
        write_overlays: also write the overlay PNGs (needs the images in the Explanation or batch).
        chunk_size: samples per shard file.
        overwrite: replace the results of another configuration in ``output_dir``.
        analyze: when the job completes, find the classifier's strategies in the store on rank 0
            (:func:`neuromask_pl.analyze`: ``analysis/`` in the store, ``report.html``, and the projector in the
            run's TensorBoard log); a dict gives ``analyze``'s keyword arguments (``{"k": 3}``). A job stopped early
            (SIGTERM, Ctrl-C) is analysed when the same command completes it; a failed analysis is a warning, the
            explanations stay.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        write_overlays: bool = True,
        chunk_size: int = 256,
        overwrite: bool = False,
        analyze: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.output_dir = output_dir
        self.write_overlays = write_overlays
        self.chunk_size = chunk_size
        self.overwrite = overwrite
        if not isinstance(analyze, (bool, dict)):
            raise ValueError(
                f"analyze must be True, False or a dict of the arguments of neuromask_pl.analyze, got {analyze!r}"
            )
        self.analyze = analyze
        self.analysis: Any = None  # the StrategyAnalysis of the completed store (rank 0, analyze=True)
        self.out: Path | None = None  # resolved at setup
        self._writer: ShardWriter | None = None
        self._lock: StoreLock | None = None
        self._log_dir: str | None = None
        self._stage = ""
        self._started = ""
        self.resumed_ids: set[int] = set()
        self._created = time.time()  # files of this run are not older (a failed run removes what it made)
        self._new_store = False  # this run created the store (no store.json when it took the lock)
        self._stopped: str | None = None  # "SIGTERM" when the job stopped on it after finishing a batch
        self._written = 0  # samples this process handed to the store
        self._counts: dict[str, int] | None = None  # the store's counts when this job finished it

    # -- lifecycle -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the folder, lock and open the store, find what is already done, start this rank's shards."""
        super().setup(trainer, pl_module, stage)
        if stage not in _STAGES:
            return
        self._log_dir = trainer.log_dir if trainer.loggers else None  # log_dir must be read on every rank
        default = Path(self._log_dir or Path(trainer.default_root_dir) / "lightning_logs") / "explanations"
        self.out = Path(self.output_dir) if self.output_dir is not None else default
        self._stage, self._started = stage, utc_now()
        error, done, session = None, [], ""
        if trainer.is_global_zero:
            try:
                done, session = self._open_store(trainer, pl_module)
            except (OSError, ValueError, RuntimeError) as err:
                error = f"{type(err).__name__}: {err}"
        # Every rank learns the outcome, so that no rank waits forever for one that failed.
        error, done, session = trainer.strategy.broadcast((error, done, session), src=0)
        if error is not None:
            raise _rebuild_error(error)
        self.resumed_ids = set(done)
        self._skip_done(trainer, self.resumed_ids)  # also when empty: a reused DataModule may hold older ids
        self._writer = ShardWriter(self.out, trainer.global_rank, self.chunk_size, session=session)

    def _open_store(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[list[int], str]:
        self._check_writable(self.out)
        self._lock = StoreLock(self.out)
        self._lock.acquire()  # refused: this job has made nothing and removes nothing (another job's files)
        self._new_store = not (self.out / "store.json").exists()
        try:
            overlays = ("overlays",) if self.write_overlays else ()
            open_store(self.out, explanation_config(trainer, pl_module), self.overwrite, sample_dirs=overlays)
            scan = scan_shards(self.out, verify=True, clean=True)
            scan.delete_bad()
            state = resume_state(self.out, scan)  # a sample whose file changed since is not done
            if len(state.changed):
                rank_zero_info(f"MaskWriter: {len(state.changed)} image(s) changed since explained; explained again")
            self._write_run_record(trainer, pl_module, counts=None)
        except BaseException:
            self._release_lock()
            raise
        session = f"{time.time_ns():020d}{secrets.token_hex(4)}"  # later runs sort later (store: later wins)
        return [int(i) for i in state.done], session

    def _skip_done(self, trainer: pl.Trainer, done: set[int]) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "exclude_ids"):
            datamodule.exclude_ids = _exclusions(datamodule, done, trainer.world_size)
            if done:
                rank_zero_info(f"MaskWriter: resuming in {self.out}: {len(done)} samples already explained are skipped")
        elif done:
            rank_zero_warn(
                f"MaskWriter: {len(done)} samples in {self.out} are already explained, but this data has no "
                "`exclude_ids`; they are explained again (results are the same)."
            )

    def _check_writable(self, out: Path) -> None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as err:
            if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
                raise write_error(err, f"the output directory '{out}'") from err
            raise ValueError(
                f"MaskWriter cannot write to the output directory '{out}': {err.strerror or err}. "
                "Pass MaskWriter(output_dir=...) a directory you can create and write to, "
                "or fix the permissions of that path."
            ) from err

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Keep what is finished: write the buffered samples as a last shard (redone if damaged).

        On Ctrl-C (KeyboardInterrupt) in a single process, the job is finished as on SIGTERM: the samples of the
        finished batches are merged into the manifest and index, ``run.json`` records them (``"stopped":
        "KeyboardInterrupt"``), the lock is released and the log says what was done; the batch that was running is
        lost (the same command explains it and the rest).
        """
        if isinstance(exception, KeyboardInterrupt) and self._interrupted(trainer, pl_module):
            return
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as err:  # noqa: BLE001 - the original exception matters more
                log.warning("MaskWriter: could not write the last buffered samples: %s", err)
                self._writer.abort()
            self._writer = None
        self._release_lock()
        if trainer.is_global_zero and trainer.world_size == 1 and self._written == 0:
            self._discard_empty_run()

    def _interrupted(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Finish the store after Ctrl-C and say what was done; False when it cannot (nothing written, several
        processes: the others may be anywhere, no barrier is safe) or fails, to go on as any other exception."""
        if self._writer is None or trainer.world_size != 1 or self._written == 0:
            return False
        self._stopped = "KeyboardInterrupt"
        try:
            self._finish(trainer, pl_module)
        except Exception as err:  # noqa: BLE001 - fall back to keeping the shards only
            log.warning("MaskWriter: could not finish the manifest after Ctrl-C: %s", err)
            return False
        counts = self._counts or {}
        log.warning(
            "MaskWriter: interrupted (Ctrl-C): %d explained, %d skipped in all (%d this run), written to %s "
            "(manifest.csv, run.json); run the same command again to go on",
            counts.get("explained", 0), counts.get("skipped", 0), self._written, self.out,
        )  # fmt: skip
        return True

    def _discard_empty_run(self) -> None:
        """A run that failed before its first result leaves nothing behind: neither the store it created (under its
        lock) nor a logger version folder that holds only what this run wrote (config, hparams, this process's
        events files). Another job's files are never touched: a folder holding any is left as it is."""
        if self.out is not None and self._new_store:
            for name in ("store.json", "run.json", "overlays", "shards"):
                path = self.out / name
                if path.is_dir() and not any(path.iterdir()):
                    path.rmdir()
                elif path.is_file():
                    path.unlink()
            if self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
        log_dir = Path(self._log_dir) if self._log_dir else None
        if log_dir is None or not log_dir.is_dir() or not log_dir.name.startswith("version_"):
            return
        entries = list(log_dir.iterdir())
        mine = f".{socket.gethostname()}.{os.getpid()}."  # events.out.tfevents.<time>.<host>.<pid>.<n>
        own = all(
            e.is_file()
            and not e.is_symlink()
            and (
                e.name in ("config.yaml", "hparams.yaml")
                or (e.name.startswith("events.out.tfevents.") and mine in e.name)
            )
            and e.stat().st_mtime >= self._created - 1.0
            for e in entries
        )
        if own:
            for entry in entries:
                entry.unlink()
            log_dir.rmdir()
            if not any(log_dir.parent.iterdir()):  # e.g. lightning_logs/ made by this run's logger
                log_dir.parent.rmdir()
            log.info("MaskWriter: the run failed before its first result; removed its empty folder %s", log_dir)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._writer is not None and stage in _STAGES:
            # Ended normally without on_predict_end/on_test_end: Lightning skips the loop when no sample is
            # left to explain. Merge and record as usual.
            self._finish(trainer, pl_module)
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        trainer.strategy.barrier("MaskWriter.finish")
        if trainer.is_global_zero:
            report = merge_index(self.out, columns=MANIFEST_COLUMNS)
            statuses: Counter[str] = Counter()
            with load_results(self.out) as results:
                sanity = sanity_report(_tally(results.rows(), statuses))
            counts = {"explained": statuses["ok"], "skipped": statuses["skipped"]}
            self._counts = counts
            self._write_run_record(trainer, pl_module, counts=counts, sanity=sanity)
            if sanity["warnings"]:
                warnings = "\n- ".join(sanity["warnings"])
                rank_zero_warn(f"MaskWriter: sanity checks (run.json 'sanity', manifest.csv 'flags'):\n- {warnings}")
            self._release_lock()
            if self.analyze and self._stopped is None:
                self._analyze()
            if report.bad:
                log.warning("MaskWriter: %d damaged shard(s) ignored; rerun to redo their samples", len(report.bad))
            log.info("MaskWriter: %d explained, %d skipped, written to %s", *counts.values(), self.out)
        trainer.strategy.barrier("MaskWriter.merged")  # no rank leaves while rank 0 still merges

    def _analyze(self) -> None:
        """The strategies in the complete store (rank 0); a failure is a warning, never the job's."""
        from neuromask_pl.analysis import analyze

        options = {"tensorboard": self._log_dir or False, **(self.analyze if isinstance(self.analyze, dict) else {})}
        try:
            self.analysis = analyze(self.out, **options)
        except Exception as err:  # noqa: BLE001 - the explanations are written; the analysis can be redone
            rank_zero_warn(
                f"MaskWriter: the analysis failed ({type(err).__name__}: {err}); the explanations are complete, "
                f"run it again with: neuromask-pl analyze {self.out}"
            )
            return
        suspicious = self.analysis.suspicious()
        log.info(
            "MaskWriter: analysis of %d masks written to %s; %d suspicious cluster(s)%s",
            len(self.analysis.table), self.analysis.output_dir, len(suspicious),
            "".join(f"\n  class {c['target_name']} cluster {c['cluster']}: {c['size']} images, suspicion "
                    f"{c['suspicion']:.2f}" for c in suspicious[:5]),
        )  # fmt: skip

    # -- writing ---------------------------------------------------------------------------------
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Store the masks and manifest rows of one batch and write its overlays."""
        if self._writer is None:
            return
        batch = batch if isinstance(batch, dict) else {}
        if isinstance(prediction, Explanation) and len(prediction):
            exp = prediction.cpu()
            images = exp.images if exp.images is not None else batch.get("image")
            for i, record in enumerate(exp.records(getattr(pl_module, "class_names", None))):
                sample_id = record["sample_id"]
                overlay, ok = "", record["status"] == "ok"
                if self.write_overlays and images is not None and ok:
                    overlay = f"overlays/{sample_id:08d}.png"
                    with reporting_write_errors(f"the overlay '{self.out / overlay}'"):
                        panel = captioned_panel(images[i].cpu(), exp.masks[i], **_caption(record))
                        save_png(panel, self.out / overlay)
                mask = exp.masks[i, 0].to(torch.float16).numpy() if ok else None
                fingerprint = source_fingerprint(record["path"]) if record["path"] else None
                self._writer.add(sample_id, mask, {**record, "overlay_file": overlay}, fingerprint=fingerprint)
                self._written += 1
        skipped = prediction.skipped if isinstance(prediction, Explanation) else batch.get("skipped", [])
        for s in skipped:
            path, error = s.get("path", ""), s.get("error", "")
            log.warning("Skipped sample %s (%s): %s", s["index"], path, error)
            fingerprint = source_fingerprint(path) if path else None
            self._writer.add(
                int(s["index"]), None, {"status": "skipped", "path": path, "error": error}, fingerprint=fingerprint
            )
            self._written += 1
        self._stop_on_sigterm(trainer, pl_module)

    def _stop_on_sigterm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a batch is stored: on SIGTERM (a scheduler's preemption, ``kill``), finish the store (shards,
        manifest, index, run record; lock released) and stop the job with exit status 143 (128 + SIGTERM).

        Lightning's handler only notes the signal (its predict loop never stops on it). During the last batch the
        job simply ends as usual. With several processes each stops after its own batch without waiting for the
        others (their batches differ in number): each keeps its shards, and the same command run again merges them
        and goes on.
        """
        if not getattr(trainer, "received_sigterm", False) or self._writer is None or _on_last_batch(trainer):
            return
        self._stopped = "SIGTERM"
        log.warning(
            "MaskWriter: SIGTERM received; the results so far are written to %s, then the job stops "
            "(run the same command again to go on)",
            self.out,
        )
        if trainer.world_size == 1:
            self._finish(trainer, pl_module)
        else:
            self._writer.close()
            self._writer = None
            self._release_lock()
        raise SIGTERMException(128 + signal.SIGTERM)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.write_on_batch_end(trainer, pl_module, outputs, None, batch, batch_idx, dataloader_idx)

    def _write_run_record(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, counts: dict | None, sanity: dict | None = None
    ) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        config = Path(self._log_dir) / "config.yaml" if self._log_dir else None
        record = {
            "stage": self._stage,
            "output_dir": str(self.out),
            "started": self._started,
            "finished": utc_now() if counts is not None else None,
            "counts": counts,
            "stopped": self._stopped,
            "sanity": sanity,
            "hparams": dict(pl_module.hparams),
            "datamodule_hparams": dict(datamodule.hparams) if datamodule is not None else None,
            "class_to_idx": getattr(datamodule, "class_to_idx", None),
            "fast_path": getattr(pl_module, "fast_path_report", None) if counts is not None else None,
            "cli_config": config.read_text(encoding="utf-8") if config is not None and config.is_file() else None,
            "trainer": {
                "precision": str(trainer.precision),
                "accelerator": type(trainer.accelerator).__name__,
                "strategy": type(trainer.strategy).__name__,
                "devices": trainer.num_devices,
                "num_nodes": trainer.num_nodes,
                "world_size": trainer.world_size,
            },
            "versions": package_versions(_VERSIONED),
            "classifier": describe_classifier(pl_module.classifier) if hasattr(pl_module, "classifier") else None,
        }
        with reporting_write_errors(f"the run record '{self.out / 'run.json'}'"):
            with atomic_write(self.out / "run.json", "w", fsync=True) as f:
                json.dump(record, f, indent=2, default=str)


def _caption(record: dict[str, Any]) -> dict[str, Any]:
    """What an overlay's caption says of its sample (:func:`neuromask_pl.viz.caption`): the class, its probability
    before and after masking, the mask's area."""
    label = record.get("target_name") or (f"class {record['target']}" if record.get("target") is not None else None)
    keys = ("prob_original", "prob_masked", "mask_area")
    return {"label": label, **{k: record.get(k) for k in keys}}


def _tally(rows: Iterable[dict[str, Any]], statuses: Counter[str]) -> Iterator[dict[str, Any]]:
    """The rows, one at a time, counting their statuses on the way."""
    for row in rows:
        statuses[row.get("status")] += 1
        yield row


def _exclusions(datamodule: Any, done: set[int], world_size: int) -> set[int]:
    """The done ids to skip, leaving every rank at least one sample: Lightning's DDP predict sampler
    cannot give a rank nothing, so with fewer missing samples than ranks a few done ones are redone."""
    if world_size == 1 or not done or not hasattr(datamodule, "sample_ids"):
        return set(done)
    ids = datamodule.sample_ids()
    missing = sum(1 for i in ids if i not in done)
    if missing >= world_size:
        return set(done)
    redo = set(sorted(i for i in ids if i in done)[: world_size - missing])
    return set(done) - redo


def _on_last_batch(trainer: pl.Trainer) -> bool:
    """Whether the predict or test loop is at its last batch."""
    loop = getattr(trainer, "predict_loop" if trainer.predicting else "test_loop", None)
    return bool(getattr(getattr(loop, "batch_progress", None), "is_last_batch", False))


def _rebuild_error(message: str) -> Exception:
    """The exception a rank reported (``"Type: message"``), raised again on every rank."""
    name, _, text = message.partition(": ")
    kinds = {
        "ValueError": ValueError,
        "RuntimeError": RuntimeError,
        "FileNotFoundError": FileNotFoundError,
        "StoreWriteError": StoreWriteError,
    }
    return kinds.get(name, OSError)(text)
