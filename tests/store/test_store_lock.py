"""Tests for neuromask_pl.store.lock: one writing job per store directory, stale locks taken over."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
from helpers import read_only, run_python

from neuromask_pl.store import StoreLock, StoreWriteError


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


def test_lock_in_a_read_only_folder_is_one_clear_error(tmp_path, monkeypatch):
    read_only(monkeypatch, tmp_path)
    with pytest.raises(StoreWriteError, match=r"cannot write the lock file '.*\.lock': the folder is read-only"):
        StoreLock(tmp_path).acquire()
    monkeypatch.undo()
    assert not (tmp_path / ".lock").exists()
