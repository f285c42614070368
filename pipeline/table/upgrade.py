"""Upgrading a version-1 table (shards committed by their ledger file) onto the commit log, in place.

`upgrade` (the CLI's `upgrade` command) writes the markers first (so old releases stop writing), then the log:
version 0 the table's configuration, an epoch, then one commit that adds every committed shard's files in place
(nothing is rewritten) with each recording's newest ledger row, read the way version 1 reads it.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import list_names, read_bytes, write_once, write_whole
from pipeline.errors import LeaseHeld, PipelineError
from pipeline.table.feature_table import FeatureTable
from pipeline.table.marker import OLD_LEASE, read_v1_meta, write_table_marker


def upgrade(table: FeatureTable, wait_s: float = 0.0) -> dict:
    """Bring a version-1 table onto the log (see the module docstring). Idempotent: a table already on the log
    is left as it is; an upgrade cut short is finished by running it again."""
    if table.snapshot().meta is not None:
        return {"upgraded": False, "reason": "already version 2", "version": table.snapshot().version}
    meta = read_v1_meta(table.root, table.opts)
    if meta is None:
        raise PipelineError(f"{table.root} holds no version-1 table (no _table.json): nothing to upgrade")
    _take_old_lease(table)
    # the old committed state, read the way version 1 reads it
    ledger_files = [n for n in list_names(table.uri("recordings"), table.opts) if n.endswith(".parquet")]
    parts = [_read(table, f"recordings/{n}") for n in ledger_files]
    rows: list[dict] = []
    if parts:
        t = pa.concat_tables(parts, promote_options="permissive").sort_by(
            [
                ("recording_id", "ascending"),
                ("committed_at_ns", "ascending"),
                ("run_id", "ascending"),
                ("shard", "ascending"),
            ]
        )
        newest: dict[str, dict] = {}
        for r in t.to_pylist():
            newest[r["recording_id"]] = r
        rows = list(newest.values())
    committed = {n[: -len(".parquet")] for n in ledger_files}
    layers = sorted(int(x) for x in meta["config"]["layers"])
    adds = []
    for name in sorted(committed):
        files, recs = [], None
        for layer in layers:
            rel = f"features/layer={layer}/{name}.parquet"
            try:
                info = table.fs.info(f"{table.path}/{rel}")
            except FileNotFoundError:
                continue
            if recs is None:
                ids = _read(table, rel, ["recording_id"]).column("recording_id")
                counts = pc.value_counts(ids).to_pylist()
                recs = {c["values"]: int(c["counts"]) for c in counts}
            n = sum(recs.values()) if recs else 0
            files.append({"layer": layer, "path": rel, "rows": n, "bytes": int(info.get("size", 0))})
        if files:
            adds.append({"id": name, "files": files, "rows": recs or {}, "node_id": None, "host": None})
    ledger = []
    for r in rows:
        shard = f"{r['run_id']}-{int(r['shard']):05d}"
        ok = r["status"] == "ok" and shard in {a["id"] for a in adds}
        ledger.append({**r, "parts": [shard] if ok else []})
    write_table_marker(table.root, table.opts, meta)
    try:
        table.log.append(
            {"kind": "create", "table": {**meta, "schema_version": 2, "upgraded_from": 1}}, epoch=None
        )
    except Exception:  # a previous upgrade created it: go on from there
        pass
    lease = table.acquire_lease("upgrade-v1", ttl_s=120.0, wait_s=wait_s)
    try:
        if not table.snapshot().flushes and not table.snapshot().ledger:
            table.commit(ledger, adds, kind="commit", note="upgrade from the version-1 layout")
    finally:
        table.release_lease()
    del lease
    snap = table.snapshot()
    return {
        "upgraded": True,
        "version": snap.version,
        "shards": len(adds),
        "recordings": len(ledger),
        "files_with_dead_rows": len(snap.dirty()),
    }


def _take_old_lease(table: FeatureTable) -> None:
    """Replace version 1's lease by the marker, unless a live old run holds it."""
    data = read_bytes(table.uri("_lease.json"), table.opts)
    if data is None:
        try:
            write_once(table.uri("_lease.json"), json.dumps(OLD_LEASE).encode(), table.opts)
            return
        except Exception:  # an old run took it between our read and our create
            data = read_bytes(table.uri("_lease.json"), table.opts) or b"{}"
    held = json.loads(data or b"{}")
    if held.get("host") == OLD_LEASE["host"]:
        return
    import time

    if float(held.get("expires_at", 0)) > time.time():
        raise LeaseHeld(
            f"{table.root} is being written by version-1 run {held.get('run_id')} on {held.get('host')}: "
            "let it finish (or its lease expire), then upgrade"
        )
    write_whole(table.uri("_lease.json"), json.dumps(OLD_LEASE).encode(), table.opts)


def _read(table: FeatureTable, rel: str, columns: list[str] | None = None) -> pa.Table:
    with table.fs.open(f"{table.path}/{rel}", "rb") as f:
        return pq.read_table(f, columns=columns)
