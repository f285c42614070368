"""The loader: hub layout without remote code, strict weights, clear errors, object-storage staging, hub cache."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoints import checkpoint_config, write_random_checkpoint
from pipeline.embed import Embedder
from pipeline.errors import ModelLoadError
from pipeline.models import (
    build_model,
    check_config_bounds,
    content_hash,
    load_model,
    read_model_config,
    resolve_model_dir,
)
from pipeline.registry import NATIVE, REGISTRY

MARKER_ENV = "MERT_TEST_PICKLE_MARKER"


class _Exploit:
    """A pickle payload: unpickling it would run code (it writes a marker file). weights_only must refuse it."""

    def __reduce__(self):
        return (open, (os.environ.get(MARKER_ENV, "/tmp/never"), "w"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "MERT-tiny", "MERT-v1-95M", seed=7)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _sd(d: Path) -> dict:
    return torch.load(d / "pytorch_model.bin", weights_only=True)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep the staged-model and content-hash caches out of the user's home."""
    monkeypatch.setenv("MERT_PIPELINE_CACHE", str(tmp_path_factory.getbasetemp() / "mert-cache"))


# ------------------------------------------------------------------------------------------------------------
# Hub layout, remote code ignored, both weight-norm namings


def test_hub_layout_loads_without_remote_code(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "mert_model" and "auto_map" in cfg and cfg["architectures"] == ["MERTModel"]
    assert not cfg["feature_extractor_cqt"] and not cfg["deepnorm"] and cfg["attention_relax"] == -1.0
    keys = _sd(tiny)
    assert "encoder.pos_conv_embed.conv.weight_g" in keys and "encoder.pos_conv_embed.conv.weight_v" in keys
    assert "masked_spec_embed" in keys
    loaded = load_model(str(tiny))
    assert type(loaded.model).__name__ == "HubertModel"
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "sdpa"
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.spec.sample_rate == REGISTRY["MERT-v1-95M"].sample_rate
    assert loaded.spec.num_hidden_states == cfg["num_hidden_layers"] + 1
    assert loaded.revision is None and loaded.local_dir == str(tiny) and loaded.source == str(tiny)
    assert len(loaded.content_hash) == 64
    # every weight of the file is in the model (weight-norm g/v mapped onto the parametrization)
    pos = loaded.model.encoder.pos_conv_embed.conv.parametrizations.weight
    assert torch.equal(pos.original0, keys["encoder.pos_conv_embed.conv.weight_g"])
    assert torch.equal(pos.original1, keys["encoder.pos_conv_embed.conv.weight_v"])


@pytest.mark.parametrize("like", ["MERT-v1-95M", "MERT-v1-330M", "music2vec-v1"])
def test_weight_norm_names_and_formats_give_the_same_model(tmp_path, like):
    a = write_random_checkpoint(tmp_path / "a", like, seed=3, weights="bin", pos_conv_names="weight_norm")
    b = write_random_checkpoint(
        tmp_path / "b", like, seed=3, weights="safetensors", pos_conv_names="parametrizations"
    )
    assert (b / "model.safetensors").exists() and not (b / "pytorch_model.bin").exists()
    la, lb = load_model(str(a)), load_model(str(b))
    x = np.random.default_rng(0).standard_normal((1, 5000)).astype(np.float32)
    assert np.array_equal(Embedder(la).embed(x), Embedder(lb).embed(x))
    assert la.content_hash != lb.content_hash


def test_safetensors_preferred_and_content_hash_cached(tmp_path):
    d = write_random_checkpoint(tmp_path / "c", "MERT-v0", seed=1, weights="safetensors")
    torch.save({"garbage": torch.zeros(1)}, d / "pytorch_model.bin")  # ignored: safetensors wins
    first = load_model(str(d))
    assert first.content_hash == content_hash(str(d)) == load_model(str(d)).content_hash
    write_random_checkpoint(d, "MERT-v0", seed=2, weights="safetensors")
    assert load_model(str(d)).content_hash != first.content_hash


def test_the_drivers_check_builds_a_checkpoint_once_per_node_and_again_when_it_changes(tmp_path, monkeypatch):
    """check_only (the driver's check before a run): a checkpoint never strictly loaded on this node is built and
    loaded strictly (a broken one fails); once it has been, the check skips the build and returns every fact but
    the model; changed weights are another content hash, checked again from scratch."""
    import pipeline.models as models

    monkeypatch.setenv("MERT_PIPELINE_CACHE", str(tmp_path / "cache"))
    d = write_random_checkpoint(tmp_path / "c", "MERT-v0", seed=1)
    builds = []
    real = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: builds.append(1) or real(*a, **k))
    first = load_model(str(d), check_only=True)
    assert first.model is not None and len(builds) == 1
    again = load_model(str(d), check_only=True)
    assert again.model is None and len(builds) == 1  # not built again
    full = load_model(str(d))
    assert full.model is not None and len(builds) == 2  # a full load (the actors') always builds
    assert (again.spec, again.content_hash, again.config, again.do_normalize) == (
        full.spec,
        full.content_hash,
        full.config,
        full.do_normalize,
    )
    with pytest.raises(ValueError, match="check-only"):
        Embedder(again, device="cpu")
    # the same files with truncated weights: another content hash, so the check loads strictly and fails
    weights = d / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError):
        load_model(str(d), check_only=True)


