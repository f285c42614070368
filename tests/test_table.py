"""The table's commit protocol without Ray: shards, reader, supersession, vacuum, lease; local and S3."""

from __future__ import annotations

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline.engine import select_work
from pipeline.errors import PipelineError
from pipeline.inputs import InputItem
from pipeline.table import LEDGER_SCHEMA, FeatureTable, LeaseHeld, feature_schema

DIM = 4
META = {
    "schema_version": 1,
    "config_hash": "abc",
    "dim": DIM,
    "provenance": {},
    "config": {"layers": [0, 1], "storage_dtype": "float32", "granularity": "segment", "window_s": 5.0},
}


def layer_rows(run_id: str, shard: int, recs: dict[str, int], value: float) -> pa.Table:
    schema = feature_schema(DIM, "float32", "segment")
    rows = [(rid, s) for rid, n in recs.items() for s in range(n)]
    n = len(rows)
    return pa.Table.from_arrays(
        [
            pa.array([r for r, _ in rows]),
            pa.array([s for _, s in rows], pa.int32()),
            pa.array([5.0 * s for _, s in rows]),
            pa.array([5.0] * n),
            pa.array([374] * n, pa.int32()),
            pa.FixedSizeListArray.from_arrays(pa.array(np.full(n * DIM, value, np.float32)), DIM),
            pa.array([run_id] * n),
            pa.array([shard] * n, pa.int32()),
        ],
        schema=schema,
    )


def ledger(run_id: str, shard: int, recs: dict[str, tuple[str, str]], t: int) -> pa.Table:
    rows = [
        {
            "recording_id": rid,
            "uri": rid,
            "fingerprint": fp,
            "status": st,
            "error_kind": None if st == "ok" else "decode",
            "retryable": False,
            "segments": 2 if st == "ok" else 0,
            "run_id": run_id,
            "shard": shard,
            "committed_at_ns": t,
        }
        for rid, (fp, st) in recs.items()
    ]
    return pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)


def commit(table: FeatureTable, run_id, shard, recs, value, t):
    ok = {r: 2 for r, (_, st) in recs.items() if st == "ok"}
    layers = {layer: layer_rows(run_id, shard, ok, value) for layer in (0, 1)}
    table.commit_shard(run_id, shard, layers, ledger(run_id, shard, recs, t), {"mert.test": "1"})


@pytest.fixture(params=["local", "s3"])
def table(request, tmp_path):
    if request.param == "local":
        t = FeatureTable(str(tmp_path / "t"))
    else:
        opts = request.getfixturevalue("s3_options")
        bucket = request.getfixturevalue("s3_bucket")
        t = FeatureTable(f"s3://{bucket}/t", opts)
    t.check_writable()
    t.init_or_check(META)
    return t


def test_reader_hides_uncommitted_superseded_and_errors(table):
    commit(table, "r1", 0, {"a": ("f1", "ok"), "b": ("f1", "ok")}, 1.0, 100)
    # an uncommitted shard: data files without their ledger marker (a crash between the two)
    for layer in (0, 1):
        table.write_parquet(f"{table.layer_dir(layer)}/r1-00001.parquet", layer_rows("r1", 1, {"c": 2}, 9.0))
    t = table.read_layer(0)
    assert sorted(set(t.column("recording_id").to_pylist())) == ["a", "b"] and t.num_rows == 4
    # a newer commit of "a" (changed fingerprint) supersedes its old rows; "b" now fails to decode
    commit(table, "r2", 0, {"a": ("f2", "ok"), "b": ("f2", "error")}, 2.0, 200)
    t = table.read_layer(1)
    assert t.column("recording_id").to_pylist() == ["a", "a"]
    assert np.all(np.array(t.column("embedding").to_pylist()) == 2.0)
    latest = {r["recording_id"]: r for r in table.ledger().to_pylist()}
    assert latest["a"]["run_id"] == "r2" and latest["b"]["status"] == "error"
    assert table.ledger(latest=False).num_rows == 4


