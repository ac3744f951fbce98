"""Command line: ``neuromask-pl predict|test --config ...`` on Lightning's LightningCLI."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from jsonargparse import DefaultHelpFormatter
from jsonargparse.typing import register_type
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from torch import nn

from neuromask_pl.callbacks import ExplanationLogger, MaskWriter
from neuromask_pl.module import NeuroMask

PREDICT_DEFAULTS = Path(__file__).with_name("predict_defaults.yaml")


DESCRIPTION = (
    "Explain an image classifier's predictions with NeuroMask masks. The current directory is on the import "
    "path (as with `python -m`), so a project's own classes work as class paths without PYTHONPATH=. "
    "`SUBCOMMAND --help` lists the options (the common Trainer ones; `--help-all` every one); "
    "`--model.classifier.help CLASS` those of one classifier. `neuromask-pl analyze RUN_DIR` finds what the "
    "classifier relies on, class by class, in a finished job's masks (`analyze --help`)."
)


class BatchLimit:
    """Type of the Trainer's ``limit_*_batches`` options on the command line: an integer stays an integer (that many
    batches), a number with a point is a fraction. A plain ``int | float`` union can be read float-first (typing
    caches unions regardless of order), turning ``1`` (one batch) into ``1.0`` (every batch)."""


def _batch_limit(value: Any) -> int | float:
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            return float(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number of batches (integer) or a fraction (float), got {value!r}")
    return value


register_type(
    BatchLimit,
    serializer=lambda value: value,
    deserializer=_batch_limit,
    type_check=lambda value, _: isinstance(value, (int, float)) and not isinstance(value, bool),
)
BATCH_LIMITS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")

# Types whose "known subclasses" list in the help would name every class of torch (nn.Module: hundreds) and the
# package's own building blocks: the help names only the classes meant for the option.
_HIDDEN_SUBCLASSES = ("torch.", "lightning.", "pytorch_lightning.", "neuromask_pl.fastcopy.")
_MAX_SUBCLASSES = 12


class ShortHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help with the "known subclasses" of an option cut to the classes meant for it, and, unless
    ``--help-all``, only the common Trainer options (:data:`SHOWN_TRAINER_OPTIONS`; the others are accepted as ever)."""

    def add_argument(self, action: Any) -> None:
        if _shown(action):
            super().add_argument(action)

    def add_usage(self, usage: Any, actions: Any, groups: Any, prefix: Any = None) -> None:
        super().add_usage(usage, [action for action in actions if _shown(action)], groups, prefix)

    def _get_help_string(self, action: Any) -> str:
        text = super()._get_help_string(action)
        match = re.search(r", known subclasses: ([^)]*)\)", text)
        if match is None:
            return text
        names = [n for n in match.group(1).split(", ") if not n.startswith(_HIDDEN_SUBCLASSES)]
        option = action.option_strings[0] if action.option_strings else action.dest
        names = [n for n in names if n.startswith("neuromask_pl.")] or names  # the package's own first
        if option.endswith(".classifier"):  # any nn.Module is accepted: name the classifier wrappers
            names = [n for n in names if n.startswith("neuromask_pl.classifiers.") or "Classifier" in n] or names
        shown = ", ".join(names[:_MAX_SUBCLASSES]) + (", ..." if len(names) > _MAX_SUBCLASSES else "")
        hint = f"{option}.help CLASS lists a class's options"
        extra = f", e.g. {shown}; {hint}" if names else f"; {hint}"
        return text[: match.start()] + extra + ")" + text[match.end() :]


#: The Trainer options the default ``--help`` lists (every other one is accepted, and listed by ``--help-all``).
SHOWN_TRAINER_OPTIONS = {
    f"trainer.{name}"
    for name in (
        "accelerator", "devices", "num_nodes", "strategy", "precision", "logger", "callbacks", "default_root_dir",
        "limit_predict_batches", "limit_test_batches", "enable_progress_bar", "inference_mode",
    )
}  # fmt: skip
FULL_HELP = False  # set by --help-all


def _shown(action: Any) -> bool:
    dest = getattr(action, "dest", "")
    return FULL_HELP or not dest.startswith("trainer.") or dest in SHOWN_TRAINER_OPTIONS


class NeuroMaskCLI(LightningCLI):
    """LightningCLI with the writer and the TensorBoard image logger always on, and only
    the subcommands that explain (``predict`` writes, ``test`` also reports metrics).

    Differences from a plain LightningCLI: option names are never abbreviated (``--model.step`` is an error, not
    ``--model.steps``); integer batch limits stay integers; the help lists the classes meant for an option; settings
    and device errors are one line."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {stage: {"model", "dataloaders", "datamodule"} for stage in ("predict", "test")}

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", ShortHelpFormatter)
        kwargs.setdefault("description", DESCRIPTION)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(MaskWriter, "writer")
        parser.add_lightning_class_args(ExplanationLogger, "explanation_logger")
        for action in parser._actions:
            if action.dest in {f"trainer.{name}" for name in BATCH_LIMITS} and hasattr(action, "_typehint"):
                action._typehint = BatchLimit | None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except MisconfigurationException as error:
            raise ValueError(_device_message(error, self.config[self.subcommand].trainer)) from None
        except ValueError as error:
            raise ValueError(_union_message(error)) from None
        _check_image_size(self.datamodule, self.model)


def _union_message(error: Exception) -> str:
    """jsonargparse's "Does not validate against any of the Union subtypes" (a class whose constructor refused its
    arguments, tried against ``None`` too) reduced to the constructor's own line."""
    text = str(error)
    if "Union subtypes" not in text:
        return text
    lines = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
    own = [line for line in lines if not line.startswith("Expected a <class 'NoneType'>")]
    return own[0] if own else text.splitlines()[0]


