"""MERT-v2's path: a checkpoint with its own code, opt-in and pinned. The fixture (pipeline/testing/mert2_like)
exposes exactly MERT-v2's interface (auto_map, its own processor, 24 hidden states with index 0 = block 1,
feature_attention_mask) and a group-normed front end, so a padded batch differs from single runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.checkpoints import write_remote_code_checkpoint
from pipeline.errors import ModelLoadError, PipelineError
from pipeline.models import content_hash, load_model
from pipeline.registry import NATIVE, REGISTRY
from pipeline.synth import music_like, write_audio

TOKEN = "hf_testTokenNeverToBeLogged0123456789"


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory) -> Path:
    return write_remote_code_checkpoint(tmp_path_factory.mktemp("v2") / "mert2-like", seed=3)


def _own_code(model_dir: Path):
    """The checkpoint's own model and processor, loaded by transformers directly (not through the pipeline)."""
    from transformers import AutoFeatureExtractor, AutoModel

    trust = True
    model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=trust).eval()
    return model, AutoFeatureExtractor.from_pretrained(str(model_dir), trust_remote_code=trust)


def _direct(model, processor, segment: np.ndarray) -> np.ndarray:
    """The checkpoint's own code called directly on one segment: (24, D) masked means of hidden_states."""
    import torch

    with torch.inference_mode():
        out = model(
            **processor(segment, sampling_rate=processor.sampling_rate, return_tensors="pt"),
            output_hidden_states=True,
        )
        mask = out.feature_attention_mask[0].bool()
        return torch.stack([h[0][mask].mean(dim=0) for h in out.hidden_states]).numpy()


