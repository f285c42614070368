"""Embedder parity: every selected layer equals an independent computation with transformers' own model.

The reference here builds HubertModel / Data2VecAudioModel from config.json itself, loads the state dict itself
(renaming the weight-norm keys), runs every segment alone with output_hidden_states=True and takes the time
mean. Tiny random checkpoints in the exact hub layout, CPU, float32.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.checkpoints import write_random_checkpoint
from pipeline.embed import Embedder
from pipeline.models import load_model, num_frames
from pipeline.registry import REGISTRY

RTOL = 1e-5

# name -> (registry model it is shaped like, write_random_checkpoint options)
CHECKPOINTS = {
    "post_ln": ("MERT-v1-95M", {"weights": "bin", "pos_conv_names": "weight_norm", "seed": 1}),
    "pre_ln": (
        "MERT-v1-330M",
        {
            "weights": "bin",
            "pos_conv_names": "weight_norm",
            "seed": 2,
            "config_overrides": {"num_hidden_layers": 3},
        },
    ),
    "data2vec": ("music2vec-v1", {"weights": "safetensors", "seed": 3}),
    "hubert_param": ("MERT-v0", {"weights": "safetensors", "pos_conv_names": "parametrizations", "seed": 4}),
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep the staged-model and content-hash caches out of the user's home."""
    monkeypatch.setenv("MERT_PIPELINE_CACHE", str(tmp_path_factory.getbasetemp() / "mert-cache"))


@pytest.fixture(scope="module")
def ckpt_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        name: str(write_random_checkpoint(root / name, like, size="tiny", **opts))
        for name, (like, opts) in CHECKPOINTS.items()
    }


@pytest.fixture(scope="module")
def references(ckpt_dirs) -> dict[str, torch.nn.Module]:
    return {name: reference_model(d) for name, d in ckpt_dirs.items()}


def reference_model(ckpt_dir: str) -> torch.nn.Module:
    """transformers' model built from config.json and loaded by hand (independent of pipeline.models)."""
    from safetensors.torch import load_file
    from transformers import Data2VecAudioConfig, Data2VecAudioModel, HubertConfig, HubertModel

    with open(f"{ckpt_dir}/config.json") as f:
        cfg = json.load(f)
    if cfg["model_type"] == "data2vec-audio":
        cfg_cls, model_cls = Data2VecAudioConfig, Data2VecAudioModel
    else:
        cfg_cls, model_cls = HubertConfig, HubertModel
    fields = set(cfg_cls().to_dict()) - {
        "architectures",
        "model_type",
        "transformers_version",
        "_name_or_path",
    }
    model = model_cls(cfg_cls(**{k: v for k, v in cfg.items() if k in fields})).eval()
    try:
        state = load_file(f"{ckpt_dir}/model.safetensors")
    except FileNotFoundError:
        state = torch.load(f"{ckpt_dir}/pytorch_model.bin", weights_only=True)
    state = {
        k.replace("conv.weight_g", "conv.parametrizations.weight.original0").replace(
            "conv.weight_v", "conv.parametrizations.weight.original1"
        ): v
        for k, v in state.items()
    }
    model.load_state_dict(state, strict=True)
    return model


def normalized(x: np.ndarray, sr: int) -> np.ndarray:
    """What transformers' Wav2Vec2FeatureExtractor feeds the model with do_normalize=True."""
    from transformers import Wav2Vec2FeatureExtractor

    fe = Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=sr)
    return fe(x, sampling_rate=sr, return_tensors="np").input_values[0].astype(np.float32)


def reference_states(model: torch.nn.Module, x: np.ndarray, pre_ln: bool) -> tuple[np.ndarray, np.ndarray]:
    """One segment alone: (original-semantics hidden states (S, T, D), transformers' raw last entry (T, D))."""
    with torch.no_grad():
        out = model(torch.from_numpy(x)[None], output_hidden_states=True)
    hs = [h[0].numpy() for h in out.hidden_states]
    raw_last = hs[-1]
    if pre_ln:  # original MERT: the last entry is the final layer-normed output
        hs[-1] = out.last_hidden_state[0].numpy()
    return np.stack(hs), raw_last


def close(a: np.ndarray, b: np.ndarray, rtol: float = RTOL) -> bool:
    return a.shape == b.shape and float(np.abs(a - b).max()) <= rtol * float(np.abs(b).max())


