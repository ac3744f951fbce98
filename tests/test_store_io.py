"""Tests for neuromask_pl.store.io: atomic writes, a file's SHA-256, the time, package versions."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import re
from datetime import datetime, timezone

import numpy as np
import pytest

from neuromask_pl.store.io import atomic_write, package_versions, sha256_file, utc_now


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
