"""Tests for neuromask_pl.store: shard writer, crash and disk-full safety, scan, merge, lock, lazy reader."""

from __future__ import annotations

import csv
import errno
import gc
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from neuromask_pl.store import (
    INDEX_BYTES_PER_SAMPLE,
    ShardWriter,
    StoreLock,
    config_hash,
    load_results,
    merge_index,
    open_store,
    scan_shards,
)

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


# -- config hash ------------------------------------------------------------------------------------
def test_config_hash_is_sha256_of_canonical_json():
    obj = {"b": [1, 2.5, None], "a": {"y": True, "x": "s"}, "p": Path("/m/w.pth")}
    canonical = '{"a":{"x":"s","y":true},"b":[1,2.5,null],"p":"/m/w.pth"}'
    assert config_hash(obj) == hashlib.sha256(canonical.encode()).hexdigest()
    assert config_hash(dict(reversed(list(obj.items())))) == config_hash(obj)
    assert config_hash({**obj, "b": [1, 2.5, 0]}) != config_hash(obj)


# -- round trip, chunking, duplicates ---------------------------------------------------------------
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


# -- damage detection -------------------------------------------------------------------------------
def test_scan_reports_truncated_flipped_and_incomplete_shards(tmp_path):
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
    assert scan.delete_bad() == 6  # 3 shards + 2 of their sidecars + the orphan sidecar
    assert shard_files(tmp_path) == [good] and not scan_shards(tmp_path).bad


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


# -- killed writers ---------------------------------------------------------------------------------
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


# -- disk full --------------------------------------------------------------------------------------
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
        OSError,
        match=r"no space left on device while writing shard .*r00000-000002-f\.npz "
        r"\(2 samples, ids 4\.\.5\); free space and rerun the same command: "
        r"finished shards are kept",
    ) as error:
        writer.add(5, np.zeros((8, 8)), {})
    assert error.value.errno == errno.ENOSPC
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


# -- store metadata ---------------------------------------------------------------------------------
def test_open_store_creates_validates_resumes_and_overwrites(tmp_path):
    root = tmp_path / "out"
    (root / "overlays").mkdir(parents=True)
    unrelated = [root / "notes.txt", root / "run.json", root / "overlays" / "00000001.png"]
    for p in unrelated:
        p.write_text("mine")
    info = open_store(root, HASH)  # a non-empty folder of unrelated files is fine
    meta = json.loads((root / "store.json").read_text())
    assert (meta["format"], meta["version"], meta["config_hash"]) == ("neuromask-pl-store", 1, HASH)
    assert info.created == meta["created"] and not info.resumed
    write(root, range(5))
    merge_index(root)
    shards = shard_files(root)

    assert open_store(root, HASH).resumed and shard_files(root) == shards
    assert open_store(root, HASH, overwrite=True).resumed and shard_files(root) == shards  # same config: kept
    with pytest.raises(ValueError, match="holds neuromask-pl results for another configuration .*overwrite=True"):
        open_store(root, "b" * 64)
    assert shard_files(root) == shards and (root / "index.npz").exists()

    info = open_store(root, "b" * 64, overwrite=True)
    assert info.config_hash == "b" * 64 and not info.resumed
    assert not shard_files(root) and not list((root / "shards").iterdir())
    assert not (root / "index.npz").exists() and not (root / "manifest.csv").exists()
    assert all(p.read_text() == "mine" for p in unrelated)
    assert json.loads((root / "store.json").read_text())["config_hash"] == "b" * 64


@pytest.mark.parametrize(
    "content, message",
    [
        ({"format": "neuromask-pl-store", "version": 99, "config_hash": HASH}, "newer neuromask-pl .*version 99"),
        ({"format": "neuromask-pl-store", "version": "1", "config_hash": HASH}, "unknown store format version"),
        ({"format": "something-else", "version": 1}, "not a neuromask-pl store"),
        ("{not json", "is damaged"),
    ],
)
def test_open_store_and_reader_refuse_unknown_store_files(tmp_path, content, message):
    (tmp_path / "store.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message):
        open_store(tmp_path, HASH)
    with pytest.raises(ValueError, match=message):
        open_store(tmp_path, HASH, overwrite=True)
    with pytest.raises(ValueError, match=message):
        load_results(tmp_path)


def test_missing_store_a_file_and_stray_shards_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no neuromask-pl results"):
        load_results(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is a file"):
        open_store(tmp_path / "notes.txt", HASH)

    stray = tmp_path / "stray"
    open_store(stray, HASH)
    write(stray, range(2))
    (stray / "store.json").unlink()
    with pytest.raises(ValueError, match="holds shard files but .*store.json' is missing"):
        open_store(stray, HASH)
    assert not open_store(stray, HASH, overwrite=True).resumed and not shard_files(stray)


# -- lock -------------------------------------------------------------------------------------------
def fake_lock(root: Path, pid: int, host: str | None = None) -> None:
    root.mkdir(exist_ok=True)
    holder = {"host": host or socket.gethostname(), "pid": pid, "started": "2030-01-02T03:04:05+00:00", "token": "x"}
    (root / ".lock").write_text(json.dumps(holder))


def test_lock_refused_while_a_live_job_holds_it(tmp_path):
    fake_lock(tmp_path, os.getpid())  # this very process: alive
    text = (tmp_path / ".lock").read_text()
    host = socket.gethostname()
    expected = (
        f"another neuromask-pl job (pid {os.getpid()} on host {host} since 2030-01-02T03:04:05+00:00) is "
        f"writing to {tmp_path}; wait for it or remove {tmp_path / '.lock'} if it is dead"
    )
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        StoreLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == text
    fake_lock(tmp_path, 1, host="another-node")  # liveness unknowable on another host: refused
    with pytest.raises(RuntimeError, match="pid 1 on host another-node"):
        StoreLock(tmp_path).acquire()

    (tmp_path / ".lock").unlink()
    with StoreLock(tmp_path) as lock:
        holder = json.loads((tmp_path / ".lock").read_text())
        assert (holder["pid"], holder["host"], holder["token"]) == (os.getpid(), host, lock.token)
        with pytest.raises(RuntimeError, match="another neuromask-pl job"):
            StoreLock(tmp_path).acquire()  # a second job in the same process
    assert not (tmp_path / ".lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = run_python("pass")
    dead.wait()
    fake_lock(tmp_path, dead.pid)
    with caplog.at_level("WARNING", logger="neuromask_pl.store"), StoreLock(tmp_path) as lock:
        assert json.loads((tmp_path / ".lock").read_text())["token"] == lock.token
    assert f"took over the stale lock of {tmp_path} (pid {dead.pid}" in caplog.text
    assert not (tmp_path / ".lock").exists()

    lock = StoreLock(tmp_path)
    lock.acquire()
    fake_lock(tmp_path, dead.pid)  # someone else's lock now: release must not delete it
    lock.release()
    assert json.loads((tmp_path / ".lock").read_text())["token"] == "x"


# -- reader -----------------------------------------------------------------------------------------
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
    assert len(read) == 1 and read[0] == 2 * size * size + 128 and shard_bytes > 100 * read[0]
