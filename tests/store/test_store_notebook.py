"""StoredResults for notebooks: ``rows`` called or iterated, ``to_pandas``, ``by_class``, ``top``/``bottom`` by any
column, ``flagged``, and the run record ``run``."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from helpers import HASH

from neuromask_pl.store import ShardWriter, StoredResults, load_results, merge_index, open_store

ROWS = {
    0: {"status": "ok", "target": 1, "target_name": "dog", "prob_masked": 0.9, "mask_area": 0.2, "flags": ""},
    1: {"status": "ok", "target": 0, "target_name": "cat", "prob_masked": 0.4, "mask_area": 0.1, "flags": "prob_rise"},
    2: {"status": "skipped", "path": "bad.png", "error": "not an image"},
    3: {"status": "ok", "target": 1, "target_name": "dog", "prob_masked": 0.9, "mask_area": 0.0001,
        "flags": "baseline_keeps_class;empty_mask"},
    4: {"status": "failed", "target": 0, "target_name": "cat", "prob_masked": float("nan"), "mask_area": float("nan"),
        "flags": "", "error": "diverged"},
    5: {"status": "ok", "target": 0, "target_name": "", "prob_masked": 0.7, "mask_area": 0.3, "flags": ""},
    6: {"status": "ok", "target": 2, "target_name": "owl", "prob_masked": 0.1, "mask_area": 0.5, "flags": "",
        "preserved": False},
}  # fmt: skip


@pytest.fixture
def results(tmp_path):
    open_store(tmp_path, HASH)
    with ShardWriter(tmp_path, rank=0, chunk_size=3, session="s") as writer:
        for i, row in ROWS.items():
            writer.add(i, None if row["status"] != "ok" else np.full((2, 3), i / 10, np.float16), row)
    merge_index(tmp_path)
    with load_results(tmp_path) as opened:
        yield opened


def test_rows_can_be_called_iterated_and_counted(results) -> None:
    called, expected = list(results.rows()), [{"sample_id": i, **row} for i, row in ROWS.items()]
    assert json.dumps(called) == json.dumps(list(results.rows)) == json.dumps(expected)  # NaN != NaN
    assert len(results.rows) == 7 and "7 rows" in repr(results.rows)
    assert next(results.rows())["sample_id"] == 0  # a fresh iterator on each call


def test_to_pandas_is_a_table_indexed_by_sample_id(results) -> None:
    table = results.to_pandas()
    assert table.index.name == "sample_id" and table.index.tolist() == list(ROWS)
    assert table.loc[3, "flags"] == "baseline_keeps_class;empty_mask" and table.loc[1, "prob_masked"] == 0.4
    assert table.loc[2, "error"] == "not an image" and np.isnan(table.loc[2, "prob_masked"])
    assert table.groupby("target_name").size().to_dict() == {"": 1, "cat": 2, "dog": 2, "owl": 1}
    small = results.to_pandas(columns=["prob_masked", "status"])
    assert list(small.columns) == ["prob_masked", "status"] and small.index.name == "sample_id"


def test_to_pandas_without_pandas_says_how_to_get_it(results, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(ImportError, match="pip install pandas"):
        results.to_pandas()


def test_by_class_groups_the_explained_samples(results) -> None:
    assert results.by_class() == {"dog": [0, 3], "cat": [1], 0: [5], "owl": [6]}  # no name: the class index
    assert results.by_class("target") == {1: [0, 3], 0: [1, 5], 2: [6]}


def test_top_and_bottom_by_any_column(results) -> None:
    assert [r["sample_id"] for r in results.top(3, by="prob_masked")] == [0, 3, 5]  # ties: lower id first
    assert [r["sample_id"] for r in results.bottom(2, by="prob_masked")] == [6, 1]
    assert [r["sample_id"] for r in results.bottom(1, by="mask_area")] == [3]
    assert results.top(1, by="mask_area")[0] == {"sample_id": 6, **ROWS[6]}  # the whole row
    # Not ok (skipped, failed: NaN) and rows without the column are left out; where= filters.
    assert [r["sample_id"] for r in results.top(10, by="mask_area")] == [6, 5, 0, 1, 3]
    assert [r["sample_id"] for r in results.top(10, by="preserved")] == [6]
    assert [r["sample_id"] for r in results.top(5, "mask_area", where=lambda r: r["target_name"] == "dog")] == [0, 3]
    assert results.top(0) == []
    with pytest.raises(KeyError, match="no row has the column 'prob'"):
        results.top(3, by="prob")
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        results.bottom(-1)


def test_flagged_lists_the_samples_not_to_trust(results) -> None:
    assert results.flagged() == [1, 3]
    assert results.flagged("empty_mask") == [3] and results.flagged("full_mask") == []


def test_run_is_the_run_record_when_there_is_one(results) -> None:
    assert results.run is None
    (results.root / "run.json").write_text(json.dumps({"counts": {"explained": 5}}))
    assert results.run == {"counts": {"explained": 5}}
    (results.root / "run.json").write_text("{not json")
    assert results.run is None


def test_load_results_opens_a_subclass_when_asked(tmp_path) -> None:
    class Mine(StoredResults):
        pass

    open_store(tmp_path, HASH)
    with ShardWriter(tmp_path, rank=0, session="s") as writer:
        writer.add(0, np.zeros((2, 2), np.float16), {"status": "ok"})
    merge_index(tmp_path)
    with load_results(tmp_path, cls=Mine) as opened:
        assert type(opened) is Mine and opened.info.config_hash == HASH and len(opened) == 1
