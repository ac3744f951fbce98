"""Tests for neuromask_pl.store.writer: chunked shards, input checks, kill -9 at any instant, disk full."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import HASH, read_only, run_python, sha256, shard_files, temp_files, write

from neuromask_pl.store import ShardWriter, StoreWriteError, load_results, merge_index, open_store, scan_shards


def test_chunking_and_unique_shard_names_per_session(tmp_path):
    open_store(tmp_path, HASH)
    first = write(tmp_path, range(10), chunk_size=4, session="one")
    assert [p.name for p in first.shards] == [f"r00000-00000{k}-one.npz" for k in range(3)]
    assert [len(s) for s in scan_shards(tmp_path).good] == [4, 4, 2]
    before = {p: sha256(p) for p in first.shards}
    second = ShardWriter(tmp_path, 0, chunk_size=4)  # default session: time + random, never a rerun's name
    second.add(3, np.zeros((2, 2)), {})
    second.close()
    assert second.shards[0].name.startswith("r00000-000000-") and second.shards[0] not in before
    assert {p: sha256(p) for p in first.shards} == before
    assert len(shard_files(tmp_path)) == 4
    with pytest.raises(ValueError, match="rank 0 already wrote shards of session 'one'"):
        ShardWriter(tmp_path, 0, session="one")
    ShardWriter(tmp_path, 1, session="one").close()  # another rank may share the session token


def test_add_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="call open_store"):
        ShardWriter(tmp_path, 0)
    open_store(tmp_path, HASH)
    with pytest.raises(ValueError, match="chunk_size"):
        ShardWriter(tmp_path, 0, chunk_size=0)
    writer = ShardWriter(tmp_path, 0)
    with pytest.raises(ValueError, match="sample_id must be an int >= 0"):
        writer.add(-1, np.zeros((2, 2)), {})
    with pytest.raises(ValueError, match=r"2-D \(H, W\)"):
        writer.add(1, np.zeros((1, 2, 2)), {})
    with pytest.raises(TypeError, match="rows hold str, int, float, bool or None"):
        writer.add(1, np.zeros((2, 2)), {"x": [1, 2]})
    with pytest.raises(ValueError, match="row\\['sample_id'\\] is 2"):
        writer.add(1, np.zeros((2, 2)), {"sample_id": 2})
    writer.add(1, np.zeros((2, 2)), {"sample_id": 1})
    writer.add(1, np.ones((2, 2)), {})  # the same id again in one session: written once
    writer.close()
    assert writer.samples_written == 1
    with pytest.raises(RuntimeError, match="closed"):
        writer.add(2, np.zeros((2, 2)), {})


LOOP_WRITER = """
import sys
import numpy as np
from neuromask_pl.store import ShardWriter
writer = ShardWriter(sys.argv[1], 0, chunk_size=4, session=sys.argv[2])
for i in range(2000):
    writer.add(i, np.full((256, 256), i, np.float16), {"v": i})
"""


def check_shard_contents(path: Path) -> None:
    """A shard listed good holds exactly what the writer meant: mask i is all i, row {"v": i}."""
    with np.load(path) as npz:
        ids = sorted(int(n[1:]) for n in npz.files if n.startswith("m"))
        assert ids and sorted(int(n[1:-5]) for n in npz.files if n.startswith("r")) == ids
        for i in ids:
            np.testing.assert_array_equal(npz[f"m{i}"], np.full((256, 256), i, np.float16))
            assert json.loads(npz[f"r{i}.json"]) == {"sample_id": i, "v": i}


def test_sigkill_while_writing_leaves_only_verified_shards(tmp_path):
    open_store(tmp_path, HASH)
    rng = np.random.default_rng(0)
    for round_ in range(3):
        done = {p.name for p in shard_files(tmp_path)}
        child = run_python(LOOP_WRITER, str(tmp_path), f"kill{round_}")
        deadline = time.monotonic() + 30
        while len(list((tmp_path / "shards").glob(f"*kill{round_}.npz.sha256"))) < 3:
            assert child.poll() is None and time.monotonic() < deadline, "the writer did not get going"
            time.sleep(0.002)
        finished = {p: sha256(p) for p in shard_files(tmp_path) if p.with_name(p.name + ".sha256").exists()}
        time.sleep(rng.uniform(0, 0.03))  # somewhere inside writing the next shards
        os.kill(child.pid, signal.SIGKILL)
        child.wait()

        scan = scan_shards(tmp_path)
        good = {s.path for s in scan.good}
        assert set(finished) <= good
        assert all(sha256(p) == h for p, h in finished.items())  # earlier shards byte-identical
        for shard in scan.good:  # every shard listed good: independent checksum and exact content
            assert shard.sha256 == sha256(shard.path) == shard.path.with_name(shard.name + ".sha256").read_text()[:64]
            check_shard_contents(shard.path)
        assert all(b.kind == "incomplete" for b in scan.bad)  # a kill cannot leave a corrupt complete shard
        assert done <= {p.name for p in good}
        scan.delete_bad()
        open_store(tmp_path, HASH)  # the next start removes temporary files
        assert not temp_files(tmp_path)


CRASH_POINT_WRITER = """
import os, signal, sys
import numpy as np
from neuromask_pl.store import ShardWriter
writer = ShardWriter(sys.argv[1], 0, chunk_size=2, session="c")
kill_at, calls = int(sys.argv[2]), [0]
def dying(function):
    def call(*args):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args)
    return call
