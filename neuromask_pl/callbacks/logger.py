"""ExplanationLogger: batch summaries and explanation panels to the Trainer's loggers (TensorBoard)."""

from __future__ import annotations

import math
import sys
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from neuromask_pl.explainer import StepBar
from neuromask_pl.explanation import FLAGS, ONE_CLASS_MIN_SAMPLES, SUMMARY_KEYS, Explanation, sanity_warnings
from neuromask_pl.viz import panel_grid


class ExplanationLogger(Callback):
    """Log batch summaries (scalars ``explain/<name>``) and a grid of explanation panels to the logger.

    Works in the predict and test stages and does nothing without a logger. Per batch, global
    rank 0 logs its own batch's scalars and images (``explain/overlays``, when the logger's
    experiment has ``add_image``, e.g. TensorBoard); the step is the running count of batches it
    has seen. At the end of the stage, the run's totals over every rank (sample-weighted means,
    all-reduced) are logged once as ``explain/run/<name>`` plus ``explain/run/samples``.

    The images are captioned panels (:func:`~neuromask_pl.viz.captioned_panel`): original | heat-map overlay |
    image * mask, with the class name, its probability before -> after masking, the mask area and the colour bar
    (bright = kept), for every explained sample of the logged batch (or the first ``max_images``; when that cap
    leaves images out, the log says so once), in a grid of about square shape.

    Sanity checks (:data:`~neuromask_pl.explanation.FLAGS`): per batch the share of its explained samples that
    carry each flag, ``explain/flags/<flag>``; at the end the same over the run, ``explain/run/flags/<flag>``,
    ``explain/run/one_class`` (1 when every image of the run, at least
    :data:`~neuromask_pl.explanation.ONE_CLASS_MIN_SAMPLES` of them, is predicted as one class) and, when the
    logger's experiment has ``add_text`` (TensorBoard's Text tab), the warnings as text ``explain/sanity``.

    Args:
        max_images: at most this many panels per logged batch (0 disables images); None: every explained sample
            of the batch (a grid of a batch of 256 at 224 px is about 60 MB of pixels: set a cap for large batches).
        log_every_n_batches: log one batch in this many.
        step_progress: while the Trainer shows its (tqdm) progress bar, a second bar below it shows the mask steps of
            the batch being explained, with an ETA (the explainer's ``progress``, unless already set).
    """

    def __init__(self, max_images: int | None = None, log_every_n_batches: int = 1, step_progress: bool = True) -> None:
        if max_images is not None and max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}")
        if log_every_n_batches < 1:
            raise ValueError(f"log_every_n_batches must be >= 1, got {log_every_n_batches}")
        self.max_images = max_images
        self.log_every_n_batches = log_every_n_batches
        self.step_progress = step_progress
        self._bar_on: Any = None  # the explainer whose step progress this callback set
        self._batches = 0
        self._totals: dict[str, float] = {}  # sample-weighted sums of the summaries, this rank
        self._samples = 0
        self._flags = dict.fromkeys(FLAGS, 0)  # samples with each sanity flag, this rank
        self._explained = 0  # samples that did not fail, this rank
        self._predicted = [math.inf, -math.inf]  # the smallest and largest class predicted, this rank
        self._capped = False  # the cap on images per batch has been reported

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_step_bar()
        self._log_totals(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_step_bar()
        self._log_totals(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_step_bar()

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._totals, self._samples = {}, 0
        self._flags, self._explained, self._predicted = dict.fromkeys(FLAGS, 0), 0, [math.inf, -math.inf]
        self._log_hparams(trainer, pl_module)
        self._start_step_bar(trainer, pl_module)

    def _start_step_bar(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Show the mask steps of each batch below the Trainer's tqdm bar (rank 0, the explainer's choice first)."""
        bar = trainer.progress_bar_callback
        explainer = getattr(pl_module, "explainer", None)
        if (
            not self.step_progress
            or not trainer.is_global_zero
            or bar is None
            or not getattr(bar, "is_enabled", False)
            or getattr(explainer, "progress", None) is not False
        ):
            return
        if hasattr(bar, "progress") and hasattr(bar, "refresh"):  # RichProgressBar: a task of its own display
            explainer.progress = _RichSteps(bar)
        else:  # TQDMProgressBar: a tqdm bar on the line below Lightning's
            position = 2 * int(getattr(bar, "process_position", 0)) + 1
            explainer.progress = StepBar("mask steps", position=position, file=sys.stdout)
        self._bar_on = explainer

    def _stop_step_bar(self) -> None:
        if self._bar_on is not None:
            if isinstance(self._bar_on.progress, (StepBar, _RichSteps)):
                self._bar_on.progress.close()
            self._bar_on.progress = False
            self._bar_on = None

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
        grid = self._grid(outputs, batch, getattr(trainer.lightning_module, "class_names", None))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if grid is not None and hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("explain/overlays", grid, global_step=step)

    def _grid(self, exp: Explanation, batch: Any, class_names: Any = None) -> torch.Tensor | None:
        """The captioned panels of the batch's explained samples (at most ``max_images``), or None without images."""
        images = exp.images if exp.images is not None else (batch.get("image") if isinstance(batch, dict) else None)
        if images is None or self.max_images == 0:
            return None
        records = exp.records(class_names)
        keep = [i for i, row in enumerate(records) if row["status"] == "ok"]
        if self.max_images is not None and len(keep) > self.max_images:
            if not self._capped:
                self._capped = True
                rank_zero_info(
                    f"ExplanationLogger: explain/overlays shows the first {self.max_images} of the {len(keep)} "
                    f"explained images of a logged batch (max_images={self.max_images}; None shows every one)"
                )
            keep = keep[: self.max_images]
        if not keep:
            return None
        captions = [_caption(records[i]) for i in keep]
        columns = max(1, round(math.sqrt(len(keep) / 3)))  # panels are about 3 wide for 1 high: a squarish grid
        index = torch.tensor(keep)
        return panel_grid(images.cpu()[index], exp.masks.cpu()[index], captions, columns=columns)


class _RichSteps:
    """The mask steps of the batch being explained as a task of Lightning's RichProgressBar (whose columns give the
    count, the elapsed and the remaining time), as an ``on_step(step, steps)`` function."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar
        self.task: Any = None
        self._last = 0

    def __call__(self, step: int, steps: int) -> None:
        progress = getattr(self.bar, "progress", None)
        if progress is None:  # the display is not started (yet)
            return
        if self.task is None:
            self.task = progress.add_task("mask steps", total=steps)
        elif step <= self._last:  # a new batch (or chunk)
            progress.reset(self.task, total=steps)
        self._last = step
        progress.update(self.task, completed=step)
        self.bar.refresh()

    def close(self) -> None:
        progress = getattr(self.bar, "progress", None)
        if self.task is not None and progress is not None:
            try:
                progress.remove_task(self.task)
            except KeyError:  # the display was rebuilt
                pass
        self.task, self._last = None, 0


def _caption(record: dict[str, Any]) -> dict[str, Any]:
    """What a panel's caption says (:func:`neuromask_pl.viz.caption`): class, probability before and after, area."""
    label = record.get("target_name") or (f"class {record['target']}" if record.get("target") is not None else None)
    return {"label": label, **{k: record.get(k) for k in ("prob_original", "prob_masked", "mask_area")}}
