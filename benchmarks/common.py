"""What the benchmark harness (benchmarks/run.py) shares: the machine's description, the model and corpus it
measures, the model's FLOPs per audio second and the cards' peaks, and a process-tree memory sampler.

Nothing here times anything; run.py does.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"  # generated checkpoints and audio (gitignored)

# Dense peak throughput in TFLOP/s per card, from the vendor data sheets (no structured sparsity). float32 is the
# CUDA-core peak: the pipeline turns TF32 off in float32 for parity with the reference, so tensor cores are not used.
# Matched against torch.cuda.get_device_name() in order: the first key found in the name wins.
PEAK_TFLOPS = (
    ("H200 NVL", {"float32": 60.0, "bfloat16": 835.0}),
    ("H200", {"float32": 67.0, "bfloat16": 989.0}),
    ("H100 NVL", {"float32": 60.0, "bfloat16": 835.0}),
    ("H100 PCIe", {"float32": 51.0, "bfloat16": 756.0}),
    ("H100", {"float32": 67.0, "bfloat16": 989.0}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", {"float32": 19.5, "bfloat16": 312.0}),  # SXM4 and PCIe, 40 and 80 GB
)


def peak_flops(device_name: str, dtype: str) -> float | None:
    """The card's dense peak in FLOP/s for `dtype` ("float32" | "bfloat16"), or None for a card not in the table."""
    low = device_name.lower()
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in low:
            return peaks[dtype] * 1e12 if dtype in peaks else None
    return None


