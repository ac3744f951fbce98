"""The template's DataModule: grey 28 x 28 digits (scikit-learn's, upsampled), normalised with MNIST's mean/std."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

MEAN, STD = 0.1307, 0.3081


def digit_images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` scikit-learn digits as N x 1 x 28 x 28 pixels in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:count], dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    return images, torch.tensor(digits.target[:count])


class DigitsDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 32, train: int = 256, val: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)

    def setup(self, stage: str | None = None) -> None:
        images, labels = digit_images(self.hparams.train + self.hparams.val)
        normalised = (images - MEAN) / STD
        n = self.hparams.train
        self.data_train = TensorDataset(normalised[:n], labels[:n])
        self.data_val = TensorDataset(normalised[n:], labels[n:])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(self.data_train, batch_size=self.hparams.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data_val, batch_size=self.hparams.batch_size)
