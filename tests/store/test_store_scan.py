"""Tests for neuromask_pl.store.scan: damaged and incomplete shards found, leftover temporary files cleaned."""

from __future__ import annotations

import warnings

import numpy as np
from helpers import HASH, shard_files, write

from neuromask_pl.store import ShardWriter, load_results, merge_index, open_store, scan_shards


def test_scan_reports_truncated_flipped_and_incomplete_shards(tmp_path, caplog):
    open_store(tmp_path, HASH)
    shards = write(tmp_path, range(20), chunk_size=4, shape=(16, 16)).shards  # 5 shards
    truncated, flipped, no_sidecar, good, orphan = shards
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01
    flipped.write_bytes(bytes(data))
    no_sidecar.with_name(no_sidecar.name + ".sha256").unlink()
    orphan.unlink()  # leaves its sidecar behind

    scan = scan_shards(tmp_path)
    assert [s.path for s in scan.good] == [good]
    kinds = {b.path.name: b.kind for b in scan.bad}
    assert kinds == {
        truncated.name: "corrupt",
        flipped.name: "corrupt",
        no_sidecar.name: "incomplete",
        orphan.name + ".sha256": "incomplete",
    }
    assert "checksum mismatch" in next(b.reason for b in scan.bad if b.path == flipped)
    np.testing.assert_array_equal(scan.ids, [12, 13, 14, 15])
    quick = {b.path.name for b in scan_shards(tmp_path, verify=False).bad}
    assert truncated.name in quick  # structure checks catch truncation without hashing

    report = merge_index(tmp_path, scan=scan)  # bad shards are ignored
    assert report.samples == 4 and len(report.bad) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the index names the ignored shards: it is not stale
        with load_results(tmp_path) as results:
            np.testing.assert_array_equal(results.ids, [12, 13, 14, 15])
    with caplog.at_level("WARNING", logger="neuromask_pl.store"):
        assert scan.delete_bad() == 6  # 3 shards + 2 of their sidecars + the orphan sidecar
        assert "deleted 6 damaged or incomplete shard file(s)" in caplog.text
        caplog.clear()
        clean = scan_shards(tmp_path)
        assert shard_files(tmp_path) == [good] and not clean.bad
        assert clean.delete_bad() == 0 and caplog.text == ""  # nothing to delete: nothing said


def test_leftover_temp_files_are_cleaned_and_others_kept(tmp_path):
    open_store(tmp_path, HASH)
    write(tmp_path, range(3))
    leftovers = [
        tmp_path / "shards" / ".r00000-000001-s0.npz.0123456789ab.tmp",
        tmp_path / "shards" / ".r00003-000000-s0.npz.sha256.0123456789ab.tmp",
        tmp_path / ".index.npz.0123456789ab.tmp",
    ]
    unrelated = [tmp_path / "notes.txt", tmp_path / "shards" / "README.txt", tmp_path / ".hidden.tmp"]
    for p in leftovers + unrelated:
        p.write_bytes(b"partial")
    assert {p.name for p in scan_shards(tmp_path).temp_files} == {leftovers[0].name, leftovers[1].name}
    ShardWriter(tmp_path, 0).close()  # a writer cleans only its own rank's temporary files
    assert [p.exists() for p in leftovers] == [False, True, True]
    assert open_store(tmp_path, HASH).resumed
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in unrelated)
    assert len(scan_shards(tmp_path).good) == 1
