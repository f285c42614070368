"""The feature table: layer-partitioned Parquet, a ledger, crash-safe shard commits, a lease, a reader.

Layout under the table root::

    _table.json                               the table's configuration (one per table) and its hash
    _lease.json                               the writer's lease (create-if-absent; renewed; expires)
    features/layer=<i>/<run_id>-<n>.parquet   one row per (recording, segment) for layer i
    recordings/<run_id>-<n>.parquet           the ledger rows of shard n of run run_id: the shard's commit marker
    runs/<run_id>.json                        the run's summary, written last

A shard is committed when its ledger file exists; its data files are written before it. The reader shows, for
each recording, only the rows of the shard that holds the recording's newest ledger row, and only when that row
is `ok`: uncommitted files, duplicates and superseded rows never reach it. `vacuum` deletes the files of shards
that never committed (from runs without a live lease) and rewrites files holding superseded rows, after which
plain Parquet readers see exactly what the reader sees.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.atomic import put_whole
from pipeline.errors import PipelineError
from pipeline.storage import get_fs

SCHEMA_VERSION = 1
ROW_GROUP_BYTES = 64 << 20  # row groups of ~64 MB: a one-layer scan reads few, large, column chunks

LEDGER_SCHEMA = pa.schema(
    [
        ("recording_id", pa.string()),
        ("uri", pa.string()),
        ("fingerprint", pa.string()),
        ("status", pa.string()),  # ok | error | too_short | deleted (a tombstone: the input is gone)
        ("error_kind", pa.string()),  # named fault (decode, not_found, storage, decoder_crash, ...)
        ("retryable", pa.bool_()),  # True: transient (storage); a rerun retries it by itself
        ("error_message", pa.string()),
        ("truncated", pa.bool_()),  # audio followed by garbage or cut short: what decoded was kept
        ("warning", pa.string()),
        ("duration_s", pa.float64()),
        ("sample_rate", pa.int32()),  # the source's
        ("channels", pa.int32()),
        ("codec", pa.string()),
        ("segments", pa.int32()),
        ("run_id", pa.string()),
        ("shard", pa.int32()),
        ("committed_at_ns", pa.int64()),
    ]
)


def embedding_type(dim: int, storage_dtype: str, granularity: str) -> pa.DataType:
    value = pa.float16() if storage_dtype == "float16" else pa.float32()
    vec = pa.list_(value, dim)  # fixed_size_list<value>[dim]
    return pa.list_(vec) if granularity == "frame" else vec


def feature_schema(dim: int, storage_dtype: str, granularity: str) -> pa.Schema:
    cols = [
        ("recording_id", pa.string()),
        ("segment", pa.int32()),  # null at recording granularity
        ("start_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("n_frames", pa.int32()),
    ]
    if granularity == "frame":
        cols.append(("frame_rate", pa.float64()))
    cols += [
        ("embedding", embedding_type(dim, storage_dtype, granularity)),
        ("run_id", pa.string()),
        ("shard", pa.int32()),
    ]
    return pa.schema(cols)


def shard_name(run_id: str, shard: int) -> str:
    return f"{run_id}-{shard:05d}"


def split_shard_name(name: str) -> tuple[str, int] | None:
    run_id, _, n = name.rpartition("-")
    return (run_id, int(n)) if run_id and n.isdigit() else None


@dataclass
class LeaseInfo:
    run_id: str
    host: str
    pid: int
    expires_at: float

    def expired(self, now: float | None = None) -> bool:
        return (now or time.time()) > self.expires_at

    def dead_here(self) -> bool:
        """The holder ran on this host and its process is gone: the lease is stale before it expires."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class LeaseHeld(PipelineError):
    pass


