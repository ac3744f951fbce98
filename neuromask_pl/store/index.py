"""The index of a store: sample id -> shard and byte ranges; built from a scan, saved as ``index.npz``.

:func:`merge_index` ends a job: it indexes the verified shards, writes ``manifest.csv`` and then
``index.npz``. :class:`MemberReader` reads one member's bytes through an index (one ``os.pread``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuromask_pl.store.io import durable_write, reporting_write_errors, write_error
from neuromask_pl.store.layout import (
    INDEX_FILE,
    LOCAL_HEADER,
    MANIFEST_FILE,
    SHARDS_DIR,
    Corrupt,
    StoreInfo,
    data_offset,
    npy_bytes,
    npy_header,
    read_store_info,
    to_manifest_cell,
    zip_info,
    zip_members,
)
from neuromask_pl.store.scan import BadShard, ShardScan, scan_shards

log = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: shards.json holds the checksum of the index
#: Bytes the reader's index holds per sample: id (int64), shard (int32), mask offset and size (2 x int64),
#: mask CRC (uint32), row offset (int64), row size (int32) and row CRC (uint32).
INDEX_BYTES_PER_SAMPLE = 48

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
class Index:
    """Where each sample's members lie: per-sample arrays sorted by id, and the shards they point into."""

    arrays: dict[str, np.ndarray]  # _INDEX_ARRAYS, one entry per sample, sorted by id
    shards: list[str]  # good shard names (position = the "shard" number)
    sizes: list[int]
    sha256: list[str | None]
    ignored: list[str]  # complete (sidecar present) shards that failed verification when it was built
    duplicates: int = 0
    fingerprints: np.ndarray | None = None  # each sample's fingerprint (object array), when asked for; not saved

    def __len__(self) -> int:
        return len(self.arrays["ids"])

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-sample arrays."""
        return sum(a.nbytes for a in self.arrays.values())


def build_index(scan: ShardScan, with_fingerprints: bool = False) -> Index:
    """One index entry per sample id, sorted by id (with each one's fingerprint when ``with_fingerprints``).

    A duplicated id keeps, in order of preference: a copy made from the content its latest copy was made
    from (when both have a fingerprint: a changed file's old results lose, even to a failure to read the
    new one), the copy with a mask over one without, the later session, the lower rank, the lower sequence
    number.
    """
    good = sorted(scan.good, key=lambda s: s.name)
    preference = sorted(range(len(good)), key=lambda k: (good[k].rank, good[k].seq))
    preference.sort(key=lambda k: good[k].session, reverse=True)  # stable: ties keep (rank, seq) order
    rank_of = np.empty(len(good), np.int64)
    rank_of[preference] = np.arange(len(good))
    if good:
        cat = {key: np.concatenate([getattr(s, key) for s in good]) for key in _INDEX_ARRAYS if key != "shard"}
        cat["shard"] = np.concatenate([np.full(len(s), k, np.int32) for k, s in enumerate(good)])
        fingerprints = np.concatenate([s.fingerprints for s in good])
    else:
        cat = {key: np.zeros(0, dtype) for key, dtype in _INDEX_ARRAYS.items()}
        fingerprints = np.zeros(0, object)
    preferred = rank_of[cat["shard"]]
    stale = _stale_copies(cat["ids"], preferred, fingerprints)
    order = np.lexsort((preferred, cat["mask_nbytes"] < 0, stale, cat["ids"]))
    ids = cat["ids"][order]
    first = np.ones(len(ids), bool)
    first[1:] = ids[1:] != ids[:-1]
    keep = order[first]
    arrays = {key: np.ascontiguousarray(cat[key][keep], dtype=dtype) for key, dtype in _INDEX_ARRAYS.items()}
    return Index(
        arrays=arrays,
        shards=[s.name for s in good],
        sizes=[s.size for s in good],
        sha256=[s.sha256 for s in good],
        ignored=sorted(b.path.name for b in scan.bad if b.kind == "corrupt"),
        duplicates=int(len(ids) - len(keep)),
        fingerprints=fingerprints[keep] if with_fingerprints else None,
    )


def _stale_copies(ids: np.ndarray, preferred: np.ndarray, fingerprints: np.ndarray) -> np.ndarray:
    """True for each copy whose fingerprint differs from that of its id's most preferred copy (lowest
    ``preferred``: the latest session), which saw the content the sample has now; copies without one are kept."""
    known = np.array([f is not None for f in fingerprints], dtype=bool)
    stale = np.zeros(len(ids), bool)
    if not known.any():
        return stale
    codes = np.full(len(ids), -1, np.int64)
    codes[known] = np.unique(fingerprints[known].astype(str), return_inverse=True)[1]
    order = np.lexsort((preferred, ids))
    code = codes[order]
    first = np.ones(len(ids), bool)
    first[1:] = ids[order][1:] != ids[order][:-1]
    reference = code[first][np.cumsum(first) - 1]  # each copy's: its id's most preferred copy's code
    stale[order] = (code >= 0) & (reference >= 0) & (code != reference)
    return stale


def index_checksum(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 (hex) of an index's metadata (without its ``checksum``) and arrays: what ids map to which bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode("utf-8"))
    for key, dtype in _INDEX_ARRAYS.items():
        array = np.ascontiguousarray(arrays[key], dtype=dtype)
        digest.update(f"|{key}:{array.dtype.str}:{array.shape}|".encode("ascii"))
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def save_index(path: Path, index: Index, info: StoreInfo) -> None:
    meta: dict[str, Any] = {
        "index_version": INDEX_VERSION,
        "config_hash": info.config_hash,
        "shards": index.shards,
        "sizes": index.sizes,
        "sha256": index.sha256,
        "ignored": index.ignored,
    }
    meta["checksum"] = index_checksum(meta, index.arrays)
    with durable_write(path) as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key in _INDEX_ARRAYS:
                archive.writestr(zip_info(f"{key}.npy"), npy_bytes(index.arrays[key]))
            archive.writestr(zip_info("shards.json"), json.dumps(meta, sort_keys=True).encode("utf-8"))


def _read_index_members(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read index.npz straight into its final arrays (no intermediate copies), checking each member's CRC."""
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        infos = zip_members(f)
        for info in infos:
            offset = data_offset(f, info, size)
            f.seek(offset)
            if info.filename == "shards.json":
                data = f.read(info.file_size)
                if zlib.crc32(data) != info.CRC:
                    raise Corrupt("CRC mismatch in shards.json")
                meta = json.loads(data)
                continue
            key = info.filename.removesuffix(".npy")
            if key not in _INDEX_ARRAYS:
                continue
            head = f.read(min(info.file_size, 4096))
            shape, fortran, dtype, start = npy_header(head, cache=False)
            array = np.empty(shape, dtype=dtype)
            view = memoryview(array).cast("B")
            f.seek(offset + start)
            if f.readinto(view) != array.nbytes or start + array.nbytes != info.file_size:
                raise Corrupt(f"member {info.filename} is short")
            if zlib.crc32(view, zlib.crc32(head[:start])) != info.CRC:
                raise Corrupt(f"CRC mismatch in {info.filename}")
            if array.dtype != _INDEX_ARRAYS[key] or array.ndim != 1:
                raise Corrupt(f"member {info.filename} has dtype {array.dtype} and shape {array.shape}")
            arrays[key] = array
    return meta, arrays


