"""The worker side of a commit: buffer embedded rows, flush them as one Parquet file per layer, report metadata.

A `FlushWriter` runs where the embeddings are (a writer process on each node); it never commits. Each flush
writes `features/layer=<i>/<flush id>.parquet` for every layer with create-if-absent under a unique name, and
returns a small description (files, rows, bytes, node, and which segments of which recordings it holds). The
driver commits a recording once every one of its segments is in a durable flush: the log entry adds those
flushes and the recording's ledger row names them (`parts`). Until then the files are invisible to readers.

Memory and what a crash loses stay bounded: a writer flushes at `target_bytes` of buffered rows or `max_age_s`
after its oldest buffered row, whichever comes first, so a 60-minute recording at frame granularity passes
through in pieces. At recording granularity a recording's segment vectors wait here until all have arrived
(the router sends every row of one recording to one writer), then become one weighted mean row.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.atomic import write_once
from pipeline.table.schema import feature_schema, parquet_bytes

SEGMENT_COLUMNS = ("recording_id", "segment", "start_s", "duration_s", "n_frames")


def layer_column(layer: int) -> str:
    """The embed stage's column for one layer's vectors."""
    return f"l{layer}"


def weighted_mean(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(S, D) segment vectors, (S,) frame counts -> (D,) recording vector (float64 accumulation)."""
    w = weights.astype(np.float64)
    return (vectors.astype(np.float64) * w[:, None]).sum(axis=0) / max(w.sum(), 1.0)


def ranges(values: list[int]) -> list[list[int]]:
    """Sorted distinct ints -> [[first, last], ...] runs (segment numbers in a flush's description)."""
    out: list[list[int]] = []
    for v in sorted(set(values)):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return out


