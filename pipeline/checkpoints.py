"""Random checkpoints in the exact hub layout, for tests, the README's demo mode and benchmarks.

`write_random_checkpoint(dir, like="MERT-v1-95M")` writes what a hub snapshot holds: config.json (for the HuBERT
family as the MERT authors publish it: model_type `mert_model`, an `auto_map` to their remote code, the MERT-only
switches off), preprocessor_config.json (Wav2Vec2FeatureExtractor layout) and random weights as
pytorch_model.bin or model.safetensors, with the positional conv under either weight-norm naming. No weights are
downloaded; nothing here is a trained model.

size="tiny" keeps the real conv strides and kernels (so the frame rate and receptive field are real) with small
widths; size="full" gives the registered model's real shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.models import (
    BIN_FILE,
    CONFIG_FILE,
    PREPROCESSOR_FILE,
    SAFETENSORS_FILE,
    WEIGHT_NORM_NAMES,
    build_model,
)
from pipeline.registry import CONV_KERNEL, CONV_STRIDE, REGISTRY, ModelSpec

HEAD_DIM = 64  # every released MERT / data2vec model: hidden_size / num_attention_heads
FFN_RATIO = 4  # intermediate_size / hidden_size

# The conv front end of every model in the family (wav2vec 2.0 style: 400-sample receptive field, stride 320).
CONV = {
    "conv_dim": [512] * len(CONV_KERNEL),
    "conv_kernel": list(CONV_KERNEL),
    "conv_stride": list(CONV_STRIDE),
}

# Small widths for tests: real strides and kernels, so frame counts are those of the real models.
TINY = {
    "conv_dim": [32] * 7,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
TINY_HUBERT_POS = {"num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4}
TINY_DATA2VEC_POS = {"conv_pos_kernel_size": 5, "num_conv_pos_embedding_groups": 4}


def _hubert_config(spec: ModelSpec) -> dict:
    """config.json as the MERT authors publish it (m-a-p/MERT-v1-95M layout, transformers 4.24 era)."""
    return {
        "_name_or_path": spec.hub_id,
        "activation_dropout": 0.0,
        "apply_spec_augment": True,
        "architectures": ["MERTModel"],
        "attention_dropout": 0.1,
        "attention_relax": 32.0 if spec.pre_ln else -1.0,
        "auto_map": {"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
        "bos_token_id": 1,
        "classifier_proj_size": 256,
        "conv_bias": False,
        **CONV,
        "ctc_loss_reduction": "sum",
        "ctc_zero_infinity": False,
        "deepnorm": False,
        "do_stable_layer_norm": spec.pre_ln,
        "eos_token_id": 2,
        "feat_extract_activation": "gelu",
        "feat_extract_dropout": 0.0,
        # The design table: group-norm conv front end for every MERT model, 330M included (transformers builds
        # HubertGroupNormConvLayer + HubertEncoderStableLayerNorm for this combination without complaint).
        "feat_extract_norm": "group",
        "feat_proj_dropout": 0.1,
        "feat_proj_layer_norm": True,
        "feature_extractor_cqt": False,
        "feature_extractor_cqt_bins": 336,
        "final_dropout": 0.1,
        "gradient_checkpointing": False,
        "hidden_act": "gelu",
        "hidden_dropout": 0.1,
        "hidden_dropout_prob": 0.1,
        "hidden_size": spec.dim,
        "initializer_range": 0.02,
        "intermediate_size": FFN_RATIO * spec.dim,
        "layer_norm_eps": 1e-05,
        "layerdrop": 0.05,
        "mask_feature_length": 10,
        "mask_feature_min_masks": 0,
        "mask_feature_prob": 0.0,
        "mask_time_length": 10,
        "mask_time_min_masks": 2,
        "mask_time_prob": 0.05,
        "model_type": "mert_model",
        "num_attention_heads": spec.dim // HEAD_DIM,
        "num_conv_pos_embedding_groups": 16,
        "num_conv_pos_embeddings": 128,
        "num_feat_extract_layers": len(CONV["conv_dim"]),
        "num_hidden_layers": spec.num_layers,
        "pad_token_id": 0,
        "sample_rate": spec.sample_rate,
        "tokenizer_class": "Wav2Vec2CTCTokenizer",
        "torch_dtype": "float32",
        "transformers_version": "4.24.0",
        "use_weighted_layer_sum": False,
        "vocab_size": 32,
    }


def _data2vec_config(spec: ModelSpec) -> dict:
    """A stock Data2VecAudioConfig (layer-norm conv, stacked positional convs) with the registry's shapes."""
    from transformers import Data2VecAudioConfig

    cfg = Data2VecAudioConfig().to_dict()
    for k in (
        "transformers_version",
        "output_hidden_states",
        "return_dict",
        "dtype",
        "output_attentions",
        "id2label",
        "label2id",
    ):
        cfg.pop(k, None)
    cfg.update(
        _name_or_path=spec.hub_id,
        architectures=["Data2VecAudioModel"],
        model_type="data2vec-audio",
        hidden_size=spec.dim,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.dim // HEAD_DIM,
        intermediate_size=FFN_RATIO * spec.dim,
        output_hidden_size=spec.dim,
        **CONV,
    )
    return cfg


