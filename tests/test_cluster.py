"""Failures a cluster meets: a real `ray job submit`, a worker node that dies midway, an embed actor killed midway,
an input that kills its worker process every time, and SIGTERM to the driver.

These tests start and stop their own Ray (a two-node local cluster from ray.cluster_utils, or the local Ray a
driver subprocess starts), never the shared one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.compute as pc
import pytest

from pipeline import read_features, read_ledger
from pipeline.checkpoints import write_random_checkpoint
from pipeline.synth import music_like, write_audio
from pipeline.table import FeatureTable
from pipeline.table.maintenance import vacuum
from pipeline.testing.tables import committed_entries, lease_holder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("model") / "tiny-95M", like="MERT-v1-95M", size="tiny"
    )


def corpus(folder: Path, n: int, secs: float, extra: dict[str, float] | None = None) -> dict[str, int]:
    """n FLAC files of `secs` seconds (plus `extra`); returns name -> expected segment count."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {f"t{i:02d}.flac": secs for i in range(n)} | (extra or {})
    for i, (name, s) in enumerate(names.items()):
        write_audio(folder / name, music_like(s, 44100, channels=2, seed=i), 44100, "flac")
    return {name: int(s // 5) + (1 if s % 5 >= 1.0 else 0) for name, s in names.items()}


def env(**extra: str) -> dict:
    """A driver's environment: this venv first on PATH (`python` in an entrypoint is ours), no inherited Ray."""
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    e.pop("MERT_PIPELINE_FAULT_INJECTION", None)
    e["PATH"] = os.path.dirname(sys.executable) + os.pathsep + e.get("PATH", "")
    e["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    e.update(extra)
    return e


def extract_cmd(audio: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.extract",
        str(audio),
        str(out),
        "--model",
        str(model),
        "--batch-size",
        "1",
        "--shard-max-recordings",
        "1",
        "--json",
        "--quiet",
        *extra,
    ]


def summary_of(stdout: bytes | str) -> dict:
    """The --json summary: the last line of stdout that is a JSON object (Ray's log lines share stdout)."""
    text = stdout.decode() if isinstance(stdout, bytes) else stdout
    lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON summary in: {text[-2000:]}"
    return json.loads(lines[-1])


def committed(out: Path) -> int:
    return committed_entries(str(out))


def wait_for(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the driver exited ({proc.returncode}) before {what}: "
                f"{proc.stderr.read().decode()[-3000:] if proc.stderr else ''}"
            )
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def driver_midway(audio: Path, out: Path, model: Path):
    """A `python -m jobs.extract` driver (with its own local Ray), yielded once it has committed two shards;
    killed with its whole process group if the test leaves it running."""
    proc = subprocess.Popen(
        extract_cmd(audio, out, model, "--decode-workers", "1"),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_for(lambda: committed(out) >= 2, 300, "two commits", proc)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def check_table(out: Path, expected: dict[str, int], layers=(0, 2)) -> None:
    """Every input has exactly one ledger row, ok; every layer has exactly its segments, none twice."""
    ledger = read_ledger(str(out), latest=False)
    names = sorted(Path(u).name for u in ledger.column("uri").to_pylist())
    assert names == sorted(expected), "an input is missing or has two ledger rows"
    assert set(ledger.column("status").to_pylist()) == {"ok"}
    for layer in layers:
        t = read_features(str(out), layer)
        keys = list(zip(t.column("recording_id").to_pylist(), t.column("segment").to_pylist(), strict=True))
        assert len(keys) == len(set(keys)), "duplicate (recording, segment) rows"
        per: dict[str, list[int]] = {}
        for rid, seg in keys:
            per.setdefault(Path(rid).name, []).append(seg)
        assert {k: sorted(v) for k, v in per.items()} == {k: list(range(n)) for k, n in expected.items()}


@pytest.fixture
def two_node_cluster():
    """A head (with the dashboard's job server) and one worker node: separate raylets, one machine."""
    from ray.cluster_utils import Cluster

    old_path = os.environ["PATH"]
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + old_path  # the job driver's `python`
    port = _free_port()
    # Each node's dashboard agent gets a port of its own: the default one (52365) may be taken by another Ray on
    # this machine (the shared test Ray), and a head without its agent accepts no job ("No available agent").
    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": True,
            "dashboard_port": port,
            "dashboard_agent_listen_port": _free_port(),
        },
    )
    worker = cluster.add_node(num_cpus=2, dashboard_agent_listen_port=_free_port())
    try:
        yield cluster, worker, f"http://127.0.0.1:{port}"
    finally:
        cluster.shutdown()
        os.environ["PATH"] = old_path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NOT_READY = "No available agent to submit job"  # the head's agent registers seconds after the node is up


def submit(dashboard: str, entrypoint: list[str], *extra: str) -> subprocess.CompletedProcess:
    """The README's command: ray job submit --working-dir . -- python -m jobs.extract ..."""
    deadline = time.time() + 90
    while True:
        done = subprocess.run(
            [
                "ray",
                "job",
                "submit",
                "--address",
                dashboard,
                "--working-dir",
                ".",
                "--runtime-env-json",
                '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "60"}}',
                *extra,
                "--",
                *entrypoint,
            ],
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=400,
        )
        if done.returncode == 0 or NOT_READY not in done.stderr + done.stdout or time.time() > deadline:
            return done
        time.sleep(1)


def submit_job(client, **kwargs) -> str:
    deadline = time.time() + 90
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as exc:
            if NOT_READY not in str(exc) or time.time() > deadline:
                raise
            time.sleep(1)


def test_ray_job_submit_a_worker_node_dying_midway_and_ray_job_stop(two_node_cluster, model_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    cluster, worker, dashboard = two_node_cluster
    # 1. the README's submit command, as written, runs a real job to completion
    small = tmp_path / "small"
    expected_small = corpus(small, 2, 6.0)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"input: {small}\noutput: {tmp_path / 'small-table'}\nmodel: {model_dir}\nbatch_size: 4\n"
        "cpus_per_actor: 1\n"
    )
    done = submit(dashboard, ["python", "-m", "jobs.extract", "--config", str(config)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr and "run " in done.stdout
    check_table(tmp_path / "small-table", expected_small)

    # 2. a longer job; its worker node dies once some shards are committed
    audio, out = tmp_path / "audio", tmp_path / "table"
    expected = corpus(audio, 8, 11.0)
    client = JobSubmissionClient(dashboard)
    job = submit_job(
        client,
        entrypoint=" ".join(
            [
                "python",
                "-m",
                "jobs.extract",
                str(audio),
                str(out),
                "--model",
                str(model_dir),
                "--batch-size",
                "1",
                "--shard-max-recordings",
                "1",
                "--cpus-per-actor",
                "1",
                "--quiet",
            ]
        ),
        runtime_env={"working_dir": str(REPO), "env_vars": {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}},
    )
    try:
        wait_for(lambda: committed(out) >= 2 or client.get_job_status(job).is_terminal(), 300, "two commits")
    except AssertionError as exc:  # say why, and free the cluster's cores for the tests after this one
        logs = client.get_job_logs(job)
        client.stop_job(job)
        raise AssertionError(f"{exc}; the job's log ends:\n{logs[-4000:]}") from None
    at_kill = committed(out)
    cluster.remove_node(worker)  # its raylet, its workers, its objects: gone
    deadline = time.time() + 400
    while not client.get_job_status(job).is_terminal() and time.time() < deadline:
        time.sleep(0.5)
    status, logs = client.get_job_status(job), client.get_job_logs(job)
    if os.environ.get("MERT_TEST_SHOW_LOGS"):
        print(logs)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert at_kill < len(expected), "the node must die midway"
    summary = json.loads(next((out / "runs").iterdir()).read_text())
    assert summary["status"] == "complete" and summary["counts"]["ok"] == len(expected)
    check_table(out, expected)

    # 3. `ray job stop` (SIGTERM to the driver): the run ends at a commit boundary; resubmitting resumes it
    out2 = tmp_path / "table2"
    entry = " ".join(
        [
            "python",
            "-m",
            "jobs.extract",
            str(audio),
            str(out2),
            "--model",
            str(model_dir),
            "--batch-size",
            "1",
            "--shard-max-recordings",
            "1",
            "--cpus-per-actor",
            "1",
            "--quiet",
        ]
    )
    runtime_env = {
        "working_dir": str(REPO),
        "env_vars": {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_JOB_STOP_WAIT_TIME_S": "60"},
    }
    job = submit_job(client, entrypoint=entry, runtime_env=runtime_env)
    wait_for(lambda: committed(out2) >= 2 or client.get_job_status(job).is_terminal(), 300, "two commits")
    client.stop_job(job)
    while not client.get_job_status(job).is_terminal():
        time.sleep(0.2)
    assert client.get_job_status(job) == JobStatus.STOPPED
    record = json.loads(next((out2 / "runs").iterdir()).read_text())
    assert record["status"] == "interrupted", client.get_job_logs(job)[-3000:]
    assert lease_holder(str(out2)) is None
    job = submit_job(client, entrypoint=entry, runtime_env=runtime_env)
    while not client.get_job_status(job).is_terminal():
        time.sleep(0.5)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    check_table(out2, expected)


def test_embed_actor_killed_midway_is_replaced_and_the_run_completes(model_dir, tmp_path):
    audio, out = tmp_path / "audio", tmp_path / "table"
    expected = corpus(audio, 10, 11.0)
    with driver_midway(audio, out, model_dir) as proc:

        def embed_actors() -> list[psutil.Process]:
            found = []
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if "ray::EmbedStage" in " ".join(p.cmdline()):
                        found.append(p)
                except psutil.Error:
                    pass
            return found

        victims = embed_actors()
        assert len(victims) == 1, [" ".join(p.cmdline()) for p in victims]
        at_kill = committed(out)
        victims[0].kill()  # SIGKILL: like the OOM killer or a crashed CUDA context
        out_text, err_text = proc.communicate(timeout=400)
    assert proc.returncode == 0, err_text.decode()[-4000:]
    summary = summary_of(out_text)
    assert summary["status"] == "complete" and summary["counts"]["ok"] == len(expected)
    assert at_kill < len(expected)
    check_table(out, expected)


def test_inputs_that_kill_their_worker_every_time_become_error_rows(model_dir, tmp_path):
    """Two such inputs in one decode task: on 2 CPUs (one decode slot) the inputs, sorted by URI, go in tasks of
    1, 2, 1 and 1 (engine.ray_wiring.chunk_size), so both bad ones share the second task, which needs two deaths
    under each before both are error rows: its retry bound counts each input it holds."""
    audio, out = tmp_path / "audio", tmp_path / "table"
    bad = {"t00a__kill_worker__.flac": 6.0, "t00b__kill_worker__.flac": 6.0}
    corpus(audio, 3, 6.0, extra=bad)
    done = subprocess.run(
        extract_cmd(audio, out, model_dir),
        env=env(MERT_PIPELINE_FAULT_INJECTION="worker_crash:__kill_worker__"),
        capture_output=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    summary = summary_of(done.stdout)
    assert summary["status"] == "complete"
    assert (summary["counts"]["ok"], summary["counts"]["error"]) == (3, 2)
    assert summary["counts"]["errors_by_kind"] == {"worker_crash": 2}
    ledger = read_ledger(str(out), latest=False)
    assert ledger.num_rows == 5
    rows = ledger.filter(pc.match_substring(ledger.column("uri"), "__kill_worker__")).to_pylist()
    assert sorted(Path(r["uri"]).name for r in rows) == sorted(bad)
    for row in rows:
        assert row["status"] == "error" and row["error_kind"] == "worker_crash" and not row["retryable"]
        assert "died 2 times" in row["error_message"] and Path(row["uri"]).name in row["error_message"]
    # a rerun does not try it again (a permanent error) ...
    again = subprocess.run(
        extract_cmd(audio, out, model_dir),
        env=env(MERT_PIPELINE_FAULT_INJECTION="worker_crash:__kill_worker__"),
        capture_output=True,
        timeout=400,
    )
    assert again.returncode == 0 and summary_of(again.stdout)["counts"]["skipped"] == 5


def test_sigterm_stops_the_driver_at_a_commit_boundary_and_a_rerun_resumes(model_dir, tmp_path):
    audio, out = tmp_path / "audio", tmp_path / "table"
    expected = corpus(audio, 8, 11.0)
    with driver_midway(audio, out, model_dir) as proc:
        t = time.time()
        proc.send_signal(signal.SIGTERM)  # the driver only, as `ray job stop` or a pod eviction does
        out_text, err_text = proc.communicate(timeout=120)
        stop_s = time.time() - t
    assert proc.returncode == 143, err_text.decode()[-4000:]
    assert stop_s < 60
    summary = summary_of(out_text)
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["stop_reason"]
    record = json.loads((out / "runs" / f"{summary['run_id']}.json").read_text())
    assert record["status"] == "interrupted"
    assert lease_holder(str(out)) is None  # given back: the next run need not wait for it to expire
    # nothing half-written: every data file belongs to a commit, nothing for clean-up to delete as an orphan
    table = FeatureTable(str(out))
    assert vacuum(table, retention_s=0)["orphans_deleted"] == 0
    first = read_ledger(str(out), latest=False)
    n_first = first.num_rows
    assert 2 <= n_first < len(expected)
    assert n_first == summary["counts"]["processed"]  # what it reported is what it committed
    part = {Path(u).name: expected[Path(u).name] for u in first.column("uri").to_pylist()}
    check_table(out, part)  # the reader accepts the interrupted table

    done = subprocess.run(extract_cmd(audio, out, model_dir), env=env(), capture_output=True, timeout=400)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    second = summary_of(done.stdout)
    assert second["counts"]["skipped"] == n_first and second["counts"]["processed"] == len(expected) - n_first
    check_table(out, expected)  # nothing lost, nothing twice


def test_two_nodes_the_worker_node_writes_and_the_driver_gets_metadata_only(model_dir, tmp_path):
    """A head that runs only the driver (num_cpus=0, as KubeRay heads often do) and one worker node, on one
    hostname: every committed file was written on the worker node, and the driver received a small bounded
    number of bytes per segment (records and flush descriptions, never an embedding)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        connect=False,
        head_node_args={"num_cpus": 0, "dashboard_agent_listen_port": _free_port()},
    )
    worker = cluster.add_node(num_cpus=2, dashboard_agent_listen_port=_free_port())
    try:
        audio, out = tmp_path / "audio", tmp_path / "table"
        expected = corpus(audio, 4, 11.0)
        done = subprocess.run(
            extract_cmd(audio, out, model_dir, "--cpus-per-actor", "1"),
            env=env(RAY_ADDRESS=cluster.address),
            capture_output=True,
            timeout=400,
        )
        assert done.returncode == 0, done.stderr.decode()[-4000:]
        summary = summary_of(done.stdout)
        check_table(out, expected)
        head_id, worker_id = cluster.head_node.node_id, worker.node_id
        adds = [a for e in FeatureTable(str(out)).log.entries(0) for a in e.get("adds") or ()]
        assert adds and {a["node_id"] for a in adds} == {worker_id} != {head_id}
        assert (
            len({a["host"] for a in adds}) == 1
        )  # both nodes share the hostname; the node id tells them apart
        got = summary["driver_received"]
        assert got["segments"] == sum(expected.values())
        # a bound that does not grow with the model: records and flush descriptions only (MERT-v1-95M's
        # embeddings are 13 x 768 x 4 = 39,936 bytes per segment; benchmarks/table.py measures the ratio)
        assert got["bytes_per_segment"] < 1000, got
    finally:
        cluster.shutdown()


def test_without_an_address_a_run_starts_its_own_ray_even_beside_a_stale_ray_start_file():
    """No --address and no RAY_ADDRESS: a new local Ray, as documented. Ray's own default would join the last
    cluster `ray start` left on the machine (its temp dir's ray_current_cluster) and, when that cluster is gone
    but its file is not (`ray start --block` ended by SIGINT leaves it), hang in the GCS client."""
    import shutil
    import socket
    import tempfile

    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]  # nothing listens here once the socket is closed
        os.makedirs(os.path.join(tmp, "ray"))
        Path(tmp, "ray", "ray_current_cluster").write_text(f"127.0.0.1:{dead}")
        code = (
            "from pipeline.config import RunConfig\n"
            "from pipeline.engine.ray_wiring import connect\n"
            "ray = connect(RunConfig(input='in', output='out'), print)\n"
            "print('nodes', len(ray.nodes()), ray.get_runtime_context().gcs_address)\n"
            "ray.shutdown()\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], env=env(RAY_TMPDIR=tmp), capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "nodes 1" in done.stdout
        assert f":{dead}" not in done.stdout  # a cluster of its own, not the one in the file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
