"""Smoke test of the benchmark harness (benchmarks/run.py): every part runs end to end on a tiny model and three
6-second files and lands in the JSON result; the CPU section (--section cpu) and the model section (--section
model, what embed_batch.py was) run alone; the FLOP count matches a hand count. Not a timed test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.common import flops_per_audio_second, peak_flops
from benchmarks.run import main
from pipeline.checkpoints import checkpoint_config, write_random_checkpoint
from pipeline.synth import music_like, write_audio

pytestmark = pytest.mark.usefixtures("ray_local")
ROOT = Path(__file__).resolve().parents[1]


def test_flops_per_audio_second_matches_a_hand_count():
    cfg = checkpoint_config(
        "MERT-v1-95M", size="tiny"
    )  # conv 7 x 32 ch, D 32, 2 layers, FFN 64, pos conv 16 / 4
    f = flops_per_audio_second(cfg, 24000, 1.0)
    # frames per layer for 24000 samples: (n - k) // s + 1 with k = 10,3,3,3,3,2,2 and s = 5,2,2,2,2,2,2
    assert f["frames"] == 74  # 4799, 2399, 1199, 599, 299, 149, 74
    conv = 2 * (1 * 32 * 10 * 4799 + 32 * 32 * 3 * (2399 + 1199 + 599 + 299) + 32 * 32 * 2 * (149 + 74))
    proj = 2 * 32 * 32 * 74
    pos = 2 * 74 * 32 * (32 // 4) * 16
    linear = 2 * 74 * (4 * 2 * 32 * 32 + 2 * 2 * 32 * 64)
    attention = 2 * 2 * 2 * 74 * 74 * 32
    assert (f["conv"], f["proj"], f["pos_conv"], f["linear"], f["attention"]) == (
        conv,
        proj,
        pos,
        linear,
        attention,
    )
    assert f["total"] == conv + proj + pos + linear + attention == 36_192_640
    # per audio second: a 2 s window has twice the frames (less the conv edge), the same linear cost per second,
    # and twice the attention cost per second
    f2 = flops_per_audio_second(cfg, 24000, 2.0)
    assert f2["frames"] == 149
    assert f2["attention"] == pytest.approx(2 * 2 * 2 * 149 * 149 * 32 / 2)
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "float32") == 51e12
    assert peak_flops("NVIDIA H200", "float32") == 67e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert peak_flops("Tesla T4", "bfloat16") is None


def test_harness_end_to_end_writes_every_figure(tmp_path):
    model = write_random_checkpoint(tmp_path / "tiny", like="MERT-v1-95M", size="tiny")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_audio(corpus / "a.mp3", music_like(6.0, 44100, channels=2, seed=1), 44100, "mp3")
    write_audio(corpus / "b.flac", music_like(6.0, 48000, channels=2, seed=2), 48000, "flac")
    write_audio(corpus / "c.wav", music_like(6.0, 24000, channels=1, seed=3), 24000, "wav")
    out = tmp_path / "result.json"
    # batch 1: the embed stage takes 4 rows per call, so the three inputs (3 rows each) make two actor tasks and
    # two blocks reach the driver, which the steady rate needs
    main(
        [
            "--model",
            str(model),
            "--corpus",
            str(corpus),
            "--batch-size",
            "1",
            "--model-batches",
            "1",
            "--short-seconds",
            "3",
            "--long-seconds",
            "12",
            "--skip",
            "tree,formats",  # the per-format CPU section has its own test below
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    r = json.loads(out.read_text())

    assert r["corpus"]["files"] == 3 and r["corpus"]["audio_s"] == pytest.approx(18.0, abs=0.1)
    for part, key in [
        ("model_only", "audio_s_per_s"),
        ("cpu_stage", "audio_s_per_s"),
        ("cpu_stage", "audio_s_per_cpu_s"),
        ("pipeline", "audio_s_per_s"),
        ("pipeline", "steady_audio_s_per_s"),
        ("naive", "audio_s_per_s"),
    ]:
        assert r[part][key] > 0, (part, key, r[part])
    assert r["model_only"]["threads"] == r["settings"]["actor_threads"] >= 1
    assert r["pipeline"]["inputs_ok"] == 3 and r["pipeline"]["audio_s"] == pytest.approx(18.0, abs=0.1)
    t = r["pipeline"]["timings"]
    assert 0 <= t["ray_ready_s"] <= t["first_output_s"] < t["last_output_s"]
    assert r["naive"]["audio_s"] == pytest.approx(18.0, abs=0.1)
    assert r["model"]["flops_per_audio_s"]["total"] > 0
    for kind in ("short", "long"):
        w = r["memory"]["worker"][kind]
        assert w["worker_peak_rss_mb"] > 0 and w["decoder_peak_rss_mb"] > 0
        assert w["rows"] > 1  # segment rows and the record row went through the stage
    assert r["memory"]["worker_long_over_short"] > 0
    ratios = r["summary"]["ratios"]
    assert set(ratios) == {
        "pipeline_over_model_only",
        "pipeline_steady_over_model_only",
        "pipeline_over_naive",
        "pipeline_steady_over_naive",
    }
    assert all(v > 0 for v in ratios.values())
    assert set(r["summary"]["goals"]) == {
        "fed_end_to_end",
        "fed_steady",
        "faster_than_naive",
        "memory_cpu_stage",
    }


def test_cpu_section_alone_reports_every_format_against_its_limit(tmp_path):
    out = tmp_path / "cpu.json"
    main(
        [
            "--section",
            "cpu",
            "--cpu-seconds",
            "3",
            "--cpu-repeats",
            "1",
            "--pipeline-files",
            "0",  # the whole-pipeline runs: tests/test_pipeline_cost.py, and the benchmark itself
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(out),
        ]
    )
    r = json.loads(out.read_text())
    rows = r["cpu_formats"]["formats"]
    assert [row["format"] for row in rows] == ["mp3", "flac", "ogg", "opus", "m4a", "wav"]
    for row in rows:
        assert row["audio_s"] == pytest.approx(3.0, abs=0.1), row
        assert all(v > 0 for v in row["audio_s_per_cpu_s"].values()), row
        assert row["isolated_over_limit"] > 0 and row["local_over_limit"] > 0
        assert row["isolation_overhead"] > -1
        assert row["worker_plus_child_uss_mb"] >= row["worker_uss_mb"] > 0 and row["child_uss_mb"] > 0
        assert "torch" not in row["worker_imports"]  # a decode worker does not import torch
    assert set(r["cpu_formats"]["goals"]) == {
        "isolated_over_limit_max",
        "isolation_overhead_max",
        "worker_plus_child_uss_mb_max",
        "met",
    }
    assert r["summary"]["goals"] == {"cpu_stage_at_decode_limit": r["cpu_formats"]["goals"]["met"]}


def test_model_section_alone_times_the_embedder(tmp_path):
    model = write_random_checkpoint(tmp_path / "tiny", like="MERT-v1-95M", size="tiny")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_audio(corpus / "a.flac", music_like(6.0, 44100, channels=2, seed=1), 44100, "flac")
    out = tmp_path / "model.json"
    main(
        [
            "--section",
            "model",
            "--model",
            str(model),
            "--corpus",
            str(corpus),
            "--batch-size",
            "1",
            "--model-batches",
            "2",
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(out),
        ]
    )
    m = json.loads(out.read_text())["model_only"]
    assert m["timed_batches"] == 2 and m["audio_s_per_s"] > 0 and m["dtype"] == "float32"


def test_driver_cpu_fit_separates_per_second_from_per_segment_cost():
    from benchmarks.table import fit_driver_cpu

    # 0.05 CPU s per wall second plus 0.6 ms per segment, at 90 and 40 segments/s
    windows = [
        {"cpu_s": 0.05 * w + 0.0006 * s, "wall_s": w, "segments": s} for w, s in ((20.0, 1800), (45.0, 1800))
    ]
    fit = fit_driver_cpu(windows)
    assert fit["per_s_cpu_s"] == pytest.approx(0.05, rel=1e-3)
    assert fit["per_segment_cpu_ms"] == pytest.approx(0.6, rel=1e-3)
    same_rate = [
        {"cpu_s": 1.0, "wall_s": 10.0, "segments": 100},
        {"cpu_s": 2.0, "wall_s": 20.0, "segments": 200},
    ]
    with pytest.raises(ValueError, match="same rate"):
        fit_driver_cpu(same_rate)


def test_the_ray_floor_splits_the_drivers_cpu_per_segment():
    from benchmarks.table import floor_shares

    # an idle Ray driver at 2.5 ms/s; windows at 50 and 25 segments/s costing 0.1 and 0.2 ms per segment
    side = {
        "steady_segments_per_s": {"fast": 50.0, "slow": 25.0},
        "steady_cpu_ms_per_segment": {"fast": 0.1, "slow": 0.2},
    }
    got = floor_shares(side, 2.5)
    assert got["floor_cpu_ms_per_segment"] == {"fast": 0.05, "slow": 0.1}
    assert got["own_cpu_ms_per_segment"] == {"fast": 0.05, "slow": 0.1}


def test_the_ray_floor_child_reports_an_idle_drivers_cpu_per_second(tmp_path):
    """The real child, in its own process: a local Ray started as a run starts it, one second idle."""
    import json
    import os
    import subprocess
    import sys

    env = {
        k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"
    }  # its own local Ray, not the tests' shared one
    env["PYTHONPATH"] = str(ROOT)
    spec = json.dumps({"settle_s": 0.5, "window_s": 1.0})
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.table", "--child", "ray_floor", "--spec", spec],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith('{"child_result"')][-1]
    got = json.loads(line)["child_result"]
    assert 0.9 <= got["wall_s"] <= 5.0
    assert 0.0 < got["cpu_ms_per_s"] < 500.0  # Ray's threads do something every second, far from a whole core
    assert got["cpu_s"] == pytest.approx(got["cpu_ms_per_s"] * got["wall_s"] / 1000, rel=0.05, abs=0.002)