def checkpoint_config(
    like: str = "MERT-v1-95M", size: str = "full", config_overrides: dict | None = None
) -> dict:
    """The config.json dict `write_random_checkpoint` writes."""
    if like not in REGISTRY:
        raise ValueError(f"like={like!r} is not a registry name: one of {sorted(REGISTRY)}")
    if size not in ("tiny", "full"):
        raise ValueError(f"size={size!r} must be 'tiny' or 'full'")
    spec = REGISTRY[like]
    hubert = spec.family == "hubert"
    cfg = _hubert_config(spec) if hubert else _data2vec_config(spec)
    if size == "tiny":
        cfg.update(TINY, **(TINY_HUBERT_POS if hubert else TINY_DATA2VEC_POS))
        if not hubert:
            cfg["output_hidden_size"] = TINY["hidden_size"]
    cfg.update(config_overrides or {})
    return cfg


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict of non-trivial random values: layers differ, norms are not identities."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith(("weight_g", "original0")):  # weight-norm magnitude: positive
            v = 0.5 + torch.rand(shape, generator=gen)
        elif name.endswith("masked_spec_embed"):
            v = torch.rand(shape, generator=gen)
        elif len(shape) == 1 and name.endswith(".weight"):  # layer/group norm scales
            v = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # biases
            v = 0.1 * torch.randn(shape, generator=gen)
        else:  # fan-in scaled, so activations stay O(1) at full size too
            fan_in = max(1, t[0].numel())
            v = torch.randn(shape, generator=gen) / fan_in**0.5
        out[name] = v.to(torch.float32).contiguous()
    return out


