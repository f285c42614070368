"""A snapshot: the table at one version of its commit log, built by applying log entries in version order.

Pure code (no I/O): `Snapshot.apply(entry)` folds one entry in; `to_state`/`from_state` round-trip it through a
checkpoint. What a snapshot holds:

- `meta`: the table's configuration (version 0's `table`);
- `epoch`: the newest writer epoch (the version of its `epoch` entry, who took it, its lease TTL, whether it was
  released). A `commit` entry belongs to the epoch it names; an entry of another epoch is never applied;
- `flushes`: the live data files, grouped as the writer flushed them (one file per layer), with the recordings
  each group holds rows of;
- `ledger`: the newest ledger row per recording. A recording's feature rows are the rows with its id in the
  flushes its newest row lists in `parts`, when that row is `ok`; any other rows are dead;
- `removed`: flushes a commit removed, by version, until vacuum deletes their files;
- `ticks` and `runs`: completed scheduled ticks, and every run id that took an epoch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.table.schema import LEDGER_SCHEMA, ledger_table

KINDS = ("create", "epoch", "commit", "release", "vacuumed")


@dataclass
class Flush:
    """One writer flush: a file per layer holding the same rows, named in the log by its id."""

    id: str
    files: list[dict]  # {"layer": int, "path": relative to the table root, "rows": int, "bytes": int}
    recordings: dict[str, int]  # the recordings it holds rows of -> rows of each (in every layer's file)
    node_id: str | None = None  # the Ray node that wrote it
    host: str | None = None
    version: int = -1  # the log version that added it

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "files": self.files,
            "recordings": self.recordings,
            "node_id": self.node_id,
            "host": self.host,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Flush:
        return cls(
            d["id"],
            list(d["files"]),
            {str(k): int(v) for k, v in d["recordings"].items()},
            d.get("node_id"),
            d.get("host"),
            int(d.get("version", -1)),
        )

    def bytes(self) -> int:
        """All its files' bytes."""
        return sum(int(f.get("bytes", 0)) for f in self.files)

    def layer_bytes(self) -> int:
        """Its largest layer file's bytes (what compaction's target is about: one file per layer)."""
        return max((int(f.get("bytes", 0)) for f in self.files), default=0)


