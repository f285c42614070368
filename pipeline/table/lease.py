"""The writer lease: a courtesy that keeps two runs from doing the same work; correctness rests on the log.

Taking the table is a log entry: an `epoch` entry, created with create-if-absent at the next version, so of
any number of racing writers exactly one gets each epoch. The holder then proves it is alive by rewriting a
heartbeat, `_lease/<epoch>.json`, every TTL/4. Another writer judges the holder gone when:
- it released the epoch (a `release` entry), or
- its heartbeat (or, before the first beat, its epoch entry) has not changed for longer than the holder's TTL,
  measured on the storage's clock: the heartbeat's modification time against the modification time of a probe
  this writer writes now. No host's wall clock is compared with another's; or
- it ran on this host in this PID namespace and its process is gone (then at once).

Whoever takes over writes a new epoch entry. The old holder's next commit finds it and refuses itself
(`StaleWriter`), so a holder that was paused (SIGSTOP), partitioned or skewed in time loses nothing committed
and commits nothing more.

Old releases (version-1 tables) read `_lease.json`; a version-2 table keeps one there that never expires and
names no live host, so an old release refuses the table (see `marker.py`).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pipeline.atomic import read_bytes, write_whole
from pipeline.errors import LeaseHeld
from pipeline.storage import get_fs
from pipeline.table.log import CommitLog, writer_identity
from pipeline.table.snapshot import describe_epoch

LEASE_DIR = "_lease"


def _mtime(info: dict) -> float | None:
    """An fsspec info dict's modification time in epoch seconds (local mtime, S3 LastModified, GCS updated,
    Azure last_modified), on the storage's clock."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "mtime_ns"):
        value = info.get(key)
        if value is None:
            continue
        if key == "mtime_ns":
            return float(value) / 1e9
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


class StoreClock:
    """Times on the storage's own clock: when an object was last written, and 'now' (a probe written and
    stat'ed), so that staleness compares two readings of one clock."""

    def __init__(self, root: str, storage_options: dict):
        self.root, self.opts = root.rstrip("/"), storage_options
        self.fs, self.path = get_fs(self.root, storage_options)
        self.path = self.path.rstrip("/")

    def modified(self, rel: str) -> float | None:
        try:
            self.fs.invalidate_cache()
        except Exception:  # a cache is best effort
            pass
        try:
            return _mtime(self.fs.info(f"{self.path}/{rel}"))
        except FileNotFoundError:
            return None

    def now(self) -> float:
        rel = f"{LEASE_DIR}/clock-{uuid.uuid4().hex[:12]}.probe"
        write_whole(f"{self.root}/{rel}", b"", self.opts)
        try:
            t = self.modified(rel)
        finally:
            try:
                self.fs.rm(f"{self.path}/{rel}")
            except FileNotFoundError:
                pass
        if t is None:
            raise RuntimeError(f"{self.root}: the storage reports no modification time")
        return t