def _device_message(error: Exception, trainer: Any) -> str:
    accelerator = getattr(trainer, "accelerator", None)
    line = " ".join(str(error).split())
    if accelerator not in (None, "auto", "cpu"):
        return (
            f"{line} (--trainer.accelerator {accelerator}: no such device on this machine; "
            "use --trainer.accelerator cpu, or auto to take a GPU when there is one)"
        )
    return line


def smallest_input(classifier: nn.Module, channels: int = 3, probe: int = 64) -> int | None:
    """The smallest image side the classifier's convolutions and pooling layers map to one pixel or more: its total
    downsampling, measured on one blank ``probe`` x ``probe`` image. None when it has no such layers or refuses the
    probe (a network built for one input size)."""
    layers = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    sides: list[int] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            sides.append(min(output.shape[-2:]))

    handles = [m.register_forward_hook(hook) for m in classifier.modules() if isinstance(m, layers)]
    if not handles:
        return None
    try:
        parameter = next(classifier.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        with torch.no_grad():
            classifier(torch.zeros(1, channels, probe, probe, device=device))
    except Exception:  # noqa: BLE001 - a probe the network refuses: no minimum known
        return None
    finally:
        for handle in handles:
            handle.remove()
    return -(-probe // min(sides)) if sides else None


def _check_image_size(datamodule: Any, model: Any) -> None:
    """Refuse an ``image_size`` below the classifier's total downsampling (its last feature map would be less than
    a pixel: the network sees padding, and the mask explains nothing)."""
    size = getattr(datamodule, "image_size", None)
    classifier = getattr(model, "classifier", None)
    if not isinstance(size, int) or not isinstance(classifier, nn.Module):
        return
    channels = getattr(datamodule, "channels", None) or 3
    was_training = classifier.training
    classifier.eval()
    try:
        minimum = smallest_input(classifier, channels)
    finally:
        classifier.train(was_training)
    if minimum is not None and size < minimum:
        raise ValueError(
            f"image_size {size} is below this classifier's minimum of {minimum} pixels (its convolutions and "
            f"pooling reduce an image by {minimum}); give --data.init_args.image_size {minimum} or more"
        )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``neuromask-pl``; ``args`` replaces ``sys.argv[1:]`` (for tests). The current directory goes on
    the import path first, as ``python -m`` puts it, so a project's own classes are found by their class paths."""
    _current_directory_on_path()
    args = list(sys.argv[1:] if args is None else args)
    if args[:1] == ["analyze"]:  # not a Lightning run: the analysis of a finished one
        from neuromask_pl.analysis.command import main as analyze_main

        analyze_main(args[1:])
        return
    args = _full_help(args)
    cli = NeuroMaskCLI(
        NeuroMask,
        pl.LightningDataModule,
        subclass_mode_data=True,
        trainer_defaults={"inference_mode": False},
        save_config_kwargs={"overwrite": True},
        # predict: results go to disk through the writer, not into memory (50,000 masks would not fit).
        parser_kwargs={"predict": {"default_config_files": [str(PREDICT_DEFAULTS)]}},
        args=args,
    )
    _report(cli)
    # Close the process group of a finished distributed run while the interpreter is fully alive: left to
    # interpreter shutdown, gloo's threads can abort the process (SIGABRT, "terminate called without an
    # active exception") after all the work is done, e.g. under torchrun.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _full_help(args: list[str]) -> list[str]:
    """``--help-all``: the help with every Trainer option (the default ``--help`` lists the common ones)."""
    global FULL_HELP
    FULL_HELP = "--help-all" in args
    return ["--help" if arg == "--help-all" else arg for arg in args]


def _current_directory_on_path() -> None:
    cwd = os.getcwd()
    if not any(entry in ("", ".", cwd) for entry in sys.path):
        sys.path.insert(0, cwd)


def _report(cli: NeuroMaskCLI) -> None:
    """Tell the user where the outputs and the TensorBoard logs are."""
    writer: Any = next((c for c in cli.trainer.callbacks if isinstance(c, MaskWriter)), None)
    log_dir = cli.trainer.log_dir  # a collective under DDP: every rank must ask
    if cli.trainer.is_global_zero and writer is not None and writer.out is not None:
        print(f"\nneuromask-pl: explanations written to {writer.out}")
        print(f"  manifest: {writer.out / 'manifest.csv'}   overlays: {writer.out / 'overlays'}")
        print("  read them with: neuromask_pl.load_results(...)")
        if writer.analysis is not None:
            print(f"  strategies: {writer.analysis.output_dir} (report.html; {len(writer.analysis.suspicious())} "
                  "suspicious cluster(s))")  # fmt: skip
        if log_dir:
            print(f"  TensorBoard: tensorboard --logdir {log_dir}")


# Errors that mean "the input, the settings or the machine's resources are wrong": shown as one line, not a
# traceback (a full disk or a read-only folder is an OSError). Anything else is a bug: its traceback is kept.
USER_ERRORS = (ValueError, TypeError, ImportError, MemoryError, OSError)


def entry() -> None:
    """Console script: run :func:`main`, reporting user errors as one clear line (exit status 2)."""
    try:
        main()
    except USER_ERRORS as error:
        print(f"neuromask-pl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    entry()
