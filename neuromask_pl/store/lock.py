"""The exclusive lock of a store directory: one writing job at a time."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from neuromask_pl.store.io import reporting_write_errors, unlink_quiet, utc_now
from neuromask_pl.store.layout import LOCK_FILE, remove_stale_temps

log = logging.getLogger(__name__)


class StoreLock:
    """Exclusive lock on a store directory: the file ``root/.lock`` created with ``O_CREAT | O_EXCL``.

    The file holds ``{"host", "pid", "started", "token"}``. A lock held by a live process on this host,
    or by any process on another host (whose liveness cannot be checked), is refused with a
    RuntimeError; a lock left by a dead process of this host is taken over with a logged warning. Taking the
    lock removes the temporary files that killed writes left in the store (see
    :func:`~neuromask_pl.store.layout.remove_stale_temps`); a refused job touches nothing.
    Use as a context manager or with :meth:`acquire` / :meth:`release`; :meth:`release` deletes the
    file only while it is still this lock's. In a DDP job only global rank 0 takes it.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.token = secrets.token_hex(8)
        self.held = False

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _record(self) -> bytes:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": utc_now(), "token": self.token}
        return json.dumps(record).encode("utf-8")

    def _read_holder(self) -> dict[str, Any] | None:
        """The lock file's record; None when it is unreadable after a short wait (a dead half-written lock)."""
        for attempt in range(5):
            try:
                holder = json.loads(self.path.read_bytes())
                if isinstance(holder, dict):
                    return holder
            except FileNotFoundError:
                return {}
            except (OSError, ValueError):
                pass
            time.sleep(0.05 * (attempt + 1))  # the holder may be between creating and writing it
        return None

    def acquire(self) -> None:
        """Take the lock (creating ``root`` if needed).

        Raises:
            RuntimeError: another live neuromask-pl job holds it.
            StoreWriteError: the lock file cannot be written (a read-only folder, a full disk).
        """
        if self.held:
            return
        with reporting_write_errors(f"the lock file '{self.path}'"):
            self._acquire()

    def _acquire(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder == {}:  # released meanwhile
                    continue
                self._take_over_if_stale(holder)
                continue
            try:
                os.write(fd, self._record())
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                unlink_quiet(self.path)  # never leave an empty lock behind
                raise
            os.close(fd)
            self.held = True
            self._remove_stale_temps()
            return
        raise RuntimeError(f"could not take the lock '{self.path}' (it keeps changing); retry")

    def _remove_stale_temps(self) -> None:
        """What killed writes left (only the store's own temporary file names): no job writes now but this one."""
        try:
            remove_stale_temps(self.root)
        except OSError as err:  # e.g. a read-only folder: they stay, and do no harm
            log.warning("could not remove the leftover temporary files in %s: %s", self.root, err)

    def _take_over_if_stale(self, holder: dict[str, Any] | None) -> None:
        if holder is not None:
            host, pid = holder.get("host"), holder.get("pid")
            alive = True
            if host == socket.gethostname() and isinstance(pid, int) and pid > 0:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    alive = False
                except PermissionError:
                    alive = True  # exists, another user's
            if alive:
                raise RuntimeError(
                    f"another neuromask-pl job (pid {pid} on host {host} since {holder.get('started')}) is "
                    f"writing to {self.root}; wait for it or remove {self.path} if it is dead"
                )
        # Stale: move it aside under a unique name (only one taker can), check it is the one judged stale.
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_bytes())
        except (OSError, ValueError):
            moved = None
        if holder is not None and moved != holder:  # a fresh lock taken meanwhile: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            unlink_quiet(aside)
            raise RuntimeError(
                f"another neuromask-pl job took the lock of {self.root} just now; wait for it or remove "
                f"{self.path} if it is dead"
            )
        unlink_quiet(aside)
        what = (
            "an unreadable lock file"
            if holder is None
            else (
                f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}, no longer running"
            )
        )
        log.warning("took over the stale lock of %s (%s)", self.root, what)

    def release(self) -> None:
        """Delete the lock file if it is still this lock's."""
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return
        if isinstance(holder, dict) and holder.get("token") == self.token:
            unlink_quiet(self.path)
