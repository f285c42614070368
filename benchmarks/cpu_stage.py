"""The CPU stage at its decode limit, per format (`python -m benchmarks.run --section cpu`).

For each file of a fixed corpus (3-minute 44.1 kHz stereo MP3, FLAC, Ogg Vorbis, M4A and WAV; Opus at 48 kHz,
the highest rate its encoder takes) a fresh worker process (`python -m benchmarks.cpu_stage FILE ...`, importing
what a decode task imports: pipeline.stages) measures, interleaved over `repeats` rounds, CPU seconds (user + sys
of the worker AND its decoder child, psutil) per audio second of:
  limit      PyAV decode + downmix (frame.to_ndarray, mean over channels) + the project's StreamResampler, in one
             process, no isolation, nothing else: the floor the stage is held to;
  local      the CPU stage in the worker (pipeline.stages.decode_input, isolate=False): read, decode, resample,
             segment, Arrow tables;
  isolated   the same with isolate=True (the default): decoding in the child, what a decode task runs.
It reports their ratios (stage / limit, and isolated / local - 1 = the cost of isolation: the median of the rounds'
own ratios), all measured in one run (the machine is noisy: never compare bare times across runs), the median over
the rounds, the isolated variant's CPU split into worker and child, and the peak USS
(psutil memory_full_info().uss, sampled every 20 ms) of the worker plus its child while the isolated stage runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

GOAL_STAGE_OVER_LIMIT = 1.25  # the isolated CPU stage's CPU per audio second <= 1.25 x the limit
GOAL_ISOLATION = 0.10  # isolation costs at most 10 %
GOAL_USS_MB = 250.0  # a decode worker plus its child
# (format, source rate): 3-minute stereo files; WAV is shown but exempt from the goals (no decode to speak of)
FORMATS = [("mp3", 44100), ("flac", 44100), ("ogg", 44100), ("opus", 48000), ("m4a", 44100), ("wav", 44100)]
EXEMPT = {"wav"}


def ensure_cpu_corpus(folder: Path, seconds: float = 180.0) -> list[Path]:
    """One music-like stereo file of `seconds` seconds per format of FORMATS in `folder`, written once."""
    from pipeline import synth

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt, rate in FORMATS:
        path = folder / f"{fmt}_{int(seconds)}s_{rate}{synth.EXTENSIONS[fmt]}"
        done = path.with_suffix(path.suffix + ".done")
        if not done.is_file():
            synth.encode_chunks(
                path, synth.long_music_chunks(seconds, rate, 2, chunk_s=30.0, seed=7), rate, 2, fmt
            )
            done.write_text("")
        out.append(path)
    return out


def _cpu(pid: int | None) -> float:
    """CPU seconds of a live process (0 when it is gone or None): on Linux the nanosecond run time of each of its
    threads (/proc/PID/task/*/schedstat), elsewhere psutil's user + sys (10 ms ticks: too coarse for one file)."""
    import psutil

    if pid is None:
        return 0.0
    tasks = Path(f"/proc/{pid}/task")
    if tasks.is_dir():
        total = 0
        for t in tasks.iterdir():
            try:
                total += int((t / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total / 1e9
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def limit(path: str, sample_rate: int, chunk_s: float = 2.0) -> float:
    """PyAV decode + downmix + StreamResampler in this process; returns the audio seconds decoded."""
    import av

    from pipeline.audio import StreamResampler

    scale = {"s16": 32768.0, "s32": 2147483648.0}
    with av.open(path) as container:
        stream = container.streams.audio[0]
        stream.codec_context.thread_count = 1
        rate, ch = stream.codec_context.sample_rate, stream.codec_context.channels
        res = StreamResampler(rate, sample_rate)
        pending: list[np.ndarray] = []
        n = total = 0
        for frame in container.decode(stream):
            a = frame.to_ndarray()
            fmt = frame.format
            if not fmt.is_planar:
                a = a.reshape(-1, ch).T
            if fmt.packed.name in scale:
                a = a.astype(np.float32) / np.float32(scale[fmt.packed.name])
            pending.append(a.mean(axis=0, dtype=np.float32))
            n += frame.samples
            if n >= chunk_s * rate:
                res.push(np.concatenate(pending))
                total += n
                pending, n = [], 0
        if pending:
            res.push(np.concatenate(pending))
            total += n
        res.flush()
    return total / rate


def _stage(path: str, sample_rate: int, isolate: bool) -> float:
    """pipeline.stages.decode_input over `path` (all of its tables consumed); returns the decoded seconds."""
    from pipeline.config import SegmentConfig
    from pipeline.stages import decode_input

    record = None
    for table in decode_input(
        path, path, "-", sample_rate=sample_rate, segments=SegmentConfig(), isolate=isolate
    ):
        rec = table.column("record")[0].as_py()
        if rec is not None:
            record = json.loads(rec)
    if record is None or record["status"] != "ok":
        raise RuntimeError(f"{path}: the CPU stage did not decode it: {record}")
    return float(record["duration_s"])


class PeakUSS:
    """Peak USS (MB) of process `pid` plus its children (psutil memory_full_info().uss), sampled every 20 ms from
    another process, so that the sampling's own CPU is not counted in the worker's."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self.peak_worker = 0.0
        self.peak_child = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                w = proc.memory_full_info().uss / 2**20
                c = sum(k.memory_full_info().uss for k in proc.children(recursive=True)) / 2**20
            except psutil.Error:
                w = c = 0.0
            self.peak_worker = max(self.peak_worker, w)
            self.peak_child = max(self.peak_child, c)
            self.peak = max(self.peak, w + c)
            self._stop.wait(0.02)

    def __enter__(self) -> PeakUSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(path: str, sample_rate: int, repeats: int) -> dict:
    """In this (fresh) process: the three variants on `path`, interleaved `repeats` times (after one warm-up
    each); CPU per audio second (median), their ratios, and the worker + child peak USS. The cost of isolation is
    the median over the rounds of each round's isolated / local - 1: the two run back to back, so a round's ratio
    cancels the machine's drift (a shared VM's speed moves by 10 % and more within a minute), which the ratio of
    the two medians does not."""
    from pipeline.audio import default_decoder

    dec = default_decoder()
    runs: dict[str, list[float]] = {"limit": [], "local": [], "isolated": []}
    split: dict[str, list[float]] = {"worker": [], "child": []}  # of the isolated variant
    audio = 0.0
    for r in range(repeats + 1):
        for name in runs:
            child = dec.pid
            c0, k0 = _cpu(os.getpid()), _cpu(child)
            if name == "limit":
                audio = limit(path, sample_rate)
            else:
                audio = _stage(path, sample_rate, isolate=name == "isolated")
            cpu = _cpu(os.getpid()) - c0
            if name == "isolated":  # the child started during the first round counts from its start
                kid = _cpu(dec.pid) - (k0 if dec.pid == child else 0.0)
                if r > 0:
                    split["worker"].append(cpu / audio)
                    split["child"].append(kid / audio)
                cpu += kid
            if r > 0:
                runs[name].append(cpu / audio)
    imported = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "pyarrow", "transformers"})
    dec.close()
    cpu_per_s = {k: statistics.median(v) for k, v in runs.items()}
    per_round = [i / loc - 1 for i, loc in zip(runs["isolated"], runs["local"], strict=True)]
    return {
        "file": Path(path).name,
        "audio_s": round(audio, 2),
        "cpu_s_per_audio_s": {k: round(v, 6) for k, v in cpu_per_s.items()},
        "isolated_cpu_s_per_audio_s": {k: round(statistics.median(v), 6) for k, v in split.items()},
        "audio_s_per_cpu_s": {k: round(1 / v, 1) for k, v in cpu_per_s.items()},
        "isolated_over_limit": round(cpu_per_s["isolated"] / cpu_per_s["limit"], 3),
        "local_over_limit": round(cpu_per_s["local"] / cpu_per_s["limit"], 3),
        "isolation_overhead": round(statistics.median(per_round), 3),
        "isolation_overhead_per_round": [round(x, 3) for x in per_round],
        "worker_imports": imported,
        "repeats": repeats,
    }


def cpu_section(folder: Path, sample_rate: int, repeats: int, seconds: float = 180.0) -> dict:
    """Every format of the corpus in `folder`, each in a fresh worker process; the figures and the goals."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(
        os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1"
    )
    rows = []
    for path in ensure_cpu_corpus(folder, seconds):
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.cpu_stage", str(path), str(sample_rate), str(repeats)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=root,
        )
        with PeakUSS(proc.pid) as uss:
            stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"the CPU-stage worker failed on {path}: {stderr.strip()[-2000:]}")
        row = json.loads(stdout.strip().splitlines()[-1])
        row["worker_plus_child_uss_mb"] = round(uss.peak, 1)
        row["worker_uss_mb"] = round(uss.peak_worker, 1)
        row["child_uss_mb"] = round(uss.peak_child, 1)
        row["format"] = path.name.split("_")[0]
        rows.append(row)
    judged = [r for r in rows if r["format"] not in EXEMPT]
    goals = {
        "isolated_over_limit_max": max(r["isolated_over_limit"] for r in judged),
        "isolation_overhead_max": max(r["isolation_overhead"] for r in judged),
        "worker_plus_child_uss_mb_max": max(r["worker_plus_child_uss_mb"] for r in rows),
    }
    goals["met"] = bool(
        goals["isolated_over_limit_max"] <= GOAL_STAGE_OVER_LIMIT
        and goals["isolation_overhead_max"] <= GOAL_ISOLATION
        and goals["worker_plus_child_uss_mb_max"] <= GOAL_USS_MB
    )
    return {"sample_rate": sample_rate, "repeats": repeats, "formats": rows, "goals": goals}


def print_cpu_section(section: dict) -> None:
    head = (
        f"{'format':<6} {'limit x':>9} {'isolated x':>11} {'local x':>9} {'iso/limit':>10} {'local/limit':>12} "
        f"{'isolation':>10} {'USS MB':>7}"
    )
    print(
        f"CPU stage at {section['sample_rate']} Hz (audio s per CPU s of worker + child; median of "
        f"{section['repeats']})"
    )
    print(head)
    for r in section["formats"]:
        a = r["audio_s_per_cpu_s"]
        print(
            f"{r['format']:<6} {a['limit']:>9.0f} {a['isolated']:>11.0f} {a['local']:>9.0f} "
            f"{r['isolated_over_limit']:>10.2f} {r['local_over_limit']:>12.2f} "
            f"{r['isolation_overhead']:>+10.1%} {r['worker_plus_child_uss_mb']:>7.0f}"
        )
    g = section["goals"]
    print(
        f"goals: isolated/limit <= {GOAL_STAGE_OVER_LIMIT} (worst {g['isolated_over_limit_max']:.2f}), isolation "
        f"<= {GOAL_ISOLATION:.0%} (worst {g['isolation_overhead_max']:+.1%}), USS <= {GOAL_USS_MB:.0f} MB "
        f"(worst {g['worker_plus_child_uss_mb_max']:.0f}): {'met' if g['met'] else 'NOT met'}"
    )


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
