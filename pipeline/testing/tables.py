"""Tables without a model or Ray: embed-stage-shaped blocks, flushes written by the real writer, commits through
the real table API. For tests, benchmarks and fault injection in other processes:

    python -m pipeline.testing.tables commit ROOT RUN_ID [--wait S] [--ttl S] [--hold S] [--recordings N]
        [--commit-after-hold] [--prefix P] [--fingerprint F] [--after PATH]

takes the table's lease, commits N recordings (one flush; ids P-r0.., P defaults to RUN_ID), holds the lease S
more seconds (or, with --commit-after-hold, holds it first and commits then: a writer paused in between finds
its epoch taken over), releases, and exits 0, or 75 when the table stays busy or was taken over
(pipeline.errors.ExitCode.BUSY). It prints one JSON line of what it did. `--after PATH` first prints
{"ready": RUN_ID} and waits (up to 120 s) for PATH to exist before taking the lease, so that many processes,
started one by one, race at the same moment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa

from pipeline.table.writer import FlushWriter, layer_column

DIM = 4
LAYERS = (0, 1)


def table_meta(dim: int = DIM, layers: tuple[int, ...] = LAYERS, granularity: str = "segment") -> dict:
    """A table configuration for synthetic tables (what engine.plan.table_meta builds from a model)."""
    return {
        "schema_version": 2,
        "config_hash": f"synthetic-{dim}-{len(layers)}-{granularity}",
        "dim": dim,
        "provenance": {"model": "synthetic"},
        "config": {
            "layers": list(layers),
            "storage_dtype": "float32",
            "granularity": granularity,
            "window_s": 5.0,
            "hop_s": 5.0,
            "min_segment_s": 1.0,
            "normalize": False,
            "compute_dtype": "float32",
        },
    }


def record(rid: str, segments: int, status: str = "ok", fingerprint: str = "f1", **extra) -> dict:
    """A record row as the decode stage sends it."""
    return {
        "recording_id": rid,
        "uri": f"file:///synthetic/{rid}.wav",
        "fingerprint": fingerprint,
        "status": status,
        "error_kind": None if status == "ok" else "decode",
        "retryable": False,
        "error_message": None if status == "ok" else f"{rid}: synthetic failure",
        "duration_s": 5.0 * segments,
        "segments": segments if status == "ok" else 0,
        "sent": segments,
        **extra,
    }


def block(
    recordings: dict[str, int],
    *,
    value: float = 1.0,
    dim: int = DIM,
    layers: tuple[int, ...] = LAYERS,
    records: list[dict] | None = None,
    first_segment: int = 0,
) -> pa.Table:
    """Embed-stage output: `recordings[rid]` segment rows each (numbered from first_segment), vectors filled
    with `value` (+ layer/1000), and the given record rows."""
    seg_rows = [(rid, s) for rid, n in recordings.items() for s in range(first_segment, first_segment + n)]
    recs = records or []
    n = len(seg_rows) + len(recs)
    cols: dict[str, pa.Array] = {
        "recording_id": pa.array([r for r, _ in seg_rows] + [r["recording_id"] for r in recs], pa.string()),
        "segment": pa.array([s for _, s in seg_rows] + [None] * len(recs), pa.int32()),
        "start_s": pa.array([5.0 * s for _, s in seg_rows] + [None] * len(recs), pa.float64()),
        "duration_s": pa.array([5.0] * len(seg_rows) + [None] * len(recs), pa.float64()),
        "n_frames": pa.array([374] * len(seg_rows) + [0] * len(recs), pa.int32()),
        "record": pa.array([None] * len(seg_rows) + [json.dumps(r) for r in recs], pa.string()),
    }
    mask = pa.array([False] * len(seg_rows) + [True] * len(recs))
    for layer in layers:
        flat = np.full(n * dim, value + layer / 1000, np.float32)
        cols[layer_column(layer)] = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim, mask=mask)
    return pa.table(cols)


def writer(table, run_id: str, *, dim: int = DIM, layers: tuple[int, ...] = LAYERS, **kw) -> FlushWriter:
    """A FlushWriter for a synthetic table (large target, no age: flushes when asked)."""
    return FlushWriter(
        table.root,
        table.opts,
        run_id,
        layers=layers,
        dim=dim,
        storage_dtype="float32",
        granularity=kw.pop("granularity", "segment"),
        frame_rate=75.0,
        metadata={"mert.model": "synthetic"},
        target_bytes=kw.pop("target_bytes", 1 << 30),
        max_age_s=kw.pop("max_age_s", 1e9),
        node_id=kw.pop("node_id", None),
        host=kw.pop("host", None),
    )


def commit_recordings(
    table, recordings: dict[str, int], *, value: float = 1.0, fingerprint: str = "f1", status: str = "ok"
) -> int:
    """Write `recordings` (id -> segments) as one flush with the real writer and commit them under the lease
    `table` holds. Returns the version."""
    if table.lease is None:
        raise RuntimeError(f"take the lease of {table.root} first")
    w = writer(table, table.lease.run_id)
    w.add(block(recordings, value=value))
    meta = w.flush()
    if meta is None:
        raise RuntimeError(f"the writer flushed nothing for recordings {sorted(recordings)}")
    rows = [
        {
            **record(rid, n, status=status, fingerprint=fingerprint),
            "parts": [meta["id"]] if status == "ok" else [],
        }
        for rid, n in recordings.items()
    ]
    return table.commit(rows, [meta] if status == "ok" else [])


def committed_entries(root: str) -> int:
    """How many log entries of a local table committed ledger rows so far (0 without a log): what a test
    waits for before it kills a run midway. Reads the entries as they appear, never a partial one."""
    import os

    folder = os.path.join(root, "_log")
    try:
        names = [
            n for n in os.listdir(folder) if n.endswith(".json") and n[0].isdigit() and "checkpoint" not in n
        ]
    except FileNotFoundError:
        return 0
    n = 0
    for name in names:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                if json.loads(f.read()).get("ledger"):
                    n += 1
        except (FileNotFoundError, ValueError):
            pass
    return n


def lease_holder(root: str, storage_options: dict | None = None) -> str | None:
    """The run holding the table's lease (an epoch not released), or None."""
    from pipeline.table import FeatureTable

    epoch = FeatureTable(root, storage_options).snapshot().epoch
    return None if epoch is None or epoch.get("released") else epoch.get("run_id")


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import ExitCode, LeaseHeld, StaleWriter
    from pipeline.table import FeatureTable

    p = argparse.ArgumentParser(prog="python -m pipeline.testing.tables")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("commit")
    c.add_argument("root")
    c.add_argument("run_id")
    c.add_argument("--wait", type=float, default=0.0)
    c.add_argument("--ttl", type=float, default=30.0)
    c.add_argument("--hold", type=float, default=0.0)
    c.add_argument("--recordings", type=int, default=1)
    c.add_argument("--commit-after-hold", action="store_true")
    c.add_argument("--prefix", default=None, help="recording ids PREFIX-r0.. (default: the run id)")
    c.add_argument("--fingerprint", default="f1")
    c.add_argument("--after", default=None, help="wait for this file to exist before taking the lease")
    c.add_argument("--storage-options", default="{}")
    args = p.parse_args(argv)
    t = FeatureTable(args.root, json.loads(args.storage_options))
    t.create_or_check(table_meta())
    if args.after:
        print(json.dumps({"ready": args.run_id}), flush=True)
        deadline = time.monotonic() + 120
        while not os.path.exists(args.after):
            if time.monotonic() > deadline:
                p.error(f"--after {args.after}: the file did not appear within 120 s")
            time.sleep(0.01)
    try:
        lease = t.acquire_lease(args.run_id, args.ttl, args.wait)
    except LeaseHeld:
        print(json.dumps({"run_id": args.run_id, "busy": True}), flush=True)
        return int(ExitCode.BUSY)
    got = {"run_id": args.run_id, "epoch": lease.epoch, "acquired_at": time.time()}
    prefix = args.prefix or args.run_id
    recordings = {f"{prefix}-r{i}": 2 for i in range(args.recordings)}
    try:
        if args.commit_after_hold:
            time.sleep(args.hold)
        got["version"] = commit_recordings(
            t, recordings, value=float(lease.epoch), fingerprint=args.fingerprint
        )
        if not args.commit_after_hold:
            time.sleep(args.hold)
        got["released_at"] = time.time()
    except (StaleWriter, LeaseHeld) as exc:  # taken over, or the heartbeat could not be renewed
        print(json.dumps({**got, "stale": str(exc)}), flush=True)
        return int(ExitCode.BUSY)
    finally:
        t.release_lease()
    print(json.dumps(got), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
