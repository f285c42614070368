"""The benchmark harness: one command, one corpus, one model, every figure.

    .venv/bin/python -m benchmarks.run                          # random MERT-v1-95M, 2 x 3-minute MP3 tracks
    .venv/bin/python -m benchmarks.run --model DIR --corpus FOLDER --out results.json
    .venv/bin/python -m benchmarks.run --section cpu            # the CPU stage per format, alone (~2.5 minutes)
    .venv/bin/python -m benchmarks.run --section model --like MERT-v1-330M --device cuda --dtype bfloat16
    .venv/bin/python -m benchmarks.run --section table          # the table, before/after (issue 11; ~7 minutes)

On the same corpus and model it measures, in audio seconds per wall second:
  model_only   Embedder.embed on pre-decoded equal-length 5 s segments, batch B, after a warm-up batch, with the
               torch thread count the pipeline's actor gets (pipeline.engine.place);
  cpu_stage    read + decode + resample + segment (pipeline.audio.read_segments, isolate=True) on one torch
               thread, per CPU second of this process and the decoder child (= per core), and per wall second;
  pipeline     pipeline.engine.run through Ray to Parquet on a fresh table: end to end (audio s / wall s of the
               whole run, Ray start-up and model load included) and steady (between the first and the last
               embedded block reaching the driver, so without Ray start-up, the actor's model load and the first
               batch);
  naive        the model card's recipe (benchmarks/naive.py) on each whole file;
  cpu_formats  the CPU stage per format (MP3, FLAC, Vorbis, Opus, M4A, WAV; 3-minute stereo files) against its decode
               limit, isolation's cost and the worker + child USS, as ratios measured in one run (benchmarks.cpu_stage;
               alone with --section cpu);
and peak memory for a short and a long input (1 vs 60 minutes by default): the CPU-stage worker (a fresh process
through pipeline.stages.decode_input, isolate=True, plus its decoder child) and the whole pipeline run's process
tree (driver, Ray's processes, decode workers, the actor; PSS summed, sampled with psutil; the long run is stopped
after a time box). It prints pipeline / model-only and pipeline / naive, checks the goals, and writes JSON.

With CUDA it adds the GPU figures (model-only and pipeline in float32 and bfloat16, naive in float32) and the model
FLOP utilization: FLOPs per audio second from config.json (benchmarks.common.flops_per_audio_second) times audio
seconds per second, over the card's peak (benchmarks.common.PEAK_TFLOPS).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np

from benchmarks.common import (
    CACHE,
    TreeMemory,
    audio_files,
    ensure_corpus,
    ensure_long_file,
    ensure_model,
    flops_per_audio_second,
    machine,
    peak_flops,
    versions,
)
from benchmarks.cpu_stage import cpu_section, ensure_cpu_corpus, print_cpu_section
from benchmarks.pipeline_cost import pipeline_section, print_pipeline_section

GOAL_FED = 0.85  # pipeline >= 0.85 x model-only
GOAL_MEMORY = 1.5  # peak memory, long input <= 1.5 x short input


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def actor_threads(cpus: int | None = None) -> int:
    """The torch thread count pipeline.engine.place gives a CPU embed actor on a local Ray of `cpus` cores."""
    from pipeline.config import RunConfig
    from pipeline.engine import place

    class _Cluster:  # what place() reads of Ray: the cluster's resources (a local Ray: every core, no GPU)
        @staticmethod
        def cluster_resources() -> dict:
            return {"CPU": float(cpus or os.cpu_count() or 1)}

    return place(RunConfig(input="-", output="-", num_gpus=0), _Cluster).threads


# ---- 1. model only ---------------------------------------------------------------------------------------------
def decoded_segments(files: list[Path], sample_rate: int, window_s: float, count: int) -> np.ndarray:
    """Up to `count` full-length segments of the corpus, decoded up front: (count, window samples) float32."""
    from pipeline.audio import read_segments
    from pipeline.config import SegmentConfig

    n = int(round(window_s * sample_rate))
    out = []
    for path in files:
        with read_segments(
            str(path), sample_rate=sample_rate, segments=SegmentConfig(window_s=window_s), isolate=False
        ) as stream:
            for seg in stream:
                if len(seg.samples) == n:
                    out.append(seg.samples)
                if len(out) >= count:
                    return np.stack(out)
    if not out:
        raise SystemExit(f"the corpus has no full {window_s} s segment to time the model on")
    return np.stack(out)


class ModelOnly:
    """Embedder.embed on batches of `batch_size` equal-length segments (cycling through `segments`), all layers,
    segment granularity: one warm-up batch at construction, then `timed(n)` adds n timed batches. The harness
    times half before and half after the pipeline run, so that a slow or fast spell of the machine weighs on both
    sides of the ratio."""

    def __init__(
        self,
        model_dir: Path,
        segments: np.ndarray,
        batch_size: int,
        *,
        threads: int | None,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        import torch

        from pipeline.embed import Embedder
        from pipeline.models import load_model

        if threads and device == "cpu":
            torch.set_num_threads(threads)
        t = time.perf_counter()
        loaded = load_model(str(model_dir))
        self.emb = Embedder(loaded, device=device, dtype=dtype)
        self.load_s = time.perf_counter() - t
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.segments = segments  # (n, N)
        self.seg_s = segments.shape[1] / loaded.spec.sample_rate
        self.times: list[float] = []
        self.phases: list[tuple[int, int]] = []  # (first, last + 1) index into times per call of timed()
        self._next = 0
        self.warm_s = self._batch()

    def _batch(self) -> float:
        import torch

        n = len(self.segments)
        idx = [(self._next + i) % n for i in range(self.batch_size)]
        self._next = (self._next + self.batch_size) % n
        x = self.segments[idx]  # (B, N)
        on_cuda = self.emb.device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = self.emb.embed(x)
        if on_cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if not np.isfinite(out).all():
            raise RuntimeError("the model gave non-finite features on the benchmark segments")
        return dt

    def timed(self, batches: int) -> None:
        first = len(self.times)
        self.times += [self._batch() for _ in range(batches)]
        self.phases.append((first, len(self.times)))

    def result(self) -> dict:
        import torch

        per_batch = self.batch_size * self.seg_s
        wall = sum(self.times)
        out = {
            "device": str(self.emb.device),
            "dtype": self.dtype,
            "threads": torch.get_num_threads() if self.device == "cpu" else None,
            "batch_size": self.batch_size,
            "segment_s": round(self.seg_s, 3),
            "timed_batches": len(self.times),
            "audio_s": round(per_batch * len(self.times), 2),
            "wall_s": round(wall, 3),
            "audio_s_per_s": round(per_batch * len(self.times) / wall, 3),
            "audio_s_per_s_by_phase": [
                round(per_batch * (b - a) / sum(self.times[a:b]), 3) for a, b in self.phases if b > a
            ],
            "seconds_per_batch": [round(x, 3) for x in self.times],
            "warmup_batch_s": round(self.warm_s, 3),
            "model_load_s": round(self.load_s, 2),
        }
        return out

    def close(self) -> None:
        import torch

        on_cuda = self.emb.device.type == "cuda"
        del self.emb
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()


def model_only(
    model_dir: Path,
    segments: np.ndarray,
    batch_size: int,
    batches: int,
    *,
    threads: int | None,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """ModelOnly in one go: a warm-up batch, then `batches` timed ones."""
    m = ModelOnly(model_dir, segments, batch_size, threads=threads, device=device, dtype=dtype)
    try:
        m.timed(batches)
        return m.result()
    finally:
        m.close()


# ---- 2. the CPU stage ------------------------------------------------------------------------------------------
def _cpu_seconds(pid: int | None) -> float:
    import psutil

    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def cpu_stage(files: list[Path], sample_rate: int, window_s: float) -> dict:
    """read_segments(isolate=True) over every file with torch on one thread, as a decode task runs it: audio
    seconds per wall second, and per CPU second of this process plus the decoder child (the per-core rate)."""
    import torch

    from pipeline.audio import DecoderProcess, read_segments
    from pipeline.config import SegmentConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seg = SegmentConfig(window_s=window_s)
    dec = DecoderProcess()
    try:
        with read_segments(str(files[0]), sample_rate=sample_rate, segments=seg, decoder=dec) as stream:
            for (
                _
            ) in stream:  # start the child outside the timing (a worker reuses it across inputs); a stream
                pass  # abandoned midway stops the child, and the timed loop would pay for a new one
        audio = segments = 0
        cpu0, child0, t0 = time.process_time(), _cpu_seconds(dec.pid), time.perf_counter()
        for path in files:
            with read_segments(str(path), sample_rate=sample_rate, segments=seg, decoder=dec) as stream:
                segments += sum(1 for _ in stream)
            audio += stream.info.duration_s or 0.0
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0 + _cpu_seconds(dec.pid) - child0
    finally:
        dec.close()
        torch.set_num_threads(threads)
    return {
        "audio_s": round(audio, 2),
        "segments": segments,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "audio_s_per_s": round(audio / wall, 2),
        "audio_s_per_cpu_s": round(audio / cpu, 2),
        "isolate": True,
        "torch_threads": 1,
    }


# ---- 3. the pipeline -------------------------------------------------------------------------------------------
def pipeline_run(
    corpus: Path,
    model_dir: Path,
    work: Path,
    *,
    batch_size: int,
    device: str = "cpu",
    compute_dtype: str = "float32",
    extra: dict | None = None,
) -> dict:
    """pipeline.engine.run on the corpus into a fresh table. When Ray is not running yet, the run starts it (and
    the figure includes it), and it is shut down afterwards."""
    import ray

    from pipeline.config import RunConfig
    from pipeline.engine import run

    out = work / f"table-{uuid.uuid4().hex[:8]}"
    cfg = RunConfig(
        input=str(corpus),
        output=str(out),
        model=str(model_dir),
        batch_size=batch_size,
        num_gpus=0 if device == "cpu" else None,
        compute_dtype=compute_dtype,
        progress=True,
        commit_interval_s=3600.0,
        **(extra or {}),
    )
    started_ray = not ray.is_initialized()
    t = time.perf_counter()
    summary = run(cfg, log=lambda m: log("  " + m))
    wall = time.perf_counter() - t
    if started_ray:
        ray.shutdown()
    audio = summary["audio_hours"] * 3600
    timings = summary.get("timings") or {}
    return {
        "device": device,
        "compute_dtype": compute_dtype,
        "batch_size": batch_size,
        "ray_started_here": started_ray,
        "inputs_ok": summary["counts"]["ok"],
        "inputs": summary["counts"]["processed"],
        "audio_s": round(audio, 2),
        "wall_s": round(wall, 2),
        "audio_s_per_s": round(audio / wall, 3),
        "steady_audio_s_per_s": timings.get("steady_audio_s_per_s"),
        "timings": timings,
        "device_name": summary["provenance"].get("device"),
        "table": str(out),
    }


# ---- 5. memory -------------------------------------------------------------------------------------------------
_WORKER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from pipeline import stages
    from pipeline.config import SegmentConfig
    from pipeline.audio import default_decoder

    def hwm(pid="self"):  # peak RSS of a live process, MB (VmHWM: unlike ru_maxrss, not inherited across exec)
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    rows = 0
    for table in stages.decode_input(sys.argv[1], sys.argv[1], "", sample_rate=int(sys.argv[2]),
                                     segments=SegmentConfig(window_s=float(sys.argv[3])), isolate=True):
        rows += table.num_rows
    child = hwm(default_decoder().pid)  # the child decode_input used: this thread's, reused across inputs
    print(json.dumps({"rows": rows, "worker_peak_rss_mb": hwm(), "decoder_peak_rss_mb": child}))
    default_decoder().close()
""")


