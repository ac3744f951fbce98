"""DataModules that yield explanation batches and keep sample identity.

Every module here yields the batch format of NeuroMask: a dict with ``image`` (B x C x H x W float
in [0, 1]), ``index`` (LongTensor of stable sample ids), ``label`` (only for labelled data),
``path`` (only for file-based data) and ``skipped`` (samples that could not be read). The
``predict`` and ``test`` stages use the same loader: no shuffling, ids are dataset indices.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms.v2 import functional as F

from neuromask_pl import DEMO_INSTALL_HINT
from neuromask_pl.data.batch import collate_samples
from neuromask_pl.data.images import MAX_DECODE_BYTES, MAX_DECODE_PIXELS, read_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------- transform and collate


def prepare_image(image: Tensor, image_size: int | None = 224, resize: int | None = None) -> Tensor:
    """Resize the shorter side, center-crop and convert to float in [0, 1].

    Args:
        image: C x H x W image, uint8 (0..255) or float (0..1).
        image_size: side of the square center crop; None keeps the (resized) image as it is.
        resize: length of the shorter side before cropping; defaults to ``image_size``.

    Returns:
        Float32 tensor C x image_size x image_size (or C x H' x W' when ``image_size`` is None).
    """
    size = resize if resize is not None else image_size
    if size is not None and min(image.shape[-2:]) != size:
        image = F.resize(image, [size], antialias=True)
    if image_size is not None:
        image = F.center_crop(image, [image_size, image_size])
    return F.to_dtype(image, torch.float32, scale=True)


# --------------------------------------------------------------------------- datasets


class ImageFileDataset(Dataset):
    """Image files decoded on access; an unreadable file (or one over the decode budget ``max_pixels`` /
    ``max_decode_bytes``, or not a regular file) gives a sample with ``error`` instead of ``image``."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | None = None,
        image_size: int | None = 224,
        resize: int | None = None,
        channels: int = 3,
        max_pixels: int | None = MAX_DECODE_PIXELS,
        max_decode_bytes: int | None = MAX_DECODE_BYTES,
    ) -> None:
        self.paths = list(paths)
        self.labels = None if labels is None else list(labels)
        self.image_size = image_size
        self.resize = resize
        self.channels = channels
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = {"index": index, "path": self.paths[index]}
        if self.labels is not None:
            sample["label"] = self.labels[index]
        try:
            raw = read_image(self.paths[index], self.channels, self.max_pixels, self.max_decode_bytes)
        except Exception as err:  # any decode failure (truncated, not an image, ...) skips the sample
            sample["error"] = f"{type(err).__name__}: {err}"
            return sample
        sample["image"] = prepare_image(raw, self.image_size, self.resize)
        return sample


class InMemoryDataset(Dataset):
    """Images already in memory (N x C x H x W in [0, 1]) with ids, optional labels and names."""

    def __init__(
        self, images: Tensor, ids: Tensor, labels: Tensor | None = None, paths: Sequence[str] | None = None
    ) -> None:
        self.images = images
        self.ids = ids
        self.labels = labels
        self.paths = None if paths is None else list(paths)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = {"index": int(self.ids[index]), "image": self.images[index]}
        if self.labels is not None:
            sample["label"] = int(self.labels[index])
        if self.paths is not None:
            sample["path"] = self.paths[index]
        return sample


# --------------------------------------------------------------------------- data modules


