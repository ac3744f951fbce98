"""Helpers shared by the tests of neuromask_pl.store (tests/test_store_*.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from neuromask_pl.store import ShardWriter

REPO = Path(__file__).resolve().parents[1]


HASH = "a" * 64


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_files(root: Path) -> list[Path]:
    return sorted((root / "shards").glob("r*.npz"))


def temp_files(root: Path) -> list[Path]:
    return sorted(p for d in (root, root / "shards") if d.is_dir() for p in d.glob(".*.tmp"))


def write(root: Path, ids, rank: int = 0, chunk_size: int = 4, session: str = "s0", value=None, shape=(6, 5)):
    """Write masks ``np.full(shape, value or id)`` and rows {"v": id} for ``ids``; returns the writer."""
    with ShardWriter(root, rank, chunk_size=chunk_size, session=session) as writer:
        for i in ids:
            writer.add(i, np.full(shape, i if value is None else value, np.float16), {"v": i, "rank": rank})
    return writer


def run_python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, **kwargs)


def read_only(monkeypatch, root: Path) -> None:
    """Make every write under ``root`` fail as on a read-only file system (EROFS), reads still work.

    Emulated at the Python level because tests may run as root, for whom a chmod changes nothing.
    """
    import builtins
    import errno
    import io

    inside = root.resolve()

    def guard(function, is_write=lambda *args, **kwargs: True):
        def call(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and is_write(path, *args, **kwargs):
                resolved = Path(os.path.abspath(path))
                if resolved == inside or inside in resolved.parents:
                    raise OSError(errno.EROFS, "Read-only file system", str(path))
            return function(path, *args, **kwargs)

        return call

    def opens_to_write(path, mode="r", *args, **kwargs):
        return any(c in mode for c in "wxa+")

    def os_open_writes(path, flags, *args, **kwargs):
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    monkeypatch.setattr(builtins, "open", guard(builtins.open, opens_to_write))
    monkeypatch.setattr(io, "open", guard(io.open, opens_to_write))
    monkeypatch.setattr(os, "open", guard(os.open, os_open_writes))
    for name in ("mkdir", "unlink", "remove", "rename", "replace", "link", "rmdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))
