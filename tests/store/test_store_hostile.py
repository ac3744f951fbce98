"""The store under hostile input: spreadsheet formulas in manifest cells, symlinked store folders, a tampered
index, shards holding what the writer never writes, and temporary files left by killed writers."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import HASH, write

from neuromask_pl.store import ShardWriter, StoreLock, load_results, merge_index, open_store, read_manifest
from neuromask_pl.store.index import load_index, save_index
from neuromask_pl.store.layout import read_store_info, to_manifest_cell

# ----------------------------------------------------------------------------- CSV injection

FORMULAS = ["=cmd|' /C calc'!A0", "@SUM(1)", "+1+2", "-2+3", "\t=1+1", "\r=1+1", "=1", "'=1", "''@x"]
HARMLESS = ["cat", "-1.5", "-3", "+4", "1e-3", "", "a=b", "O'Brien"]


def test_manifest_cells_a_spreadsheet_would_run_are_quoted_and_read_back_exactly(tmp_path):
    open_store(tmp_path, HASH)
    names = FORMULAS + HARMLESS
    with ShardWriter(tmp_path, 0) as writer:
        for i, name in enumerate(names):
            writer.add(i, None, {"target_name": name, "path": name, "prob": -0.25, "n": -3, "flag": True})
    merge_index(tmp_path)

    with open(tmp_path / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row, name in zip(rows, names):
        for key in ("target_name", "path"):
            cell = row[key]
            assert not cell[:1] or cell[0] not in "=+-@\t\r" or re.fullmatch(r"[-+]\d+(\.\d+)?", cell), (name, cell)
        assert row["prob"] == "-0.25" and row["n"] == "-3", "numbers stay numbers"
    assert rows[0]["target_name"] == "'=cmd|' /C calc'!A0" and rows[1]["target_name"] == "'@SUM(1)"
    assert rows[3]["path"] == "'-2+3"
    assert [rows[len(FORMULAS) + k]["target_name"] for k in range(len(HARMLESS))] == HARMLESS

    # read back exactly, as text (read_manifest) and typed (load_results)
    assert [row["target_name"] for row in read_manifest(tmp_path)] == names
    assert [row["path"] for row in read_manifest(tmp_path)] == names
    with load_results(tmp_path) as results:
        assert [row["target_name"] for row in results.rows] == names
        assert results.row(0)["prob"] == -0.25


def test_numbers_are_never_escaped():
    for value in (-1, -0.5, float("-inf"), True, None):
        assert to_manifest_cell(value) == value


# ----------------------------------------------------------------------------- symlinked store folders


def planted(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A folder outside the store holding files the store's own names would match."""
    outside = tmp_path / "outside"
    outside.mkdir()
    files = {
        "00000001.png": b"precious",
        "r00000-000000-s0.npz": b"not a shard",
        ".00000002.png.0123456789ab.tmp": b"x",
    }
    for name, data in files.items():
        (outside / name).write_bytes(data)
    return outside, files


def assert_untouched(outside: Path, files: dict[str, bytes]) -> None:
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == files, "files outside the store were changed"


@pytest.mark.parametrize("folder", ["shards", "overlays"])
def test_a_new_store_refuses_a_symlinked_store_folder(tmp_path, folder):
    outside, files = planted(tmp_path)
    root = tmp_path / "store"
    root.mkdir()
    (root / folder).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=rf"'{re.escape(str(root / folder))}' is a symbolic link"):
        open_store(root, HASH, sample_dirs=("overlays",))
    assert_untouched(outside, files)


