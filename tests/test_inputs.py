"""Inputs: manifests with bad rows (ids, URIs, schemes, duplicates), relative paths, http(s) behind allow_http,
a manifest given without --manifest, and symlinked inputs (followed, cycles and escapes reported as faults).

Real CSV and Parquet manifests, real audio encoded with PyAV, a real HTTP server on localhost and moto's S3 server;
each bad row is followed through the decode stage to the ledger row it becomes.
"""

from __future__ import annotations

import email.utils
import http.server
import os
import re
import threading
import time
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from pipeline.config import SegmentConfig
from pipeline.errors import PipelineError
from pipeline.inputs import InputItem, list_inputs, read_manifest
from pipeline.stages import decode_input, decode_item, work_item
from pipeline.synth import music_like, write_audio

RATE = 16000
SEGMENTS = SegmentConfig(window_s=1.0, min_segment_s=0.5)


def _wav(path: Path, seconds: float = 1.5, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_audio(path, music_like(seconds, RATE, 1, seed=seed), RATE, "wav")


def _manifest(path: Path, rows: list[dict], fmt: str) -> Path:
    """Write `rows` (dicts with uri and maybe recording_id; None = null) as a real CSV or Parquet manifest."""
    names = list(rows[0])
    table = pa.table({n: pa.array([r[n] for r in rows], pa.string()) for n in names})
    path = path.with_suffix("." + fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        pcsv.write_csv(table, path)
    return path


def _record(item: InputItem, storage_options: dict | None = None, isolate: bool = False) -> tuple[int, dict]:
    """(segments, ledger fields) for one item, through the decode stage as the engine calls it."""
    import json

    tables = list(
        decode_input(
            item.uri,
            item.recording_id,
            item.fingerprint,
            sample_rate=RATE,
            segments=SEGMENTS,
            storage_options=storage_options,
            isolate=isolate,
            fault_kind=item.fault_kind,
            fault_message=item.fault_message,
        )
    )
    segs = sum(t.num_rows for t in tables[:-1])
    return segs, json.loads(tables[-1].column("record")[0].as_py())


def _by_id(items: list[InputItem]) -> dict[str, InputItem]:
    ids = [i.recording_id for i in items]
    assert len(ids) == len(set(ids)), ids
    return {i.recording_id: i for i in items}


# ---- manifests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_blank_and_null_ids_and_uris_each_become_one_error_row(tmp_path: Path, fmt: str) -> None:
    a, b, c, d = (_wav(tmp_path / f"{n}.wav", seed=i) for i, n in enumerate("abcd"))
    rows = [
        {"uri": str(a), "recording_id": "t1"},
        {"uri": str(b), "recording_id": ""},
        {"uri": str(c), "recording_id": None},
        {"uri": None, "recording_id": "t4"},
        {"uri": str(d), "recording_id": "  "},
        {"uri": str(d), "recording_id": "t6"},
    ]
    m = _manifest(tmp_path / "lists" / "m", rows, fmt)
    items = _by_id(read_manifest(str(m)))
    base = f"file://{m}"
    assert set(items) == {"t1", f"{base}#row=2", f"{base}#row=3", "t4", f"{base}#row=5", "t6"}
    good = {k for k, i in items.items() if i.fault_kind is None}
    assert good == {"t1", "t6"}
    for rid, n in ((f"{base}#row=2", 2), (f"{base}#row=3", 3), ("t4", 4), (f"{base}#row=5", 5)):
        item = items[rid]
        assert item.fault_kind == "manifest"
        segs, rec = _record(item)
        assert segs == 0 and rec["status"] == "error" and rec["error_kind"] == "manifest"
        assert rec["retryable"] is False and rec["recording_id"] == rid
        msg = rec["error_message"]
        assert str(m) in msg and f"row {n}" in msg, msg
        assert ("uri is blank" in msg) if n == 4 else ("recording_id is blank" in msg), msg
    for rid in ("t1", "t6"):
        segs, rec = _record(items[rid])
        assert rec["status"] == "ok" and segs == 2, rec


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_relative_paths_resolve_against_the_manifest_folder(tmp_path: Path, fmt: str, monkeypatch) -> None:
    a = _wav(tmp_path / "lists" / "audio" / "a.wav")
    b = _wav(tmp_path / "other" / "b.wav", seed=1)
    elsewhere = tmp_path / "elsewhere"
    _wav(elsewhere / "audio" / "a.wav", seed=2)  # what the old cwd-relative reading would have found
    monkeypatch.chdir(elsewhere)
    m = _manifest(
        tmp_path / "lists" / "m",
        [{"uri": "audio/a.wav", "recording_id": "a"}, {"uri": "../other/b.wav", "recording_id": "b"}],
        fmt,
    )
    items = _by_id(read_manifest(str(m)))
    assert items["a"].uri == f"file://{a}" and items["b"].uri == f"file://{b}"
    st = os.stat(a)
    assert items["a"].fingerprint == f"size={st.st_size};mtime_ns={st.st_mtime_ns}"
    assert all(_record(i)[1]["status"] == "ok" for i in items.values())


def test_relative_paths_in_an_s3_manifest_stay_in_its_bucket(
    tmp_path: Path, s3_bucket: str, s3_options: dict
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    fs.put(str(_wav(tmp_path / "x.wav")), f"{s3_bucket}/lists/audio/x.wav")
    m = _manifest(
        tmp_path / "m",
        [
            {"uri": "audio/x.wav", "recording_id": "x"},
            {"uri": "../../../y.wav", "recording_id": "y"},
        ],
        "csv",
    )
    fs.put(str(m), f"{s3_bucket}/lists/m.csv")
    items = _by_id(read_manifest(f"s3://{s3_bucket}/lists/m.csv", storage_options=s3_options))
    assert items["x"].uri == f"s3://{s3_bucket}/lists/audio/x.wav" and items["x"].fault_kind is None
    assert items["x"].fingerprint.startswith(
        f"size={fs.info(f'{s3_bucket}/lists/audio/x.wav')['size']};etag="
    )
    assert _record(items["x"], s3_options)[1]["status"] == "ok"
    assert items["y"].fault_kind == "manifest" and "leads out of" in str(items["y"].fault_message)
    assert "row 2" in str(items["y"].fault_message)


def test_nul_bytes_in_a_uri_or_an_id_are_error_rows(tmp_path: Path) -> None:
    a = _wav(tmp_path / "a.wav")
    rows = [
        {"uri": str(a) + "\0.wav", "recording_id": "n1"},
        {"uri": str(a), "recording_id": "n\0two"},
        {"uri": str(a), "recording_id": "ok"},
    ]
    m = _manifest(tmp_path / "m", rows, "parquet")
    items = _by_id(read_manifest(str(m)))
    assert set(items) == {"n1", f"file://{m}#row=2", "ok"}
    assert items["ok"].fault_kind is None
    for rid, n in (("n1", 1), (f"file://{m}#row=2", 2)):
        segs, rec = _record(items[rid])
        assert (
            rec["status"] == "error"
            and rec["error_kind"] == "manifest"
            and f"row {n}" in rec["error_message"]
        )
        assert "NUL byte" in rec["error_message"] and "\0" not in rec["error_message"]


@pytest.fixture
def http_root(tmp_path: Path):
    """A real HTTP server on 127.0.0.1 serving a folder, with Range, ETag and Last-Modified (yields folder, url)."""
    folder = tmp_path / "www"
    folder.mkdir()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = folder / urllib.parse.unquote(urllib.parse.urlparse(self.path).path.lstrip("/"))
            if not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data, st = path.read_bytes(), path.stat()
            start, end = 0, len(data) - 1
            m = re.match(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
            if m:
                start = int(m[1]) if m[1] else len(data) - int(m[2])
                end = min(int(m[2]), end) if m[1] and m[2] else end
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{st.st_size:x}-{st.st_mtime_ns:x}"')
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            self.end_headers()
            if body:
                self.wfile.write(data[start : end + 1])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_unknown_schemes_and_http_unless_allowed(tmp_path: Path, http_root) -> None:
    folder, url = http_root
    st = _wav(folder / "h.wav").stat()
    a = _wav(tmp_path / "a.wav")
    host = url.split("//", 1)[1]
    rows = [
        {"uri": "ftp://example.org/x.wav", "recording_id": "ftp"},
        {"uri": "hdfs://nn/x.wav", "recording_id": "hdfs"},
        {"uri": f"{url}/h.wav", "recording_id": "web"},
        {"uri": f"http://user:pa55word-secret@{host}/h.wav", "recording_id": "web-secret"},
        {"uri": str(a), "recording_id": "local"},
        {"uri": str(tmp_path), "recording_id": "folder"},
    ]
    m = _manifest(tmp_path / "m", rows, "csv")

    refused = _by_id(read_manifest(str(m)))
    assert {k for k, i in refused.items() if i.fault_kind is None} == {"local"}
    assert refused["folder"].fault_kind == "manifest" and "a folder, not a file" in str(
        refused["folder"].fault_message
    )
    for rid, n in (("ftp", 1), ("hdfs", 2)):
        assert refused[rid].fault_kind == "scheme"
        assert "unknown scheme" in str(refused[rid].fault_message) and f"row {n}" in str(
            refused[rid].fault_message
        )
    for rid in ("web", "web-secret"):
        segs, rec = _record(refused[rid])
        assert (
            rec["status"] == "error"
            and rec["error_kind"] == "scheme"
            and "--allow-http" in rec["error_message"]
        )
        assert "pa55word-secret" not in repr(refused[rid]) and "pa55word-secret" not in rec["error_message"]

    allowed = _by_id(read_manifest(str(m), allow_http=True))
    web = allowed["web"]
    assert web.fault_kind is None and web.uri == f"{url}/h.wav"
    assert web.fingerprint == (
        f"size={st.st_size};etag={st.st_size:x}-{st.st_mtime_ns:x};"
        f"last_modified={email.utils.formatdate(st.st_mtime, usegmt=True)}"
    )
    from pipeline.audio import default_decoder

    try:  # in the decoder child, as the engine reads it
        segs, rec = _record(web, isolate=True)
    finally:
        default_decoder().close()
    assert rec["status"] == "ok" and segs == 2, rec
    assert allowed["ftp"].fault_kind == "scheme"  # allow_http allows http, nothing else


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_duplicate_rows(tmp_path: Path, fmt: str) -> None:
    a, b, c = (_wav(tmp_path / f"{n}.wav", seed=i) for i, n in enumerate("abc"))
    rows = [
        {"uri": str(a), "recording_id": "same"},
        {"uri": f"file://{a}", "recording_id": "same"},  # the same input written another way: one input
        {"uri": str(b), "recording_id": "clash"},
        {"uri": str(c), "recording_id": "clash"},
        {"uri": str(a), "recording_id": "again"},  # the same uri under another id: a second recording
    ]
    m = _manifest(tmp_path / "m", rows, fmt)
    items = read_manifest(str(m))
    assert [i.recording_id for i in items] == ["same", "clash", "again"]
    by = _by_id(items)
    assert by["same"].uri == by["again"].uri == f"file://{a}"
    assert by["same"].fault_kind is None and by["again"].fault_kind is None
    clash = by["clash"]
    assert clash.fault_kind == "manifest"
    segs, rec = _record(clash)
    assert segs == 0 and rec["status"] == "error" and rec["error_kind"] == "manifest"
    msg = rec["error_message"]
    assert "row 3" in msg and "row 4" in msg and str(b) in msg and str(c) in msg and "none" in msg, msg


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_manifest_with_no_rows_or_no_valid_row_is_refused(tmp_path: Path, fmt: str) -> None:
    empty = tmp_path / f"empty.{fmt}"
    table = pa.table({"uri": pa.array([], pa.string()), "recording_id": pa.array([], pa.string())})
    pq.write_table(table, empty) if fmt == "parquet" else pcsv.write_csv(table, empty)
    with pytest.raises(PipelineError, match=rf"manifest {re.escape(str(empty))} has no rows"):
        read_manifest(str(empty))
    bad = _manifest(
        tmp_path / "bad",
        [{"uri": "ftp://x/y.wav", "recording_id": "a"}, {"uri": None, "recording_id": "b"}],
        fmt,
    )
    with pytest.raises(PipelineError, match=rf"manifest {re.escape(str(bad))} has no valid row") as err:
        read_manifest(str(bad))
    assert "row 1" in str(err.value) and "row 2" in str(err.value)


def test_decode_item_passes_the_fault_through(tmp_path: Path) -> None:
    a = _wav(tmp_path / "a.wav")
    m = _manifest(
        tmp_path / "m", [{"uri": str(a), "recording_id": "x"}, {"uri": None, "recording_id": "y"}], "csv"
    )
    import json

    records = {}
    for item in read_manifest(str(m)):
        for t in decode_item(work_item(item), {"sample_rate": RATE, "segments": SEGMENTS, "isolate": False}):
            for r in t.to_pylist():
                if r["record"] is not None:
                    records[r["recording_id"]] = json.loads(r["record"])
    assert records["x"]["status"] == "ok"
    assert records["y"]["status"] == "error" and records["y"]["error_kind"] == "manifest"
    assert "row 2" in records["y"]["error_message"]


# ---- a manifest given as INPUT ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_manifest_listed_as_input_says_add_manifest(tmp_path: Path, fmt: str) -> None:
    m = _manifest(tmp_path / "m", [{"uri": str(_wav(tmp_path / "a.wav")), "recording_id": "a"}], fmt)
    for extensions in ((".wav",), ()):
        with pytest.raises(PipelineError, match=r"looks like a manifest: add --manifest") as err:
            list_inputs(str(m), extensions=extensions)
        assert str(m) in str(err.value)
    assert [i.recording_id for i in list_inputs(str(tmp_path), extensions=(".wav",))] == [
        f"file://{tmp_path}/a.wav"
    ]


# ---- symlinks ---------------------------------------------------------------------------------------------


def test_symlinks_are_followed_and_bad_links_are_faults(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = _wav(tmp_path / "outside" / "o.wav", seed=9)
    f = _wav(root / "f.wav")
    g = _wav(root / "folder" / "g.wav", seed=1)
    h = _wav(root / "folder" / "h.wav", seed=2)
    (root / "link.wav").symlink_to(f)
    (root / "linked").symlink_to("folder", target_is_directory=True)
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    (root / "folder" / "up").symlink_to("..", target_is_directory=True)
    (root / "folder" / "here").symlink_to(".", target_is_directory=True)
    (root / "out.wav").symlink_to(outside)
    (root / "outdir").symlink_to(outside.parent, target_is_directory=True)
    (root / "dangling.wav").symlink_to(root / "gone.wav")
    (root / "notes.txt").symlink_to(f)  # a link to a file obeys the extension filter like a file

    t0 = time.monotonic()
    items = list_inputs(str(root), extensions=(".wav",))
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0

    def fp(p: Path) -> str:
        st = os.stat(p)
        return f"size={st.st_size};mtime_ns={st.st_mtime_ns}"

    got = {i.uri[len(f"file://{root}/") :]: i for i in items}
    assert [i.uri for i in items] == sorted(i.uri for i in items) and all(
        i.uri == i.recording_id for i in items
    )
    good = {k: i.fingerprint for k, i in got.items() if i.fault_kind is None}
    assert good == {
        "f.wav": fp(f),
        "link.wav": fp(f),
        "folder/g.wav": fp(g),
        "folder/h.wav": fp(h),
        "linked/g.wav": fp(g),
        "linked/h.wav": fp(h),
    }
    assert got["link.wav"].size == f.stat().st_size
    faults = {k: i.fault_kind for k, i in got.items() if i.fault_kind}
    assert faults == {
        "a": "symlink",
        "b": "symlink",
        "folder/up": "symlink",
        "linked/up": "symlink",
        "folder/here": "symlink",
        "linked/here": "symlink",
        "out.wav": "symlink",
        "outdir": "symlink",
        "dangling.wav": "not_found",
    }
    assert "cycle" in str(got["a"].fault_message) and "ancestor" in str(got["folder/up"].fault_message)
    assert "outside the listed folder" in str(got["out.wav"].fault_message)
    for name in faults:
        segs, rec = _record(got[name])
        assert segs == 0 and rec["status"] == "error" and rec["error_kind"] == faults[name]
        assert rec["error_message"].startswith(f"file://{root}/{name}: ") and rec["retryable"] is False
    alone = list_inputs(str(root / "link.wav"), extensions=(".wav",))  # a link given as INPUT
    assert [(i.uri, i.fingerprint) for i in alone] == [(f"file://{root}/link.wav", fp(f))]
    segs, rec = _record(got["link.wav"])
    assert rec["status"] == "ok" and segs == 2 and rec["uri"] == f"file://{root}/link.wav"


def test_a_symlinked_root_is_walked_and_the_link_names_the_inputs(tmp_path: Path) -> None:
    real = tmp_path / "real"
    f = _wav(real / "x.wav")
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    items = list_inputs(str(tmp_path / "alias"), extensions=(".wav",))
    st = f.stat()
    assert [(i.uri, i.fingerprint, i.fault_kind) for i in items] == [
        (f"file://{tmp_path}/alias/x.wav", f"size={st.st_size};mtime_ns={st.st_mtime_ns}", None)
    ]


@pytest.mark.usefixtures("ray_local")
def test_a_file_replaced_by_a_symlink_is_not_tombstoned_when_mirrored(tmp_path: Path) -> None:
    from pipeline import read_ledger
    from pipeline.checkpoints import write_random_checkpoint
    from pipeline.config import RunConfig
    from pipeline.engine import run

    model = write_random_checkpoint(tmp_path / "m", like="MERT-v0", size="tiny")
    root = tmp_path / "audio"
    for i in range(3):
        _wav(root / f"t{i}.wav", seed=i)
    out = tmp_path / "table"

    def go() -> dict:
        c = RunConfig(
            input=str(root), output=str(out), model=str(model), progress=False, mirror_deletions=True
        )
        return run(c, log=lambda m: None)

    assert go()["counts"]["ok"] == 3
    # t1.wav moves into a store inside the listed folder ("_" names are not listed) and a link takes its place:
    # the same recording, the same bytes and mtime, so nothing is redone and nothing is deleted
    (root / "_store").mkdir()
    os.replace(root / "t1.wav", root / "_store" / "t1.wav")
    (root / "t1.wav").symlink_to(root / "_store" / "t1.wav")
    s = go()
    assert s["counts"]["skipped"] == 3 and s["counts"]["listed"] == 3, s["counts"]
    rows = read_ledger(str(out)).to_pylist()
    assert {r["recording_id"]: r["status"] for r in rows} == {
        f"file://{root}/t{i}.wav": "ok" for i in range(3)
    }


@pytest.mark.usefixtures("ray_local")
def test_a_run_over_a_manifest_and_a_folder_records_each_bad_row_and_finishes(tmp_path: Path) -> None:
    """Through the engine: each bad manifest row and each bad link is one ledger row; the good inputs embed."""
    from pipeline import read_ledger
    from pipeline.checkpoints import write_random_checkpoint
    from pipeline.config import RunConfig
    from pipeline.engine import run

    model = write_random_checkpoint(tmp_path / "m", like="MERT-v0", size="tiny")
    good = _wav(tmp_path / "lists" / "audio" / "good.wav")
    manifest = _manifest(
        tmp_path / "lists" / "m",
        [
            {"uri": "audio/good.wav", "recording_id": "good"},
            {"uri": "audio/good.wav", "recording_id": ""},
            {"uri": "ftp://host/x.wav", "recording_id": "ftp"},
            {"uri": None, "recording_id": "no-uri"},
        ],
        "csv",
    )
    cfg = RunConfig(
        input=str(manifest),
        output=str(tmp_path / "t1"),
        model=str(model),
        manifest=True,
        progress=False,
        max_error_rate=1.0,
    )
    s = run(cfg, log=lambda m: None)
    assert s["status"] == "complete" and s["counts"]["ok"] == 1 and s["counts"]["error"] == 3, s["counts"]
    rows = {r["recording_id"]: r for r in read_ledger(str(tmp_path / "t1")).to_pylist()}
    assert rows["good"]["status"] == "ok" and rows["good"]["uri"] == f"file://{good}"
    assert rows["ftp"]["error_kind"] == "scheme" and not rows["ftp"]["retryable"]
    assert rows["no-uri"]["error_kind"] == "manifest"
    blank = rows[f"file://{manifest}#row=2"]
    assert blank["status"] == "error" and "row 2" in blank["error_message"]

    folder = tmp_path / "folder"
    _wav(folder / "a.wav")
    (folder / "loop").symlink_to(folder / "loop")
    (folder / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    s = run(
        RunConfig(
            input=str(folder),
            output=str(tmp_path / "t2"),
            model=str(model),
            progress=False,
            max_error_rate=1.0,
            extensions=(),
        ),
        log=lambda m: None,
    )
    kinds = {
        r["recording_id"].rsplit("/", 1)[-1]: (r["status"], r["error_kind"])
        for r in read_ledger(str(tmp_path / "t2")).to_pylist()
    }
    assert kinds == {"a.wav": ("ok", None), "loop": ("error", "symlink"), "gone.wav": ("error", "not_found")}
