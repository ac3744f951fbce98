"""Tests for neuromask_pl.store.reader: round trip, damage after indexing, no or stale index, memory bound."""

from __future__ import annotations

import csv
import gc
import json
import os
import tracemalloc
import zipfile

import numpy as np
import pytest
from helpers import HASH, sha256, shard_files, write

from neuromask_pl.store import (
    INDEX_BYTES_PER_SAMPLE,
    ShardWriter,
    load_results,
    merge_index,
    open_store,
    resume_state,
    scan_shards,
    source_fingerprint,
)


def test_round_trip_masks_rows_and_manifest(tmp_path):
    rng = np.random.default_rng(0)
    open_store(tmp_path, HASH)
    masks, rows = {}, {}
    ids = [7, 3, 11, 0, 5, 2, 9]  # out of order, with gaps
    with ShardWriter(tmp_path, rank=0, chunk_size=3, session="x") as writer:
        for n, i in enumerate(ids):
            shape = (5, 7) if n % 2 else (4, 4)  # masks of different sizes share shards
            masks[i] = rng.uniform(0, 1, shape).astype(np.float16)
            masks[i][0, 0] = np.float16(6e-8)  # a float16 subnormal survives exactly
            rows[i] = {"sample_id": i, "status": "ok", "target": i % 3, "prob": 1 / (i + 3), "kept": i > 4, "e": None}
            writer.add(np.int64(i), masks[i], {k: v for k, v in rows[i].items() if k != "sample_id"})
        writer.add(4, None, {"status": "skipped", "error": "bad file"})
        rows[4] = {"sample_id": 4, "status": "skipped", "error": "bad file"}
    assert len(writer.shards) == 3 and writer.samples_written == 8  # 3 + 3 + 2

    # Independent readers: sha256sum-style sidecars and numpy.load of the shard files.
    for shard in writer.shards:
        assert shard.with_name(shard.name + ".sha256").read_text() == f"{sha256(shard)}  {shard.name}\n"
        with zipfile.ZipFile(shard) as z:
            assert z.testzip() is None
            assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
        with np.load(shard) as npz:
            for name in npz.files:
                if name.startswith("m"):
                    np.testing.assert_array_equal(npz[name], masks[int(name[1:])])

    columns = ["sample_id", "status", "target", "prob", "kept", "error"]
    report = merge_index(tmp_path, columns=columns)
    assert (report.samples, report.shards, report.duplicates, report.bad) == (8, 3, 0, [])
    with open(tmp_path / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert [int(r["sample_id"]) for r in manifest] == sorted(rows)
    assert list(manifest[0]) == columns
    assert manifest[2] == {
        "sample_id": "3",
        "status": "ok",
        "target": "0",
        "prob": str(1 / 6),
        "kept": "False",
        "error": "",
    }
    assert manifest[3]["status"] == "skipped" and manifest[3]["error"] == "bad file"

    with load_results(tmp_path) as results:
        assert results.indexed and len(results) == 8
        np.testing.assert_array_equal(results.ids, sorted(rows))
        assert 11 in results and np.int32(5) in results and 1 not in results and "3" not in results
        for i, mask in masks.items():
            got = results.mask(i)
            assert got.dtype == np.float32 and got.shape == mask.shape
            np.testing.assert_array_equal(got, mask.astype(np.float32))
            assert results.row(i) == rows[i]
        assert results.mask(4) is None and not results.has_mask(4) and results.has_mask(0)
        mask, row = results[7]
        np.testing.assert_array_equal(mask, masks[7].astype(np.float32))
        assert row == rows[7]
        seen = list(results)
        assert [s[0] for s in seen] == sorted(rows)
        assert all(r == rows[i] for i, _, r in seen)
        assert list(results.rows) == [rows[i] for i in sorted(rows)]
        with pytest.raises(KeyError, match="sample id 1 is not in the results"):
            results.mask(1)


def test_reader_detects_a_mask_damaged_after_indexing(tmp_path):
    open_store(tmp_path, HASH)
    (shard,) = write(tmp_path, range(4), shape=(32, 32)).shards
    merge_index(tmp_path)
    with np.load(shard) as npz:
        start = shard.read_bytes().index(npz.zip.read("m2.npy")) + 200
    data = bytearray(shard.read_bytes())
    data[start] ^= 0x40
    shard.write_bytes(bytes(data))
    with load_results(tmp_path) as results:
        assert results.mask(1)[0, 0] == 1  # other samples still read
        with pytest.raises(RuntimeError, match="the mask of sample 2 .* is damaged"):
            results.mask(2)


def test_reader_without_index_or_with_stale_index_reads_verified_shards(tmp_path):
    open_store(tmp_path, HASH)
    write(tmp_path, range(6), session="a")
    with pytest.warns(UserWarning, match="index.npz is missing .* reading 2 verified shards"):
        results = load_results(tmp_path)
    assert not results.indexed and results.mask(5)[0, 0] == 5
    results.close()
    merge_index(tmp_path)
    write(tmp_path, range(6, 9), session="b")  # a resumed job adds shards after the merge
    with pytest.warns(UserWarning, match="is stale"):
        results = load_results(tmp_path)
    np.testing.assert_array_equal(results.ids, np.arange(9))
    results.close()


def test_reader_memory_is_bounded_and_reads_only_the_asked_member(tmp_path, monkeypatch):
    n, size, chunk = 10_000, 32, 256
    open_store(tmp_path, HASH)
    mask = np.zeros((size, size), np.float16)
    with ShardWriter(tmp_path, 0, chunk_size=chunk) as writer:
        for i in range(n):
            mask[0, 0] = i % 2048
            writer.add(i, mask, {"status": "ok", "target": i % 1000, "prob": 0.5})
    merge_index(tmp_path, columns=["sample_id", "status", "target", "prob"])
    n_shards = -(-n // chunk)
    load_results(tmp_path).close()  # one-time imports and caches out of the measurement
    gc.collect()

    tracemalloc.start()
    try:
        with load_results(tmp_path, max_open_shards=4) as results:
            assert results.index_nbytes == INDEX_BYTES_PER_SAMPLE * n
            count = 0
            for i, got, row in results:
                assert got[0, 0] == i % 2048 and row["target"] == i % 1000
                count += 1
            for i in (9_999, 0, 5_000, 17, 9_000):  # random access across shards
                assert results.mask(i)[0, 0] == i % 2048
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The bound stated in StoredResults' docstring: 48 N + 1024 S + 6 H W + the row + 64 KiB.
    row_bytes = len(json.dumps({"sample_id": n, "status": "ok", "target": 999, "prob": 0.5}))
    bound = INDEX_BYTES_PER_SAMPLE * n + 1024 * n_shards + 6 * size * size + row_bytes + 64 * 1024
    stored = sum(p.stat().st_size for p in shard_files(tmp_path))
    assert count == n and peak < bound < stored / 20, (peak, bound, stored)

    read = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, k, off: read.append(k) or real_pread(fd, k, off))
    with load_results(tmp_path) as results:
        read.clear()
        results.mask(4_321)
    shard_bytes = shard_files(tmp_path)[0].stat().st_size
    # one pread: the mask's bytes and its member's local header (30 bytes and its name), checked to be its own
    assert len(read) == 1 and read[0] == 2 * size * size + 128 + 30 + len("m4321.npy") and shard_bytes > 100 * read[0]


def test_resume_state_finds_samples_whose_source_file_changed_and_redone_ones_win(tmp_path):
    root, data = tmp_path / "out", tmp_path / "images"
    data.mkdir()
    files = [data / f"{i}.png" for i in range(5)] + [None, data / "6.png"]
    for i, path in enumerate(files):
        if path is not None:
            path.write_bytes(bytes([i]) * (100 + i))
    st = files[0].stat()
    assert source_fingerprint(files[0]) == f"stat:{st.st_size}:{st.st_mtime_ns}"
    assert source_fingerprint(data / "nothing.png") == "missing"

    open_store(root, HASH)
    with ShardWriter(root, 0, session="a") as writer:
        for i, path in enumerate(files):
            row = {"path": str(path) if path else "", "v": i}
            fingerprint = source_fingerprint(path) if path else None  # 5: no file (a tensor dataset)
            writer.add(i, None if i == 6 else np.full((2, 2), i), row, fingerprint=fingerprint)  # 6: skipped
    with zipfile.ZipFile(writer.shards[0]) as z:  # kept beside the row, readable by any zip tool
        assert z.getinfo("r0.json").comment == source_fingerprint(files[0]).encode()

    files[1].write_bytes(b"other content, other size")
    files[2].write_bytes(bytes([9]) * 102)  # same size, new content: a later modification time
    os.utime(files[2], ns=(st.st_atime_ns, files[2].stat().st_mtime_ns + 1))
    files[3].unlink()
    state = resume_state(root, scan_shards(root))
    np.testing.assert_array_equal(state.changed, [1, 2, 3])
    np.testing.assert_array_equal(state.done, [0, 4, 5])  # 6 has no mask: not done, but not changed either

    with ShardWriter(root, 0, session="b") as writer:  # the rerun redoes the changed ones, and 6 and 0 fail
        for i in (1, 2):
            writer.add(i, np.full((2, 2), 10 + i), {"path": str(files[i])}, fingerprint=source_fingerprint(files[i]))
        writer.add(3, None, {"path": str(files[3]), "status": "skipped"}, fingerprint=source_fingerprint(files[3]))
        for i in (0, 6):  # unchanged files that failed to read this time (e.g. a network file system hiccup)
            writer.add(i, None, {"path": str(files[i]), "status": "skipped"}, fingerprint=source_fingerprint(files[i]))
    merge_index(root)
    with load_results(root) as results:
        assert [results.mask(i)[0, 0] if results.has_mask(i) else None for i in range(7)] == [
            0,  # the unchanged file's mask wins over a later failure
            11,
            12,  # the redone masks win
            None,  # the file is gone: the old mask is not the result of anything that exists now
            4,
            5,
            None,
        ]
    state = resume_state(root)
    assert state.changed.size == 0
    np.testing.assert_array_equal(state.done, [0, 1, 2, 4, 5])
