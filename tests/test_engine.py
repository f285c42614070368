"""End-to-end: a real local Ray, real encoded audio, a real S3-protocol server, the real table on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline import read_features, read_ledger
from pipeline.checkpoints import write_random_checkpoint
from pipeline.config import RunConfig
from pipeline.errors import PipelineError
from pipeline.synth import music_like, write_audio
from pipeline.table import FeatureTable

pytestmark = pytest.mark.usefixtures("ray_local")

GOOD = {  # name -> (format, seconds)
    "a_chords.wav": ("wav", 12.0),
    "b_chords.flac": ("flac", 7.3),
    "c_chords.mp3": ("mp3", 5.0),
    "d_chords.ogg": ("ogg", 3.2),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("model") / "tiny-95M", like="MERT-v1-95M", size="tiny"
    )


def dim_of(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["hidden_size"]


def make_corpus(folder: Path, names=GOOD, bad: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, (fmt, secs)) in enumerate(names.items()):
        write_audio(folder / name, music_like(secs, 48000, channels=2, seed=i), 48000, fmt)
    if bad:
        rng = np.random.default_rng(1)
        (folder / "e_random.mp3").write_bytes(rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
        (folder / "f_empty.wav").write_bytes(b"")
        write_audio(folder / "g_short.wav", music_like(0.5, 16000, channels=1, seed=9), 16000, "wav")
        (folder / "notes.txt").write_text("not audio, and not listed: wrong extension")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "audio")


def cfg(inp, out, model, **kw) -> RunConfig:
    base = dict(
        input=str(inp),
        output=str(out),
        model=str(model),
        progress=False,
        batch_size=4,
        max_error_rate=1.0,
        commit_interval_s=3600,
    )
    base.update(kw)
    return RunConfig(**base)


def run(c: RunConfig) -> dict:
    from pipeline.engine import run as run_

    return run_(c, log=lambda m: None)


def direct_features(uri: str, model_dir: Path, layers, granularity="segment", sr=24000):
    """The embedder's direct output for the same segments, outside Ray and the table."""
    from pipeline.audio import read_segments
    from pipeline.config import SegmentConfig
    from pipeline.embed import Embedder
    from pipeline.models import load_model

    emb = Embedder(load_model(str(model_dir)), layers=layers, granularity=granularity, device="cpu")
    with read_segments(uri, sample_rate=sr, segments=SegmentConfig(), isolate=False) as stream:
        segs = list(stream)
    return segs, [emb.embed(s.samples[None, :])[0] for s in segs], emb


