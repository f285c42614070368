"""The markers that keep releases older than the log off a version-2 table, and version-1 detection.

Old releases on a new table: a CronJob image not yet upgraded must not damage a version-2 table. Version 1
reads `_table.json` before it writes (a run whose configuration hash differs is refused) and takes
`_lease.json` before it writes or vacuums. A version-2 table keeps both as markers:
- `_table.json` with a configuration hash no run can have, and a `table_format` entry that says why, so an old
  `run` stops with "holds another configuration ... table_format: ... upgrade the pipeline";
- `_lease.json` that never expires and names no host, so an old `vacuum`, `compact` or `run` stops with
  "the table is being written by ... upgrade the pipeline" (exit 75) before deleting anything.

New releases on an old table refuse it with the upgrade command in the message (upgrade.py does the upgrade).
"""

from __future__ import annotations

import json

from pipeline.atomic import read_bytes, write_whole
from pipeline.errors import PipelineError

V2_HASH = "version-2-table"
V2_NOTE = (
    "version 2: a commit log in _log/. This pipeline release is older than the table: upgrade the pipeline "
    "(image) to read or write it"
)
NEVER = 253402300799.0  # 9999-12-31T23:59:59Z: the old lease's expiry, which no old release reaches
OLD_LEASE = {"run_id": "(" + V2_NOTE + ")", "host": "version-2-table", "pid": 0, "expires_at": NEVER}


def write(root: str, opts: dict, meta: dict) -> None:
    """Both markers for a new version-2 table at `root` (before its log, so no old release starts on it)."""
    write_whole(f"{root}/_lease.json", json.dumps(OLD_LEASE).encode(), opts)
    write_table_marker(root, opts, meta)


def write_table_marker(root: str, opts: dict, meta: dict) -> None:
    write_whole(f"{root}/_table.json", json.dumps(_table_marker(meta), indent=2).encode(), opts)


def _table_marker(meta: dict) -> dict:
    return {
        "schema_version": 2,
        "config_hash": V2_HASH,
        "config": {"table_format": V2_NOTE},
        "dim": meta.get("dim"),
        "note": "the table's configuration is version 0 of its commit log, _log/00000000000000000000.json",
    }


def read_v1_meta(root: str, opts: dict) -> dict | None:
    """A version-1 table's `_table.json`, or None (no table, or a version-2 marker)."""
    data = read_bytes(f"{root}/_table.json", opts)
    if data is None:
        return None
    meta = json.loads(data)
    return None if meta.get("config_hash") == V2_HASH else meta


def refuse_v1(root: str, opts: dict) -> None:
    """Raise the upgrade instruction when the table at `root` is in the version-1 layout."""
    if read_v1_meta(root, opts) is not None:
        raise PipelineError(
            f"{root} is a feature table in the version-1 layout (shards committed by ledger files). "
            f"Upgrade it once with `mert-pipeline upgrade {root}`: it adds the commit log and keeps every "
            "file in place; releases older than the log then refuse the table"
        )
