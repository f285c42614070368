"""The MERT-v2-like test model's processor: each waveform normalized to zero mean and unit variance, padded to the
longest, with an attention mask; `processor(waveform, sampling_rate=..., return_tensors="pt")`."""

from __future__ import annotations

import numpy as np
from transformers import BatchFeature, SequenceFeatureExtractor


class Mert2LikeFeatureExtractor(SequenceFeatureExtractor):
    model_input_names = ["input_values", "attention_mask"]

    def __init__(
        self, feature_size: int = 1, sampling_rate: int = 24000, padding_value: float = 0.0, **kwargs
    ):
        super().__init__(
            feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value, **kwargs
        )

    def __call__(
        self, raw_speech, sampling_rate: int | None = None, return_tensors: str | None = None, **kwargs
    ):
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(f"expected audio at {self.sampling_rate} Hz, got {sampling_rate} Hz")
        if isinstance(raw_speech, np.ndarray) and raw_speech.ndim == 1:
            raw_speech = [raw_speech]
        waves = [np.asarray(w, dtype=np.float32) for w in raw_speech]
        n = max(len(w) for w in waves)
        values = np.zeros((len(waves), n), dtype=np.float32)
        mask = np.zeros((len(waves), n), dtype=np.int64)
        for i, w in enumerate(waves):
            values[i, : len(w)] = (w - w.mean()) / np.sqrt(w.var() + 1e-7)
            mask[i, : len(w)] = 1
        return BatchFeature({"input_values": values, "attention_mask": mask}, tensor_type=return_tensors)
