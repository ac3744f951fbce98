"""Command line: ``neuromask-pl predict|test --config ...`` on Lightning's LightningCLI."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from neuromask_pl.callbacks import ExplanationLogger, MaskWriter
from neuromask_pl.module import NeuroMask

PREDICT_DEFAULTS = Path(__file__).with_name("predict_defaults.yaml")


class NeuroMaskCLI(LightningCLI):
    """LightningCLI with the writer and the TensorBoard image logger always on, and only
    the subcommands that explain (``predict`` writes, ``test`` also reports metrics)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {stage: {"model", "dataloaders", "datamodule"} for stage in ("predict", "test")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(MaskWriter, "writer")
        parser.add_lightning_class_args(ExplanationLogger, "explanation_logger")


def main(args: list[str] | None = None) -> None:
    """Entry point of ``neuromask-pl``; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
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


def _report(cli: NeuroMaskCLI) -> None:
    """Tell the user where the outputs and the TensorBoard logs are."""
    writer: Any = next((c for c in cli.trainer.callbacks if isinstance(c, MaskWriter)), None)
    log_dir = cli.trainer.log_dir  # a collective under DDP: every rank must ask
    if cli.trainer.is_global_zero and writer is not None and writer.out is not None:
        print(f"\nneuromask-pl: explanations written to {writer.out}")
        print(f"  manifest: {writer.out / 'manifest.csv'}   overlays: {writer.out / 'overlays'}")
        print("  read them with: neuromask_pl.load_results(...)")
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
