"""Configuration of the MERT-v2-like test model (its own code, loaded with trust_remote_code)."""

from __future__ import annotations

from transformers import PreTrainedConfig


class Mert2LikeConfig(PreTrainedConfig):
    model_type = "mert2_like"

    def __init__(
        self,
        hidden_size: int = 32,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 2,
        intermediate_size: int = 64,
        frame_stride: int = 960,  # 24 kHz / 960 = 25 frames per second
        sample_rate: int = 24000,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.frame_stride = frame_stride
        self.sample_rate = sample_rate
        super().__init__(**kwargs)
