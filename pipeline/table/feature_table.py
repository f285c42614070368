"""`FeatureTable`: a table at a root (a folder or an object-storage prefix), read and committed through its log.

    _log/                              the commit log (log.py): the single source of truth
    _lease/<epoch>.json                the holder's heartbeat (lease.py)
    _table.json, _lease.json           markers that make releases older than the log refuse the table (marker.py)
    features/layer=<i>/<flush>.parquet written by the workers (writer.py); visible once an entry adds them
    runs/<run_id>.json                 each run's summary, written last

The reader shows, for each recording, the rows in the flushes its newest ledger row names, when that row is
`ok`: uncommitted files, duplicates and superseded rows never reach it, at any version.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import AlreadyExists, read_bytes, write_whole
from pipeline.errors import PipelineError
from pipeline.storage import get_fs
from pipeline.table import marker
from pipeline.table.lease import Lease, acquire
from pipeline.table.log import CommitLog
from pipeline.table.schema import LEDGER_SCHEMA, feature_schema, ledger_table
from pipeline.table.snapshot import Snapshot


class FeatureTable:
    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = root.rstrip("/")
        self.opts = dict(storage_options or {})
        try:
            self.fs, path = get_fs(self.root, self.opts)
        except ImportError as exc:
            raise PipelineError(str(exc)) from exc
        self.path = path.rstrip("/")
        self.log = CommitLog(self.root, self.opts)
        self.lease: Lease | None = None

    def uri(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def layer_dir(self, layer: int) -> str:
        """The layer's folder as a filesystem path (for plain readers through `self.fs`)."""
        return f"{self.path}/features/layer={layer}"

    # ---- the table's state -------------------------------------------------------------------------------
    def snapshot(self, version: int | None = None) -> Snapshot:
        if version is not None:
            return self.log.at(version)
        return self.log.refresh()

    def read_meta(self, version: int | None = None) -> dict | None:
        """The table's configuration, or None when there is no table here. A table in the version-1 layout
        is refused with the command that upgrades it."""
        snap = self.snapshot(version)
        if snap.meta is not None:
            return snap.meta
        marker.refuse_v1(self.root, self.opts)
        return None

    def _require(self, version: int | None = None) -> Snapshot:
        snap = self.snapshot(version)
        if snap.meta is None:
            marker.refuse_v1(self.root, self.opts)
            raise PipelineError(f"{self.root} is not a feature table (no commit log in {self.root}/_log)")
        return snap

    def check_writable(self) -> None:
        """Fail fast, before any work, when the output cannot be written (bad credentials, missing bucket)."""
        probe = self.uri(f".probe-{uuid.uuid4().hex[:8]}")
        try:
            write_whole(probe, b"ok", self.opts)
            fs, path = get_fs(probe, self.opts)
            fs.rm(path)
        except Exception as exc:  # any failure here is systemic
            raise PipelineError(
                f"cannot write the output table {self.root}: {exc}; check the path, the bucket and the credentials"
            ) from None

    def create_or_check(self, meta: dict) -> None:
        """Create the table (markers, then log version 0) on first use; refuse a run whose configuration
        differs from the table's."""
        existing = self.read_meta()
        if existing is None:
            marker.write(self.root, self.opts, meta)
            try:
                self.log.append({"kind": "create", "table": meta}, epoch=None)
                return
            except AlreadyExists:
                existing = self.read_meta()
        if existing is None:  # the create that won must be readable
            raise PipelineError(
                f"{self.root}: another writer created the table, but its metadata cannot be read"
            )
        if existing.get("config_hash") != meta["config_hash"]:
            old, new = existing.get("config", {}), meta["config"]
            diff = [
                f"{k}: table has {old.get(k)!r}, this run has {new.get(k)!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
            raise PipelineError(
                f"the table {self.root} holds another configuration (hash {existing.get('config_hash')}, "
                f"this run {meta['config_hash']}): "
                + "; ".join(diff)
                + ". A table holds one configuration: write to a new output (e.g. one folder per model and "
                "revision)"
            )

    # ---- writing -----------------------------------------------------------------------------------------
    def acquire_lease(self, run_id: str, ttl_s: float, wait_s: float = 0.0) -> Lease:
        self._require()
        self.lease = acquire(self.log, run_id, ttl_s, wait_s)
        return self.lease

    def release_lease(self, **extra) -> None:
        """End this writer's epoch; `extra` goes into the release entry (e.g. a completed tick)."""
        if self.lease is not None:
            self.lease.release(extra)
            self.lease = None

    def commit(
        self,
        ledger: Iterable[dict] = (),
        adds: Iterable[dict] = (),
        removes: Iterable[str] = (),
        **extra,
    ) -> int:
        """One log entry under this writer's epoch: flushes added and removed, ledger rows (each with the
        `parts` holding its rows). Returns its version; raises StaleWriter if the table was taken over."""
        if self.lease is None:
            raise PipelineError(f"{self.root}: commit without the table's lease (acquire_lease first)")
        self.lease.check()
        rows = [{f.name: r.get(f.name) for f in LEDGER_SCHEMA if f.name != "version"} for r in ledger]
        for r in rows:
            r["parts"] = list(r.get("parts") or [])
            r["run_id"] = r.get("run_id") or self.lease.run_id  # moved rows (compaction) keep their run's
        entry = {
            "kind": extra.pop("kind", "commit"),
            "run_id": self.lease.run_id,
            "adds": [_add(a) for a in adds],
            "removes": list(removes),
            "ledger": rows,
            **extra,
        }
        version = self.log.append(entry, epoch=self.lease.epoch)
        if version is None:
            raise PipelineError(
                f"{self.root}: the commit log gave no version for run {self.lease.run_id}'s commit"
            )
        return version

    def write_run(self, run_id: str, summary: dict) -> None:
        write_whole(
            self.uri(f"runs/{run_id}.json"),
            json.dumps(summary, indent=2, sort_keys=True, default=str).encode(),
            self.opts,
        )

    def run_used(self, run_id: str) -> bool:
        """Whether a run id already took this table (an epoch) or left a summary."""
        if run_id in self.snapshot().runs:
            return True
        return read_bytes(self.uri(f"runs/{run_id}.json"), self.opts) is not None

    # ---- reading -----------------------------------------------------------------------------------------
    def ledger(self, latest: bool = True, version: int | None = None) -> pa.Table:
        """The newest ledger row per recording, or (latest=False) every ledger row ever committed, in version
        order (read from the whole log)."""
        snap = self._require(version) if version is not None else self.snapshot()
        if latest:
            return snap.ledger_table()
        rows = []
        for entry in self.log.entries(0):
            if entry["version"] > snap.version:
                break
            rows += [{**r, "version": entry["version"]} for r in entry.get("ledger") or ()]
        return ledger_table(rows)

    def layers(self, version: int | None = None) -> list[int]:
        return self.snapshot(version).layers()

    def read_file(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        path = f"{self.path}/{rel}"
        # The log names the file, so it exists: drop any cached listing of its folder first. fsspec shares one
        # filesystem object per process, and a sweep here may have listed the folder before another writer
        # added the file; s3fs then answers FileNotFoundError from that listing, without asking the store.
        self.fs.invalidate_cache(path)
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    def read_layer(
        self, layer: int, columns: list[str] | None = None, version: int | None = None
    ) -> pa.Table:
        """One layer's committed, current rows at `version` (default: the newest). A scan that loses a file
        to vacuum (retention 0) starts again on the newest snapshot: old rows or new, never missing ones."""
        for attempt in range(3):
            snap = self._require(version)
            try:
                return self._scan(snap, layer, columns)
            except FileNotFoundError:
                if version is not None or attempt == 2:
                    raise PipelineError(
                        f"{self.root}: a file of version {snap.version} was deleted while it was read "
                        "(vacuum with a retention shorter than the scan): read again, or vacuum with a longer "
                        "--retention"
                    ) from None
                self.log = CommitLog(self.root, self.opts)
        raise AssertionError("unreachable")

    def _scan(self, snap: Snapshot, layer: int, columns: list[str] | None) -> pa.Table:
        meta = snap.meta or {}
        if layer not in (meta.get("config") or {}).get("layers", []):
            raise PipelineError(
                f"{self.root} has no layer {layer}; it holds layers {meta['config']['layers']}"
            )
        live = snap.live()
        need = None if columns is None else list(dict.fromkeys(["recording_id", *columns]))
        parts = []
        for rel, fid in snap.layer_files(layer):
            t = self.read_file(rel, need)
            keep = live[fid]
            if len(keep) != len(snap.flushes[fid].recordings):
                t = t.filter(
                    pc.is_in(t.column("recording_id"), value_set=pa.array(sorted(keep), pa.string()))
                )
            parts.append(t.replace_schema_metadata(None) if columns is None else t.select(columns))
        schema = feature_schema(meta["dim"], meta["config"]["storage_dtype"], meta["config"]["granularity"])
        if not parts:
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return pa.concat_tables(parts)

    def runs(self) -> list[dict]:
        from pipeline.atomic import list_names

        out = []
        for name in list_names(self.uri("runs"), self.opts):
            if name.endswith(".json"):
                data = read_bytes(self.uri(f"runs/{name}"), self.opts)
                if data:
                    out.append(json.loads(data))
        return sorted(out, key=lambda r: r.get("started_at", ""))

    def last_run(self) -> dict | None:
        runs = self.runs()
        return runs[-1] if runs else None

    def inspect(self, version: int | None = None) -> dict:
        """What the table holds at `version`: configuration and provenance, layers and rows, recordings by
        status, files, the writer, runs."""
        snap = self._require(version)
        meta = snap.meta or {}
        latest = snap.ledger_table()
        by_status: dict[str, int] = {}
        by_error: dict[str, int] = {}
        hours = 0.0
        for row in (snap.ledger[k] for k in sorted(snap.ledger)):
            by_status[row["status"]] = by_status.get(row["status"], 0) + 1
            if row["status"] == "error":
                k = row.get("error_kind") or "?"
                by_error[k] = by_error.get(k, 0) + 1
            if row["status"] == "ok":
                hours += float(row.get("duration_s") or 0.0) / 3600
        rows = {}
        for layer in snap.layers():
            rows[layer] = sum(_live_rows(snap, fid) for _, fid in snap.layer_files(layer))
        epoch = snap.epoch
        return {
            "table": self.root,
            "version": snap.version,
            "config_hash": meta.get("config_hash"),
            "config": meta.get("config"),
            "provenance": meta.get("provenance"),
            "layers": snap.layers(),
            "rows_per_layer": rows,
            "recordings": int(latest.num_rows),
            "recordings_by_status": by_status,
            "errors_by_kind": by_error,
            "audio_hours_ok": round(hours, 4),
            "files": {
                "flushes": len(snap.flushes),
                "bytes": sum(f.bytes() for f in snap.flushes.values()),
                "with_dead_rows": len(snap.dirty()),
                "removed_not_deleted": len(snap.removed),
            },
            "runs": [
                {k: r.get(k) for k in ("run_id", "status", "started_at", "finished_at", "counts")}
                for r in self.runs()
            ],
            "lease": None
            if epoch is None or epoch.get("released")
            else {
                "run_id": epoch.get("run_id"),
                "host": (epoch.get("writer") or {}).get("host"),
                "epoch": epoch["version"],
            },
        }


def _live_rows(snap: Snapshot, fid: str) -> int:
    """Rows of one of a flush's layer files that are live (each layer file holds the same rows)."""
    live = snap.live().get(fid, set())
    return sum(n for rid, n in snap.flushes[fid].recordings.items() if rid in live)


def _add(meta: dict) -> dict:
    """A writer's flush description -> the log's add: files, node, and each recording it holds rows of with
    its row count (what dead-row accounting and `inspect` need; the segment coverage stays on the driver)."""
    return {
        "id": meta["id"],
        "files": meta["files"],
        "recordings": dict(sorted(meta["rows"].items())),
        "node_id": meta.get("node_id"),
        "host": meta.get("host"),
    }


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