@pytest.mark.parametrize("folder", ["shards", "overlays"])
def test_overwrite_and_resume_refuse_a_symlink_planted_in_an_existing_store(tmp_path, folder):
    root = tmp_path / "store"
    open_store(root, HASH, sample_dirs=("overlays",))
    write(root, range(3))
    outside, files = planted(tmp_path)
    moved = root / f"{folder}.real"
    (root / folder).rename(moved)
    (root / folder).symlink_to(outside, target_is_directory=True)
    for config, overwrite in ((HASH, False), ("b" * 64, True)):
        with pytest.raises(ValueError, match=rf"'{re.escape(str(root / folder))}' is a symbolic link"):
            open_store(root, config, overwrite=overwrite, sample_dirs=("overlays",))
        assert_untouched(outside, files)
    if folder == "shards":
        with pytest.raises(ValueError, match="symbolic link"):
            ShardWriter(root, 1)
        assert_untouched(outside, files)


# ----------------------------------------------------------------------------- the index and what reads check


def rewrite_index(root: Path, change) -> None:
    """Rewrite index.npz's arrays as a plain zip tool would (valid zip CRCs, old metadata kept)."""
    path = root / "index.npz"
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    arrays = {name[:-4]: np.load(io.BytesIO(data)) for name, data in members.items() if name.endswith(".npy")}
    change(arrays)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            if name.endswith(".npy"):
                buf = io.BytesIO()
                np.save(buf, arrays[name[:-4]])
                data = buf.getvalue()
            archive.writestr(name, data)


def swap(arrays: dict[str, np.ndarray], a: int, b: int, keys=("mask_offset", "mask_crc", "row_offset", "row_crc")):
    for key in keys:
        arrays[key][[a, b]] = arrays[key][[b, a]]


def test_a_tampered_index_fails_its_checksum_and_merge_index_writes_it_again(tmp_path):
    open_store(tmp_path, HASH)
    write(tmp_path, range(6))
    merge_index(tmp_path)
    rewrite_index(tmp_path, lambda arrays: swap(arrays, 1, 2))
    with pytest.raises(ValueError, match=r"index.npz' does not match its checksum.*call merge_index"):
        load_results(tmp_path)
    merge_index(tmp_path)
    with load_results(tmp_path) as results:
        assert results.indexed
        for sample_id in range(6):
            mask, row = results[sample_id]
            assert mask[0, 0] == sample_id and row["sample_id"] == sample_id


def test_a_duplicated_id_in_the_index_is_refused(tmp_path):
    open_store(tmp_path, HASH)
    write(tmp_path, range(6))
    merge_index(tmp_path)
    index = load_index(tmp_path / "index.npz")
    arrays = {key: np.array(value) for key, value in index.arrays.items()}
    arrays["ids"][2] = 1
    save_index(tmp_path / "index.npz", replace(index, arrays=arrays), read_store_info(tmp_path))  # a valid checksum
    with pytest.raises(ValueError, match=r"index.npz.*sample id 1 .*twice|index.npz.*not sorted"):
        load_results(tmp_path)


def test_every_read_checks_the_sample_id_of_what_it_read(tmp_path):
    """An index whose entries point at other samples' members (checksum and all consistent) is caught per read."""
    open_store(tmp_path, HASH)
    write(tmp_path, range(6))
    merge_index(tmp_path)
    index = load_index(tmp_path / "index.npz")
    arrays = {key: np.array(value) for key, value in index.arrays.items()}
    swap(arrays, 1, 2)
    save_index(tmp_path / "index.npz", replace(index, arrays=arrays), read_store_info(tmp_path))
    shard = index.shards[0]
    with load_results(tmp_path) as results:
        assert results.indexed
        assert results[0][0][0, 0] == 0
        with pytest.raises(ValueError, match=rf"mask of sample 1 in shard '.*{shard}'.*sample 2"):
            results.mask(1)
        with pytest.raises(ValueError, match=rf"row of sample 2 in shard '.*{shard}'.*sample 1"):
            results.row(2)
        with pytest.raises(ValueError, match="sample 1"):
            list(results)
    # the rows alone (offsets swapped for the rows only) are caught too
    arrays = {key: np.array(value) for key, value in index.arrays.items()}
    swap(arrays, 2, 3, keys=("row_offset", "row_crc"))  # ids 0..3 share the first shard
    save_index(tmp_path / "index.npz", replace(index, arrays=arrays), read_store_info(tmp_path))
    with load_results(tmp_path) as results:
        with pytest.raises(ValueError, match=rf"row of sample 2 in shard '.*{shard}'.*sample 3"):
            results.row(2)