def load_index(path: Path) -> Index:
    """Read ``index.npz``, checking each member's CRC, the index's checksum and that its ids are sorted and unique.

    Raises:
        ValueError: a damaged or changed index, or one of another version, with what to do (call merge_index).
    """
    again = f"delete it and call merge_index('{path.parent}') again"
    try:
        meta, arrays = _read_index_members(path)
        if meta.get("index_version") != INDEX_VERSION:
            raise ValueError(f"unknown index version {meta.get('index_version')!r}")
        if arrays.keys() != _INDEX_ARRAYS.keys():
            raise ValueError(f"members missing: {sorted(_INDEX_ARRAYS.keys() - arrays.keys())}")
    except (OSError, ValueError, Corrupt) as err:
        raise ValueError(f"'{path}' is damaged or of another version ({err}); {again}") from err
    if len({len(a) for a in arrays.values()}) != 1 or len(meta["shards"]) != len(meta["sizes"]):
        raise ValueError(f"'{path}' is inconsistent; {again}")
    if meta.get("checksum") != index_checksum(meta, arrays):
        raise ValueError(
            f"'{path}' does not match its checksum: it was changed after merge_index wrote it, so its ids may point "
            f"at other samples' masks and rows; {again}"
        )
    ids = arrays["ids"]
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        k = int(np.flatnonzero(ids[1:] <= ids[:-1])[0])
        what = f"sample id {int(ids[k + 1])} twice" if ids[k + 1] == ids[k] else "sample ids out of order"
        raise ValueError(f"'{path}' lists {what}; {again}")
    shard = arrays["shard"]
    if len(shard) and (shard.min() < 0 or shard.max() >= len(meta["shards"])):
        raise ValueError(f"'{path}' points at shards it does not list; {again}")
    for array in arrays.values():
        array.flags.writeable = False
    return Index(
        arrays=arrays,
        shards=list(meta["shards"]),
        sizes=list(meta["sizes"]),
        sha256=list(meta["sha256"]),
        ignored=list(meta["ignored"]),
    )