class ExplainDataModule(pl.LightningDataModule):
    """Shared loader logic: same ordered loader for predict and test, shared collate."""

    def __init__(self, batch_size: int, num_workers: int, pin_memory: bool | None) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.dataset: Dataset | None = None
        # Sample ids already explained (set by MaskWriter when resuming); never loaded again.
        self.exclude_ids: set[int] = set()

    def _build_dataset(self) -> Dataset:
        raise NotImplementedError

    def _empty_image_shape(self) -> tuple[int, int, int]:
        return (3, 0, 0)

    def setup(self, stage: str | None = None) -> None:
        """Build the dataset (once)."""
        if self.dataset is None:
            self.dataset = self._build_dataset()

    def sample_ids(self) -> list[int]:
        """The sample id of every position of the dataset."""
        self.setup()
        ids = getattr(self.dataset, "ids", None)
        return [int(i) for i in ids] if ids is not None else list(range(len(self.dataset)))

    def fingerprint(self) -> str:
        """A hash of what the samples are (file paths, or the tensors' bytes), so that results
        written for one dataset are never taken as results for another."""
        self.setup()
        digest = hashlib.sha256()
        for name in ("paths", "ids", "labels", "images"):
            value = getattr(self.dataset, name, None)
            if isinstance(value, Tensor):
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
            elif value is not None:
                digest.update(json.dumps(list(value), default=str).encode())
        return digest.hexdigest()

    def _collate_fn(self) -> Any:
        """The batch collation (picklable, for worker processes)."""
        return functools.partial(collate_samples, empty_image_shape=self._empty_image_shape())

    def _loader(self) -> DataLoader:
        self.setup()
        dataset = self.dataset
        if self.exclude_ids:
            keep = [pos for pos, sample_id in enumerate(self.sample_ids()) if sample_id not in self.exclude_ids]
            dataset = Subset(self.dataset, keep)
        sampler = None
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            # Each rank its own samples and no padding duplicates (Lightning keeps a DistributedSampler it
            # finds; its default one for testing would repeat samples to even out the ranks).
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            sampler=sampler,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=self._collate_fn(),
        )

    def predict_dataloader(self) -> DataLoader:
        """Ordered loader over the whole dataset."""
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        """Same loader as :meth:`predict_dataloader`."""
        return self._loader()