@pytest.fixture(scope="module")
def table_run(corpus, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "table"
    summary = run(cfg(corpus, out, model_dir))
    return out, summary


def test_every_input_has_one_ledger_row_with_the_right_status(table_run, corpus):
    out, summary = table_run
    ledger = read_ledger(str(out), latest=False).to_pylist()
    by_name = {Path(r["uri"]).name: r for r in ledger}
    assert len(ledger) == len(by_name) == 7  # notes.txt is not an input
    for name in GOOD:
        assert by_name[name]["status"] == "ok", by_name[name]
        assert by_name[name]["recording_id"] == "file://" + str(corpus / name)
        assert by_name[name]["sample_rate"] == 48000 and by_name[name]["channels"] == 2
        assert by_name[name]["duration_s"] == pytest.approx(GOOD[name][1], abs=0.08)
    assert by_name["a_chords.wav"]["segments"] == 3  # 12 s: windows at 0 and 5 s, and a 2 s partial at 10 s
    assert by_name["e_random.mp3"]["status"] == "error"
    assert (
        by_name["e_random.mp3"]["error_kind"] and "e_random.mp3" in by_name["e_random.mp3"]["error_message"]
    )
    assert by_name["f_empty.wav"]["status"] == "error"
    assert by_name["g_short.wav"]["status"] == "too_short"
    c = summary["counts"]
    assert (c["ok"], c["error"], c["too_short"], c["skipped"]) == (4, 2, 1, 0)
    assert summary["status"] == "complete"
    assert json.loads((out / "runs" / f"{summary['run_id']}.json").read_text())["status"] == "complete"


def test_features_equal_the_embedders_direct_output(table_run, corpus, model_dir):
    out, _ = table_run
    for layer in (0, 1, 2):  # the tiny model has 2 layers: 3 hidden states
        got = read_features(str(out), layer)
        assert got.schema.field("embedding").type == pa.list_(pa.float32(), dim_of(model_dir))
        for name in ("a_chords.wav", "c_chords.mp3", "d_chords.ogg"):
            uri = "file://" + str(corpus / name)
            segs, vecs, _ = direct_features(uri, model_dir, [layer])
            rows = (
                got.filter(pa.compute.equal(got.column("recording_id"), uri)).sort_by("segment").to_pylist()
            )
            assert [r["segment"] for r in rows] == [s.index for s in segs]
            for r, s, v in zip(rows, segs, vecs, strict=True):
                assert r["start_s"] == pytest.approx(s.start_s) and r["duration_s"] == pytest.approx(
                    s.duration_s
                )
                np.testing.assert_allclose(np.array(r["embedding"]), v[0], rtol=1e-4, atol=1e-5)


def test_provenance_in_every_footer_and_plain_readers_agree(table_run):
    out, summary = table_run
    files = sorted((out / "features").rglob("*.parquet"))
    assert files and all(f.parent.name.startswith("layer=") for f in files)
    for f in files:
        md = pq.read_schema(f).metadata
        for key in (
            "model",
            "model_content_hash",
            "sample_rate",
            "frame_rate",
            "window_s",
            "hop_s",
            "min_segment_s",
            "granularity",
            "normalize",
            "compute_dtype",
            "storage_dtype",
            "layers",
            "pipeline_version",
            "table_schema_version",
            "torch_version",
            "device",
            "config_hash",
        ):
            assert f"mert.{key}".encode() in md, key
        assert pq.ParquetFile(f).metadata.row_group(0).column(5).compression == "ZSTD"
    lib = read_features(str(out), 1)
    plain = pads.dataset(out / "features", format="parquet", partitioning="hive").to_table(
        filter=pads.field("layer") == 1
    )
    assert plain.num_rows == lib.num_rows
    assert plain.schema.field("embedding").type == lib.schema.field("embedding").type  # fixed_size_list kept
    n = duckdb.sql(
        f"select count(*) from read_parquet('{out}/features/*/*.parquet', hive_partitioning=true) "
        "where layer = 1"
    ).fetchall()[0][0]
    assert n == lib.num_rows
    df = read_features(str(out), 1).to_pandas()
    assert len(df) == lib.num_rows


def test_rerun_writes_nothing_new(table_run, corpus, model_dir):
    out, first = table_run
    before = sorted(p for p in (out / "features").rglob("*") if p.is_file())
    snap = FeatureTable(str(out)).snapshot()
    again = run(cfg(corpus, out, model_dir))
    assert again["counts"]["processed"] == 0 and again["counts"]["skipped"] == 7
    assert again["commits"] == 0
    assert sorted(p for p in (out / "features").rglob("*") if p.is_file()) == before
    after = FeatureTable(str(out)).snapshot()
    assert after.ledger == snap.ledger and after.flushes.keys() == snap.flushes.keys()
    # the rerun's only entries: its epoch and its release
    kinds = [e["kind"] for e in FeatureTable(str(out)).log.entries(snap.version + 1)]
    assert kinds == ["epoch", "release"]


def test_mismatched_append_is_refused(table_run, corpus, model_dir):
    out, _ = table_run
    with pytest.raises(PipelineError, match="another configuration.*window_s"):
        run(cfg(corpus, out, model_dir, window_s=3.0))


def test_second_writer_is_refused_while_the_lease_is_held(table_run, corpus, model_dir):
    out, _ = table_run
    holder = FeatureTable(str(out))
    holder.acquire_lease("someone-else", ttl_s=60)
    try:
        with pytest.raises(PipelineError, match="being written by run someone-else"):
            run(cfg(corpus, out, model_dir))
    finally:
        holder.release_lease()


def test_options_float16_layers_and_granularities(corpus, model_dir, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for name in ("a_chords.wav", "d_chords.ogg"):
        shutil.copy(corpus / name, small / name)
    seg16 = run(cfg(small, tmp_path / "f16", model_dir, storage_dtype="float16", layers=(0, 2)))
    t = read_features(str(tmp_path / "f16"), 2)
    assert t.schema.field("embedding").type == pa.list_(pa.float16(), dim_of(model_dir))
    assert sorted(p.name for p in (tmp_path / "f16" / "features").iterdir()) == ["layer=0", "layer=2"]
    segs, vecs, emb = direct_features("file://" + str(small / "a_chords.wav"), model_dir, [2])
    row0 = t.filter(
        pa.compute.and_(
            pa.compute.equal(t.column("segment"), 0),
            pa.compute.match_substring(t.column("recording_id"), "a_chords"),
        )
    ).to_pylist()[0]
    np.testing.assert_allclose(np.array(row0["embedding"], np.float32), vecs[0][0], rtol=2e-3, atol=2e-3)
    assert seg16["counts"]["ok"] == 2

    run(cfg(small, tmp_path / "rec", model_dir, granularity="recording", layers=(1,)))
    rec = read_features(str(tmp_path / "rec"), 1)
    assert rec.num_rows == 2 and rec.column("segment").null_count == 2
    a = rec.filter(pa.compute.match_substring(rec.column("recording_id"), "a_chords")).to_pylist()[0]
    segs, vecs, emb = direct_features("file://" + str(small / "a_chords.wav"), model_dir, [1])
    w = np.array([emb.frames(len(s.samples)) for s in segs], np.float64)
    expect = (np.stack([v[0] for v in vecs]) * w[:, None]).sum(0) / w.sum()
    np.testing.assert_allclose(np.array(a["embedding"]), expect, rtol=1e-4, atol=1e-5)
    assert a["n_frames"] == int(w.sum())

    run(cfg(small, tmp_path / "frames", model_dir, granularity="frame", layers=(2,)))
    fr = read_features(str(tmp_path / "frames"), 2)
    segs, vecs, emb = direct_features(
        "file://" + str(small / "d_chords.ogg"), model_dir, [2], granularity="frame"
    )
    rows = (
        fr.filter(pa.compute.match_substring(fr.column("recording_id"), "d_chords"))
        .sort_by("segment")
        .to_pylist()
    )
    assert len(rows) == len(segs)
    got = np.array(rows[0]["embedding"])  # (T, D)
    assert got.shape == vecs[0][0].shape and rows[0]["frame_rate"] == 75.0
    np.testing.assert_allclose(got, vecs[0][0], rtol=1e-4, atol=1e-5)


def test_dry_run_lists_and_estimates_without_writing(corpus, model_dir, tmp_path):
    plan = run(cfg(corpus, tmp_path / "dry", model_dir, dry_run=True))
    assert plan["status"] == "dry_run" and plan["inputs_to_process"] == 7
    assert plan["estimated_audio_hours"] > 0 and plan["estimated_output_bytes"] > 0
    assert plan["model_audio_s_per_s_on_this_machine_cpu"] > 0
    assert not (tmp_path / "dry").exists()


def test_error_rate_limit_stops_the_run_and_keeps_finished_work(model_dir, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(6):
        (folder / f"junk_{i}.flac").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(PipelineError, match="error rate .* passed the limit"):
        run(cfg(folder, tmp_path / "t", model_dir, max_error_rate=0.5, error_rate_min_inputs=3))
    runs = list((tmp_path / "t" / "runs").glob("*.json"))
    assert json.loads(runs[0].read_text())["status"] == "stopped"
    ledger = read_ledger(str(tmp_path / "t"))
    assert 3 <= ledger.num_rows < 6 and set(ledger.column("status").to_pylist()) == {"error"}


def test_decoder_crash_and_hang_become_error_rows(model_dir, tmp_path):
    # The shared Ray was started with MERT_PIPELINE_FAULT_INJECTION (conftest): names with these markers make
    # the isolated decoder child crash or hang.
    folder = make_corpus(
        tmp_path / "audio",
        names={"ok.wav": ("wav", 6.0), "x__crash_me__.wav": ("wav", 6.0), "y__hang_me__.wav": ("wav", 6.0)},
        bad=False,
    )
    summary = run(cfg(folder, tmp_path / "t", model_dir, decode_timeout_s=8))
    rows = {Path(r["uri"]).name: r for r in read_ledger(str(tmp_path / "t")).to_pylist()}
    assert rows["ok.wav"]["status"] == "ok"
    assert rows["x__crash_me__.wav"]["status"] == "error"
    assert rows["x__crash_me__.wav"]["error_kind"] == "decoder_crash"
    assert rows["y__hang_me__.wav"]["error_kind"] == "decode_timeout"
    assert summary["status"] == "complete"


def test_s3_in_and_out(corpus, model_dir, s3_bucket, s3_options):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    for name in ("a_chords.wav", "c_chords.mp3", "e_random.mp3"):
        fs.put(str(corpus / name), f"{s3_bucket}/audio/{name}")
    out = f"s3://{s3_bucket}/features"
    summary = run(cfg(f"s3://{s3_bucket}/audio/", out, model_dir, storage_options=s3_options))
    assert summary["counts"]["ok"] == 2 and summary["counts"]["error"] == 1
    t = read_features(out, 2, storage_options=s3_options)
    ids = set(t.column("recording_id").to_pylist())
    assert ids == {f"s3://{s3_bucket}/audio/a_chords.wav", f"s3://{s3_bucket}/audio/c_chords.mp3"}
    ledger = read_ledger(out, storage_options=s3_options).to_pylist()
    assert all("etag=" in r["fingerprint"] for r in ledger)
    # the secret never lands in the run record or the Parquet footers
    blob = fs.cat(f"{s3_bucket}/features/runs/{summary['run_id']}.json").decode()
    assert s3_options["secret"] not in blob
    for f in fs.find(f"{s3_bucket}/features/features"):
        assert s3_options["secret"].encode() not in fs.cat(f)
    # a rerun against object storage does nothing new
    again = run(cfg(f"s3://{s3_bucket}/audio/", out, model_dir, storage_options=s3_options))
    assert again["counts"]["processed"] == 0 and again["counts"]["skipped"] == 3


def test_missing_bucket_and_bad_credentials_fail_fast(model_dir, s3_options, tmp_path):
    t0 = time.time()
    with pytest.raises(PipelineError, match="does not exist"):
        run(cfg("s3://no-such-bucket-here/audio/", tmp_path / "t", model_dir, storage_options=s3_options))
    # a server that checks credentials: every key is unknown to it
    port_server = _auth_moto_server()
    try:
        opts = {
            "key": "AKIAWRONG",
            "secret": "wrong-secret-value",
            "client_kwargs": {"endpoint_url": port_server[0], "region_name": "us-east-1"},
        }
        with pytest.raises(PipelineError) as info:
            run(cfg("s3://some-bucket/audio/", tmp_path / "t2", model_dir, storage_options=opts))
        assert "wrong-secret-value" not in str(info.value)
        assert any(
            w in str(info.value).lower() for w in ("denied", "credential", "invalidaccesskeyid", "forbidden")
        )
    finally:
        port_server[1].terminate()
    assert time.time() - t0 < 60
    assert not (tmp_path / "t" / "_log").exists() and not (tmp_path / "t2" / "_log").exists()


def _auth_moto_server():
    from tests.conftest import _free_port

    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=0.5)
            break
        except Exception:
            time.sleep(0.1)
    return f"http://127.0.0.1:{port}", proc


def test_a_model_that_will_not_load_fails_fast(corpus, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(
        json.dumps({"model_type": "mert_model", "feature_extractor_cqt": True})
    )
    t0 = time.time()
    with pytest.raises(PipelineError, match="broken"):
        run(cfg(corpus, tmp_path / "t", broken))
    assert time.time() - t0 < 30 and not (tmp_path / "t").exists()


def test_first_inputs_all_unreadable_is_systemic():
    from pipeline.engine import systemic_failure

    denied = {"status": "error", "error_kind": "access_denied", "error_message": "s3://b/x: access denied"}
    assert "looks systemic" in systemic_failure([denied] * 5, total=100)
    assert "looks systemic" in systemic_failure([denied] * 3, total=3)
    assert systemic_failure([denied] * 4, total=100) is None  # not yet enough evidence
    assert systemic_failure([denied] * 4 + [{"status": "ok"}], total=100) is None
    decode = dict(denied, error_kind="decode")
    assert systemic_failure([decode] * 5, total=100) is None  # bad files are data, not a setup problem
    assert systemic_failure([denied], total=1) is None
