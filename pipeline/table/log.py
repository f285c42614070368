"""The commit log: the table's single source of truth.

    _log/00000000000000000000.json          version 0: the table's configuration ("create")
    _log/<version, 20 digits>.json          one entry per version: an epoch, a commit, a release, a vacuum
    _log/<version>.checkpoint.json          every CHECKPOINT_EVERY versions: the snapshot's state ...
    _log/<version>.checkpoint.parquet       ... and its ledger (the newest row per recording)
    _log/_last_checkpoint.json              a hint: the newest checkpoint's version (readers verify it)

Each entry is created with create-if-absent (`pipeline.atomic.write_once`: S3 If-None-Match, GCS
ifGenerationMatch=0, Azure If-None-Match, locally a temporary file linked to the name), so a version exists once
and no reader sees an entry empty or partial. Order is the version number, never a clock.

A writer commits at the version after the newest it has read. When that version exists already it reads every
entry it had not seen, and refuses itself (`StaleWriter`) if one of them started a new epoch: a writer that lost
the table never commits again, whatever its clock or its lease thread say. Readers open the newest checkpoint
and read the entries after it one by one until the next is absent, so opening costs what changed since the
checkpoint, not the table's history.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import AlreadyExists, read_bytes, write_once, write_whole
from pipeline.errors import PipelineError, StaleWriter
from pipeline.table.schema import LEDGER_SCHEMA, parquet_bytes
from pipeline.table.snapshot import Snapshot, describe_epoch

LOG = "_log"
CHECKPOINT_EVERY = 20
HINT = "_last_checkpoint.json"


def entry_name(version: int) -> str:
    return f"{version:020d}.json"


def writer_identity(node_id: str | None = None) -> dict:
    """Who writes: host, pid, and the pid namespace (two pods with hostNetwork share a hostname, not a
    namespace), recorded in entries and in the lease's heartbeat."""
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "pidns": pidns, "node_id": node_id}


