"""pipeline.atomic against real stores: local disk, moto's S3 server, fake-gcs-server and Azurite.

Each backend: a second create is refused, 20 racing creates have exactly one winner, an exception inside a write
leaves no object, write_whole replaces whole. Locally also: a writer SIGKILLed mid-write leaves nothing under
the final name. S3 also: the old way (`fs.open(path, "wb")`) leaves a partial object where ours leaves none.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.atomic import AlreadyExists, list_names, read_bytes, write_once, write_whole, writing
from pipeline.errors import PipelineError
from tests import servers
from tests.conftest import S3_SECRET

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Store:
    """A fresh, empty folder on one backend: `base` URI (no trailing slash) and its storage options."""

    backend: str
    base: str
    options: dict

    def uri(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture(scope="module")
def gcs_emulator():
    reason = servers.missing_reason("gcs")
    if reason:
        pytest.skip(reason)
    # gcsfs >= 2026.10 asks a gRPC control API for each bucket's type (60 s timeouts against an emulator,
    # which has none); its documented switch turns that off. It must be set before gcsfs is imported.
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    import gcsfs

    if gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
        pytest.fail("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false could be set")
    emulator = servers.start_fake_gcs()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def azurite():
    reason = servers.missing_reason("azure")
    if reason:
        pytest.skip(reason)
    emulator = servers.start_azurite()
    yield emulator
    emulator.stop()


@pytest.fixture(params=["local", "s3", "gcs", "azure"])
def store(request, tmp_path) -> Store:
    name = f"t-{uuid.uuid4().hex[:12]}"
    if request.param == "local":
        return Store("local", str(tmp_path / "log"), {})
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return Store("s3", f"s3://{bucket}/log", request.getfixturevalue("s3_options"))
    if request.param == "gcs":
        emulator = request.getfixturevalue("gcs_emulator")
        import gcsfs

        options = {"endpoint_url": emulator.url, "token": "anon", "project": "test"}
        gcsfs.GCSFileSystem(**options).mkdir(name)
        return Store("gcs", f"gs://{name}/log", options)
    emulator = request.getfixturevalue("azurite")
    import adlfs

    options = {"connection_string": servers.azurite_connection_string(emulator)}
    adlfs.AzureBlobFileSystem(**options).mkdir(name)
    return Store("azure", f"az://{name}/log", options)


def test_second_create_is_refused(store: Store):
    uri = store.uri("00000000000000000000.json")
    write_once(uri, b'{"version": 0}', store.options)
    with pytest.raises(AlreadyExists) as caught:
        write_once(uri, b'{"version": 0, "other": true}', store.options)
    assert caught.value.uri == uri
    assert uri in str(caught.value)
    assert read_bytes(uri, store.options) == b'{"version": 0}'


def test_empty_create_is_atomic_too(store: Store):
    """s3fs 2026.9's `open(path, "xb")` with nothing written overwrites an existing object with an empty one
    (its commit falls back to `touch`, without If-None-Match); write_once refuses on every backend."""
    uri = store.uri("lease.json")
    write_once(uri, b"", store.options)
    assert read_bytes(uri, store.options) == b""
    write_whole(uri, b"holder A", store.options)
    with pytest.raises(AlreadyExists):
        write_once(uri, b"", store.options)
    assert read_bytes(uri, store.options) == b"holder A"


def test_large_create_is_refused_too(store: Store):
    """60 MiB: past gcsfs's 50 MiB switch to a resumable upload, whose ifGenerationMatch fake-gcs-server
    ignores; write_once keeps it in one request, so the second create is refused on every backend."""
    uri = store.uri("features.parquet")
    size = 60 * 2**20
    write_once(uri, b"a" * size, store.options)
    with pytest.raises(AlreadyExists):
        write_once(uri, b"b" * size, store.options)
    assert read_bytes(uri, store.options) == b"a" * size


def test_racing_creates_have_exactly_one_winner(store: Store):
    uri = store.uri("00000000000000000001.json")
    n = 20
    start = threading.Barrier(n)
    outcome: dict[int, str] = {}

    def race(i: int) -> None:
        start.wait()
        try:
            write_once(uri, f"writer {i} ".encode() * 100, store.options)
            outcome[i] = "won"
        except AlreadyExists:
            outcome[i] = "lost"
        except Exception as exc:  # recorded, so the assertion below names it
            outcome[i] = repr(exc)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [i for i, o in outcome.items() if o == "won"]
    assert len(winners) == 1, outcome
    assert sorted(o for o in outcome.values() if o != "won") == ["lost"] * (n - 1), outcome
    assert read_bytes(uri, store.options) == f"writer {winners[0]} ".encode() * 100


@pytest.mark.parametrize("once", [True, False], ids=["write_once", "write_whole"])
def test_exception_inside_a_write_leaves_no_object(store: Store, once: bool):
    uri = store.uri("00000000000000000002.json")
    with pytest.raises(RuntimeError, match="writer failed"):
        with writing(uri, store.options, once=once) as f:
            f.write(b"half of an entry")
            raise RuntimeError("writer failed")
    assert read_bytes(uri, store.options) is None
    assert list_names(store.base, store.options) == []
    # and the name is still free for the next writer
    write_once(uri, b"whole", store.options)
    assert read_bytes(uri, store.options) == b"whole"


def test_write_whole_replaces_whole(store: Store):
    uri = store.uri("_checkpoint.json")
    write_whole(uri, b"A" * 200_000, store.options)
    write_whole(uri, b"short", store.options)
    assert read_bytes(uri, store.options) == b"short"
    # a failed rewrite keeps the previous object intact
    with pytest.raises(RuntimeError):
        with writing(uri, store.options) as f:
            f.write(b"B" * 1000)
            raise RuntimeError("rewrite failed")
    assert read_bytes(uri, store.options) == b"short"


def test_read_and_list(store: Store):
    assert read_bytes(store.uri("absent.json"), store.options) is None
    assert list_names(store.base, store.options) == []
    for name in ["00000000000000000001.json", "00000000000000000000.json", "_checkpoint.1.parquet"]:
        write_once(store.uri(name), name.encode(), store.options)
    assert list_names(store.base, store.options) == [
        "00000000000000000000.json",
        "00000000000000000001.json",
        "_checkpoint.1.parquet",
    ]
    assert read_bytes(store.uri("00000000000000000001.json"), store.options) == b"00000000000000000001.json"


def test_non_bytes_data_is_refused_naming_the_uri(store: Store):
    uri = store.uri("entry.json")
    with pytest.raises(ValueError, match=r"entry\.json.*data must be bytes, got str"):
        write_once(uri, "text", store.options)  # type: ignore[arg-type]
    assert read_bytes(uri, store.options) is None


def test_s3_open_wb_uploads_a_partial_object_where_writing_leaves_none(s3_bucket, s3_options):
    """The trap the commit log must avoid: fsspec's `__exit__` uploads a write even when the block raised."""
    import fsspec

    fs = fsspec.filesystem("s3", **s3_options)
    old = f"{s3_bucket}/old-way.parquet"
    with pytest.raises(RuntimeError):
        with fs.open(old, "wb") as f:
            f.write(b"PAR1 half a file")
            raise RuntimeError("writer failed")
    assert fs.cat_file(old) == b"PAR1 half a file"  # the old way: a partial object under the final name

    new = f"s3://{s3_bucket}/new-way.parquet"
    with pytest.raises(RuntimeError):
        with writing(new, s3_options) as f:
            f.write(b"PAR1 half a file")
            raise RuntimeError("writer failed")
    assert read_bytes(new, s3_options) is None


