"""The whole pipeline's CPU per audio second, per format, every process of a run counted (issue 12).

Part of `python -m benchmarks.run --section cpu` (after the CPU stage's per-format table, whose limit and
isolated-stage figures it is compared with; `--pipeline-files 0` skips it). Per format, two real runs of
`pipeline.engine.run` on N and 3N hard links of the section's 3-minute file (the recording id is the URI, so each
link is its own recording), a tiny random checkpoint in hub layout (PIPELINE_CONV_DIM: what is measured is the
pipeline, not the model; the model's own calls are measured alone too, `model_cost`), to a fresh local table.
Each run is a fresh driver process that starts its own local Ray and shuts it down. Its CPU is every process's:
the driver runs under a small measuring process (`--measure`) in a fresh cgroup (v1 `cpuacct`, which counts
every process ever in it: Ray's daemons, workers, the decoder children, the actors). That process is also a
child subreaper (Linux `PR_SET_CHILD_SUBREAPER`), so it reaps every descendant before it reads the count. Without a cgroup (not root) it falls back to `RUSAGE_CHILDREN`, which misses the CPU
of processes nobody reaps: Ray's raylet ignores SIGCHLD, so its workers' CPU would be lost (15-20 CPU s a run).

  marginal  what one more audio second costs the whole run, every process counted, through the two runs'
            steady windows (first embedded block at the driver to the last; the tree's CPU sampled every
            SAMPLE_S and read at both ends): (window CPU(3N) - window CPU(N)) / (window audio(3N) - window
            audio(N)). The whole runs' (CPU(3N) - CPU(N)) / (audio(3N) - audio(N)) is kept beside it: a run's
            start-up varies by about +-10 CPU s, which 48 more minutes of audio at the limit (~7 CPU s) cannot
            outweigh, so that fit did not resolve the marginal;
  by process the marginal split by role (decoder child, decode worker, embed actor, writer, driver, Ray's
            daemons; ROLES, BINARIES), through the same windows: each process in the group is read from /proc every
            ROLE_EVERY samples (ProcessRoles). `not attributed` is the marginal less their sum;
  -model    the marginal less the model's own CPU per audio second (its calls alone, in one process, at the
            actor's torch threads): what the pipeline around the model costs
  fixed     CPU - marginal x audio, the mean over the two runs: what a run costs before and around the work
            (goal <= 10 CPU s);
  floor     what Ray alone costs a run shaped like ours, measured the same way in the same command
            (FLOOR_RUNS fresh processes, `--floor`): a local Ray started with the run's own options
            (engine.ray_wiring.connect), FLOOR_BLOCKS items through tasks that each pass theirs to one one-CPU
            actor, identity functions, each task's result to the driver as it finishes, Ray shut down. Its tree
            CPU and the time to its first block are what no change inside the pipeline can remove while it runs
            on Ray; `fixed - floor` and `first block - floor` are the pipeline's own share of the start-up goals;
  steady    the 3N run's `timings.steady_audio_s_per_s` (first embedded block to last) against the CPU stage's
            capacity on the cores the pipeline gives decoding: decode slots (the cluster's CPUs minus what the
            embed actor reserves; one on 2 cores) x the isolated stage's audio s per CPU s (goal >= 0.9).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

GOAL_MARGINAL_OVER_LIMIT = 1.25
GOAL_FIXED_CPU_S = 10.0
GOAL_STEADY_OVER_CAPACITY = 0.9
PR_SET_CHILD_SUBREAPER = 36
SAMPLE_S = 0.05  # how often the tree's CPU is read during a run (the steady window's ends are interpolated)
# The runs' checkpoint: the tiny MERT-v1-95M (real strides and kernels, 2 layers, 32 wide) with a conv front end 4
# channels wide. The tests' 32-wide front end costs ~4.4 CPU ms per audio s on the raw 24 kHz waveform, twice the
# MP3 decode limit: the runs would measure the model. At 4 wide it is 0.5-0.7 (its share is reported beside).
PIPELINE_CONV_DIM = 4
# The embed actor reserves one core and runs one torch thread, as a GPU actor does (engine.ray_wiring.place). The
# CPU default gives a lone CPU actor every core's thread, right for the real model (it costs ~100x the decode) but
# here two torch threads on two cores spin against the decode slot: the actor's CPU in the steady window was
# 1.70 ms per audio s at 2 threads and 0.90 at 1, at the same wall clock (24 MP3 files, 2026-12-03).
PIPELINE_CPUS_PER_ACTOR = 1.0
ROLE_EVERY = 10  # every this many samples, the CPU of each process in the group too, by role (ProcessRoles)
# A process's role from its command line, first match: Ray workers retitle themselves per task (`ray::IDLE` between
# tasks), so a pid keeps the first role other than IDLE_ROLE it is seen with.
IDLE_ROLE = "ray worker (idle)"
ROLES = (
    ("-m pipeline.audio", "decoder child"),
    ("EmbedStage", "embed actor"),
    ("decode_and_embed", "decode worker"),
    ("_Writer", "writer"),
    ("benchmarks.pipeline_cost", "driver"),
    ("DashboardAgent", "dashboard agent"),
    ("dashboard.py", "dashboard"),
    ("log_monitor", "log monitor"),
    ("monitor.py", "autoscaler monitor"),
    ("RuntimeEnv", "runtime env agent"),
    ("ray::IDLE", IDLE_ROLE),
    ("default_worker.py", IDLE_ROLE),  # a worker not yet retitled
)
# Roles by the executable's name, before ROLES: the raylet's arguments hold the worker's and the agents' command
# lines.
BINARIES = {"raylet": "raylet", "gcs_server": "GCS"}
FLOOR_RUNS = 2  # fresh Ray floor processes per section (their mean is subtracted)
FLOOR_BLOCKS = 8  # items through the floor's two stages, one block each (a run of N files has N decode tasks)
ROOT = Path(__file__).resolve().parent.parent


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _live_children() -> list[int]:
    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


class CpuGroup:
    """A fresh cgroup v1 `cpuacct` group (Linux, root): `cpuacct.usage` counts the CPU of every process ever in
    it, including those whose parent ignores SIGCHLD (the kernel reaps them at exit and adds their CPU to no one's
    RUSAGE_CHILDREN: Ray's raylet does that to its workers). None where it cannot be made."""

    ROOT = Path("/sys/fs/cgroup/cpuacct")

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def make(cls, name: str) -> CpuGroup | None:
        path = cls.ROOT / name
        try:
            path.mkdir()
            (path / "cpuacct.usage").read_text()
        except OSError:
            return None
        return cls(path)

    def enter(self) -> None:  # a Popen preexec_fn: the command and all it starts are in the group
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def cpu_s(self) -> float:
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        for _ in range(50):  # a process leaves the group a moment after it is reaped
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def _role(cmdline: str) -> str:
    exe = cmdline.split(" ", 1)[0].rsplit("/", 1)[-1]
    if exe in BINARIES:
        return BINARIES[exe]
    for key, role in ROLES:
        if key in cmdline:
            return role
    return "other"


class ProcessRoles:
    """CPU s of each process in a cgroup, summed by role (ROLES), read from /proc: `sample()` appends (time, {role:
    CPU s so far}). A process that has exited keeps the CPU it had at its last sample (what it spent after that
    is in the cgroup's total, not here)."""

    def __init__(self, group: CpuGroup) -> None:
        self.group = group
        self.cpu: dict[int, float] = {}
        self.role: dict[int, str] = {}
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> None:
        try:
            pids = [int(x) for x in (self.group.path / "cgroup.procs").read_text().split()]
        except OSError:
            return
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(stat[11]) + int(stat[12])) / self.tick
                if self.role.get(pid, IDLE_ROLE) == IDLE_ROLE:
                    cmd = (
                        Path(f"/proc/{pid}/cmdline")
                        .read_bytes()
                        .replace(b"\0", b" ")
                        .decode(errors="replace")
                    )
                    self.role[pid] = _role(cmd)
            except (OSError, ValueError, IndexError):
                continue
            self.cpu[pid] = max(cpu, self.cpu.get(pid, 0.0))
        by_role: dict[str, float] = {}
        for pid, cpu in self.cpu.items():
            role = self.role.get(pid, "other")
            by_role[role] = by_role.get(role, 0.0) + cpu
        self.samples.append((time.time(), by_role))