@dataclass
class Snapshot:
    version: int = -1  # -1: no table yet
    meta: dict | None = None
    epoch: dict | None = None
    flushes: dict[str, Flush] = field(default_factory=dict)
    removed: dict[str, dict] = field(default_factory=dict)  # flush id -> {"version": v, "files": [...]}
    ledger: dict[str, dict] = field(default_factory=dict)
    ticks: dict[str, str] = field(default_factory=dict)  # tick -> the run that completed it
    runs: set[str] = field(default_factory=set)
    _live: dict[str, set[str]] | None = field(default=None, repr=False)

    # ---- folding entries in ----------------------------------------------------------------------------
    def apply(self, entry: dict) -> None:
        v = int(entry["version"])
        if v != self.version + 1:
            raise ValueError(f"log entry {v} applied to a snapshot at version {self.version}")
        self.version = v
        kind = entry.get("kind")
        if kind == "create":
            self.meta = entry["table"]
        elif kind == "epoch":
            self.epoch = {
                "version": v,
                "run_id": entry.get("run_id"),
                "writer": entry.get("writer") or {},
                "ttl_s": float(entry.get("ttl_s") or 0.0),
                "released": False,
            }
            if entry.get("run_id"):
                self.runs.add(entry["run_id"])
        elif kind in ("commit", "release", "vacuumed"):
            if entry.get("epoch") != (self.epoch or {}).get("version"):
                return  # a writer that lost the table: never applied (and refused before it is written)
            self._apply_changes(entry, v)
            if kind == "release" and self.epoch is not None:
                self.epoch["released"] = True
        # unknown kinds (a newer release's) change nothing this release reads

    def _apply_changes(self, entry: dict, v: int) -> None:
        for fid in entry.get("removes") or ():
            gone = self.flushes.pop(fid, None)
            if gone is not None:
                self.removed[fid] = {"version": v, "files": [f["path"] for f in gone.files]}
        for d in entry.get("adds") or ():
            f = Flush.from_dict({**d, "version": v})
            self.flushes[f.id] = f
        for row in entry.get("ledger") or ():
            self.ledger[row["recording_id"]] = {**row, "version": v}
        for fid in entry.get("deleted") or ():  # vacuum deleted these removed flushes' files
            self.removed.pop(fid, None)
        if entry.get("tick") and entry.get("run_status") == "complete":
            self.ticks[entry["tick"]] = entry.get("run_id") or "?"
        self._live = None

    # ---- what readers need -------------------------------------------------------------------------------
    def live(self) -> dict[str, set[str]]:
        """flush id -> the recordings whose rows in it are live (newest row `ok` and listing the flush)."""
        if self._live is None:
            out: dict[str, set[str]] = {}
            for rid, row in self.ledger.items():
                if row.get("status") == "ok":
                    for part in row.get("parts") or ():
                        if part in self.flushes:
                            out.setdefault(part, set()).add(rid)
            self._live = out
        return self._live

    def dirty(self) -> list[str]:
        """Live flushes that also hold dead rows (superseded, tombstoned, of failed or unfinished recordings, or
        written twice): plain Parquet readers of the folder would see those rows until vacuum rewrites them."""
        live = self.live()
        return sorted(fid for fid, f in self.flushes.items() if len(live.get(fid, ())) != len(f.recordings))

    def unreferenced(self) -> list[str]:
        """Live flushes none of whose rows is live any more (vacuum removes them without reading them)."""
        live = self.live()
        return sorted(fid for fid in self.flushes if not live.get(fid))

    def layer_files(self, layer: int) -> list[tuple[str, str]]:
        """(relative path, flush id) of the layer's live files that hold live rows, in version order."""
        live = self.live()
        out = []
        for fid, f in sorted(self.flushes.items(), key=lambda kv: (kv[1].version, kv[0])):
            if live.get(fid):
                out += [(d["path"], fid) for d in f.files if int(d["layer"]) == layer]
        return out

    def layers(self) -> list[int]:
        if self.meta is not None and (self.meta.get("config") or {}).get("layers") is not None:
            return sorted(int(x) for x in self.meta["config"]["layers"])
        return sorted({int(d["layer"]) for f in self.flushes.values() for d in f.files})

    def ledger_table(self) -> pa.Table:
        if not self.ledger:
            return LEDGER_SCHEMA.empty_table()
        return ledger_table([self.ledger[k] for k in sorted(self.ledger)])

    def referenced_paths(self) -> set[str]:
        """Every file a live or removed-but-not-yet-deleted flush names (relative paths)."""
        out = {d["path"] for f in self.flushes.values() for d in f.files}
        for r in self.removed.values():
            out.update(r["files"])
        return out

    # ---- checkpoints -------------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict, pa.Table]:
        """The snapshot as (small JSON state, ledger table) for a checkpoint."""
        state = {
            "version": self.version,
            "meta": self.meta,
            "epoch": self.epoch,
            "flushes": [f.to_dict() for f in self.flushes.values()],
            "removed": self.removed,
            "ticks": self.ticks,
            "runs": sorted(self.runs),
        }
        return state, self.ledger_table()

    @classmethod
    def from_state(cls, state: dict, ledger: pa.Table) -> Snapshot:
        s = cls(
            version=int(state["version"]),
            meta=state.get("meta"),
            epoch=state.get("epoch"),
            flushes={d["id"]: Flush.from_dict(d) for d in state.get("flushes") or ()},
            removed=dict(state.get("removed") or {}),
            ticks=dict(state.get("ticks") or {}),
            runs=set(state.get("runs") or ()),
        )
        s.ledger = {r["recording_id"]: r for r in ledger.to_pylist()}
        return s

    def copy(self) -> Snapshot:
        return copy.deepcopy(self)


def describe_epoch(epoch: dict[str, Any] | None) -> str:
    """'run R on HOST (pid P)' for messages."""
    if not epoch:
        return "nobody"
    w = epoch.get("writer") or {}
    return f"run {epoch.get('run_id')} on {w.get('host', '?')} (pid {w.get('pid', '?')})"
