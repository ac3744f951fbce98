"""Tests for neuromask_pl.store.index: merge_index (duplicates, determinism), damaged index.npz."""

from __future__ import annotations

import ast
import csv
import errno
import io
import os

import numpy as np
import pytest
from helpers import HASH, sha256, shard_files, temp_files, write

from neuromask_pl.store import (
    ShardWriter,
    StoreWriteError,
    load_results,
    merge_index,
    open_store,
    read_manifest,
)


def test_duplicates_across_ranks_are_indexed_once(tmp_path):
    open_store(tmp_path, HASH)
    write(tmp_path, range(0, 10), rank=0, session="a", value=0.0)
    write(tmp_path, range(5, 15), rank=1, session="a", value=1.0)  # ids 5-9 twice (DistributedSampler padding)
    write(tmp_path, [3], rank=1, session="b", value=2.0)  # a later session wins
    with ShardWriter(tmp_path, 2, session="c") as w:  # the latest session, but without a mask: the mask wins
        w.add(6, None, {"status": "skipped"})
    report = merge_index(tmp_path)
    assert (report.samples, report.duplicates) == (15, 7)
    with load_results(tmp_path) as results:
        np.testing.assert_array_equal(results.ids, np.arange(15))
        values = {i: float(m[0, 0]) for i, m, _ in results}
    assert values == {i: 2.0 if i == 3 else 0.0 if i < 10 else 1.0 for i in range(15)}
    manifest = (tmp_path / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 16 and manifest[0].split(",")[0] == "sample_id"

    index, text = (tmp_path / "index.npz").read_bytes(), (tmp_path / "manifest.csv").read_bytes()
    merge_index(tmp_path)  # idempotent, byte for byte
    assert (tmp_path / "index.npz").read_bytes() == index and (tmp_path / "manifest.csv").read_bytes() == text


def test_damaged_index_is_refused_with_advice(tmp_path):
    open_store(tmp_path, HASH)
    write(tmp_path, range(6))
    merge_index(tmp_path)
    data = bytearray((tmp_path / "index.npz").read_bytes())
    data[200] ^= 0x10  # inside the ids array
    (tmp_path / "index.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="index.npz' is damaged .*call merge_index"):
        load_results(tmp_path)
    merge_index(tmp_path)
    with load_results(tmp_path) as results:
        np.testing.assert_array_equal(results.ids, np.arange(6))


def test_file_names_that_are_not_utf8_are_stored_losslessly(tmp_path):
    # os.fsdecode gives a str with lone surrogates for the bytes of a name that are not UTF-8.
    names = {
        0: os.fsdecode(b"photos/caf\xe9_\xff.png"),  # Latin-1 bytes: not UTF-8
        1: "photos/café.png",  # ordinary UTF-8: written as it is
        2: "b'looks like a bytes literal'",  # ordinary text that looks like our escape: escaped too
        3: 'b"it\'s"',
        4: "C:\\data\\x41.png",
    }
    open_store(tmp_path, HASH)
    with ShardWriter(tmp_path, 0, session="a") as writer:
        for i, name in names.items():
            writer.add(i, np.zeros((2, 2)), {"path": name, "n": i})
    merge_index(tmp_path, columns=["sample_id", "path", "n"])

    raw = (tmp_path / "manifest.csv").read_bytes()
    text = raw.decode("utf-8")  # strict: the manifest stays valid UTF-8
    assert "photos/café.png" in text and "C:\\data\\x41.png" in text
    cells = {int(r["sample_id"]): r["path"] for r in csv.DictReader(io.StringIO(text, newline=""))}
    assert cells[0] == repr(b"photos/caf\xe9_\xff.png")  # the exact bytes, as a Python bytes literal
    assert cells[1] == names[1] and cells[4] == names[4]
    assert [ast.literal_eval(cells[i]).decode() for i in (2, 3)] == [names[2], names[3]]
    assert {r["sample_id"]: r["path"] for r in read_manifest(tmp_path)} == {str(i): n for i, n in names.items()}
    with load_results(tmp_path) as results:
        assert {i: results.row(i)["path"] for i in names} == names
    assert os.fsencode(next(iter(read_manifest(tmp_path)))["path"]) == b"photos/caf\xe9_\xff.png"


def test_text_that_no_file_name_can_hold_is_refused_when_added(tmp_path):
    open_store(tmp_path, HASH)
    writer = ShardWriter(tmp_path, 0)
    with pytest.raises(ValueError, match="row value 'path' of sample 3 holds a lone surrogate"):
        writer.add(3, np.zeros((2, 2)), {"path": "x\ud800"})  # not from os.fsdecode: no bytes give it
    with pytest.raises(ValueError, match="row key .* of sample 3 holds a lone surrogate"):
        writer.add(3, np.zeros((2, 2)), {os.fsdecode(b"\xff"): 1})
    writer.close()


@pytest.mark.parametrize("fail_on_fsync, kept", [(1, ("manifest.csv", "index.npz")), (3, ("index.npz",))])
def test_disk_full_while_merging_is_one_line_and_keeps_what_was_written(tmp_path, monkeypatch, fail_on_fsync, kept):
    open_store(tmp_path, HASH)
    write(tmp_path, range(4), session="a")
    merge_index(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("manifest.csv", "index.npz")}
    shards = {p: sha256(p) for p in shard_files(tmp_path)}
    write(tmp_path, range(4, 8), session="b")
    calls, real_fsync = [0], os.fsync

    def fsync(fd):  # merge_index fsyncs: manifest temp, directory, index temp, directory
        calls[0] += 1
        if calls[0] == fail_on_fsync:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    failing = "manifest.csv" if fail_on_fsync == 1 else "index.npz"
    with pytest.raises(StoreWriteError, match=rf"no space left on device while writing '.*{failing}'") as error:
        merge_index(tmp_path)
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC and "\n" not in str(error.value)
    assert {name: (tmp_path / name).read_bytes() for name in kept} == {name: before[name] for name in kept}
    assert not temp_files(tmp_path) and all(sha256(p) == h for p, h in shards.items())
    assert merge_index(tmp_path).samples == 8  # once there is space, the same call finishes the job