def worker_memory(path: Path, sample_rate: int, window_s: float) -> dict:
    """Peak RSS (VmHWM) of a fresh CPU-stage worker decoding `path` as a decode task does (stages.decode_input,
    which runs read_segments with isolate=True), and of its decoder child; their sum bounds the pair's peak. The
    pair's PSS and RSS, sampled every 0.1 s, come along under "sampled"."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(path), str(sample_rate), str(window_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=root,
    )
    with TreeMemory(proc.pid, interval_s=0.1) as mem:
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the CPU-stage memory probe failed on {path}: {stderr.strip()[-2000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    r = {k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
    r["worker_plus_decoder_peak_rss_mb"] = round(r["worker_peak_rss_mb"] + r["decoder_peak_rss_mb"], 1)
    r["sampled"] = mem.peak()
    r["wall_s"] = round(time.perf_counter() - t, 1)
    return r


def tree_memory(path: Path, model_dir: Path, work: Path, *, batch_size: int, time_box_s: float) -> dict:
    """Peak memory of a whole pipeline run on one input, in a fresh process (its own local Ray): the PSS and RSS
    sums of the process tree, sampled with psutil. A run still going after `time_box_s` seconds is interrupted
    (SIGINT: the run releases its lease and Ray shuts down), and whatever is left of the tree is killed."""
    import psutil

    out = work / f"tree-{uuid.uuid4().hex[:8]}"
    spec = {"input": str(path), "output": str(out), "model": str(model_dir), "batch_size": batch_size}
    root = str(Path(__file__).resolve().parent.parent)
    logf = work / f"{out.name}.log"
    t = time.perf_counter()
    with open(logf, "w") as lf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.run", "--pipeline-child", json.dumps(spec)],
            stdout=lf,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
        finished = True
        with TreeMemory(proc.pid, interval_s=0.2) as mem:
            try:
                proc.wait(timeout=time_box_s)
            except subprocess.TimeoutExpired:
                finished = False
        elapsed = time.perf_counter() - t
        if not finished:  # SIGINT first (the run releases its lease), then SIGTERM, then the whole tree
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
    for pid in mem.pids - {proc.pid}:  # leftovers of the run we started (Ray's processes), by their ids
        try:
            p = psutil.Process(pid)
            if p.is_running():
                p.kill()
        except psutil.Error:
            pass
    text = logf.read_text()
    summary = None
    for line in text.splitlines():
        if line.startswith('{"child_summary"'):
            summary = json.loads(line)["child_summary"]
    if finished and (proc.returncode != 0 or summary is None):
        raise RuntimeError(f"the pipeline memory run on {path} failed: {text[-3000:]}")
    return {
        "finished": finished,
        "time_box_s": time_box_s,
        "elapsed_s": round(elapsed, 1),
        "audio_s_done": summary["audio_s"] if summary else None,
        **mem.peak(),
        "pss_mb_series": mem.series,
    }


def _pipeline_child(spec_json: str) -> None:
    """Entry of the tree-memory runs: one pipeline run from a JSON spec; prints its summary as one JSON line."""
    from pipeline.config import RunConfig
    from pipeline.engine import run

    spec = json.loads(spec_json)
    cfg = RunConfig(**spec, progress=True, commit_interval_s=3600.0, num_gpus=0)
    try:
        summary = run(cfg, log=log)
    except KeyboardInterrupt:
        log("[bench] interrupted at the time box")
        return
    print(
        json.dumps(
            {
                "child_summary": {
                    "audio_s": round(summary["audio_hours"] * 3600, 2),
                    "wall_s": summary["wall_s"],
                    "timings": summary.get("timings"),
                }
            }
        ),
        flush=True,
    )


# ---- GPU ------------------------------------------------------------------------------------------------------
def gpu_figures(
    args, model_dir: Path, corpus: Path, files: list[Path], segments: np.ndarray, cpu: dict, work: Path
) -> dict:
    """The same figures on the GPU, and the model FLOP utilization per compute dtype."""
    import torch

    name = torch.cuda.get_device_name(0)
    cfg = _config(model_dir)
    sr = int(cfg.get("sample_rate") or 24000)
    flops = flops_per_audio_second(cfg, sr, args.window)
    gpus = torch.cuda.device_count()
    # CPU-stage capacity of this machine: every core not reserved by a GPU actor (one CPU each) decoding
    decode_cores = max(1, (os.cpu_count() or 1) - gpus)
    capacity = cpu["audio_s_per_cpu_s"] * decode_cores
    out = {
        "device_name": name,
        "gpus": gpus,
        "flops_per_audio_s": flops,
        "decode_cores": decode_cores,
        "cpu_stage_capacity_audio_s_per_s": round(capacity, 1),
        "by_dtype": {},
    }
    for dtype in ("float32", "bfloat16"):
        log(f"[bench] GPU model only, {dtype}, batch {args.gpu_batch_size}")
        m = model_only(
            model_dir,
            segments,
            args.gpu_batch_size,
            args.gpu_batches,
            threads=None,
            device="cuda",
            dtype=dtype,
        )
        peak = peak_flops(name, dtype)
        achieved = m["audio_s_per_s"] * flops["total"]
        m["achieved_tflops"] = round(achieved / 1e12, 2)
        m["peak_tflops"] = peak / 1e12 if peak else None
        m["mfu"] = round(achieved / peak, 4) if peak else None
        log(f"[bench] GPU pipeline, {dtype}")
        p = pipeline_run(
            corpus, model_dir, work, batch_size=args.gpu_batch_size, device="cuda", compute_dtype=dtype
        )
        bound = min(m["audio_s_per_s"], capacity)
        p["bound_audio_s_per_s"] = round(bound, 2)
        p["bound_by"] = "model" if m["audio_s_per_s"] <= capacity else "cpu_stage"
        p["ratio_to_bound"] = round(p["audio_s_per_s"] / bound, 3)
        p["steady_ratio_to_bound"] = (
            round(p["steady_audio_s_per_s"] / bound, 3) if p["steady_audio_s_per_s"] else None
        )
        p["goal_fed_end_to_end"] = p["ratio_to_bound"] >= GOAL_FED  # >= 0.85 x min(model only, CPU capacity)
        p["goal_fed_steady"] = bool(p["steady_ratio_to_bound"] and p["steady_ratio_to_bound"] >= GOAL_FED)
        out["by_dtype"][dtype] = {"model_only": m, "pipeline": p}
    if not args.skip_naive:
        from benchmarks.naive import naive_throughput

        log("[bench] GPU naive recipe (float32)")
        out["naive"] = naive_throughput(files, model_dir, device="cuda", log=log)
    return out


# ---- the report ------------------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize(result: dict) -> dict:
    """The two ratios (end to end and steady) and the goals, from the figures in `result`."""
    m = (result.get("model_only") or {}).get("audio_s_per_s")
    p = result.get("pipeline") or {}
    n = (result.get("naive") or {}).get("audio_s_per_s")
    e2e, steady = p.get("audio_s_per_s"), p.get("steady_audio_s_per_s")
    ratios = {
        "pipeline_over_model_only": _ratio(e2e, m),
        "pipeline_steady_over_model_only": _ratio(steady, m),
        "pipeline_over_naive": _ratio(e2e, n),
        "pipeline_steady_over_naive": _ratio(steady, n),
    }
    goals = {}
    if ratios["pipeline_over_model_only"] is not None:
        goals["fed_end_to_end"] = ratios["pipeline_over_model_only"] >= GOAL_FED
    if ratios["pipeline_steady_over_model_only"] is not None:
        goals["fed_steady"] = ratios["pipeline_steady_over_model_only"] >= GOAL_FED
    if ratios["pipeline_over_naive"] is not None:
        goals["faster_than_naive"] = ratios["pipeline_over_naive"] > 1.0
    if "cpu_formats" in result:
        goals["cpu_stage_at_decode_limit"] = result["cpu_formats"]["goals"]["met"]
    if "pipeline_cost" in result:
        for k, met in result["pipeline_cost"]["goals"]["met"].items():
            goals[f"pipeline_{k}"] = met
    mem = result.get("memory") or {}
    w = mem.get("worker") or {}
    if "short" in w and "long" in w:
        ratio = w["long"]["worker_plus_decoder_peak_rss_mb"] / w["short"]["worker_plus_decoder_peak_rss_mb"]
        mem["worker_long_over_short"] = round(ratio, 3)
        goals["memory_cpu_stage"] = ratio <= GOAL_MEMORY
    tr = mem.get("tree") or {}
    if "short" in tr and "long" in tr:
        ratio = tr["long"]["peak_pss_mb"] / tr["short"]["peak_pss_mb"]
        hwm = tr["long"]["sum_of_process_peaks_mb"] / tr["short"]["sum_of_process_peaks_mb"]
        mem["tree_long_over_short"] = round(ratio, 3)
        mem["tree_long_over_short_process_peaks"] = round(hwm, 3)
        goals["memory_pipeline_tree"] = max(ratio, hwm) <= GOAL_MEMORY  # both views of the tree's peak
    return {"ratios": ratios, "goals": goals}


def print_report(result: dict) -> None:
    def f(x, unit=""):
        return "-" if x is None else f"{x:g}{unit}"

    if "cpu_formats" in result:
        print_cpu_section(result["cpu_formats"])
    if "pipeline_cost" in result:
        print_pipeline_section(result["pipeline_cost"])
    if result.get("section") == "cpu":
        return
    if result.get("section") == "model":
        m = result["model_only"]
        print(
            f"model only ({result['model']['name']}, batch {m.get('batch_size')}, {m.get('device')} "
            f"{m.get('dtype')}): {m.get('audio_s_per_s')} audio s/s, {m.get('seconds_per_batch')} s per batch",
            flush=True,
        )
        return
    m, c, p, n = (result.get(k) or {} for k in ("model_only", "cpu_stage", "pipeline", "naive"))
    r = result["summary"]["ratios"]
    lines = [
        "",
        f"corpus: {result['corpus']['files']} file(s), {result['corpus']['audio_s']:g} s of audio; "
        f"model {result['model']['name']} ({result['model']['path']})",
        f"model only   {f(m.get('audio_s_per_s'))} audio s/s  (batch {m.get('batch_size')}, "
        f"{m.get('threads')} threads, {f(m.get('achieved_gflops'))} GFLOP/s)",
        f"CPU stage    {f(c.get('audio_s_per_cpu_s'))} audio s per CPU s (per core); "
        f"{f(c.get('audio_s_per_s'))} audio s/s wall",
        f"pipeline     {f(p.get('audio_s_per_s'))} audio s/s end to end ({f(p.get('wall_s'))} s wall); "
        f"steady {f(p.get('steady_audio_s_per_s'))} audio s/s",
        f"naive        {f(n.get('audio_s_per_s'))} audio s/s",
        f"pipeline / model only: {f(r['pipeline_over_model_only'])} end to end, "
        f"{f(r['pipeline_steady_over_model_only'])} steady",
        f"pipeline / naive:      {f(r['pipeline_over_naive'])} end to end, {f(r['pipeline_steady_over_naive'])} steady",
    ]
    mem = result.get("memory") or {}
    for kind in ("short", "long"):
        w = (mem.get("worker") or {}).get(kind)
        t = (mem.get("tree") or {}).get(kind)
        if w or t:
            lines.append(
                f"memory {kind:5s} ({mem.get(kind + '_s'):g} s): CPU-stage worker + decoder "
                f"{f(w and w['worker_plus_decoder_peak_rss_mb'], ' MB')}; pipeline tree PSS "
                f"{f(t and t['peak_pss_mb'], ' MB')} (sum of process peaks "
                f"{f(t and t['sum_of_process_peaks_mb'], ' MB')})"
                + ("" if not t or t["finished"] else f" (stopped at the {t['time_box_s']:g} s time box)")
            )
    if "worker_long_over_short" in mem or "tree_long_over_short" in mem:
        lines.append(
            f"memory long / short: CPU stage {f(mem.get('worker_long_over_short'))}, "
            f"pipeline tree {f(mem.get('tree_long_over_short'))} (PSS), "
            f"{f(mem.get('tree_long_over_short_process_peaks'))} (sum of process peaks)"
        )
    lines.append(
        "goals: "
        + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["summary"]["goals"].items())
    )
    g = result.get("gpu")
    if g:
        for dtype, d in g["by_dtype"].items():
            lines.append(
                f"GPU {g['device_name']} {dtype}: model only {d['model_only']['audio_s_per_s']:g} audio s/s "
                f"(MFU {f(d['model_only']['mfu'])}), pipeline {d['pipeline']['audio_s_per_s']:g} end to end, "
                f"steady {f(d['pipeline']['steady_audio_s_per_s'])}, bound {d['pipeline']['bound_by']} "
                f"({d['pipeline']['bound_audio_s_per_s']:g}), ratio {d['pipeline']['ratio_to_bound']:g}"
            )
    print("\n".join(lines), flush=True)


# ---- main --------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = ap.add_mutually_exclusive_group()
    g.add_argument(
        "--model", help="a local checkpoint folder (config.json, preprocessor_config.json, weights)"
    )
    g.add_argument(
        "--like",
        default="MERT-v1-95M",
        help="registry model whose shapes a random checkpoint takes "
        "(written once under benchmarks/.cache; default %(default)s)",
    )
    ap.add_argument(
        "--section",
        choices=("all", "cpu", "model", "table"),
        default="all",
        help="all (default); cpu: the CPU stage per format against its decode limit alone "
        "(benchmarks.cpu_stage); model: seconds per batch of the embedder alone (--device, --dtype); "
        "table: the table on its commit log, before and after (benchmarks.table, its own flags after --)",
    )
    ap.add_argument(
        "--cpu-seconds",
        type=float,
        default=180.0,
        help="length of each CPU-section file (default %(default)s)",
    )
    ap.add_argument(
        "--cpu-repeats", type=int, default=5, help="interleaved CPU-section rounds (default %(default)s)"
    )
    ap.add_argument(
        "--pipeline-files",
        type=int,
        default=8,
        help="--section cpu: N, the whole-pipeline runs per format take N and 3N files; 0 skips them "
        "(default %(default)s)",
    )
    ap.add_argument("--device", default="cpu", help="--section model: cpu or cuda (default %(default)s)")
    ap.add_argument(
        "--dtype", default="float32", help="--section model: float32, bfloat16, float16 (default %(default)s)"
    )
    ap.add_argument("--corpus", help="a folder of audio files (default: generated music-like tracks)")
    ap.add_argument("--tracks", type=int, default=2, help="generated tracks (default %(default)s)")
    ap.add_argument("--track-seconds", type=float, default=180.0, help="length of each (default %(default)s)")
    ap.add_argument(
        "--format", default="mp3", help="their format: mp3, flac, wav, ogg, m4a (default %(default)s)"
    )
    ap.add_argument("--batch-size", type=int, default=8, help="segments per model call (default %(default)s)")
    ap.add_argument("--window", type=float, default=5.0, help="segment window, seconds (default %(default)s)")
    ap.add_argument(
        "--model-batches",
        type=int,
        default=6,
        help="timed model-only batches, half before and half after the pipeline (default %(default)s)",
    )
    ap.add_argument(
        "--short-seconds", type=float, default=60.0, help="short memory input (default %(default)s)"
    )
    ap.add_argument(
        "--long-seconds", type=float, default=3600.0, help="long memory input (default %(default)s)"
    )
    ap.add_argument(
        "--tree-time-box",
        type=float,
        default=150.0,
        help="seconds a pipeline memory run may take before it is stopped (default %(default)s)",
    )
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of parts to leave out: model,cpu,formats,pipeline,naive,memory,tree,gpu",
    )
    ap.add_argument("--gpu-batch-size", type=int, default=64, help="GPU batch size (default %(default)s)")
    ap.add_argument(
        "--gpu-batches", type=int, default=20, help="timed GPU model-only batches (default %(default)s)"
    )
    ap.add_argument(
        "--workdir",
        default=str(CACHE),
        help="generated audio, checkpoints, tables (default benchmarks/.cache)",
    )
    ap.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results.json"),
        help="JSON result (default benchmarks/results.json)",
    )
    ap.add_argument("--pipeline-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.skip_naive = "naive" in args.skip
    return args


def benchmark(args: argparse.Namespace) -> dict:
    """Every figure for `args` (see parse_args); returns the result that main() writes as JSON."""
    import torch

    from pipeline.models import read_model_config

    t_start = time.perf_counter()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.section == "cpu":  # no model: only its sample rate
        from pipeline.registry import REGISTRY

        rate = read_model_config(args.model)[0].sample_rate if args.model else REGISTRY[args.like].sample_rate
        log(
            f"[bench] CPU stage per format against its decode limit ({args.cpu_seconds:g} s files, {rate} Hz)"
        )
        cpu_only = {
            "machine": machine(),
            "versions": versions(),
            "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
            "section": "cpu",
            "cpu_formats": cpu_section(
                work / "cpu_formats", rate, args.cpu_repeats, seconds=args.cpu_seconds
            ),
        }
        if args.pipeline_files > 0:
            n = args.pipeline_files
            log(f"[bench] the whole pipeline's CPU per audio second, per format: {n} and {3 * n} files a run")
            cpu_only["pipeline_cost"] = pipeline_section(
                ensure_cpu_corpus(work / "cpu_formats", args.cpu_seconds),
                cpu_only["cpu_formats"]["formats"],
                work / "pipeline_cost",
                n,
            )
        return _finish(cpu_only, t_start)
    model_dir = ensure_model(args.model, args.like, cache=work)
    spec, config, _ = read_model_config(str(model_dir))
    sr = spec.sample_rate
    if args.corpus:
        corpus = Path(args.corpus)
    else:
        corpus = ensure_corpus(work / "corpus", args.tracks, args.track_seconds, args.format)
    files = audio_files(corpus)
    if not files:
        raise SystemExit(f"no audio files in {corpus}")
    threads = actor_threads()
    flops = flops_per_audio_second(config, sr, args.window)
    result: dict = {
        "machine": machine(),
        "versions": versions(),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "section": args.section,
        "model": {"name": spec.name, "path": str(model_dir), "flops_per_audio_s": flops},
        "corpus": {"path": str(corpus), "files": len(files), "audio_s": None},
        "settings": {"batch_size": args.batch_size, "window_s": args.window, "actor_threads": threads},
    }
    if args.section == "all" and "formats" not in args.skip:
        log(f"[bench] CPU stage per format against its decode limit ({args.cpu_seconds:g} s files)")
        result["cpu_formats"] = cpu_section(
            work / "cpu_formats", sr, args.cpu_repeats, seconds=args.cpu_seconds
        )
    segments = decoded_segments(files, sr, args.window, args.batch_size * (args.model_batches + 1))
    if args.section == "model":
        log(f"[bench] model only: batch {args.batch_size}, {args.device} {args.dtype}")
        mo = ModelOnly(
            model_dir, segments, args.batch_size, threads=threads, device=args.device, dtype=args.dtype
        )
        mo.timed(args.model_batches)
        result["model_only"] = mo.result()
        mo.close()
        return _finish(result, t_start)

    if "cpu" not in args.skip:
        log("[bench] CPU stage: read + decode + resample + segment, one torch thread, isolated decoder")
        result["cpu_stage"] = cpu_stage(files, sr, args.window)
        result["corpus"]["audio_s"] = result["cpu_stage"]["audio_s"]
        log(f"[bench]   {result['cpu_stage']}")
    mo = None
    if "model" not in args.skip:
        log(f"[bench] model only: batch {args.batch_size}, {threads} torch threads (as the pipeline's actor)")
        mo = ModelOnly(model_dir, segments, args.batch_size, threads=threads)
        before = (args.model_batches + 1) // 2 if "pipeline" not in args.skip else args.model_batches
        mo.timed(before)
        log(f"[bench]   {mo.result()['audio_s_per_s']} audio s/s ({before} batches before the pipeline)")
    if "pipeline" not in args.skip:
        log("[bench] pipeline: engine.run through Ray to Parquet, fresh table")
        result["pipeline"] = pipeline_run(corpus, model_dir, work, batch_size=args.batch_size)
        result["corpus"]["audio_s"] = result["corpus"]["audio_s"] or result["pipeline"]["audio_s"]
        log(
            f"[bench]   {result['pipeline']['audio_s_per_s']} audio s/s end to end, "
            f"{result['pipeline']['steady_audio_s_per_s']} steady; timings {result['pipeline']['timings']}"
        )
    if mo is not None:
        if args.model_batches - len(mo.times) > 0:
            mo.timed(args.model_batches - len(mo.times))
        m = mo.result()
        mo.close()
        m["achieved_gflops"] = round(m["audio_s_per_s"] * flops["total"] / 1e9, 1)
        result["model_only"] = m
        log(
            f"[bench]   model only {m['audio_s_per_s']} audio s/s overall, {m['audio_s_per_s_by_phase']} before / "
            f"after the pipeline ({m['seconds_per_batch']} s per batch)"
        )
    if not args.skip_naive:
        from benchmarks.naive import naive_throughput

        log("[bench] naive recipe from the model card, whole files")
        result["naive"] = naive_throughput(files, model_dir, threads=threads, log=log)
        whole = flops_per_audio_second(config, sr, result["naive"]["audio_s"] / max(1, len(files)))
        result["naive"]["flops_per_audio_s_mean_file"] = whole
    if "memory" not in args.skip:
        mem: dict = {"short_s": args.short_seconds, "long_s": args.long_seconds, "worker": {}, "tree": {}}
        for kind, secs in (("short", args.short_seconds), ("long", args.long_seconds)):
            path = ensure_long_file(work / "memory", secs)
            log(f"[bench] memory, {kind} input ({secs:g} s WAV): CPU-stage worker")
            mem["worker"][kind] = worker_memory(path, sr, args.window)
            log(f"[bench]   {mem['worker'][kind]}")
            if "tree" not in args.skip:
                log(f"[bench] memory, {kind} input: whole pipeline run (time box {args.tree_time_box:g} s)")
                mem["tree"][kind] = tree_memory(
                    path, model_dir, work, batch_size=args.batch_size, time_box_s=args.tree_time_box
                )
                log(f"[bench]   {mem['tree'][kind]}")
        result["memory"] = mem
    if "gpu" not in args.skip and torch.cuda.is_available() and "cpu_stage" in result:
        result["gpu"] = gpu_figures(args, model_dir, corpus, files, segments, result["cpu_stage"], work)
    return _finish(result, t_start)


def _finish(result: dict, t_start: float) -> dict:
    result["summary"] = summarize(result)
    result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["harness_wall_s"] = round(time.perf_counter() - t_start, 1)
    result["harness_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--section" in argv and argv[argv.index("--section") + 1 :][:1] == ["table"]:
        from benchmarks import table

        rest = argv[argv.index("--") + 1 :] if "--" in argv else []
        raise SystemExit(table.main(rest))
    args = parse_args(argv)
    if args.pipeline_child:
        _pipeline_child(args.pipeline_child)
        return
    result = benchmark(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print_report(result)
    print(f"\nwrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