def measure_tree(
    cmd: list[str],
    env: dict,
    cwd: str,
    linger_s: float = 60.0,
    samples: list | None = None,
    roles: list | None = None,
) -> tuple[float, str, str, int]:
    """Run `cmd` as a subreaper's child; after it exits, reap every descendant (SIGKILL what still lives after
    `linger_s`). Returns (CPU s of the whole tree, stdout, stderr, exit code): the cgroup's count where one can be
    made (CpuGroup), else RUSAGE_CHILDREN's, which misses the CPU of processes reaped by nobody (Ray's workers).
    Call it in a process with no other children: RUSAGE_CHILDREN counts every child this process has reaped.
    With a cgroup and a `samples` list, a thread appends (time.time(), the tree's CPU s so far) every SAMPLE_S
    while the command runs (this process is outside the group: its sampling is not counted), and with a `roles`
    list, every ROLE_EVERY samples, (time.time(), {role: CPU s so far}) by process (ProcessRoles)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    group = CpuGroup.make(f"bench-pipeline-cost-{os.getpid()}")
    c0 = children_cpu_s()
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=group.enter if group is not None else None,
    )
    sampler = None
    if group is not None and samples is not None:
        import threading

        by_process = ProcessRoles(group) if roles is not None else None

        def sample() -> None:
            for i in itertools.count():
                if proc.poll() is not None:
                    break
                samples.append((time.time(), group.cpu_s()))
                if by_process is not None and i % ROLE_EVERY == 0:
                    by_process.sample()
                time.sleep(SAMPLE_S)
            if by_process is not None and roles is not None:
                roles.extend(by_process.samples)

        sampler = threading.Thread(target=sample, name="cpu-sampler", daemon=True)
        sampler.start()
    out, err = proc.communicate()
    if sampler is not None:
        sampler.join()
    deadline = time.monotonic() + linger_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break  # nothing left to reap
        if pid:
            continue
        if time.monotonic() > deadline:
            for p in _live_children():
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
    if group is None:
        return children_cpu_s() - c0, out, err, proc.returncode
    cpu = group.cpu_s()
    group.remove()
    return cpu, out, err, proc.returncode


def driver(spec: dict) -> dict:
    """One run in this (fresh) process: the summary's figures."""
    from pipeline.config import RunConfig
    from pipeline.engine import run

    cfg = RunConfig(
        input=spec["input"],
        output=spec["output"],
        model=spec["model"],
        num_gpus=0,
        progress=False,
        cpus_per_actor=spec.get("cpus_per_actor"),
    )
    started_at = time.time()  # run()'s own t0 is taken a few ms later: its timings count from there
    summary = run(cfg, log=lambda m: print(m, file=sys.stderr))
    import ray

    from pipeline.engine.ray_wiring import place

    placed = place(cfg, ray)  # what the run placed: the cores its embed actors reserve are not decoding's
    slots = int(ray.cluster_resources().get("CPU", 1) - placed.actors * placed.cpus_per_actor)
    ray.shutdown()
    return {
        "status": summary["status"],
        "ok": summary["counts"]["ok"],
        "audio_s": summary["audio_hours"] * 3600,
        "wall_s": summary["wall_s"],
        "timings": summary["timings"],
        "started_at": started_at,
        "decode_slots": slots,
        "actor_threads": placed.threads,
    }


