"""Tests for neuromask_pl.store.layout: config hash, open_store (create, check, resume, overwrite), store.json."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from helpers import HASH, read_only, shard_files, temp_files, write

from neuromask_pl.store import StoreWriteError, config_hash, load_results, merge_index, open_store


def test_config_hash_is_sha256_of_canonical_json():
    obj = {"b": [1, 2.5, None], "a": {"y": True, "x": "s"}, "p": Path("/m/w.pth")}
    canonical = '{"a":{"x":"s","y":true},"b":[1,2.5,null],"p":"/m/w.pth"}'
    assert config_hash(obj) == hashlib.sha256(canonical.encode()).hexdigest()
    assert config_hash(dict(reversed(list(obj.items())))) == config_hash(obj)
    assert config_hash({**obj, "b": [1, 2.5, 0]}) != config_hash(obj)


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


@pytest.mark.parametrize("name", ["manifest.csv", "index.npz"])
def test_a_manifest_or_index_without_store_json_is_never_overwritten(tmp_path, name):
    # Without store.json nothing says the store wrote it (it may be the user's own file, or an older
    # layout): open_store must refuse rather than let merge_index replace it.
    (tmp_path / name).write_text("sample_id,status\n1,ok\n")
    with pytest.raises(ValueError, match=rf"holds {re.escape(name)} but .*store.json' is missing.*overwrite=True"):
        open_store(tmp_path, HASH)
    assert (tmp_path / name).read_text() == "sample_id,status\n1,ok\n" and not (tmp_path / "store.json").exists()
    assert not open_store(tmp_path, HASH, overwrite=True).resumed and not (tmp_path / name).exists()


def test_overwrite_deletes_the_per_sample_files_of_the_results_it_replaces(tmp_path):
    root = tmp_path / "out"
    info = open_store(root, HASH, sample_dirs=("overlays",))
    assert info.sample_dirs == ("overlays",) and (root / "overlays").is_dir()
    write(root, range(3))
    theirs = [root / "overlays" / f"{i:08d}.png" for i in range(3)] + [
        root / "overlays" / ".00000003.png.0a1b2c3d4e5f.tmp"
    ]
    mine = [root / "overlays" / "notes.txt", root / "overlays" / "cover.png", root / "other" / "00000001.png"]
    for p in theirs + mine:
        p.parent.mkdir(exist_ok=True)
        p.write_text("x")

    assert open_store(root, HASH).sample_dirs == ("overlays",)  # resumed: recorded in store.json, files kept
    assert all(p.exists() for p in theirs)
    with pytest.raises(ValueError, match="another configuration"):
        open_store(root, "b" * 64)
    assert all(p.exists() for p in theirs)

    # A later job that writes no overlays still replaces the old ones: the store recorded the folder.
    info = open_store(root, "b" * 64, overwrite=True)
    assert not any(p.exists() for p in theirs) and all(p.read_text() == "x" for p in mine)
    assert info.sample_dirs == () and json.loads((root / "store.json").read_text()).get("sample_dirs", []) == []

    open_store(root, "b" * 64, sample_dirs=["overlays"])  # a resumed job that starts writing them records them
    assert json.loads((root / "store.json").read_text())["sample_dirs"] == ["overlays"]
    for bad in ("shards", "../up", "a/b", "", "."):
        with pytest.raises(ValueError, match="sample_dirs"):
            open_store(root, "b" * 64, sample_dirs=[bad])


def test_refusal_of_another_configuration_names_what_changed_and_both_spellings(tmp_path):
    old = {"hparams": {"lr": 0.03, "steps": 300, "preset": "default"}, "data": {"root": "/d"}, "precision": "32-true"}
    new = {
        "hparams": {"lr": 0.1, "steps": 300},
        "data": {"root": "/d", "size": 224},
        "precision": "bf16-mixed",
    }
    info = open_store(tmp_path, old)
    assert info.config_hash == config_hash(old)
    assert json.loads((tmp_path / "store.json").read_text())["config"] == old
    with pytest.raises(ValueError) as error:
        open_store(tmp_path, new)
    message = str(error.value)
    assert "another configuration" in message and "\n" not in message
    for change in (
        "hparams.lr (0.03 there, 0.1 now)",
        'hparams.preset ("default" there, absent now)',
        "data.size (absent there, 224 now)",
        'precision ("32-true" there, "bf16-mixed" now)',
    ):
        assert change in message
    assert "steps" not in message and "data.root" not in message
    assert "overwrite=True" in message and "--writer.overwrite true" in message

    assert open_store(tmp_path, config_hash(old)).resumed  # a precomputed hash still works
    with pytest.raises(ValueError, match=rf"config hash {config_hash(old)[:12]} there, bbbbbbbbbbbb now"):
        open_store(tmp_path, "b" * 64)  # no configuration to compare with: the hashes
    assert open_store(tmp_path, new, overwrite=True).config_hash == config_hash(new)


def test_a_read_only_output_folder_is_one_clear_error_and_nothing_is_lost(tmp_path, monkeypatch):
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    fresh.mkdir()
    open_store(resumed, HASH)
    write(resumed, range(3))
    merge_index(resumed)
    before = {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()}
    read_only(monkeypatch, tmp_path)
    for root, config in ((fresh, HASH), (resumed, HASH), (resumed, "b" * 64)):
        with pytest.raises(StoreWriteError, match=r"cannot write .*: the folder is read-only \(Read-only file") as e:
            open_store(root, config, overwrite=True)
        assert "\n" not in str(e.value) and isinstance(e.value, ValueError)  # one line, a user error
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()} == before
    assert list(fresh.iterdir()) == []


def test_disk_full_while_creating_the_store_is_one_line(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreWriteError, match=r"no space left on device while writing .*store\.json.*free space"):
        open_store(tmp_path / "out", HASH)
    monkeypatch.undo()
    assert not (tmp_path / "out" / "store.json").exists() and not temp_files(tmp_path / "out")
