"""Small file helpers of the store: atomic writes, fsync, a file's SHA-256, the time, package versions,
and the one-line error for a write that failed (:class:`StoreWriteError`).

Standard library only; the rest of the package may use them too (``viz`` writes PNGs with
:func:`atomic_write`, run records take :func:`utc_now` and :func:`package_versions`).
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

_HASH_BLOCK = 1 << 20


def utc_now() -> str:
    """The current UTC time in ISO 8601, to the second (``2030-01-02T03:04:05+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """``{"python": ..., name: version or None}`` for the named modules (imported by name, not installed: None)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", None) or importlib.metadata.version(
                name
            )
        except (ImportError, importlib.metadata.PackageNotFoundError):
            versions[name] = None
    return versions


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def unlink_quiet(path: Path) -> None:
    """Delete a file; one that is already gone is fine."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def fsync_dir(path: Path) -> None:
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
        try:
            unlink_quiet(tmp)
        except OSError:  # e.g. a read-only folder, where it could not be created either
            pass
        raise


@contextmanager
def durable_write(path: Path) -> Iterator[IO[bytes]]:
    """:func:`atomic_write` in bytes with fsync, then an fsync of the directory (so the rename is durable).

    A killed process leaves at most the temporary file ``.<name>.<hex>.tmp``.
    """
    with atomic_write(path, "wb", fsync=True) as f:
        yield f
    fsync_dir(path.parent)


def check_writable(folder: Path) -> None:
    """Create and delete an empty temporary file in ``folder``: an OSError if it cannot be written."""
    probe = folder / f".write-check.{secrets.token_hex(6)}.tmp"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    os.unlink(probe)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON with :func:`durable_write`."""
    with durable_write(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


class StoreWriteError(OSError, ValueError):
    """A store file could not be written: disk full, quota, a read-only or protected folder, another OS error.

    One line saying which file, why and what to do; ``errno`` is the OS's. Both an OSError (what happened)
    and a ValueError (a problem with the output folder the user gave, reported without a traceback), as
    :class:`io.UnsupportedOperation` is. Files written before are never lost: each one is replaced atomically.
    """

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror is not None else super().__str__()


_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_KEPT = "finished shards are kept"


def write_error(err: OSError, what: str) -> StoreWriteError:
    """The :class:`StoreWriteError` for ``err``, raised while writing ``what`` (e.g. ``"shard <path>"``)."""
    if err.errno == errno.ENOSPC:
        text = f"no space left on device while writing {what}; free space and rerun the same command: {_KEPT}"
    elif err.errno == getattr(errno, "EDQUOT", -1):
        text = (
            f"disk quota exceeded while writing {what}; free space or raise the quota and rerun the same "
            f"command: {_KEPT}"
        )
    elif err.errno in _READ_ONLY:
        text = (
            f"cannot write {what}: the folder is read-only ({err.strerror or err}); pass an output directory "
            f"you can write to, or make it writable, and rerun the same command: {_KEPT}"
        )
    else:
        text = f"could not write {what}: {err.strerror or err}; fix the cause and rerun the same command: {_KEPT}"
    return StoreWriteError(err.errno, text)


@contextmanager
def reporting_write_errors(what: str) -> Iterator[None]:
    """Turn an OSError raised inside into the :class:`StoreWriteError` for writing ``what``."""
    try:
        yield
    except StoreWriteError:
        raise
    except OSError as err:
        raise write_error(err, what) from err