def model_cost(spec: dict) -> dict:
    """The tiny model's own CPU per audio second, in this (fresh) process: what the embed actor's model calls
    cost for the same segments (full windows at the model's rate, the run's batch size, the actor's torch
    threads), without the pipeline around them. Counts this process's threads (RUSAGE_SELF)."""
    import numpy as np
    import torch

    from pipeline.config import RunConfig
    from pipeline.embed import Embedder
    from pipeline.models import load_model

    torch.set_num_threads(spec["threads"])
    loaded = load_model(spec["model"])
    emb = Embedder(loaded, device="cpu")
    window = int(round(loaded.spec.default_window_s * loaded.spec.sample_rate))
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(window)).astype(np.float32) for _ in range(spec["segments"])]
    batch = RunConfig(input="in", output="out").batch_size  # the run's default
    emb.embed_segments(waves[:batch], batch_size=batch)  # warm-up: first calls allocate
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    emb.embed_segments(waves, batch_size=batch)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    audio = len(waves) * loaded.spec.default_window_s
    return {"cpu_s_per_audio_s": cpu / audio, "threads": spec["threads"], "segments": len(waves)}


def floor_driver(spec: dict) -> dict:
    """Ray's own start, run and stop in this (fresh) process, shaped like a pipeline run (engine.ray_wiring.Flow):
    the run's Ray options, `spec["blocks"]` items through tasks (one CPU each, one at a time as on 2 cores) that
    each pass theirs to one one-CPU actor and return its answer, both identity functions, each task's result taken
    at the driver as it finishes. Times count from before Ray's import, as a run's count from run()'s start."""
    from pipeline.config import RunConfig
    from pipeline.engine.ray_wiring import connect

    started_at = time.time()
    connect(RunConfig(input="in", output="out"), log=lambda m: print(m, file=sys.stderr))
    ready_s = time.time() - started_at
    import ray

    actor = ray.remote(num_cpus=PIPELINE_CPUS_PER_ACTOR)(_Identity).remote()
    task = ray.remote(num_cpus=1)(_through_actor)
    first, blocks = None, 0
    for i in range(spec["blocks"]):
        ray.get(task.remote(i, actor))
        blocks += 1
        first = first if first is not None else time.time() - started_at
    wall = time.time() - started_at
    ray.shutdown()
    return {
        "blocks": blocks,
        "ray_ready_s": round(ready_s, 3),
        "first_block_s": first,
        "wall_s": round(wall, 3),
    }


