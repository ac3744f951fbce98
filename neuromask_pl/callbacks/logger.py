"""ExplanationLogger: batch summaries and explanation panels to the Trainer's loggers (TensorBoard)."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only

from neuromask_pl.explanation import FLAGS, ONE_CLASS_MIN_SAMPLES, SUMMARY_KEYS, Explanation, sanity_warnings
from neuromask_pl.viz import panel_grid


class ExplanationLogger(Callback):
    """Log batch summaries (scalars ``explain/<name>``) and a grid of explanation panels to the logger.

    Works in the predict and test stages and does nothing without a logger. Per batch, global
    rank 0 logs its own batch's scalars and images (``explain/overlays``, when the logger's
    experiment has ``add_image``, e.g. TensorBoard); the step is the running count of batches it
    has seen. At the end of the stage, the run's totals over every rank (sample-weighted means,
    all-reduced) are logged once as ``explain/run/<name>`` plus ``explain/run/samples``.

    Sanity checks (:data:`~neuromask_pl.explanation.FLAGS`): per batch the share of its explained samples that
    carry each flag, ``explain/flags/<flag>``; at the end the same over the run, ``explain/run/flags/<flag>``,
    ``explain/run/one_class`` (1 when every image of the run, at least
    :data:`~neuromask_pl.explanation.ONE_CLASS_MIN_SAMPLES` of them, is predicted as one class) and, when the
    logger's experiment has ``add_text`` (TensorBoard's Text tab), the warnings as text ``explain/sanity``.

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
        self._flags = dict.fromkeys(FLAGS, 0)  # samples with each sanity flag, this rank
        self._explained = 0  # samples that did not fail, this rank
        self._predicted = [math.inf, -math.inf]  # the smallest and largest class predicted, this rank

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
        self._flags, self._explained, self._predicted = dict.fromkeys(FLAGS, 0), 0, [math.inf, -math.inf]
        self._log_hparams(trainer, pl_module)

    def _log_totals(self, trainer: pl.Trainer) -> None:
        """All-reduce the sample-weighted sums over the ranks (every rank must call) and log the means."""
        names = SUMMARY_KEYS  # the same fixed order on every rank, even one that saw no sample
        counts = [*(self._totals.get(n, 0.0) for n in names), *self._flags.values(), self._explained, self._samples]
        local = torch.tensor(counts, dtype=torch.float64)
        total = trainer.strategy.reduce(local.to(trainer.strategy.root_device), reduce_op="sum").cpu().tolist()
        extremes = torch.tensor(self._predicted, dtype=torch.float64, device=trainer.strategy.root_device)
        extremes = trainer.strategy.all_gather(extremes).cpu().reshape(-1, 2)  # every rank's (min, max) class
        samples, explained = float(total[-1]), int(total[-2])
        if not trainer.is_global_zero or not trainer.loggers or samples == 0:
            return
        metrics = {f"explain/run/{n}": float(v) / samples for n, v in zip(names, total)}
        metrics["explain/run/samples"] = samples
        flags = {name: int(v) for name, v in zip(FLAGS, total[len(names) :])}
        low, high = float(extremes[:, 0].min()), float(extremes[:, 1].max())
        one_class = int(low) if low == high else None
        if explained:
            metrics |= {f"explain/run/flags/{name}": count / explained for name, count in flags.items()}
            metrics["explain/run/one_class"] = float(one_class is not None and explained >= ONE_CLASS_MIN_SAMPLES)
        report = getattr(trainer.lightning_module, "fast_path_report", None) or {}
        for key in ("folded_batchnorm", "batchnorm_layers", "packed_convolutions", "convolutions"):
            if isinstance(report.get(key), int):
                metrics[f"explain/fast_path/{key}"] = float(report[key])
        for key in ("batch_invariant", "replaced_layers_ran"):
            if isinstance(report.get(key), bool):
                metrics[f"explain/fast_path/{key}"] = float(report[key])
        if report.get("mask_gradient"):  # 1: the mask gradient written out (maths/explicit.py), 0: by autograd
            metrics["explain/fast_path/explicit_mask_gradient"] = float(report["mask_gradient"] == "explicit")
        names = getattr(trainer.lightning_module, "class_names", None) or []
        name = names[one_class] if one_class is not None and 0 <= one_class < len(names) else ""
        warnings = sanity_warnings(explained, flags, one_class, str(name))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._batches)
            if warnings and hasattr(logger.experiment, "add_text"):
                text = "\n".join(f"- {line}" for line in warnings)  # markdown: one item per warning
                logger.experiment.add_text("explain/sanity", text, global_step=self._batches)

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
        flags, explained = outputs.flag_counts(), int(outputs.ok.sum())
        for name, count in flags.items():
            self._flags[name] += count
        self._explained += explained
        if outputs.predicted is not None and explained:
            predicted = outputs.predicted.cpu()[outputs.ok]
            self._predicted = [
                min(self._predicted[0], int(predicted.min())),
                max(self._predicted[1], int(predicted.max())),
            ]
        if not trainer.is_global_zero or not trainer.loggers or step % self.log_every_n_batches:
            return
        metrics = {f"explain/{name}": value for name, value in summary.items()}
        if explained:
            metrics |= {f"explain/flags/{name}": count / explained for name, count in flags.items()}
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
        return panel_grid(images[:n], exp.masks[:n])
