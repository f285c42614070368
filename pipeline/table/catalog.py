"""A root of tables (one per model and revision) and the one lake consumers read: `_current.json`."""

from __future__ import annotations

import json
import time

from pipeline.atomic import read_bytes, write_whole
from pipeline.errors import PipelineError
from pipeline.table.feature_table import FeatureTable

CURRENT = "_current.json"  # at a root of tables: which table lake consumers read (written by `promote`)


def promote(root: str, table_uri: str, storage_options: dict | None = None, force: bool = False) -> dict:
    """Point `root/_current.json` at `table_uri` (one whole-file write: consumers switch at once).

    Refused unless the table's newest run is complete (a reprocessing run that is still resumable is not a
    table to switch to), unless `force`.
    """
    t = FeatureTable(table_uri, storage_options)
    meta = t.read_meta()
    if meta is None:
        raise PipelineError(f"{table_uri} is not a feature table (no commit log): nothing to promote")
    last = t.last_run()
    if not force and (last is None or last.get("status") != "complete"):
        newest = f"{last.get('run_id')} {last.get('status')}" if last else "missing"
        raise PipelineError(
            f"{table_uri}: its newest run is {newest}, "
            "not complete: finish (rerun) the reprocessing job first, or pass --force"
        )
    r = FeatureTable(root, storage_options)
    data = read_bytes(r.uri(CURRENT), r.opts)
    previous = json.loads(data) if data else None
    pointer = {
        "table": t.root,
        "config_hash": meta.get("config_hash"),
        "config": meta.get("config"),
        "model": (meta.get("provenance") or {}).get("model"),
        "revision": (meta.get("provenance") or {}).get("revision"),
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "last_run": last.get("run_id") if last else None,
        "table_version": t.snapshot().version,
        "previous": previous.get("table") if previous else None,
    }
    write_whole(r.uri(CURRENT), json.dumps(pointer, indent=2, sort_keys=True).encode(), r.opts)
    return pointer


def resolve_table(path: str, storage_options: dict | None = None) -> str:
    """A table's root as given, or the table that `path/_current.json` points at when `path` is a root of
    tables (see promote)."""
    t = FeatureTable(path, storage_options)
    if t.snapshot().meta is not None:
        return t.root
    data = read_bytes(t.uri(CURRENT), t.opts)
    pointer = json.loads(data) if data else None
    return pointer["table"] if pointer and pointer.get("table") else t.root