def _through_actor(i: int, actor):
    import pyarrow as pa
    import ray

    return ray.get(actor.echo.remote(pa.table({"i": [i]})))


class _Identity:
    def echo(self, batch):
        return batch


def measure_floor(runs: int = FLOOR_RUNS, blocks: int = FLOOR_BLOCKS) -> dict:
    """The Ray floor: `runs` fresh `--floor` processes, each measured like a pipeline run (the whole
    tree's CPU through a cgroup). Their figures and means."""
    got = [
        _in_fresh_process("--measure-floor", {"blocks": blocks}, "tree_cpu_s", "the Ray floor run")
        for _ in range(runs)
    ]
    for g in got:
        if g["run"]["blocks"] != blocks:
            raise RuntimeError(f"the Ray floor run delivered {g['run']['blocks']} of {blocks} blocks: {g}")
    return {
        "runs": [{"tree_cpu_s": g["tree_cpu_s"], **g["run"]} for g in got],
        "cpu_s": round(sum(g["tree_cpu_s"] for g in got) / runs, 2),
        "first_block_s": round(sum(g["run"]["first_block_s"] for g in got) / runs, 2),
    }


def over_floor(fixed_cpu_s: float, first_block_s: float | None, floor: dict | None) -> dict:
    """A run's start-up figures less the Ray floor: the pipeline's own share (None without a floor)."""
    if not floor:
        return {"fixed_over_floor_cpu_s": None, "first_block_over_floor_s": None}
    return {
        "fixed_over_floor_cpu_s": round(fixed_cpu_s - floor["cpu_s"], 2),
        "first_block_over_floor_s": round(first_block_s - floor["first_block_s"], 2)
        if first_block_s is not None
        else None,
    }


