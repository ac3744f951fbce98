"""The files of a store directory and their format; ``store.json``: create, read, check, resume, overwrite.

Layout of a store directory (other files in it are never touched)::

    store.json                       {"format": "neuromask-pl-store", "version": 1,
                                      "config_hash": ..., "created": ..., "neuromask_pl": ...,
                                      "config": {...} (when known), "sample_dirs": [...] (when any)}
    .lock                            while a job writes: {"host", "pid", "started", "token"}
    shards/
      r<rank:05d>-<seq:06d>-<session>.npz          one chunk of samples (a ZIP_STORED .npz)
      r<rank:05d>-<seq:06d>-<session>.npz.sha256   "<sha256>  <shard name>" (``sha256sum -c``)
    manifest.csv                     one row per sample id, sorted (written by merge_index)
    index.npz                        sample id -> shard and byte offsets, with a checksum (written by merge_index,
                                     last)
    <sample dir>/<id>.<ext>          the caller's per-sample files (e.g. overlays/00000042.png), when
                                     opened with sample_dirs: deleted with the results they belong to

A shard is an uncompressed (stored) zip that ``numpy.load`` opens lazily. It holds one member per
sample and kind: ``m<id>.npy`` (the float16 H x W mask; absent for a sample recorded without a
mask, e.g. an unreadable image) and ``r<id>.json`` (its manifest row; the member's zip comment holds
the sample's source fingerprint, when it was given one). Why this format: members
are stored, not compressed, so each one is a contiguous byte range of the file; the index keeps
that range (and the member's CRC-32), and reading one mask is a single ``os.pread`` of exactly
its bytes, whatever the shard size. Masks of different sizes can share a shard (a stacked .npy
could not), and the files stay readable by ``numpy.load(shard)["m<id>"]`` and ``zipfile``.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import os
import re
import struct
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from neuromask_pl import __version__
from neuromask_pl.store.io import check_writable, fsync_dir, reporting_write_errors, unlink_quiet, utc_now, write_json

log = logging.getLogger(__name__)

FORMAT = "neuromask-pl-store"
FORMAT_VERSION = 1
STORE_FILE = "store.json"
LOCK_FILE = ".lock"
INDEX_FILE = "index.npz"
MANIFEST_FILE = "manifest.csv"
SHARDS_DIR = "shards"

SHARD_RE = re.compile(r"r(\d{5,})-(\d{6,})-([0-9a-z]{1,64})\.npz")
MEMBER_RE = re.compile(r"(m)(\d+)\.npy|(r)(\d+)\.json")
SIDECAR_RE = re.compile(r"([0-9a-f]{64})  (\S+)\n?")
TEMP_RE = re.compile(r"\..+\.[0-9a-f]{8,32}\.tmp")
# Temporary files of the root's own files (run.json: the run record MaskWriter writes beside the store; write-check:
# the probe of check_writable) and the lock file a taker moves aside.
ROOT_TEMP_RE = re.compile(r"\.(store\.json|index\.npz|manifest\.csv|run\.json|write-check)\.[0-9a-f]{8,32}\.tmp")
STALE_LOCK_RE = re.compile(r"\.lock\.stale\.[0-9a-f]{8}")
SAMPLE_TEMP_RE = re.compile(r"\.\d+\.[0-9A-Za-z]+\.[0-9a-f]{8,32}\.tmp")  # .00000042.png.<hex>.tmp
SAMPLE_FILE_RE = re.compile(rf"\d+\.[0-9A-Za-z]+|{SAMPLE_TEMP_RE.pattern}")  # 00000042.png, temporaries
_DIR_NAME_RE = re.compile(r"[0-9A-Za-z_][0-9A-Za-z_.-]{0,63}")
_OVERWRITE = "overwrite=True (on the command line: --writer.overwrite true)"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: same content, same bytes
LOCAL_HEADER = 30  # size of a zip local file header before the name and the extra field


# -- member format (stored zip members holding .npy arrays or JSON) ---------------------------------
class Corrupt(Exception):
    """A shard or index file whose structure is damaged (caught and reported by its reader)."""


def zip_info(name: str) -> zipfile.ZipInfo:
    """A stored (uncompressed) zip member with a fixed time, so that the same content gives the same bytes."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as the bytes of a .npy file (no pickles)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


