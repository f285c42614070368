"""The whole-pipeline CPU benchmark counts every process of a run, orphans included (benchmarks.pipeline_cost)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.pipeline_cost import fit

ROOT = Path(__file__).resolve().parent.parent

# A process that forks a grandchild and exits at once; the grandchild, orphaned, burns ~0.4 s of CPU.
ORPHANING = textwrap.dedent(
    """
    import os, time
    if os.fork() == 0:
        time.sleep(0.2)  # the parent is gone by now
        t = time.process_time()
        while time.process_time() - t < 0.4:
            pass
        os._exit(0)
    os._exit(0)
    """
)


def _measured(subreaper: bool) -> float:
    """CPU seconds a fresh measuring process counts for ORPHANING, with or without the subreaper."""
    code = textwrap.dedent(
        f"""
        import json, os, subprocess, sys, time
        from benchmarks.pipeline_cost import children_cpu_s, measure_tree
        cmd = [sys.executable, "-c", {ORPHANING!r}]
        if {subreaper!r}:
            cpu = measure_tree(cmd, dict(os.environ), os.getcwd())[0]
        else:
            c0 = children_cpu_s()
            subprocess.run(cmd, check=True)
            time.sleep(1.0)  # the orphan finishes, re-parented elsewhere
            cpu = children_cpu_s() - c0
        print(json.dumps(cpu))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux's")
def test_the_tree_measure_counts_an_orphaned_grandchild():
    assert _measured(subreaper=True) >= 0.35
    assert _measured(subreaper=False) < 0.3  # what a plain RUSAGE_CHILDREN misses


def test_marginal_and_fixed_cost_through_two_runs():
    small = {"tree_cpu_s": 12.0 + 0.003 * 1440, "run": {"audio_s": 1440.0}}
    big = {"tree_cpu_s": 12.0 + 0.003 * 4320, "run": {"audio_s": 4320.0}}
    marginal, fixed = fit(small, big)
    assert marginal == pytest.approx(0.003)
    assert fixed == pytest.approx(12.0)


def test_the_model_cost_is_what_its_calls_take_per_audio_second(tmp_path):
    """The model's own share of the marginal: CPU per audio second of the tiny model's calls, in one process, at
    the threads asked for (the torch thread count of the test process is restored)."""
    import torch

    from benchmarks.pipeline_cost import model_cost
    from pipeline.checkpoints import write_random_checkpoint

    model = write_random_checkpoint(tmp_path / "tiny", like="MERT-v1-95M", size="tiny")
    before = torch.get_num_threads()
    try:
        got = model_cost({"model": str(model), "threads": 1, "segments": 4})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert got["segments"] == 4 and got["threads"] == 1
    # four 5 s windows of a 32-wide conv front end take milliseconds of CPU per audio second, not nothing, and
    # far less than the audio's own length
    assert 1e-5 < got["cpu_s_per_audio_s"] < 0.5