def measure_model_cost(model: str, threads: int, segments: int = 96) -> dict:
    spec = {"model": model, "threads": threads, "segments": segments}
    return _in_fresh_process("--model-cost", spec, "cpu_s_per_audio_s", "the model cost run")


def _in_fresh_process(flag: str, spec: dict, first_key: str, what: str) -> dict:
    """`python -m benchmarks.pipeline_cost FLAG SPEC` in a fresh process (no RAY_ADDRESS: each run starts its own
    local Ray): the last JSON line it prints whose first key is `first_key`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.pipeline_cost", flag, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith(f'{{"{first_key}"')]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed: {proc.stderr.strip()[-3000:]}")
    return json.loads(lines[-1])


def one_run(files: list[Path], model: str, work: Path, tag: str) -> dict:
    """A run on `files` (hard linked into a fresh folder), measured by a fresh `--measure` process."""
    import shutil

    inp, out = work / f"in-{tag}", work / f"table-{tag}"
    for p in (inp, out):
        shutil.rmtree(p, ignore_errors=True)
    inp.mkdir(parents=True)
    for i, f in enumerate(files):
        os.link(f, inp / f"{i:03d}_{f.name}")
    spec = {"input": str(inp), "output": str(out), "model": model, "cpus_per_actor": PIPELINE_CPUS_PER_ACTOR}
    r = _in_fresh_process("--measure", spec, "tree_cpu_s", f"pipeline run {tag}")
    if r["run"]["status"] != "complete" or r["run"]["ok"] != len(files):
        raise RuntimeError(f"pipeline run {tag} did not embed every input: {r}")
    shutil.rmtree(out, ignore_errors=True)
    return r


def cpu_at(samples: list[tuple[float, float]], t: float) -> float:
    """The tree's CPU s at wall time `t`, linearly between the two samples around it."""
    if not samples or not samples[0][0] <= t <= samples[-1][0]:
        raise ValueError(f"no CPU samples around {t} (sampled {samples[0][0] if samples else None} onwards)")
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if t0 <= t <= t1:
            return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
    return samples[-1][1]


def steady_window(samples: list[tuple[float, float]], run: dict, roles: list | None = None) -> dict:
    """The whole tree's CPU between the run's first and last embedded block at the driver, and the segment audio
    delivered after the first block (the same window as `timings.steady_audio_s_per_s`): no start-up, model load
    or final commit inside it. With `roles` (measure_tree's), the same window's CPU by role too."""
    tm = run["timings"]
    if "first_output_s" not in tm or tm.get("last_output_s", 0.0) <= tm["first_output_s"]:
        raise ValueError(f"the run delivered fewer than two blocks: {tm}")
    start, end = run["started_at"] + tm["first_output_s"], run["started_at"] + tm["last_output_s"]
    window = {
        "cpu_s": round(cpu_at(samples, end) - cpu_at(samples, start), 3),
        "audio_s": tm["steady_audio_s"],
        "wall_s": round(end - start, 3),
    }
    if roles:
        names = sorted({name for _, by_role in roles for name in by_role})
        window["by_role_cpu_s"] = {}
        for name in names:
            series = [(t, by_role.get(name, 0.0)) for t, by_role in roles]
            try:
                window["by_role_cpu_s"][name] = round(cpu_at(series, end) - cpu_at(series, start), 3)
            except ValueError:  # the window runs past the role samples: no per-role figure for this run
                window.pop("by_role_cpu_s")
                break
    return window