def test_vacuum_makes_plain_readers_agree(table, tmp_path):
    commit(table, "r1", 0, {"a": ("f1", "ok"), "b": ("f1", "ok")}, 1.0, 100)
    for layer in (0, 1):
        table.write_parquet(
            f"{table.layer_dir(layer)}/dead-00000.parquet", layer_rows("dead", 0, {"c": 2}, 9.0)
        )
    commit(table, "r2", 0, {"a": ("f2", "ok")}, 2.0, 200)
    out = table.vacuum()
    assert len(out["removed_files"]) == 2  # the dead run's uncommitted files, one per layer
    assert len(out["rewritten_files"]) == 2 and out["superseded_rows_dropped"] == 4  # a's old rows
    lib = table.read_layer(0)
    files = [f for f in table.fs.find(table.layer_dir(0)) if f.endswith(".parquet")]
    plain = pads.dataset(files, filesystem=table.fs, format="parquet").to_table()

    def key(t):
        return sorted(
            zip(
                t.column("recording_id").to_pylist(),
                t.column("run_id").to_pylist(),
                t.column("segment").to_pylist(),
                strict=True,
            )
        )

    assert key(plain) == key(lib)
    assert plain.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert table.vacuum() == {"removed_files": [], "rewritten_files": [], "superseded_rows_dropped": 0}


def test_vacuum_spares_a_live_run(table):
    table.acquire_lease("live", ttl_s=30)
    try:
        table.write_parquet(f"{table.layer_dir(0)}/live-00000.parquet", layer_rows("live", 0, {"c": 2}, 1.0))
        assert FeatureTable(table.root, _opts(table)).vacuum()["removed_files"] == []
    finally:
        table.release_lease()
    assert len(table.vacuum()["removed_files"]) == 1


def test_compact_is_a_writer_it_takes_the_lease(table):
    table.acquire_lease("live", ttl_s=30)
    try:
        with pytest.raises(LeaseHeld, match="being written by run live"):
            FeatureTable(table.root, _opts(table)).compact()
    finally:
        table.release_lease()
    table.write_parquet(f"{table.layer_dir(0)}/dead-00000.parquet", layer_rows("dead", 0, {"c": 2}, 1.0))
    assert len(FeatureTable(table.root, _opts(table)).compact()["removed_files"]) == 1
    assert table.read_lease() is None


def test_a_tombstone_hides_a_recording_and_vacuum_drops_its_rows(table):
    table.commit_shard(
        "r1",
        0,
        {0: layer_rows("r1", 0, {"a": 2, "b": 2}, 1.0)},
        ledger("r1", 0, {"a": ("fa", "ok"), "b": ("fb", "ok")}, 1),
        {},
    )
    table.commit_shard("r2", 0, {}, ledger("r2", 0, {"b": ("fb", "deleted")}, 2), {})
    assert sorted(set(table.read_layer(0).column("recording_id").to_pylist())) == ["a"]
    assert table.vacuum()["superseded_rows_dropped"] == 2
    plain = pads.dataset(table.layer_dir(0), filesystem=table.fs, format="parquet").to_table()
    assert sorted(set(plain.column("recording_id").to_pylist())) == ["a"]
    # a tombstoned recording whose input comes back is processed again, even with the same fingerprint
    todo, skipped = select_work(
        [InputItem("b", "b", "fb", 1), InputItem("a", "a", "fa", 1)],
        table.ledger(latest=True),
        retry_errors=False,
    )
    assert [i.recording_id for i in todo] == ["b"] and skipped == 1


def _opts(table):
    return table.fs.storage_options if hasattr(table.fs, "storage_options") else None


def test_lease_is_exclusive_expires_and_is_released(table):
    table.acquire_lease("one", ttl_s=1.0)
    other = FeatureTable(table.root, _opts(table))
    with pytest.raises(LeaseHeld, match="being written by run one"):
        other.acquire_lease("two", ttl_s=1.0)
    table.release_lease()
    other.acquire_lease("two", ttl_s=1.0)  # free again
    other._lease_stop.set()  # the holder "dies": no more renewals
    time.sleep(1.3)
    third = FeatureTable(table.root, _opts(table))
    third.acquire_lease("three", ttl_s=5.0)  # the expired lease is broken
    assert third.read_lease().run_id == "three"
    third.release_lease()
    assert third.read_lease() is None