def test_refused_without_the_flag_and_the_flag_changes_nothing_for_native_models(v2_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(str(v2_dir))
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model("MERT-v2-30s")  # refused before the hub is asked
    from pipeline.checkpoints import write_random_checkpoint

    native = write_random_checkpoint(tmp_path / "v1", like="MERT-v1-95M", size="tiny")
    a, b = load_model(str(native)), load_model(str(native), trust_remote_code=True)
    assert a.content_hash == b.content_hash and not a.remote and not b.remote and a.code_hash is None
    assert NATIVE == ("MERT-v1-330M", "MERT-v1-95M", "MERT-v0-public", "MERT-v0", "music2vec-v1")


@pytest.mark.parametrize(
    "ref",
    [
        "MERT-v2-30s",
        "m-a-p/MERT-v2-30s",
        "m-a-p/MERT-v2-FullSong@main",
        "MERT-v2-30s@v1.0",
        "m-a-p/MERT-v2-30s@0123abc",
    ],
)
def test_an_unpinned_hub_id_is_refused_before_any_download(ref, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ModelLoadError, match="40-hex commit") as err:
        load_model(ref, trust_remote_code=True)
    assert TOKEN not in str(err.value)


def test_a_pinned_hub_id_goes_to_the_hub_and_never_shows_the_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: set it too
    with pytest.raises(ModelLoadError) as err:
        load_model("m-a-p/MERT-v2-30s@" + "a" * 40, trust_remote_code=True)
    assert "40-hex" not in str(err.value) and TOKEN not in str(err.value)


def test_auto_map_into_another_repository_is_refused(tmp_path):
    d = write_remote_code_checkpoint(tmp_path / "x", auto_map_model="evil/repo--modeling_evil.Model")
    with pytest.raises(ModelLoadError, match="another repository"):
        load_model(str(d), trust_remote_code=True)


def test_the_content_hash_covers_the_code_and_nodes_check_it(v2_dir, tmp_path):
    d = write_remote_code_checkpoint(tmp_path / "c", seed=3)
    before = content_hash(str(d), code=True)
    loaded = load_model(str(d), trust_remote_code=True)
    assert loaded.remote and loaded.content_hash == before and loaded.licence == "cc-by-nc-4.0"
    code = d / "modeling_mert2_like.py"
    code.write_text(code.read_text() + "\n# one more line\n")
    assert content_hash(str(d), code=True) != before
    with pytest.raises(ModelLoadError, match="the driver checked"):
        load_model(str(d), trust_remote_code=True, expected_code_hash=loaded.code_hash)


def test_code_that_cannot_run_here_fails_once_naming_both_versions(tmp_path):
    import transformers

    d = write_remote_code_checkpoint(tmp_path / "old")
    code = d / "modeling_mert2_like.py"
    code.write_text("raise ImportError('this code needs transformers 4.53')\n" + code.read_text())
    with pytest.raises(ModelLoadError) as err:
        load_model(str(d), trust_remote_code=True)
    text = str(err.value)
    assert f"transformers {transformers.__version__}" in text and "4.53.2" in text and "Workaround" in text


def test_registry_facts_window_default_and_context():
    from pipeline.config import RunConfig
    from pipeline.engine import model_facts

    for name, context in (("MERT-v2-30s", 30.0), ("MERT-v2-FullSong", 360.0)):
        s = REGISTRY[name]
        assert (s.sample_rate, s.frame_rate, s.num_hidden_states, s.dim, s.num_layers) == (
            24000,
            25.0,
            24,
            1024,
            24,
        )
        assert not s.input_state and s.layer_numbering.startswith("0 = block 1")
        assert s.licence == "CC-BY-NC-4.0" and s.gated and s.remote_code
        assert s.default_window_s == 30.0 and s.context_s == context
    assert all(REGISTRY[n].default_window_s == 5.0 and REGISTRY[n].input_state for n in NATIVE)

    class Fake:  # model_facts reads only these fields of a LoadedModel
        content_hash, revision, source, do_normalize, remote, code_hash, licence = (
            "h",
            None,
            "x",
            False,
            True,
            "c",
            "l",
        )

    fake = Fake()
    fake.spec = REGISTRY["MERT-v2-FullSong"]  # type: ignore[attr-defined]
    facts = model_facts(RunConfig(input="a", output="b"), fake)
    assert facts.segments.window_s == 30.0 and facts.numbers["window_s"] == 30.0
    assert model_facts(RunConfig(input="a", output="b", window_s=120.0), fake).segments.window_s == 120.0
    with pytest.raises(PipelineError, match="longer than MERT-v2-FullSong's context of 360 s"):
        model_facts(RunConfig(input="a", output="b", window_s=400.0), fake)
    fake.spec = REGISTRY["MERT-v2-30s"]  # type: ignore[attr-defined]
    with pytest.raises(PipelineError, match="context of 30 s"):
        model_facts(RunConfig(input="a", output="b", window_s=31.0), fake)
    with pytest.raises(PipelineError, match="own processor"):
        model_facts(RunConfig(input="a", output="b", normalize=True), fake)
    assert dataclasses.is_dataclass(facts)


@pytest.mark.usefixtures("ray_local")
def test_features_through_the_cli_equal_a_direct_call_of_its_code(v2_dir, tmp_path, monkeypatch, capsys):
    from pipeline import read_features
    from pipeline.audio import read_segments
    from pipeline.cli import main
    from pipeline.config import SegmentConfig
    from pipeline.table import FeatureTable

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    audio = tmp_path / "audio"
    write_audio(audio / "song.flac", music_like(12.0, 44100, channels=2, seed=1), 44100, "flac")
    out = tmp_path / "table"
    argv = ["run", str(audio), str(out), "--model", str(v2_dir), "--batch-size", "2", "--quiet", "--json"]
    assert main(argv) != 0  # no flag: refused, nothing written
    assert not (out / "features").exists()
    capsys.readouterr()
    assert main([*argv, "--trust-remote-code"]) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out)
    assert summary["status"] == "complete" and summary["counts"]["ok"] == 1

    uri = f"file://{audio / 'song.flac'}"
    with read_segments(uri, sample_rate=24000, segments=SegmentConfig(), isolate=False) as stream:
        segs = [s.samples for s in stream]
    assert [len(s) for s in segs] == [
        120000,
        120000,
        48000,
    ]  # 5 + 5 + 2 s: two equal-length ones batch together
    model, processor = _own_code(v2_dir)
    direct = [_direct(model, processor, s) for s in segs]
    for layer in (0, 11, 23):  # stored index i is hidden_states[i]: block i + 1
        t = read_features(str(out), layer).sort_by("segment")
        got = np.stack(t.column("embedding").to_numpy(zero_copy_only=False))
        want = np.stack([d[layer] for d in direct])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
        assert t.column("n_frames").to_pylist() == [125, 125, 50]

    # the fixture can tell: a padded batch (5 s with 2 s) differs from single runs, so batching must not pad
    import torch

    with torch.inference_mode():
        o = model(
            **processor([segs[0], segs[2]], sampling_rate=24000, return_tensors="pt"),
            output_hidden_states=True,
        )
        m = o.feature_attention_mask[1].bool()
        padded = o.hidden_states[11][1][m].mean(dim=0).numpy()
    assert np.abs(padded - direct[2][11]).max() > 1e-3

    # licence, code hash and provenance in the footers; the token nowhere
    f = next((out / "features" / "layer=0").glob("*.parquet"))
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(f).metadata.items() if k.startswith(b"mert.")}
    assert meta["mert.licence"] == "cc-by-nc-4.0"
    assert meta["mert.model_code_hash"] == load_model(str(v2_dir), trust_remote_code=True).code_hash
    assert meta["mert.layer_numbering"].startswith("0 = block 1")
    info = FeatureTable(str(out)).inspect()
    assert info["provenance"]["licence"] == "cc-by-nc-4.0"
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "licence: cc-by-nc-4.0, its own code" in shown and "0 = block 1" in shown
    everything = printed.out + printed.err + json.dumps(meta)
    for p in out.rglob("*"):
        if p.is_file():
            everything += p.read_bytes().decode("latin-1")
    assert TOKEN not in everything


def test_an_object_storage_snapshot_is_staged_with_its_code(v2_dir, s3_bucket, s3_options, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    for f in v2_dir.iterdir():
        fs.put_file(str(f), f"{s3_bucket}/models/v2/{f.name}")
    uri = f"s3://{s3_bucket}/models/v2/"
    loaded = load_model(uri, s3_options, cache_dir=str(tmp_path / "cache"), trust_remote_code=True)
    local = load_model(str(v2_dir), trust_remote_code=True)
    assert loaded.remote and loaded.code_hash == local.code_hash and loaded.content_hash == local.content_hash
    assert loaded.licence == "cc-by-nc-4.0"  # the model card came along
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(uri, s3_options, cache_dir=str(tmp_path / "cache"))
