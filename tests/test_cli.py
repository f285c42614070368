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
    assert main(["vacuum", str(out), "--retention", "0"]) == 0
    said = capsys.readouterr().out
    assert "rewrote 0 file group(s)" in said and "and 0 orphan file(s)" in said


# ---- run ids ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_id", ["../x", "..", ".", "a/b", ".hidden", "x" * 129])
def test_run_id_that_would_escape_or_hide_in_the_table_is_refused(tmp_path, capsys, run_id):
    out = tmp_path / "table"
    assert main(["run", str(tmp_path), str(out), "--run-id", run_id]) == 2
    err = capsys.readouterr().err
    assert f"run_id={run_id!r}: must be 1 to 128 characters of A-Z a-z 0-9 . _ -" in err
    assert not out.exists() and not (tmp_path / "x.json").exists()


@pytest.mark.usefixtures("ray_local")
def test_a_used_run_id_is_refused_and_the_first_runs_files_are_untouched(tmp_path, capsys):
    model = write_random_checkpoint(tmp_path / "m", like="MERT-v0", size="tiny")
    audio, out = tmp_path / "audio", tmp_path / "t"
    audio.mkdir()
    write_audio(audio / "one.wav", music_like(3.0, 16000, 1, seed=1), 16000, "wav")
    common = ["--model", str(model), "--quiet"]
    assert main(["run", str(audio), str(out), *common, "--run-id", "nightly"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert out / "runs" / "nightly.json" in before
    assert any(p.name.startswith("nightly-") for p in (out / "features" / "layer=0").iterdir())
    write_audio(audio / "two.wav", music_like(2.0, 16000, 1, seed=2), 16000, "wav")  # work for a second run
    capsys.readouterr()
    assert main(["run", str(audio), str(out), *common, "--run-id", "nightly"]) == 2
    err = capsys.readouterr().err
    assert "run id 'nightly' is already used in" in err and "give a new --run-id" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # byte-equal, no lease left
    # a run that took the table and crashed before its summary used its id too
    from pipeline.table import FeatureTable

    crashed = FeatureTable(str(out))
    crashed.acquire_lease("crashed", ttl_s=30)
    crashed.release_lease()
    assert main(["run", str(audio), str(out), *common, "--run-id", "crashed"]) == 2
    assert "run id 'crashed' is already used" in capsys.readouterr().err
    # a run id that merely starts like a used one is free
    assert main(["run", str(audio), str(out), *common, "--run-id", "nightly-2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["processed"] == 1


# ---- segments shorter than the receptive field ---------------------------------------------------------------
@pytest.mark.parametrize("flag, field", [("--window", "window_s"), ("--min-segment", "min_segment_s")])
def test_segments_shorter_than_the_receptive_field_are_refused(tmp_path, capsys, flag, field):
    assert main(["run", str(tmp_path), str(tmp_path / "t"), flag, "0.01"]) == 2
    err = capsys.readouterr().err
    # 400 samples at 16 kHz: the longest receptive field among the registry's models
    assert (
        f"{field}=0.01: must be at least 0.025 s, the longest receptive field of the registry's models" in err
    )
    assert "400 samples at 16000 Hz" in err


def test_window_shorter_than_the_checkpoints_own_receptive_field_is_refused(tmp_path, capsys):
    # a checkpoint whose first conv kernel is 1000 samples: a 1390-sample receptive field (58 ms at 24 kHz)
    model = write_random_checkpoint(
        tmp_path / "m",
        like="MERT-v1-95M",
        size="tiny",
        config_overrides={"conv_kernel": [1000, 3, 3, 3, 3, 2, 2]},
    )
    write_audio(tmp_path / "a.wav", music_like(1.0, 24000, 1, seed=1), 24000, "wav")
    argv = [
        "run",
        str(tmp_path / "a.wav"),
        str(tmp_path / "t"),
        "--model",
        str(model),
        "--dry-run",
        "--quiet",
    ]
    assert main([*argv, "--window", "0.05", "--min-segment", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "window_s=0.05 is 1200 samples at 24000 Hz, shorter than the receptive field of" in err
    assert "1390 samples (0.05792 s)" in err
    assert main([*argv, "--window", "1", "--min-segment", "0.05"]) == 2
    assert "min_segment_s=0.05 is 1200 samples" in capsys.readouterr().err
    assert main([*argv, "--window", "1", "--min-segment", "0.06"]) == 0  # 1440 samples: enough


# ---- secrets in malformed options ------------------------------------------------------------------------------
KEY, SECRET = "AKIAFAKEKEY0000001", "hunter2-do-not-log"
MALFORMED = [
    (
        f'{{"key": "{KEY}", "secret": "{SECRET}",}}',
        "not valid JSON (Expecting property name enclosed in double",
    ),
    (f'{{"key": "{KEY}" "secret": "{SECRET}"}}', "line 1, column"),
    (f'["{KEY}", "{SECRET}"]', "must be a JSON object of fsspec options"),
    (f'"{SECRET}"', "must be a JSON object of fsspec options"),
]


def _entrypoints(bad: str) -> list[tuple[object, list[str], str]]:
    from jobs import extract, scheduled

    return [
        (main, ["run", "in/", "out/", "--storage-options", bad], "--storage-options"),
        (main, ["run", "in/", "out/", "--output-storage-options", bad], "--output-storage-options"),
        (main, ["read", "t/", "--layer", "0", "--storage-options", bad], "--storage-options"),
        (main, ["inspect", "t/", "--storage-options", bad], "--storage-options"),
        (main, ["vacuum", "t/", "--storage-options", bad], "--storage-options"),
        (main, ["compact", "t/", "--storage-options", bad], "--storage-options"),
        (extract.main, ["in/", "out/", "--storage-options", bad], "--storage-options"),
        (extract.main, ["in/", "out/", "--output-storage-options", bad], "--output-storage-options"),
        (
            scheduled.main,
            ["tick", "in/", "out/", "--tick", "0", "--storage-options", bad],
            "--storage-options",
        ),
        (scheduled.main, ["promote", "root/", "t/", "--storage-options", bad], "--storage-options"),
        (scheduled.main, ["compact", "t/", "--storage-options", bad], "--storage-options"),
    ]


@pytest.mark.parametrize("bad, problem", MALFORMED)
def test_malformed_storage_options_are_named_never_echoed(capsys, bad, problem):
    for fn, argv, flag in _entrypoints(bad):
        with pytest.raises(SystemExit) as stop:
            fn(argv)
        assert stop.value.code == 2, argv
        got = capsys.readouterr()
        assert KEY not in got.out + got.err and SECRET not in got.out + got.err, (argv, got.err)
        assert f"argument {flag}: " in got.err and problem in got.err, (argv, got.err)


def test_yaml_storage_options_are_never_echoed(tmp_path, capsys):
    from jobs import extract

    cases = {
        "string.yaml": f"input: in/\noutput: out/\nstorage_options: key={KEY},secret={SECRET}\n",
        "list.yaml": f"input: in/\noutput: out/\noutput_storage_options: [{KEY}, {SECRET}]\n",
        "broken.yaml": f'input: in/\noutput: out/\nstorage_options: {{key: {KEY}, secret: "{SECRET}\n',
        "unclosed.yaml": f"input: in/\nstorage_options: {{key: {KEY}, secret: {SECRET}]\n",
    }
    expected = {
        "string.yaml": "storage_options: must be a mapping of fsspec options (got a str, not shown)",
        "list.yaml": "output_storage_options: must be a mapping of fsspec options (got a list, not shown)",
        "broken.yaml": "not valid YAML (found unexpected end of stream at line 4, column 1)",
        "unclosed.yaml": "not valid YAML (expected ',' or '}', but got ']' at line 2, column",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        for fn in (main, extract.main):
            argv = ["run"] if fn is main else []
            assert fn([*argv, "--config", str(tmp_path / name), "--quiet"]) == 2, name
            got = capsys.readouterr()
            assert KEY not in got.out + got.err and SECRET not in got.out + got.err, (name, got.err)
            assert expected[name] in got.err, (name, got.err)


# ---- exit codes ------------------------------------------------------------------------------------------------
def test_one_table_of_exit_codes():
    from pipeline.errors import ExitCode, ModelLoadError, PipelineError, RunInterrupted, RunStopped, exit_code
    from pipeline.table import LeaseHeld

    assert exit_code(None) == ExitCode.OK == 0
    assert exit_code(PipelineError("x")) == exit_code(ModelLoadError("x")) == ExitCode.FAILED == 1
    assert exit_code(ValueError("x")) == ExitCode.USAGE == 2
    assert exit_code(RunStopped("x", {})) == ExitCode.STOPPED == 3
    assert exit_code(LeaseHeld("x")) == ExitCode.BUSY == 75
    assert exit_code(KeyboardInterrupt()) == ExitCode.KEYBOARD == 130
    assert exit_code(RunInterrupted("x", {})) == ExitCode.INTERRUPTED == 143


@pytest.mark.usefixtures("ray_local")
def test_a_held_lease_is_75_from_the_cli_and_the_job(tmp_path, capsys):
    from jobs import extract
    from pipeline.table import FeatureTable

    model = write_random_checkpoint(tmp_path / "m", like="MERT-v0", size="tiny")
    write_audio(tmp_path / "a.wav", music_like(2.0, 16000, 1, seed=1), 16000, "wav")
    out = tmp_path / "t"
    argv = [str(tmp_path / "a.wav"), str(out), "--model", str(model), "--quiet"]
    assert main(["run", *argv]) == 0  # the table exists
    holder = FeatureTable(str(out))
    holder.acquire_lease("someone-else", ttl_s=60)
    try:
        assert main(["run", *argv]) == 75
        assert "being written by run someone-else" in capsys.readouterr().err
        assert extract.main(argv) == 75
        assert "being written by run someone-else" in capsys.readouterr().err
    finally:
        holder.release_lease()
