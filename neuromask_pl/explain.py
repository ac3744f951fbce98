"""Plain functions that explain a folder of images, for projects that launch everything from Python or Hydra.

They build what the ``neuromask-pl`` CLI builds (a Trainer with ``inference_mode=False``, the MaskWriter and the
ExplanationLogger, an ImageFolderDataModule) and return where the results are::

    from neuromask_pl import explain_checkpoint, load_results

    out = explain_checkpoint("logs/train/checkpoints/last.ckpt", "src.models.mnist_module.MNISTLitModule",
                             "data/digits/", model_attribute="net", mean=0.1307, std=0.3081, image_size=28)
    with load_results(out) as results: ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from neuromask_pl.callbacks import ExplanationLogger, MaskWriter
from neuromask_pl.classifiers import LightningCheckpointClassifier
from neuromask_pl.data import ImageFolderDataModule
from neuromask_pl.data.checks import expected_channels
from neuromask_pl.module import NeuroMask


def explain_folder(
    classifier: nn.Module,
    root: str | os.PathLike[str],
    output_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: int | None = 224,
    resize: int | None = None,
    channels: int | None = None,
    batch_size: int = 8,
    num_workers: int = 0,
    overwrite: bool = False,
    default_root_dir: str | os.PathLike[str] = ".",
    trainer: dict[str, Any] | None = None,
    **explainer: Any,
) -> Path:
    """Explain every image under ``root`` for ``classifier``; returns the output folder (read it with
    :func:`~neuromask_pl.load_results`).

    ``explainer`` holds the arguments of :class:`~neuromask_pl.Explainer` (``preset``, ``steps``, ``settings``,
    ``seed``, ``target_class``, ``fast_path``, ``mask_gradient``).
    ``output_dir`` defaults to ``<default_root_dir>/lightning_logs/version_N/explanations`` (TensorBoard's events in
    ``version_N``); given, the events go to ``<output_dir>/tensorboard/version_N`` (``tensorboard --logdir
    <output_dir>``) unless ``trainer`` names a ``logger``; ``channels`` (the image
    channels the classifier takes, 1 or 3: images are read so) to the classifier's: its ``in_channels``, else its first
    convolution's, else its first Linear layer's for a network without convolutions, else 3; ``trainer`` holds more
    Trainer arguments (``accelerator``,
    ``devices``, ``precision``, ``logger``, ...). Rerunning on the same ``output_dir`` resumes.
    """
    module = NeuroMask(classifier, **explainer)  # first: a bad setting fails before any file is made
    channels = channels or expected_channels(classifier) or 3
    datamodule = ImageFolderDataModule(
        str(root), image_size=image_size, resize=resize, batch_size=batch_size, num_workers=num_workers,
        channels=channels,
    )  # fmt: skip
    writer = MaskWriter(str(output_dir) if output_dir is not None else None, overwrite=overwrite)
    options: dict[str, Any] = {
        "inference_mode": False,
        "default_root_dir": str(default_root_dir),
        "enable_model_summary": False,
        "callbacks": [writer, ExplanationLogger()],
    }
    if output_dir is not None:  # the events with the results, not in the current directory's lightning_logs
        options["logger"] = TensorBoardLogger(save_dir=str(output_dir), name="tensorboard")
    run = pl.Trainer(**{**options, **(trainer or {})})
    run.predict(module, datamodule=datamodule, return_predictions=False)
    return Path(writer.out)


def explain_checkpoint(
    checkpoint: str | os.PathLike[str],
    module_class: str | type,
    root: str | os.PathLike[str],
    output_dir: str | os.PathLike[str] | None = None,
    *,
    model_attribute: str | None = None,
    mean: float | list[float] | None = None,
    std: float | list[float] | None = None,
    in_channels: int | None = None,
    classifier: dict[str, Any] | None = None,
    **options: Any,
) -> Path:
    """Explain every image under ``root`` for the LightningModule saved in ``checkpoint`` (a ``.ckpt``).

    ``module_class`` is the LightningModule class (or its dotted name); ``model_attribute`` names the network
    inside it (e.g. ``"net"``); ``mean``/``std`` the normalisation the module expects, so masks act on [0, 1]
    pixels; ``in_channels`` the image channels the network takes (1 grey, 3 RGB; default: ``channels`` if given,
    else inferred, e.g. 1 from ``mean=0.1307``; images are read so); ``classifier`` more arguments of
    :class:`~neuromask_pl.classifiers.LightningCheckpointClassifier` (``trusted``, ``weights_only``,
    ``class_names``, ``output``). ``options`` are those of :func:`explain_folder`.
    """
    if isinstance(module_class, type):
        module_class = f"{module_class.__module__}.{module_class.__qualname__}"
    model = LightningCheckpointClassifier(
        module_class, str(checkpoint), model_attribute=model_attribute, mean=mean, std=std,
        in_channels=in_channels or options.get("channels"), **(classifier or {}),
    )  # fmt: skip
    return explain_folder(model, root, output_dir, **options)
