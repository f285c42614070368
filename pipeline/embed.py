"""The embedding stage: equal-length mono waveforms in, per-layer vectors out, pooled on the device.

Hidden-state semantics follow the original MERT implementation: entry 0 is the transformer input (after the
feature projection and the positional conv, and for post-LN models after the encoder layer norm); entry i is the
output of layer i. For the pre-LN (do_stable_layer_norm) architecture, entries 0..L-1 are the un-normalized
residual stream and entry L is the final layer-normed output (transformers 5 returns the pre-norm stream there:
`hidden_states[-1]` is the last layer's raw output, `last_hidden_state` the normed one; we use the latter).

The encoder is run layer by layer from transformers' own modules, so the layers above the highest selected one
are skipped (except for pre-LN models when the last entry is selected, which needs them all).

A checkpoint with its own code (MERT-v2, pipeline.remote_code) runs as its card says: its processor, then
`model(**inputs, output_hidden_states=True)`; stored index i is its `hidden_states[i]` (block i + 1: there is no
input-embedding entry), pooled over the frames its `feature_attention_mask` marks valid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch

from pipeline.models import LoadedModel, num_frames
from pipeline.registry import ModelSpec

GRANULARITIES = ("segment", "frame", "recording")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor's zero-mean unit-variance epsilon


def _disable_tf32() -> None:
    """float32 parity on GPU: matmuls and convolutions in full float32, not TF32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class Embedder:
    """Runs a loaded model on batches of equal-length segments and keeps the selected layers.

    The embedder moves `loaded.model` to its device and compute dtype (in place: one replica per process).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        layers: Sequence[int] | None = None,  # hidden-state indices; None = all
        granularity: str = "segment",  # "segment" | "frame" | "recording" (pooled by the caller, as "segment")
        device: str = "auto",  # "auto" = cuda when available, else cpu
        dtype: str = "float32",  # compute dtype; half types on CUDA only
        out_dtype: str = "float32",  # storage dtype, cast on the device before the host copy
        normalize: bool | None = None,  # None = the checkpoint's do_normalize
    ):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITIES}")
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {tuple(COMPUTE_DTYPES)}")
        if out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype {out_dtype!r} is not one of {tuple(OUT_DTYPES)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
        if dtype != "float32" and self.device.type != "cuda":
            raise ValueError(
                f"dtype {dtype!r} needs a CUDA device (device is {self.device}); use float32 on CPU"
            )

        self.loaded = loaded
        self.spec: ModelSpec = loaded.spec
        valid = self.spec.layers
        if layers is None:
            chosen = valid
        else:
            chosen = tuple(int(i) for i in layers)
            bad = [i for i in chosen if i not in valid]
            if not chosen or bad or len(set(chosen)) != len(chosen):
                raise ValueError(
                    f"layers {list(layers)} must be distinct hidden-state indices in "
                    f"0..{self.spec.num_layers} for {self.spec.name}"
                )
        self.layers: tuple[int, ...] = chosen
        self.granularity = granularity
        self.dtype = COMPUTE_DTYPES[dtype]
        self.out_dtype = OUT_DTYPES[out_dtype]
        self.normalize = loaded.do_normalize if normalize is None else bool(normalize)
        if loaded.remote and self.normalize:
            raise ValueError(
                f"{self.spec.name}: its own processor prepares the input; per-segment normalization does not apply"
            )

        if self.device.type == "cuda" and dtype == "float32":
            _disable_tf32()
        if loaded.model is None:
            raise ValueError(
                f"{self.spec.name}: a check-only load has no model to embed with (load it fully)"
            )
        # HubertModel or Data2VecAudioModel: their submodules are reached by name, so typed as Any
        self.model: Any = loaded.model.to(device=self.device, dtype=self.dtype).eval()
        self._frames_by_length: dict[int, int] = {}  # a model with its own code: frames seen per length
        self._keep = set(self.layers)
        if loaded.remote:
            return
        num_layers = len(cast(Any, self.model).encoder.layers)
        if num_layers != self.spec.num_layers:
            raise ValueError(
                f"{self.spec.name}: the model has {num_layers} layers, the spec says {self.spec.num_layers}"
            )
        # pre-LN: the last entry is the final layer norm of the last layer's output, so it needs every layer
        self._final_norm = self.spec.pre_ln and num_layers in self.layers
        self._run_layers = num_layers if self._final_norm else max(self.layers)

    def frames(self, num_samples: int) -> int:
        """Hidden-state frames of a segment of `num_samples` samples at spec.sample_rate. A model with its own
        code: the count its feature_attention_mask gave for that length (before the first run of a length, the
        frame rate's estimate)."""
        if self.loaded.remote:
            seen = self._frames_by_length.get(num_samples)
            return (
                seen if seen is not None else int(num_samples * self.spec.frame_rate // self.spec.sample_rate)
            )
        return num_frames(num_samples, self.loaded.config)

    def _remote_states(self, w: np.ndarray) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """A model with its own code (MERT-v2 interface): the kept hidden states (B, T, D) by stored index
        (0 = block 1) and the feature_attention_mask (B, T), from its own processor and forward."""
        processor = self.loaded.processor
        inputs = processor(list(w), sampling_rate=processor.sampling_rate, return_tensors="pt")
        inputs = {
            k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in inputs.items()
        }
        out = self.model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states
        if len(hidden) != self.spec.num_hidden_states:
            raise ValueError(
                f"{self.spec.name}: {len(hidden)} hidden states, the spec says {self.spec.num_hidden_states}"
            )
        mask = out.feature_attention_mask  # (B, T)
        self._frames_by_length[w.shape[1]] = int(mask[0].sum())
        return {i: hidden[i] for i in self._keep}, mask

    def _hidden_states(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The kept hidden states of a batch, each (B, T, D), by hidden-state index."""
        m = self.model
        feats = m.feature_extractor(x).transpose(1, 2)  # (B, T, C)
        proj = m.feature_projection(feats)
        h = (
            proj[0] if isinstance(proj, tuple) else proj
        )  # (B, T, D); data2vec also returns the normed features
        enc = m.encoder
        h = h + enc.pos_conv_embed(h)
        if not self.spec.pre_ln:
            h = enc.layer_norm(h)
        states = {0: h} if 0 in self._keep else {}
        for i in range(self._run_layers):
            out = enc.layers[i](h, attention_mask=None)
            h = out[0] if isinstance(out, tuple) else out  # (B, T, D)
            if i + 1 in self._keep:
                states[i + 1] = h
        if self._final_norm:
            states[self.spec.num_layers] = enc.layer_norm(h)
        return states

    def embed(self, waveforms: np.ndarray) -> np.ndarray:
        """Embed a batch of equal-length segments.

        waveforms: (B, N) float32 mono at spec.sample_rate.
        Returns numpy in out_dtype: (B, L, D) time-means for segment/recording granularity, (B, L, T, D) frames
        for frame granularity, L = len(self.layers) in the order given.
        """
        w = np.asarray(waveforms)
        if w.ndim != 2 or w.shape[0] == 0:
            raise ValueError(f"waveforms must be a non-empty (batch, samples) array, got shape {w.shape}")
        n = w.shape[1]
        if self.frames(n) == 0:
            raise ValueError(
                f"a segment of {n} samples is shorter than the conv front end's receptive field: "
                f"{self.spec.name} needs at least one frame ({self.spec.sample_rate} Hz input)"
            )
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(self.device)  # (B, N)
            if self.normalize:  # per segment, population variance, in float32
                mean = x.mean(dim=1, keepdim=True)
                var = x.var(dim=1, unbiased=False, keepdim=True)
                x = (x - mean) / torch.sqrt(var + NORM_EPS)
            if self.loaded.remote:
                states, mask = self._remote_states(w)
                # equal lengths: every row has the same valid frames, the first ones
                valid = int(mask[0].sum())
                stacked = torch.stack([states[i] for i in self.layers], dim=1)[:, :, :valid]  # (B, L, T, D)
            else:
                states = self._hidden_states(x.to(self.dtype))
                stacked = torch.stack([states[i] for i in self.layers], dim=1)  # (B, L, T, D)
            if self.granularity == "frame":
                out = stacked.to(self.out_dtype)  # (B, L, T, D)
            else:
                out = stacked.mean(dim=2, dtype=torch.float32).to(self.out_dtype)  # (B, L, D)
            return out.cpu().numpy()

    def embed_segments(self, segments: Sequence[np.ndarray], batch_size: int) -> list[np.ndarray]:
        """Embed a ragged list of 1-D segments without padding.

        Segments are grouped by length and run in batches of at most `batch_size` equal-length segments (the
        group-norm conv front end makes padded batches differ from single runs). Returns one array per segment,
        in input order: (L, D), or (L, T, D) for frame granularity.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(segments):
            if np.ndim(s) != 1:
                raise ValueError(f"segment {i} must be 1-D (mono samples), got shape {np.shape(s)}")
            groups.setdefault(len(s), []).append(i)
        out: list[np.ndarray | None] = [None] * len(segments)
        for idxs in groups.values():
            for start in range(0, len(idxs), batch_size):
                chunk = idxs[start : start + batch_size]
                result = self.embed(np.stack([np.asarray(segments[i], dtype=np.float32) for i in chunk]))
                for j, i in enumerate(chunk):
                    out[i] = result[j]
        return out  # type: ignore[return-value]