def write_random_checkpoint(
    out_dir: str | os.PathLike,
    like: str = "MERT-v1-95M",
    *,
    size: str = "tiny",  # "tiny" | "full"
    seed: int = 0,
    weights: str = "bin",  # "bin" (pytorch_model.bin) | "safetensors" (model.safetensors)
    pos_conv_names: str = "weight_norm",  # "weight_norm" (weight_g/weight_v) | "parametrizations"
    do_normalize: bool | None = None,  # preprocessor_config.json do_normalize; None = False (published 95M)
    config_overrides: dict | None = None,
) -> Path:
    """Write a random checkpoint shaped like registry model `like` in hub layout into `out_dir`; returns it."""
    if weights not in ("bin", "safetensors"):
        raise ValueError(f"weights={weights!r} must be 'bin' or 'safetensors'")
    if pos_conv_names not in ("weight_norm", "parametrizations"):
        raise ValueError(f"pos_conv_names={pos_conv_names!r} must be 'weight_norm' or 'parametrizations'")
    cfg = checkpoint_config(like, size, config_overrides)
    spec = REGISTRY[like]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    state = _randomize(build_model(cfg, str(out)), seed)
    if pos_conv_names == "weight_norm":
        back = {new: old for old, new in WEIGHT_NORM_NAMES.items()}
        renamed = {}
        for k, v in state.items():
            for new, old in back.items():
                if k.endswith("." + new):
                    k = k[: -len(new)] + old
            renamed[k] = v
        state = renamed
    # (the other naming is what the built model uses already)

    with open(out / CONFIG_FILE, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    preprocessor = {
        "do_normalize": bool(do_normalize),
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "padding_side": "right",
        "padding_value": 0,
        "return_attention_mask": True,
        "sampling_rate": int(cfg.get("sample_rate") or spec.sample_rate),
    }
    with open(out / PREPROCESSOR_FILE, "w") as f:
        json.dump(preprocessor, f, indent=2)
    for stale in (BIN_FILE, SAFETENSORS_FILE):
        (out / stale).unlink(missing_ok=True)
    if weights == "bin":
        torch.save(state, out / BIN_FILE)
    else:
        from safetensors.torch import save_file

        save_file(state, str(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    return out


# The MERT-v2 interface in miniature: the checkpoint ships its own code (pipeline/testing/mert2_like), loaded by
# transformers through auto_map, as a hub repository of MERT-v2 is.
REMOTE_CODE_DIR = Path(__file__).resolve().parent / "testing" / "mert2_like"
REMOTE_CODE_FILES = (
    "configuration_mert2_like.py",
    "modeling_mert2_like.py",
    "feature_extraction_mert2_like.py",
)


def write_remote_code_checkpoint(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    num_hidden_layers: int = 24,
    hidden_size: int = 32,
    licence: str | None = "cc-by-nc-4.0",
    auto_map_model: str = "modeling_mert2_like.Mert2LikeModel",
) -> Path:
    """Write a tiny random checkpoint that needs its own code: config.json with `auto_map`, the code files,
    preprocessor_config.json (its own feature extractor), model.safetensors and a model card (README.md) whose
    front matter names the licence, as a hub snapshot of MERT-v2 holds them. Returns `out_dir`."""
    import importlib.util
    import shutil
    import sys

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / name, out / name)
    config = {
        "model_type": "mert2_like",
        "architectures": ["Mert2LikeModel"],
        "auto_map": {
            "AutoConfig": "configuration_mert2_like.Mert2LikeConfig",
            "AutoModel": auto_map_model,
        },
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 2,
        "intermediate_size": 2 * hidden_size,
        "frame_stride": 960,
        "sample_rate": 24000,
        "transformers_version": "4.53.2",
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    preprocessor = {
        "feature_extractor_type": "Mert2LikeFeatureExtractor",
        "auto_map": {"AutoFeatureExtractor": "feature_extraction_mert2_like.Mert2LikeFeatureExtractor"},
        "feature_size": 1,
        "sampling_rate": 24000,
        "padding_value": 0.0,
    }
    (out / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor, indent=2, sort_keys=True))
    card = "---\n" + (f"license: {licence}\n" if licence else "") + "tags: [music, test]\n---\n"
    (out / "README.md").write_text(card + "# A tiny random MERT-v2-like checkpoint (meaningless weights)\n")
    # Build the model from the code files as a package of their own, to get the state dict's names and shapes.
    pkg = f"_mert2_like_writer_{seed}_{os.getpid()}"
    spec = importlib.util.spec_from_file_location(
        pkg, REMOTE_CODE_DIR / "__init__.py", submodule_search_locations=[str(REMOTE_CODE_DIR)]
    )
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import the fixture code in {REMOTE_CODE_DIR}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[pkg] = module
    spec.loader.exec_module(module)
    try:
        modeling = importlib.import_module(f"{pkg}.modeling_mert2_like")
        configuration = importlib.import_module(f"{pkg}.configuration_mert2_like")
        cfg = configuration.Mert2LikeConfig(
            **{
                k: v
                for k, v in config.items()
                if k not in ("model_type", "architectures", "auto_map", "transformers_version")
            }
        )
        torch.manual_seed(seed)
        model = modeling.Mert2LikeModel(cfg)
        state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    finally:
        for name in [n for n in sys.modules if n == pkg or n.startswith(pkg + ".")]:
            del sys.modules[name]
    save_file(state, str(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    return out
