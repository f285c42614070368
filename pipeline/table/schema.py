"""The table's Arrow schemas (features, ledger) and how its Parquet files are encoded."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

# 2: the commit log (_log/). 1: shards committed by their ledger file (read by `upgrade` only).
SCHEMA_VERSION = 2
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
        ("version", pa.int64()),  # the log version that committed this row: the order of rows, never a clock
        ("parts", pa.list_(pa.string())),  # the flushes (file groups) holding this recording's feature rows
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
        ("shard", pa.int32()),  # the writer's flush number within its run (version 1: the shard number)
    ]
    return pa.schema(cols)


def parquet_bytes(table: pa.Table, metadata: dict[str, str] | None = None) -> bytes:
    """A whole Parquet file in memory (zstd, row groups of about ROW_GROUP_BYTES, the Arrow schema kept so
    readers restore fixed-size lists), with `metadata` added to the footer's key-value metadata."""
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
    return sink.getvalue().to_pybytes()


def footer_metadata(t: pa.Table) -> dict[str, str]:
    """A read file's own key-value metadata (the mert.* provenance), without the Arrow schema pyarrow adds, to
    write again on a rewritten file."""
    return {
        k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items() if not k.startswith(b"ARROW")
    }


def ledger_table(rows: list[dict]) -> pa.Table:
    """Ledger rows (dicts, missing fields null) as a table of LEDGER_SCHEMA."""
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in LEDGER_SCHEMA} for r in rows], LEDGER_SCHEMA)