def flops_per_audio_second(config: dict, sample_rate: int, window_s: float) -> dict[str, float]:
    """Forward FLOPs per second of audio when the model runs on windows of `window_s` seconds (a multiply-add is
    2 FLOPs), from a raw config.json. Matrix products and convolutions only: norms, activations, softmax and
    biases are left out (as MFU figures usually do).

    conv:      the front end, layer by layer: 2 * C_in * C_out * kernel * output frames
    proj:      feature projection conv_dim[-1] -> hidden: 2 * C * D per frame
    pos_conv:  grouped positional conv(s), D -> D with D / groups inputs per output: 2 * D * D/groups * K per frame
               (HuBERT: one conv of kernel num_conv_pos_embeddings; data2vec: num_conv_pos_embeddings convs of
               kernel conv_pos_kernel_size)
    linear:    per layer and frame Q, K, V, O (4 * 2 * D^2) and the feed-forward (2 * 2 * D * I)
    attention: per layer QK^T and attention x V: 2 * 2 * T^2 * D (quadratic in the window's frames T)

    Returns each term and "total", in FLOPs per audio second, and "frames" (T of one window).
    """
    n = int(round(window_s * sample_rate))
    seconds = n / sample_rate
    length, c_in, conv = n, 1, 0
    for c_out, k, s in zip(config["conv_dim"], config["conv_kernel"], config["conv_stride"], strict=True):
        length = (length - k) // s + 1
        if length <= 0:
            raise ValueError(
                f"a window of {window_s} s at {sample_rate} Hz is shorter than the conv front end"
            )
        conv += 2 * c_in * c_out * k * length
        c_in = c_out
    t = length
    d = config["hidden_size"]
    inner = config["intermediate_size"]
    layers = config["num_hidden_layers"]
    proj = 2 * config["conv_dim"][-1] * d * t
    if "conv_pos_kernel_size" in config:  # data2vec-audio: a stack of small positional convs
        pos_layers, pos_kernel = config["num_conv_pos_embeddings"], config["conv_pos_kernel_size"]
    else:
        pos_layers, pos_kernel = 1, config["num_conv_pos_embeddings"]
    pos = pos_layers * 2 * t * d * (d // config["num_conv_pos_embedding_groups"]) * pos_kernel
    linear = layers * t * (4 * 2 * d * d + 2 * 2 * d * inner)
    attention = layers * 2 * 2 * t * t * d
    parts = {"conv": conv, "proj": proj, "pos_conv": pos, "linear": linear, "attention": attention}
    out = {k: v / seconds for k, v in parts.items()}
    out["total"] = sum(parts.values()) / seconds
    out["frames"] = t
    return out


def machine() -> dict:
    """The machine as a results file should name it."""
    import torch

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def versions() -> dict:
    import av
    import pyarrow
    import ray
    import torch
    import torchaudio
    import transformers

    from pipeline import __version__

    return {
        "pipeline": __version__,
        "torch": torch.__version__,
        "torchaudio": torchaudio.__version__,
        "transformers": transformers.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "av": av.__version__,
    }


# ---- what is measured --------------------------------------------------------------------------------------------
def ensure_model(model: str | None, like: str, size: str = "full", cache: Path = CACHE) -> Path:
    """A checkpoint folder: `model` when given, else a random `like`-shaped one written once under `cache`."""
    if model:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model {model}: no config.json there (give a local checkpoint folder)")
        return path
    from pipeline.checkpoints import write_random_checkpoint

    path = cache / f"{like}-{size}-random"
    if not (path / "config.json").is_file() or not (path / "preprocessor_config.json").is_file():
        write_random_checkpoint(path, like=like, size=size)
    return path


def ensure_corpus(
    folder: Path, tracks: int, seconds: float, fmt: str = "mp3", sample_rate: int = 44100
) -> Path:
    """`tracks` music-like stereo files of `seconds` seconds each (distinct seeds) in `folder`, written once: a
    corpus.json there records what was asked, and a different ask rewrites the folder."""
    from pipeline import synth

    want = {"tracks": tracks, "seconds": seconds, "format": fmt, "sample_rate": sample_rate}
    marker = folder / "corpus.json"
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_file():
            old.unlink()
    for i in range(tracks):
        synth.encode_chunks(
            folder / f"track_{i:03d}{synth.EXTENSIONS[fmt]}",
            synth.long_music_chunks(seconds, sample_rate, 2, chunk_s=30.0, seed=i),
            sample_rate,
            2,
            fmt,
        )
    marker.write_text(json.dumps(want))
    return folder


def ensure_long_file(folder: Path, seconds: float, fmt: str = "wav", sample_rate: int = 44100) -> Path:
    """One music-like stereo file of `seconds` seconds, generated and encoded in chunks (memory stays flat)."""
    from pipeline import synth

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"long_{int(seconds)}s_{sample_rate}{synth.EXTENSIONS[fmt]}"
    done = path.with_suffix(path.suffix + ".done")
    if not done.is_file():
        synth.encode_chunks(path, synth.long_music_chunks(seconds, sample_rate, 2), sample_rate, 2, fmt)
        done.write_text("")
    return path


def audio_files(folder: Path) -> list[Path]:
    from pipeline.config import AUDIO_EXTENSIONS

    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


# ---- memory -----------------------------------------------------------------------------------------------------
class TreeMemory:
    """Samples the memory of a process and all its descendants every `interval_s` seconds in a thread.

    Per sample: the sum of PSS over the tree (each shared page divided among the processes that map it: the tree's
    real footprint at that moment) and the sum of RSS (shared pages counted once per process). Per process: its
    high-water RSS (VmHWM, kept by the kernel, so a peak between two samples is not missed); their sum bounds the
    tree's peak from above. Also the growth of /dev/shm (Ray's object store lives there: objects no process maps
    any more appear in no PSS). `peak()` gives the peaks; `series` one (seconds, PSS MB) point per `every_s`.
    """

    def __init__(self, pid: int, interval_s: float = 0.25, every_s: float = 5.0):
        import psutil

        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.every_s = every_s
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.hwm: dict[int, int] = {}  # pid -> VmHWM bytes
        self.pids: set[int] = set()
        self.series: list[tuple[float, float]] = []
        self._shm0 = self._shm()
        self.peak_shm = 0
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _shm() -> int:
        try:
            import shutil

            return shutil.disk_usage("/dev/shm").used
        except OSError:
            return 0

    @staticmethod
    def _vmhwm(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss = 0
        for p in procs:
            try:
                m = p.memory_full_info()
            except psutil.AccessDenied:
                try:
                    m = p.memory_info()
                except psutil.Error:
                    continue
            except psutil.Error:
                continue
            rss += m.rss
            pss += getattr(m, "pss", m.rss)
            self.pids.add(p.pid)
            self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), self._vmhwm(p.pid))
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(procs))
        self.peak_shm = max(self.peak_shm, self._shm() - self._shm0)
        t = time.monotonic() - self._t0
        if not self.series or t - self.series[-1][0] >= self.every_s:
            self.series.append((round(t, 1), round(pss / 2**20)))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self) -> dict:
        mb = 2**20
        return {
            "peak_pss_mb": round(self.peak_pss / mb, 1),
            "peak_rss_sum_mb": round(self.peak_rss / mb, 1),
            "sum_of_process_peaks_mb": round(sum(self.hwm.values()) / mb, 1),
            "shm_growth_peak_mb": round(self.peak_shm / mb, 1),
            "peak_processes": self.peak_procs,
        }
