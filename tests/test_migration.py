"""Migration both ways, against the real previous release (the last commit on the version-1 layout, taken from
this repository's history with `git archive`):
- a version-1 table is refused by this release with the upgrade command, upgraded in place, and then reads
  exactly what the old release's reader showed;
- the old release's `run`, `vacuum` and `compact` against a version-2 table refuse it and delete nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.checkpoints import write_random_checkpoint
from pipeline.errors import PipelineError
from pipeline.synth import music_like, write_audio
from pipeline.table import FeatureTable
from pipeline.table.maintenance import vacuum
from pipeline.testing.tables import commit_recordings, table_meta

OLD_RELEASE = "3f52c03"  # the last commit whose table is the version-1 layout
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def old_release(tmp_path_factory) -> Path:
    have = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{OLD_RELEASE}^{{commit}}"], capture_output=True
    )
    if have.returncode != 0:
        pytest.skip(f"the previous release {OLD_RELEASE} is not in this clone's history (a shallow clone)")
    dest = tmp_path_factory.mktemp("old-release")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", OLD_RELEASE, "pipeline"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def old(old_release: Path, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """Run the old release: its CLI with `args`, or Python `code` (given `args` as sys.argv) with its package first on the path."""
    env = {**os.environ, "PYTHONPATH": str(old_release)}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "pipeline.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(old_release), timeout=240)


def exited_cleanly(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if done.returncode != 0:
        pytest.fail(f"the old release exited {done.returncode}; its stderr:\n{done.stderr[-4000:]}")
    return done


V1_WRITE = """
import json, sys
import numpy as np, pyarrow as pa
from pipeline.table import LEDGER_SCHEMA, FeatureTable, feature_schema
root = sys.argv[1]
meta = {"schema_version": 1, "config_hash": "v1hash", "dim": 4, "provenance": {},
        "config": {"layers": [0, 1], "storage_dtype": "float32", "granularity": "segment", "window_s": 5.0}}
t = FeatureTable(root)
t.init_or_check(meta)
def rows(run, shard, recs, value):
    schema = feature_schema(4, "float32", "segment")
    rr = [(r, s) for r, n in recs.items() for s in range(n)]
    n = len(rr)
    return pa.Table.from_arrays([pa.array([r for r, _ in rr]), pa.array([s for _, s in rr], pa.int32()),
        pa.array([5.0 * s for _, s in rr]), pa.array([5.0] * n), pa.array([374] * n, pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(np.full(n * 4, value, np.float32)), 4),
        pa.array([run] * n), pa.array([shard] * n, pa.int32())], schema=schema)
def ledger(run, shard, recs, t_ns):
    return pa.Table.from_pylist([{"recording_id": r, "uri": r, "fingerprint": fp, "status": st,
        "segments": 2, "run_id": run, "shard": shard, "committed_at_ns": t_ns} for r, (fp, st) in recs.items()],
        schema=LEDGER_SCHEMA)
t.acquire_lease("r1", 30)
t.commit_shard("r1", 0, {l: rows("r1", 0, {"a": 2, "b": 2}, 1.0) for l in (0, 1)},
               ledger("r1", 0, {"a": ("f1", "ok"), "b": ("f1", "ok")}, 1), {"mert.x": "1"})
t.commit_shard("r1", 1, {l: rows("r1", 1, {"a": 2}, 2.0) for l in (0, 1)},
               ledger("r1", 1, {"a": ("f2", "ok")}, 2), {"mert.x": "1"})
t.release_lease()
got = t.read_layer(0)
print(json.dumps(sorted(zip(got.column("recording_id").to_pylist(), got.column("segment").to_pylist(),
                            [v[0] for v in got.column("embedding").to_pylist()]))))
# Everything this script is for is on disk and printed: skip the interpreter's teardown, where Arrow's thread pool
# now and then aborts a finished process (apache/arrow#34314; it did so once in CI). The old release is frozen.
import os
sys.stdout.flush()
os._exit(0)
"""


def test_a_version_1_table_is_refused_then_upgraded_in_place(old_release, tmp_path):
    root = tmp_path / "v1"
    made = exited_cleanly(old(old_release, str(root), code=V1_WRITE))
    old_rows = [tuple(r) for r in json.loads(made.stdout.strip().splitlines()[-1])]
    files_before = sorted(p.relative_to(root) for p in root.rglob("*.parquet"))
    t = FeatureTable(str(root))
    with pytest.raises(PipelineError, match="version-1 layout.*mert-pipeline upgrade"):
        t.read_layer(0)
    from pipeline.cli import main

    assert main(["upgrade", str(root)]) == 0
    t = FeatureTable(str(root))
    got = t.read_layer(0)
    rows = sorted(
        zip(
            got.column("recording_id").to_pylist(),
            got.column("segment").to_pylist(),
            [v[0] for v in got.column("embedding").to_pylist()],
            strict=True,
        )
    )
    assert rows == old_rows and len(rows) == 4  # a from shard 1 (superseding), b from shard 0
    assert (
        sorted(p.relative_to(root) for p in root.rglob("*.parquet") if "_log" not in p.parts) == files_before
    )
    assert t.snapshot().dirty()  # shard 0 still holds a's superseded rows
    assert main(["upgrade", str(root)]) == 0  # again: nothing to do
    vacuum(t, retention_s=0)
    plain = pads.dataset(t.layer_dir(0), format="parquet").to_table()
    assert plain.num_rows == 4
    # and the old release now refuses it
    refused = old(old_release, "vacuum", str(root))
    assert refused.returncode == 75 and "upgrade the pipeline" in refused.stderr + refused.stdout


def test_the_old_release_refuses_a_version_2_table_and_deletes_nothing(old_release, tmp_path):
    root = tmp_path / "v2"
    t = FeatureTable(str(root))
    t.create_or_check(table_meta())
    t.acquire_lease("r1", ttl_s=30)
    commit_recordings(t, {"a": 2, "b": 3})
    t.release_lease()
    # a crashed writer's file the old vacuum would take for an uncommitted shard
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for command in ("vacuum", "compact"):
        out = old(old_release, command, str(root))
        assert out.returncode == 75, out.stderr
        assert "version 2" in out.stderr and "upgrade the pipeline" in out.stderr
    corpus = tmp_path / "audio"
    corpus.mkdir()
    write_audio(corpus / "x.wav", music_like(2.0, 24000, channels=1, seed=1), 24000, "wav")
    model = write_random_checkpoint(tmp_path / "model", like="MERT-v1-95M", size="tiny")
    out = old(old_release, "run", str(corpus), str(root), "--model", str(model))
    assert out.returncode == 1, out.stderr
    assert "another configuration" in out.stderr and "upgrade the pipeline" in out.stderr
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files
    assert FeatureTable(str(root)).read_layer(0).num_rows == 5
