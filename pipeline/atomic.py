"""All-or-nothing writes and create-if-absent on local disk, S3, GCS and Azure: what the commit log stands on.

- `write_once(uri, data)`: create the object only if no object has that name, atomically; `AlreadyExists`
  otherwise. A version of the table's commit log exists once because its entry is created with this.
- `write_whole(uri, data)`: create or replace, all or nothing: a reader sees the old object, the new one, or
  (for a new name) none, never a part.
- `writing(uri)`: the same through a file object (e.g. for `pyarrow.parquet.write_table`), buffered in memory
  and written only when the `with` block ends without an exception.
- `read_bytes(uri)` (None when absent) and `list_names(prefix)` (names under a folder, in-flight temporaries
  left out), to read the log back.

How each backend does it:
- local disk: the bytes go to a temporary file in the same folder (`.<name>.<random>.tmp`), which is fsynced,
  then `os.link()`ed to the final name (the kernel refuses if the name exists: `AlreadyExists`) or, for
  `write_whole`, `os.replace()`d onto it; then the folder is fsynced. The final name therefore appears only
  with all its bytes, even if the process is killed at any point. (`open(O_EXCL)` then write would show an
  empty or partial file to a reader or after a crash.) A crash can leave a `.…tmp` file behind; it is never
  under the final name, `list_names` skips it, and clean-up may delete such files once they are old.
  The folder's filesystem must support hard links (local disks do; some network and FUSE mounts do not: the
  error says so).
- S3 (s3fs): one `PutObject` with `If-None-Match: *` for `write_once` (s3fs's `pipe_file(mode="create")`;
  412 PreconditionFailed -> `AlreadyExists`. Not `open(mode="xb")`: in s3fs 2026.9, when nothing was written
  its commit falls back to an unconditional `touch` and empties an existing object. AWS may answer 409
  ConditionalRequestConflict to racing creates, which is retried). Objects up to 5 GiB, S3's limit for one
  PUT, go in that one request; larger ones as a multipart upload completed, with the same header, only after
  every part is in, and aborted on error.
- GCS (gcsfs): one upload request with `ifGenerationMatch=0` (gcsfs's `pipe_file(mode="create")`; 412 ->
  `AlreadyExists`), up to 5 GiB: gcsfs would switch to a resumable upload at 50 MiB, and fake-gcs-server does
  not enforce the precondition given when a resumable upload starts (a second 60 MiB create overwrote the
  first), so the one-request path is what the tests prove. Larger objects still go resumable (the object
  appears only with the last chunk; real GCS applies the precondition when it completes: untested here).
- Azure (adlfs): `upload_blob(overwrite=False)`, which sends `If-None-Match: *` (ResourceExistsError ->
  `AlreadyExists`); large blobs are staged as blocks and appear only when the block list is committed.

Never `with fs.open(path, "wb")` on an object store: fsspec's `__exit__` closes, and so uploads, what was
written even when the block raised, leaving a partial object under the final name.

One limit of every conditional create over HTTP: if the request landed but its answer was lost and the
client retried, the retry reports `AlreadyExists` for the writer's own object. Callers that must know put a
unique id (commit id, writer, epoch) in the bytes and, on `AlreadyExists`, read the object back to see whose
it is.

Tested against real servers: moto's S3 server, fake-gcs-server and Azurite each refuse a second create (412 or
409) and let exactly one of 20 racing creates win. Messages name the URI, never the storage options' secrets.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import PipelineError
from pipeline.storage import get_fs

# S3's limit for one PUT; below it, S3 and GCS writes go in one request (see the module docstring).
_ONE_REQUEST_MAX = 5 * 2**30
# Racing conditional creates on AWS S3 may get 409 ConditionalRequestConflict: retry this many times.
_CONFLICT_RETRIES = 5


class AlreadyExists(PipelineError):
    """`write_once` found an object under the name: another writer created it first."""

    def __init__(self, uri: str):
        self.uri = uri
        super().__init__(
            f"{uri} already exists: it was created by another writer (read it, then use a new name)"
        )


def write_once(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Create `uri` holding `data` only if nothing has that name; raise `AlreadyExists` if something does.

    Atomic on every backend: readers see no object, or the whole of `data`, never an empty or partial one.
    Parent folders are created on local disk (object stores have none).
    """
    data = _as_bytes(uri, data)
    fs, path = _filesystem(uri, storage_options, "create")
    if isinstance(fs, LocalFileSystem):
        _local_write(uri, path, data, replace=False)
        return
    for attempt in range(_CONFLICT_RETRIES + 1):
        try:
            fs.pipe_file(path, data, mode="create", **_one_request(fs, data))
            return
        except FileExistsError as exc:
            raise AlreadyExists(uri) from exc
        except Exception as exc:
            code = _error_code(exc)
            if code == "PreconditionFailed":
                raise AlreadyExists(uri) from exc
            if code == "ConditionalRequestConflict" and attempt < _CONFLICT_RETRIES:
                time.sleep(0.05 * 2**attempt)
                continue
            raise _write_error(uri, exc, storage_options) from exc


def write_whole(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Create or replace `uri` with `data`, all or nothing: readers see the old object or the whole new one.

    Locally a temporary file, fsync, `os.replace`, fsync of the folder; on object stores one PUT of the whole
    bytes (or a multipart/block upload completed only once every part is in, aborted on error).
    """
    data = _as_bytes(uri, data)
    fs, path = _filesystem(uri, storage_options, "write")
    if isinstance(fs, LocalFileSystem):
        _local_write(uri, path, data, replace=True)
        return
    try:
        put_whole(fs, path, data)
    except Exception as exc:
        raise _write_error(uri, exc, storage_options) from exc


def put_whole(fs: Any, path: str, data: bytes) -> None:
    """On an object store's filesystem: `data` as one request (never `fs.open(path, "wb")`, whose `__exit__`
    uploads what was buffered even when the block raised). Exceptions are the filesystem's own."""
    fs.pipe_file(path, data, **_one_request(fs, data))


