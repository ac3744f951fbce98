"""Listing a store's shards and sorting them into good and bad (checksums, zip structure, member tables)."""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from neuromask_pl.store.io import fsync_dir, reporting_write_errors, sha256_file, unlink_quiet
from neuromask_pl.store.layout import (
    LOCAL_HEADER,
    MEMBER_RE,
    SHARD_RE,
    SHARDS_DIR,
    SIDECAR_RE,
    TEMP_RE,
    Corrupt,
    data_offset,
    zip_members,
)

log = logging.getLogger(__name__)


@dataclass
class ShardInfo:
    """A complete shard and where each sample's members lie in it (arrays sorted by sample id).

    ``mask_nbytes`` is -1 for samples recorded without a mask; offsets are byte offsets of the member
    data in the file, CRCs the zip's CRC-32 of it; fingerprints the ``fingerprint`` each sample was added
    with (see :meth:`~neuromask_pl.store.ShardWriter.add`).
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
    fingerprints: np.ndarray  # object array: each sample's fingerprint (str), None when added without one

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
        with reporting_write_errors(f"the shards in '{self.root / SHARDS_DIR}'"):
            for bad in self.bad:
                shard = bad.path.with_name(bad.path.name.removesuffix(".sha256"))
                for path in (shard, shard.with_name(shard.name + ".sha256")):
                    if path.exists():
                        unlink_quiet(path)
                        count += 1
            if count:
                fsync_dir(self.root / SHARDS_DIR)
        if count:
            log.warning(
                "deleted %d damaged or incomplete shard file(s) in %s; their samples will be redone",
                count,
                self.root / SHARDS_DIR,
            )
        return count


def _member_table(f: IO[bytes], size: int) -> dict[str, np.ndarray]:
    """Parse a shard's zip directory and local headers: per sample id, member data offsets, sizes and CRCs."""
    infos = zip_members(f)
    rows: dict[int, tuple[int, int, int]] = {}
    masks: dict[int, tuple[int, int, int]] = {}
    fingerprints: dict[int, str] = {}
    for info in infos:
        match = MEMBER_RE.fullmatch(info.filename)
        if match is None:
            continue  # not ours: ignored
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise Corrupt(f"member {info.filename} is compressed or encrypted")
        offset = data_offset(f, info, size)
        if offset != info.header_offset + LOCAL_HEADER + len(info.filename.encode("utf-8")):
            raise Corrupt(f"member {info.filename} has an extra field (the store's writer writes none)")
        table = masks if match.group(1) else rows
        sample_id = int(match.group(2) or match.group(4))
        if sample_id in table:
            raise Corrupt(f"member {info.filename} appears twice")
        table[sample_id] = (offset, info.file_size, info.CRC)
        if table is rows and info.comment:
            fingerprints[sample_id] = info.comment.decode("utf-8", "replace")
    if not rows:
        raise Corrupt("no samples in it")
    if not masks.keys() <= rows.keys():
        raise Corrupt(f"masks without a manifest row: {sorted(masks.keys() - rows.keys())[:5]}")
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
        "fingerprints": np.array([fingerprints.get(i) for i in ids.tolist()], dtype=object),
    }


def _read_sidecar(path: Path, name: str) -> str:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise Corrupt(f"unreadable checksum file ({err})") from err
    match = SIDECAR_RE.fullmatch(text)
    if match is None or match.group(2) != name:
        raise Corrupt("malformed checksum file")
    return match.group(1)


def _scan_one(path: Path, verify: bool) -> ShardInfo:
    rank, seq, session = SHARD_RE.fullmatch(path.name).groups()  # type: ignore[union-attr]
    expected = _read_sidecar(path.with_name(path.name + ".sha256"), path.name)
    digest = None
    if verify:
        digest = sha256_file(path)
        if digest != expected:
            raise Corrupt("checksum mismatch (truncated or modified after it was written)")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        table = _member_table(f, size)
    return ShardInfo(
        name=path.name, path=path, rank=int(rank), seq=int(seq), session=session, size=size, sha256=digest, **table
    )


def complete_names(shards: Path) -> list[str]:
    """Names of shards that have a sidecar (complete unless damaged); no file is read."""
    if not shards.is_dir():
        return []
    names = set(os.listdir(shards))
    return sorted(n for n in names if SHARD_RE.fullmatch(n) and n + ".sha256" in names)


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
        if TEMP_RE.fullmatch(name):
            scan.temp_files.append(path)
        elif SHARD_RE.fullmatch(name):
            if name + ".sha256" not in names:
                scan.bad.append(BadShard(path, "incomplete", "no checksum file (its writer stopped before finishing)"))
                continue
            try:
                scan.good.append(_scan_one(path, verify))
            except Corrupt as err:
                scan.bad.append(BadShard(path, "corrupt", str(err)))
            except FileNotFoundError:
                scan.bad.append(BadShard(path, "incomplete", "deleted while scanning"))
        elif name.endswith(".sha256") and SHARD_RE.fullmatch(name[:-7]) and name[:-7] not in names:
            scan.bad.append(BadShard(path, "incomplete", "checksum file without its shard"))
    if clean:
        for path in scan.temp_files:
            unlink_quiet(path)
        scan.temp_files = []
    for bad in scan.bad:
        log.info("shard %s is %s: %s", bad.path.name, bad.kind, bad.reason)
    return scan