def _pread(fd: int, nbytes: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, nbytes, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover - platforms without pread
    return os.read(fd, nbytes)


class MemberReader:
    """Reads the members of indexed samples: one ``os.pread`` each, CRC-checked, at most ``max_open_shards`` open.

    Holds file descriptors only (no buffers); reads carry their own offsets, so forked processes may share it.
    """

    def __init__(self, root: Path, index: Index, max_open_shards: int = 4) -> None:
        if not isinstance(max_open_shards, int) or max_open_shards < 1:
            raise ValueError(f"max_open_shards must be an int >= 1, got {max_open_shards!r}")
        self.root = root
        self.index = index
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, int] = OrderedDict()  # shard number -> fd, least recently used first

    def _fd(self, shard: int) -> int:
        fd = self._open.get(shard)
        if fd is not None:
            self._open.move_to_end(shard)
            return fd
        path = self.root / SHARDS_DIR / self.index.shards[shard]
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"shard '{path}' listed in the index is missing; call merge_index('{self.root}') again"
            ) from err
        if os.fstat(fd).st_size != self.index.sizes[shard]:
            os.close(fd)
            raise RuntimeError(
                f"shard '{path}' changed size since it was indexed; run scan_shards/merge_index on "
                f"'{self.root}' again (and rerun the job to redo damaged shards)"
            )
        while len(self._open) >= self.max_open_shards:
            os.close(self._open.popitem(last=False)[1])
        self._open[shard] = fd
        return fd

    def shard_path(self, k: int) -> Path:
        """The shard file that holds the sample at index position ``k``."""
        return self.root / SHARDS_DIR / self.index.shards[int(self.index.arrays["shard"][k])]

    def read(self, k: int, kind: str) -> memoryview:
        """The bytes of the ``kind`` ("mask" or "row") member of the sample at index position ``k``.

        One ``pread`` of the member's local zip header and data: the CRC is checked, and the header must name this
        sample's own member (``m<id>.npy`` or ``r<id>.json``), so an index whose entries point at other samples'
        bytes is caught on every read.
        """
        a = self.index.arrays
        sample_id = int(a["ids"][k])
        shard, offset, nbytes, crc = (
            int(a["shard"][k]),
            int(a[f"{kind}_offset"][k]),
            int(a[f"{kind}_nbytes"][k]),
            int(a[f"{kind}_crc"][k]),
        )
        name = (f"m{sample_id}.npy" if kind == "mask" else f"r{sample_id}.json").encode("ascii")
        head = LOCAL_HEADER + len(name)
        data = _pread(self._fd(shard), head + nbytes, offset - head) if offset >= head else b""
        view = memoryview(data)
        if len(data) != head + nbytes or zlib.crc32(view[head:]) != crc:
            raise RuntimeError(
                f"the {kind} of sample {sample_id} in shard '{self.index.shards[shard]}' is damaged "
                f"(CRC mismatch); run scan_shards('{self.root}') and rerun the job to redo damaged shards"
            )
        if data[:4] != b"PK\x03\x04" or data[30:head] != name or struct.unpack("<HH", data[26:30]) != (len(name), 0):
            found = data[30 : 30 + int.from_bytes(data[26:28], "little")] if data[:4] == b"PK\x03\x04" else b""
            what = f"member {found.decode('ascii', 'replace')}{_member_sample(found)}" if found else "no member's start"
            raise ValueError(
                f"the {kind} of sample {sample_id} in shard '{self.shard_path(k)}' is not that sample's: the index "
                f"points at {what}; the index does not match the shards: delete '{self.root / INDEX_FILE}' and call "
                f"merge_index('{self.root}') again"
            )
        return view[head:]

    def mask(self, k: int, dtype: Any = np.float32) -> np.ndarray:
        """The mask of the sample at index position ``k`` (it has one) as a new ``dtype`` array.

        Raises:
            ValueError: the member is not a 2-D array of numbers (the writer writes nothing else), naming the
                shard file and the sample.
        """
        data = self.read(k, "mask")
        where = f"the mask of sample {int(self.index.arrays['ids'][k])} in shard '{self.shard_path(k)}'"
        try:
            shape, fortran, stored, start = npy_header(data)
        except (ValueError, TypeError, IndexError, SyntaxError) as err:
            raise ValueError(f"{where} is not a .npy array ({err}); the shard was not written by neuromask-pl") from err
        if stored.hasobject or stored.fields is not None or stored.kind not in "fiub" or len(shape) != 2:
            raise ValueError(
                f"{where} has dtype {stored} and shape {shape}, but masks are 2-D arrays of numbers (an object array "
                "would need pickle, which the store never reads); the shard was not written by neuromask-pl"
            )
        if start + math.prod(shape) * stored.itemsize != len(data):
            raise ValueError(f"{where} holds {len(data) - start} bytes of data for shape {shape} and dtype {stored}")
        array = np.frombuffer(data, dtype=stored, count=math.prod(shape), offset=start)
        return array.reshape(shape, order="F" if fortran else "C").astype(dtype)

    def row(self, k: int) -> dict[str, Any]:
        """The manifest row of the sample at index position ``k``; it must say it is that sample's.

        Raises:
            ValueError: the row is not a JSON object holding this sample's ``sample_id``, naming the shard file and
                the sample.
        """
        sample_id = int(self.index.arrays["ids"][k])
        where = f"the row of sample {sample_id} in shard '{self.shard_path(k)}'"
        data = bytes(self.read(k, "row"))
        try:
            row = json.loads(data)
        except ValueError as err:
            raise ValueError(f"{where} is not valid JSON ({err}); the shard was not written by neuromask-pl") from err
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not a JSON object but a {type(row).__name__}")
        stored = row.get("sample_id")
        if type(stored) is not int or stored != sample_id:
            raise ValueError(
                f"{where} says it is sample {stored!r}; the index or the shard was changed: delete "
                f"'{self.root / INDEX_FILE}' and call merge_index('{self.root}') again"
            )
        return row

    def close(self) -> None:
        """Close the open shard files (reading again reopens them)."""
        while self._open:
            os.close(self._open.popitem()[1])


