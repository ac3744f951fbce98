"""Train a small CNN on scikit-learn's digits and watch its explanations change, epoch by epoch.

    python examples/train_with_explanations.py                 # 5 epochs, about half a minute on a 2-core CPU
    python examples/train_with_explanations.py --epochs 3 --steps 50 --output /tmp/overlays
    tensorboard --logdir lightning_logs                       # explain_train/* scalars, explain_train/overlays

The 8 x 8 digits (values 0..16) are scaled to [0, 1] and upsampled to 32 x 32, one grey channel.
``ExplainDuringTraining`` explains the first 8 validation images at the end of every validation
epoch; training itself is exactly what it would be without the callback. At the end the last grid
of panels (original | mask heat map | image x mask) is saved as ``<output>/overlays_epoch<k>.png``
(k counts epochs from 0, as Lightning does).
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neuromask_pl.callbacks import ExplainDuringTraining
from neuromask_pl.viz import panel_grid, save_png


class DigitsCNN(pl.LightningModule):
    """A small CNN with BatchNorm and Dropout: [0, 1] grey images 1 x 32 x 32 -> logits of the ten digits."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.net = nn.Sequential(
            *block(1, 16),
            nn.MaxPool2d(2),
            *block(16, 32),
            nn.MaxPool2d(2),
            *block(32, 32),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(32 * 4 * 4, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val_loss", F.cross_entropy(logits, labels))
        self.log("val_acc", (logits.argmax(1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def digits(size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1797 digits as [0, 1] images 1 x size x size, split into train and validation."""
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    labels = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(images) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--steps", type=int, default=100, help="mask optimisation steps per explanation (default 100)")
    parser.add_argument("--output", default="docs/training", help="folder for the last overlay grid (PNG)")
    parser.add_argument("--num-images", type=int, default=8, help="validation images explained (default 8)")
    parser.add_argument(
        "--baseline",
        default="black",
        choices=["black", "mean", "blur"],
        help="what hidden pixels become (default black: a blurred digit stays readable, so with the 'default' "
        "preset's blur the masks are free to keep the empty corners)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the model and the training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    pl.seed_everything(args.seed, verbose=False)
    train, val = digits(seed=args.seed)
    explainer = ExplainDuringTraining(
        num_images=args.num_images, steps=args.steps, seed=args.seed, settings={"baseline": args.baseline}
    )
    logger = TensorBoardLogger(save_dir=".", name="lightning_logs")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[explainer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=10,
    )
    model = DigitsCNN()
    trainer.fit(
        model,
        DataLoader(train, batch_size=64, shuffle=True),
        DataLoader(val, batch_size=256),
    )

    explanation = explainer.last_explanation
    if explanation is None:
        raise SystemExit("no explanation was made (did validation run?)")
    grid = panel_grid(explainer.images, explanation.masks)
    grid = F.interpolate(grid[None], scale_factor=3, mode="nearest")[0]  # 32 px digits are tiny on screen
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    path = save_png(grid, output / f"overlays_epoch{explainer.last_epoch}.png")
    print(f"validation accuracy: {float(trainer.callback_metrics['val_acc']):.3f}")
    print(f"explained {len(explanation)} images at the end: {explanation.summary()}")
    print(f"last explanation took {explainer.last_seconds:.2f} s ({args.steps} steps, {len(explanation)} images, CPU)")
    print(f"overlays: {path}")
    print(f"TensorBoard logs: {logger.log_dir}  (tensorboard --logdir {Path(logger.log_dir).parent})")


if __name__ == "__main__":
    main()
