"""The template's MNIST DataModule as it ships (its arguments saved with ``save_hyperparameters``), on
scikit-learn's digits upsampled to 28 x 28 grey, normalised with MNIST's mean and std (no download)."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from src.data.digits_datamodule import MEAN, STD, digit_images


class MNISTDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str = "data/",
        train_val_test_split: tuple[int, int, int] = (256, 64, 64),
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # from Hydra, train_val_test_split is an OmegaConf ListConfig

    def setup(self, stage: str | None = None) -> None:
        train, val, test = self.hparams.train_val_test_split
        images, labels = digit_images(train + val + test)
        data = TensorDataset((images - MEAN) / STD, labels)
        self.data_train, self.data_val, self.data_test = torch.utils.data.random_split(
            data, [train, val, test], generator=torch.Generator().manual_seed(42)
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data_train, batch_size=self.hparams.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data_val, batch_size=self.hparams.batch_size)
