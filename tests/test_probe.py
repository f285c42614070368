"""Which layer? The probe job and `neighbors` over a real table built from a labelled, audible corpus (4 pitch
classes x 10 tones) with a tiny random checkpoint and the shared local Ray; the metrics against hand-computed
values; recording vectors against hand-computed frame-weighted means on tables written by the real writer."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline import probe
from pipeline.atomic import write_once
from pipeline.checkpoints import write_random_checkpoint
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.neighbors import search
from pipeline.probe import (
    accuracy,
    average_precision,
    chance,
    macro_f1,
    plan_splits,
    recording_vectors,
    roc_auc,
)
from pipeline.synth import write_labelled_corpus
from pipeline.table import FeatureTable, feature_schema
from pipeline.table.schema import parquet_bytes

FAST = ["--weight-decays", "1e-3,0.1", "--control-repeats", "2", "--quiet"]


# ---- metrics: hand-computed values --------------------------------------------------------------------------
def test_metrics_match_hand_computed_values():
    t, p = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    # class 0: TP 1, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1 -> 4/5; class 2: TP 0, FN 1 -> 0
    assert macro_f1(t, p) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert accuracy(t, p) == pytest.approx(0.6)
    assert (
        macro_f1(np.array([0, 0]), np.array([0, 0])) == 1.0
    )  # a class neither true nor predicted is skipped
    # multi-label: column 0 TP 1, FN 1 -> 2/3; column 1 TP 1, FP 1 -> 2/3; one row of three all right
    y = np.array([[1, 0], [1, 1], [0, 0]])
    q = np.array([[1, 0], [0, 1], [0, 1]])
    assert macro_f1(y, q) == pytest.approx(2 / 3)
    assert accuracy(y, q) == pytest.approx(1 / 3)
    # scikit-learn's documented example: AUC 0.75, AP 0.8333
    yb, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(yb, s) == pytest.approx(0.75)
    assert average_precision(yb, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)  # a tie counts half
    # tied scores are one threshold: at 0.5 P 1/2, R 1/2; at 0.2 P 2/3, R 1
    assert average_precision(np.array([1, 0, 1]), np.array([0.5, 0.5, 0.2])) == pytest.approx(0.25 + 1 / 3)
    # a tag neither true nor predicted anywhere is left out of the macro mean (not counted as 0, not NaN)
    assert macro_f1(np.array([[1, 0], [0, 0]]), np.array([[1, 0], [0, 0]])) == 1.0
    # two columns: the macro mean; a column without a positive is left out of AP and AUC
    y2 = np.stack([yb, [1, 0, 0, 1], [0, 0, 0, 0]], axis=1)
    s2 = np.stack([s, [0.9, 0.2, 0.3, 0.1], [0.1, 0.2, 0.3, 0.4]], axis=1)
    assert roc_auc(y2, s2) == pytest.approx((0.75 + 0.5) / 2)
    assert average_precision(y2, s2) == pytest.approx((0.8333333 + (0.5 * 1 + 0.5 * 0.5)) / 2)
    assert chance(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), False)["accuracy"] == pytest.approx(0.5)


def test_k_folds_keep_every_test_recording_out_of_training():
    strata = np.repeat(np.arange(4), 10)
    scheme, folds = plan_splits(40, strata, None, folds=5, seed=3)
    assert scheme == "k-fold" and len(folds) == 5
    seen = np.concatenate([f.test for f in folds])
    assert sorted(seen.tolist()) == list(range(40))  # every recording is a test recording exactly once
    for f in folds:
        assert (
            not set(f.test) & set(f.train)
            and not set(f.valid) & set(f.train)
            and not set(f.test) & set(f.valid)
        )
        assert len(f.train) + len(f.valid) + len(f.test) == 40
        assert np.bincount(strata[f.test], minlength=4).tolist() == [2, 2, 2, 2]  # stratified
    given = ["train"] * 30 + ["test"] * 10
    scheme, (fold,) = plan_splits(40, strata, given, seed=0)
    assert scheme == "given" and set(fold.test) == set(range(30, 40))
    assert len(fold.valid) > 0 and not set(fold.valid) & set(fold.train)  # valid carved out of train only
    assert set(fold.train) | set(fold.valid) == set(range(30))


# ---- recording vectors on tables written by the real writer ------------------------------------------------
def _hand_table(root: Path, granularity: str) -> FeatureTable:
    """Two recordings, dim 2; segment rows (or frames) with known values."""
    t = FeatureTable(str(root))
    config = {
        "granularity": granularity,
        "storage_dtype": "float32",
        "layers": [0],
        "model_content_hash": "x",
    }
    t.create_or_check({"config_hash": granularity, "config": config, "dim": 2, "provenance": {}})
    schema = feature_schema(2, "float32", granularity)
    if granularity == "frame":
        emb = [[[1.0, 0.0], [3.0, 0.0], [5.0, 3.0]], [[0.0, 2.0]], [[4.0, 4.0]]]  # a: 3 + 1 frames, b: 1
    else:
        emb = [[2.0, 0.0], [0.0, 4.0], [4.0, 4.0]]
    rows = {
        "recording_id": ["a", "a", "b"],
        "segment": [0, 1, 0],
        "start_s": [0.0, 5.0, 0.0],
        "duration_s": [5.0, 1.0, 5.0],
        "n_frames": [3, 1, 1],
        "embedding": emb,
        "run_id": ["r"] * 3,
        "shard": [0] * 3,
    }
    if granularity == "frame":
        rows["frame_rate"] = [75.0] * 3
    layer = pa.table({f.name: rows[f.name] for f in schema}, schema=schema)
    rel = "features/layer=0/r-hand.parquet"
    data = parquet_bytes(layer)
    write_once(t.uri(rel), data)
    t.acquire_lease("r", ttl_s=30)
    t.commit(
        [
            {
                "recording_id": r,
                "uri": f"file:///x/{r}.wav",
                "status": "ok",
                "run_id": "r",
                "parts": ["r-hand"],
            }
            for r in ("a", "b")
        ],
        [
            {
                "id": "r-hand",
                "files": [{"layer": 0, "path": rel, "rows": 3, "bytes": len(data)}],
                "rows": {"a": 2, "b": 1},
            }
        ],
    )
    t.release_lease()
    return t


@pytest.mark.parametrize("chunk", [1, 16384])  # 1: a recording's rows straddle chunks
@pytest.mark.parametrize("granularity", ["segment", "frame"])
def test_recording_vectors_are_frame_weighted_means(tmp_path, granularity, chunk, monkeypatch):
    monkeypatch.setattr(probe, "ROWS_PER_CHUNK", chunk)
    t = _hand_table(tmp_path / granularity, granularity)
    ids, x = recording_vectors(t, 0, ["b", "a"])
    assert ids == ["b", "a"]
    # segment: a = (3 x [2, 0] + 1 x [0, 4]) / 4; frame: the mean of a's 4 frames, the same numbers
    assert x.tolist() == [[4.0, 4.0], [1.5, 1.0] if granularity == "segment" else [2.25, 1.25]]


# ---- the probe over a real table ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("model") / "tiny",
        like="MERT-v1-95M",
        size="tiny",
        config_overrides={"num_hidden_layers": 4},
    )


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, model_dir, ray_local):
    """(table root, audio folder, labels.csv): 4 pitch classes x 10 tones of 1.5 s, and an exact copy of the
    first tone (not labelled)."""
    from pipeline.engine import run

    audio = tmp_path_factory.mktemp("labelled") / "audio"
    paths, labels = write_labelled_corpus(audio, classes=4, per_class=10, duration_s=1.5, seed=0)
    shutil.copy(paths[0], audio / "zz_copy_of_first.wav")
    table = audio.parent / "table"
    cfg = RunConfig(
        input=str(audio),
        output=str(table),
        model=str(model_dir),
        progress=False,
        batch_size=8,
        commit_interval_s=3600,
    )
    summary = run(cfg, log=lambda m: None)
    assert summary["counts"]["ok"] == 41
    return table, audio, labels


def test_probe_finds_the_layer_where_the_pitch_is(labelled, tmp_path, capsys):
    table, _, labels = labelled
    out = tmp_path / "report"
    assert main(["probe", str(table), "--labels", str(labels), "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [e["layer"] for e in report["layers"]] == [0, 1, 2, 3, 4]
    best = next(e for e in report["layers"] if e["layer"] == report["best_layer"])
    assert best["scores"]["macro_f1"] == max(e["scores"]["macro_f1"] for e in report["layers"])
    chance_f1 = report["chance"]["macro_f1"]
    assert chance_f1 == pytest.approx(0.25)
    assert best["scores"]["macro_f1"] >= best["control"]["macro_f1"] + 0.3
    assert abs(report["control"]["best_layer"]["macro_f1"] - chance_f1) <= 0.1
    assert abs(report["weighted"]["control"]["macro_f1"] - chance_f1) <= 0.1
    assert report["weighted"]["scores"]["macro_f1"] >= best["scores"]["macro_f1"] - 0.05
    assert sum(report["weights"].values()) == pytest.approx(1.0)
    assert all(v >= 0 for v in report["weights"].values())
    assert report["recordings"]["matched"] == 40 and report["recordings"]["split"] == "k-fold"
    assert report["recordings"]["test"] == [8] * 5  # 5 folds of 8; every recording tested once
    assert report["model"]["content_hash"] and report["table"] == str(table)
    assert report["classes"] == ["A3", "C#4", "E4", "G4"] and report["task"] == "single_label"
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "control macro_f1" in page
    assert f"best layer: {report['best_layer']}" in printed
    # split discipline in what was run: within each fold no test (or valid) recording is a train recording
    roles: dict[tuple[int, str], set[str]] = {}
    with open(out / "splits.csv") as f:
        for row in csv.DictReader(f):
            roles.setdefault((int(row["fold"]), row["role"]), set()).add(row["recording_id"])
    for k in range(5):
        assert not roles[(k, "test")] & roles[(k, "train")]
        assert not roles[(k, "valid")] & roles[(k, "train")]
    assert not list(out.glob(".probe-stack*"))  # the on-disk stack is removed


def test_a_given_split_is_obeyed(labelled, tmp_path):
    table, _, labels = labelled
    rows = list(csv.DictReader(open(labels)))
    split_file = tmp_path / "split.csv"
    with open(split_file, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "label", "split"])
        for i, r in enumerate(rows):
            w.writerow([r["uri"], r["label"], ("train", "train", "valid", "test", "train")[i % 5]])
    out = tmp_path / "given"
    assert (
        main(["probe", str(table), "--labels", str(split_file), "--out", str(out), "--layers", "2,4", *FAST])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["recordings"]["split"] == "given"
    assert (report["recordings"]["train"], report["recordings"]["valid"], report["recordings"]["test"]) == (
        [24],
        [8],
        [8],
    )
    given = {
        "file://" + r["uri"]: ("train", "train", "valid", "test", "train")[i % 5] for i, r in enumerate(rows)
    }
    with open(out / "splits.csv") as f:
        used = {row["recording_id"]: row["role"] for row in csv.DictReader(f)}
    assert used == given


def test_the_layer_weighting_streams_minibatches_within_the_memory_limit(labelled, tmp_path):
    table, _, labels = labelled
    out = tmp_path / "streamed"
    # 0.006 MB: 8 recordings x 2 layers x 32 dims x 4 bytes x 3 copies; the train split (~27) needs 4 batches
    argv = ["--layers", "2,4", "--folds", "3", "--memory-mb", "0.006", "--weight-decays", "0.01"]
    assert main(["probe", str(table), "--labels", str(labels), "--out", str(out), *argv, "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["memory"]["weighting_batch_recordings"] == 8 < min(report["recordings"]["train"])
    assert report["memory"]["weighting_largest_batch_seen"] == 8  # never the whole train split at once
    weighted = report["weighted"]
    assert weighted["scores"]["macro_f1"] >= weighted["control"]["macro_f1"] + 0.3
    assert sum(report["weights"].values()) == pytest.approx(1.0)


def test_multi_label_reports_auc_and_average_precision(labelled, tmp_path):
    table, _, labels = labelled
    rows = list(csv.DictReader(open(labels)))
    multi = tmp_path / "multi.parquet"
    high = {"E4", "G4"}
    tags = [r["label"] + ("|high" if r["label"] in high else "|low") for r in rows]
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"uri": [r["uri"] for r in rows], "label": tags}), multi)
    out = tmp_path / "multi"
    assert main(["probe", str(table), "--labels", str(multi), "--out", str(out), "--layers", "2", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "multi_label" and set(report["classes"]) == {
        "A3",
        "C#4",
        "E4",
        "G4",
        "high",
        "low",
    }
    scores = report["layers"][0]["scores"]
    assert set(scores) == {"accuracy", "macro_f1", "roc_auc", "average_precision"}
    assert scores["roc_auc"] > report["layers"][0]["control"]["roc_auc"] + 0.2


@pytest.mark.parametrize(
    "content, expected",
    [
        (
            "recording_id,label\nfile:///nowhere/x.wav,A3\nfile:///nowhere/y.wav,E4\n",
            "none of its 2 recording_ids",
        ),
        ("uri,tag\n/a.wav,A3\n", "lacks the column(s) label; it has ['tag', 'uri']"),
        ("name,label\n/a.wav,A3\n", "lacks the column(s) recording_id (or uri)"),
        ("SINGLE", "a probe needs at least two classes"),
        ("SPLIT", "split 'holdout' is not one of train, valid, test"),
    ],
)
def test_bad_labels_get_a_clear_message(labelled, tmp_path, capsys, content, expected):
    table, _, labels = labelled
    rows = list(csv.DictReader(open(labels)))
    if content == "SINGLE":
        content = "uri,label\n" + "".join(f"{r['uri']},A3\n" for r in rows)
    elif content == "SPLIT":
        content = "uri,label,split\n" + "".join(f"{r['uri']},{r['label']},holdout\n" for r in rows)
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    assert main(["probe", str(table), "--labels", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert expected in err and str(bad) in err


def test_search_in_blocks_is_exact():
    rng = np.random.default_rng(0)
    x, q = rng.standard_normal((101, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    cos = (x @ q) / np.linalg.norm(x, axis=1) / np.linalg.norm(q)
    want = np.argsort(-cos)[:7]
    for block in (1, 10, 1000):  # the top k carried across block boundaries
        idx, sims = search(x, q, 7, block=block)
        assert idx.tolist() == want.tolist() and np.allclose(sims, cos[want], atol=1e-6)
    idx, _ = search(x, x[50], 3, block=7, prefer=50)
    assert idx[0] == 50


# ---- neighbors ---------------------------------------------------------------------------------------------
def test_neighbors_returns_itself_then_the_duplicate(labelled, capsys):
    table, audio, _ = labelled
    first = sorted(audio.glob("*.wav"))[0]
    assert main(["neighbors", str(table), "file://" + str(first), "--layer", "2", "-k", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ids = [n["recording_id"] for n in got["neighbors"]]
    assert ids[0] == "file://" + str(first)
    assert ids[1] == "file://" + str(audio / "zz_copy_of_first.wav")
    assert got["neighbors"][1]["similarity"] > 0.9999 and got["query_kind"] == "recording"
    assert len(ids) == 4 and got["neighbors"][2]["similarity"] < got["neighbors"][1]["similarity"]
    # by plain path, in text form
    assert main(["neighbors", str(table), str(first), "--layer", "4", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "1" and lines[1].endswith(str(first))


def test_neighbors_embeds_an_audio_query_with_the_tables_checkpoint_only(
    labelled, model_dir, tmp_path, capsys
):
    table, audio, _ = labelled
    query = tmp_path / "query.wav"
    shutil.copy(sorted(audio.glob("E4_*.wav"))[3], query)
    argv = ["neighbors", str(table), str(query), "--layer", "3", "-k", "3", "--json"]
    assert main([*argv, "--model", str(model_dir)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["query_kind"] == "audio"
    assert got["neighbors"][0]["recording_id"] == "file://" + str(sorted(audio.glob("E4_*.wav"))[3])
    assert got["neighbors"][0]["similarity"] > 0.9999
    other = write_random_checkpoint(tmp_path / "other", like="MERT-v1-95M", size="tiny", seed=1)
    assert main([*argv, "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "is not the one" in err and str(other) in err
    assert main(argv) == 2
    assert "give the table's checkpoint with --model" in capsys.readouterr().err
    assert main(["neighbors", str(table), str(tmp_path / "missing.wav"), "--layer", "3"]) == 2
    assert "neither a recording" in capsys.readouterr().err
