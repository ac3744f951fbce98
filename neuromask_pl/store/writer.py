"""Writing one rank's samples as shards: crash-safe, append-only, never overwriting an earlier shard.

Crash safety: a shard is written to a temporary file in ``shards/``, flushed, fsynced, moved onto
its final name with ``os.replace`` and the directory is fsynced; only then is its ``.sha256``
sidecar written the same way. A shard counts as complete only when its sidecar exists and (when
verifying) matches. Whatever instant a job is killed at, it leaves complete verified shards plus at
most a temporary file (removed by the next :func:`~neuromask_pl.store.open_store`) or a shard without
its sidecar (reported as incomplete by :func:`~neuromask_pl.store.scan_shards`; the caller deletes it
and redoes its samples). Session tokens make shard names unique, so a rerun never overwrites an
earlier shard.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from neuromask_pl.store.io import durable_write, sha256_file, unlink_quiet, write_error
from neuromask_pl.store.layout import (
    SHARDS_DIR,
    STORE_FILE,
    TEMP_RE,
    clean_temps,
    npy_bytes,
    refuse_links,
    unwritable_char,
    zip_info,
)

log = logging.getLogger(__name__)

MAX_CHUNK_SIZE = 30_000  # 2 members per sample; a plain zip holds at most 65,535 members
MAX_FINGERPRINT_BYTES = 1024
_SESSION_RE = re.compile(r"[0-9a-z]{1,64}")


def source_fingerprint(path: str | os.PathLike[str]) -> str:
    """What identifies the content of a sample's file cheaply: ``"stat:<size>:<mtime_ns>"``, ``"missing"``
    when it cannot be found.

    A file rewritten with other content gets another modification time (and often another size), so a
    stored sample whose fingerprint differs from its file's now was made from other content. Copying a
    dataset without keeping modification times (``cp`` without ``-p``) changes every fingerprint, so
    every sample is redone once.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    return f"stat:{st.st_size}:{st.st_mtime_ns}"


def _oserror_in(exc: BaseException) -> OSError | None:
    """The first OSError in an exception's chain (zipfile may wrap a failed write)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


_SCALARS = (str, int, float, bool, type(None))


def _clean_row(sample_id: int, row: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"sample_id": sample_id}
    for key, value in (row or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"row keys must be strings, got {key!r} for sample {sample_id}")
        if (char := unwritable_char(key, file_name_bytes=False)) is not None:
            raise ValueError(f"row key {key!r} of sample {sample_id} holds a lone surrogate ({char!r}); keys are text")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, _SCALARS):
            raise TypeError(
                f"row value {key!r} of sample {sample_id} is a {type(value).__name__}; "
                "rows hold str, int, float, bool or None"
            )
        if isinstance(value, str) and (char := unwritable_char(value, file_name_bytes=True)) is not None:
            raise ValueError(
                f"row value {key!r} of sample {sample_id} holds a lone surrogate ({char!r}) that no file name's "
                "bytes give: pass text, or a file name as os.fsdecode gives it"
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
        ValueError: bad arguments, ``root`` is not a store, or its ``shards`` folder is a symbolic link.
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
        refuse_links(self.root, (SHARDS_DIR,))
        self.dir = self.root / SHARDS_DIR
        self.dir.mkdir(exist_ok=True)
        clean_temps(self.dir, TEMP_RE, prefix=f".r{rank:05d}-")
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
        self._buffer: list[tuple[int, np.ndarray | None, bytes, bytes]] = []  # id, mask, row, fingerprint
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

    def add(
        self,
        sample_id: int,
        mask: np.ndarray | None,
        row: Mapping[str, Any] | None = None,
        *,
        fingerprint: str | None = None,
    ) -> None:
        """Buffer one sample; writes a shard when ``chunk_size`` samples are buffered.

        Args:
            sample_id: the sample's stable id (int >= 0).
            mask: H x W floats (stored as float16), or None for a sample without a mask (e.g. skipped).
            row: its manifest row, str keys to str/int/float/bool/None values; ``sample_id`` is added.
            fingerprint: what the sample was made from, as :func:`source_fingerprint` gives it for its
                file (at most 1,024 bytes of text), or None when it has no file. Kept beside the row (as
                its zip member's comment); :func:`~neuromask_pl.store.resume_state` compares it with the file
                now, and a later copy of the sample made from other content wins over this one.
        """
        self._check_open()
        if isinstance(sample_id, np.integer):
            sample_id = int(sample_id)
        if not isinstance(sample_id, int) or isinstance(sample_id, bool) or sample_id < 0:
            raise ValueError(f"sample_id must be an int >= 0, got {sample_id!r}")
        comment = b""
        if fingerprint is not None:
            comment = fingerprint.encode("utf-8") if isinstance(fingerprint, str) else b""
            if not 1 <= len(comment) <= MAX_FINGERPRINT_BYTES:
                raise ValueError(
                    f"fingerprint of sample {sample_id} must be None or text of 1 to {MAX_FINGERPRINT_BYTES} "
                    f"bytes, got {fingerprint!r}"
                )
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
        self._buffer.append((sample_id, data, encoded, comment))
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
            for leftover in (path, path.with_name(name + ".sha256")):
                try:
                    unlink_quiet(leftover)
                except OSError:  # best effort (a read-only folder): scan_shards reports what is left
                    pass
            err = _oserror_in(exc)
            if err is None:  # e.g. KeyboardInterrupt: keep the samples, close() may still write them
                self._buffer = records + self._buffer
                raise
            error = write_error(err, f"shard {path} ({len(records)} samples, ids {records[0][0]}..{records[-1][0]})")
            self._failed = str(error)
            raise error from exc
        self._seq += 1
        self.shards.append(path)
        self.samples_written += len(records)
        return path

    def _write_shard(self, path: Path, records: list[tuple[int, np.ndarray | None, bytes, bytes]]) -> None:
        with durable_write(path) as f:
            archive = zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
            try:
                for sample_id, mask, row, fingerprint in records:
                    if mask is not None:
                        archive.writestr(zip_info(f"m{sample_id}.npy"), npy_bytes(mask))
                    info = zip_info(f"r{sample_id}.json")
                    info.comment = fingerprint
                    archive.writestr(info, row)
                archive.close()
            except BaseException:
                try:
                    archive.close()
                except BaseException:  # noqa: BLE001 - the first error is the one reported
                    pass
                raise
        digest = sha256_file(path)
        with durable_write(path.with_name(path.name + ".sha256")) as f:
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