def test_s3_missing_bucket_is_a_clear_error_without_the_secret(s3_options):
    uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/log/00000000000000000000.json"
    with pytest.raises(PipelineError) as caught:
        write_once(uri, b"{}", s3_options)
    message = str(caught.value)
    assert uri in message and "does not exist" in message and "create it" in message
    assert S3_SECRET not in message


def test_malformed_storage_options_are_a_clear_error_without_the_secret():
    secret = "not-a-real-key-but-secret-0123456789"
    uri = "az://container/log/00000000000000000000.json"
    with pytest.raises(PipelineError) as caught:
        write_once(uri, b"{}", {"connection_string": f"malformed;AccountKey={secret}"})
    message = str(caught.value)
    assert uri in message and "storage options" in message
    assert secret not in message


# A child that runs write_once and is SIGKILLed at a chosen point of it (the kernel's real crash, not a mock):
# "before-link" kills it at the fsync of its temporary file, which holds the whole payload while the final
# name is not yet linked; "after-link" at the folder's fsync, once the name is linked; "anywhere" is killed by
# the test at a chosen delay.
_CHILD = textwrap.dedent(
    """
    import os, signal, stat, sys
    from pipeline import atomic
    uri, point, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real_fsync = os.fsync
    def fsync(fd):
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if point == "before-link" and regular or point == "after-link" and os.path.exists(uri):
            os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)
    if point != "anywhere":
        atomic.os.fsync = fsync
    print("ready", flush=True)
    atomic.write_once(uri, b"x" * size)
    """
)


def _child(uri: str, point: str, size: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, uri, point, str(size)], env=env, stdout=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("point", ["before-link", "after-link"])
def test_local_writer_killed_mid_write_leaves_no_partial_file(tmp_path: Path, point: str):
    uri = str(tmp_path / "log" / "00000000000000000003.json")
    child = _child(uri, point, 1_000_000)
    assert child.wait(timeout=60) == -signal.SIGKILL
    if point == "before-link":
        assert not os.path.exists(uri)
        assert list_names(str(tmp_path / "log")) == []  # the temporary it left is not listed
        write_once(uri, b"next writer")  # and does not block the name
        assert read_bytes(uri) == b"next writer"
    else:
        assert read_bytes(uri) == b"x" * 1_000_000  # linked means whole
        with pytest.raises(AlreadyExists):
            write_once(uri, b"next writer")


def test_local_writer_killed_at_any_moment_leaves_nothing_or_everything(tmp_path: Path):
    size = 32 * 2**20
    for i, delay in enumerate([0.0, 0.05, 0.1, 0.2, 0.4]):
        uri = str(tmp_path / "log" / f"{i:020d}.json")
        child = _child(uri, "anywhere", size)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
        if os.path.exists(uri):
            assert os.path.getsize(uri) == size, (
                f"partial file under the final name after a kill at {delay} s"
            )
