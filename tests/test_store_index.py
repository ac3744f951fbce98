"""Tests for neuromask_pl.store.index: merge_index (duplicates, determinism), damaged index.npz."""

from __future__ import annotations

import numpy as np
import pytest
from store_helpers import HASH, write

from neuromask_pl.store import ShardWriter, load_results, merge_index, open_store


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
