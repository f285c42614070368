"""The CLI: YAML config with flag overrides, manifests with ids, glob filters, and the table commands."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import read_features, read_ledger
from pipeline.checkpoints import write_random_checkpoint
from pipeline.cli import build_parser, config_from_args, main
from pipeline.synth import music_like, write_audio


def parse(*argv):
    return config_from_args(build_parser().parse_args(["run", *argv]))


def test_yaml_config_and_flags_override(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "input: s3://bucket/audio/\noutput: s3://bucket/table/\nmodel: MERT-v1-330M\nlayers: [6, 7, 12]\n"
        "window_s: 10\nbatch_size: 4\nstorage_options: {anon: true}\n"
    )
    c = parse("--config", str(tmp_path / "run.yaml"), "--batch-size", "16", "--no-normalize")
    assert (c.input, c.model, c.layers, c.window_s, c.batch_size) == (
        "s3://bucket/audio/",
        "MERT-v1-330M",
        (6, 7, 12),
        10,
        16,
    )
    assert c.normalize is False and c.storage_options == {"anon": True}
    c = parse("--config", str(tmp_path / "run.yaml"), "in/", "out/", "--layers", "0-2")
    assert (c.input, c.output, c.layers) == ("in/", "out/", (0, 1, 2))


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["a", "b", "--granularity", "pixels"],
            "granularity='pixels': must be one of segment, recording, frame",
        ),
        (["a", "b", "--window", "-1"], "window_s=-1.0"),
        (["a", "b", "--layers", "3,3"], "lists a layer twice"),
        (["a"], "missing OUTPUT"),
    ],
)
def test_bad_values_name_the_field(argv, message, capsys):
    assert main(["run", *argv]) == 2
    assert message in capsys.readouterr().err


def test_yaml_unknown_key_is_refused(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("inptu: x\noutput: y\n")
    assert main(["run", "--config", str(tmp_path / "r.yaml")]) == 2
    assert "unknown option(s) inptu" in capsys.readouterr().err


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("MERT-v1-330M", "MERT-v1-95M", "MERT-v0-public", "MERT-v0", "music2vec-v1"):
        assert name in out


@pytest.mark.usefixtures("ray_local")
def test_manifest_glob_and_table_commands(tmp_path, capsys):
    model = write_random_checkpoint(tmp_path / "m", like="MERT-v0", size="tiny")  # 16 kHz model
    audio = tmp_path / "audio"
    (audio / "sub").mkdir(parents=True)
    write_audio(audio / "one.flac", music_like(6.0, 44100, 2, seed=1), 44100, "flac")
    write_audio(audio / "sub" / "two.wav", music_like(3.0, 22050, 1, seed=2), 22050, "wav")
    write_audio(audio / "sub" / "three.mp3", music_like(4.0, 44100, 2, seed=3), 44100, "mp3")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        f"uri,recording_id\n{audio / 'one.flac'},track-1\n{audio / 'sub' / 'two.wav'},track-2\n"
        f"{audio / 'missing.wav'},track-3\n"
    )
    out = tmp_path / "t"
    assert (
        main(
            [
                "run",
                str(manifest),
                str(out),
                "--manifest",
                "--model",
                str(model),
                "--quiet",
                "--max-error-rate",
                "1",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "2 ok, 1 error (not_found 1)" in text
    led = {r["recording_id"]: r for r in read_ledger(str(out)).to_pylist()}
    assert set(led) == {"track-1", "track-2", "track-3"} and led["track-3"]["error_kind"] == "not_found"
    assert set(read_features(str(out), 1).column("recording_id").to_pylist()) == {"track-1", "track-2"}

    out2 = tmp_path / "t2"
    assert (
        main(
            [
                "run",
                str(audio),
                str(out2),
                "--glob",
                "sub/*",
                "--extensions",
                ".wav,.mp3",
                "--model",
                str(model),
                "--quiet",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["ok"] == 2 and summary["counts"]["listed"] == 2

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert (
        "recordings: 3 by status {'ok': 2, 'error': 1}" in text and "errors by kind {'not_found': 1}" in text
    )
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows_per_layer"]["0"] == 3  # 6 s -> 5 s + 1 s; 3 s -> one segment
    assert main(["read", str(out), "--layer", "2", "--out", str(tmp_path / "l2.parquet")]) == 0
    assert pq.read_table(tmp_path / "l2.parquet").schema.field("embedding").type == pa.list_(
        pa.float32(), json.loads((model / "config.json").read_text())["hidden_size"]
    )
    assert main(["vacuum", str(out)]) == 0
    assert "removed 0 file(s)" in capsys.readouterr().out