@contextlib.contextmanager
def writing(
    uri: str, storage_options: Mapping[str, Any] | None = None, *, once: bool = False
) -> Iterator[io.BytesIO]:
    """A file object for writing `uri` whole: buffered in memory, written when the block ends cleanly.

    If the block raises, nothing is written (unlike `fs.open(path, "wb")`, which uploads the part written).
    `once=True` creates with `write_once` (and so may raise `AlreadyExists`), else `write_whole`. The whole
    object is held in memory: meant for log entries and data files of a shard, not for multi-GB objects.
    """
    buffer = io.BytesIO()
    yield buffer
    data = buffer.getvalue()
    if once:
        write_once(uri, data, storage_options)
    else:
        write_whole(uri, data, storage_options)


def read_bytes(uri: str, storage_options: Mapping[str, Any] | None = None) -> bytes | None:
    """The whole object at `uri`, or None if there is none."""
    fs, path = _filesystem(uri, storage_options, "read")
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise PipelineError(f"cannot read {uri}: it is a folder, not a file (name the file)") from None
    except Exception as exc:
        raise PipelineError(
            f"cannot read {uri}: {_redact(str(exc) or type(exc).__name__, storage_options)}"
        ) from exc


def list_names(prefix: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The sorted names of the files directly under the folder `prefix` ([] if it does not exist).

    Names starting with "." (the local temporaries of writes in flight or of crashed writers) are left out.
    Listing caches are dropped first, so a name written by another process since the last call is seen.
    """
    fs, path = _filesystem(prefix, storage_options, "list")
    path = path.rstrip("/")
    try:
        if isinstance(fs, LocalFileSystem):
            with os.scandir(path) as entries:
                names = [e.name for e in entries if e.is_file()]
        else:
            fs.invalidate_cache(path)
            entries = fs.ls(path, detail=True)
            names = [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"]
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise PipelineError(f"cannot list {prefix}: it is a file, not a folder (name its folder)") from None
    except Exception as exc:
        raise PipelineError(
            f"cannot list {prefix}: {_redact(str(exc) or type(exc).__name__, storage_options)}"
        ) from exc
    return sorted(n for n in names if not n.startswith("."))


def _filesystem(uri: str, storage_options: Mapping[str, Any] | None, action: str) -> tuple[Any, str]:
    """(filesystem, path) for `uri`; a filesystem that cannot be built is a PipelineError naming the URI."""
    try:
        return get_fs(uri, dict(storage_options or {}))
    except ImportError:
        raise  # already names the missing extra
    except Exception as exc:
        detail = _redact(str(exc) or type(exc).__name__, storage_options)
        raise PipelineError(
            f"cannot {action} {uri}: its filesystem cannot be opened with these storage options ({detail}); "
            "check them (endpoint, credentials, connection string)"
        ) from exc


def _one_request(fs: Any, data: bytes) -> dict[str, int]:
    """pipe_file's `chunksize` that keeps an S3 or GCS write of `data` in one request (up to 5 GiB)."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"s3", "s3a", "gs", "gcs"} and len(data) < _ONE_REQUEST_MAX:
        return {"chunksize": _ONE_REQUEST_MAX}
    return {}


def _as_bytes(uri: str, data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise ValueError(f"cannot write {uri}: data must be bytes, got {type(data).__name__} (encode it first)")


def _local_write(uri: str, path: str, data: bytes, *, replace: bool) -> None:
    """Temporary file in the same folder, fsync, link (create) or replace, unlink the temporary, fsync folder."""
    folder, name = os.path.split(path)
    if not name:
        raise ValueError(f"cannot write {uri}: it names a folder, not a file")
    try:
        _make_folder(folder)
        tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise AlreadyExists(uri) from None
                except OSError as exc:
                    if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                        raise PipelineError(
                            f"cannot create {uri}: its filesystem does not support hard links, which "
                            "create-if-absent needs here (put the table on a local disk or an object store)"
                        ) from exc
                    raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _fsync_folder(folder)
    except PipelineError:
        raise
    except OSError as exc:
        raise PipelineError(f"cannot write {uri}: {exc.strerror or exc}") from exc


def _make_folder(folder: str) -> None:
    """Create `folder` and its missing parents, fsyncing each parent so the new entries survive a crash."""
    if os.path.isdir(folder):
        return
    parent = os.path.dirname(folder)
    if parent and parent != folder:
        _make_folder(parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder)
    _fsync_folder(parent or ".")


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code (botocore's ClientError) behind an s3fs exception, if there is one."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
        seen = seen.__cause__ or seen.__context__
    return None


def _write_error(uri: str, exc: BaseException, storage_options: Mapping[str, Any] | None) -> PipelineError:
    """A clear, secret-free error for a failed object-store write."""
    detail = _redact(str(exc) or type(exc).__name__, storage_options)
    if isinstance(exc, FileNotFoundError):
        hint = "its bucket or container does not exist: create it, or fix the URI"
    elif isinstance(exc, PermissionError):
        hint = "access denied: check the credentials (storage options or the environment)"
    else:
        hint = "the store refused or failed the write; nothing was written under the name"
    return PipelineError(f"cannot write {uri}: {hint} ({detail})")


def _redact(text: str, storage_options: Mapping[str, Any] | None) -> str:
    """`text` with every string value of the storage options (keys, secrets, connection strings) masked."""
    for value in _strings(storage_options):
        if len(value) >= 6:
            text = text.replace(value, "***")
    return text


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)