_HEADER_CACHE: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int]] = {}


def npy_header(data: bytes, cache: bool = True) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Shape, Fortran order, dtype and data start of a .npy member; headers seen before skip numpy's parser."""
    major = data[6] if len(data) > 7 else 0
    end = 10 + int.from_bytes(data[8:10], "little") if major == 1 else 12 + int.from_bytes(data[8:12], "little")
    key = bytes(data[:end])
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


def data_offset(f: IO[bytes], info: zipfile.ZipInfo, size: int) -> int:
    """Byte offset of a stored member's data, from its local header; checks it lies inside the file."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        raise Corrupt(f"member {info.filename} is compressed or encrypted")
    f.seek(info.header_offset)
    header = f.read(LOCAL_HEADER)
    if len(header) < LOCAL_HEADER or header[:4] != b"PK\x03\x04":
        raise Corrupt(f"bad local header of member {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    if f.read(name_len) != info.filename.encode("utf-8"):
        raise Corrupt(f"local header of member {info.filename} names another file")
    offset = info.header_offset + LOCAL_HEADER + name_len + extra_len
    if offset + info.file_size > size or info.file_size != info.compress_size:
        raise Corrupt(f"member {info.filename} runs past the end of the file")
    return offset


def zip_members(f: IO[bytes]) -> list[zipfile.ZipInfo]:
    """The members of a zip file, or :class:`Corrupt` when its directory cannot be read."""
    try:
        return zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, struct.error) as err:
        raise Corrupt(f"not a readable zip archive ({err})") from err


def clean_temps(directory: Path, pattern: re.Pattern[str], prefix: str = "") -> list[Path]:
    """Remove leftover temporary files of killed writers in ``directory`` (only names we create; never through a
    symbolic link)."""
    removed = []
    if directory.is_dir() and not directory.is_symlink():
        for name in os.listdir(directory):
            if name.startswith(prefix) and pattern.fullmatch(name):
                unlink_quiet(directory / name)
                removed.append(directory / name)
    if removed:
        log.info("removed %d leftover temporary file(s) in %s", len(removed), directory)
    return removed


def remove_stale_temps(root: Path) -> list[Path]:
    """Remove what killed writes of a store left in it: temporary files of its own files (``store.json``,
    ``index.npz``, ``manifest.csv``, ``run.json``, shards and sidecars, the per-sample files of its ``sample_dirs``)
    and lock files moved aside. Nothing else, nothing outside ``root``, nothing through a symbolic link.

    Call it only while holding the store's lock (:class:`~neuromask_pl.store.StoreLock` does, when it takes it).
    """
    removed = clean_temps(root, ROOT_TEMP_RE) + clean_temps(root, STALE_LOCK_RE)
    removed += clean_temps(root / SHARDS_DIR, TEMP_RE)
    try:
        sample_dirs = read_store_info(root).sample_dirs
    except (OSError, ValueError):  # no store yet, or a damaged store.json (open_store reports it)
        sample_dirs = ()
    for name in sample_dirs:
        removed += clean_temps(root / name, SAMPLE_TEMP_RE)
    return removed


def refuse_links(root: Path, names: Iterable[str]) -> None:
    """A ValueError naming the first of ``root``'s folders ``names`` that is a symbolic link.

    The store writes and deletes files only inside its own folders: a link planted in their place (``shards``,
    ``overlays``) would make it write over, or delete, files elsewhere.
    """
    for name in dict.fromkeys(names):
        path = root / name
        if path.is_symlink():
            try:
                target = f" (to '{os.readlink(path)}')"
            except OSError:
                target = ""
            raise ValueError(
                f"'{path}' is a symbolic link{target}; the store writes only into real folders inside '{root}': "
                "remove the link (a real folder is created in its place), or pass another output directory"
            )


# -- manifest cells -------------------------------------------------------------------------------
_BYTES_LITERAL_RE = re.compile(r"b(['\"]).*\1", re.DOTALL)
# OWASP's CSV-injection rule: a cell starting with one of these is run as a formula by spreadsheets.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_QUOTED_FORMULA_RE = re.compile(r"'+[=+\-@\t\r]")


def _runs_as_formula(text: str) -> bool:
    """Whether ``text`` needs a leading ``'`` in the manifest: it starts as a formula (and is not a plain number
    such as ``-1.5``), or it is such a quoted formula already (so that reading back gives it unchanged)."""
    return (text.startswith(_FORMULA_START) and not _PLAIN_NUMBER_RE.fullmatch(text)) or bool(
        _QUOTED_FORMULA_RE.match(text)
    )


def unwritable_char(text: str, file_name_bytes: bool) -> str | None:
    """The first character of ``text`` that UTF-8 cannot hold, None if there is none.

    With ``file_name_bytes``, U+DC80..U+DCFF count as writable: ``os.fsdecode`` gives them for the bytes of a
    file name that are not UTF-8, and :func:`to_manifest_cell` writes them back as those bytes.
    """
    try:
        text.encode("utf-8", "surrogateescape" if file_name_bytes else "strict")
    except UnicodeEncodeError as err:
        return text[err.start]
    return None


def to_manifest_cell(value: Any) -> Any:
    """A row value as ``manifest.csv`` holds it: text that is valid UTF-8 as it is, anything else unchanged.

    A str that is not valid UTF-8 (a file name whose bytes are not, decoded by ``os.fsdecode``) becomes the
    Python literal of its bytes, ``b'caf\\xe9.png'``; so does a str that looks like such a literal, so that
    :func:`from_manifest_cell` gives back exactly the str written, and the manifest stays valid UTF-8.
    A str that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
    return, OWASP's CSV-injection rule; plain numbers such as ``-1.5`` excepted) gets a leading ``'``:
    ``'=cmd|...``. Numbers, bools and None are never changed.
    """
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        if not _BYTES_LITERAL_RE.fullmatch(value):
            return "'" + value if _runs_as_formula(value) else value
    return repr(value.encode("utf-8", "surrogateescape"))


def from_manifest_cell(text: str) -> str:
    """The str that :func:`to_manifest_cell` wrote as ``text`` (the leading ``'`` of a formula removed,
    ``os.fsdecode`` of the bytes of a literal)."""
    if text.startswith("'") and _runs_as_formula(text[1:]):
        return text[1:]
    if _BYTES_LITERAL_RE.fullmatch(text):
        try:
            return ast.literal_eval(text).decode("utf-8", "surrogateescape")
        except (ValueError, SyntaxError, AttributeError, UnicodeDecodeError):
            pass  # not written by to_manifest_cell (an edited manifest): the text as it is
    return text


# -- store.json -------------------------------------------------------------------------------------
def _canonical_json(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"), ensure_ascii=True)


def config_hash(obj: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``obj``: sorted keys, compact, non-JSON values as ``str``."""
    return hashlib.sha256(_canonical_json(obj).encode("utf-8")).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (other values, lists included, are leaves)."""
    if not isinstance(obj, dict) or (prefix and not obj):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _short(value: Any, absent: bool) -> str:
    if absent:
        return "absent"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def describe_config_change(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 8) -> str:
    """``key (old there, new now), ...`` for each dotted key whose value differs, at most ``limit`` of them."""
    before, after = _flatten(dict(old)), _flatten(dict(new))
    keys = [k for k in sorted(before.keys() | after.keys()) if before.get(k, ...) != after.get(k, ...)]
    parts = [
        f"{k} ({_short(before.get(k), k not in before)} there, {_short(after.get(k), k not in after)} now)"
        for k in keys[:limit]
    ]
    return ", ".join(parts) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


@dataclass(frozen=True)
class StoreInfo:
    """What ``store.json`` says about a store directory.

    Attributes:
        root: the store directory.
        version: format version (:data:`FORMAT_VERSION`).
        config_hash: the caller's hash of the configuration that produced the results.
        created: UTC time the store was created (ISO 8601).
        resumed: True when :func:`open_store` found an existing store of the same configuration.
        sample_dirs: folders in ``root`` holding one file per sample that the store's results own
            (see :func:`open_store`).
        config: the configuration the hash was computed from (canonical JSON form), None when the store
            was opened with a hash only.
    """

    root: Path
    version: int
    config_hash: str
    created: str
    resumed: bool = False
    sample_dirs: tuple[str, ...] = ()
    config: dict[str, Any] | None = field(default=None, repr=False, compare=False)


def read_store_info(root: str | os.PathLike[str]) -> StoreInfo:
    """Read and check ``store.json``.

    Raises:
        FileNotFoundError: ``root`` holds no store.
        ValueError: ``store.json`` is damaged, foreign, or of an unknown (e.g. newer) format version.
    """
    root = Path(root)
    path = root / STORE_FILE
    if not path.is_file():
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
    dirs = meta.get("sample_dirs", [])
    if not isinstance(dirs, list) or not all(isinstance(d, str) and _is_sample_dir(d) for d in dirs):
        raise ValueError(f"'{path}' has a damaged sample_dirs entry {dirs!r}; use another output directory")
    config = meta.get("config")
    return StoreInfo(
        root=root,
        version=version,
        config_hash=hash_,
        created=str(meta.get("created", "")),
        sample_dirs=tuple(dirs),
        config=config if isinstance(config, dict) else None,
    )


def _is_sample_dir(name: str) -> bool:
    return bool(_DIR_NAME_RE.fullmatch(name)) and name not in (SHARDS_DIR, ".", "..")


def _sample_dirs(dirs: Iterable[str]) -> tuple[str, ...]:
    if isinstance(dirs, str):
        dirs = [dirs]
    out = tuple(dict.fromkeys(dirs))
    for name in out:
        if not isinstance(name, str) or not _is_sample_dir(name):
            raise ValueError(
                f"sample_dirs holds {name!r}; pass names of folders directly in the output directory "
                f"(letters, digits, '_', '.', '-'; not {SHARDS_DIR!r})"
            )
    return out


def _delete_store_files(root: Path, sample_dirs: Iterable[str] = ()) -> int:
    """Delete what a store's results own (shards, sidecars, temporary files, index, manifest, and the
    per-sample files ``<digits>.<ext>`` in ``sample_dirs``); nothing else."""
    count = 0
    for name in sample_dirs:
        folder = root / name
        if folder.is_dir():
            for file in os.listdir(folder):
                if SAMPLE_FILE_RE.fullmatch(file) and (folder / file).is_file():
                    unlink_quiet(folder / file)
                    count += 1
    shards = root / SHARDS_DIR
    if shards.is_dir():
        for name in os.listdir(shards):
            base = name[: -len(".sha256")] if name.endswith(".sha256") else name
            if SHARD_RE.fullmatch(base) or TEMP_RE.fullmatch(name):
                unlink_quiet(shards / name)
                count += 1
    for name in (INDEX_FILE, MANIFEST_FILE):
        if (root / name).exists():
            unlink_quiet(root / name)
            count += 1
    clean_temps(root, ROOT_TEMP_RE)
    return count


def _write_store_file(info: StoreInfo) -> None:
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config_hash": info.config_hash,
        "created": info.created,
        "neuromask_pl": __version__,
    }
    if info.sample_dirs:
        meta["sample_dirs"] = list(info.sample_dirs)
    if info.config is not None:
        meta["config"] = info.config
    write_json(info.root / STORE_FILE, meta)


def _create_store(root: Path, hash_: str, sample_dirs: tuple[str, ...], config: dict[str, Any] | None) -> StoreInfo:
    info = StoreInfo(root, FORMAT_VERSION, hash_, utc_now(), sample_dirs=sample_dirs, config=config)
    _write_store_file(info)
    (root / SHARDS_DIR).mkdir(exist_ok=True)
    fsync_dir(root)
    return info


def open_store(
    root: str | os.PathLike[str],
    config: Mapping[str, Any] | str,
    overwrite: bool = False,
    *,
    sample_dirs: Iterable[str] = (),
) -> StoreInfo:
    """Create a store in ``root`` or check that the one there belongs to this configuration.

    Call it under :class:`~neuromask_pl.store.StoreLock`, before any writer of the job starts: it also
    removes the temporary files that killed writers left behind. Files in ``root`` that the store did not
    write are never touched.

    Args:
        root: the output directory (created if needed; it may hold unrelated files).
        config: what determines the results (model, settings, data) as a JSON-like mapping: hashed with
            :func:`config_hash` and recorded in ``store.json``, so that a refusal names the keys that changed.
            Or a precomputed hash string (a refusal then shows the two hashes only).
        overwrite: when ``root`` holds results of *another* configuration, delete them (shards, index,
            manifest, per-sample files) and start a new store. Results of the *same* configuration are always
            kept and resumed, so rerunning the same command after a preemption never loses work.
        sample_dirs: folders directly in ``root`` where the caller writes one file per sample, named by its
            id (``<digits>.<ext>``, e.g. ``overlays/00000042.png``). They are created and recorded in
            ``store.json``; ``overwrite`` deletes those files (other files there are kept), including in the
            folders an earlier job recorded.

    Returns:
        The store's :class:`StoreInfo` (``resumed=True`` when results of this configuration were found).

    Raises:
        ValueError: another configuration's results without ``overwrite``; an unknown or newer format
            version; a damaged ``store.json``; shards, ``manifest.csv`` or ``index.npz`` without
            ``store.json``; ``root`` is a file; ``shards`` or a sample folder is a symbolic link.
        StoreWriteError: ``root`` cannot be created or written (read-only, disk full, ...): one line that says
            what to do (also a ValueError).
    """
    if isinstance(config, Mapping):
        recorded: dict[str, Any] | None = json.loads(_canonical_json(config))
        hash_ = config_hash(config)
    elif isinstance(config, str) and config:
        recorded, hash_ = None, config
    else:
        raise ValueError(f"config must be a mapping or a non-empty hash string, got {config!r}")
    sample_dirs = _sample_dirs(sample_dirs)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"the output directory '{root}' is a file; pass a directory")
    try:
        recorded_dirs = read_store_info(root).sample_dirs
    except (OSError, ValueError):  # none yet, or damaged (refused below)
        recorded_dirs = ()
    refuse_links(root, (SHARDS_DIR, *recorded_dirs, *sample_dirs))
    with reporting_write_errors(f"the store in '{root}' (store.json, shards/)"):
        info = _open(root, hash_, recorded, overwrite, sample_dirs)
        for name in info.sample_dirs:
            (root / name).mkdir(exist_ok=True)
        clean_temps(root, ROOT_TEMP_RE)
        clean_temps(root / SHARDS_DIR, TEMP_RE)
        check_writable(root / SHARDS_DIR)  # a read-only folder is refused now, not after the first chunk
    return info


def _open(
    root: Path, hash_: str, recorded: dict[str, Any] | None, overwrite: bool, sample_dirs: tuple[str, ...]
) -> StoreInfo:
    """:func:`open_store` after its arguments are checked: resume, refuse, overwrite or create."""
    if (root / STORE_FILE).exists():
        info = read_store_info(root)
        if info.config_hash == hash_:
            dirs = tuple(dict.fromkeys(info.sample_dirs + sample_dirs))
            if dirs != info.sample_dirs:
                _write_store_file(replace(info, sample_dirs=dirs))
            return replace(info, resumed=True, sample_dirs=dirs)
        if not overwrite:
            changed = (
                describe_config_change(info.config, recorded)
                if info.config is not None and recorded is not None
                else f"config hash {info.config_hash[:12]} there, {hash_[:12]} now"
            )
            raise ValueError(
                f"'{root}' holds neuromask-pl results for another configuration (or model): {changed}. "
                f"Pass {_OVERWRITE} to delete those results (shards, index, manifest and per-sample files) "
                "and start over, or use another output directory."
            )
        count = _delete_store_files(root, dict.fromkeys(info.sample_dirs + sample_dirs))
        log.warning(
            "overwrite=True: deleted %d result file(s) of configuration %s in %s", count, info.config_hash[:12], root
        )
        return _create_store(root, hash_, sample_dirs, recorded)
    if root.is_dir():
        shards = root / SHARDS_DIR
        stray = [name for name in (MANIFEST_FILE, INDEX_FILE) if (root / name).exists()]
        if shards.is_dir() and any(SHARD_RE.fullmatch(n) for n in os.listdir(shards)):
            stray.insert(0, "shard files")
        if stray and not overwrite:
            raise ValueError(
                f"'{root}' holds {' and '.join(stray)} but '{root / STORE_FILE}' is missing, so they were not "
                f"written by a neuromask-pl store of this version (or their configuration is unknown): pass "
                f"{_OVERWRITE} to delete them, or use another output directory"
            )
        if stray:
            _delete_store_files(root, sample_dirs)
    root.mkdir(parents=True, exist_ok=True)
    clean_temps(root, ROOT_TEMP_RE)
    return _create_store(root, hash_, sample_dirs, recorded)
