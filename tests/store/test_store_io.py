"""Tests for neuromask_pl.store.io: atomic writes, a file's SHA-256, the time, package versions, write errors."""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import os
import platform
import re
from datetime import datetime, timezone

import numpy as np
import pytest

from neuromask_pl.store.io import (
    StoreWriteError,
    atomic_write,
    package_versions,
    reporting_write_errors,
    sha256_file,
    utc_now,
    write_error,
)


def test_atomic_write_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="stop"):
        with atomic_write(path, "w") as f:
            f.write("half")
            raise RuntimeError("stop")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with atomic_write(path, "w", fsync=True) as f:
        f.write("new é")
    assert path.read_bytes() == "new é".encode() and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_sha256_file_matches_hashlib_across_block_boundaries(tmp_path):
    data = np.random.default_rng(0).bytes((1 << 20) * 2 + 7)  # two full 1 MiB blocks and a tail
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_utc_now_is_iso_8601_utc_to_the_second():
    before = datetime.now(timezone.utc).replace(microsecond=0)
    text = utc_now()
    after = datetime.now(timezone.utc)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", text)
    assert before <= datetime.fromisoformat(text) <= after


def test_package_versions_names_python_and_each_module():
    versions = package_versions(["numpy", "pytest", "no_such_module_here"])
    assert versions == {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pytest": importlib.metadata.version("pytest"),
        "no_such_module_here": None,
    }


@pytest.mark.parametrize(
    "code, says",
    [
        (errno.ENOSPC, r"no space left on device while writing shard x\.npz; free space and rerun the same command"),
        (errno.EDQUOT, r"disk quota exceeded while writing shard x\.npz; free space or raise the quota"),
        (errno.EROFS, r"cannot write shard x\.npz: the folder is read-only \(Read-only file system\); pass an output"),
        (errno.EACCES, r"cannot write shard x\.npz: the folder is read-only \(Permission denied\); pass an output"),
        (errno.EIO, r"could not write shard x\.npz: Input/output error; fix the cause and rerun the same command"),
    ],
)
def test_write_errors_are_one_line_oserrors_and_valueerrors_that_say_what_to_do(code, says):
    error = write_error(OSError(code, os.strerror(code)), "shard x.npz")
    assert isinstance(error, StoreWriteError) and isinstance(error, OSError) and isinstance(error, ValueError)
    assert error.errno == code and "\n" not in str(error)
    assert re.match(says, str(error)) and str(error).endswith("finished shards are kept")
    with pytest.raises(StoreWriteError, match=says) as raised:
        with reporting_write_errors("shard x.npz"):
            raise OSError(code, os.strerror(code))
    assert raised.value.errno == code