class FeatureTable:
    """A feature table at `root` (a folder or an object-storage prefix)."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = root.rstrip("/")
        try:
            self.fs, self.path = get_fs(self.root, storage_options)
        except ImportError as exc:
            raise PipelineError(str(exc)) from exc
        self.path = self.path.rstrip("/")
        self._lease_stop = threading.Event()
        self._lease_thread: threading.Thread | None = None
        self._lease_lost: str | None = None
        self._lease_run: str | None = None
        self._lease_ttl = 0.0

    # ---- paths -------------------------------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def layer_dir(self, layer: int) -> str:
        return self._p("features", f"layer={layer}")

    def _ls(self, folder: str, suffix: str) -> list[str]:
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            base = n.rstrip("/").rsplit("/", 1)[-1]
            if base.endswith(suffix) and not base.startswith((".", "_")):
                out.append(n.rstrip("/"))
        return sorted(out)

    def _invalidate(self) -> None:
        try:
            self.fs.invalidate_cache()
        except Exception:  # a cache is best effort
            pass

    # ---- small files -------------------------------------------------------------------------------------
    def _read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read().decode())
        except FileNotFoundError:
            return None

    def _write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file so that readers see the old file or the new one, never half of one."""
        if _is_local(self.fs):
            folder, base = path.rsplit("/", 1)
            os.makedirs(folder, exist_ok=True)
            tmp = f"{folder}/.{base}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # one request: object stores make it visible whole, and an interrupted write leaves the old object
            put_whole(self.fs, path, data)

    def _write_json(self, path: str, obj: dict) -> None:
        self._write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def check_writable(self) -> None:
        """Fail fast, before any work, when the output cannot be written (bad credentials, missing bucket)."""
        probe = self._p(f".probe-{uuid.uuid4().hex[:8]}")
        try:
            if _is_local(self.fs):
                os.makedirs(self.path, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except Exception as exc:  # any failure here is systemic
            raise PipelineError(
                f"cannot write the output table {self.root}: {type(exc).__name__}: {exc}; "
                "check the path, the bucket and the credentials"
            ) from None

    # ---- table configuration -----------------------------------------------------------------------------
    def read_meta(self) -> dict | None:
        return self._read_json(self._p("_table.json"))

    def init_or_check(self, meta: dict) -> None:
        """Record the table's configuration on first use; refuse a run whose configuration differs."""
        existing = self.read_meta()
        if existing is None:
            self._write_json(self._p("_table.json"), meta)
            return
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

    # ---- the lease ---------------------------------------------------------------------------------------
    def read_lease(self) -> LeaseInfo | None:
        data = self._read_json(self._p("_lease.json"))
        if not data:
            return None
        return LeaseInfo(
            data["run_id"], data.get("host", "?"), int(data.get("pid", 0)), float(data["expires_at"])
        )

    def _lease_body(self, run_id: str, ttl_s: float) -> bytes:
        return json.dumps(
            {
                "run_id": run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "expires_at": time.time() + ttl_s,
                "renewed_at": time.time(),
            }
        ).encode()

    def acquire_lease(self, run_id: str, ttl_s: float, wait_s: float = 0.0) -> None:
        """Take the table's single-writer lease, created with create-if-absent; renewed every ttl/4 in a thread.

        A lease whose holder died expires ttl_s after its last renewal (at once when the holder ran on this host
        and its process is gone). Raises LeaseHeld when another live run holds it after waiting wait_s.
        """
        path = self._p("_lease.json")
        if _is_local(self.fs):
            os.makedirs(self.path, exist_ok=True)
        deadline = time.time() + wait_s
        while True:
            try:
                with self.fs.open(path, "xb") as f:
                    f.write(self._lease_body(run_id, ttl_s))
                self._invalidate()
                held = self.read_lease()
                if held is not None and held.run_id == run_id:
                    break
            except FileExistsError:
                pass
            held = self.read_lease()
            if held is not None and (held.expired() or held.dead_here()):
                try:  # break the stale lease, then race for a new one through create-if-absent
                    self.fs.rm(path)
                except FileNotFoundError:
                    pass
                continue
            if time.time() >= deadline:
                who = f"run {held.run_id} on {held.host} (pid {held.pid})" if held else "another run"
                until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(held.expires_at)) if held else "?"
                raise LeaseHeld(
                    f"the table {self.root} is being written by {who}; its lease runs until {until} unless "
                    "renewed. Wait for it (--lease-wait SECONDS), or if that run is dead, retry after the lease "
                    "expires"
                )
            time.sleep(min(1.0, max(0.05, deadline - time.time())))
        self._lease_run, self._lease_ttl, self._lease_lost = run_id, ttl_s, None
        self._lease_stop.clear()
        self._lease_thread = threading.Thread(target=self._renew_loop, name="mert-lease", daemon=True)
        self._lease_thread.start()

    def _renew_loop(self) -> None:
        path = self._p("_lease.json")
        renewed = time.time()
        while not self._lease_stop.wait(self._lease_ttl / 4):
            try:
                held = self.read_lease()
                if held is None or held.run_id != self._lease_run:
                    self._lease_lost = (
                        f"the lease on {self.root} was taken over by {held.run_id if held else 'nobody'}"
                    )
                    return
                self._write_bytes(path, self._lease_body(self._lease_run, self._lease_ttl))
                renewed = time.time()
            except Exception as exc:  # retried at the next tick; expiry is the backstop
                if time.time() - renewed > self._lease_ttl:
                    self._lease_lost = f"cannot renew the lease on {self.root}: {type(exc).__name__}: {exc}"
                    return

    def check_lease(self) -> None:
        """Raise before a commit when this run no longer holds the lease."""
        if self._lease_lost:
            raise PipelineError(self._lease_lost + "; stopping before the next commit")

    def release_lease(self) -> None:
        self._lease_stop.set()
        if self._lease_thread is not None:
            self._lease_thread.join(timeout=5)
        held = self.read_lease()
        if held is not None and held.run_id == self._lease_run:
            try:
                self.fs.rm(self._p("_lease.json"))
            except FileNotFoundError:
                pass
        self._lease_run = None

    # ---- commit ------------------------------------------------------------------------------------------
    def write_parquet(self, path: str, table: pa.Table, metadata: dict[str, str] | None = None) -> None:
        if metadata:
            merged = dict(table.schema.metadata or {})
            merged.update({k.encode(): v.encode() for k, v in metadata.items()})
            table = table.replace_schema_metadata(merged)
        row_bytes = max(1, table.nbytes // max(1, table.num_rows))
        sink = pa.BufferOutputStream()
        pq.write_table(
            table,
            sink,
            compression="zstd",
            row_group_size=max(1024, ROW_GROUP_BYTES // row_bytes),
            store_schema=True,
        )
        self._write_bytes(path, sink.getvalue().to_pybytes())

    def commit_shard(
        self, run_id: str, shard: int, layers: dict[int, pa.Table], ledger: pa.Table, metadata: dict[str, str]
    ) -> None:
        """Write a shard's data files (one per layer), then its ledger file: the commit marker, written last."""
        self.check_lease()
        name = shard_name(run_id, shard)
        for layer, table in layers.items():
            if table.num_rows:
                self.write_parquet(f"{self.layer_dir(layer)}/{name}.parquet", table, metadata)
        self.check_lease()
        self.write_parquet(self._p("recordings", f"{name}.parquet"), ledger.cast(LEDGER_SCHEMA), metadata)

    def write_run(self, run_id: str, summary: dict) -> None:
        self._write_json(self._p("runs", f"{run_id}.json"), summary)

    # ---- reading -----------------------------------------------------------------------------------------
    def committed_shards(self) -> set[str]:
        self._invalidate()
        return {n.rsplit("/", 1)[-1][: -len(".parquet")] for n in self._ls(self._p("recordings"), ".parquet")}

    def ledger(self, latest: bool = True) -> pa.Table:
        """The ledger: every committed row, or (latest=True) the newest row per recording."""
        files = self._ls(self._p("recordings"), ".parquet")
        if not files:
            return LEDGER_SCHEMA.empty_table()
        table = pa.concat_tables([self._read(f).cast(LEDGER_SCHEMA) for f in files])
        if not latest or table.num_rows == 0:
            return table
        table = table.sort_by(
            [
                ("recording_id", "ascending"),
                ("committed_at_ns", "ascending"),
                ("run_id", "ascending"),
                ("shard", "ascending"),
            ]
        )
        ids = table.column("recording_id")
        if table.num_rows == 1:
            return table
        last = pc.not_equal(ids.slice(0, table.num_rows - 1), ids.slice(1))
        mask = pa.concat_arrays([c for c in last.chunks] + [pa.array([True])])
        return table.filter(mask)

    def _read(self, path: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)

    def _winners(self) -> dict[str, set[str]]:
        """shard name -> recording ids whose newest ledger row is `ok` in that shard."""
        latest = self.ledger(latest=True)
        out: dict[str, set[str]] = {}
        ok = latest.filter(pc.equal(latest.column("status"), "ok"))
        for rid, run_id, shard in zip(
            ok.column("recording_id").to_pylist(),
            ok.column("run_id").to_pylist(),
            ok.column("shard").to_pylist(),
            strict=True,
        ):
            out.setdefault(shard_name(run_id, shard), set()).add(rid)
        return out

    def layers(self) -> list[int]:
        try:
            names = self.fs.ls(self._p("features"), detail=False)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            base = n.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("layer=") and base[6:].isdigit():
                out.append(int(base[6:]))
        return sorted(out)

    def read_layer(self, layer: int, columns: list[str] | None = None) -> pa.Table:
        """One layer's committed, current rows (no uncommitted, duplicate or superseded rows)."""
        self._invalidate()
        winners = self._winners()
        parts = []
        for f in self._ls(self.layer_dir(layer), ".parquet"):
            name = f.rsplit("/", 1)[-1][: -len(".parquet")]
            keep = winners.get(name)
            if not keep:
                continue
            need = None if columns is None else list(dict.fromkeys(["recording_id", *columns]))
            t = self._read(f, need)
            t = t.filter(pc.is_in(t.column("recording_id"), value_set=pa.array(sorted(keep), pa.string())))
            parts.append(t if columns is None else t.select(columns))
        if not parts:
            meta = self.read_meta()
            if meta is None:
                raise PipelineError(f"{self.root} is not a feature table (no _table.json)")
            if layer not in meta["config"]["layers"]:
                raise PipelineError(
                    f"{self.root} has no layer {layer}; it holds layers {meta['config']['layers']}"
                )
            schema = feature_schema(
                meta["dim"], meta["config"]["storage_dtype"], meta["config"]["granularity"]
            )
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return pa.concat_tables(parts)

    # ---- maintenance -------------------------------------------------------------------------------------
    def vacuum(self, live_runs: set[str] | None = None) -> dict:
        """Delete files of shards that never committed and rewrite files holding superseded rows.

        Shards of `live_runs` (and of the run holding a live lease) are left alone.
        """
        self._invalidate()
        live = set(live_runs or ())
        held = self.read_lease()
        if held is not None and not held.expired() and not held.dead_here():
            live.add(held.run_id)
        committed = self.committed_shards()
        winners = self._winners()
        removed, rewritten, rows_dropped = [], [], 0
        for layer in self.layers():
            folder = self.layer_dir(layer)
            try:
                entries = self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                continue
            for f in entries:
                base = f.rstrip("/").rsplit("/", 1)[-1]
                if base.startswith(".") and base.endswith(".tmp"):
                    if not any(r in base for r in live):
                        self.fs.rm(f)
                        removed.append(f)
                    continue
                if not base.endswith(".parquet"):
                    continue
                name = base[: -len(".parquet")]
                parsed = split_shard_name(name)
                if name not in committed:
                    if parsed is None or parsed[0] not in live:
                        self.fs.rm(f)
                        removed.append(f)
                    continue
                keep = winners.get(name, set())
                t = self._read(f)
                mask = pc.is_in(t.column("recording_id"), value_set=pa.array(sorted(keep), pa.string()))
                n_keep = pc.sum(mask).as_py() or 0
                if n_keep == t.num_rows:
                    continue
                rows_dropped += t.num_rows - n_keep
                if n_keep == 0:
                    self.fs.rm(f)
                    removed.append(f)
                else:
                    kept = t.filter(mask)
                    md = footer_metadata(t)
                    self.write_parquet(f, kept.replace_schema_metadata(None), md)
                    rewritten.append(f)
        self._invalidate()
        return {
            "removed_files": removed,
            "rewritten_files": rewritten,
            "superseded_rows_dropped": rows_dropped,
        }

    def compact(
        self,
        ttl_s: float = 120.0,
        wait_s: float = 0.0,
        merge: bool = True,
        target_bytes: int = ROW_GROUP_BYTES,
    ) -> dict:
        """Under the table's lease: vacuum, then (merge=True) merge small shards into larger ones, then vacuum
        again. After it, plain Parquet readers see exactly what the reader sees (superseded rows of changed inputs
        and rows of tombstoned ones are gone from the files), in fewer, larger files."""
        run_id = "compact-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        started = _utc_now()
        self.acquire_lease(run_id, ttl_s, wait_s)
        try:
            out = self.vacuum(live_runs={run_id})
            merged = self.merge_small_shards(run_id, target_bytes) if merge else {"merged_shards": 0}
            out["merged_shards"], out["merged_into"] = merged["merged_shards"], merged.get("new_shards", 0)
            if merged["merged_shards"]:
                again = self.vacuum(live_runs={run_id})
                out["removed_files"] += again["removed_files"]
                out["rewritten_files"] += again["rewritten_files"]
                self.write_run(
                    run_id,
                    {
                        "run_id": run_id,
                        "kind": "compact",
                        "status": "complete",
                        "started_at": started,
                        "finished_at": _utc_now(),
                        "counts": {
                            "merged_shards": merged["merged_shards"],
                            "new_shards": merged["new_shards"],
                            "recordings_moved": merged["recordings_moved"],
                        },
                    },
                )
            return out
        finally:
            self.release_lease()

    def merge_small_shards(self, run_id: str, target_bytes: int = ROW_GROUP_BYTES) -> dict:
        """Rewrite the current rows of small shards (every layer file under target_bytes / 2) into new shards of
        about target_bytes per layer file, committed like any shard: data files, then a ledger file that repeats
        the moved recordings' newest ledger rows (same fingerprint and status) under the new shard. That commit
        supersedes the small shards, so readers switch at once and a crash midway leaves only orphans for vacuum.
        The caller holds the lease, and vacuums afterwards to delete the superseded files."""
        self._invalidate()
        winners = self._winners()
        layers = self.layers()
        sizes: dict[str, int] = {}
        for layer in layers:
            for f in self._ls(self.layer_dir(layer), ".parquet"):
                name = f.rsplit("/", 1)[-1][: -len(".parquet")]
                if name in winners:
                    sizes[name] = max(sizes.get(name, 0), int(self.fs.size(f)))
        small = sorted(n for n, b in sizes.items() if b < target_bytes // 2)
        groups: list[list[str]] = [[]]
        total = 0
        for name in small:
            if groups[-1] and total + sizes[name] > target_bytes:
                groups.append([])
                total = 0
            groups[-1].append(name)
            total += sizes[name]
        groups = [g for g in groups if len(g) > 1]
        if not groups:
            return {"merged_shards": 0, "new_shards": 0, "recordings_moved": 0}
        latest = {r["recording_id"]: r for r in self.ledger(latest=True).to_pylist()}
        moved = 0
        for k, group in enumerate(groups):
            new = shard_name(run_id, k)
            keep = {name: winners[name] for name in group}
            for layer in layers:
                parts, md = [], None
                for name in group:
                    path = f"{self.layer_dir(layer)}/{name}.parquet"
                    if not self.fs.exists(path):
                        continue
                    t = self._read(path)
                    if md is None:
                        md = footer_metadata(t)
                    t = t.filter(pc.is_in(t.column("recording_id"), value_set=pa.array(sorted(keep[name]))))
                    parts.append(t.replace_schema_metadata(None))
                if not parts:
                    continue
                merged = pa.concat_tables(parts).sort_by(
                    [("recording_id", "ascending"), ("segment", "ascending")]
                )
                merged = merged.set_column(
                    merged.schema.get_field_index("run_id"),
                    "run_id",
                    pa.array([run_id] * merged.num_rows, pa.string()),
                )
                merged = merged.set_column(
                    merged.schema.get_field_index("shard"),
                    "shard",
                    pa.array(np.full(merged.num_rows, k, np.int32)),
                )
                self.check_lease()
                self.write_parquet(f"{self.layer_dir(layer)}/{new}.parquet", merged, md)
            now = time.time_ns()
            rows = []
            for rid in sorted(set().union(*keep.values())):
                row = dict(latest[rid])
                row.update(run_id=run_id, shard=k, committed_at_ns=now)
                rows.append(row)
            moved += len(rows)
            self.check_lease()
            self.write_parquet(
                self._p("recordings", f"{new}.parquet"), pa.Table.from_pylist(rows, LEDGER_SCHEMA)
            )
        return {
            "merged_shards": sum(len(g) for g in groups),
            "new_shards": len(groups),
            "recordings_moved": moved,
        }

    def run_files(self, run_id: str) -> list[str]:
        """Every file of run `run_id` in the table: its run record and its shards' ledger and data files, committed
        or not (read-only; a run id already used here must not be used again: it would overwrite them)."""
        self._invalidate()
        out = [p for p in (self._p("runs", f"{run_id}.json"),) if self.fs.exists(p)]
        folders = [self._p("recordings")] + [self.layer_dir(layer) for layer in self.layers()]
        for folder in folders:
            for f in self._ls(folder, ".parquet"):
                parsed = split_shard_name(f.rsplit("/", 1)[-1][: -len(".parquet")])
                if parsed is not None and parsed[0] == run_id:
                    out.append(f)
        return out

    def last_run(self) -> dict | None:
        runs = self.runs()
        return runs[-1] if runs else None

    def runs(self) -> list[dict]:
        out = []
        for f in self._ls(self._p("runs"), ".json"):
            data = self._read_json(f)
            if data:
                out.append(data)
        return sorted(out, key=lambda r: r.get("started_at", ""))

    def inspect(self) -> dict:
        """What the table holds: configuration and provenance, layers and rows, recordings by status, runs."""
        meta = self.read_meta()
        if meta is None:
            raise PipelineError(f"{self.root} is not a feature table (no _table.json)")
        latest = self.ledger(latest=True)
        by_status: dict[str, int] = {}
        by_error: dict[str, int] = {}
        for status, kind in zip(
            latest.column("status").to_pylist(), latest.column("error_kind").to_pylist(), strict=True
        ):
            by_status[status] = by_status.get(status, 0) + 1
            if status == "error":
                by_error[kind or "?"] = by_error.get(kind or "?", 0) + 1
        rows = {layer: self.read_layer(layer, ["segment"]).num_rows for layer in self.layers()}
        held = self.read_lease()
        return {
            "table": self.root,
            "config_hash": meta.get("config_hash"),
            "config": meta.get("config"),
            "provenance": meta.get("provenance"),
            "layers": sorted(rows),
            "rows_per_layer": rows,
            "recordings": int(latest.num_rows),
            "recordings_by_status": by_status,
            "errors_by_kind": by_error,
            "audio_hours_ok": round(
                float(
                    pc.sum(
                        latest.filter(pc.equal(latest.column("status"), "ok")).column("duration_s")
                    ).as_py()
                    or 0.0
                )
                / 3600,
                4,
            ),
            "runs": [
                {k: r.get(k) for k in ("run_id", "status", "started_at", "finished_at", "counts")}
                for r in self.runs()
            ],
            "lease": None
            if held is None
            else {"run_id": held.run_id, "host": held.host, "expired": held.expired()},
        }


CURRENT = "_current.json"  # at a root of tables: which table lake consumers read (written by `promote`)


def promote(root: str, table_uri: str, storage_options: dict | None = None, force: bool = False) -> dict:
    """Point `root/_current.json` at `table_uri` (one whole-file write: consumers switch at once).

    Refused unless the table's newest run is complete (a reprocessing run that is still resumable is not a
    table to switch to), unless `force`.
    """
    t = FeatureTable(table_uri, storage_options)
    meta = t.read_meta()
    if meta is None:
        raise PipelineError(f"{table_uri} is not a feature table (no _table.json): nothing to promote")
    last = t.last_run()
    if not force and (last is None or last.get("status") != "complete"):
        newest = f"{last.get('run_id')} {last.get('status')}" if last else "missing"
        raise PipelineError(
            f"{table_uri}: its newest run is {newest}, "
            "not complete: finish (rerun) the reprocessing job first, or pass --force"
        )
    r = FeatureTable(root, storage_options)
    previous = r._read_json(r._p(CURRENT))
    pointer = {
        "table": t.root,
        "config_hash": meta.get("config_hash"),
        "config": meta.get("config"),
        "model": (meta.get("provenance") or {}).get("model"),
        "revision": (meta.get("provenance") or {}).get("revision"),
        "promoted_at": _utc_now(),
        "last_run": last.get("run_id") if last else None,
        "previous": previous.get("table") if previous else None,
    }
    r._write_json(r._p(CURRENT), pointer)
    return pointer


def resolve_table(path: str, storage_options: dict | None = None) -> str:
    """A table's root as given, or the table that `path/_current.json` points at when `path` is a root of
    tables (see promote)."""
    t = FeatureTable(path, storage_options)
    if t.read_meta() is not None:
        return t.root
    pointer = t._read_json(t._p(CURRENT))
    return pointer["table"] if pointer and pointer.get("table") else t.root


def footer_metadata(t: pa.Table) -> dict[str, str]:
    """A read file's own key-value metadata (the mert.* provenance), without the Arrow schema pyarrow adds, to
    write again on a rewritten file."""
    return {
        k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items() if not k.startswith(b"ARROW")
    }


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def weighted_mean(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(S, D) segment vectors, (S,) frame counts -> (D,) recording vector (float64 accumulation)."""
    w = weights.astype(np.float64)
    return (vectors.astype(np.float64) * w[:, None]).sum(axis=0) / max(w.sum(), 1.0)


def pipeline_version() -> str:
    return __version__
