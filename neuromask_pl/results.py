"""A run's results for notebooks: :func:`load_results` opens an output folder as :class:`Results`.

:class:`Results` is the store's lazy reader (:class:`~neuromask_pl.store.StoredResults`: masks, rows, ``to_pandas``,
``by_class``, ``top``/``bottom``, ``flagged``) plus what needs torch: the input image of a sample as the classifier
was given it, read back from its file (:meth:`Results.image`), and its explanation panel (:meth:`Results.panel`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from neuromask_pl.data.images import read_image
from neuromask_pl.data.modules import prepare_image
from neuromask_pl.store import StoredResults
from neuromask_pl.store import load_results as open_store_results
from neuromask_pl.viz import explanation_panel

FILE_DATA_MODULES = ("ImageFolderDataModule",)
"""The DataModules whose samples :meth:`Results.image` can read back: those that read each image from the file the
row names (``path``) with :func:`~neuromask_pl.data.images.read_image` and
:func:`~neuromask_pl.data.modules.prepare_image`, settings recorded in ``store.json``."""


class Results(StoredResults):
    """The results of a run (see :class:`~neuromask_pl.store.StoredResults`), with the inputs read back.

    The store keeps masks and rows, not the images: :meth:`image` decodes the sample's file again, the way the
    run's DataModule did (the decoding, channels, resize and crop recorded in ``store.json``, the decode budget in
    ``run.json``). That is the input exactly as the classifier was given it, as long as the file has not changed
    since the run.
    """

    def _data(self) -> dict[str, Any]:
        config = self.info.config or {}
        data = config.get("data")
        return data if isinstance(data, dict) else {}

    def image(self, sample_id: int) -> Tensor:
        """The input of ``sample_id`` as the classifier was given it: a float32 C x H x W tensor in [0, 1] (before
        the classifier's own normalisation), read again from the sample's file.

        Only for runs whose DataModule read files (:data:`FILE_DATA_MODULES`: ``explain_folder``, the CLI's
        folder data); the file is decoded as it is now, so a file changed since the run gives its new content
        (:func:`~neuromask_pl.store.resume_state` lists the changed ones).

        Raises:
            KeyError: no such sample.
            ValueError: the sample was not read from a file (in-memory data, another DataModule, a skipped file).
            FileNotFoundError: the file is gone.
        """
        row = self.row(sample_id)
        data = self._data()
        kind = data.get("class")
        if kind not in FILE_DATA_MODULES:
            raise ValueError(
                f"sample {sample_id}: the run read its images with {kind or 'no DataModule'}, and the store keeps "
                f"no images; image() reads back only files read by {', '.join(FILE_DATA_MODULES)}. Take the image "
                "from your DataModule (the same sample id)"
            )
        path = row.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"sample {sample_id} names no file (path is {path!r})")
        if row.get("status", "ok") == "skipped":
            raise ValueError(f"sample {sample_id} ({path}) was skipped: {row.get('error') or 'unreadable'}")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sample {sample_id}: its file {path!r} is no longer there")
        loading = (self.run or {}).get("datamodule_hparams") or {}  # the decode budget is a loading setting
        budget = {k: loading[k] for k in ("max_pixels", "max_decode_bytes") if k in loading}
        raw = read_image(path, int(data.get("channels") or 3), **budget)
        return prepare_image(raw, data.get("image_size"), data.get("resize"))

    def panel(self, sample_id: int) -> Tensor:
        """The explanation panel of ``sample_id`` (:func:`~neuromask_pl.viz.explanation_panel`: original |
        heat-map overlay | image x mask), a 3 x H x W' float tensor in [0, 1], from :meth:`image` and the mask."""
        mask = self.mask(sample_id)
        if mask is None:
            raise ValueError(f"sample {sample_id} has no mask (status {self.row(sample_id).get('status')!r})")
        return explanation_panel(self.image(sample_id), torch.from_numpy(mask))


def load_results(output_dir: str | os.PathLike[str], max_open_shards: int = 4) -> Results:
    """Open the results in ``output_dir`` (a MaskWriter's folder, e.g. ``lightning_logs/version_0/explanations``)
    as :class:`Results`; see :func:`neuromask_pl.store.load_results` for how and at what memory cost.

    Example:
        >>> results = load_results("lightning_logs/version_0/explanations")  # doctest: +SKIP
        >>> table = results.to_pandas()  # doctest: +SKIP
        >>> worst = results.bottom(5, by="prob_masked")  # doctest: +SKIP
        >>> image = results.image(worst[0]["sample_id"])  # doctest: +SKIP
    """
    results = open_store_results(output_dir, max_open_shards, cls=Results)
    assert isinstance(results, Results)
    return results


__all__ = ["FILE_DATA_MODULES", "Results", "load_results"]
