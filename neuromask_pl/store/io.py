"""Small file helpers of the store: atomic writes, fsync, a file's SHA-256, the time, package versions.

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
        unlink_quiet(tmp)
        raise


@contextmanager
def durable_write(path: Path) -> Iterator[IO[bytes]]:
    """:func:`atomic_write` in bytes with fsync, then an fsync of the directory (so the rename is durable).

    A killed process leaves at most the temporary file ``.<name>.<hex>.tmp``.
    """
    with atomic_write(path, "wb", fsync=True) as f:
        yield f
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON with :func:`durable_write`."""
    with durable_write(path) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
