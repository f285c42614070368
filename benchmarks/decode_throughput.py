"""Decode + downmix + resample throughput of the audio stage, and its peak memory on a 1- vs a 60-minute input.

    .venv/bin/python benchmarks/decode_throughput.py [--seconds 120] [--out benchmarks/decode_throughput.json]

Throughput: audio seconds per second of wall time (and of CPU time) through read_segments to 24 kHz mono, for
WAV, FLAC, MP3, Ogg Vorbis, Opus and M4A (music-like 44.1/48 kHz stereo fixtures), in-process and isolated (the
DecoderProcess child decodes, this process resamples and segments). One core: torch and BLAS limited to one thread.
On a shared or loaded machine the wall numbers move; the CPU-time column is the steadier one. In isolated mode the
CPU column counts this process plus the decoder child.

Memory: peak RSS (ru_maxrss) of a fresh process running read_segments(isolate=False) over a 1-minute and a 60-minute
44.1 kHz stereo 16-bit WAV; the fixed part is the import of torch/PyAV.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FORMATS = [("wav", 44100), ("flac", 44100), ("mp3", 44100), ("ogg", 44100), ("opus", 48000), ("m4a", 44100)]

_MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    torch.set_num_threads(1)
    from pipeline.audio import read_segments
    from pipeline.config import SegmentConfig
    n = 0
    with read_segments(sys.argv[1], sample_rate=24000, segments=SegmentConfig(), isolate=False) as stream:
        for seg in stream:
            n += 1
    print(json.dumps({"segments": n, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "duration_s": stream.info.duration_s}))
""")


def _child_cpu(dec) -> float:
    """CPU seconds used so far by the decoder child (0 when in-process)."""
    import psutil

    if dec is None or dec.pid is None:
        return 0.0
    t = psutil.Process(dec.pid).cpu_times()
    return t.user + t.system


def throughput(folder: Path, seconds: float) -> list[dict]:
    import torch

    from pipeline import synth
    from pipeline.audio import DecoderProcess, read_segments
    from pipeline.config import SegmentConfig

    torch.set_num_threads(1)
    rows = []
    for fmt, rate in FORMATS:
        path = synth.encode_chunks(
            folder / f"bench{synth.EXTENSIONS[fmt]}", synth.long_music_chunks(seconds, rate, 2), rate, 2, fmt
        )
        for isolate in (False, True):
            dec = DecoderProcess() if isolate else None
            if dec is not None:  # start the child outside the timing (it is reused across files in a run)
                list(read_segments(str(path), sample_rate=24000, segments=SegmentConfig(), decoder=dec))
            cpu0, child0, t0 = time.process_time(), _child_cpu(dec), time.perf_counter()
            with read_segments(
                str(path), sample_rate=24000, segments=SegmentConfig(), isolate=isolate, decoder=dec
            ) as stream:
                n = sum(1 for _ in stream)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0 + (_child_cpu(dec) - child0)
            if dec is not None:
                dec.close()
            audio = stream.info.duration_s or 0.0
            rows.append(
                {
                    "format": fmt,
                    "codec": stream.info.codec,
                    "source_rate": stream.info.sample_rate,
                    "isolated": isolate,
                    "audio_s": round(audio, 2),
                    "segments": n,
                    "wall_s": round(wall, 3),
                    "cpu_s": round(cpu, 3),
                    "x_realtime_wall": round(audio / wall, 1),
                    "x_realtime_cpu": round(audio / cpu, 1) if cpu > 0 else None,
                }
            )
            print(
                f"{fmt:5s} {stream.info.codec:10s} isolated={isolate!s:5s} {audio:7.1f} s audio "
                f"{wall:7.2f} s wall ({audio / wall:7.1f}x)  {cpu:7.2f} s cpu ({audio / cpu:7.1f}x)",
                flush=True,
            )
        path.unlink()
    return rows


def memory(folder: Path) -> dict:
    from pipeline import synth

    out = {}
    for minutes in (1, 60):
        path = synth.encode_chunks(
            folder / f"{minutes}min.wav", synth.long_music_chunks(minutes * 60, 44100, 2), 44100, 2, "wav"
        )
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, env=env, check=True
        )
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r["wall_s"] = round(time.perf_counter() - t0, 2)
        r["file_mb"] = round(path.stat().st_size / 1e6, 1)
        out[f"{minutes}min"] = r
        print(
            f"{minutes:2d}-minute WAV ({r['file_mb']} MB): peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"{r['segments']} segments, {r['wall_s']} s",
            flush=True,
        )
        path.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="audio length per format, seconds")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")), help="JSON results path")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as tmp:
        folder = Path(tmp)
        rows = throughput(folder, args.seconds)
        mem = {} if args.skip_memory else memory(folder)
    import av
    import torch

    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "av": av.__version__,
            "load_avg": os.getloadavg(),
        },
        "target_rate": 24000,
        "threads": 1,
        "throughput": rows,
        "memory": mem,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