def _member_sample(name: bytes) -> str:
    """`` (sample 42)`` for a member name ``m42.npy`` or ``r42.json``, else nothing."""
    digits = name[1:].split(b".")[0]
    return f" (sample {digits.decode('ascii')})" if digits.isdigit() else ""


def _write_manifest(path: Path, members: MemberReader, columns: Sequence[str]) -> None:
    """Stream every indexed row into ``path`` (atomically); a failed write is a :class:`StoreWriteError`."""
    read_failed = []

    def rows() -> Iterator[dict[str, Any]]:
        for k in range(len(members.index)):
            try:
                row = members.row(k)
            except OSError:
                read_failed.append(k)  # a shard's problem, reported as it is
                raise
            yield {key: to_manifest_cell(value) for key, value in row.items()}

    try:
        with durable_write(path) as f:
            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            writer = csv.DictWriter(text, fieldnames=list(columns), restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows())
            text.flush()
            text.detach()
    except OSError as err:
        if read_failed:
            raise
        raise write_error(err, f"'{path}'") from err


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
            The manifest is valid UTF-8: a file name that is not is written as the Python literal of its
            bytes (``b'caf\\xe9.png'``); :func:`~neuromask_pl.store.read_manifest` gives back the exact str.
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
    index = build_index(scan)
    members = MemberReader(root, index)
    try:
        if columns is None:
            seen: dict[str, None] = {"sample_id": None}
            for k in range(len(index)):
                seen.update(dict.fromkeys(members.row(k)))
            columns = list(seen)
        _write_manifest(root / MANIFEST_FILE, members, columns)
    finally:
        members.close()
    with reporting_write_errors(f"'{root / INDEX_FILE}'"):
        save_index(root / INDEX_FILE, index, info)
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