class Lease:
    """This writer's hold on the table: its epoch (a log version) and the heartbeat thread."""

    def __init__(self, log: CommitLog, run_id: str, epoch: int, ttl_s: float):
        self.log, self.run_id, self.epoch, self.ttl_s = log, run_id, epoch, ttl_s
        self._stop = threading.Event()
        self._lost: str | None = None
        self._beat = 0
        self._beat_once()
        self._thread = threading.Thread(target=self._renew_loop, name="mert-lease", daemon=True)
        self._thread.start()

    def heartbeat_uri(self) -> str:
        return f"{self.log.root}/{LEASE_DIR}/{self.epoch:020d}.json"

    def _beat_once(self) -> None:
        self._beat += 1
        body = {"run_id": self.run_id, "epoch": self.epoch, "beat": self._beat, **writer_identity()}
        write_whole(self.heartbeat_uri(), json.dumps(body).encode(), self.log.opts)

    def _renew_loop(self) -> None:
        try:
            self._renew()
        except BaseException as exc:  # the thread ends: say so at the next commit instead of going silent
            self._lost = f"the lease heartbeat on {self.log.root} stopped: {type(exc).__name__}"

    def _renew(self) -> None:
        renewed = time.monotonic()
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self._beat_once()
                renewed = time.monotonic()
            except Exception as exc:  # retried at the next tick; the log's epoch check is what protects data
                if time.monotonic() - renewed > self.ttl_s:
                    self._lost = f"cannot renew the lease on {self.log.root}: {type(exc).__name__}"
                    return

    def check(self) -> None:
        """Raise before a commit when the heartbeat could not be renewed for a whole TTL (a courtesy: the log
        refuses a superseded epoch's commit in any case)."""
        if self._lost:
            raise LeaseHeld(self._lost + "; stopping before the next commit")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def release(self, extra: dict | None = None) -> None:
        """End the epoch: a `release` entry (refused, harmlessly, when the epoch was taken over), then the
        heartbeat's removal."""
        self.stop()
        try:
            self.log.append({**(extra or {}), "kind": "release", "run_id": self.run_id}, epoch=self.epoch)
        except Exception:  # taken over, or the store is gone: the heartbeat stops, the lease expires
            pass
        try:
            fs, path = get_fs(self.heartbeat_uri(), self.log.opts)
            fs.rm(path)
        except Exception:
            pass


def holder_gone(log: CommitLog, clock: StoreClock, epoch: dict) -> bool:
    """Whether the holder of `epoch` (the snapshot's) released it or is dead (see the module docstring)."""
    if epoch.get("released"):
        return True
    w = epoch.get("writer") or {}
    me = writer_identity()
    if w.get("host") == me["host"] and w.get("pidns") is not None and w.get("pidns") == me["pidns"]:
        try:
            os.kill(int(w.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            pass
    ttl = float(epoch.get("ttl_s") or 0.0)
    rel = f"{LEASE_DIR}/{int(epoch['version']):020d}.json"
    last = clock.modified(rel)
    if last is None:
        last = clock.modified(f"_log/{int(epoch['version']):020d}.json")
    if last is None:
        return True
    return clock.now() - last > ttl


def acquire(
    log: CommitLog,
    run_id: str,
    ttl_s: float,
    wait_s: float = 0.0,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> Lease:
    """Take the table for `run_id`: an epoch entry at the next version once the current holder is gone.

    Raises LeaseHeld when another live writer holds it after waiting `wait_s` (by this process's monotonic
    clock). Racing writers: each epoch entry is created once, the losers re-read and wait or give up."""
    clock = StoreClock(log.root, log.opts)
    deadline = time.monotonic() + wait_s
    while True:
        snap = log.refresh()
        epoch = snap.epoch
        if epoch is None or holder_gone(log, clock, epoch):
            # exactly after the entries judged by: a racing writer's epoch (or the holder's commit) in between
            # makes this one lose, re-read and judge again
            version = log.append(
                {"kind": "epoch", "run_id": run_id, "ttl_s": ttl_s, "writer": writer_identity()},
                epoch=None,
                only_at=snap.version + 1,
            )
            if version is not None:
                return Lease(log, run_id, version, ttl_s)
            continue
        if time.monotonic() >= deadline:
            raise LeaseHeld(
                f"the table {log.root} is being written by {describe_epoch(epoch)} (epoch {epoch['version']}, "
                f"lease TTL {epoch.get('ttl_s', 0):g} s, renewed while it runs). Wait for it "
                "(--lease-wait SECONDS), or if that run is dead, retry once its lease has not been renewed for "
                "a TTL"
            )
        sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def read_heartbeat(log: CommitLog, epoch: int) -> dict[str, Any] | None:
    data = read_bytes(f"{log.root}/{LEASE_DIR}/{epoch:020d}.json", log.opts)
    return json.loads(data) if data else None
