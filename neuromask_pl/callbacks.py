"""Lightning callbacks that write and log explanations (all side effects of a run live here)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import platform
import random
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter, Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torchvision.utils import make_grid

from neuromask_pl.data import check_images, unpack_batch
from neuromask_pl.explanation import LOSS_TERMS, SUMMARY_KEYS, Explanation
from neuromask_pl.maths.fastpath import FastPath
from neuromask_pl.module import NeuroMask
from neuromask_pl.settings import SettingsOverrides, resolve_settings
from neuromask_pl.store import (
    ShardWriter,
    StoreLock,
    atomic_write,
    config_hash,
    load_results,
    merge_index,
    open_store,
    scan_shards,
)
from neuromask_pl.viz import explanation_panel, save_png, to_uint8

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "sample_id",
    "status",
    "path",
    "target",
    "target_name",
    "prob_original",
    "prob_masked",
    "preserved",
    "mask_area",
    "steps",
    *(f"loss_{term}" for term in LOSS_TERMS),
    "overlay_file",
    "error",
)
_STAGES = ("predict", "test")
_VERSIONED = ("torch", "torchvision", "pytorch_lightning", "torchmetrics", "numpy", "neuromask_pl")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", None) or importlib.metadata.version(
                name
            )
        except (ImportError, importlib.metadata.PackageNotFoundError):
            versions[name] = None
    return versions


def _describe_classifier(module: Any) -> dict[str, Any] | None:
    if module is None:
        return None
    try:
        from neuromask_pl.classifiers import describe_classifier
    except ImportError:
        return {"class": f"{type(module).__module__}.{type(module).__qualname__}"}
    return describe_classifier(module)


# DataModule settings that change how samples are loaded but never a mask (left out of the config hash).
_LOADING_ONLY = {"batch_size", "num_workers", "pin_memory"}


def explanation_config(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """What determines every mask of a run: NeuroMask settings, classifier file, data settings, precision."""
    datamodule = getattr(trainer, "datamodule", None)
    data = dict(datamodule.hparams) if datamodule is not None else {}
    fingerprint = getattr(datamodule, "fingerprint", None)
    module = getattr(pl_module, "classifier", None)
    classifier = _describe_classifier(module) or {}
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
        run.json                        configuration, trainer, versions, classifier, times, counts

    Read results with :func:`neuromask_pl.store.load_results`. Rerunning the same command on the same
    directory explains only the samples that are missing (matched by sample id; the configuration
    and model must be the same, else the run is refused unless ``overwrite=True``). Damaged or
    incomplete shards (a killed job, a full disk) are detected by checksum and redone. Two jobs on
    one directory at once are refused (``.lock``).

    Args:
        output_dir: where to write; None means ``<trainer.log_dir>/explanations``.
        write_overlays: also write the overlay PNGs (needs the images in the Explanation or batch).
        chunk_size: samples per shard file.
        overwrite: replace the results of another configuration in ``output_dir``.
    """

    def __init__(
        self, output_dir: str | None = None, write_overlays: bool = True, chunk_size: int = 256, overwrite: bool = False
    ) -> None:
        super().__init__(write_interval="batch")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.output_dir = output_dir
        self.write_overlays = write_overlays
        self.chunk_size = chunk_size
        self.overwrite = overwrite
        self.out: Path | None = None  # resolved at setup
        self._writer: ShardWriter | None = None
        self._lock: StoreLock | None = None
        self._log_dir: str | None = None
        self._stage = ""
        self._started = ""
        self.resumed_ids: set[int] = set()

    # -- lifecycle -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the folder, lock and open the store, find what is already done, start this rank's shards."""
        super().setup(trainer, pl_module, stage)
        if stage not in _STAGES:
            return
        self._log_dir = trainer.log_dir if trainer.loggers else None  # log_dir must be read on every rank
        default = Path(self._log_dir or Path(trainer.default_root_dir) / "lightning_logs") / "explanations"
        self.out = Path(self.output_dir) if self.output_dir is not None else default
        self._stage, self._started = stage, _now()
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
        self._lock.acquire()
        try:
            open_store(self.out, config_hash(explanation_config(trainer, pl_module)), overwrite=self.overwrite)
            scan = scan_shards(self.out, verify=True, clean=True)
            scan.delete_bad()
            if self.write_overlays:
                (self.out / "overlays").mkdir(exist_ok=True)
            self._write_run_record(trainer, pl_module, counts=None)
        except BaseException:
            self._release_lock()
            raise
        session = f"{time.time_ns():020d}{secrets.token_hex(4)}"  # later runs sort later (store: later wins)
        return [int(i) for i in scan.mask_ids], session

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
        """Keep what is finished: write the buffered samples as a last shard (redone if damaged)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as err:  # noqa: BLE001 - the original exception matters more
                log.warning("MaskWriter: could not write the last buffered samples: %s", err)
                self._writer.abort()
            self._writer = None
        self._release_lock()

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
            with load_results(self.out) as results:
                statuses = [row.get("status") for row in results.rows]
            counts = {"explained": statuses.count("ok"), "skipped": statuses.count("skipped")}
            self._write_run_record(trainer, pl_module, counts=counts)
            self._release_lock()
            if report.bad:
                log.warning("MaskWriter: %d damaged shard(s) ignored; rerun to redo their samples", len(report.bad))
            log.info("MaskWriter: %d explained, %d skipped, written to %s", *counts.values(), self.out)
        trainer.strategy.barrier("MaskWriter.merged")  # no rank leaves while rank 0 still merges

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
                overlay = ""
                if self.write_overlays and images is not None:
                    overlay = f"overlays/{sample_id:08d}.png"
                    save_png(explanation_panel(images[i].cpu(), exp.masks[i]), self.out / overlay)
                row = {**record, "status": "ok", "overlay_file": overlay}
                self._writer.add(sample_id, exp.masks[i, 0].to(torch.float16).numpy(), row)
        skipped = prediction.skipped if isinstance(prediction, Explanation) else batch.get("skipped", [])
        for s in skipped:
            path, error = s.get("path", ""), s.get("error", "")
            log.warning("Skipped sample %s (%s): %s", s["index"], path, error)
            self._writer.add(int(s["index"]), None, {"status": "skipped", "path": path, "error": error})

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

    def _write_run_record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, counts: dict | None) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        config = Path(self._log_dir) / "config.yaml" if self._log_dir else None
        record = {
            "stage": self._stage,
            "output_dir": str(self.out),
            "started": self._started,
            "finished": _now() if counts is not None else None,
            "counts": counts,
            "hparams": dict(pl_module.hparams),
            "datamodule_hparams": dict(datamodule.hparams) if datamodule is not None else None,
            "cli_config": config.read_text(encoding="utf-8") if config is not None and config.is_file() else None,
            "trainer": {
                "precision": str(trainer.precision),
                "accelerator": type(trainer.accelerator).__name__,
                "strategy": type(trainer.strategy).__name__,
                "devices": trainer.num_devices,
                "num_nodes": trainer.num_nodes,
                "world_size": trainer.world_size,
            },
            "versions": _versions(),
            "classifier": _describe_classifier(getattr(pl_module, "classifier", None)),
        }
        with atomic_write(self.out / "run.json", "w", fsync=True) as f:
            json.dump(record, f, indent=2, default=str)


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


def _rebuild_error(message: str) -> Exception:
    """The exception a rank reported (``"Type: message"``), raised again on every rank."""
    name, _, text = message.partition(": ")
    kinds = {"ValueError": ValueError, "RuntimeError": RuntimeError, "FileNotFoundError": FileNotFoundError}
    return kinds.get(name, OSError)(text)


class ExplanationLogger(Callback):
    """Log batch summaries (scalars ``explain/<name>``) and a grid of explanation panels to the logger.

    Works in the predict and test stages and does nothing without a logger. Per batch, global
    rank 0 logs its own batch's scalars and images (``explain/overlays``, when the logger's
    experiment has ``add_image``, e.g. TensorBoard); the step is the running count of batches it
    has seen. At the end of the stage, the run's totals over every rank (sample-weighted means,
    all-reduced) are logged once as ``explain/run/<name>`` plus ``explain/run/samples``.

    Args:
        max_images: at most this many panels per logged batch (0 disables images).
        log_every_n_batches: log one batch in this many.
    """

    def __init__(self, max_images: int = 8, log_every_n_batches: int = 1) -> None:
        if max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}")
        if log_every_n_batches < 1:
            raise ValueError(f"log_every_n_batches must be >= 1, got {log_every_n_batches}")
        self.max_images = max_images
        self.log_every_n_batches = log_every_n_batches
        self._batches = 0
        self._totals: dict[str, float] = {}  # sample-weighted sums of the summaries, this rank
        self._samples = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_totals(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_totals(trainer)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._totals, self._samples = {}, 0
        self._log_hparams(trainer, pl_module)

    def _log_totals(self, trainer: pl.Trainer) -> None:
        """All-reduce the sample-weighted sums over the ranks (every rank must call) and log the means."""
        names = SUMMARY_KEYS  # the same fixed order on every rank, even one that saw no sample
        local = torch.tensor([self._totals.get(n, 0.0) for n in names] + [self._samples], dtype=torch.float64)
        total = trainer.strategy.reduce(local.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        samples = float(total[-1])
        if not trainer.is_global_zero or not trainer.loggers or samples == 0:
            return
        metrics = {f"explain/run/{n}": float(v) / samples for n, v in zip(names, total[:-1].tolist())}
        metrics["explain/run/samples"] = samples
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._batches)

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._log_batch(trainer, outputs, batch)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._log_batch(trainer, outputs, batch)

    @rank_zero_only
    def _log_hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        autologged = trainer.enable_autolog_hparams and getattr(pl_module, "_log_hyperparams", True)
        if trainer.loggers and pl_module.hparams and not autologged:
            for logger in trainer.loggers:
                logger.log_hyperparams(pl_module.hparams)

    def _log_batch(self, trainer: pl.Trainer, outputs: Any, batch: Any) -> None:
        step = self._batches
        self._batches += 1
        if not isinstance(outputs, Explanation) or len(outputs) == 0:  # e.g. every sample unreadable
            return
        summary = outputs.summary()
        for name, value in summary.items():
            self._totals[name] = self._totals.get(name, 0.0) + value * len(outputs)
        self._samples += len(outputs)
        if not trainer.is_global_zero or not trainer.loggers or step % self.log_every_n_batches:
            return
        metrics = {f"explain/{name}": value for name, value in summary.items()}
        grid = self._grid(outputs, batch)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if grid is not None and hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("explain/overlays", grid, global_step=step)

    def _grid(self, exp: Explanation, batch: Any) -> torch.Tensor | None:
        """Up to ``max_images`` explanation panels stacked vertically, or None without images."""
        images = exp.images if exp.images is not None else (batch.get("image") if isinstance(batch, dict) else None)
        n = min(self.max_images, len(exp))
        if images is None or n == 0:
            return None
        panels = [explanation_panel(images[i].cpu(), exp.masks[i].cpu()) for i in range(n)]
        return make_grid(panels, nrow=1, padding=2, pad_value=1.0)


@contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and every initialised CUDA device) random states on exit."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextmanager
def gradients_enabled() -> Iterator[None]:
    """Leave ``torch.inference_mode`` and enable autograd.

    During ``trainer.fit`` Lightning validates under ``torch.no_grad``; ``trainer.validate`` runs under
    ``torch.inference_mode`` unless the Trainer was built with ``inference_mode=False``.
    """
    with ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        yield


def overlay_grid(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """One explanation panel per image (original | heat-map overlay | image * mask), stacked vertically."""
    panels = [explanation_panel(image.cpu(), mask.cpu()) for image, mask in zip(images, masks)]
    return make_grid(panels, nrow=1, padding=2, pad_value=1.0)


class ExplainDuringTraining(Callback):
    """Explain a fixed set of validation images with the current weights while a model trains.

    At the end of validation, every ``every_n_epochs`` epochs, the images are explained with
    :class:`~neuromask_pl.module.NeuroMask` (on the module's device) and, on global rank 0,
    logged at ``trainer.global_step`` to every logger of the Trainer:

    * scalars ``<log_prefix>/<name>`` for each entry of :meth:`Explanation.summary` (loss terms,
      ``mask_area``, ``preservation_rate``, ``prob_original``, ``prob_masked``) and
      ``<log_prefix>/seconds`` (the time the explanation took), through ``logger.log_metrics``;
    * one image ``<log_prefix>/overlays``, a column of panels (original | mask heat map | image * mask):
      ``logger.log_image(key=..., images=[H x W x 3 uint8 array], step=...)`` for loggers that have
      ``log_image`` (e.g. ``WandbLogger``), else ``logger.experiment.add_image`` (TensorBoard).

    The images are the first ``num_images`` of the first validation dataloader, taken as the
    batches pass during the first validation after the sanity check (so a shuffled validation
    loader gives a different set per run), and kept on the CPU; or the ``images`` given.
    Each image is explained for its predicted class.

    Training is left exactly as it would be without the callback: weights, BatchNorm statistics,
    optimizer state, parameter gradients, ``training`` and ``requires_grad`` flags, and the Python,
    NumPy and torch (CPU and CUDA) random states are the same afterwards. Cost per call: about
    ``steps`` forward and backward passes of the model on ``num_images`` images, on global rank 0
    only (with several processes the other ranks wait for it at their next synchronisation).

    Args:
        num_images: how many validation images to collect (ignored when ``images`` is given).
        every_n_epochs: explain at the end of validation in epochs ``n-1, 2n-1, ...`` (0-based).
        preset, steps, settings, seed, target_class, fast_path: as for :class:`~neuromask_pl.NeuroMask`
            (``steps`` defaults to 100 here, a quick look each epoch).
        model_attribute: dotted attribute of the LightningModule to explain (e.g. ``"model"`` or
            ``"net.backbone"``); by default the LightningModule itself. Either way its forward must
            map [0, 1] images B x C x H x W to logits B x K.
        output_dir: also write each call's panels as ``<output_dir>/overlays_epoch<k>.png``.
        images: explain these images (B x C x H x W in [0, 1]) instead of collecting validation images.
        log_prefix: prefix of the logged names.
    """

    def __init__(
        self,
        num_images: int = 8,
        every_n_epochs: int = 1,
        preset: str = "default",
        steps: int = 100,
        settings: SettingsOverrides | None = None,
        seed: int = 0,
        target_class: int | None = None,
        fast_path: FastPath | None = None,
        model_attribute: str | None = None,
        output_dir: str | Path | None = None,
        images: torch.Tensor | None = None,
        log_prefix: str = "explain_train",
    ) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if target_class is not None and (not isinstance(target_class, int) or target_class < 0):
            raise ValueError(f"target_class must be a class index >= 0, got {target_class!r}")
        # Fail now, not after the first epoch, on a bad preset or setting.
        self.explainer_args = {
            "preset": preset,
            "settings": resolve_settings(preset, steps, settings),
            "seed": seed,
            "target_class": target_class,
            "fast_path": FastPath.of(fast_path),
        }
        if images is not None:
            try:
                images = check_images(images).detach().to("cpu", copy=True)
            except (TypeError, ValueError) as error:
                raise type(error)(f"ExplainDuringTraining(images=...): {error}") from error
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.model_attribute = model_attribute
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.log_prefix = log_prefix
        self.images: torch.Tensor | None = images  # the fixed set, on the CPU, once known
        self.last_explanation: Explanation | None = None  # on the CPU, global rank 0 only
        self.last_seconds: float | None = None
        self.last_epoch: int | None = None  # trainer.current_epoch of the last call made under a Trainer
        self._collected: list[torch.Tensor] = []

    # -- collecting the fixed images -----------------------------------------------------------------
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.images is not None or dataloader_idx != 0 or not trainer.is_global_zero:
            return
        images = unpack_batch(batch)[0]
        if trainer.sanity_checking:  # not collected, but checked, so bad images stop the run before training
            if batch_idx == 0:
                self._check_validation_images(images)
            return
        missing = self.num_images - sum(len(chunk) for chunk in self._collected)
        if missing > 0 and len(images):
            self._collected.append(self._check_validation_images(images[:missing]).detach().to("cpu", copy=True))

    @staticmethod
    def _check_validation_images(images: Any) -> torch.Tensor:
        try:
            return check_images(images)
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"ExplainDuringTraining cannot use the validation images: {error}. "
                "Pass ExplainDuringTraining(images=...) with B x C x H x W images in [0, 1] instead."
            ) from error

    # -- explaining and logging ----------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if self.images is None:
            if not self._collected:
                log.warning("ExplainDuringTraining: no validation images were seen; nothing to explain")
                return
            with torch.inference_mode(False):  # a normal tensor, even if the batches were inference tensors
                self.images = torch.cat(self._collected).clone()
            self._collected = []
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.explain(pl_module, trainer)

    def explain(self, pl_module: pl.LightningModule, trainer: pl.Trainer | None = None) -> Explanation:
        """Explain the fixed images with ``pl_module``'s current weights; log them when ``trainer`` has loggers.

        Usable outside a Trainer too (after the images are known); returns the Explanation on the CPU.
        """
        if self.images is None:
            raise ValueError(
                "ExplainDuringTraining has no images yet: they are collected during the first validation, "
                "or pass ExplainDuringTraining(images=...)"
            )
        classifier = self._classifier(pl_module)
        start = time.perf_counter()
        with preserved_rng_state(), gradients_enabled():
            images = self.images.clone()  # never an inference tensor
            explainer = NeuroMask(classifier, **self.explainer_args)
            explanation = explainer.explain(images).cpu()
        self.last_seconds = time.perf_counter() - start
        self.last_explanation = explanation
        if trainer is not None:
            self._log(trainer, explanation)
        return explanation

    def _classifier(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        if self.model_attribute is None:
            return pl_module
        module: Any = pl_module
        for name in self.model_attribute.split("."):
            if not hasattr(module, name):
                raise ValueError(
                    f"ExplainDuringTraining(model_attribute={self.model_attribute!r}): "
                    f"{type(module).__name__} has no attribute {name!r}; name the classifier inside your "
                    "LightningModule with a dotted attribute path, or None for the module itself"
                )
            module = getattr(module, name)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(
                f"ExplainDuringTraining(model_attribute={self.model_attribute!r}) is a {type(module).__name__}, "
                "not a torch.nn.Module"
            )
        return module

    def _log(self, trainer: pl.Trainer, explanation: Explanation) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        self.last_epoch = epoch
        log.info(
            "ExplainDuringTraining: %d images explained at epoch %d (step %d) in %.2f s",
            len(explanation),
            epoch,
            step,
            self.last_seconds,
        )
        grid = overlay_grid(self.images, explanation.masks)
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_png(grid, self.output_dir / f"overlays_epoch{epoch}.png")
        metrics = {f"{self.log_prefix}/{name}": value for name, value in explanation.summary().items()}
        metrics[f"{self.log_prefix}/seconds"] = float(self.last_seconds or 0.0)
        tag = f"{self.log_prefix}/overlays"
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if callable(getattr(logger, "log_image", None)):
                logger.log_image(key=tag, images=[to_uint8(grid)], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):
                logger.experiment.add_image(tag, grid, global_step=step)