def test_lease_renewal_keeps_it_alive_and_waiting_works(tmp_path):
    t = FeatureTable(str(tmp_path / "t"))
    t.acquire_lease("one", ttl_s=0.8)
    time.sleep(1.5)  # renewed every ttl/4
    assert not t.read_lease().expired()
    other = FeatureTable(str(tmp_path / "t"))
    with pytest.raises(LeaseHeld):
        other.acquire_lease("two", ttl_s=1.0, wait_s=0.5)
    import threading

    threading.Timer(0.5, t.release_lease).start()
    other.acquire_lease("two", ttl_s=1.0, wait_s=5)
    assert other.read_lease().run_id == "two"
    other.release_lease()


def test_stale_lease_of_a_dead_local_process_is_taken_at_once(tmp_path):
    import socket

    t = FeatureTable(str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "_lease.json").write_text(
        json.dumps(
            {
                "run_id": "dead",
                "host": socket.gethostname(),
                "pid": 2**22 + 12345,
                "expires_at": time.time() + 3600,
            }
        )
    )
    t.acquire_lease("alive", ttl_s=10)
    assert t.read_lease().run_id == "alive"
    t.release_lease()


def test_other_configuration_is_refused(table):
    other = dict(META, config_hash="zzz", config=dict(META["config"], window_s=3.0))
    with pytest.raises(
        PipelineError, match="another configuration.*window_s: table has 5.0, this run has 3.0"
    ):
        table.init_or_check(other)


def test_select_work_skips_settled_inputs_and_retries_transient_errors():
    led = pa.Table.from_pylist(
        [
            {"recording_id": "ok", "fingerprint": "1", "status": "ok", "retryable": False},
            {"recording_id": "changed", "fingerprint": "1", "status": "ok", "retryable": False},
            {"recording_id": "short", "fingerprint": "1", "status": "too_short", "retryable": False},
            {"recording_id": "flaky", "fingerprint": "1", "status": "error", "retryable": True},
            {"recording_id": "broken", "fingerprint": "1", "status": "error", "retryable": False},
        ],
        schema=pa.schema(
            [
                ("recording_id", pa.string()),
                ("fingerprint", pa.string()),
                ("status", pa.string()),
                ("retryable", pa.bool_()),
            ]
        ),
    )
    items = [
        InputItem(r, r, "2" if r == "changed" else "1", 1)
        for r in ("ok", "changed", "short", "flaky", "broken", "new")
    ]
    todo, skipped = select_work(items, led, retry_errors=False)
    assert [i.recording_id for i in todo] == ["changed", "flaky", "new"] and skipped == 3
    todo, skipped = select_work(items, led, retry_errors=True)
    assert [i.recording_id for i in todo] == ["changed", "flaky", "broken", "new"] and skipped == 2


def test_an_interrupted_rewrite_on_s3_keeps_the_committed_file(s3_options, s3_bucket):
    """A signal or an exception while a committed file is rewritten (vacuum, compact) must leave the old bytes:
    fsspec's `with fs.open(path, "wb")` uploaded what it had buffered (a 0-byte file that stopped the layer from
    reading); the table now writes each file as one request."""
    t = FeatureTable(f"s3://{s3_bucket}/t", s3_options)
    t.check_writable()
    t.init_or_check(META)
    commit(t, "r1", 0, {"a": ("f1", "ok")}, 1.0, 100)
    path = f"{t.layer_dir(0)}/r1-00000.parquet"
    before = t.fs.cat_file(path)

    class Interrupted(BaseException):
        pass

    def interrupted(*args, **kwargs):
        raise Interrupted  # like the SIGTERM handler raising in the middle of the write

    real_open, real_pipe = t.fs.open, t.fs.pipe_file

    def open_(p, mode="rb", **kw):  # a streamed write is interrupted after it began
        f = real_open(p, mode, **kw)
        if "w" in mode:
            f.write = interrupted
        return f

    t.fs.open, t.fs.pipe_file = open_, interrupted  # a one-request write is interrupted before it lands
    with pytest.raises(Interrupted):
        t.write_parquet(path, layer_rows("r1", 0, {"a": 2}, 7.0))
    t.fs.open, t.fs.pipe_file = real_open, real_pipe
    t.fs.invalidate_cache()
    assert t.fs.cat_file(path) == before
    assert t.read_layer(0).num_rows == 2
