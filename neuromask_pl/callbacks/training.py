"""ExplainDuringTraining: explain fixed validation images with the current weights while a model trains."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from neuromask_pl.classifiers import Normalize, submodule
from neuromask_pl.data import check_images, unpack_batch
from neuromask_pl.data.checks import device_of
from neuromask_pl.explainer import Explainer
from neuromask_pl.explanation import Explanation
from neuromask_pl.fastcopy import FastPath
from neuromask_pl.maths.explicit import MaskGradient
from neuromask_pl.settings import SettingsOverrides
from neuromask_pl.viz import panel_grid, save_png, to_uint8

log = logging.getLogger(__name__)


def _close_to_unit(pixels: torch.Tensor) -> bool:
    """Whether un-normalised images are [0, 1] pixels up to float rounding, so clamping changes nothing real:
    ``x * std + mean`` rounds twice, each within 2**-24 of values below 10 in size (about 1.2e-6 in all)."""
    return bool(pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5)


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


class ExplainDuringTraining(Callback):
    """Explain a fixed set of validation images with the current weights while a model trains.

    At the end of validation, every ``every_n_epochs`` epochs, the images are explained with
    :class:`~neuromask_pl.explainer.Explainer` (on the module's device) and, on global rank 0,
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
    Each image is explained for its predicted class. Validation data normalised by the DataModule
    (``(x - mean) / std``) is un-normalised with ``mean`` and ``std``, and the normalisation is put inside
    the classifier that is explained, so masks act on [0, 1] pixels.

    The module (or ``model_attribute``) runs as the fast copy :meth:`Explainer.explain` runs (BatchNorm folded,
    layers packed), built from the module's own layers and sharing its tensors: nothing is deep-copied, so a module
    holding metrics or a Trainer works, and the module itself is never changed (``fast_path=FastPath.off()`` explains
    it as it is).

    Training is left exactly as it would be without the callback: weights, BatchNorm statistics,
    optimizer state, parameter gradients, ``training`` and ``requires_grad`` flags, and the Python,
    NumPy and torch (CPU and CUDA) random states are the same afterwards. Cost per call: about
    ``steps`` forward and backward passes of the model on ``num_images`` images, on global rank 0
    only (with several processes the other ranks wait for it at their next synchronisation).

    Args:
        num_images: how many validation images to collect (ignored when ``images`` is given).
        every_n_epochs: explain at the end of validation in epochs ``n-1, 2n-1, ...`` (0-based).
        preset, steps, settings, seed, target_class, mask_gradient: as for :class:`~neuromask_pl.Explainer`
            (``steps`` defaults to 100 here, a quick look each epoch).
        fast_path: as for the Explainer (by default its fast copy: BatchNorm folded, layers packed, built from the
            module's own layers without deep-copying it, so modules holding metrics or a Trainer work too).
        mean, std: the normalisation the validation images carry (one number, or one per channel, e.g.
            MNIST's ``0.1307`` and ``0.3081``); None when they are [0, 1] pixels.
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
        mask_gradient: MaskGradient = "auto",
        model_attribute: str | None = None,
        output_dir: str | Path | None = None,
        images: torch.Tensor | None = None,
        log_prefix: str = "explain_train",
        mean: float | list[float] | None = None,
        std: float | list[float] | None = None,
    ) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        # Built now, so a bad preset or setting fails here, not after the first epoch; the module is given per call.
        self.explainer = Explainer(torch.nn.Identity(), preset, steps, settings, seed, target_class, fast_path,
                                   mask_gradient)  # fmt: skip
        self.normalize = Normalize(mean, std)
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
        images = self._pixels(unpack_batch(batch)[0])
        if trainer.sanity_checking:  # not collected, but checked, so bad images stop the run before training
            if batch_idx == 0:
                self._check_validation_images(images)
            return
        missing = self.num_images - sum(len(chunk) for chunk in self._collected)
        if missing > 0 and len(images):
            self._collected.append(self._check_validation_images(images[:missing]).detach().to("cpu", copy=True))

    def _pixels(self, images: Any) -> Any:
        """Validation images back in [0, 1] pixel space (un-normalised with ``mean`` and ``std``)."""
        if not self.normalize.enabled or not isinstance(images, torch.Tensor) or not images.is_floating_point():
            return images
        norm = self.normalize.to(images.device)
        pixels = images * norm.std + norm.mean
        return pixels.clamp(0.0, 1.0) if _close_to_unit(pixels) else pixels

    def _check_validation_images(self, images: Any) -> torch.Tensor:
        try:
            return check_images(images)
        except (TypeError, ValueError) as error:
            hint = (
                "Check that mean and std are the normalisation of the validation data"
                if self.normalize.enabled
                else "Pass ExplainDuringTraining(mean=..., std=...) with the normalisation of the validation data "
                "(e.g. mean=0.1307, std=0.3081 for MNIST), or images=... with B x C x H x W images in [0, 1]"
            )
            raise type(error)(f"ExplainDuringTraining cannot use the validation images: {error}. {hint}.") from error

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
        if self.normalize.enabled:  # a wrapper holding a reference to the module, not a copy
            device = device_of(classifier, self.images.device)
            classifier = torch.nn.Sequential(self.normalize.to(device), classifier)
        start = time.perf_counter()
        with preserved_rng_state(), gradients_enabled():
            images = self.images.clone()  # never an inference tensor
            explanation = self.explainer.with_classifier(classifier).explain(images).cpu()
        self.last_seconds = time.perf_counter() - start
        self.last_explanation = explanation
        if trainer is not None:
            self._log(trainer, explanation)
        return explanation

    def _classifier(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        if self.model_attribute is None:
            return pl_module
        try:
            return submodule(pl_module, self.model_attribute)
        except (TypeError, ValueError) as error:
            raise type(error)(f"ExplainDuringTraining: {error}") from error

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
        grid = panel_grid(self.images, explanation.masks)
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
