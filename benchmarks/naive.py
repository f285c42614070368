"""The recipe from the MERT model card, as a baseline: per file, load it whole, torchaudio `Resample` to the model's
rate, `Wav2Vec2FeatureExtractor`, the model on the whole file with all hidden states, then the time mean.

    processor = Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    resampler = torchaudio.transforms.Resample(source_rate, processor.sampling_rate)
    inputs = processor(resampler(audio), sampling_rate=processor.sampling_rate, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True)
    all_layer_hidden_states = torch.stack(outputs.hidden_states).squeeze()      # (13, T, 768)
    time_reduced_hidden_states = all_layer_hidden_states.mean(-2)              # (13, 768)

The card builds the model with `AutoModel.from_pretrained(..., trust_remote_code=True)`; remote code never runs
here, so the model is transformers' own HubertModel built from the same config.json by pipeline.models.load_model
(the released weights are exactly that model; it uses PyTorch's SDPA attention). Loading uses PyAV (the card's
dataset hands over decoded arrays; torchaudio 2.9+ delegates `load` to TorchCodec, not installed here).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


def load_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """The whole file as (channels, samples) float32 at its own rate, through PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        to_float = av.AudioResampler(format="fltp")  # sample format only: the rate is torchaudio's job below
        parts = []
        for frame in container.decode(stream):
            for out in to_float.resample(frame):
                parts.append(out.to_ndarray())  # (channels, n)
        for out in to_float.resample(None):
            parts.append(out.to_ndarray())
    return torch.from_numpy(np.concatenate(parts, axis=1)), rate


class NaiveRecipe:
    """The model card's recipe on one device; `embed(path)` -> (hidden states, dim) float32 numpy."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from transformers import Wav2Vec2FeatureExtractor

        from pipeline.models import load_model

        self.device = torch.device(device)
        if self.device.type == "cuda":  # the card runs float32; keep it float32 for real (no TF32)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.processor = Wav2Vec2FeatureExtractor.from_pretrained(str(model_dir))
        self.model = load_model(str(model_dir)).model.to(self.device).eval()
        self.rate = self.processor.sampling_rate
        self._resamplers: dict[int, torch.nn.Module] = {}

    def embed(self, path: str | Path) -> np.ndarray:
        import torchaudio

        audio, rate = load_audio(path)
        audio = audio.mean(dim=0)  # mono, (samples,)
        if rate != self.rate:
            if rate not in self._resamplers:
                self._resamplers[rate] = torchaudio.transforms.Resample(rate, self.rate)
            audio = self._resamplers[rate](audio)
        inputs = self.processor(audio.numpy(), sampling_rate=self.rate, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            outputs = self.model(**inputs, output_hidden_states=True)
        all_layer_hidden_states = torch.stack(outputs.hidden_states).squeeze()  # (layers, T, D)
        time_reduced = all_layer_hidden_states.mean(-2)  # (layers, D)
        return time_reduced.float().cpu().numpy()


def naive_throughput(
    files: list[Path], model_dir: str | Path, device: str = "cpu", threads: int | None = None, log=print
) -> dict:
    """Audio seconds per wall second of the recipe over `files` (model load and one 1 s warm-up call excluded;
    everything per file, from opening it to the time means, included)."""
    import av

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    recipe = NaiveRecipe(model_dir, device=device)
    load_s = time.perf_counter() - t0
    with torch.no_grad():  # warm-up: first-call set-up of the kernels, not part of the recipe's steady cost
        recipe.model(torch.zeros(1, recipe.rate, device=recipe.device))
    audio_s = wall = 0.0
    per_file = []
    for path in files:
        with av.open(str(path)) as c:
            dur = float(c.duration / 1e6) if c.duration else 0.0
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = recipe.embed(path)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if not np.isfinite(out).all():
            raise RuntimeError(f"{path}: the naive recipe gave non-finite features")
        audio_s += dur
        wall += dt
        per_file.append({"file": Path(path).name, "audio_s": round(dur, 2), "wall_s": round(dt, 2)})
        log(f"  naive {Path(path).name}: {dur:.1f} s audio in {dt:.1f} s ({dur / dt:.2f} audio s/s)")
    return {
        "audio_s": round(audio_s, 2),
        "wall_s": round(wall, 2),
        "audio_s_per_s": round(audio_s / wall, 3) if wall else None,
        "model_load_s": round(load_s, 2),
        "threads": torch.get_num_threads(),
        "device": str(recipe.device),
        "files": per_file,
    }