os.fsync, os.replace = dying(os.fsync), dying(os.replace)
for i in range(6):
    writer.add(i, np.full((8, 8), i, np.float16), {"v": i})
writer.close()
"""


@pytest.mark.parametrize("kill_at", range(1, 14))
def test_sigkill_at_every_step_of_writing_a_shard(tmp_path, kill_at):
    # Per shard j the writer makes 6 calls: fsync(shard temp), replace(shard), fsync(dir),
    # fsync(sidecar temp), replace(sidecar), fsync(dir). Killed just before call number kill_at:
    open_store(tmp_path, HASH)
    child = run_python(CRASH_POINT_WRITER, str(tmp_path), str(kill_at))
    assert child.wait(timeout=60) == -signal.SIGKILL
    scan = scan_shards(tmp_path)
    n_good = sum(6 * j + 5 < kill_at for j in range(3))
    assert [s.name for s in scan.good] == [f"r00000-{j:06d}-c.npz" for j in range(n_good)]
    for j, shard in enumerate(scan.good):
        np.testing.assert_array_equal(shard.ids, [2 * j, 2 * j + 1])
        with np.load(shard.path) as npz:
            np.testing.assert_array_equal(npz[f"m{2 * j}"], np.full((8, 8), 2 * j, np.float16))
    step = (kill_at - 1) % 6 + 1  # 1..6 within the shard being written
    renamed_without_sidecar = step in (3, 4, 5)
    assert [(b.path.name, b.kind) for b in scan.bad] == (
        [(f"r00000-{n_good:06d}-c.npz", "incomplete")] if renamed_without_sidecar else []
    )
    assert len(scan.temp_files) == (step in (1, 2, 4, 5))
    scan.delete_bad()
    open_store(tmp_path, HASH)
    assert not temp_files(tmp_path)
    write(tmp_path, range(6), chunk_size=2, session="d")  # the rerun completes the job
    merge_index(tmp_path)
    with load_results(tmp_path) as results:
        np.testing.assert_array_equal(results.ids, np.arange(6))


@pytest.mark.parametrize("where", ["shard-write", "shard-fsync", "sidecar-fsync"])
def test_disk_full_keeps_earlier_shards_and_says_what_to_do(tmp_path, monkeypatch, where):
    open_store(tmp_path, HASH)
    writer = ShardWriter(tmp_path, 0, chunk_size=2, session="f")
    for i in range(4):
        writer.add(i, np.full((8, 8), i, np.float16), {})
    before = {p: sha256(p) for p in shard_files(tmp_path)}
    assert len(before) == 2

    def failing(function, fail_on_call):
        calls = [0]

        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == fail_on_call:
                raise OSError(errno.ENOSPC, "No space left on device")
            return function(*args, **kwargs)

        return call

    if where == "shard-write":  # in the middle of the shard's members
        monkeypatch.setattr(zipfile.ZipFile, "writestr", failing(zipfile.ZipFile.writestr, 3))
    else:  # calls: fsync(shard temp), fsync(dir), fsync(sidecar temp)
        monkeypatch.setattr(os, "fsync", failing(os.fsync, 1 if where == "shard-fsync" else 3))
    writer.add(4, np.zeros((8, 8)), {})
    with pytest.raises(
        StoreWriteError,
        match=r"no space left on device while writing shard .*r00000-000002-f\.npz "
        r"\(2 samples, ids 4\.\.5\); free space and rerun the same command: "
        r"finished shards are kept",
    ) as error:
        writer.add(5, np.zeros((8, 8)), {})
    assert error.value.errno == errno.ENOSPC and "\n" not in str(error.value)
    monkeypatch.undo()

    assert not temp_files(tmp_path)
    assert {p: sha256(p) for p in shard_files(tmp_path)} == before  # nothing of the failed shard is left
    assert sorted((tmp_path / "shards").iterdir()) == sorted(
        [*before, *(p.with_name(p.name + ".sha256") for p in before)]
    )
    scan = scan_shards(tmp_path)
    assert not scan.bad and [s.path for s in scan.good] == sorted(before)
    with pytest.raises(RuntimeError, match="stopped after an earlier write error: no space left"):
        writer.add(6, np.zeros((8, 8)), {})
    writer.close()  # nothing more to do, no second error


def test_read_only_folder_while_writing_keeps_earlier_shards_and_says_so(tmp_path, monkeypatch):
    open_store(tmp_path, HASH)
    writer = ShardWriter(tmp_path, 0, chunk_size=2, session="f")
    for i in range(2):
        writer.add(i, np.full((8, 8), i, np.float16), {})
    before = {p: sha256(p) for p in (tmp_path / "shards").iterdir()}
    read_only(monkeypatch, tmp_path)  # e.g. the file system was remounted read-only after an error
    writer.add(2, np.zeros((8, 8)), {})
    with pytest.raises(StoreWriteError, match=r"cannot write shard .*r00000-000001-f\.npz .*: the folder is read-only"):
        writer.add(3, np.zeros((8, 8)), {})
    monkeypatch.undo()
    assert {p: sha256(p) for p in (tmp_path / "shards").iterdir()} == before
