"""Reading a store back: :func:`load_results` opens it, :class:`StoredResults` reads masks and rows lazily (and
sorts, groups and tabulates the rows for notebooks); :func:`read_manifest` reads ``manifest.csv``;
:func:`resume_state` says what a rerun can skip."""

from __future__ import annotations

import csv
import heapq
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuromask_pl.store.index import Index, MemberReader, build_index, load_index
from neuromask_pl.store.layout import (
    INDEX_FILE,
    MANIFEST_FILE,
    SHARDS_DIR,
    StoreInfo,
    from_manifest_cell,
    read_store_info,
)
from neuromask_pl.store.scan import ShardScan, complete_names, scan_shards
from neuromask_pl.store.writer import source_fingerprint

RUN_FILE = "run.json"
"""The run record a job writes beside its store (settings, data, trainer, versions, counts, sanity checks)."""

PANDAS_HINT = "pip install pandas"


class Rows:
    """The manifest rows of a :class:`StoredResults` in id order, read lazily: iterate it (``for row in
    results.rows``), call it (``results.rows()``, an iterator), or take its ``len``. Each row is a dict typed as
    written (``manifest.csv`` holds the same as text); one row is in memory at a time."""

    def __init__(self, results: StoredResults) -> None:
        self._results = results

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self._results._members.row(k) for k in range(len(self._results)))

    def __call__(self) -> Iterator[dict[str, Any]]:
        return iter(self)

    def __len__(self) -> int:
        return len(self._results)

    def __repr__(self) -> str:
        return f"<{len(self)} rows of {self._results!r}>"


def _number(value: Any) -> float | None:
    """A row value as a float to sort by (bools count as 0 and 1), None when it is not a number or is NaN."""
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        value = float(value)
        return None if math.isnan(value) else value
    return None


