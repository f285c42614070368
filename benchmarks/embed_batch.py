"""Seconds per batch of equal-length segments through the real loader and embedder.

A random checkpoint with the registered model's real shapes is written in hub layout (or reused with
--checkpoint), loaded with pipeline.models.load_model, and a batch of B segments of S seconds is embedded
(all layers, segment granularity) after one warm-up batch.

    .venv/bin/python benchmarks/embed_batch.py                      # MERT-v1-95M, 8 x 5 s, float32, CPU
    .venv/bin/python benchmarks/embed_batch.py --like MERT-v1-330M --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.checkpoints import write_random_checkpoint
from pipeline.embed import Embedder
from pipeline.models import load_model
from pipeline.registry import REGISTRY


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--like", default="MERT-v1-95M", choices=sorted(REGISTRY))
    p.add_argument("--checkpoint", help="an existing checkpoint directory (default: write a random one)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ckpt = args.checkpoint or str(write_random_checkpoint(Path(tmp) / args.like, args.like, size="full"))
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = load_model(ckpt)
        t_load = time.perf_counter() - t0
        emb = Embedder(loaded, device=args.device, dtype=args.dtype)
        n = int(round(args.seconds * loaded.spec.sample_rate))
        x = np.random.default_rng(0).standard_normal((args.batch, n)).astype(np.float32)  # (B, N)

        def run() -> float:
            if emb.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = emb.embed(x)  # (B, L, D)
            if emb.device.type == "cuda":
                torch.cuda.synchronize()
            assert out.shape == (args.batch, loaded.spec.num_hidden_states, loaded.spec.dim)
            return time.perf_counter() - t

        warm = run()
        times = [run() for _ in range(args.repeats)]
    print(
        json.dumps(
            {
                "model_like": args.like,
                "batch": args.batch,
                "segment_s": args.seconds,
                "device": str(emb.device)
                + (
                    f" ({torch.cuda.get_device_name()})"
                    if emb.device.type == "cuda"
                    else f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
                ),
                "dtype": args.dtype,
                "write_checkpoint_s": round(t_write, 2),
                "load_model_s": round(t_load, 2),
                "warmup_batch_s": round(warm, 3),
                "seconds_per_batch": [round(t, 3) for t in times],
                "median_seconds_per_batch": round(statistics.median(times), 3),
                "audio_seconds_per_second": round(args.batch * args.seconds / statistics.median(times), 1),
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