class FlushWriter:
    """Buffers embed-stage rows of one run and flushes them into the table's feature folders."""

    def __init__(
        self,
        root: str,
        storage_options: Mapping[str, Any] | None,
        run_id: str,
        *,
        layers: tuple[int, ...],
        dim: int,
        storage_dtype: str,
        granularity: str,
        frame_rate: float,
        metadata: dict[str, str],
        target_bytes: int,
        max_age_s: float,
        node_id: str | None = None,
        host: str | None = None,
    ):
        self.root, self.opts, self.run_id = root.rstrip("/"), dict(storage_options or {}), run_id
        self.layers, self.dim, self.granularity, self.frame_rate = layers, dim, granularity, frame_rate
        self.schema = feature_schema(dim, storage_dtype, granularity)
        self.metadata, self.target_bytes, self.max_age_s = metadata, target_bytes, max_age_s
        self.node_id, self.host = node_id, host
        self.token = uuid.uuid4().hex[:8]  # this writer's part of every flush id
        self.seq = 0
        self.buffer: list[pa.Table] = []
        self.bytes = 0
        self.oldest: float | None = None
        self.seen: set[tuple[str, int]] = set()  # (recording, segment) already buffered or flushed
        self.pending: dict[str, list[pa.Table]] = {}  # recording granularity: segments waiting for the rest
        self.records: dict[str, dict] = {}  # recording granularity: record rows waiting for their segments
        self.done: list[dict] = []  # flush descriptions not yet taken by the driver
        self.written_bytes = 0
        self.embedded = {"segments": 0, "audio_s": 0.0}  # segment rows received, copies left out (progress)

    # ---- in ------------------------------------------------------------------------------------------------
    def add(self, block: pa.Table) -> None:
        """Embed-stage rows: segment rows (`record` null, one column per layer) and, at recording granularity,
        the record rows that say how many segments a recording sent."""
        is_seg = pc.is_null(block.column("record"))
        segs = block.filter(is_seg)
        if segs.num_rows:
            keep = []
            for i, (rid, seg) in enumerate(
                zip(segs.column("recording_id").to_pylist(), segs.column("segment").to_pylist(), strict=True)
            ):
                if (rid, seg) not in self.seen:  # a retried embed task sends its rows again
                    self.seen.add((rid, seg))
                    keep.append(i)
            segs = segs.take(pa.array(keep, pa.int64())) if len(keep) < segs.num_rows else segs
            self.embedded["segments"] += segs.num_rows
            self.embedded["audio_s"] += float(pc.sum(segs.column("duration_s")).as_py() or 0.0)
            segs = segs.select([*SEGMENT_COLUMNS, *(layer_column(x) for x in self.layers)])
            if self.granularity == "recording":
                for rid in dict.fromkeys(segs.column("recording_id").to_pylist()):
                    part = segs.filter(pc.equal(segs.column("recording_id"), rid))
                    self.pending.setdefault(rid, []).append(part)
            elif segs.num_rows:
                self._buffer(segs)
        if self.granularity == "recording":
            for rec in block.filter(pc.invert(is_seg)).column("record").to_pylist():
                r = json.loads(rec)
                self.records[r["recording_id"]] = r
            self._pool_ready()

    def _pool_ready(self) -> None:
        for rid in list(self.records):
            r = self.records[rid]
            parts = self.pending.get(rid, [])
            if r["status"] != "ok":
                self.records.pop(rid)
                self.pending.pop(rid, None)
                continue
            if sum(p.num_rows for p in parts) < r.get("sent", r["segments"]):
                continue
            self.records.pop(rid)
            self.pending.pop(rid, None)
            if parts:
                self._buffer(self._pool(pa.concat_tables(parts).sort_by("segment")))

    def _pool(self, segs: pa.Table) -> pa.Table:
        """Segment vectors -> one recording vector per layer, weighted by frame counts."""
        w = segs.column("n_frames").to_numpy()
        cols: dict[str, Any] = {
            "recording_id": segs.column("recording_id").slice(0, 1),
            "segment": pa.nulls(1, pa.int32()),
            "start_s": pa.array([0.0]),
            "duration_s": pa.array([float(np.sum(segs.column("duration_s").to_numpy()))]),
            "n_frames": pa.array([int(w.sum())], pa.int32()),
        }
        for layer in self.layers:
            col = segs.column(layer_column(layer)).combine_chunks()
            vecs = col.values.to_numpy(zero_copy_only=False).reshape(-1, self.dim)
            mean = weighted_mean(vecs, w).astype(vecs.dtype)
            cols[layer_column(layer)] = pa.FixedSizeListArray.from_arrays(
                pa.array(mean, col.type.value_type), self.dim
            )
        # the pooled row stands for every segment the recording sent
        cols["_segments"] = pa.array([segs.num_rows], pa.int32())
        return pa.table(cols)

    def _buffer(self, t: pa.Table) -> None:
        self.buffer.append(t)
        self.bytes += t.nbytes
        if self.oldest is None:
            self.oldest = time.monotonic()
        if self.bytes >= self.target_bytes:
            self.flush()

    # ---- out -----------------------------------------------------------------------------------------------
    def due(self) -> bool:
        return bool(self.buffer) and (
            self.bytes >= self.target_bytes
            or (self.oldest is not None and time.monotonic() - self.oldest >= self.max_age_s)
        )

    def flush(self) -> dict | None:
        """Write the buffer as one file per layer; returns (and keeps for `take`) its description."""
        if not self.buffer:
            return None
        rows = pa.concat_tables(self.buffer, promote_options="permissive").sort_by(
            [("recording_id", "ascending"), ("segment", "ascending")]
        )
        fid = f"{self.run_id}-{self.token}-{self.seq:05d}"
        n = rows.num_rows
        rids = rows.column("recording_id").to_pylist()
        if "_segments" in rows.column_names:  # pooled rows: segments 0..count-1 each
            counts = rows.column("_segments").to_pylist()
            covered = {rid: [[0, int(c) - 1]] for rid, c in zip(rids, counts, strict=True)}
        else:
            per: dict[str, list[int]] = {}
            for rid, seg in zip(rids, rows.column("segment").to_pylist(), strict=True):
                per.setdefault(rid, []).append(seg)
            covered = {rid: ranges(s) for rid, s in per.items()}
        rows_of: dict[str, int] = {}
        for rid in rids:
            rows_of[rid] = rows_of.get(rid, 0) + 1
        files = []
        for layer in self.layers:
            cols = [rows.column(c) for c in SEGMENT_COLUMNS]
            if self.granularity == "frame":
                cols.append(pa.array(np.full(n, self.frame_rate)))
            cols += [
                rows.column(layer_column(layer)),
                pa.array([self.run_id] * n, pa.string()),
                pa.array(np.full(n, self.seq, np.int32)),
            ]
            table = pa.Table.from_arrays(
                [c.cast(f.type) for c, f in zip(cols, self.schema, strict=True)], schema=self.schema
            )
            rel = f"features/layer={layer}/{fid}.parquet"
            data = parquet_bytes(table, self.metadata)
            write_once(f"{self.root}/{rel}", data, self.opts)
            files.append({"layer": layer, "path": rel, "rows": n, "bytes": len(data)})
            self.written_bytes += len(data)
        meta = {
            "id": fid,
            "files": files,
            "covered": covered,
            "rows": rows_of,
            "node_id": self.node_id,
            "host": self.host,
        }
        self.seq += 1
        self.buffer, self.bytes, self.oldest = [], 0, None
        self.done.append(meta)
        return meta

    def take(self) -> list[dict]:
        """Flushes finished since the last call (flushing first when the buffer is due by size or age)."""
        if self.due():
            self.flush()
        out, self.done = self.done, []
        return out

    def finish(self) -> list[dict]:
        """Flush what is left (recording granularity: only recordings whose rows all arrived) and take."""
        self.flush()
        return self.take()

    def stats(self) -> dict:
        return {
            "flushes": self.seq,
            "bytes": self.written_bytes,
            "buffered_bytes": self.bytes,
            "segments_received": self.embedded["segments"],
        }