class StoredResults:
    """Lazy, memory-bounded reader of a store's explanations; see :func:`load_results`.

    Memory bound (N samples, S shards, H x W the largest mask, measured with ``tracemalloc`` in the
    tests): peak bytes <= 48·N + 1024·S + 6·H·W + the largest row's JSON + 64 KiB, whatever the
    shard size and ``max_open_shards``. Where it goes:

    - the index: :data:`~neuromask_pl.store.INDEX_BYTES_PER_SAMPLE` = 48 bytes per sample (2.4 MB for 50,000), read from
      ``index.npz`` straight into its arrays, plus each shard's name, size and checksum (with what
      opening reads transiently, under 1 KiB per shard);
    - open shards: at most ``max_open_shards`` file descriptors, no file buffers: every read is one
      ``os.pread`` of exactly one member (never a whole shard, never a shard's directory);
    - one ``mask()``: the member's bytes (2·H·W + 128) and the float32 result (4·H·W); one ``row()``:
      its JSON. Masks and rows are never cached.

    Without ``index.npz`` (see :func:`load_results`) building the index needs about three times its
    final size while sorting. Not thread-safe: use one StoredResults per thread (forked DataLoader
    workers may share one, as reads carry their own offsets).
    """

    def __init__(self, root: Path, index: Index, *, indexed: bool, max_open_shards: int = 4) -> None:
        self._members = MemberReader(root, index, max_open_shards)
        self.info: StoreInfo = read_store_info(root)  # store.json: format, configuration (config) and its hash
        self.root = root
        self.indexed = indexed  # False: built from the shards because index.npz was missing or stale
        self.max_open_shards = max_open_shards
        self._index = index
        self._a = index.arrays

    # -- container protocol
    def __len__(self) -> int:
        return len(self._a["ids"])

    def __repr__(self) -> str:
        return f"StoredResults({len(self)} samples in {len(self._index.shards)} shards at '{self.root}')"

    @property
    def ids(self) -> np.ndarray:
        """Sorted sample ids (read-only int64 array)."""
        ids = self._a["ids"].view()
        ids.flags.writeable = False
        return ids

    @property
    def index_nbytes(self) -> int:
        """Bytes held by the per-sample index arrays (:data:`~neuromask_pl.store.INDEX_BYTES_PER_SAMPLE` per sample)."""
        return self._index.nbytes

    def _position(self, sample_id: Any) -> int:
        if isinstance(sample_id, (int, np.integer)) and not isinstance(sample_id, bool):
            ids = self._a["ids"]
            k = int(np.searchsorted(ids, sample_id))
            if k < len(ids) and ids[k] == sample_id:
                return k
        raise KeyError(f"sample id {sample_id!r} is not in the results at '{self.root}'")

    def __contains__(self, sample_id: object) -> bool:
        try:
            self._position(sample_id)
        except KeyError:
            return False
        return True

    def has_mask(self, sample_id: int) -> bool:
        """Whether the sample was recorded with a mask (False for skipped samples)."""
        return bool(self._a["mask_nbytes"][self._position(sample_id)] >= 0)

    # -- reading members
    def _mask_at(self, k: int, dtype: Any) -> np.ndarray | None:
        if self._a["mask_nbytes"][k] < 0:
            return None
        return self._members.mask(k, dtype)

    def mask(self, sample_id: int, dtype: Any = np.float32) -> np.ndarray | None:
        """The sample's H x W mask (a new float32 array by default), or None if it has no mask (skipped)."""
        return self._mask_at(self._position(sample_id), dtype)

    def row(self, sample_id: int) -> dict[str, Any]:
        """The sample's manifest row, with the types it was written with."""
        return self._members.row(self._position(sample_id))

    def __getitem__(self, sample_id: int) -> tuple[np.ndarray | None, dict[str, Any]]:
        k = self._position(sample_id)
        return self._mask_at(k, np.float32), self._members.row(k)

    def __iter__(self) -> Iterator[tuple[int, np.ndarray | None, dict[str, Any]]]:
        """(sample id, mask or None, row) in id order, one sample in memory at a time."""
        ids = self._a["ids"]
        for k in range(len(ids)):  # not ids.tolist(): that would hold N Python ints
            yield int(ids[k]), self._mask_at(k, np.float32), self._members.row(k)

    @property
    def rows(self) -> Rows:
        """The manifest rows in id order (typed as written; ``manifest.csv`` holds the same as text): iterate it or
        call it, ``for row in results.rows()``; see :class:`Rows`."""
        return Rows(self)

    @property
    def run(self) -> dict[str, Any] | None:
        """The run record the job wrote beside the store (``run.json``: settings, data, trainer, versions,
        ``counts``, ``sanity``), read anew on each access; None when there is none (or it is not JSON)."""
        try:
            record = json.loads((self.root / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) else None

    # -- for notebooks: tables, groups, rankings
    def to_pandas(self, columns: list[str] | None = None) -> Any:
        """Every row as a ``pandas.DataFrame`` indexed by ``sample_id``, one column per row key (in order of first
        appearance; a key a row lacks is NaN there), typed as written: e.g.
        ``results.to_pandas().groupby("target_name")["mask_area"].mean()``.

        Reads every row (one ``pread`` each) and holds the table in memory; masks are not read.

        Args:
            columns: only these columns (``sample_id`` is always the index).

        Raises:
            ImportError: pandas is not installed (it is optional: ``pip install pandas``).
        """
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError(f"StoredResults.to_pandas needs pandas, which is optional: {PANDAS_HINT}") from err
        keep = None if columns is None else ["sample_id", *(c for c in columns if c != "sample_id")]
        records = [row if keep is None else {k: row.get(k) for k in keep} for row in self.rows()]
        frame = pd.DataFrame.from_records(records, columns=keep)
        if "sample_id" not in frame:
            frame["sample_id"] = self._a["ids"]
        return frame.set_index("sample_id")

    def by_class(self, column: str = "target_name") -> dict[Any, list[int]]:
        """The ids of the explained samples (status ``ok``) grouped by class, in id order: ``{"cat": [0, 4], ...}``.

        Args:
            column: the row key to group by: ``target_name`` (the explained class's name, falling back to its index
                ``target`` when the classifier has no names), ``target``, ``predicted``, or any other key.
        """
        groups: dict[Any, list[int]] = {}
        for row in self.rows():
            if row.get("status", "ok") != "ok":
                continue
            key = row.get(column)
            if column == "target_name" and not key:
                key = row.get("target")
            groups.setdefault(key, []).append(int(row["sample_id"]))
        return groups

    def _ranked(self, n: int, by: str, largest: bool, where: Callable[[dict[str, Any]], bool] | None) -> list[dict]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        scored: list[tuple[float, int, int]] = []  # (value, id, position): small, no row kept
        seen = False
        for k, row in enumerate(self.rows()):
            seen = seen or by in row
            value = _number(row.get(by))
            if value is not None and row.get("status", "ok") == "ok" and (where is None or where(row)):
                sample_id = int(row["sample_id"])
                scored.append((-value if largest else value, sample_id, k))
        if not seen and len(self):
            raise KeyError(f"no row has the column {by!r}; the rows have: {', '.join(self._members.row(0))}")
        return [self._members.row(k) for _, _, k in heapq.nsmallest(n, scored)]

    def top(
        self, n: int = 10, by: str = "prob_masked", where: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[dict]:
        """The rows of the ``n`` explained samples with the largest value of column ``by`` (ties: lower id first).

        Rows that are not ``ok``, or whose ``by`` is not a number (or NaN), are left out; ``where`` (a function of a
        row) keeps only the rows it is true for, e.g. ``results.top(5, "mask_area", where=lambda r: r["preserved"])``.
        Reads every row once; holds one number per sample.

        Raises:
            KeyError: no row has the column ``by``.
        """
        return self._ranked(n, by, True, where)

    def bottom(
        self, n: int = 10, by: str = "prob_masked", where: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[dict]:
        """The rows of the ``n`` explained samples with the smallest value of column ``by``; as :meth:`top`."""
        return self._ranked(n, by, False, where)

    def flagged(self, flag: str | None = None) -> list[int]:
        """The ids of the samples that carry a sanity flag (any, or ``flag``, e.g. ``"empty_mask"``): results that
        look like explanations but are not to be trusted (see the ``flags`` column in docs/outputs.md)."""
        ids = []
        for row in self.rows():
            flags = [f for f in str(row.get("flags") or "").split(";") if f]
            if flags and (flag is None or flag in flags):
                ids.append(int(row["sample_id"]))
        return ids

    def close(self) -> None:
        """Close the open shard files (reading again reopens them)."""
        self._members.close()

    def __enter__(self) -> StoredResults:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


@dataclass(frozen=True)
class ResumeState:
    """What a rerun of a job on a store can skip and what it must redo (see :func:`resume_state`).

    Attributes:
        done: sorted ids whose result has a mask made from the content their file has now: skip them.
        changed: sorted ids whose result was made from content their file no longer has (modified,
            replaced or deleted since): explain them again. Ids in neither (skipped samples, ids never
            written) are to be done as well.
    """

    done: np.ndarray
    changed: np.ndarray


def resume_state(root: str | os.PathLike[str], scan: ShardScan | None = None, *, path_key: str = "path") -> ResumeState:
    """Which stored samples a rerun can skip, and which no longer match their source file.

    A sample added with a ``fingerprint`` (:meth:`~neuromask_pl.store.ShardWriter.add`) is compared with
    :func:`~neuromask_pl.store.source_fingerprint` of the file its row names under ``path_key``, now;
    one that differs is changed. Samples added without a fingerprint, or whose row names no file, are
    never changed. Reads each such sample's row (one ``pread``) and stats its file.

    Args:
        root: the store directory.
        scan: a verified :func:`~neuromask_pl.store.scan_shards` result to reuse (after
            :meth:`~neuromask_pl.store.ShardScan.delete_bad`), instead of scanning again.
        path_key: the row key holding the sample's file name.
    """
    root = Path(root)
    scan = scan_shards(root, verify=True) if scan is None else scan
    index = build_index(scan, with_fingerprints=True)
    fingerprints = index.fingerprints
    changed = np.zeros(len(index), bool)
    members = MemberReader(root, index)
    try:
        for k in (k for k in range(len(index)) if fingerprints[k] is not None):
            path = members.row(k).get(path_key)
            changed[k] = isinstance(path, str) and path != "" and source_fingerprint(path) != fingerprints[k]
    finally:
        members.close()
    ids, has_mask = index.arrays["ids"], index.arrays["mask_nbytes"] >= 0
    return ResumeState(done=ids[has_mask & ~changed].copy(), changed=ids[changed].copy())


def read_manifest(output_dir: str | os.PathLike[str]) -> Iterator[dict[str, str]]:
    """The rows of a store's ``manifest.csv`` as text, one at a time, with file names exactly as written.

    ``csv.DictReader`` reads the same file; this also turns each cell that
    :func:`~neuromask_pl.store.merge_index` wrote as the literal of a file name's bytes (``b'caf\\xe9.png'``,
    for a name that is not UTF-8) back into the str that was stored (``os.fsencode`` of it gives those bytes).
    """
    with open(Path(output_dir) / MANIFEST_FILE, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield {key: from_manifest_cell(value) if isinstance(value, str) else value for key, value in row.items()}


def load_results(
    output_dir: str | os.PathLike[str], max_open_shards: int = 4, *, cls: type[StoredResults] = StoredResults
) -> StoredResults:
    """Open a store's explanations for reading (lazily; see :class:`StoredResults` for the memory bound).

    Uses ``index.npz`` when it matches the shards on disk. When it is missing or stale (the job has
    not finished, or shards were added or removed since :func:`~neuromask_pl.store.merge_index`), verifies
    the shards and builds the index in memory instead, with a warning; that reads every shard once and
    needs about three times the index's memory while sorting.

    Example:
        >>> with load_results("lightning_logs/version_0/explanations") as results:  # doctest: +SKIP
        ...     for sample_id, mask, row in results:
        ...         print(sample_id, mask.shape, row["target_name"])

    ``cls`` is the class of the reader returned (a subclass of :class:`StoredResults`, e.g.
    :class:`neuromask_pl.results.Results`, which :func:`neuromask_pl.load_results` returns).

    Raises:
        FileNotFoundError: no store in ``output_dir``.
        ValueError: unknown format version, or a damaged ``store.json`` / ``index.npz``.
    """
    root = Path(output_dir)
    read_store_info(root)
    index_path = root / INDEX_FILE
    if index_path.is_file():
        index = load_index(index_path)
        if set(complete_names(root / SHARDS_DIR)) == set(index.shards) | set(index.ignored):
            return cls(root, index, indexed=True, max_open_shards=max_open_shards)
        why = "is stale (shards were added or removed since merge_index)"
    else:
        why = "is missing (the job has not finished, or merge_index was not run)"
    scan = scan_shards(root, verify=True)
    warnings.warn(
        f"{index_path} {why}: reading {len(scan.good)} verified shards of '{root}' instead"
        + (f", ignoring {len(scan.bad)} damaged or incomplete ones" if scan.bad else "")
        + f"; call neuromask_pl.store.merge_index('{root}') to make opening fast",
        stacklevel=2,
    )
    return cls(root, build_index(scan), indexed=False, max_open_shards=max_open_shards)
