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

N_FILES = 14


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def env() -> dict:
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    e.pop("MERT_PIPELINE_FAULT_INJECTION", None)
    e["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    return e


@pytest.mark.slow
def test_killed_driver_then_rerun_completes_without_duplicates_or_rework(tmp_path):
    model = write_random_checkpoint(tmp_path / "model", like="MERT-v1-95M", size="tiny")
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(N_FILES):
        write_audio(audio / f"t{i:02d}.flac", music_like(16.0, 44100, channels=2, seed=i), 44100, "flac")
    out = tmp_path / "table"
    common = ["--model", str(model), "--shard-max-recordings", "1", "--decode-workers", "1", "--quiet"]
    proc = subprocess.Popen(
        cli("run", str(audio), str(out), *common),
        env=env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    committed_at_kill = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            markers = list((out / "recordings").glob("*.parquet")) if (out / "recordings").exists() else []
            if len(markers) >= 3:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started: a hard crash
                break
            time.sleep(0.02)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    first = read_ledger(str(out))
    committed_at_kill = first.num_rows
    assert 3 <= committed_at_kill < N_FILES, "the kill must land midway"
    assert not list((out / "runs").glob("*.json")) if (out / "runs").exists() else True  # no summary: it died
    first_ids = set(first.column("recording_id").to_pylist())
    first_run = first.column("run_id")[0].as_py()

    # The rerun: the dead run's lease is stale (same host, process gone), its uncommitted files are orphans.
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
    assert ledger.num_rows == N_FILES  # exactly one row per input across both runs
    second = ledger.filter(pc.equal(ledger.column("run_id"), summary["run_id"]))
    assert not (set(second.column("recording_id").to_pylist()) & first_ids)  # nothing committed was redone
    assert set(ledger.column("run_id").to_pylist()) == {first_run, summary["run_id"]}

    for layer in (0, 2):
        t = read_features(str(out), layer)
        keys = list(zip(t.column("recording_id").to_pylist(), t.column("segment").to_pylist(), strict=True))
        assert len(keys) == len(set(keys)), "duplicate (recording, segment) rows"
        assert len({k[0] for k in keys}) == N_FILES
        assert len(keys) == N_FILES * 4  # 16 s: windows at 0, 5, 10 and a 1 s partial at 15
        # plain Parquet readers agree with the reader once clean-up has run (the rerun vacuumed at its start)
        import pyarrow.dataset as pads

        plain = pads.dataset(out / "features" / f"layer={layer}", format="parquet").to_table()
        assert plain.num_rows == t.num_rows
    assert not (out / "_lease.json").exists()
