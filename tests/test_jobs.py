"""jobs.extract and jobs.scheduled through their command lines, on the shared local Ray: exit codes, ticks,
changed and deleted inputs, compact, overlapping ticks, reprocessing into a new table and promoting it."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import duckdb
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from jobs import extract, scheduled
from pipeline import read_features, read_ledger
from pipeline.checkpoints import write_random_checkpoint
from pipeline.config import RunConfig
from pipeline.synth import music_like, write_audio
from pipeline.table import FeatureTable
from pipeline.table.maintenance import vacuum
from pipeline.testing.tables import lease_holder

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("model") / "tiny-95M", like="MERT-v1-95M", size="tiny"
    )


def add_files(folder: Path, names: dict[str, float], seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, secs) in enumerate(names.items()):
        write_audio(
            folder / name, music_like(secs, 32000, channels=2, seed=seed + i), 32000, name.rsplit(".", 1)[1]
        )


def common(model_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--batch-size", "4", "--quiet", "--json", "--commit-interval", "3600"]


def tick(audio: Path, out: Path, model_dir: Path, when: str, *extra: str, capsys=None) -> tuple[int, dict]:
    rc = scheduled.main(
        ["tick", str(audio), str(out), *common(model_dir), "--tick", when, "--period", "1h", *extra]
    )
    got = capsys.readouterr() if capsys else None
    text = got.out if got else ""
    summary = json.loads(text) if text.strip().startswith("{") else {}
    summary["_stderr"] = got.err if got else ""
    return rc, summary


def segments_of(table: Path, layer: int = 0) -> dict[str, int]:
    t = read_features(str(table), layer)
    out: dict[str, int] = {}
    for rid in t.column("recording_id").to_pylist():
        out[Path(rid).name] = out.get(Path(rid).name, 0) + 1
    keys = list(zip(t.column("recording_id").to_pylist(), t.column("segment").to_pylist(), strict=True))
    assert len(keys) == len(set(keys)), "duplicate (recording, segment) rows"
    return out


def plain_segments(table: Path, layer: int = 0) -> dict[str, int]:
    """What a plain Parquet reader sees (no ledger, no commit protocol)."""
    t = pads.dataset(table / "features" / f"layer={layer}", format="parquet").to_table(
        columns=["recording_id"]
    )
    out: dict[str, int] = {}
    for rid in t.column("recording_id").to_pylist():
        out[Path(rid).name] = out.get(Path(rid).name, 0) + 1
    return out


# ---- jobs.extract ----------------------------------------------------------------------------------------------
def test_extract_takes_the_run_options_and_maps_outcomes_to_exit_codes(model_dir, tmp_path, capsys):
    audio = tmp_path / "audio"
    add_files(audio, {"a.wav": 6.0, "b.flac": 3.0})
    out = tmp_path / "table"
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        f"input: {audio}\noutput: {out}\nmodel: {model_dir}\nbatch_size: 4\nlayers: [0, 2]\n"
    )
    # the same options as `mert-pipeline run`, from the same table: YAML, then flags over it
    from pipeline.cli import RUN_OPTIONS, config_from_args

    flags = {a.option_strings[0] for a in extract.build_parser()._actions if a.option_strings}
    assert {f for f, *_ in RUN_OPTIONS} <= flags
    args = extract.build_parser().parse_args(["--config", str(yaml_file), "--layers", "1", "--window", "4"])
    c = config_from_args(args)
    assert (c.layers, c.window_s, c.batch_size, c.input) == ((1,), 4.0, 4, str(audio))

    assert extract.main(["--config", str(yaml_file), "--quiet", "--json"]) == extract.EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "complete" and summary["counts"]["ok"] == 2
    assert segments_of(out, 2) == {"a.wav": 2, "b.flac": 1}

    # another live run holds the lease: 75 (try later), nothing written
    holder = FeatureTable(str(out))
    holder.acquire_lease("someone-else", ttl_s=60)
    try:
        add_files(audio, {"c.wav": 2.0})
        assert extract.main(["--config", str(yaml_file), "--quiet"]) == extract.EXIT_BUSY
        assert "being written by run someone-else" in capsys.readouterr().err
    finally:
        holder.release_lease()
    # could not commit (systemic): 1; a bad option value: 2
    assert extract.main([str(tmp_path / "nowhere"), str(out), "--model", str(model_dir), "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert extract.main(["--config", str(yaml_file), "--window", "-1", "--quiet"]) == extract.EXIT_USAGE
    assert "window_s=-1" in capsys.readouterr().err
    assert extract.main(["--config", str(tmp_path / "missing.yaml")]) == extract.EXIT_USAGE
    assert "missing.yaml: cannot read it" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("input: [unclosed\n")
    assert extract.main(["--config", str(tmp_path / "broken.yaml")]) == extract.EXIT_USAGE
    assert "not valid YAML" in capsys.readouterr().err
    # the error-rate limit stops a run after committing what finished: exit 3, which a scheduler notices
    (audio / "junk1.mp3").write_bytes(b"\x00" * 3000)
    (audio / "junk2.mp3").write_bytes(b"\x01" * 3000)
    rc = extract.main(
        [
            "--config",
            str(yaml_file),
            "--quiet",
            "--json",
            "--max-error-rate",
            "0.5",
            "--error-rate-min-inputs",
            "1",
        ]
    )
    s = json.loads(capsys.readouterr().out)
    assert rc == extract.EXIT_STOPPED == 3 and s["status"] == "stopped" and "error rate" in s["stop_reason"]


def test_a_stopped_run_has_the_same_exit_code_from_the_cli_and_the_job(model_dir, tmp_path, capsys):
    from pipeline.cli import main as cli_main

    audio = tmp_path / "audio"
    add_files(audio, {"a.wav": 2.0})
    (audio / "junk1.mp3").write_bytes(b"\x00" * 3000)
    (audio / "junk2.mp3").write_bytes(b"\x01" * 3000)
    argv = [str(audio), "--model", str(model_dir), "--quiet", "--max-error-rate", "0.5"]
    argv += ["--error-rate-min-inputs", "1", "--decode-workers", "1"]
    codes = {}
    for name, fn, head in (("cli", cli_main, ["run"]), ("job", extract.main, [])):
        out = tmp_path / f"table-{name}"
        codes[name] = fn([*head, argv[0], str(out), *argv[1:]])
        err = capsys.readouterr().err
        assert json.loads(next((out / "runs").iterdir()).read_text())["status"] == "stopped"
        assert codes[name] == 3, (name, codes[name], err[-2000:])  # not 0 (a scheduler must notice), not 2
        assert "error rate" in err, err[-2000:]
    assert codes == {"cli": 3, "job": 3}


def test_a_yaml_run_id_is_a_prefix_so_retries_and_ticks_never_reuse_it(model_dir, tmp_path, capsys):
    audio, out = tmp_path / "audio", tmp_path / "table"
    add_files(audio, {"a.wav": 2.0, "b.flac": 3.0})
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"input: {audio}\noutput: {out}\nmodel: {model_dir}\nrun_id: nightly\n")
    ids = []
    for when in ("2026-11-25T06:00:00Z", "2026-11-25T07:00:00Z"):
        rc = scheduled.main(["tick", "--config", str(yaml_file), *common(model_dir), "--tick", when])
        s = json.loads(capsys.readouterr().out)
        assert rc == 0 and s["status"] == "complete", s
        ids.append(s["run_id"])
    assert ids[0] != ids[1]
    assert ids[0].startswith("nightly-20261125T060000Z-") and ids[1].startswith("nightly-20261125T070000Z-")
    # a retried job with the same arguments resumes under a new id: what is committed is skipped, not rewritten
    before = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    rc = extract.main(["--config", str(yaml_file), *common(model_dir)])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["run_id"].startswith("nightly-") and s["run_id"] not in ids
    assert s["counts"]["skipped"] == 2 and s["counts"]["processed"] == 0
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == before
    assert sorted(p.stem for p in (out / "runs").iterdir()) == sorted([*ids, s["run_id"]])


# ---- ticks -----------------------------------------------------------------------------------------------------
def test_ticks_process_each_file_once_and_a_repeated_tick_is_a_noop(model_dir, tmp_path, capsys):
    audio, out = tmp_path / "audio", tmp_path / "table"
    add_files(audio, {"a.wav": 6.0, "b.flac": 3.0})
    rc, s1 = tick(audio, out, model_dir, "2026-11-25T06:17:03Z", capsys=capsys)
    assert rc == 0 and s1["status"] == "complete" and s1["counts"]["processed"] == 2
    assert s1["tick"] == "2026-11-25T06:00:00Z/1h" and s1["run_id"].startswith("tick-20261125T060000Z-")

    add_files(audio, {"c.ogg": 4.0, "d.mp3": 7.0}, seed=10)  # new files between the ticks
    rc, s2 = tick(audio, out, model_dir, "2026-11-25T07:00:00Z", capsys=capsys)
    assert rc == 0 and s2["counts"]["processed"] == 2 and s2["counts"]["skipped"] == 2

    # the same tick again (a retried pod, a duplicated trigger), even with a new file waiting: nothing at all
    add_files(audio, {"e.wav": 2.0}, seed=20)
    runs_before = sorted((out / "runs").iterdir())
    rc, s3 = tick(audio, out, model_dir, "2026-11-25T07:59:59+00:00", capsys=capsys)
    assert rc == 0 and s3["status"] == "noop" and s3["done_by"] == s2["run_id"]
    assert sorted((out / "runs").iterdir()) == runs_before
    # the next tick picks the new file up
    rc, s4 = tick(
        audio,
        out,
        model_dir,
        str(int(time.mktime((2026, 11, 25, 8, 30, 0, 0, 0, 0)) - time.timezone)),
        capsys=capsys,
    )
    assert rc == 0 and s4["counts"]["processed"] == 1 and s4["tick"] == "2026-11-25T08:00:00Z/1h"

    ledger = read_ledger(str(out), latest=False)
    names = [Path(u).name for u in ledger.column("uri").to_pylist()]
    assert sorted(names) == ["a.wav", "b.flac", "c.ogg", "d.mp3", "e.wav"]  # each file processed once
    assert segments_of(out) == {"a.wav": 2, "b.flac": 1, "c.ogg": 1, "d.mp3": 2, "e.wav": 1}


def test_tick_and_period_are_validated():
    assert scheduled.parse_period("15m") == 900 and scheduled.parse_period("1d") == 86400
    for bad in ("0h", "1y", "h", "-1h"):
        with pytest.raises(ValueError, match="--period"):
            scheduled.parse_period(bad)
    with pytest.raises(ValueError, match="--tick"):
        scheduled.parse_tick("yesterday")
    t = scheduled.parse_tick("2026-11-25T08:44:00+02:00")  # an offset is honoured, then UTC
    assert scheduled.tick_label(scheduled.floor_tick(t, 3600), "1h") == "2026-11-25T06:00:00Z/1h"
    assert scheduled.tick_label(scheduled.floor_tick(t, 86400), "1d") == "2026-11-25T00:00:00Z/1d"


def test_overlapping_ticks_are_kept_apart_by_the_lease(model_dir, tmp_path, capsys):
    audio, out = tmp_path / "audio", tmp_path / "table"
    add_files(audio, {f"t{i}.wav": 6.0 for i in range(4)})
    results: dict[str, int] = {}

    def go(when: str, wait: str) -> None:
        results[when] = scheduled.main(
            ["tick", str(audio), str(out), *common(model_dir), "--tick", when, "--lease-wait", wait]
        )

    first = threading.Thread(target=go, args=("2026-11-25T06:00:00Z", "0"))
    first.start()
    deadline = time.time() + 60
    while lease_holder(str(out)) is None and time.time() < deadline:
        time.sleep(0.01)
    # a second tick while the first holds the lease: refused without --lease-wait (exit 75, retry later) ...
    assert (
        scheduled.main(["tick", str(audio), str(out), *common(model_dir), "--tick", "2026-11-25T07:00:00Z"])
        == 75
    )
    # ... and with --lease-wait it waits, then reads the ledger the first one committed
    second = threading.Thread(target=go, args=("2026-11-25T07:00:00Z", "300"))
    second.start()
    first.join(300)
    second.join(300)
    capsys.readouterr()
    assert results == {"2026-11-25T06:00:00Z": 0, "2026-11-25T07:00:00Z": 0}
    ledger = read_ledger(str(out), latest=False)
    assert ledger.num_rows == 4  # no input processed twice
    runs = {json.loads(p.read_text())["tick"]: json.loads(p.read_text()) for p in (out / "runs").iterdir()}
    assert runs["2026-11-25T06:00:00Z/1h"]["counts"]["processed"] == 4
    assert runs["2026-11-25T07:00:00Z/1h"]["counts"]["processed"] == 0
    assert runs["2026-11-25T07:00:00Z/1h"]["counts"]["skipped"] == 4


# ---- changed and deleted inputs ------------------------------------------------------------------------------
def test_changed_input_supersedes_and_compact_rewrites_the_files(model_dir, tmp_path, capsys):
    audio, out = tmp_path / "audio", tmp_path / "table"
    add_files(audio, {"a.wav": 12.0, "b.wav": 6.0})
    assert tick(audio, out, model_dir, "2026-11-25T06:00:00Z", capsys=capsys)[0] == 0
    old = read_features(str(out), 1)
    assert segments_of(out) == {"a.wav": 3, "b.wav": 2}

    add_files(audio, {"a.wav": 4.0}, seed=99)  # a new master of a.wav: shorter, other content
    rc, s = tick(audio, out, model_dir, "2026-11-25T07:00:00Z", capsys=capsys)
    assert rc == 0 and s["counts"]["processed"] == 1 and s["counts"]["skipped"] == 1
    # the reader shows only the newest at once; a plain Parquet reader still sees the old rows too
    assert segments_of(out) == {"a.wav": 1, "b.wav": 2}
    assert plain_segments(out) == {"a.wav": 4, "b.wav": 2}
    new = read_features(str(out), 1)
    a_new = new.filter(pc.match_substring(new.column("recording_id"), "a.wav"))
    a_old = old.filter(pc.match_substring(old.column("recording_id"), "a.wav"))
    assert a_new.column("run_id")[0].as_py() == s["run_id"]
    assert a_new.column("embedding")[0].as_py() != a_old.column("embedding")[0].as_py()

    assert scheduled.main(["compact", str(out), "--retention", "0"]) == 0
    assert plain_segments(out) == {"a.wav": 1, "b.wav": 2}  # plain readers now agree with the reader
    for layer in (0, 1, 2):
        assert sorted(read_features(str(out), layer).column("recording_id").to_pylist()) == sorted(
            pads.dataset(out / "features" / f"layer={layer}").to_table().column("recording_id").to_pylist()
        )
    n = duckdb.sql(
        f"select count(*) from read_parquet('{out}/features/layer=2/*.parquet') "
        "where recording_id like '%a.wav'"
    ).fetchall()[0][0]
    assert n == 1
    assert lease_holder(str(out)) is None  # compact took the lease and gave it back


def test_deleted_inputs_are_tombstoned_when_mirrored(model_dir, tmp_path, capsys):
    audio, out = tmp_path / "audio", tmp_path / "table"
    add_files(audio, {"a.wav": 6.0, "b.wav": 6.0, "c.flac": 3.0, "d.flac": 3.0})
    assert tick(audio, out, model_dir, "2026-11-25T06:00:00Z", "--compact", capsys=capsys)[0] == 0
    (audio / "b.wav").unlink()  # a takedown

    rc, s = tick(audio, out, model_dir, "2026-11-25T07:00:00Z", capsys=capsys)  # not mirrored: kept
    assert rc == 0 and s["counts"]["deleted"] == 0 and "b.wav" in segments_of(out)

    rc, s = tick(audio, out, model_dir, "2026-11-25T08:00:00Z", "--mirror-deletions", capsys=capsys)
    assert rc == 0 and s["counts"]["deleted"] == 1 and s["counts"]["processed"] == 0
    assert segments_of(out) == {"a.wav": 2, "c.flac": 1, "d.flac": 1}  # hidden from the reader at once
    info = FeatureTable(str(out)).inspect()
    assert info["recordings_by_status"] == {"ok": 3, "deleted": 1}
    assert info["rows_per_layer"][0] == 4
    latest = {Path(r["uri"]).name: r for r in read_ledger(str(out)).to_pylist()}
    assert latest["b.wav"]["status"] == "deleted" and "no longer listed" in latest["b.wav"]["error_message"]
    assert "b.wav" in plain_segments(out)
    assert scheduled.main(["compact", str(out), "--retention", "0"]) == 0
    assert plain_segments(out) == {"a.wav": 2, "c.flac": 1, "d.flac": 1}

    # a mirrored tick that would tombstone most of the table is refused (a mistyped prefix, an empty mount)
    for name in ("a.wav", "c.flac"):
        (audio / name).unlink()
    rc, s = tick(audio, out, model_dir, "2026-11-25T09:00:00Z", "--mirror-deletions", capsys=capsys)
    assert rc == 1 and "--max-delete-fraction" in s["_stderr"] and "Nothing was tombstoned" in s["_stderr"]
    assert segments_of(out) == {"a.wav": 2, "c.flac": 1, "d.flac": 1}  # nothing tombstoned
    # the deleted file comes back: it is processed again
    add_files(audio, {"b.wav": 6.0}, seed=1)
    rc, s = tick(audio, out, model_dir, "2026-11-25T10:00:00Z", "--max-delete-fraction", "1", capsys=capsys)
    assert rc == 0 and s["counts"]["processed"] == 1
    assert segments_of(out)["b.wav"] == 2


# ---- reprocessing --------------------------------------------------------------------------------------------
def test_reprocess_writes_a_new_table_beside_the_old_and_promote_switches_readers(
    model_dir, tmp_path, capsys
):
    audio, root = tmp_path / "audio", tmp_path / "lake"
    add_files(audio, {"a.wav": 6.0, "b.flac": 3.0})
    other = write_random_checkpoint(tmp_path / "tiny-95M-rev2", like="MERT-v1-95M", size="tiny", seed=7)
    args = [str(audio), "--tables-root", str(root), "--batch-size", "4", "--quiet", "--json"]

    assert scheduled.main(["reprocess", *args, "--model", str(model_dir), "--promote"]) == 0
    s1 = json.loads(capsys.readouterr().out)
    old_table = Path(s1["config"]["output"])
    assert old_table.parent == root and old_table.name.startswith("tiny-95M@sha256-")
    assert json.loads((root / "_current.json").read_text())["table"] == str(old_table)
    before = read_features(str(root), 2)  # a consumer reads the root: the current table
    assert before.num_rows == 3

    assert scheduled.main(["reprocess", *args, "--model", str(other)]) == 0
    s2 = json.loads(capsys.readouterr().out)
    new_table = Path(s2["config"]["output"])
    assert new_table.parent == root and new_table != old_table
    assert read_features(str(root), 2).equals(before)  # not promoted yet: consumers still read the old one
    # resumable like any run: rerunning it processes nothing
    assert scheduled.main(["reprocess", *args, "--model", str(other)]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["skipped"] == 2

    assert scheduled.main(["promote", str(root), str(new_table)]) == 0
    pointer = json.loads((root / "_current.json").read_text())
    assert pointer["table"] == str(new_table) and pointer["previous"] == str(old_table)
    after = read_features(str(root), 2)
    assert after.num_rows == 3 and not after.column("embedding").equals(before.column("embedding"))
    assert read_features(str(old_table), 2).equals(before)  # the old table is untouched, beside the new one
    assert sorted(p.name for p in root.iterdir()) == sorted(["_current.json", old_table.name, new_table.name])

    # a tick whose output is the root writes into the current table (after a promote: the new one)
    assert "_current.json -> " in capsys.readouterr().out
    add_files(audio, {"c.wav": 3.0}, seed=5)
    assert (
        scheduled.main(
            [
                "tick",
                str(audio),
                str(root),
                "--model",
                str(other),
                "--batch-size",
                "4",
                "--quiet",
                "--json",
                "--tick",
                "2026-11-25T06:00:00Z",
            ]
        )
        == 0
    )
    s3 = json.loads(capsys.readouterr().out)
    assert s3["config"]["output"] == str(new_table) and s3["counts"]["processed"] == 1
    assert read_features(str(root), 2).num_rows == 4

    # a table is never mixed: the old table refuses a run with the other checkpoint
    assert extract.main([str(audio), str(old_table), "--model", str(other), "--quiet"]) == 1
    assert "holds another configuration" in capsys.readouterr().err
    # promoting something that is not a complete table is refused
    assert scheduled.main(["promote", str(root), str(tmp_path / "nothing")]) == 1
    assert "not a feature table" in capsys.readouterr().err


def test_promote_refuses_a_table_whose_last_run_did_not_complete(model_dir, tmp_path):
    from pipeline.table import promote

    audio, table = tmp_path / "audio", tmp_path / "lake" / "t"
    add_files(audio, {"a.wav": 3.0})
    from pipeline.engine import run

    run(
        RunConfig(input=str(audio), output=str(table), model=str(model_dir), progress=False),
        log=lambda m: None,
    )
    record = next((table / "runs").iterdir())
    data = json.loads(record.read_text())
    data["status"] = "interrupted"
    record.write_text(json.dumps(data))
    with pytest.raises(Exception, match="not complete"):
        promote(str(tmp_path / "lake"), str(table))
    assert promote(str(tmp_path / "lake"), str(table), force=True)["table"] == str(table)
    assert os.path.exists(tmp_path / "lake" / "_current.json")


# ---- GPUs that join late ----------------------------------------------------------------------------------------
class _GrowingCluster:
    """Stands in for `ray` in place(): its GPUs join after a few polls (pods still starting)."""

    def __init__(self, gpus_after: int | None):
        self.polls, self.gpus_after = 0, gpus_after

    def cluster_resources(self) -> dict:
        self.polls += 1
        ready = self.gpus_after is not None and self.polls > self.gpus_after
        return {"CPU": 8.0, "GPU": 2.0 if ready else 0.0}


def test_place_waits_for_gpus_to_join_then_fails_clearly():
    from pipeline.engine import place

    lines: list[str] = []
    c = RunConfig(input="x", output="y", num_gpus=2, gpu_wait_s=30)
    p = place(c, _GrowingCluster(gpus_after=2), lines.append)
    assert (p.device, p.actors, p.num_gpus) == ("cuda", 2, 1.0)
    assert "waiting up to 30 s for 2 GPU(s)" in lines[0]
    t = time.time()
    with pytest.raises(Exception, match=r"num_gpus=2, but the cluster has 0 GPU\(s\) after waiting 1 s"):
        place(RunConfig(input="x", output="y", num_gpus=2, gpu_wait_s=1), _GrowingCluster(None), lines.append)
    assert time.time() - t < 10
    with pytest.raises(Exception, match="--gpu-wait"):  # no wait asked: at once
        place(RunConfig(input="x", output="y", num_gpus=1), _GrowingCluster(None), lines.append)


# ---- compact merges small shards -----------------------------------------------------------------------------
def _rows(table: Path, layer: int) -> list[tuple]:
    t = read_features(str(table), layer)
    return sorted(
        zip(
            t.column("recording_id").to_pylist(),
            t.column("segment").to_pylist(),
            t.column("start_s").to_pylist(),
            t.column("embedding").to_pylist(),
            strict=True,
        )
    )


def test_compact_merges_small_shards_without_changing_what_readers_see(model_dir, tmp_path, capsys):
    audio, out = tmp_path / "audio", tmp_path / "table"
    for i in range(3):  # three ticks' worth: one small file per layer each
        add_files(audio, {f"m{i}.wav": 6.0})
        assert extract.main([str(audio), str(out), *common(model_dir)]) == 0
    capsys.readouterr()
    before = {layer: _rows(out, layer) for layer in (0, 2)}
    fingerprints = {r["recording_id"]: r["fingerprint"] for r in read_ledger(str(out)).to_pylist()}
    small = len(list((out / "features" / "layer=0").glob("*.parquet")))
    assert small >= 3  # small files: the writers flush whenever a recording waits for its commit

    # a target that fits two of these files per merged file: fewer files, the same rows
    size = max(p.stat().st_size for p in (out / "features" / "layer=0").glob("*.parquet"))
    got = vacuum(FeatureTable(str(out)), retention_s=0, merge=True, target_bytes=2 * size + 2)
    assert got["merged_flushes"] >= 2 and got["new_flushes"] < got["merged_flushes"]
    assert len(list((out / "features" / "layer=0").glob("*.parquet"))) < small
    assert _rows(out, 0) == before[0]
    # then the default target (64 MB): everything in one file per layer
    assert scheduled.main(["compact", str(out), "--retention", "0"]) == 0
    assert "small group(s) into 1" in capsys.readouterr().err
    for layer in (0, 2):
        files = list((out / "features" / f"layer={layer}").glob("*.parquet"))
        assert len(files) == 1
        assert _rows(out, layer) == before[layer]  # the reader's rows are unchanged, embeddings included
        plain = pads.dataset(files[0]).to_table()
        assert plain.num_rows == len(before[layer])  # plain readers agree: the small files are gone
    latest = read_ledger(str(out)).to_pylist()
    assert {r["recording_id"]: r["fingerprint"] for r in latest} == fingerprints
    assert all(r["status"] == "ok" for r in latest)
    # a rerun finds nothing to do; the merged table takes new commits as before
    assert extract.main([str(audio), str(out), *common(model_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["skipped"] == 3
