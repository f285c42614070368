"""The table on its commit log, without Ray: commits, snapshots at any version, supersession, vacuum, the lease
and its epochs, checkpoints; on local disk and on a real S3-protocol server (moto)."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline.engine import select_work
from pipeline.errors import LeaseHeld, PipelineError, StaleWriter
from pipeline.inputs import InputItem
from pipeline.table import LEDGER_SCHEMA, FeatureTable
from pipeline.table.log import CHECKPOINT_EVERY, CommitLog
from pipeline.table.maintenance import vacuum
from pipeline.table.snapshot import Snapshot
from pipeline.testing.tables import block, commit_recordings, record, table_meta, writer


@pytest.fixture(params=["local", "s3"])
def table(request, tmp_path):
    if request.param == "local":
        t = FeatureTable(str(tmp_path / "t"))
    else:
        opts = request.getfixturevalue("s3_options")
        bucket = request.getfixturevalue("s3_bucket")
        t = FeatureTable(f"s3://{bucket}/t", opts)
    t.check_writable()
    t.create_or_check(table_meta())
    return t


def ids(t: pa.Table) -> list[str]:
    return sorted(set(t.column("recording_id").to_pylist()))


def plain_rows(table: FeatureTable, layer: int) -> pa.Table:
    return pads.dataset(table.layer_dir(layer), filesystem=table.fs, format="parquet").to_table()


def test_reader_shows_committed_current_rows_only(table):
    table.acquire_lease("r1", ttl_s=30)
    try:
        commit_recordings(table, {"a": 2, "b": 3}, value=1.0)
        # written but never committed: invisible
        w = writer(table, "r1")
        w.add(block({"ghost": 2}))
        w.flush()
        # a changed input, embedded again: its new rows supersede the old ones
        commit_recordings(table, {"a": 2}, value=9.0, fingerprint="f2")
        # an input that failed now hides its old rows
        table.commit([{**record("b", 3, status="error"), "parts": []}])
    finally:
        table.release_lease()
    t = table.read_layer(0)
    assert ids(t) == ["a"] and t.num_rows == 2
    assert set(v[0] for v in t.column("embedding").to_pylist()) == {9.0}
    latest = {r["recording_id"]: r for r in table.ledger().to_pylist()}
    assert latest["a"]["fingerprint"] == "f2" and latest["b"]["status"] == "error"
    assert table.ledger(latest=False).num_rows == 4
    assert table.inspect()["rows_per_layer"] == {0: 2, 1: 2}


def test_an_older_version_reads_as_it_was(table):
    table.acquire_lease("r1", ttl_s=30)
    try:
        v1 = commit_recordings(table, {"a": 2}, value=1.0)
        commit_recordings(table, {"a": 2, "b": 1}, value=2.0, fingerprint="f2")
    finally:
        table.release_lease()
    old = table.read_layer(1, version=v1)
    assert ids(old) == ["a"] and {round(v[0], 3) for v in old.column("embedding").to_pylist()} == {1.001}
    assert ids(table.read_layer(1)) == ["a", "b"]
    assert table.inspect(version=v1)["recordings"] == 1
    with pytest.raises(PipelineError, match="has no version 999"):
        table.read_layer(0, version=999)


def test_vacuum_retention_zero_makes_plain_readers_agree(table):
    table.acquire_lease("r1", ttl_s=30)
    try:
        commit_recordings(table, {"a": 2, "b": 2, "c": 1})
        commit_recordings(
            table, {"b": 2}, value=5.0, fingerprint="f2"
        )  # supersedes b's rows in the first flush
        w = writer(table, "r1")
        w.add(block({"orphan": 2}))
        w.flush()  # a crashed writer's file
        table.commit([{**record("c", 0, status="deleted"), "parts": []}])  # tombstone
    finally:
        table.release_lease()
    lib = table.read_layer(0)
    assert plain_rows(table, 0).num_rows > lib.num_rows
    kept = vacuum(table, retention_s=3600)  # young files stay for readers of older versions
    assert kept["orphans_deleted"] == 0 and kept["deleted_files"] == 0 and kept["rewritten"] == 1
    out = vacuum(table, retention_s=0)
    assert (
        out["orphans_deleted"] == 2 and out["deleted_files"] == 2
    )  # the orphan and the purged flush, 2 layers
    plain = plain_rows(table, 0)
    assert plain.num_rows == lib.num_rows == 4 and ids(plain) == ids(lib) == ["a", "b"]
    assert table.read_layer(0).num_rows == 4
    again = vacuum(table, retention_s=0)
    assert (again["rewritten"], again["removed"], again["orphans_deleted"], again["deleted_files"]) == (
        0,
        0,
        0,
        0,
    )


def test_compact_merges_small_flushes_as_one_commit(tmp_path):
    table = FeatureTable(str(tmp_path / "t"))
    table.create_or_check(table_meta())
    table.acquire_lease("r1", ttl_s=30)
    try:
        for i in range(4):
            commit_recordings(table, {f"r{i}": 2}, value=float(i))
    finally:
        table.release_lease()
    before = table.read_layer(0).sort_by("recording_id")
    out = vacuum(table, retention_s=0, merge=True)
    assert out["merged_flushes"] == 4 and out["new_flushes"] == 1
    assert len(table.snapshot().flushes) == 1
    assert table.read_layer(0).sort_by("recording_id").equals(before)
    assert (
        plain_rows(table, 0)
        .sort_by("recording_id")
        .select(["recording_id", "embedding"])
        .equals(before.select(["recording_id", "embedding"]))
    )


def test_lease_is_exclusive_and_released(table):
    table.acquire_lease("one", ttl_s=30)
    other = FeatureTable(table.root, table.opts)
    with pytest.raises(LeaseHeld, match="being written by run one"):
        other.acquire_lease("two", ttl_s=30)
    assert table.inspect()["lease"]["run_id"] == "one"
    table.release_lease()
    other.acquire_lease("two", ttl_s=30)
    other.release_lease()
    assert table.inspect()["lease"] is None


def test_a_holder_that_stops_renewing_is_taken_over_and_then_refused(table):
    """The heartbeat stops (a paused or partitioned holder): after its TTL on the storage's clock another
    writer takes a new epoch, and the old holder's next commit is refused; nothing committed is lost."""
    table.acquire_lease("old", ttl_s=1.0)
    commit_recordings(table, {"kept": 2})
    table.lease.stop()  # no more heartbeats
    new = FeatureTable(table.root, table.opts)
    new.acquire_lease("new", ttl_s=30, wait_s=10)
    assert new.lease.epoch > table.lease.epoch
    with pytest.raises(StaleWriter, match="superseded"):
        commit_recordings(table, {"late": 2})
    commit_recordings(new, {"fresh": 1})
    new.release_lease()
    assert ids(new.read_layer(0)) == ["fresh", "kept"]
    assert "late" not in new.snapshot().ledger