def segments(sr: int, lengths=(4000, 6400, 4000, 5200, 6400, 4000), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = [np.arange(n) / sr for n in lengths]
    # tone + noise with an offset and a scale, so normalization changes the input
    return [
        (0.3 * np.sin(2 * np.pi * 440 * ti) + 0.2 * rng.standard_normal(len(ti)) + 0.05).astype(np.float32)
        for ti in t
    ]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("normalize", [False, True])
def test_every_layer_matches_transformers_run_alone(ckpt_dirs, references, name, normalize):
    loaded = load_model(ckpt_dirs[name])
    emb = Embedder(loaded, normalize=normalize, device="cpu")
    segs = segments(loaded.spec.sample_rate)
    got = emb.embed_segments(segs, batch_size=2)  # mixed lengths: grouped, never padded
    assert len(got) == len(segs)
    for seg, vec in zip(segs, got, strict=True):
        x = normalized(seg, loaded.spec.sample_rate) if normalize else seg
        ref, _ = reference_states(references[name], x, loaded.spec.pre_ln)
        assert vec.shape == (loaded.spec.num_hidden_states, loaded.spec.dim)
        assert vec.dtype == np.float32
        for layer in range(loaded.spec.num_hidden_states):
            assert close(vec[layer], ref[layer].mean(axis=0)), (name, layer)
    # layers really differ (a model that returned one state everywhere would fail above only by luck)
    assert not np.allclose(got[0][0], got[0][-1], atol=1e-3)


def test_pre_ln_last_entry_is_final_layer_norm_not_transformers_raw_stream(ckpt_dirs, references):
    loaded = load_model(ckpt_dirs["pre_ln"])
    assert loaded.spec.pre_ln
    seg = segments(loaded.spec.sample_rate, lengths=(6000,))[0]
    ref, raw_last = reference_states(references["pre_ln"], seg, pre_ln=True)
    last = loaded.spec.num_layers
    vec = Embedder(loaded, layers=[last], normalize=False).embed(seg[None])[0, 0]
    assert close(vec, ref[last].mean(axis=0))
    assert not np.allclose(vec, raw_last.mean(axis=0), rtol=1e-3, atol=1e-3)
    # entries below the last are the un-normalized residual stream: equal to transformers' raw entries
    below = Embedder(loaded, layers=[last - 1], normalize=False).embed(seg[None])[0, 0]
    assert close(below, ref[last - 1].mean(axis=0))


@pytest.mark.parametrize("name", ["post_ln", "pre_ln", "data2vec"])
def test_frame_granularity_is_the_unpooled_hidden_states(ckpt_dirs, references, name):
    loaded = load_model(ckpt_dirs[name])
    emb = Embedder(loaded, granularity="frame", normalize=False)
    segs = segments(loaded.spec.sample_rate, lengths=(4800, 4800, 5600))
    got = emb.embed_segments(segs, batch_size=8)
    for seg, frames in zip(segs, got, strict=True):
        ref, _ = reference_states(references[name], seg, loaded.spec.pre_ln)
        assert frames.shape == (loaded.spec.num_hidden_states, emb.frames(len(seg)), loaded.spec.dim)
        assert close(frames, ref)


@pytest.mark.parametrize("name", ["post_ln", "pre_ln"])
def test_layer_subsets_keep_order_and_values(ckpt_dirs, name):
    loaded = load_model(ckpt_dirs[name])
    x = np.stack(segments(loaded.spec.sample_rate, lengths=(5000, 5000)))
    full = Embedder(loaded).embed(x)  # (B, S, D)
    last = loaded.spec.num_layers
    for subset in ([1], [2, 0], [last], [0, last], [1, 2]):
        part = Embedder(loaded, layers=subset).embed(x)  # runs only the layers it needs
        assert part.shape == (2, len(subset), loaded.spec.dim)
        assert close(part, full[:, subset]), subset


def test_batch_equals_one_by_one(ckpt_dirs):
    for name in ("post_ln", "pre_ln", "data2vec"):
        loaded = load_model(ckpt_dirs[name])
        emb = Embedder(loaded, normalize=True)
        x = np.stack(segments(loaded.spec.sample_rate, lengths=(6000,) * 4, seed=5))
        batch = emb.embed(x)
        singles = np.concatenate([emb.embed(x[i : i + 1]) for i in range(len(x))])
        assert close(batch, singles), name


def test_embed_segments_mixed_lengths_in_input_order(ckpt_dirs):
    loaded = load_model(ckpt_dirs["post_ln"])
    emb = Embedder(loaded)
    segs = segments(loaded.spec.sample_rate, lengths=(4000, 7000, 4000, 5000, 7000, 4000, 4000), seed=9)
    got = emb.embed_segments(segs, batch_size=3)
    for seg, vec in zip(segs, got, strict=True):
        assert close(vec, emb.embed(seg[None])[0])
    assert emb.embed_segments([], batch_size=4) == []


def test_normalization_follows_the_checkpoint_unless_overridden(tmp_path, ckpt_dirs):
    d = write_random_checkpoint(tmp_path / "norm", "MERT-v1-95M", do_normalize=True, seed=1)
    loaded = load_model(str(d))
    assert loaded.do_normalize is True
    assert Embedder(loaded).normalize is True
    assert Embedder(loaded, normalize=False).normalize is False
    assert load_model(ckpt_dirs["post_ln"]).do_normalize is False
    seg = segments(loaded.spec.sample_rate, lengths=(5000,))[0]
    on = Embedder(loaded).embed(seg[None])
    off = Embedder(loaded, normalize=False).embed(seg[None])
    assert not np.allclose(on, off, atol=1e-4)
    # normalization removes gain and offset
    assert close(Embedder(loaded).embed((3.0 * seg + 0.5)[None]), on, rtol=1e-4)


def test_num_frames_is_the_conv_length_formula(ckpt_dirs, references):
    loaded = load_model(ckpt_dirs["post_ln"])
    cfg = loaded.config
    ref_model = references["post_ln"]
    for n in (399, 400, 401, 719, 720, 4000, 24000, 120000):
        expected = int(ref_model._get_feat_extract_output_lengths(torch.tensor(n)))
        assert num_frames(n, cfg) == max(expected, 0)
    assert num_frames(0, cfg) == 0
    spec = REGISTRY["MERT-v1-95M"]
    # the frame rate of the registry: one frame per total stride
    assert num_frames(spec.sample_rate * 5, cfg) == pytest.approx(spec.frame_rate * 5, abs=1)
    with torch.no_grad():
        t = ref_model(torch.zeros(1, 4000)).last_hidden_state.shape[1]
    assert t == num_frames(4000, cfg)


def test_too_short_segment_is_a_clear_error(ckpt_dirs):
    emb = Embedder(load_model(ckpt_dirs["post_ln"]))
    field = 400  # receptive field of the conv front end (kernel 10 stride 5, then 3,3,3,3,2,2 at stride 2)
    assert emb.frames(field) == 1 and emb.frames(field - 1) == 0
    with pytest.raises(ValueError, match="399 samples"):
        emb.embed(np.zeros((2, field - 1), np.float32))
    with pytest.raises(ValueError, match="399 samples"):
        emb.embed_segments([np.zeros(field, np.float32), np.zeros(field - 1, np.float32)], batch_size=4)
    assert emb.embed(np.zeros((1, field), np.float32)).shape == (1, 3, 32)


def test_bad_settings_are_clear_errors(ckpt_dirs):
    loaded = load_model(ckpt_dirs["post_ln"])
    with pytest.raises(ValueError, match="CUDA"):
        Embedder(loaded, dtype="bfloat16", device="cpu")
    with pytest.raises(ValueError, match="granularity"):
        Embedder(loaded, granularity="track")
    with pytest.raises(ValueError, match="layers"):
        Embedder(loaded, layers=[0, 3])
    with pytest.raises(ValueError, match="layers"):
        Embedder(loaded, layers=[1, 1])
    with pytest.raises(ValueError, match="out_dtype"):
        Embedder(loaded, out_dtype="bfloat16")
    emb = Embedder(loaded)
    with pytest.raises(ValueError, match="shape"):
        emb.embed(np.zeros(4000, np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        emb.embed_segments([np.zeros(4000, np.float32)], batch_size=0)


def test_float16_storage_and_recording_granularity(ckpt_dirs):
    loaded = load_model(ckpt_dirs["data2vec"])
    x = np.stack(segments(loaded.spec.sample_rate, lengths=(4000, 4000)))
    ref = Embedder(loaded).embed(x)
    half = Embedder(loaded, out_dtype="float16").embed(x)
    assert half.dtype == np.float16
    assert np.allclose(half.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    rec = Embedder(loaded, granularity="recording").embed(x)
    assert close(rec, ref)
    assert Embedder(loaded, device="auto").device.type in ("cpu", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float32_matches_cpu_and_half_types_run(ckpt_dirs):
    cpu = load_model(ckpt_dirs["pre_ln"])
    x = np.stack(segments(cpu.spec.sample_rate, lengths=(6000, 6000)))
    ref = Embedder(cpu).embed(x)
    gpu = Embedder(load_model(ckpt_dirs["pre_ln"]), device="cuda").embed(x)
    assert close(gpu, ref, rtol=1e-4)
    for dtype in ("bfloat16", "float16"):
        out = Embedder(load_model(ckpt_dirs["pre_ln"]), device="cuda", dtype=dtype).embed(x)
        assert out.dtype == np.float32 and np.isfinite(out).all()
        assert np.allclose(out, ref, rtol=0.1, atol=0.1)
