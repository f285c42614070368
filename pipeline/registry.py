"""The model registry: every fact about the MERT family is stated here, once.

Nothing else in the code base hard-codes a sample rate, a layer count or a width; a checkpoint that is not in
the registry (a local fine-tune, a test model) gets a ModelSpec derived from its own config by `spec_from_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

# The conv front end of every natively built model (wav2vec 2.0 style): a 400-sample receptive field, stride 320.
CONV_KERNEL: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDE: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)


def conv_receptive_field(kernels: tuple[int, ...] | list[int], strides: tuple[int, ...] | list[int]) -> int:
    """The fewest samples that give one frame through a stack of convolutions."""
    n = 1
    for k, s in reversed(list(zip(kernels, strides, strict=True))):
        n = (n - 1) * s + k
    return n


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry name, or the checkpoint's own name for unregistered models
    hub_id: str | None  # "m-a-p/..." for registered models
    sample_rate: int  # Hz the model expects its input at
    frame_rate: float  # hidden-state frames per second (sample_rate / total conv stride)
    num_hidden_states: int  # transformer input + one per layer
    dim: int  # hidden size
    family: str  # "hubert" (MERT, transformers HubertModel) | "data2vec-audio" | "remote" (its own code)
    pre_ln: bool  # True: pre-LN transformer; last hidden state is the final layer-normed output
    input_state: bool = True  # hidden state 0 is the transformer input (v0/v1); False: 0 is block 1 (v2)
    default_window_s: float = 5.0  # the segment window when a run gives none (in the configuration hash)
    context_s: float | None = None  # longest window the model takes; longer ones are refused (None: no limit)
    licence: str | None = None  # SPDX id from the model card; None: not stated here (see the card)
    gated: bool = (
        False  # the hub asks the user to accept terms; a token (HF_TOKEN or the hub login) is needed
    )
    remote_code: bool = (
        False  # ships its own modeling code: only through --trust-remote-code and a pinned ref
    )

    @property
    def num_layers(self) -> int:
        return self.num_hidden_states - (1 if self.input_state else 0)

    @property
    def layers(self) -> tuple[int, ...]:
        """Valid hidden-state indices into the stored states: v0/v1 0 is the transformer input and i the output
        of layer i; v2 (input_state False) i is the output of block i + 1."""
        return tuple(range(self.num_hidden_states))

    @property
    def receptive_field(self) -> int:
        """Samples (at sample_rate) that give one frame: the native conv front end's, or for a model with its own
        code one frame period (its front end is its own)."""
        if self.remote_code:
            return round(self.sample_rate / self.frame_rate)
        return conv_receptive_field(CONV_KERNEL, CONV_STRIDE)

    @property
    def layer_numbering(self) -> str:
        if self.input_state:
            return "0 = transformer input, i = layer i"
        return "0 = block 1, i = block i+1"


_MERT_V2_30S = ModelSpec(
    "MERT-v2-30s", "m-a-p/MERT-v2-30s", 24000, 25.0, 24, 1024, "remote", False, input_state=False,
    default_window_s=30.0, context_s=30.0, licence="CC-BY-NC-4.0", gated=True, remote_code=True,
)  # fmt: skip

REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("MERT-v1-330M", "m-a-p/MERT-v1-330M", 24000, 75.0, 25, 1024, "hubert", True),
        ModelSpec("MERT-v1-95M", "m-a-p/MERT-v1-95M", 24000, 75.0, 13, 768, "hubert", False),
        ModelSpec("MERT-v0-public", "m-a-p/MERT-v0-public", 16000, 50.0, 13, 768, "hubert", False),
        ModelSpec("MERT-v0", "m-a-p/MERT-v0", 16000, 50.0, 13, 768, "hubert", False),
        ModelSpec("music2vec-v1", "m-a-p/music2vec-v1", 16000, 50.0, 13, 768, "data2vec-audio", False),
        # September 2026, their own code (not a transformers class): hidden_states[0] is block 1, 30 s context
        # (FullSong continues from 30-s for whole songs of 30-360 s, same interface). CC BY-NC 4.0, gated.
        _MERT_V2_30S,
        # the same interface and facts, for whole songs: only the name and the context differ
        replace(_MERT_V2_30S, name="MERT-v2-FullSong", hub_id="m-a-p/MERT-v2-FullSong", context_s=360.0),
    )
}
# The models built natively from their config.json (transformers' HubertModel / Data2VecAudioModel).
NATIVE: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if not s.remote_code)

# model_type values found in released config.json files, by family.
MODEL_TYPES: dict[str, str] = {
    "mert_model": "hubert",
    "music_hubert": "hubert",
    "hubert": "hubert",
    "data2vec-audio": "data2vec-audio",
}


def by_hub_id(hub_id: str) -> ModelSpec | None:
    for spec in REGISTRY.values():
        if spec.hub_id == hub_id:
            return spec
    return None


def spec_from_config(name: str, config: dict, sample_rate: int | None = None) -> ModelSpec:
    """Derive the facts of a checkpoint from its config.json (a dict).

    sample_rate: from preprocessor_config.json when config.json has none.
    Raises ValueError naming the field when the config cannot describe a supported model.
    """
    model_type = config.get("model_type")
    family = MODEL_TYPES.get(str(model_type))
    if family is None:
        raise ValueError(
            f"{name}: config.json model_type {model_type!r} is not a supported architecture "
            f"(expected one of {sorted(MODEL_TYPES)})"
        )
    rate = config.get("sample_rate") or sample_rate
    if not rate:
        raise ValueError(f"{name}: neither config.json sample_rate nor preprocessor sampling_rate is set")
    stride = math.prod(config.get("conv_stride", []) or [1])
    pre_ln = family == "hubert" and bool(config.get("do_stable_layer_norm", False))
    registered = by_hub_id(name) or REGISTRY.get(name)
    return ModelSpec(
        name=registered.name if registered else name,
        hub_id=registered.hub_id if registered else None,
        sample_rate=int(rate),
        frame_rate=float(rate) / stride,
        num_hidden_states=int(config["num_hidden_layers"]) + 1,
        dim=int(config["hidden_size"]),
        family=family,
        pre_ln=pre_ln,
    )