def role_marginals(small: dict, big: dict) -> dict[str, float] | None:
    """steady_marginal by role (CPU ms per audio s), and `not attributed`: the tree's marginal less their sum
    (what processes spent after their last role sample, and the sampling's coarser ends)."""
    ws, wb = small.get("window") or {}, big.get("window") or {}
    if "by_role_cpu_s" not in ws or "by_role_cpu_s" not in wb:
        return None
    audio = wb["audio_s"] - ws["audio_s"]
    out = {
        name: round(
            1000 * (wb["by_role_cpu_s"].get(name, 0.0) - ws["by_role_cpu_s"].get(name, 0.0)) / audio, 4
        )
        for name in sorted(set(ws["by_role_cpu_s"]) | set(wb["by_role_cpu_s"]))
    }
    out = dict(sorted(out.items(), key=lambda kv: -kv[1]))
    out["not attributed"] = round(1000 * steady_marginal(small, big) - sum(out.values()), 4)
    return out


def steady_marginal(small: dict, big: dict) -> float:
    """CPU s per audio s through the two runs' steady windows: what one more audio second costs once the run is
    going, every process counted. The difference cancels what both windows share: decoding that ran before the
    first block for audio delivered after it, and any tail of start-up inside the window."""
    ws, wb = small["window"], big["window"]
    return (wb["cpu_s"] - ws["cpu_s"]) / (wb["audio_s"] - ws["audio_s"])


def fit(small: dict, big: dict) -> tuple[float, float]:
    """(marginal CPU s per audio s, fixed CPU s per run) through the two runs."""
    a1, c1 = small["run"]["audio_s"], small["tree_cpu_s"]
    a2, c2 = big["run"]["audio_s"], big["tree_cpu_s"]
    marginal = (c2 - c1) / (a2 - a1)
    return marginal, c1 - marginal * a1