def test_a_dead_local_holder_is_taken_at_once(tmp_path):
    root = str(tmp_path / "t")
    FeatureTable(root).create_or_check(table_meta())
    code = (
        f"import os; from pipeline.table import FeatureTable; t = FeatureTable({root!r}); "
        "t.acquire_lease('dead', ttl_s=600); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
    t = FeatureTable(root)
    t.acquire_lease("next", ttl_s=30, wait_s=0)  # same host and PID namespace, its process gone: no wait
    t.release_lease()


def test_other_configuration_is_refused(table):
    meta = table_meta()
    other = dict(meta, config_hash="zzz", config=dict(meta["config"], window_s=3.0))
    with pytest.raises(
        PipelineError, match="another configuration.*window_s: table has 5.0, this run has 3.0"
    ):
        table.create_or_check(other)


def test_checkpoints_keep_opening_cheap_and_equal_to_a_replay(tmp_path):
    root = str(tmp_path / "t")
    table = FeatureTable(root)
    table.create_or_check(table_meta())
    table.acquire_lease("r1", ttl_s=30)
    try:
        for i in range(CHECKPOINT_EVERY + 5):
            commit_recordings(table, {f"r{i % 7}": 1}, value=float(i), fingerprint=f"f{i}")
    finally:
        table.release_lease()
    fresh = CommitLog(root)
    snap = fresh.refresh()
    replay = Snapshot()
    for entry in CommitLog(root).entries(0):
        replay.apply(entry)
    assert snap.version == replay.version and snap.ledger == replay.ledger
    assert snap.flushes.keys() == replay.flushes.keys()
    # opened from the checkpoint: it read the entries after it, not the whole log
    per_entry = sum(len(open(f"{root}/_log/{v:020d}.json", "rb").read()) for v in range(1, 4)) / 3
    assert fresh.bytes_read < (snap.version - CHECKPOINT_EVERY + 3) * per_entry + 20_000


def test_an_interrupted_write_on_s3_leaves_nothing_under_the_name(s3_options, s3_bucket):
    """A signal or exception while a flush is written: fsspec's `with fs.open(path, "wb")` uploaded what it had
    buffered (a 0-byte committed file once stopped a layer from reading); files are now one request each."""
    t = FeatureTable(f"s3://{s3_bucket}/t", s3_options)
    t.create_or_check(table_meta())
    t.acquire_lease("r1", ttl_s=30)
    commit_recordings(t, {"a": 2})

    class Interrupted(BaseException):
        pass

    w = writer(t, "r1")
    w.add(block({"b": 2}))
    real = w.__class__.flush

    import pipeline.table.writer as wmod

    def interrupted(*args, **kwargs):
        raise Interrupted  # like the SIGTERM handler raising in the middle of the write

    saved = wmod.write_once
    wmod.write_once = interrupted
    try:
        with pytest.raises(Interrupted):
            real(w)
    finally:
        wmod.write_once = saved
    t.release_lease()
    t.fs.invalidate_cache()
    names = t.fs.find(t.layer_dir(0))
    assert len(names) == 1 and t.read_layer(0).num_rows == 2
    assert LEDGER_SCHEMA.names == t.ledger().schema.names


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


def test_a_writer_counts_what_it_received_once_for_progress(tmp_path):
    """The run's progress comes from these counts as segments land (a decode task reports only when its inputs are
    done): a retried embed call's copies are not counted again, and record rows are not segments."""
    t = FeatureTable(str(tmp_path / "t"))
    t.create_or_check(table_meta())
    w = writer(t, "run-1")
    w.add(block({"a": 3}))
    assert w.embedded == {"segments": 3, "audio_s": 15.0}
    w.add(block({"a": 3, "b": 2}, records=[record("a", 3)]))  # a's three again (a retry), then b's two
    assert w.embedded == {"segments": 5, "audio_s": 25.0}
    w.finish()
    assert w.embedded == {"segments": 5, "audio_s": 25.0} and w.stats()["segments_received"] == 5