def test_a_cached_check_imports_no_torch_and_its_provenance_names_torchs_build(tmp_path, monkeypatch):
    """The driver's check of a checkpoint this node has loaded strictly before, and the run's provenance, import
    no torch (about 2 CPU s of every run's start); the versions it records are torch's own, build tag included."""
    monkeypatch.setenv("MERT_PIPELINE_CACHE", str(tmp_path / "cache"))
    d = write_random_checkpoint(tmp_path / "c", "MERT-v0", seed=1)
    assert load_model(str(d), check_only=True).model is not None  # the first check builds, and marks it
    code = textwrap.dedent(
        f"""
        import json, sys
        from pipeline.config import RunConfig
        from pipeline.engine.plan import model_facts
        from pipeline.engine.run import _versions
        from pipeline.models import load_model
        loaded = load_model({str(d)!r}, check_only=True)
        facts = model_facts(RunConfig(input="in", output="out", model={str(d)!r}), loaded)
        print(json.dumps({{"built": loaded.model is not None, "torch_imported": "torch" in sys.modules,
                          "provenance": [facts.provenance["torch_version"], facts.provenance["cuda_version"]],
                          "versions": _versions()["torch"]}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {
        "built": False,
        "torch_imported": False,
        "provenance": [str(torch.__version__), torch.version.cuda],
        "versions": str(torch.__version__),
    }


def test_masked_spec_embed_is_optional(tmp_path):
    d = write_random_checkpoint(tmp_path / "m", "MERT-v1-95M", seed=1)
    sd = _sd(d)
    sd.pop("masked_spec_embed")
    torch.save(sd, d / "pytorch_model.bin")
    load_model(str(d))  # training-only vector: a file without it still loads
    d0 = write_random_checkpoint(
        tmp_path / "m0", "MERT-v1-95M", seed=1, config_overrides={"mask_time_prob": 0.0}
    )
    assert "masked_spec_embed" not in _sd(d0)
    load_model(str(d0))


def test_head_model_prefix_is_stripped(tmp_path, tiny):
    d = _copy(tiny, tmp_path / "prefixed")
    torch.save({"hubert." + k: v for k, v in _sd(d).items()}, d / "pytorch_model.bin")
    load_model(str(d))


# ------------------------------------------------------------------------------------------------------------
# The five registered models: configs shaped like them build models matching the registry


@pytest.mark.parametrize("name", NATIVE)
def test_full_size_configs_match_the_registry(tmp_path, name):
    spec = REGISTRY[name]
    cfg = checkpoint_config(name, size="full")
    model = build_model(cfg)  # built from config only (no weights, no run)
    assert len(model.encoder.layers) + 1 == spec.num_hidden_states
    assert model.config.hidden_size == spec.dim
    expected_encoder = (
        "HubertEncoderStableLayerNorm"
        if spec.pre_ln
        else ("HubertEncoder" if spec.family == "hubert" else "Data2VecAudioEncoder")
    )
    assert type(model.encoder).__name__ == expected_encoder
    if spec.family == "hubert":  # group-norm conv front end for every MERT model, 330M included
        assert type(model.feature_extractor.conv_layers[0]).__name__ == "HubertGroupNormConvLayer"
    else:
        assert len(model.encoder.pos_conv_embed.layers) == cfg["num_conv_pos_embeddings"]
    # the spec the loader derives from the configs alone (no weights in the directory)
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "preprocessor_config.json").write_text(
        json.dumps({"sampling_rate": spec.sample_rate, "do_normalize": True})
    )
    got, config, do_norm = read_model_config(str(d))
    assert (got.num_hidden_states, got.dim, got.sample_rate, got.frame_rate, got.family, got.pre_ln) == (
        spec.num_hidden_states,
        spec.dim,
        spec.sample_rate,
        spec.frame_rate,
        spec.family,
        spec.pre_ln,
    )
    assert config == cfg and do_norm is True


@pytest.fixture(scope="module")
def full_95m(tmp_path_factory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("full") / "MERT-v1-95M", "MERT-v1-95M", size="full"
    )


def test_full_size_95m_random_checkpoint_loads_and_embeds_five_seconds(full_95m):
    loaded = load_model(str(full_95m))
    spec = REGISTRY["MERT-v1-95M"]
    out = Embedder(loaded).embed(
        np.random.default_rng(0).standard_normal((1, 5 * spec.sample_rate)).astype(np.float32)
    )
    assert out.shape == (1, spec.num_hidden_states, spec.dim) and np.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------------
# Hub ids: offline errors, and a pre-populated hub cache


def _offline(monkeypatch, cache: Path) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))


def _hub_cache(cache: Path, repo_id: str, ckpt: Path, commit: str) -> None:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for p in ckpt.iterdir():
        (snap / p.name).symlink_to(p)


def test_hub_unreachable_is_a_clear_error(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "empty-hf-cache")
    with pytest.raises(
        ModelLoadError,
        match="m-a-p/MERT-v1-95M.*hub is unreachable.*local directory or an object-storage prefix",
    ):
        load_model("MERT-v1-95M")
    with pytest.raises(ModelLoadError, match="hub is unreachable"):
        read_model_config("m-a-p/MERT-v0@main")


def test_hub_id_loads_from_the_hub_cache_and_reports_the_revision(tmp_path, monkeypatch, full_95m, tiny):
    cache = tmp_path / "hf"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _hub_cache(cache, "m-a-p/MERT-v1-95M", full_95m, commit)
    _hub_cache(cache, "someone/tiny-mert", tiny, commit)
    _offline(monkeypatch, cache)
    loaded = load_model("MERT-v1-95M")
    assert loaded.revision == commit and loaded.spec == REGISTRY["MERT-v1-95M"]
    assert loaded.source == "MERT-v1-95M"
    assert load_model(f"m-a-p/MERT-v1-95M@{commit}").revision == commit
    assert read_model_config("m-a-p/MERT-v1-95M")[0] == REGISTRY["MERT-v1-95M"]
    other = load_model("someone/tiny-mert")  # an unregistered hub id gets a derived spec
    assert other.revision == commit and other.spec.hub_id is None


def test_registered_name_must_match_the_registry(tmp_path, monkeypatch, tiny):
    cache = tmp_path / "hf"
    _hub_cache(cache, "m-a-p/MERT-v1-95M", tiny, "f" * 40)
    _offline(monkeypatch, cache)
    with pytest.raises(ModelLoadError, match="does not match the registry entry MERT-v1-95M"):
        load_model("MERT-v1-95M")


# ------------------------------------------------------------------------------------------------------------
# Bad checkpoints: each gives its clear error naming the path


def _bad(tmp_path: Path, tiny: Path, name: str) -> Path:
    return _copy(tiny, tmp_path / name)


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_config(tmp_path, tiny):
    d = _bad(tmp_path, tiny, "noconfig")
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=f"{d}.*no config.json"):
        load_model(str(d))


@pytest.mark.parametrize("model_type", ["wav2vec2", None])
def test_unknown_model_type(tmp_path, tiny, model_type):
    d = _bad(tmp_path, tiny, "unknown")
    _edit_config(d, model_type=model_type)
    with pytest.raises(ModelLoadError, match=f"{d}.*model_type {model_type!r}.*not a supported architecture"):
        load_model(str(d))


@pytest.mark.parametrize("switch", ["feature_extractor_cqt", "deepnorm"])
def test_refused_switches(tmp_path, tiny, switch):
    d = _bad(tmp_path, tiny, switch)
    _edit_config(d, **{switch: True})
    with pytest.raises(ModelLoadError, match=f"{d}.*{switch}=true"):
        load_model(str(d))
    with pytest.raises(ModelLoadError, match=f"{switch}=true"):
        read_model_config(str(d))


def test_attention_relax_is_ignored(tmp_path, tiny):
    d = _bad(tmp_path, tiny, "relax")
    _edit_config(d, attention_relax=32.0)
    x = np.ones((1, 4000), np.float32)
    assert np.array_equal(Embedder(load_model(str(d))).embed(x), Embedder(load_model(str(tiny))).embed(x))


def test_missing_weights(tmp_path, tiny):
    d = _bad(tmp_path, tiny, "noweights")
    (d / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match=f"{d}.*no weights file.*model.safetensors or pytorch_model.bin"):
        load_model(str(d))


def test_missing_key(tmp_path, tiny):
    d = _bad(tmp_path, tiny, "missing")
    sd = _sd(d)
    sd.pop("encoder.layers.1.attention.q_proj.weight")
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(
        ModelLoadError, match=r"pytorch_model.bin.*1 missing keys \['encoder.layers.1.attention"
    ):
        load_model(str(d))


def test_unexpected_key(tmp_path, tiny):
    d = _bad(tmp_path, tiny, "unexpected")
    sd = _sd(d)
    sd["encoder.layers.2.attention.q_proj.weight"] = torch.zeros(2, 2)
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=rf"{d}/pytorch_model.bin.*unexpected keys \['encoder.layers.2"):
        load_model(str(d))


def test_shape_mismatch(tmp_path, tiny):
    d = _bad(tmp_path, tiny, "shape")
    _edit_config(d, intermediate_size=48)  # the config no longer describes the weights
    with pytest.raises(ModelLoadError, match=rf"{d}/pytorch_model.bin.*wrong shape.*intermediate_dense"):
        load_model(str(d))


def test_training_checkpoint_dict_is_refused(tmp_path, tiny):
    d = _bad(tmp_path, tiny, "training")
    torch.save({"model": _sd(d), "epoch": 3, "optimizer": {}}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=rf"{d}/pytorch_model.bin.*not a plain state dict.*'model'"):
        load_model(str(d))


def test_pickle_with_code_is_refused_and_never_run(tmp_path, tiny, monkeypatch):
    d = _bad(tmp_path, tiny, "pickle")
    marker = tmp_path / "pwned"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    torch.save({"encoder.layer_norm.weight": _Exploit()}, d / "pytorch_model.bin")
    assert not marker.exists()
    with pytest.raises(
        ModelLoadError, match=rf"{d}/pytorch_model.bin.*refused by torch.load\(weights_only=True\)"
    ):
        load_model(str(d))
    assert not marker.exists()


def test_bad_references(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="empty"):
        load_model("  ")


# ------------------------------------------------------------------------------------------------------------
# Object storage: staged once per node, concurrent loads safe


def _upload(tiny: Path, s3_options: dict, uri: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    for p in tiny.iterdir():
        fs.put_file(str(p), f"{uri}/{p.name}")


@pytest.fixture
def count_downloads(monkeypatch):
    import s3fs

    calls: list[str] = []
    real = s3fs.S3FileSystem._get_file

    async def counting(self, rpath, lpath, **kw):
        calls.append(rpath)
        return await real(self, rpath, lpath, **kw)

    # instances bind their sync wrappers at creation: start from fresh ones, and leave none holding the spy
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", counting)
    yield calls
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_prefix_is_staged_once_and_restaged_when_it_changes(
    tmp_path, tiny, s3_options, s3_bucket, count_downloads
):
    uri = f"s3://{s3_bucket}/models/MERT-tiny"
    _upload(tiny, s3_options, uri)
    cache = tmp_path / "cache"
    loaded = load_model(uri + "/", storage_options=s3_options, cache_dir=str(cache))
    assert loaded.source == uri + "/" and loaded.revision is None
    assert Path(loaded.local_dir).parent == cache
    assert len(count_downloads) == 3  # config, preprocessor, weights
    assert loaded.content_hash == load_model(str(tiny)).content_hash
    again = load_model(uri, storage_options=s3_options, cache_dir=str(cache))
    assert again.local_dir == loaded.local_dir and len(count_downloads) == 3  # reused, nothing downloaded
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        Path(loaded.local_dir).name
    ]
    assert read_model_config(uri, storage_options=s3_options)[0] == loaded.spec
    # a new checkpoint under the same prefix is staged again
    other = write_random_checkpoint(tmp_path / "other", "MERT-v1-95M", seed=99)
    _upload(other, s3_options, uri)
    changed = load_model(uri, storage_options=s3_options, cache_dir=str(cache))
    assert changed.local_dir != loaded.local_dir and changed.content_hash != loaded.content_hash
    # secrets never appear in messages
    with pytest.raises(ModelLoadError, match="no config.json") as err:
        load_model(f"s3://{s3_bucket}/models/", storage_options=s3_options, cache_dir=str(cache))
    assert s3_options["secret"] not in str(err.value)


def test_s3_prefix_without_weights_or_missing(tmp_path, tiny, s3_options, s3_bucket):
    uri = f"s3://{s3_bucket}/models/noweights"
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    fs.put_file(str(tiny / "config.json"), f"{uri}/config.json")
    with pytest.raises(ModelLoadError, match=f"{uri}: no weights file"):
        load_model(uri, storage_options=s3_options, cache_dir=str(tmp_path))
    spec, _, do_norm = read_model_config(uri, storage_options=s3_options)  # configs alone are enough
    assert spec.dim == 32 and do_norm is False
    with pytest.raises(ModelLoadError, match="no such prefix|no config.json"):
        load_model(f"s3://{s3_bucket}/absent", storage_options=s3_options, cache_dir=str(tmp_path))


def test_concurrent_threads_download_once(tmp_path, tiny, s3_options, s3_bucket, count_downloads):
    uri = f"s3://{s3_bucket}/models/threads"
    _upload(tiny, s3_options, uri)
    cache = tmp_path / "cache"
    results, errors = [], []

    def go():
        try:
            results.append(resolve_model_dir(uri, s3_options, str(cache)))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r for r in results}) == 1 and len(count_downloads) == 3


_STAGE = """
import json, sys
from pipeline.models import resolve_model_dir
print(json.dumps(resolve_model_dir(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3])[0]))
"""


def test_concurrent_processes_stage_one_copy(tmp_path, tiny, s3_options, s3_bucket):
    uri = f"s3://{s3_bucket}/models/procs"
    _upload(tiny, s3_options, uri)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _STAGE, uri, json.dumps(s3_options), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    dirs = {json.loads(o[0].strip().splitlines()[-1]) for o in outs}
    assert len(dirs) == 1
    staged = Path(dirs.pop())
    assert sorted(p.name for p in staged.iterdir()) == [
        ".complete",
        "config.json",
        "preprocessor_config.json",
        "pytorch_model.bin",
    ]
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []  # no half-written copies left
    assert (staged / "pytorch_model.bin").read_bytes() == (tiny / "pytorch_model.bin").read_bytes()


# ---- config bounds: a hostile config.json fails before anything is built --------------------------------------
@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"hidden_size": 10**6}, "hidden_size=1000000 is out of range: must be a whole number in [1, 4096]"),
        (
            {"num_hidden_layers": 10**4},
            "num_hidden_layers=10000 is out of range: must be a whole number in [1, 64]",
        ),
        ({"conv_dim": [10**5] * 7}, "conv_dim=[100000, "),
        ({"conv_dim": [10**5] * 7}, "each entry must be a whole number in [1, 4096] (got 100000)"),
        ({"conv_kernel": [10**7, 3, 3, 3, 3, 2, 2]}, "each entry must be a whole number in [1, 1024]"),
        ({"conv_kernel": [1000] * 7}, "need 315685 samples for one frame: at most 48000 allowed"),
        ({"hidden_size": 0}, "hidden_size=0 is out of range: must be a whole number in [1, 4096]"),
        (
            {"num_attention_heads": -2},
            "num_attention_heads=-2 is out of range: must be a whole number in [1, 128]",
        ),
        ({"hidden_size": "32"}, "hidden_size='32' is out of range: must be a whole number"),
        ({"num_hidden_layers": True}, "num_hidden_layers=True is out of range: must be a whole number"),
        ({"conv_dim": "512"}, "conv_dim='512': must be a list of 1 to 16 whole numbers"),
        ({"conv_stride": [5, 2, 2]}, "must have one entry per conv layer"),
        ({"num_attention_heads": 3}, "num_attention_heads=3 does not divide hidden_size=32"),
        ({"num_conv_pos_embeddings": 10**5}, "num_conv_pos_embeddings=100000 is out of range"),
        (
            {
                "hidden_size": 4096,
                "num_attention_heads": 64,
                "num_hidden_layers": 64,
                "intermediate_size": 16384,
            },
            "parameters: at most 3e+09 allowed",
        ),
    ],
)
def test_hostile_config_is_refused_in_milliseconds(tmp_path, tiny, changes, expected):
    d = _bad(tmp_path, tiny, "hostile")
    _edit_config(d, **changes)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as got:
        load_model(str(d))
    took = time.perf_counter() - t0
    message = str(got.value)
    assert str(d) in message and next(iter(changes)) in message and expected in message, message
    assert took < 0.5, f"refusing a hostile config took {took:.2f} s"
    with pytest.raises(ModelLoadError, match=re.escape(expected)):  # the driver-side check refuses it too
        read_model_config(str(d))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_real_configs_are_within_the_bounds(name):
    for size in ("full", "tiny"):
        check_config_bounds(checkpoint_config(name, size), f"{name} ({size})")  # raises if out of bounds


def test_published_config_is_within_the_bounds():
    reference = Path(__file__).parents[1].parent / "shared" / "reference" / "MERT-v1-95M.config.json"
    if not reference.exists():
        pytest.skip(f"{reference} is not in this checkout")
    check_config_bounds(json.loads(reference.read_text()), str(reference))


def test_a_process_whose_current_directory_is_gone_can_still_build_a_model(tmp_path):
    """A Ray job's driver or worker may find its working directory replaced under it; transformers resolves a
    relative path on first import, so load_model moves such a process to the temporary directory first. Run in a
    fresh process, where load_model's build is transformers' first import."""
    d = write_random_checkpoint(tmp_path / "c", "MERT-v0", seed=3)
    code = (
        "import os, sys\n"
        "from pipeline.models import load_model\n"  # and torch, as in a job's driver before Ray moves it
        "assert 'transformers' not in sys.modules\n"
        "os.mkdir(sys.argv[1]); os.chdir(sys.argv[1]); os.rmdir(sys.argv[1])\n"
        "try:\n    os.getcwd()\nexcept FileNotFoundError:\n    pass\nelse:\n    sys.exit('the directory is not gone')\n"
        "print(load_model(sys.argv[2]).model is not None, os.getcwd())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "gone"), str(d)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    built, cwd = done.stdout.split()
    assert built == "True" and os.path.isdir(cwd)
