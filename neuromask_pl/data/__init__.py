"""Data: the batch format and its checks, the DataModules, and the localisation benchmark set."""

from neuromask_pl.data.batch import collate_samples, unpack_batch
from neuromask_pl.data.checks import check_images
from neuromask_pl.data.images import read_image
from neuromask_pl.data.modules import (
    IMAGE_EXTENSIONS,
    DemoDataModule,
    ExplainDataModule,
    ImageFileDataset,
    ImageFolderDataModule,
    InMemoryDataset,
    TensorDataModule,
    prepare_image,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DemoDataModule",
    "ExplainDataModule",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "InMemoryDataset",
    "TensorDataModule",
    "check_images",
    "collate_samples",
    "prepare_image",
    "read_image",
    "unpack_batch",
]
