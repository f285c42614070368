"""Vacuum and compact, from the log: each change is a commit, and no committed file is rewritten in place.

- `purge`: flushes that hold dead rows (superseded, tombstoned, of failed recordings, written twice) are
  rewritten without them under new names: one commit removes the old flushes and adds the new ones (and moves
  the live recordings' `parts`). A flush with no live row is removed without being read. Cost: the dirty flushes.
- `delete_removed`: the files of flushes removed longer than the retention ago (on the storage's clock: the
  removing entry's modification time against now) are deleted; a `vacuumed` entry drops them from the snapshot.
  Readers scanning an older version keep their files for the retention period. Cost: the removed flushes.
- `sweep`: files under `features/` that no flush names (writers that crashed or were taken over before their
  commit) and that are older than the retention are deleted. It lists the feature folders (names, never file
  contents); only `vacuum` runs it.
- `compact`: small live flushes merged into flushes of about the target size, as one remove + add commit.

Everything runs under the table's lease, so no writer of an older epoch can commit a file deleted here.
After `vacuum --retention 0`, plain Parquet readers of `features/` see exactly the snapshot's rows.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.atomic import write_once
from pipeline.table.lease import StoreClock, _mtime
from pipeline.table.schema import ROW_GROUP_BYTES, footer_metadata, parquet_bytes

if TYPE_CHECKING:
    from pipeline.table.feature_table import FeatureTable

DEFAULT_RETENTION_S = 24 * 3600.0


def purge(table: FeatureTable, limit: int | None = None) -> dict:
    """Rewrite (or remove) the dirty flushes; one commit. Returns counts."""
    snap = table.snapshot()
    dirty = snap.dirty()[:limit] if limit else snap.dirty()
    if not dirty:
        return {"rewritten": 0, "removed": 0, "rows_dropped": 0}
    live = snap.live()
    adds, removes, dropped = [], [], 0
    moved: dict[str, dict[str, str]] = {}
    for fid in dirty:
        f = snap.flushes[fid]
        keep = live.get(fid, set())
        removes.append(fid)
        dropped += sum(n for rid, n in f.recordings.items() if rid not in keep)
        if not keep:
            continue
        new = _rewrite(table, [fid], keep_by_flush={fid: keep})
        adds.append(new)
        for rid in keep:
            moved.setdefault(rid, {})[fid] = new["id"]
    version = table.commit(_moved_rows(snap, moved), adds, removes, kind="commit", note="purge dead rows")
    return {
        "rewritten": len(adds),
        "removed": len(removes) - len(adds),
        "rows_dropped": dropped,
        "version": version,
    }


def compact(table: FeatureTable, target_bytes: int = ROW_GROUP_BYTES) -> dict:
    """Merge live flushes whose layer files are under target_bytes/2 into flushes of about target_bytes per layer
    file; one commit."""
    snap = table.snapshot()
    live = snap.live()
    small = sorted(
        (fid for fid, f in snap.flushes.items() if live.get(fid) and f.layer_bytes() < target_bytes // 2),
        key=lambda fid: (snap.flushes[fid].version, fid),
    )
    groups: list[list[str]] = [[]]
    total = 0
    for fid in small:
        if groups[-1] and total + snap.flushes[fid].layer_bytes() > target_bytes:
            groups.append([])
            total = 0
        groups[-1].append(fid)
        total += snap.flushes[fid].layer_bytes()
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        return {"merged_flushes": 0, "new_flushes": 0}
    adds, removes = [], []
    moved: dict[str, dict[str, str]] = {}
    for group in groups:
        new = _rewrite(table, group, keep_by_flush={fid: live[fid] for fid in group})
        adds.append(new)
        removes += group
        for fid in group:
            for rid in live[fid]:
                moved.setdefault(rid, {})[fid] = new["id"]
    table.commit(_moved_rows(snap, moved), adds, removes, kind="commit", note="compact")
    return {"merged_flushes": len(removes), "new_flushes": len(adds)}


def delete_removed(table: FeatureTable, retention_s: float) -> dict:
    """Delete the files of flushes removed more than retention_s ago; one `vacuumed` commit."""
    snap = table.snapshot()
    if not snap.removed:
        return {"deleted_flushes": 0, "deleted_files": 0}
    clock = StoreClock(table.root, table.opts)
    now = clock.now()
    due, files = [], 0
    for fid, r in sorted(snap.removed.items()):
        at = clock.modified(f"_log/{int(r['version']):020d}.json")
        if retention_s > 0 and (at is None or now - at < retention_s):
            continue
        for rel in r["files"]:
            try:
                table.fs.rm(f"{table.path}/{rel}")
                files += 1
            except FileNotFoundError:
                pass
        due.append(fid)
    if due:
        table.commit(kind="vacuumed", deleted=due)
    return {"deleted_flushes": len(due), "deleted_files": files}


def sweep(table: FeatureTable, retention_s: float) -> dict:
    """Delete files under features/ that no flush names and that are older than retention_s."""
    snap = table.snapshot()
    named = snap.referenced_paths()
    clock = StoreClock(table.root, table.opts)
    now = clock.now()
    deleted = []
    try:
        folders = table.fs.ls(f"{table.path}/features", detail=False)
    except FileNotFoundError:
        folders = []
    for folder in folders:
        base = folder.rstrip("/").rsplit("/", 1)[-1]
        if not base.startswith("layer="):
            continue
        try:
            table.fs.invalidate_cache(folder)
        except Exception:
            pass
        for info in table.fs.ls(folder, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            rel = f"features/{base}/{name}"
            if rel in named or info.get("type") != "file":
                continue
            at = _mtime(info)
            if retention_s > 0 and (at is None or now - at < retention_s):
                continue
            try:
                table.fs.rm(info["name"])
                deleted.append(rel)
            except FileNotFoundError:
                pass
    return {"orphans_deleted": len(deleted), "orphans": deleted}


def vacuum(
    table: FeatureTable,
    retention_s: float = DEFAULT_RETENTION_S,
    *,
    merge: bool = False,
    target_bytes: int = ROW_GROUP_BYTES,
    ttl_s: float = 120.0,
    wait_s: float = 0.0,
) -> dict:
    """Under the lease: purge dead rows, (merge=True) compact, delete what is past retention, sweep orphans."""
    run_id = ("compact-" if merge else "vacuum-") + uuid.uuid4().hex[:8]
    table.acquire_lease(run_id, ttl_s, wait_s)
    try:
        out: dict = {"run_id": run_id, **purge(table)}
        if merge:
            out.update(compact(table, target_bytes))
        out.update(delete_removed(table, retention_s))
        out.update(sweep(table, retention_s))
        out["version"] = table.snapshot().version
        return out
    finally:
        table.release_lease()


def _rewrite(table: FeatureTable, group: list[str], keep_by_flush: dict[str, set[str]]) -> dict:
    """The live rows of `group`'s flushes as one new flush (a file per layer); returns its add."""
    snap = table.snapshot()
    fid = f"{group[0].rsplit('-', 1)[0]}-m{uuid.uuid4().hex[:8]}"
    files: list[dict] = []
    rows_of: dict[str, int] = {}
    layers = sorted({int(d["layer"]) for g in group for d in snap.flushes[g].files})
    for layer in layers:
        parts, md = [], None
        for g in group:
            for d in snap.flushes[g].files:
                if int(d["layer"]) != layer:
                    continue
                t = table.read_file(d["path"])
                md = md or footer_metadata(t)
                keep = pa.array(sorted(keep_by_flush[g]), pa.string())
                parts.append(
                    t.filter(pc.is_in(t.column("recording_id"), value_set=keep)).replace_schema_metadata(None)
                )
        merged = pa.concat_tables(parts).sort_by([("recording_id", "ascending"), ("segment", "ascending")])
        rel = f"features/layer={layer}/{fid}.parquet"
        data = parquet_bytes(merged, md)
        write_once(table.uri(rel), data, table.opts)
        files.append({"layer": layer, "path": rel, "rows": merged.num_rows, "bytes": len(data)})
        if not rows_of:
            for c in pc.value_counts(merged.column("recording_id")).to_pylist():
                rows_of[c["values"]] = int(c["counts"])
    return {"id": fid, "files": files, "rows": rows_of, "node_id": None, "host": None}


def _moved_rows(snap, moved: dict[str, dict[str, str]]) -> list[dict]:
    """The newest ledger rows of moved recordings with `parts` pointing at the new flushes."""
    rows = []
    for rid, remap in moved.items():
        row = dict(snap.ledger[rid])
        row["parts"] = list(dict.fromkeys(remap.get(p, p) for p in row.get("parts") or ()))
        rows.append(row)
    return rows
