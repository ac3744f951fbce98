"""A crash-safe, sharded output store for dataset-wide explanation jobs (pure Python and numpy).

Built for jobs like "explain ImageNet-val (50,000 images) with DDP over many ranks, on a cluster
that may preempt or kill the job at any instant": every rank appends its masks and manifest rows
to its own shard files, nothing is ever rewritten in place, a rerun of the same command resumes,
and results are read back lazily with a small, stated memory footprint. No Lightning in here:
:class:`~neuromask_pl.callbacks.MaskWriter` drives it.

Layout of a store directory (other files in it are never touched)::

    store.json                       {"format": "neuromask-pl-store", "version": 1,
                                      "config_hash": ..., "created": ..., "neuromask_pl": ...}
    .lock                            while a job writes: {"host", "pid", "started", "token"}
    shards/
      r<rank:05d>-<seq:06d>-<session>.npz          one chunk of samples (a ZIP_STORED .npz)
      r<rank:05d>-<seq:06d>-<session>.npz.sha256   "<sha256>  <shard name>" (``sha256sum -c``)
    manifest.csv                     one row per sample id, sorted (written by merge_index)
    index.npz                        sample id -> shard and byte offsets (written by merge_index, last)

A shard is an uncompressed (stored) zip that ``numpy.load`` opens lazily. It holds one member per
sample and kind: ``m<id>.npy`` (the float16 H x W mask; absent for a sample recorded without a
mask, e.g. an unreadable image) and ``r<id>.json`` (its manifest row). Why this format: members
are stored, not compressed, so each one is a contiguous byte range of the file; the index keeps
that range (and the member's CRC-32), and reading one mask is a single ``os.pread`` of exactly
its bytes, whatever the shard size. Masks of different sizes can share a shard (a stacked .npy
could not), and the files stay readable by ``numpy.load(shard)["m<id>"]`` and ``zipfile``.

Crash safety: a shard is written to a temporary file in ``shards/``, flushed, fsynced, moved onto
its final name with ``os.replace`` and the directory is fsynced; only then is its ``.sha256``
sidecar written the same way. A shard counts as complete only when its sidecar exists and (when
verifying) matches. Whatever instant a job is killed at, it leaves complete verified shards plus at
most a temporary file (removed by the next :func:`open_store`) or a shard without its sidecar
(reported as incomplete by :func:`scan_shards`; the caller deletes it and redoes its samples).
Session tokens make shard names unique, so a rerun never overwrites an earlier shard.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import socket
import struct
import time
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "neuromask-pl-store"
FORMAT_VERSION = 1
INDEX_VERSION = 1
STORE_FILE = "store.json"
LOCK_FILE = ".lock"
INDEX_FILE = "index.npz"
MANIFEST_FILE = "manifest.csv"
SHARDS_DIR = "shards"
#: Bytes the reader's index holds per sample: id (int64), shard (int32), mask offset and size (2 x int64),
#: mask CRC (uint32), row offset (int64), row size (int32) and row CRC (uint32).
INDEX_BYTES_PER_SAMPLE = 48
MAX_CHUNK_SIZE = 30_000  # 2 members per sample; a plain zip holds at most 65,535 members

_SHARD_RE = re.compile(r"r(\d{5,})-(\d{6,})-([0-9a-z]{1,64})\.npz")
_MEMBER_RE = re.compile(r"(m)(\d+)\.npy|(r)(\d+)\.json")
_SIDECAR_RE = re.compile(r"([0-9a-f]{64})  (\S+)\n?")
_TEMP_RE = re.compile(r"\..+\.[0-9a-f]{8,32}\.tmp")
_ROOT_TEMP_RE = re.compile(r"\.(store\.json|index\.npz|manifest\.csv)\.[0-9a-f]{8,32}\.tmp")
_SESSION_RE = re.compile(r"[0-9a-z]{1,64}")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: same content, same bytes
_LOCAL_HEADER = 30  # size of a zip local file header before the name and the extra field
_HASH_BLOCK = 1 << 20


# -- small helpers ---------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    """Make a rename or creation in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", fsync: bool = False) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success move it onto ``path`` with ``os.replace``.

    A crash or an exception while writing leaves any existing ``path`` untouched and removes
    the temporary file. ``fsync=True`` also flushes the data to disk before the move.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    text = "b" not in mode
    try:
        with open(tmp, mode.replace("w", "x"), **({"newline": "", "encoding": "utf-8"} if text else {})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise


@contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """:func:`atomic_write` in bytes with fsync, then an fsync of the directory (so the rename is durable).

    A killed process leaves at most the temporary file ``.<name>.<hex>.tmp``.
    """
    with atomic_write(path, "wb", fsync=True) as f:
        yield f
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: Any) -> None:
    with _atomic_file(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


def _oserror_in(exc: BaseException) -> OSError | None:
    """The first OSError in an exception's chain (zipfile may wrap a failed write)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _clean_temps(directory: Path, pattern: re.Pattern[str], prefix: str = "") -> list[Path]:
    """Remove leftover temporary files of killed writers in ``directory`` (only names we create)."""
    removed = []
    if directory.is_dir():
        for name in os.listdir(directory):
            if name.startswith(prefix) and pattern.fullmatch(name):
                _unlink_quiet(directory / name)
                removed.append(directory / name)
    if removed:
        log.info("removed %d leftover temporary file(s) in %s", len(removed), directory)
    return removed


def config_hash(obj: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``obj``: sorted keys, compact, non-JSON values as ``str``."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- store metadata ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreInfo:
    """What ``store.json`` says about a store directory.

    Attributes:
        root: the store directory.
        version: format version (:data:`FORMAT_VERSION`).
        config_hash: the caller's hash of the configuration that produced the results.
        created: UTC time the store was created (ISO 8601).
        resumed: True when :func:`open_store` found an existing store of the same configuration.
    """

    root: Path
    version: int
    config_hash: str
    created: str
    resumed: bool = False


def _old_layout(root: Path) -> bool:
    """Whether ``root`` holds results in the pre-store layout (``masks/*.npy`` and/or ``manifest.csv``)."""
    if (root / STORE_FILE).exists():
        return False
    masks = root / "masks"
    if masks.is_dir():
        with os.scandir(masks) as entries:
            if any(e.name.endswith(".npy") for e in entries):
                return True
    return (root / MANIFEST_FILE).is_file()


def _old_layout_message(root: Path) -> str:
    return (
        f"'{root}' holds explanations in the older neuromask-pl layout (masks/<id>.npy and manifest.csv, "
        "no store.json), which this version neither resumes nor overwrites. Write the new results to another "
        "output directory, or move the old masks/ and manifest.csv away first; the old masks stay readable "
        "with numpy.load."
    )


def read_store_info(root: str | os.PathLike[str]) -> StoreInfo:
    """Read and check ``store.json``.

    Raises:
        FileNotFoundError: ``root`` holds no store.
        ValueError: the folder holds the older layout, or ``store.json`` is damaged, foreign, or of an
            unknown (e.g. newer) format version.
    """
    root = Path(root)
    path = root / STORE_FILE
    if not path.is_file():
        if root.is_dir() and _old_layout(root):
            raise ValueError(_old_layout_message(root))
        raise FileNotFoundError(
            f"no neuromask-pl results in '{root}' (no {STORE_FILE}): pass the output directory of a neuromask-pl job"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"'{path}' is damaged ({err}); delete it together with shards/, index.npz and manifest.csv to "
            "start over, or use another output directory"
        ) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"'{path}' is not a neuromask-pl store file; use another output directory")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"'{path}' has an unknown store format version {version!r}; use another output directory")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"'{root}' was written by a newer neuromask-pl (store format version {version}; this version reads "
            f"version {FORMAT_VERSION}): upgrade neuromask-pl to read or resume it, or use another output directory"
        )
    hash_ = meta.get("config_hash")
    if not isinstance(hash_, str):
        raise ValueError(f"'{path}' has no config_hash; use another output directory")
    return StoreInfo(root=root, version=version, config_hash=hash_, created=str(meta.get("created", "")))


def _delete_store_files(root: Path) -> int:
    """Delete what a store wrote (shards, sidecars, temporary files, index, manifest); nothing else."""
    count = 0
    shards = root / SHARDS_DIR
    if shards.is_dir():
        for name in os.listdir(shards):
            base = name[: -len(".sha256")] if name.endswith(".sha256") else name
            if _SHARD_RE.fullmatch(base) or _TEMP_RE.fullmatch(name):
                _unlink_quiet(shards / name)
                count += 1
    for name in (INDEX_FILE, MANIFEST_FILE):
        if (root / name).exists():
            _unlink_quiet(root / name)
            count += 1
    _clean_temps(root, _ROOT_TEMP_RE)
    return count


def _create_store(root: Path, hash_: str) -> StoreInfo:
    created = _now()
    from neuromask_pl import __version__

    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config_hash": hash_,
        "created": created,
        "neuromask_pl": __version__,
    }
    _write_json(root / STORE_FILE, meta)
    (root / SHARDS_DIR).mkdir(exist_ok=True)
    _fsync_dir(root)
    return StoreInfo(root=root, version=FORMAT_VERSION, config_hash=hash_, created=created)


def open_store(root: str | os.PathLike[str], config_hash: str, overwrite: bool = False) -> StoreInfo:
    """Create a store in ``root`` or check that the one there belongs to this configuration.

    Call it under :class:`StoreLock`, before any writer of the job starts: it also removes the
    temporary files that killed writers left behind. Files in ``root`` that the store did not write
    are never touched.

    Args:
        root: the output directory (created if needed; it may hold unrelated files).
        config_hash: identifies the configuration (model, settings, data); see :func:`config_hash`.
        overwrite: when ``root`` holds results of *another* configuration, delete them (shards, index,
            manifest) and start a new store. Results of the *same* configuration are always kept and
            resumed, so rerunning the same command after a preemption never loses work.

    Returns:
        The store's :class:`StoreInfo` (``resumed=True`` when results of this configuration were found).

    Raises:
        ValueError: another configuration's results without ``overwrite``; the older layout; an unknown
            or newer format version; a damaged ``store.json``; shards without ``store.json``; ``root`` is
            not a directory or cannot be created.
    """
    if not isinstance(config_hash, str) or not config_hash:
        raise ValueError(f"config_hash must be a non-empty string, got {config_hash!r}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"the output directory '{root}' is a file; pass a directory")
    if (root / STORE_FILE).exists():
        info = read_store_info(root)
        if info.config_hash == config_hash:
            info = StoreInfo(root, info.version, info.config_hash, info.created, resumed=True)
        elif not overwrite:
            raise ValueError(
                f"'{root}' holds neuromask-pl results for another configuration (or model): config hash "
                f"{info.config_hash[:12]} there, {config_hash[:12]} now. Pass overwrite=True to delete those "
                "results (shards, index and manifest) and start over, or use another output directory."
            )
        else:
            count = _delete_store_files(root)
            log.warning(
                "overwrite=True: deleted %d result file(s) of configuration %s in %s",
                count,
                info.config_hash[:12],
                root,
            )
            info = _create_store(root, config_hash)
        _clean_temps(root, _ROOT_TEMP_RE)
        _clean_temps(root / SHARDS_DIR, _TEMP_RE)
        return info
    if root.is_dir():
        if _old_layout(root):
            raise ValueError(_old_layout_message(root))
        shards = root / SHARDS_DIR
        if shards.is_dir() and any(_SHARD_RE.fullmatch(n) for n in os.listdir(shards)):
            if not overwrite:
                raise ValueError(
                    f"'{shards}' holds shard files but '{root / STORE_FILE}' is missing, so their configuration "
                    "is unknown: pass overwrite=True to delete them, or use another output directory"
                )
            _delete_store_files(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _clean_temps(root, _ROOT_TEMP_RE)
        _clean_temps(root / SHARDS_DIR, _TEMP_RE)
        return _create_store(root, config_hash)
    except OSError as err:
        raise ValueError(
            f"cannot create the neuromask-pl store in '{root}': {err.strerror or err}. "
            "Pass an output directory you can create and write to."
        ) from err


# -- lock -------------------------------------------------------------------------------------------
class StoreLock:
    """Exclusive lock on a store directory: the file ``root/.lock`` created with ``O_CREAT | O_EXCL``.

    The file holds ``{"host", "pid", "started", "token"}``. A lock held by a live process on this host,
    or by any process on another host (whose liveness cannot be checked), is refused with a
    RuntimeError; a lock left by a dead process of this host is taken over with a logged warning.
    Use as a context manager or with :meth:`acquire` / :meth:`release`; :meth:`release` deletes the
    file only while it is still this lock's. In a DDP job only global rank 0 takes it.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.token = secrets.token_hex(8)
        self.held = False

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _record(self) -> bytes:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "token": self.token}
        return json.dumps(record).encode("utf-8")

    def _read_holder(self) -> dict[str, Any] | None:
        """The lock file's record; None when it is unreadable after a short wait (a dead half-written lock)."""
        for attempt in range(5):
            try:
                holder = json.loads(self.path.read_bytes())
                if isinstance(holder, dict):
                    return holder
            except FileNotFoundError:
                return {}
            except (OSError, ValueError):
                pass
            time.sleep(0.05 * (attempt + 1))  # the holder may be between creating and writing it
        return None

    def acquire(self) -> None:
        """Take the lock (creating ``root`` if needed).

        Raises:
            RuntimeError: another live neuromask-pl job holds it.
        """
        if self.held:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder == {}:  # released meanwhile
                    continue
                self._take_over_if_stale(holder)
                continue
            try:
                os.write(fd, self._record())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                _unlink_quiet(self.path)  # never leave an empty lock behind
                raise
            os.close(fd)
            self.held = True
            return
        raise RuntimeError(f"could not take the lock '{self.path}' (it keeps changing); retry")

    def _take_over_if_stale(self, holder: dict[str, Any] | None) -> None:
        if holder is not None:
            host, pid = holder.get("host"), holder.get("pid")
            alive = True
            if host == socket.gethostname() and isinstance(pid, int) and pid > 0:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    alive = False
                except PermissionError:
                    alive = True  # exists, another user's
            if alive:
                raise RuntimeError(
                    f"another neuromask-pl job (pid {pid} on host {host} since {holder.get('started')}) is "
                    f"writing to {self.root}; wait for it or remove {self.path} if it is dead"
                )
        # Stale: move it aside under a unique name (only one taker can), check it is the one judged stale.
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_bytes())
        except (OSError, ValueError):
            moved = None
        if holder is not None and moved != holder:  # a fresh lock taken meanwhile: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            _unlink_quiet(aside)
            raise RuntimeError(
                f"another neuromask-pl job took the lock of {self.root} just now; wait for it or remove "
                f"{self.path} if it is dead"
            )
        _unlink_quiet(aside)
        what = (
            "an unreadable lock file"
            if holder is None
            else (
                f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}, no longer running"
            )
        )
        log.warning("took over the stale lock of %s (%s)", self.root, what)

    def release(self) -> None:
        """Delete the lock file if it is still this lock's."""
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return
        if isinstance(holder, dict) and holder.get("token") == self.token:
            _unlink_quiet(self.path)


# -- writing ----------------------------------------------------------------------------------------
_SCALARS = (str, int, float, bool, type(None))


def _clean_row(sample_id: int, row: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"sample_id": sample_id}
    for key, value in (row or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"row keys must be strings, got {key!r} for sample {sample_id}")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, _SCALARS):
            raise TypeError(
                f"row value {key!r} of sample {sample_id} is a {type(value).__name__}; "
                "rows hold str, int, float, bool or None"
            )
        if key == "sample_id" and value != sample_id:
            raise ValueError(f"row['sample_id'] is {value!r} but the sample id is {sample_id}")
        out[key] = value
    return out


class ShardWriter:
    """Buffer one rank's per-sample results and write them as shards of ``chunk_size`` samples.

    Each shard is ``root/shards/r<rank:05d>-<seq:06d>-<session>.npz`` plus its ``.sha256`` sidecar
    (see the module docstring for the format and the crash guarantees). ``seq`` counts this writer's
    shards from 0; ``session`` is unique per writer (UTC time plus random hex) unless given, so a
    rerun never overwrites an earlier shard. A sample id added twice to one writer is written once
    (the first time). Memory: up to ``chunk_size`` buffered float16 masks plus one encoded member.

    Args:
        root: a store directory made by :func:`open_store`.
        rank: this process's global rank (>= 0); one writer per rank at a time.
        chunk_size: samples per shard (1 to 30,000).
        session: shard name token, ``[0-9a-z]{1,64}``; later sessions (greater tokens) win duplicate ids
            in :func:`merge_index`. A DDP job may share rank 0's token across ranks.

    Raises:
        ValueError: bad arguments, or ``root`` is not a store.
    """

    def __init__(
        self, root: str | os.PathLike[str], rank: int, chunk_size: int = 256, session: str | None = None
    ) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be an int in [1, {MAX_CHUNK_SIZE}], got {chunk_size!r}")
        if session is None:
            session = time.strftime("%Y%m%d%H%M%S", time.gmtime()) + secrets.token_hex(4)
        if not isinstance(session, str) or not _SESSION_RE.fullmatch(session):
            raise ValueError(f"session must match [0-9a-z]{{1,64}}, got {session!r}")
        self.root = Path(root)
        if not (self.root / STORE_FILE).is_file():
            raise ValueError(f"'{self.root}' is not a neuromask-pl store: call open_store(root, config_hash) first")
        self.dir = self.root / SHARDS_DIR
        self.dir.mkdir(exist_ok=True)
        _clean_temps(self.dir, _TEMP_RE, prefix=f".r{rank:05d}-")
        mine = re.compile(rf"r0*{rank}-\d{{6,}}-{session}\.npz(\.sha256)?")
        if any(mine.fullmatch(name) for name in os.listdir(self.dir)):
            raise ValueError(
                f"rank {rank} already wrote shards of session {session!r} in '{self.dir}'; pass a new session "
                "token (or None for a fresh one) so that no earlier shard is overwritten"
            )
        self.rank = rank
        self.chunk_size = chunk_size
        self.session = session
        self.shards: list[Path] = []  # written by this writer, in order
        self.samples_written = 0
        self._seq = 0
        self._buffer: list[tuple[int, np.ndarray | None, bytes]] = []
        self._seen: set[int] = set()
        self._closed = False
        self._failed: str | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:  # keep the finished samples of a failing run
            self.close()
        except Exception as err:  # noqa: BLE001 - the original exception matters more
            log.warning("could not write the last buffered samples: %s", err)
            self.abort()

    @property
    def pending(self) -> int:
        """Samples buffered and not yet written."""
        return len(self._buffer)

    def _check_open(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"this ShardWriter stopped after an earlier write error: {self._failed}")
        if self._closed:
            raise RuntimeError("this ShardWriter is closed")

    def add(self, sample_id: int, mask: np.ndarray | None, row: Mapping[str, Any] | None = None) -> None:
        """Buffer one sample; writes a shard when ``chunk_size`` samples are buffered.

        Args:
            sample_id: the sample's stable id (int >= 0).
            mask: H x W floats (stored as float16), or None for a sample without a mask (e.g. skipped).
            row: its manifest row, str keys to str/int/float/bool/None values; ``sample_id`` is added.
        """
        self._check_open()
        if isinstance(sample_id, np.integer):
            sample_id = int(sample_id)
        if not isinstance(sample_id, int) or isinstance(sample_id, bool) or sample_id < 0:
            raise ValueError(f"sample_id must be an int >= 0, got {sample_id!r}")
        data = None
        if mask is not None:
            array = np.asarray(mask)
            if array.ndim != 2 or array.dtype.kind not in "fiub":
                raise ValueError(
                    f"mask of sample {sample_id} must be a 2-D (H, W) array of numbers, got "
                    f"shape {array.shape} and dtype {array.dtype}"
                )
            data = np.array(array, dtype=np.float16, order="C", copy=True)
        encoded = json.dumps(_clean_row(sample_id, row), separators=(",", ":")).encode("utf-8")
        if sample_id in self._seen:
            log.debug("rank %d: sample %d was already written in this session; ignored", self.rank, sample_id)
            return
        self._seen.add(sample_id)
        self._buffer.append((sample_id, data, encoded))
        if len(self._buffer) >= self.chunk_size:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered samples as one shard now; returns its path (None when nothing was buffered)."""
        self._check_open()
        if not self._buffer:
            return None
        records, self._buffer = sorted(self._buffer, key=lambda r: r[0]), []
        name = f"r{self.rank:05d}-{self._seq:06d}-{self.session}.npz"
        path = self.dir / name
        try:
            self._write_shard(path, records)
        except BaseException as exc:
            # A shard (or sidecar) of this failed write: the name is new, so never an earlier shard.
            _unlink_quiet(path)
            _unlink_quiet(path.with_name(name + ".sha256"))
            err = _oserror_in(exc)
            if err is None:  # e.g. KeyboardInterrupt: keep the samples, close() may still write them
                self._buffer = records + self._buffer
                raise
            self._failed = self._describe_failure(err, path, records)
            raise OSError(err.errno, self._failed) from exc
        self._seq += 1
        self.shards.append(path)
        self.samples_written += len(records)
        return path

    @staticmethod
    def _describe_failure(err: OSError, path: Path, records: list) -> str:
        what = f"shard {path} ({len(records)} samples, ids {records[0][0]}..{records[-1][0]})"
        if err.errno == errno.ENOSPC:
            return (
                f"no space left on device while writing {what}; free space and rerun the same command: "
                "finished shards are kept"
            )
        if err.errno == getattr(errno, "EDQUOT", -1):
            return (
                f"disk quota exceeded while writing {what}; free space or raise the quota and rerun the "
                "same command: finished shards are kept"
            )
        return (
            f"could not write {what}: {err.strerror or err}; fix the cause and rerun the same command: "
            "finished shards are kept"
        )

    def _write_shard(self, path: Path, records: list[tuple[int, np.ndarray | None, bytes]]) -> None:
        with _atomic_file(path) as f:
            archive = zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
            try:
                for sample_id, mask, row in records:
                    if mask is not None:
                        archive.writestr(_zip_info(f"m{sample_id}.npy"), _npy_bytes(mask))
                    archive.writestr(_zip_info(f"r{sample_id}.json"), row)
                archive.close()
            except BaseException:
                try:
                    archive.close()
                except BaseException:  # noqa: BLE001 - the first error is the one reported
                    pass
                raise
        digest = _sha256_file(path)
        with _atomic_file(path.with_name(path.name + ".sha256")) as f:
            f.write(f"{digest}  {path.name}\n".encode("ascii"))

    def close(self) -> None:
        """Write the buffered samples (if any) and close; closing twice, or after a failure, does nothing."""
        if self._closed or self._failed is not None:
            self._closed = True
            return
        try:
            self.flush()
        finally:
            self._closed = True

    def abort(self) -> None:
        """Drop the buffered samples without writing them and close."""
        self._buffer = []
        self._closed = True


# -- scanning ---------------------------------------------------------------------------------------
@dataclass
class ShardInfo:
    """A complete shard and where each sample's members lie in it (arrays sorted by sample id).

    ``mask_nbytes`` is -1 for samples recorded without a mask; offsets are byte offsets of the member
    data in the file, CRCs the zip's CRC-32 of it.
    """

    name: str
    path: Path
    rank: int
    seq: int
    session: str
    size: int
    sha256: str | None  # None when scanned with verify=False
    ids: np.ndarray
    mask_offset: np.ndarray
    mask_nbytes: np.ndarray
    mask_crc: np.ndarray
    row_offset: np.ndarray
    row_nbytes: np.ndarray
    row_crc: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def mask_ids(self) -> np.ndarray:
        """Ids of the samples that have a mask."""
        return self.ids[self.mask_nbytes >= 0]


@dataclass
class BadShard:
    """A shard (or sidecar) that must not be used: ``kind`` is "corrupt" or "incomplete"."""

    path: Path
    kind: str
    reason: str


@dataclass
class ShardScan:
    """What :func:`scan_shards` found.

    Attributes:
        root: the store directory.
        good: complete shards (verified when scanned with ``verify=True``), sorted by name.
        bad: corrupt shards (checksum mismatch, truncated, unreadable) and incomplete ones (no sidecar, or
            a sidecar without its shard). Their samples must be redone: delete them with :meth:`delete_bad`.
        temp_files: leftover temporary files of killed writers (removed when scanned with ``clean=True``).
    """

    root: Path
    good: list[ShardInfo] = field(default_factory=list)
    bad: list[BadShard] = field(default_factory=list)
    temp_files: list[Path] = field(default_factory=list)

    @property
    def ids(self) -> np.ndarray:
        """Sorted unique ids of the samples in good shards (with or without a mask): the done ids."""
        parts = [s.ids for s in self.good]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    @property
    def mask_ids(self) -> np.ndarray:
        """Sorted unique ids of the samples with a mask in good shards."""
        parts = [s.mask_ids for s in self.good]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)

    def delete_bad(self) -> int:
        """Delete the bad shards and their sidecars (only while no writer runs); returns files deleted."""
        count = 0
        for bad in self.bad:
            shard = bad.path.with_name(bad.path.name.removesuffix(".sha256"))
            for path in (shard, shard.with_name(shard.name + ".sha256")):
                if path.exists():
                    _unlink_quiet(path)
                    count += 1
        if count:
            _fsync_dir(self.root / SHARDS_DIR)
            log.warning(
                "deleted %d damaged or incomplete shard file(s) in %s; their samples will be redone",
                count,
                self.root / SHARDS_DIR,
            )
        return count


class _Corrupt(Exception):
    pass


def _data_offset(f: IO[bytes], info: zipfile.ZipInfo, size: int) -> int:
    """Byte offset of a stored member's data, from its local header; checks it lies inside the file."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        raise _Corrupt(f"member {info.filename} is compressed or encrypted")
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER)
    if len(header) < _LOCAL_HEADER or header[:4] != b"PK\x03\x04":
        raise _Corrupt(f"bad local header of member {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    if f.read(name_len) != info.filename.encode("utf-8"):
        raise _Corrupt(f"local header of member {info.filename} names another file")
    offset = info.header_offset + _LOCAL_HEADER + name_len + extra_len
    if offset + info.file_size > size or info.file_size != info.compress_size:
        raise _Corrupt(f"member {info.filename} runs past the end of the file")
    return offset


def _member_table(f: IO[bytes], size: int) -> dict[str, np.ndarray]:
    """Parse a shard's zip directory and local headers: per sample id, member data offsets, sizes and CRCs."""
    try:
        infos = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, struct.error) as err:
        raise _Corrupt(f"not a readable zip archive ({err})") from err
    rows: dict[int, tuple[int, int, int]] = {}
    masks: dict[int, tuple[int, int, int]] = {}
    for info in infos:
        match = _MEMBER_RE.fullmatch(info.filename)
        if match is None:
            continue  # not ours: ignored
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise _Corrupt(f"member {info.filename} is compressed or encrypted")
        offset = _data_offset(f, info, size)
        table = masks if match.group(1) else rows
        sample_id = int(match.group(2) or match.group(4))
        if sample_id in table:
            raise _Corrupt(f"member {info.filename} appears twice")
        table[sample_id] = (offset, info.file_size, info.CRC)
    if not rows:
        raise _Corrupt("no samples in it")
    if not masks.keys() <= rows.keys():
        raise _Corrupt(f"masks without a manifest row: {sorted(masks.keys() - rows.keys())[:5]}")
    ids = np.array(sorted(rows), dtype=np.int64)
    row = np.array([rows[i] for i in ids.tolist()], dtype=np.int64).reshape(-1, 3)
    mask = np.array([masks.get(i, (0, -1, 0)) for i in ids.tolist()], dtype=np.int64).reshape(-1, 3)
    return {
        "ids": ids,
        "mask_offset": mask[:, 0].copy(),
        "mask_nbytes": mask[:, 1].copy(),
        "mask_crc": mask[:, 2].astype(np.uint32),
        "row_offset": row[:, 0].copy(),
        "row_nbytes": row[:, 1].astype(np.int32),
        "row_crc": row[:, 2].astype(np.uint32),
    }


def _read_sidecar(path: Path, name: str) -> str:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise _Corrupt(f"unreadable checksum file ({err})") from err
    match = _SIDECAR_RE.fullmatch(text)
    if match is None or match.group(2) != name:
        raise _Corrupt("malformed checksum file")
    return match.group(1)


def _scan_one(path: Path, verify: bool) -> ShardInfo:
    rank, seq, session = _SHARD_RE.fullmatch(path.name).groups()  # type: ignore[union-attr]
    expected = _read_sidecar(path.with_name(path.name + ".sha256"), path.name)
    digest = None
    if verify:
        digest = _sha256_file(path)
        if digest != expected:
            raise _Corrupt("checksum mismatch (truncated or modified after it was written)")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        table = _member_table(f, size)
    return ShardInfo(
        name=path.name, path=path, rank=int(rank), seq=int(seq), session=session, size=size, sha256=digest, **table
    )


def _complete_names(shards: Path) -> list[str]:
    """Names of shards that have a sidecar (complete unless damaged); no file is read."""
    if not shards.is_dir():
        return []
    names = set(os.listdir(shards))
    return sorted(n for n in names if _SHARD_RE.fullmatch(n) and n + ".sha256" in names)


def scan_shards(root: str | os.PathLike[str], *, verify: bool = True, clean: bool = False) -> ShardScan:
    """List the shards of a store and sort them into good and bad.

    Args:
        root: the store directory.
        verify: hash every shard (reads each file once) and compare with its sidecar. Without it only
            the zip structure is checked (a truncated shard is caught, a flipped bit may not be).
        clean: remove leftover temporary files; only while no writer of this store runs.

    Returns:
        A :class:`ShardScan`. Nothing is deleted except temporary files (``clean=True``); call
        :meth:`ShardScan.delete_bad` to delete bad shards before redoing their samples.
    """
    root = Path(root)
    shards = root / SHARDS_DIR
    scan = ShardScan(root=root)
    names = set(os.listdir(shards)) if shards.is_dir() else set()
    for name in sorted(names):
        path = shards / name
        if _TEMP_RE.fullmatch(name):
            scan.temp_files.append(path)
        elif _SHARD_RE.fullmatch(name):
            if name + ".sha256" not in names:
                scan.bad.append(BadShard(path, "incomplete", "no checksum file (its writer stopped before finishing)"))
                continue
            try:
                scan.good.append(_scan_one(path, verify))
            except _Corrupt as err:
                scan.bad.append(BadShard(path, "corrupt", str(err)))
            except FileNotFoundError:
                scan.bad.append(BadShard(path, "incomplete", "deleted while scanning"))
        elif name.endswith(".sha256") and _SHARD_RE.fullmatch(name[:-7]) and name[:-7] not in names:
            scan.bad.append(BadShard(path, "incomplete", "checksum file without its shard"))
    if clean:
        for path in scan.temp_files:
            _unlink_quiet(path)
        scan.temp_files = []
    for bad in scan.bad:
        log.info("shard %s is %s: %s", bad.path.name, bad.kind, bad.reason)
    return scan


# -- index ------------------------------------------------------------------------------------------
_INDEX_ARRAYS = {
    "ids": np.int64,
    "shard": np.int32,
    "mask_offset": np.int64,
    "mask_nbytes": np.int64,
    "mask_crc": np.uint32,
    "row_offset": np.int64,
    "row_nbytes": np.int32,
    "row_crc": np.uint32,
}


@dataclass
class _Index:
    arrays: dict[str, np.ndarray]  # _INDEX_ARRAYS, one entry per sample, sorted by id
    shards: list[str]  # good shard names (position = the "shard" number)
    sizes: list[int]
    sha256: list[str | None]
    ignored: list[str]  # complete (sidecar present) shards that failed verification when it was built
    duplicates: int = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def _build_index(scan: ShardScan) -> _Index:
    """One index entry per sample id, sorted by id.

    A duplicated id keeps the copy with a mask over one without, then the later session, then the lower
    rank, then the lower sequence number.
    """
    good = sorted(scan.good, key=lambda s: s.name)
    preference = sorted(range(len(good)), key=lambda k: (good[k].rank, good[k].seq))
    preference.sort(key=lambda k: good[k].session, reverse=True)  # stable: ties keep (rank, seq) order
    rank_of = np.empty(len(good), np.int64)
    rank_of[preference] = np.arange(len(good))
    if good:
        cat = {key: np.concatenate([getattr(s, key) for s in good]) for key in _INDEX_ARRAYS if key != "shard"}
        cat["shard"] = np.concatenate([np.full(len(s), k, np.int32) for k, s in enumerate(good)])
    else:
        cat = {key: np.zeros(0, dtype) for key, dtype in _INDEX_ARRAYS.items()}
    order = np.lexsort((rank_of[cat["shard"]], cat["mask_nbytes"] < 0, cat["ids"]))
    ids = cat["ids"][order]
    first = np.ones(len(ids), bool)
    first[1:] = ids[1:] != ids[:-1]
    keep = order[first]
    arrays = {key: np.ascontiguousarray(cat[key][keep], dtype=dtype) for key, dtype in _INDEX_ARRAYS.items()}
    return _Index(
        arrays=arrays,
        shards=[s.name for s in good],
        sizes=[s.size for s in good],
        sha256=[s.sha256 for s in good],
        ignored=sorted(b.path.name for b in scan.bad if b.kind == "corrupt"),
        duplicates=int(len(ids) - len(keep)),
    )


def _save_index(path: Path, index: _Index, info: StoreInfo) -> None:
    meta = {
        "index_version": INDEX_VERSION,
        "config_hash": info.config_hash,
        "shards": index.shards,
        "sizes": index.sizes,
        "sha256": index.sha256,
        "ignored": index.ignored,
    }
    with _atomic_file(path) as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key in _INDEX_ARRAYS:
                archive.writestr(_zip_info(f"{key}.npy"), _npy_bytes(index.arrays[key]))
            archive.writestr(_zip_info("shards.json"), json.dumps(meta, sort_keys=True).encode("utf-8"))


def _read_index_members(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read index.npz straight into its final arrays (no intermediate copies), checking each member's CRC."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            infos = zipfile.ZipFile(f).infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, struct.error) as err:
            raise _Corrupt(f"not a readable zip archive ({err})") from err
        for info in infos:
            offset = _data_offset(f, info, size)
            f.seek(offset)
            if info.filename == "shards.json":
                data = f.read(info.file_size)
                if zlib.crc32(data) != info.CRC:
                    raise _Corrupt("CRC mismatch in shards.json")
                meta = json.loads(data)
                continue
            key = info.filename.removesuffix(".npy")
            if key not in _INDEX_ARRAYS:
                continue
            head = f.read(min(info.file_size, 4096))
            shape, fortran, dtype, start = _npy_header(head, cache=False)
            array = np.empty(shape, dtype=dtype)
            view = memoryview(array).cast("B")
            f.seek(offset + start)
            if f.readinto(view) != array.nbytes or start + array.nbytes != info.file_size:
                raise _Corrupt(f"member {info.filename} is short")
            if zlib.crc32(view, zlib.crc32(head[:start])) != info.CRC:
                raise _Corrupt(f"CRC mismatch in {info.filename}")
            if array.dtype != _INDEX_ARRAYS[key] or array.ndim != 1:
                raise _Corrupt(f"member {info.filename} has dtype {array.dtype} and shape {array.shape}")
            arrays[key] = array
    return meta, arrays


def _load_index(path: Path) -> _Index:
    try:
        meta, arrays = _read_index_members(path)
        if meta.get("index_version") != INDEX_VERSION:
            raise ValueError(f"unknown index version {meta.get('index_version')!r}")
        if arrays.keys() != _INDEX_ARRAYS.keys():
            raise ValueError(f"members missing: {sorted(_INDEX_ARRAYS.keys() - arrays.keys())}")
    except (OSError, ValueError, _Corrupt) as err:
        raise ValueError(
            f"'{path}' is damaged or of another version ({err}); delete it and call merge_index(...) again"
        ) from err
    if len({len(a) for a in arrays.values()}) != 1 or len(meta["shards"]) != len(meta["sizes"]):
        raise ValueError(f"'{path}' is inconsistent; delete it and call merge_index(...) again")
    for array in arrays.values():
        array.flags.writeable = False
    return _Index(
        arrays=arrays,
        shards=list(meta["shards"]),
        sizes=list(meta["sizes"]),
        sha256=list(meta["sha256"]),
        ignored=list(meta["ignored"]),
    )


@dataclass
class MergeReport:
    """What :func:`merge_index` wrote: sample and shard counts, duplicates dropped, bad shards ignored."""

    samples: int
    shards: int
    duplicates: int
    bad: list[BadShard]
    index_path: Path
    manifest_path: Path


def merge_index(
    root: str | os.PathLike[str], columns: Sequence[str] | None = None, *, scan: ShardScan | None = None
) -> MergeReport:
    """Index the verified shards and write ``manifest.csv`` then ``index.npz``, both atomically.

    Every sample id maps to exactly one shard; an id found in several shards (DistributedSampler
    padding, a redone chunk) keeps, in order of preference, the copy with a mask, the later session,
    the lower rank, the lower sequence number. Bad shards are ignored (and named in a warning).
    Deterministic: the same shards give byte-identical files, so calling it again is harmless.
    Memory: the index (:data:`INDEX_BYTES_PER_SAMPLE` per sample, about three times that while sorting);
    rows are streamed from the shards to the CSV one at a time.

    Args:
        root: the store directory (run it on one process, after every writer closed).
        columns: manifest columns in order; None means every key seen, in order of first appearance
            (``sample_id`` first). Values missing from a row are left empty, keys not listed are dropped.
        scan: a verified :func:`scan_shards` result to reuse instead of scanning again.
    """
    root = Path(root)
    info = read_store_info(root)
    scan = scan_shards(root, verify=True) if scan is None else scan
    if scan.bad:
        log.warning(
            "merge_index: ignored %d damaged or incomplete shard(s) in %s (%s); rerun the job to redo their samples",
            len(scan.bad),
            root / SHARDS_DIR,
            ", ".join(b.path.name for b in scan.bad[:5]),
        )
    index = _build_index(scan)
    with Results(root, index, indexed=True, max_open_shards=4) as results:
        if columns is None:
            seen: dict[str, None] = {"sample_id": None}
            for row in results.rows:
                seen.update(dict.fromkeys(row))
            columns = list(seen)
        with _atomic_file(root / MANIFEST_FILE) as f:
            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            writer = csv.DictWriter(text, fieldnames=list(columns), restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(results.rows)
            text.flush()
            text.detach()
    _save_index(root / INDEX_FILE, index, info)
    log.info(
        "merge_index: %d samples from %d shards (%d duplicates dropped) in %s",
        len(index.arrays["ids"]),
        len(index.shards),
        index.duplicates,
        root,
    )
    return MergeReport(
        samples=len(index.arrays["ids"]),
        shards=len(index.shards),
        duplicates=index.duplicates,
        bad=scan.bad,
        index_path=root / INDEX_FILE,
        manifest_path=root / MANIFEST_FILE,
    )


# -- reading ----------------------------------------------------------------------------------------
def _pread(fd: int, nbytes: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, nbytes, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - platforms without pread
    return os.read(fd, nbytes)


_HEADER_CACHE: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int]] = {}


def _npy_header(data: bytes, cache: bool = True) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and data start of a .npy member; headers seen before skip numpy's parser."""
    major = data[6] if len(data) > 7 else 0
    end = 10 + int.from_bytes(data[8:10], "little") if major == 1 else 12 + int.from_bytes(data[8:12], "little")
    key = data[:end]
    parsed = _HEADER_CACHE.get(key)
    if parsed is None:
        stream = io.BytesIO(key)
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(stream)
        parsed = (tuple(shape), bool(fortran), dtype, end)
        if cache and len(_HEADER_CACHE) < 64:  # masks of a store share a handful of shapes
            _HEADER_CACHE[key] = parsed
    return parsed


class Results:
    """Lazy, memory-bounded reader of a store's explanations; see :func:`load_results`.

    Memory bound (N samples, S shards, H x W the largest mask, measured with ``tracemalloc`` in the
    tests): peak bytes <= 48·N + 1024·S + 6·H·W + the largest row's JSON + 64 KiB, whatever the
    shard size and ``max_open_shards``. Where it goes:

    - the index: :data:`INDEX_BYTES_PER_SAMPLE` = 48 bytes per sample (2.4 MB for 50,000), read from
      ``index.npz`` straight into its arrays, plus each shard's name, size and checksum (with what
      opening reads transiently, under 1 KiB per shard);
    - open shards: at most ``max_open_shards`` file descriptors, no file buffers: every read is one
      ``os.pread`` of exactly one member (never a whole shard, never a shard's directory);
    - one ``mask()``: the member's bytes (2·H·W + 128) and the float32 result (4·H·W); one ``row()``:
      its JSON. Masks and rows are never cached.

    Without ``index.npz`` (see :func:`load_results`) building the index needs about three times its
    final size while sorting. Not thread-safe: use one Results per thread (forked DataLoader workers
    may share one, as reads carry their own offsets).
    """

    def __init__(self, root: Path, index: _Index, *, indexed: bool, max_open_shards: int = 4) -> None:
        if not isinstance(max_open_shards, int) or max_open_shards < 1:
            raise ValueError(f"max_open_shards must be an int >= 1, got {max_open_shards!r}")
        self.root = root
        self.indexed = indexed  # False: built from the shards because index.npz was missing or stale
        self.max_open_shards = max_open_shards
        self._index = index
        self._a = index.arrays
        self._open: OrderedDict[int, int] = OrderedDict()  # shard number -> fd, least recently used first

    # -- container protocol
    def __len__(self) -> int:
        return len(self._a["ids"])

    def __repr__(self) -> str:
        return f"Results({len(self)} samples in {len(self._index.shards)} shards at '{self.root}')"

    @property
    def ids(self) -> np.ndarray:
        """Sorted sample ids (read-only int64 array)."""
        ids = self._a["ids"].view()
        ids.flags.writeable = False
        return ids

    @property
    def index_nbytes(self) -> int:
        """Bytes held by the per-sample index arrays."""
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
    def _fd(self, shard: int) -> int:
        fd = self._open.get(shard)
        if fd is not None:
            self._open.move_to_end(shard)
            return fd
        path = self.root / SHARDS_DIR / self._index.shards[shard]
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"shard '{path}' listed in the index is missing; call merge_index('{self.root}') again"
            ) from err
        if os.fstat(fd).st_size != self._index.sizes[shard]:
            os.close(fd)
            raise RuntimeError(
                f"shard '{path}' changed size since it was indexed; run scan_shards/merge_index on "
                f"'{self.root}' again (and rerun the job to redo damaged shards)"
            )
        while len(self._open) >= self.max_open_shards:
            os.close(self._open.popitem(last=False)[1])
        self._open[shard] = fd
        return fd

    def _member(self, k: int, kind: str) -> bytes:
        a = self._a
        shard, offset, nbytes, crc = (
            int(a["shard"][k]),
            int(a[f"{kind}_offset"][k]),
            int(a[f"{kind}_nbytes"][k]),
            int(a[f"{kind}_crc"][k]),
        )
        data = _pread(self._fd(shard), nbytes, offset)
        if len(data) != nbytes or zlib.crc32(data) != crc:
            raise RuntimeError(
                f"the {kind} of sample {int(a['ids'][k])} in shard '{self._index.shards[shard]}' is damaged "
                f"(CRC mismatch); run scan_shards('{self.root}') and rerun the job to redo damaged shards"
            )
        return data

    def _mask_at(self, k: int, dtype: Any) -> np.ndarray | None:
        if self._a["mask_nbytes"][k] < 0:
            return None
        data = self._member(k, "mask")
        shape, fortran, stored, start = _npy_header(data)
        array = np.frombuffer(data, dtype=stored, count=math.prod(shape), offset=start)
        return array.reshape(shape, order="F" if fortran else "C").astype(dtype)

    def mask(self, sample_id: int, dtype: Any = np.float32) -> np.ndarray | None:
        """The sample's H x W mask (a new float32 array by default), or None if it has no mask (skipped)."""
        return self._mask_at(self._position(sample_id), dtype)

    def row(self, sample_id: int) -> dict[str, Any]:
        """The sample's manifest row, with the types it was written with."""
        return json.loads(self._member(self._position(sample_id), "row"))

    def __getitem__(self, sample_id: int) -> tuple[np.ndarray | None, dict[str, Any]]:
        k = self._position(sample_id)
        return self._mask_at(k, np.float32), json.loads(self._member(k, "row"))

    def __iter__(self) -> Iterator[tuple[int, np.ndarray | None, dict[str, Any]]]:
        """(sample id, mask or None, row) in id order, one sample in memory at a time."""
        ids = self._a["ids"]
        for k in range(len(ids)):  # not ids.tolist(): that would hold N Python ints
            yield int(ids[k]), self._mask_at(k, np.float32), json.loads(self._member(k, "row"))

    @property
    def rows(self) -> Iterator[dict[str, Any]]:
        """The manifest rows in id order (typed as written; ``manifest.csv`` holds the same as text)."""
        return (json.loads(self._member(k, "row")) for k in range(len(self)))

    def close(self) -> None:
        """Close the open shard files (reading again reopens them)."""
        while self._open:
            os.close(self._open.popitem()[1])

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def load_results(output_dir: str | os.PathLike[str], max_open_shards: int = 4) -> Results:
    """Open a store's explanations for reading (lazily; see :class:`Results` for the memory bound).

    Uses ``index.npz`` when it matches the shards on disk. When it is missing or stale (the job has
    not finished, or shards were added or removed since :func:`merge_index`), verifies the shards and
    builds the index in memory instead, with a warning; that reads every shard once and needs about
    three times the index's memory while sorting.

    Example:
        >>> with load_results("lightning_logs/version_0/explanations") as results:  # doctest: +SKIP
        ...     for sample_id, mask, row in results:
        ...         print(sample_id, mask.shape, row["target_name"])

    Raises:
        FileNotFoundError: no store in ``output_dir``.
        ValueError: older layout, unknown format version, or a damaged ``store.json`` / ``index.npz``.
    """
    root = Path(output_dir)
    read_store_info(root)
    index_path = root / INDEX_FILE
    if index_path.is_file():
        index = _load_index(index_path)
        if set(_complete_names(root / SHARDS_DIR)) == set(index.shards) | set(index.ignored):
            return Results(root, index, indexed=True, max_open_shards=max_open_shards)
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
    return Results(root, _build_index(scan), indexed=False, max_open_shards=max_open_shards)


__all__ = [
    "FORMAT_VERSION",
    "INDEX_BYTES_PER_SAMPLE",
    "BadShard",
    "MergeReport",
    "Results",
    "ShardInfo",
    "ShardScan",
    "ShardWriter",
    "StoreInfo",
    "StoreLock",
    "config_hash",
    "load_results",
    "merge_index",
    "open_store",
    "read_store_info",
    "scan_shards",
]
