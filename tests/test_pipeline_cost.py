"""The whole-pipeline CPU benchmark counts every process of a run, orphans included (benchmarks.pipeline_cost)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.pipeline_cost import (
    CpuGroup,
    cpu_at,
    fit,
    measure_floor,
    over_floor,
    role_marginals,
    steady_marginal,
    steady_window,
)

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


# Idles, burns ~0.6 CPU s while printing when it starts and stops, idles again.
PHASED = textwrap.dedent(
    """
    import sys, time
    time.sleep(0.6)
    print("start", time.time(), flush=True)
    t = time.process_time()
    while time.process_time() - t < 0.6:
        pass
    print("stop", time.time(), flush=True)
    time.sleep(0.4)
    """
)


def test_the_sampled_tree_cpu_reads_a_window_inside_the_run():
    probe = CpuGroup.make(f"bench-probe-{os.getpid()}")
    if probe is None:
        pytest.skip("no cgroup v1 cpuacct group can be made here (not root, or cgroup v2)")
    probe.remove()
    code = textwrap.dedent(
        f"""
        import json, os, sys
        from benchmarks.pipeline_cost import measure_tree
        samples, roles = [], []
        cpu, out, err, rc = measure_tree([sys.executable, "-c", {PHASED!r}], dict(os.environ), os.getcwd(),
                                         samples=samples, roles=roles)
        print(json.dumps({{"cpu": cpu, "out": out, "samples": samples, "roles": roles}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    got = json.loads(done.stdout.strip().splitlines()[-1])
    marks = {ln.split()[0]: float(ln.split()[1]) for ln in got["out"].splitlines()}
    samples = [tuple(x) for x in got["samples"]]
    assert len(samples) >= 20  # every SAMPLE_S for ~1.6 s
    burn = cpu_at(samples, marks["stop"]) - cpu_at(samples, marks["start"])
    before = cpu_at(samples, marks["start"] - 0.15) - cpu_at(samples, samples[0][0])
    assert 0.45 <= burn <= 0.75, burn  # the burn, give or take a sample at each end
    assert before < burn / 2  # the interpreter's start-up, not the burn
    assert got["cpu"] >= burn
    # by process: the one process of the tree, its role unknown ("other"), read every ROLE_EVERY samples
    roles = got["roles"]
    assert len(roles) >= 2 and set(roles[-1][1]) == {"other"}
    assert 0.45 <= roles[-1][1]["other"] <= got["cpu"] + 0.02


def test_the_marginal_by_role_comes_from_the_same_windows():
    def run(audio: float) -> dict:
        # from t0 + 10 s the decoder child spends 2 ms and the actor 1 ms per audio s at 100 audio s/s; before
        # that, start-up: 8 CPU s in the actor
        t0, span = 1000.0, audio / 100.0
        times = [t0, t0 + 10] + [t0 + 10 + span * k / 10 for k in range(1, 11)]

        def spent(t: float) -> tuple[float, float]:
            a = max(0.0, t - t0 - 10) * 100  # audio s embedded by t
            return 0.002 * a, 8.0 * min(1.0, (t - t0) / 10) + 0.001 * a

        samples = [(t, sum(spent(t)) + 0.5) for t in times]  # 0.5: a process no role sample saw
        roles = [
            (t, {"decoder child": spent(t)[0], "embed actor": spent(t)[1]}) for t in times[::2] + times[-1:]
        ]
        timing = {
            "first_output_s": 10.0 + span / 10,
            "last_output_s": 10 + span,
            "steady_audio_s": audio * 0.9,
        }
        return {"window": steady_window(samples, {"started_at": t0, "timings": timing}, roles)}

    small, big = run(1440.0), run(4320.0)
    assert small["window"]["by_role_cpu_s"]["decoder child"] == pytest.approx(0.002 * 1440 * 0.9, rel=1e-3)
    by_role = role_marginals(small, big)
    assert by_role == pytest.approx(
        {"decoder child": 2.0, "embed actor": 1.0, "not attributed": 0.0}, abs=1e-3
    )
    assert list(by_role)[:2] == ["decoder child", "embed actor"]  # the largest first
    assert role_marginals({"window": {"cpu_s": 1.0}}, big) is None  # no role samples: no breakdown


def test_the_steady_marginal_comes_from_the_two_runs_windows():
    def run(fixed: float, rate: float, audio: float) -> tuple[list, dict]:
        # start-up costs `fixed` CPU s over 10 s, then `rate` CPU s per audio s at 100 audio s per s
        t0, span = 1000.0, audio / 100.0
        samples = [(t0 + t, fixed * t / 10) for t in (0.0, 10.0)]
        samples += [(t0 + 10 + span * k / 10, fixed + rate * audio * k / 10) for k in range(1, 11)]
        first = 10.0 + span / 10  # the first block: a tenth of the audio
        return samples, {
            "started_at": t0,
            "timings": {"first_output_s": first, "last_output_s": 10 + span, "steady_audio_s": audio * 0.9},
        }

    s_small, r_small = run(fixed=25.0, rate=0.004, audio=1440.0)
    s_big, r_big = run(fixed=15.0, rate=0.004, audio=4320.0)  # a cheaper start: the whole-run fit is skewed
    small = {
        "window": steady_window(s_small, r_small),
        "tree_cpu_s": 25 + 0.004 * 1440,
        "run": {"audio_s": 1440},
    }
    big = {"window": steady_window(s_big, r_big), "tree_cpu_s": 15 + 0.004 * 4320, "run": {"audio_s": 4320}}
    assert small["window"]["cpu_s"] == pytest.approx(0.004 * 1440 * 0.9)
    assert steady_marginal(small, big) == pytest.approx(0.004)
    assert fit(small, big)[0] < 0.001  # what the whole runs' fit made of the same two runs
    with pytest.raises(ValueError, match="fewer than two blocks"):
        steady_window(
            s_small, {"started_at": 1000.0, "timings": {"first_output_s": 11.0, "last_output_s": 11.0}}
        )


def test_a_runs_start_up_less_the_ray_floor():
    floor = {"cpu_s": 9.0, "first_block_s": 6.0}
    assert over_floor(21.5, 14.25, floor) == {
        "fixed_over_floor_cpu_s": 12.5,
        "first_block_over_floor_s": 8.25,
    }
    assert over_floor(21.5, None, floor)["first_block_over_floor_s"] is None  # a run that delivered nothing
    assert over_floor(21.5, 14.25, None) == {"fixed_over_floor_cpu_s": None, "first_block_over_floor_s": None}


def test_the_ray_floor_runs_real_tasks_and_an_actor_in_a_fresh_process():
    """The floor subtracted from the start-up figures is a real local Ray run, measured like a
    pipeline run: every block delivered, the whole tree's CPU counted, the first block after Ray was ready."""
    got = measure_floor(runs=1, blocks=2)
    (run,) = got["runs"]
    assert run["blocks"] == 2
    assert 0 < run["ray_ready_s"] < run["first_block_s"] <= run["wall_s"]
    assert run["tree_cpu_s"] > 1.0  # Ray's daemons and workers, not the measuring process alone
    assert got["cpu_s"] == round(run["tree_cpu_s"], 2) and got["first_block_s"] == round(
        run["first_block_s"], 2
    )