def pipeline_section(corpus: list[Path], stage_rows: list[dict], work: Path, n: int) -> dict:
    """Per format of the CPU section: the two runs, the marginal and fixed cost, steady rate vs capacity."""
    from benchmarks.cpu_stage import EXEMPT
    from pipeline.checkpoints import write_random_checkpoint

    model = work / f"tiny-MERT-v1-95M-conv{PIPELINE_CONV_DIM}"
    if not (model / "preprocessor_config.json").is_file():
        write_random_checkpoint(
            model,
            like="MERT-v1-95M",
            size="tiny",
            config_overrides={"conv_dim": [PIPELINE_CONV_DIM] * 7},
        )
    by_format = {r["format"]: r for r in stage_rows}
    rows = []
    # The model's own share of the marginal, measured once (format-independent), first: its full load also marks
    # the checkpoint as loaded on this node, so no run below pays the driver's build of it and the others not
    # (pipeline.models, check_only). Threads: the runs' actor's (PIPELINE_CPUS_PER_ACTOR); again if a run placed others.
    model_cpu = measure_model_cost(str(model), int(PIPELINE_CPUS_PER_ACTOR))
    floor = measure_floor()
    for path in corpus:
        fmt = path.name.split("_")[0]
        stage = by_format[fmt]
        small = one_run([path] * n, str(model), work, f"{fmt}-{n}")
        big = one_run([path] * (3 * n), str(model), work, f"{fmt}-{3 * n}")
        whole_run_marginal, _ = fit(small, big)
        if small.get("window") and big.get("window"):
            marginal, marginal_from = steady_marginal(small, big), "steady windows"
        else:  # no cgroup to sample: the whole runs' fit, which carries each run's fixed-cost noise
            marginal, marginal_from = whole_run_marginal, "whole runs"
        fixed_runs = [r["tree_cpu_s"] - marginal * r["run"]["audio_s"] for r in (small, big)]
        fixed = sum(fixed_runs) / 2
        if model_cpu["threads"] != big["run"]["actor_threads"]:
            model_cpu = measure_model_cost(str(model), big["run"]["actor_threads"])
        limit = stage["cpu_s_per_audio_s"]["limit"]
        beside = marginal - model_cpu["cpu_s_per_audio_s"]  # the pipeline's own: decode, Ray, driver, writers
        slots = big["run"]["decode_slots"]
        capacity = slots / stage["cpu_s_per_audio_s"]["isolated"]
        steady = big["run"]["timings"].get("steady_audio_s_per_s")
        first_block = big["run"]["timings"].get("first_output_s")
        rows.append(
            {
                "format": fmt,
                "files": [n, 3 * n],
                "audio_s": [round(small["run"]["audio_s"], 1), round(big["run"]["audio_s"], 1)],
                "tree_cpu_s": [round(small["tree_cpu_s"], 2), round(big["tree_cpu_s"], 2)],
                "marginal_from": marginal_from,
                "window_cpu_s": [(r.get("window") or {}).get("cpu_s") for r in (small, big)],
                "window_audio_s": [(r.get("window") or {}).get("audio_s") for r in (small, big)],
                "whole_run_fit_cpu_ms_per_audio_s": round(1000 * whole_run_marginal, 4),
                "marginal_cpu_ms_per_audio_s": round(1000 * marginal, 4),
                "marginal_audio_s_per_cpu_s": round(1 / marginal, 1) if marginal > 0 else None,
                "limit_audio_s_per_cpu_s": round(1 / limit, 1),
                "isolated_audio_s_per_cpu_s": round(1 / stage["cpu_s_per_audio_s"]["isolated"], 1),
                "marginal_over_limit": round(marginal / limit, 3),
                "model_cpu_ms_per_audio_s": round(1000 * model_cpu["cpu_s_per_audio_s"], 4),
                "beside_model_over_limit": round(beside / limit, 3),
                "marginal_by_role_cpu_ms_per_audio_s": role_marginals(small, big),
                "fixed_cpu_s": round(fixed, 2),
                "fixed_cpu_s_runs": [round(f, 2) for f in fixed_runs],
                **over_floor(fixed, first_block, floor),
                "decode_slots": slots,
                "capacity_audio_s_per_s": round(capacity, 1),
                "steady_audio_s_per_s": steady,
                "steady_over_capacity": round(steady / capacity, 3) if steady else None,
                "start_up": {
                    k: big["run"]["timings"].get(k)
                    for k in ("ray_ready_s", "first_output_s", "last_output_s")
                },
                "wall_s": [small["run"]["wall_s"], big["run"]["wall_s"]],
            }
        )
    judged = [r for r in rows if r["format"] not in EXEMPT]
    goals = {
        "marginal_over_limit_max": max(r["marginal_over_limit"] for r in judged),
        "beside_model_over_limit_max": max(r["beside_model_over_limit"] for r in judged),
        "fixed_cpu_s_max": max(r["fixed_cpu_s"] for r in judged),
        "steady_over_capacity_min": min(r["steady_over_capacity"] or 0.0 for r in judged),
        "first_output_s_max": max(r["start_up"]["first_output_s"] or 0.0 for r in rows),
        "fixed_over_floor_cpu_s_max": max(r["fixed_over_floor_cpu_s"] for r in judged),
        "first_block_over_floor_s_max": max(r["first_block_over_floor_s"] or 0.0 for r in rows),
    }
    goals["met"] = {
        "marginal": goals["marginal_over_limit_max"] <= GOAL_MARGINAL_OVER_LIMIT,
        "fixed": goals["fixed_cpu_s_max"] <= GOAL_FIXED_CPU_S,
        "steady": goals["steady_over_capacity_min"] >= GOAL_STEADY_OVER_CAPACITY,
        "first_block_5s": goals["first_output_s_max"] <= 5.0,
    }
    return {
        "files": [n, 3 * n],
        "model": str(model),
        "model_cost": model_cpu,
        "floor": floor,
        "formats": rows,
        "goals": goals,
    }


