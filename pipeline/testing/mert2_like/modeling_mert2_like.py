"""The MERT-v2-like test model: a strided conv front end with a group norm over time (so a padded batch differs
from single runs, as MERT's own front ends do), then transformer blocks. `forward` returns what MERT-v2's card
says: `last_hidden_state` (B, T, D), `hidden_states` (one per block; index 0 is block 1) and
`feature_attention_mask` (B, T)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_mert2_like import Mert2LikeConfig


@dataclass
class Mert2LikeOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    feature_attention_mask: torch.Tensor | None = None


class Mert2LikeModel(PreTrainedModel):
    config_class = Mert2LikeConfig
    base_model_prefix = "mert2_like"
    main_input_name = "input_values"

    def __init__(self, config: Mert2LikeConfig):
        super().__init__(config)
        d, s = config.hidden_size, config.frame_stride
        self.frontend = nn.Conv1d(1, d, kernel_size=s, stride=s)
        self.frontend_norm = nn.GroupNorm(num_groups=d, num_channels=d)  # over time, padding included
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d, config.num_attention_heads, config.intermediate_size, dropout=0.0, batch_first=True
            )
            for _ in range(config.num_hidden_layers)
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(module.weight, std=0.2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(
        self,
        input_values: torch.Tensor,  # (B, N) at 24 kHz, as the feature extractor returns them
        attention_mask: torch.Tensor | None = None,  # (B, N) 1 = sample, 0 = padding
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> Mert2LikeOutput:
        stride = self.config.frame_stride
        x = self.frontend_norm(self.frontend(input_values[:, None, :]))  # (B, D, T)
        x = torch.nn.functional.gelu(x).transpose(1, 2)  # (B, T, D)
        t = x.shape[1]
        if attention_mask is None:
            frames = torch.full((x.shape[0],), t, device=x.device)
        else:
            frames = attention_mask.sum(dim=1) // stride
        mask = torch.arange(t, device=x.device)[None, :] < frames[:, None]  # (B, T)
        states = []
        for block in self.blocks:
            x = block(x, src_key_padding_mask=~mask)
            states.append(x)
        return Mert2LikeOutput(
            last_hidden_state=x,
            hidden_states=tuple(states) if output_hidden_states else None,
            feature_attention_mask=mask.long(),
        )
