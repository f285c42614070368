"""The README's "on one machine" commands, as written: infra/local-cluster.sh up (an S3-protocol server and a
two-node Ray), ray job submit of jobs.extract and of two ticks, inspect, down. Only the ports and the state folder
differ (so that it runs beside other Rays), and `down` runs even when a step fails.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    """The bash block after "On one machine" in the README, one command per entry (continuations joined)."""
    text = (REPO / "README.md").read_text()
    start = text.index("On one machine, from this repository")
    block = text[
        text.index("```bash", start) + len("```bash") : text.index("```", text.index("```bash", start) + 7)
    ]
    joined = block.replace("\\\n", " ")
    return [ln.split("  #")[0].strip() for ln in joined.splitlines() if ln.strip()]


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def test_the_readme_local_cluster_commands_work_as_written():
    cmds = readme_commands()
    assert cmds[0].startswith(". .venv/bin/activate && pip install")  # the install step: done by CI already
    assert cmds[1].startswith("bash infra/local-cluster.sh up") and cmds[-1].startswith(
        "bash infra/local-cluster.sh down"
    )
    state = tempfile.mkdtemp(prefix="lc-", dir="/tmp")  # Ray's socket paths must stay short
    s3, gcs, dash, client = free_ports(4)
    agent = 40000 + (os.getpid() % 2000) * 4  # two consecutive ports (head, one worker)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RAY_") and k != "MERT_PIPELINE_FAULT_INJECTION"
    }
    env.update(
        LC_STATE=state,
        LC_S3_PORT=str(s3),
        LC_GCS_PORT=str(gcs),
        LC_DASH_PORT=str(dash),
        LC_CLIENT_PORT=str(client),
        LC_AGENT_PORT=str(agent),
        LC_FILES="3",
        LC_PYTHON=sys.executable,
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
    )

    def local(cmd: str) -> str:  # the README's command with this test's state folder and S3 port
        return (
            cmd.replace('"$PWD/.local-cluster/', f'"{state}/')
            .replace("source .local-cluster/env", f"source {state}/env")
            .replace("127.0.0.1:5055", f"127.0.0.1:{s3}")
        )

    steps = [
        local(c) for c in cmds[1:-1]
    ]  # a tick repeated is a no-op: tests/test_jobs.py, without a cluster
    script = "set -euo pipefail\n" + "\n".join(f"echo '--- step {i}'\n{c}" for i, c in enumerate(steps))
    try:
        done = subprocess.run(
            ["bash", "-c", script],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
        )
        out = done.stdout
        assert done.returncode == 0, out[-5000:]
        parts = {int(m.group(1)): m.start() for m in re.finditer(r"--- step (\d+)", out)}
        text = {i: out[parts[i] : parts.get(i + 1, len(out))] for i in parts}
        assert "2 Ray node(s) alive" in text[0]
        assert "3 ok, 0 error" in text[2] and "succeeded" in text[2]  # jobs.extract through ray job submit
        assert "3 skipped (of 3 listed)" in text[3] and "succeeded" in text[3]  # the tick: nothing new
        assert "recordings: 3 by status {'ok': 3}" in text[4]
        rows = re.search(r"rows per layer: \{0: (\d+), 1: (\d+), 2: (\d+)\}", text[4]).groups()
        assert len(set(rows)) == 1 and int(rows[0]) >= 3
    finally:
        down = subprocess.run(
            ["bash", "infra/local-cluster.sh", "down"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        cluster_id = (
            Path(state, "cluster_id").read_text().strip() if Path(state, "cluster_id").exists() else None
        )
        shutil.rmtree(state, ignore_errors=True)
    assert down.returncode == 0, down.stderr[-2000:]
    left = subprocess.run(["pgrep", "-f", state], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the local cluster left running: {left}"
    assert cluster_id is None  # down forgot the cluster
