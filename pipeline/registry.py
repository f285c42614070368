"""The model registry: every fact about the MERT family is stated here, once.

Nothing else in the code base hard-codes a sample rate, a layer count or a width; a checkpoint that is not in
the registry (a local fine-tune, a test model) gets a ModelSpec derived from its own config by `spec_from_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registry name, or the checkpoint's own name for unregistered models
    hub_id: str | None  # "m-a-p/..." for registered models
    sample_rate: int  # Hz the model expects its input at
    frame_rate: float  # hidden-state frames per second (sample_rate / total conv stride)
    num_hidden_states: int  # transformer input + one per layer
    dim: int  # hidden size
    family: str  # "hubert" (MERT, transformers HubertModel) | "data2vec-audio"
    pre_ln: bool  # True: pre-LN transformer; last hidden state is the final layer-normed output

    @property
    def num_layers(self) -> int:
        return self.num_hidden_states - 1

    @property
    def layers(self) -> tuple[int, ...]:
        """Valid hidden-state indices: 0 is the transformer input, i the output of layer i."""
        return tuple(range(self.num_hidden_states))


REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("MERT-v1-330M", "m-a-p/MERT-v1-330M", 24000, 75.0, 25, 1024, "hubert", True),
        ModelSpec("MERT-v1-95M", "m-a-p/MERT-v1-95M", 24000, 75.0, 13, 768, "hubert", False),
        ModelSpec("MERT-v0-public", "m-a-p/MERT-v0-public", 16000, 50.0, 13, 768, "hubert", False),
        ModelSpec("MERT-v0", "m-a-p/MERT-v0", 16000, 50.0, 13, 768, "hubert", False),
        ModelSpec("music2vec-v1", "m-a-p/music2vec-v1", 16000, 50.0, 13, 768, "data2vec-audio", False),
    )
}

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