class CommitLog:
    """Reads and writes `root/_log/`. Holds the newest snapshot it has read (`self.snapshot`)."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None):
        self.root = root.rstrip("/")
        self.opts = dict(storage_options or {})
        self.snapshot = Snapshot()
        self.bytes_read = 0  # log and checkpoint bytes this object has read (the no-op tick benchmark)

    def uri(self, *parts: str) -> str:
        return "/".join([self.root, LOG, *parts])

    # ---- reading -----------------------------------------------------------------------------------------
    def read_entry(self, version: int) -> dict | None:
        data = read_bytes(self.uri(entry_name(version)), self.opts)
        if data is None:
            return None
        self.bytes_read += len(data)
        try:
            entry = json.loads(data)
        except ValueError:  # cannot happen through write_once; says which file if someone edited the log
            raise PipelineError(
                f"{self.uri(entry_name(version))} is not a valid log entry: the table's log was changed by "
                "hand; restore that file"
            ) from None
        entry["version"] = version
        return entry

    def exists(self) -> bool:
        return read_bytes(self.uri(entry_name(0)), self.opts) is not None

    def refresh(self) -> Snapshot:
        """Fold in every entry after the snapshot's version (reading the newest checkpoint first when the
        snapshot is empty). Returns the newest snapshot."""
        if self.snapshot.version < 0:
            self.snapshot = self._from_checkpoint(None) or Snapshot()
        while True:
            entry = self.read_entry(self.snapshot.version + 1)
            if entry is None:
                return self.snapshot
            self.snapshot.apply(entry)

    def at(self, version: int) -> Snapshot:
        """The snapshot at an older (or the current) version: the newest checkpoint at or below it, then the
        entries up to it."""
        snap = self._from_checkpoint(version) or Snapshot()
        while snap.version < version:
            entry = self.read_entry(snap.version + 1)
            if entry is None:
                raise PipelineError(
                    f"{self.root} has no version {version}: its newest is {snap.version} "
                    "(see `inspect` for the versions)"
                )
            snap.apply(entry)
        return snap

    def entries(self, start: int = 0) -> list[dict]:
        """Every entry from `start` on (for the ledger's history and `inspect`)."""
        out = []
        v = start
        while (entry := self.read_entry(v)) is not None:
            out.append(entry)
            v += 1
        return out

    def _from_checkpoint(self, at_most: int | None) -> Snapshot | None:
        candidates: list[int] = []
        if at_most is None:
            hint = read_bytes(self.uri(HINT), self.opts)
            if hint is not None:
                try:
                    candidates.append(int(json.loads(hint)["version"]))
                except (ValueError, KeyError, TypeError):
                    pass
        if not candidates:
            from pipeline.atomic import list_names

            names = list_names(self.uri(), self.opts)
            found = sorted(int(n.split(".")[0]) for n in names if n.endswith(".checkpoint.json"))
            candidates = [v for v in found if at_most is None or v <= at_most][::-1]
        for v in candidates:
            snap = self._read_checkpoint(v)
            if snap is not None:
                return snap
        return None

    def _read_checkpoint(self, version: int) -> Snapshot | None:
        state = read_bytes(self.uri(f"{version:020d}.checkpoint.json"), self.opts)
        ledger = read_bytes(self.uri(f"{version:020d}.checkpoint.parquet"), self.opts)
        if state is None or ledger is None:
            return None
        self.bytes_read += len(state) + len(ledger)
        # ParquetFile, not read_table: read_table imports pyarrow.dataset (0.5 s of every process that opens a
        # table) to read one small file
        table = pq.ParquetFile(pa.BufferReader(ledger)).read()
        return Snapshot.from_state(json.loads(state), table.cast(LEDGER_SCHEMA))

    # ---- writing -----------------------------------------------------------------------------------------
    def append(self, entry: dict, *, epoch: int | None, only_at: int | None = None) -> int | None:
        """Commit `entry` at the next version as a writer of `epoch` (None: the `create` entry and `epoch`
        entries, which anyone may write). Returns the version. Raises StaleWriter when the log's newest epoch
        is no longer `epoch`, and AlreadyExists for a `create` that lost (the table exists).

        `only_at`: commit at exactly that version or not at all (None returned): an epoch entry is written only
        right after the entries its writer judged the table by."""
        entry = dict(entry)
        entry.setdefault("commit_id", uuid.uuid4().hex)
        entry["written_at"] = datetime.now().astimezone().isoformat(timespec="seconds")  # for people only
        snap = self.refresh()
        while True:
            if epoch is not None and (snap.epoch or {}).get("version") != epoch:
                raise StaleWriter(
                    f"{self.root}: this writer's epoch {epoch} was superseded by {describe_epoch(snap.epoch)} "
                    f"(log version {(snap.epoch or {}).get('version')}); nothing more is committed by this run. "
                    "Its committed work is kept; rerun later to resume"
                )
            version = snap.version + 1
            if only_at is not None and version != only_at:
                return None
            body = {**entry, "version": version, "epoch": epoch}
            try:
                write_once(
                    self.uri(entry_name(version)), json.dumps(body, sort_keys=True).encode(), self.opts
                )
            except AlreadyExists:
                if entry.get("kind") == "create":
                    raise
                theirs = self.read_entry(version)
                if theirs is not None and theirs.get("commit_id") == entry["commit_id"]:
                    pass  # our own request landed and its answer was lost: it is committed
                else:
                    snap = self.refresh()
                    continue
            snap.apply(body)
            if version % CHECKPOINT_EVERY == 0:
                # the commit has landed: a checkpoint that cannot be written (a cache: readers replay
                # without it) must not make this writer believe its commit failed
                with contextlib.suppress(Exception):
                    self.write_checkpoint(snap)
            return version

    def write_checkpoint(self, snap: Snapshot) -> None:
        """The snapshot's state and ledger, then the hint. Whole-file writes: a checkpoint is only a cache of the
        log (the same for every writer of that version), so a crash midway only costs readers a longer replay."""
        state, ledger = snap.to_state()
        v = snap.version
        write_whole(self.uri(f"{v:020d}.checkpoint.parquet"), parquet_bytes(ledger), self.opts)
        write_whole(
            self.uri(f"{v:020d}.checkpoint.json"), json.dumps(state, sort_keys=True).encode(), self.opts
        )
        write_whole(self.uri(HINT), json.dumps({"version": v}).encode(), self.opts)