def print_pipeline_section(section: dict) -> None:
    print(
        f"{'format':<6} {'limit x':>8} {'stage x':>8} {'pipeline x':>10} {'pipe/limit':>10} {'-model/limit':>12} "
        f"{'fixed CPU s':>11} {'-floor':>7} "
        f"{'steady':>7} {'capacity':>9} {'st/cap':>7} {'first block s':>13} {'-floor':>7}"
    )
    for r in section["formats"]:
        print(
            f"{r['format']:<6} {r['limit_audio_s_per_cpu_s']:>8} {r['isolated_audio_s_per_cpu_s']:>8} "
            f"{r['marginal_audio_s_per_cpu_s']!s:>10} {r['marginal_over_limit']:>10} "
            f"{r['beside_model_over_limit']:>12} {r['fixed_cpu_s']:>11} {r['fixed_over_floor_cpu_s']!s:>7} "
            f"{r['steady_audio_s_per_s']!s:>7} {r['capacity_audio_s_per_s']:>9} {r['steady_over_capacity']!s:>7} "
            f"{r['start_up']['first_output_s']!s:>13} {r['first_block_over_floor_s']!s:>7}"
        )
    mc = section.get("model_cost") or {}
    if mc:
        print(
            f"the tiny model alone: {1000 * mc['cpu_s_per_audio_s']:.3f} CPU ms per audio s ({mc['threads']} torch "
            "thread(s), one process); -model/limit: the marginal less that, over the limit"
        )
    fl = section.get("floor")
    if fl:
        print(
            f"the Ray floor ({len(fl['runs'])} runs: a local Ray, tasks passing items to one actor, "
            f"identity functions, {fl['runs'][0]['blocks']} blocks): {fl['cpu_s']} CPU s, first block at "
            f"{fl['first_block_s']} s (runs: "
            + ", ".join(f"{r['tree_cpu_s']} CPU s / {r['first_block_s']:.2f} s" for r in fl["runs"])
            + "); -floor: a run's figure less that"
        )
    for r in section["formats"]:
        if r.get("marginal_by_role_cpu_ms_per_audio_s"):
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r["marginal_by_role_cpu_ms_per_audio_s"].items())
            print(f"{r['format']} marginal by process, CPU ms per audio s: {parts}")
    froms = sorted({r["marginal_from"] for r in section["formats"]})
    print(
        f"pipeline x: the marginal through the {' / '.join(froms)}; the whole runs' fit beside it, ms per audio s: "
        + ", ".join(f"{r['format']} {r['whole_run_fit_cpu_ms_per_audio_s']}" for r in section["formats"])
    )
    print(f"goals: {section['goals']}")


def main(argv: list[str]) -> int:
    if argv[:1] in (["--measure"], ["--measure-floor"]):  # the subreaper around one driver, or one floor run
        inner = "--driver" if argv[0] == "--measure" else "--floor"
        cmd = [sys.executable, "-m", "benchmarks.pipeline_cost", inner, argv[1]]
        samples: list[tuple[float, float]] = []
        roles: list = []
        cpu, out, err, rc = measure_tree(cmd, dict(os.environ), str(ROOT), samples=samples, roles=roles)
        sys.stderr.write(err[-6000:])
        runs = [x for x in out.splitlines() if x.startswith('{"run"')]
        if rc != 0 or not runs:
            return rc or 1
        result = json.loads(runs[-1])
        window = None
        if inner == "--driver":
            try:  # no window without samples (no cgroup) or with fewer than two blocks: the whole runs' fit
                window = steady_window(samples, result["run"], roles) if samples else None
            except ValueError as exc:
                print(f"no steady window: {exc}", file=sys.stderr)
        print(json.dumps({"tree_cpu_s": round(cpu, 3), **result, "window": window}), flush=True)
        return 0
    if argv[:1] == ["--floor"]:
        print(json.dumps({"run": floor_driver(json.loads(argv[1]))}), flush=True)
        return 0
    if argv[:1] == ["--model-cost"]:
        print(json.dumps(model_cost(json.loads(argv[1]))), flush=True)
        return 0
    if argv[:1] == ["--driver"]:
        print(json.dumps({"run": driver(json.loads(argv[1]))}), flush=True)
        return 0
    raise SystemExit("run through `python -m benchmarks.run --section cpu`")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