class ImageFolderDataModule(ExplainDataModule):
    """Image files found recursively under a folder, sorted by relative path (ids are stable).

    Images of any size or mode (8- or 16-bit, float, palette, CMYK; see :func:`~neuromask_pl.data.images.read_image`)
    are read as ``channels`` channels in [0, 1], resized so the shorter side is ``resize``
    (default ``image_size``) and center-cropped to ``image_size`` x ``image_size``. Hidden files and
    folders (names starting with ".") are ignored. Unreadable files are reported in
    ``batch["skipped"]`` and logged, never raised.

    Args:
        root: folder to search.
        image_size: side of the square crop; None keeps each image's size (then batches need
            images of one size, e.g. ``batch_size=1``).
        resize: shorter side before cropping (>= image_size); defaults to ``image_size``.
        labels: take each file's first sub-folder under ``root`` as its class. When NeuroMask runs with a
            classifier that has ``class_names``, folder names are matched to them (case, "_" and "-" ignored;
            a folder with no such class is an error naming it); otherwise integer folder names are the class
            ids, and other names map in sorted order to 0..K-1 (as torchvision's ImageFolder). The mapping
            used is :attr:`class_to_idx` (written to the run record).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        extensions: file name endings to include (case-insensitive).
        pin_memory: pin batches in page-locked memory; defaults to whether CUDA is available.
        channels: 3 (RGB; grey files repeated) or 1 (grey; colour files converted to luma), as the
            classifier expects.
        max_pixels: the decode budget in pixels: a larger image is skipped (with its reason) from its header,
            before it is decoded; None for no budget but PIL's bomb limit. Only regular files are opened: a FIFO,
            socket or device named like an image is skipped too.
        max_decode_bytes: the decode budget in bytes of memory, as :func:`~neuromask_pl.data.images.decode_bytes`
            estimates it from the header (35 bytes a pixel for 8-bit RGB); None for no such budget.

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
        ValueError: if no image is found, or ``labels=True`` and a file lies directly in ``root``.
    """

    def __init__(
        self,
        root: str,
        image_size: int | None = 224,
        resize: int | None = None,
        labels: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        pin_memory: bool | None = None,
        channels: int = 3,
        max_pixels: int | None = MAX_DECODE_PIXELS,
        max_decode_bytes: int | None = MAX_DECODE_BYTES,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory)
        self.save_hyperparameters()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        self.channels = channels
        for name, value in (("max_pixels", max_pixels), ("max_decode_bytes", max_decode_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} (the decode budget) must be a positive integer or None, got {value!r}.")
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes
        for name, value in (("image_size", image_size), ("resize", resize)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        if image_size is not None and resize is not None and resize < image_size:
            raise ValueError(f"resize ({resize}) must be >= image_size ({image_size}) so the crop fits in the image.")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Image folder {root!r} does not exist or is not a folder.")
        self.root = os.path.abspath(root)
        self.image_size = image_size
        self.resize = resize
        self.extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        self.files = self._find_files()
        self.class_to_idx: dict[str, int] | None = None
        self.targets: list[int] | None = None
        if labels:
            self.class_to_idx, self.targets = self._folder_labels()

    def _find_files(self) -> list[str]:
        """Relative POSIX paths of the image files under root, sorted."""
        found = []
        for folder, dirs, names in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = os.path.relpath(folder, self.root)
            for name in names:
                if not name.startswith(".") and name.lower().endswith(self.extensions):
                    found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
        if not found:
            raise ValueError(
                f"No image files found under {self.root!r} (searched extensions {', '.join(self.extensions)}); "
                "point root at a folder of images or set extensions."
            )
        return sorted(found)

    def _folder_labels(self) -> tuple[dict[str, int], list[int]]:
        top = [f.split("/")[0] if "/" in f else None for f in self.files]
        loose = [f for f, t in zip(self.files, top) if t is None]
        if loose:
            raise ValueError(
                f"labels=True needs every image inside a class sub-folder of {self.root!r}, but "
                f"{len(loose)} file(s) lie directly in it (e.g. {loose[0]!r}); move them or use labels=False."
            )
        names = sorted(set(top))
        if all(n.isdigit() for n in names):
            class_to_idx = {n: int(n) for n in names}
        else:
            class_to_idx = {n: i for i, n in enumerate(names)}
        return class_to_idx, [class_to_idx[t] for t in top]

    def _empty_image_shape(self) -> tuple[int, int, int]:
        side = self.image_size or 0
        return (self.channels, side, side)

    def match_class_names(self, class_names: Sequence[str] | None) -> None:
        """Map the label folders onto a classifier's class names (called by NeuroMask before loading)."""
        if self.class_to_idx is None or not class_names:
            return
        self.class_to_idx = match_folders(list(self.class_to_idx), class_names)
        self.targets = [self.class_to_idx[f.split("/")[0]] for f in self.files]
        self.dataset = None  # rebuilt with these labels

    def _build_dataset(self) -> Dataset:
        paths = [os.path.join(self.root, *f.split("/")) for f in self.files]
        return ImageFileDataset(
            paths, self.targets, self.image_size, self.resize, self.channels, self.max_pixels, self.max_decode_bytes
        )


class TensorDataModule(ExplainDataModule):
    """Images already in memory.

    Args:
        images: N x C x H x W floating-point images in [0, 1].
        labels: optional integer class per image, shape (N,).
        ids: optional unique integer sample ids, shape (N,); default 0..N-1.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches in page-locked memory; defaults to whether CUDA is available.

    Raises:
        TypeError: if a tensor has the wrong dtype.
        ValueError: if shapes, value range or ids are wrong.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        ids: Tensor | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory)
        self.save_hyperparameters(ignore=["images", "labels", "ids"])
        if not isinstance(images, Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a 4-D tensor N x C x H x W, got {got}.")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be floating point in [0, 1], got {images.dtype}; e.g. use images.float() / 255."
            )
        n = images.shape[0]
        if n == 0:
            raise ValueError("images is empty (N = 0).")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; rescale them first.")
        labels = self._check_vector(labels, "labels", n)
        ids = self._check_vector(ids, "ids", n)
        if ids is None:
            ids = torch.arange(n)
        elif torch.unique(ids).numel() != n:
            raise ValueError("ids must be unique: each sample needs its own id.")
        elif (ids < 0).any():
            raise ValueError(f"ids must be >= 0 (they name result files), got {ids[ids < 0][:5].tolist()}.")
        self.images = images.detach()
        self.labels = labels
        self.ids = ids

    @staticmethod
    def _check_vector(value: Tensor | None, name: str, n: int) -> Tensor | None:
        if value is None:
            return None
        if not isinstance(value, Tensor) or value.dim() != 1 or value.shape[0] != n:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a 1-D tensor of length N = {n} (one per image), got {got}.")
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}.")
        return value.detach().long()

    def _empty_image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def _build_dataset(self) -> Dataset:
        return InMemoryDataset(self.images, self.ids, self.labels)


class DemoDataModule(ExplainDataModule):
    """Six real photos bundled offline with scikit-image and scikit-learn.

    Samples (ids 0..5, ``path`` is the name): ``skimage:chelsea`` (cat, CC0, Stefan van der Walt),
    ``skimage:coffee`` (coffee cup, CC0, Rachel Michetti / Pikolo Espresso Bar),
    ``skimage:astronaut`` (Eileen Collins, NASA, public domain), ``skimage:rocket`` (Falcon 9 /
    DSCOVR launch, SpaceX, public domain), ``sklearn:china.jpg`` (Flickr, danielbuechele) and
    ``sklearn:flower.jpg`` (Flickr, vultilion per its source link; the README's attribution line
    says danielbuechele), both CC BY 2.0: attribution required when redistributed. Sources: the
    docstrings in ``skimage/data/_fetchers.py`` and ``sklearn/datasets/images/README.txt``.
    Photos are resized and center-cropped like :class:`ImageFolderDataModule`.

    Args:
        image_size: side of the square crop.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches in page-locked memory; defaults to whether CUDA is available.

    Raises:
        ImportError: if scikit-image or scikit-learn is missing.
    """

    SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")

    def __init__(
        self, image_size: int = 224, batch_size: int = 6, num_workers: int = 0, pin_memory: bool | None = None
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory)
        self.save_hyperparameters()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
        self.image_size = image_size
        _import_demo_packages()

    def _empty_image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def _build_dataset(self) -> Dataset:
        skimage_data, sklearn_datasets = _import_demo_packages()
        arrays = [(f"skimage:{name}", getattr(skimage_data, name)()) for name in self.SKIMAGE_PHOTOS]
        bunch = sklearn_datasets.load_sample_images()
        arrays += [(f"sklearn:{os.path.basename(f)}", a) for f, a in zip(bunch.filenames, bunch.images)]
        images = torch.stack([prepare_image(torch.tensor(a).permute(2, 0, 1), self.image_size) for _, a in arrays])
        return InMemoryDataset(images, torch.arange(len(arrays)), paths=[name for name, _ in arrays])


def _import_demo_packages() -> tuple[Any, Any]:
    """Import ``skimage.data`` and ``sklearn.datasets`` or explain how to install them."""
    try:
        import skimage.data as skimage_data
        import sklearn.datasets as sklearn_datasets
    except ImportError as err:
        raise ImportError(
            f"DemoDataModule needs scikit-image and scikit-learn ({err}); install them with {DEMO_INSTALL_HINT}"
        ) from err
    return skimage_data, sklearn_datasets


def _plain(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def match_folders(folders: list[str], class_names: Sequence[str]) -> dict[str, int]:
    """Each label folder's class index among ``class_names``, by name (case, "_" and "-" ignored), or by number
    for integer folder names within range.

    Raises:
        ValueError: naming a folder that matches no class, with the closest class names.
    """
    index = {_plain(name): i for i, name in enumerate(class_names)}
    mapping: dict[str, int] = {}
    for folder in folders:
        if _plain(folder) in index:
            mapping[folder] = index[_plain(folder)]
        elif folder.isdigit() and int(folder) < len(class_names):
            mapping[folder] = int(folder)
        else:
            close = difflib.get_close_matches(_plain(folder), list(index), n=3)
            hint = f" (closest: {', '.join(repr(class_names[index[c]]) for c in close)})" if close else ""
            raise ValueError(
                f"label folder {folder!r} names no class of the classifier's {len(class_names)} classes{hint}; "
                "rename the folder to its class name (or index), or use labels=False to explain the predicted class"
            )
    return mapping