def write_shard(root: Path, members: dict[str, bytes], name: str = "r00000-000000-evil.npz") -> Path:
    """A shard with the given members and a matching checksum file (as someone who knows the format would)."""
    path = root / "shards" / name
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(name + ".sha256").write_text(f"{digest}  {name}\n")
    return path


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.array([[object(), 1]], dtype=object), "dtype object"),
        (np.zeros((2, 2), dtype=[("a", "f4")]), "dtype"),
        (np.zeros((2, 2, 2), np.float16), "shape"),
        (None, "not a .npy array"),
    ],
    ids=["object", "structured", "3-d", "garbage"],
)
def test_a_shard_member_the_writer_never_writes_is_refused_naming_file_and_sample(tmp_path, mask, match):
    open_store(tmp_path, HASH)
    row = json.dumps({"sample_id": 5}).encode()
    data = b"\x93NUMPY garbage" if mask is None else npy(mask)
    shard = write_shard(tmp_path, {"m5.npy": data, "r5.json": row})
    merge_index(tmp_path)
    with load_results(tmp_path) as results:
        with pytest.raises(ValueError, match=rf"mask of sample 5 in shard '{re.escape(str(shard))}'.*{match}"):
            results.mask(5)


@pytest.mark.parametrize(
    ("row", "match"),
    [(b"[1, 2]", "not a JSON object"), (b"{bad json", "not valid JSON"), (b'{"sample_id": 6}', "sample 6")],
)
def test_a_bad_row_is_refused_naming_file_and_sample(tmp_path, row, match):
    open_store(tmp_path, HASH)
    shard = write_shard(tmp_path, {"r5.json": row})
    with pytest.raises(ValueError, match=rf"row of sample 5 in shard '{re.escape(str(shard))}'.*{match}"):
        merge_index(tmp_path)


# ----------------------------------------------------------------------------- temporary files of killed writes


def test_taking_the_lock_removes_stale_temporary_files_of_the_store_and_nothing_else(tmp_path):
    root = tmp_path / "store"
    open_store(root, HASH, sample_dirs=("overlays",))
    write(root, range(3))
    hexa = "0123456789ab"
    stale = [
        root / f".run.json.{hexa}.tmp",
        root / f".manifest.csv.{hexa}.tmp",
        root / f".index.npz.{hexa}.tmp",
        root / f".store.json.{hexa}.tmp",
        root / f".write-check.{hexa}.tmp",
        root / ".lock.stale.0123abcd",
        root / "overlays" / f".00000003.png.{hexa}.tmp",
        root / "shards" / f".r00000-000001-s0.npz.{hexa}.tmp",
        root / "shards" / f".r00000-000001-s0.npz.sha256.{hexa}.tmp",
    ]
    kept = [
        root / "notes.tmp",
        root / f".notes.txt.{hexa}.tmp",  # not a name the store writes
        root / "overlays" / f".holiday.png.{hexa}.tmp",
        root / "overlays" / "mine.txt",
        root / "elsewhere" / f".00000003.png.{hexa}.tmp",
    ]
    for path in kept:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    shards_before = sorted(p.name for p in (root / "shards").iterdir() if not p.name.startswith("."))

    other = StoreLock(root)
    other.acquire()
    try:
        for path in stale:  # e.g. the holder's own writes in progress
            path.write_bytes(b"x")
        with pytest.raises(RuntimeError, match="another neuromask-pl job"):
            StoreLock(root).acquire()
        assert all(p.exists() for p in stale), "a refused job must not touch another job's files"
    finally:
        other.release()

    with StoreLock(root):
        assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert sorted(p.name for p in (root / "shards").iterdir() if not p.name.startswith(".")) == shards_before
    merge_index(root)
    with load_results(root) as results:
        assert len(results) == 3
