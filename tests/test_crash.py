"""A driver killed midway (SIGKILL to its whole process group, its own local Ray included), then a rerun.

These tests start and stop their own Ray: the killed driver owns one, the rerun another.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pytest

from pipeline import read_features, read_ledger
from pipeline.checkpoints import write_random_checkpoint
from pipeline.synth import music_like, write_audio
from pipeline.testing.tables import committed_entries, lease_holder

N_FILES = 14


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def env() -> dict:
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    e.pop("MERT_PIPELINE_FAULT_INJECTION", None)
    e["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    return e


def run_until_killed(audio, out, model, commits: int) -> int:
    """Start a run and SIGKILL its process group (the driver, its Ray, its writers) once the table's log holds
    `commits` commits; returns how many had landed at the kill."""
    common = [
        "--model",
        str(model),
        "--shard-max-recordings",
        "1",
        "--batch-size",
        "1",
        "--decode-workers",
        "1",
    ]
    proc = subprocess.Popen(
        cli("run", str(audio), str(out), *common, "--quiet"),
        env=env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    at_kill = committed_entries(str(out))
    try:
        while time.time() < deadline and proc.poll() is None:
            at_kill = committed_entries(str(out))
            if at_kill >= commits:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started: a hard crash
                break
            time.sleep(0.02)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    return at_kill


@pytest.mark.slow
def test_killed_driver_then_rerun_completes_without_duplicates_or_rework(tmp_path):
    """Killed at two points (after its first commit; a rerun after more commits), then a rerun completes:
    the table is complete, no (recording, segment, layer) twice, nothing committed embedded again."""
    model = write_random_checkpoint(tmp_path / "model", like="MERT-v1-95M", size="tiny")
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(N_FILES):
        write_audio(audio / f"t{i:02d}.flac", music_like(16.0, 44100, channels=2, seed=i), 44100, "flac")
    out = tmp_path / "table"
    run_until_killed(audio, out, model, commits=1)
    first = read_ledger(str(out))
    assert 1 <= first.num_rows < N_FILES, "the first kill must land midway"
    assert not list((out / "runs").glob("*.json")) if (out / "runs").exists() else True  # no summary: it died
    run_until_killed(audio, out, model, commits=committed_entries(str(out)) + 2)
    killed = read_ledger(str(out))
    committed_at_kill = killed.num_rows
    assert first.num_rows < committed_at_kill < N_FILES, "the second kill must land midway too"
    killed_ids = set(killed.column("recording_id").to_pylist())
    killed_runs = set(killed.column("run_id").to_pylist())
    assert len(killed_runs) == 2

    # The rerun: the dead runs' epochs are stale (same host, process gone), their uncommitted files orphans.
    done = subprocess.run(
        cli("run", str(audio), str(out), "--model", str(model), "--json", "--quiet"),
        env=env(),
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    summary = json.loads(done.stdout)
    assert summary["status"] == "complete"
    assert summary["counts"]["skipped"] == committed_at_kill
    assert summary["counts"]["processed"] == N_FILES - committed_at_kill

    ledger = read_ledger(str(out), latest=False)
    assert ledger.num_rows == N_FILES  # exactly one row per input across the three runs
    third = ledger.filter(pc.equal(ledger.column("run_id"), summary["run_id"]))
    assert not (set(third.column("recording_id").to_pylist()) & killed_ids)  # nothing committed was redone
    assert set(ledger.column("run_id").to_pylist()) == killed_runs | {summary["run_id"]}

    # the killed runs' flushes that never reached a commit are orphans: invisible to the reader, deleted by vacuum
    from pipeline.table import FeatureTable
    from pipeline.table.maintenance import vacuum

    vacuum(FeatureTable(str(out)), retention_s=0)
    for layer in (0, 2):
        t = read_features(str(out), layer)
        keys = list(zip(t.column("recording_id").to_pylist(), t.column("segment").to_pylist(), strict=True))
        assert len(keys) == len(set(keys)), "duplicate (recording, segment) rows"
        assert len({k[0] for k in keys}) == N_FILES
        assert len(keys) == N_FILES * 4  # 16 s: windows at 0, 5, 10 and a 1 s partial at 15
        # plain Parquet readers agree with the reader once vacuum has run
        import pyarrow.dataset as pads

        plain = pads.dataset(out / "features" / f"layer={layer}", format="parquet").to_table()
        assert plain.num_rows == t.num_rows
    assert lease_holder(str(out)) is None
