"""Inputs: list a prefix (or read a manifest) into work items with fingerprints.

A fingerprint says whether an input changed since it was processed: s3 size + ETag (+ version id when
versioned), gs generation, az ETag, http(s) size + ETag + Last-Modified as the server sends them, local size +
mtime in ns (of a symlink's target).

A bad input found while listing (a dangling or cyclic symlink, a link out of the listed folder, a manifest row
without an id or with an unknown scheme, ...) is still an item: its `fault_kind` and `fault_message` say what is
wrong, and the decode stage turns it into that input's `error` ledger row, so the rest of the run goes on.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import posixpath
import stat as stat_mode
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.storage import HTTP_SCHEMES, canonical_uri, display_uri, get_fs, scheme_of, scheme_problem

# A file with one of these suffixes given as INPUT is a manifest, not audio.
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
# Fault kinds of inputs that are bad as listed (the ledger's `error_kind`).
FAULT_MANIFEST = "manifest"  # a manifest row without an id or uri, with a NUL byte, or with a conflicting id
FAULT_SCHEME = "scheme"  # a URI the pipeline will not read: unknown scheme, or http(s) without allow_http
FAULT_SYMLINK = "symlink"  # a symlink cycle, or a link whose target is outside the listed folder
FAULT_NOT_FOUND = "not_found"  # a dangling symlink


@dataclass(frozen=True)
class InputItem:
    uri: str  # canonical URI with scheme
    recording_id: str  # the URI unless a manifest gives an id
    fingerprint: str
    size: int  # bytes
    fault_kind: str | None = None  # set: the input is bad as listed; its ledger row is an error of this kind
    fault_message: str | None = None  # what is wrong, on which input, and what to do


def fingerprint(info: dict, scheme: str) -> str:
    """A change detector from an fsspec `info` dict."""
    size = info.get("size")
    if scheme == "file":
        mtime = info.get("mtime")
        ns = int(round(float(mtime) * 1e9)) if mtime is not None else 0
        name = info.get("name")
        if name:
            try:
                ns = os.stat(name).st_mtime_ns
            except OSError:
                pass
        return f"size={size};mtime_ns={ns}"
    if scheme in ("s3", "s3a"):
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        ver = info.get("VersionId") or info.get("version_id")
        return f"size={size};etag={etag}" + (f";version={ver}" if ver and ver != "null" else "")
    if scheme in ("gs", "gcs"):
        return f"size={size};generation={info.get('generation')}"
    if scheme in ("az", "abfs", "abfss"):
        return f"size={size};etag={str(info.get('etag') or '').strip(chr(34))}"
    if scheme in HTTP_SCHEMES:  # whatever the server sends: HEAD's Content-Length, ETag, Last-Modified
        parts = [f"size={size}"]
        if info.get("ETag"):
            parts.append(f"etag={str(info['ETag']).strip(chr(34))}")
        if info.get("Last-Modified"):
            parts.append(f"last_modified={info['Last-Modified']}")
        return ";".join(parts)
    return f"size={size};mtime={info.get('mtime') or info.get('LastModified')}"


def _local_fingerprint(st: os.stat_result) -> str:
    """The local fingerprint (as `fingerprint` gives it) from a stat of the file, or of a symlink's target."""
    return f"size={st.st_size};mtime_ns={st.st_mtime_ns}"


def _uri_of(scheme: str, path: str) -> str:
    if scheme == "file":
        return canonical_uri(path)
    if scheme == "s3a":
        scheme = "s3"
    return f"{scheme}://{path}"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class _LinkFault:
    path: str  # the link's path as listed
    kind: str
    message: str
    is_file: bool  # the target is a regular file: the name filters (glob, extensions) apply to it


def _walk_local(root: str) -> tuple[list[tuple[str, os.stat_result]], list[_LinkFault]]:
    """Regular files below the local folder `root`, following symlinks, and the links that cannot be followed.

    A file's stat is its target's (a symlink is followed). A symlinked folder is walked. A link whose resolved
    target is outside `root`'s resolved path, a link cycle, a folder link to one of its own ancestors and a
    dangling link are faults: they are reported, never followed, so the walk always ends (each real folder
    appears at most once on any one path down). Names starting with "." or "_" are skipped. Other kinds of
    entries (FIFOs, sockets, devices) are not audio and are skipped.
    """
    root_real = os.path.realpath(root)
    files: list[tuple[str, os.stat_result]] = []
    faults: list[_LinkFault] = []
    stack: list[tuple[str, frozenset[str]]] = [(root, frozenset([root_real]))]
    while stack:
        folder, chain = stack.pop()  # chain: the real paths of the folders on the way down to `folder`
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith((".", "_")):
                continue
            path = entry.path
            if not entry.is_symlink():
                if entry.is_dir(follow_symlinks=False):
                    stack.append((path, chain | {os.path.realpath(path)}))
                elif entry.is_file(follow_symlinks=False):
                    files.append((path, entry.stat(follow_symlinks=False)))
                continue
            link = os.readlink(path)
            try:
                st = os.stat(path)  # follows the link (and any chain of links)
            except FileNotFoundError:
                faults.append(
                    _LinkFault(
                        path,
                        FAULT_NOT_FOUND,
                        f"dangling symlink: its target {link} does not exist (fix or remove the link)",
                        False,
                    )
                )
                continue
            except OSError as exc:
                cause = "a symlink cycle" if exc.errno == errno.ELOOP else f"cannot follow ({exc.strerror})"
                faults.append(
                    _LinkFault(path, FAULT_SYMLINK, f"{cause} (-> {link}): fix or remove the link", False)
                )
                continue
            target = os.path.realpath(path)
            is_dir = stat_mode.S_ISDIR(st.st_mode)
            if not _inside(target, root_real):
                faults.append(
                    _LinkFault(
                        path,
                        FAULT_SYMLINK,
                        f"symlink to {target}, outside the listed folder {root_real}: it is not followed "
                        "(list the target's folder itself, or put the file inside)",
                        not is_dir,
                    )
                )
            elif is_dir:
                if target in chain:
                    faults.append(
                        _LinkFault(
                            path,
                            FAULT_SYMLINK,
                            f"a symlink cycle: the folder link points to its own ancestor {target} "
                            "(fix or remove the link)",
                            False,
                        )
                    )
                else:
                    stack.append((path, chain | {target}))
            elif stat_mode.S_ISREG(st.st_mode):
                files.append((path, st))
    return files, faults


def list_inputs(
    source: str,
    *,
    glob: str | None = None,
    extensions: tuple[str, ...] = (),
    storage_options: dict | None = None,
) -> list[InputItem]:
    """Every input below `source` (a folder, prefix URI or single file), sorted by URI.

    glob: a pattern relative to the prefix (e.g. "**/*.flac"); extensions: kept suffixes (case-insensitive).
    Names starting with "." or "_" are skipped. Raises PipelineError for a missing prefix, bad credentials or a
    missing storage package: a systemic failure, not one error per input; and for a single .csv/.parquet file,
    which is a manifest (the message says to add --manifest).

    Local folders: symlinks are followed. A link's item has the link's path as URI and id and the target's
    size and mtime as fingerprint; a symlinked folder is walked. A link that cannot be followed is an item with
    a fault (kind `symlink`: a cycle, or a target outside the listed folder; `not_found`: dangling), so that
    its ledger row says so. Links to files obey glob and extensions like files.
    """
    scheme = scheme_of(source)
    shown = display_uri(source)
    local: tuple[list[tuple[str, os.stat_result]], list[_LinkFault]] | None = None
    try:
        fs, root = get_fs(source, storage_options)
        if fs.isfile(root):
            if root.lower().endswith(MANIFEST_SUFFIXES):
                raise PipelineError(
                    f"input {shown} looks like a manifest: add --manifest (manifest: true) to read the inputs "
                    "it lists"
                )
            infos = {root: fs.info(root)}
        else:
            if not fs.exists(root):
                raise FileNotFoundError(root)
            if scheme == "file":
                local = _walk_local(root)
                infos = {}
            else:
                infos = fs.find(root, detail=True, withdirs=False)
    except PipelineError:
        raise
    except ImportError as exc:
        raise PipelineError(str(exc)) from exc
    except FileNotFoundError:
        raise PipelineError(f"input {shown} does not exist: check the path or bucket name") from None
    except PermissionError as exc:
        raise PipelineError(
            f"input {shown}: access denied ({type(exc).__name__}); check the credentials"
        ) from None
    except Exception as exc:  # any listing failure is systemic
        raise PipelineError(f"cannot list input {shown}: {type(exc).__name__}: {exc}") from None
    exts = tuple(e.lower() for e in extensions)
    base = root.rstrip("/")

    def kept(path: str, filtered: bool = True) -> bool:
        rel = path[len(base) :].lstrip("/") if path.startswith(base) else os.path.basename(path)
        parts = rel.split("/") if rel else [os.path.basename(path)]
        if any(p.startswith((".", "_")) for p in parts):
            return False
        if not filtered:
            return True
        if glob and not (fnmatch.fnmatch(rel, glob) or fnmatch.fnmatch(os.path.basename(path), glob)):
            return False
        return not (exts and not path.lower().endswith(exts))

    items = []
    for path, info in sorted(infos.items()):
        if info.get("type", "file") != "file" or not kept(path):
            continue
        uri = _uri_of(scheme, path)
        items.append(InputItem(uri, uri, fingerprint(info, scheme), int(info.get("size") or 0)))
    if local is not None:
        files, faults = local
        for path, st in files:
            if kept(path):
                uri = canonical_uri(path)
                items.append(InputItem(uri, uri, _local_fingerprint(st), int(st.st_size)))
        for fault in faults:
            if kept(fault.path, filtered=fault.is_file):
                uri = canonical_uri(fault.path)
                fp = "missing" if fault.kind == FAULT_NOT_FOUND else f"fault={fault.kind}"
                items.append(InputItem(uri, uri, fp, 0, fault.kind, f"{uri}: {fault.message}"))
        items.sort(key=lambda i: i.uri)
    return items


def _read_table(manifest: str, storage_options: dict | None, allow_http: bool):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    shown = display_uri(manifest)
    problem = scheme_problem(manifest, allow_http=allow_http)
    if problem:
        raise PipelineError(f"manifest {shown}: {problem}")
    try:
        fs, path = get_fs(manifest, storage_options)
        with fs.open(path, "rb") as f:
            if path.lower().endswith((".parquet", ".pq")):
                return pq.read_table(f)
            # every value a string ("007" stays "007"); only an empty field is null ("NA" is an id)
            convert = pcsv.ConvertOptions(
                column_types={"uri": pa.string(), "recording_id": pa.string()},
                strings_can_be_null=True,
                null_values=[""],
            )
            return pcsv.read_csv(f, convert_options=convert)
    except FileNotFoundError:
        raise PipelineError(f"manifest {shown} does not exist") from None
    except ImportError as exc:
        raise PipelineError(str(exc)) from exc
    except Exception as exc:  # an unreadable manifest stops the run with one message
        raise PipelineError(f"cannot read manifest {shown}: {type(exc).__name__}: {exc}") from None


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _resolve(raw: str, manifest_uri: str) -> tuple[str | None, str | None]:
    """(canonical URI, None), or (None, why not) for a manifest entry; a relative path is taken relative to the
    manifest's folder in the manifest's scheme."""
    if scheme_of(raw) != "file" or raw.startswith(("/", "~", "file://")):
        return canonical_uri(raw), None
    mscheme = scheme_of(manifest_uri)
    if mscheme == "file":
        folder = os.path.dirname(manifest_uri[len("file://") :])
        return canonical_uri(os.path.normpath(os.path.join(folder, raw))), None
    prefix, _, rest = manifest_uri.partition("://")
    bucket = rest.split("/", 1)[0]
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(rest), raw))
    if joined.split("/", 1)[0] != bucket or joined.startswith(".."):
        return None, f"relative path {raw!r} leads out of {prefix}://{bucket}/: give a full URI"
    return f"{prefix}://{joined}", None


@dataclass(frozen=True)
class _Row:
    """One manifest row, checked: `problems` empty means it names a readable input."""

    n: int  # 1-based, in file order
    recording_id: str  # the id, the URI when there is no id column, or `<manifest uri>#row=<n>` when unusable
    uri: str  # canonical (relative paths resolved); "" when null
    kind: str  # the fault kind when `problems` is not empty
    problems: tuple[str, ...]


def _check_row(
    n: int, raw_uri: str | None, raw_id: str | None, has_ids: bool, manifest_uri: str, allow_http: bool
) -> _Row:
    problems: list[str] = []
    kind = FAULT_MANIFEST
    uri = ""
    if raw_uri is None or not raw_uri.strip():
        problems.append("the uri is blank or null: give the input's path or URI")
    elif "\0" in raw_uri:
        uri = raw_uri.replace("\0", "\\x00")
        problems.append(f"the uri {raw_uri!r} holds a NUL byte: fix the uri")
    else:
        resolved, why = _resolve(raw_uri.strip(), manifest_uri)
        if resolved is None:
            uri = raw_uri.strip()
            problems.append(str(why))
        else:
            uri = resolved
            problem = scheme_problem(uri, allow_http=allow_http)
            if problem:
                problems.append(f"{display_uri(uri)}: {problem}")
                kind = FAULT_SCHEME
    rid = raw_id if has_ids else (uri if not problems else None)
    if has_ids and (raw_id is None or not raw_id.strip()):
        rid = None
        problems.append(
            "the recording_id is blank or null: give every row an id (or drop the recording_id column to use "
            "the URIs)"
        )
        kind = FAULT_MANIFEST
    elif rid is not None and "\0" in rid:
        problems.append(f"the recording_id {rid!r} holds a NUL byte: fix the id")
        rid = None
        kind = FAULT_MANIFEST
    return _Row(n, rid if rid is not None else f"{manifest_uri}#row={n}", uri, kind, tuple(problems))


def read_manifest(
    manifest: str, *, storage_options: dict | None = None, allow_http: bool = False
) -> list[InputItem]:
    """The inputs a Parquet or CSV manifest lists: a `uri` column and an optional `recording_id` column (default:
    the URI), one item per recording, in the manifest's order.

    Rows are numbered from 1 in file order (a CSV's header is not a row); messages name the manifest and the row.
    - A relative path (no scheme, not starting with "/" or "~") is resolved against the manifest's folder, in the
      manifest's own scheme: `a/x.wav` in `s3://b/lists/m.csv` is `s3://b/lists/a/x.wav`, in `/data/m.csv` it is
      `/data/a/x.wav`.
    - The same id with the same URI on several rows is one input. The same id with different URIs is one error
      item under that id naming the rows (none of them is processed: fix the ids). The same URI under different
      ids is allowed: two recordings.
    - A bad row is an item with a fault (its ledger row says what is wrong and what to do), never dropped: a
      blank or null id, or one with a NUL byte (its recording_id is then `<manifest uri>#row=<n>`), a null or
      blank URI, a NUL byte in it, an unknown scheme, and http(s):// unless `allow_http` (then it is read through
      fsspec's HTTP filesystem; the manifest itself too).
    - Each good URI is stat'ed for its fingerprint. One that does not exist is kept with fingerprint `missing`
      (its ledger row says not_found); a folder is a fault; one that cannot be stat'ed for another reason is
      kept with `unavailable` and its read decides its row.
    Raises PipelineError for a manifest that cannot be read, has no `uri` column, has no rows or no valid row,
    for a missing storage package and for denied access (systemic: one message, not one row per input).
    """
    table = _read_table(manifest, storage_options, allow_http)
    shown = display_uri(manifest)
    manifest_uri = display_uri(canonical_uri(manifest))
    if "uri" not in table.column_names:
        raise PipelineError(
            f"manifest {shown} has no `uri` column (columns: {', '.join(table.column_names)})"
        )
    if table.num_rows == 0:
        raise PipelineError(f"manifest {shown} has no rows: list at least one input (a `uri` per row)")
    uris = [_text(u) for u in table.column("uri").to_pylist()]
    has_ids = "recording_id" in table.column_names
    ids = [_text(i) for i in table.column("recording_id").to_pylist()] if has_ids else [None] * len(uris)

    rows = [
        _check_row(n, raw_uri, raw_id, has_ids, manifest_uri, allow_http)
        for n, (raw_uri, raw_id) in enumerate(zip(uris, ids, strict=True), start=1)
    ]
    by_id: dict[str, list[_Row]] = {}
    for row in rows:
        by_id.setdefault(row.recording_id, []).append(row)
    items: list[InputItem] = []
    for rid, group in by_id.items():
        if len({r.uri for r in group}) > 1:
            named = "; ".join(f"row {r.n}: {display_uri(r.uri) or '(no uri)'}" for r in group[:5])
            more = f"; and {len(group) - 5} more rows" if len(group) > 5 else ""
            items.append(
                InputItem(
                    "",
                    rid,
                    f"fault={FAULT_MANIFEST}",
                    0,
                    FAULT_MANIFEST,
                    f"manifest {shown}: recording_id {rid!r} is given to different URIs ({named}{more}); none "
                    "of them is processed: give each recording its own id",
                )
            )
            continue
        first = group[0]  # the same id and URI on several rows: one input
        if first.problems:
            message = f"manifest {shown} row {first.n}: {'; '.join(first.problems)}"
            fp = f"fault={first.kind}"
            items.append(InputItem(display_uri(first.uri), rid, fp, 0, first.kind, message))
        else:
            items.append(InputItem(first.uri, rid, "", 0))
    if all(i.fault_kind for i in items):
        some = "; ".join(str(i.fault_message) for i in items[:3])
        raise PipelineError(f"manifest {shown} has no valid row ({len(rows)} rows): {some}")
    return [i if i.fault_kind else _stat(i, storage_options) for i in items]


def _stat(item: InputItem, storage_options: dict | None) -> InputItem:
    """The item with its fingerprint and size (see read_manifest)."""
    try:
        fs, p = get_fs(item.uri, storage_options)
        info = fs.info(p)
    except FileNotFoundError:
        return InputItem(item.uri, item.recording_id, "missing", 0)
    except ImportError as exc:
        raise PipelineError(str(exc)) from exc
    except PermissionError:
        raise PipelineError(
            f"manifest input {display_uri(item.uri)}: access denied; check the credentials"
        ) from None
    except Exception:  # reading it will name the fault and classify it (transient or not)
        return InputItem(item.uri, item.recording_id, "unavailable", 0)
    if info.get("type", "file") == "directory":
        return InputItem(
            item.uri,
            item.recording_id,
            f"fault={FAULT_MANIFEST}",
            0,
            FAULT_MANIFEST,
            f"{display_uri(item.uri)}: a folder, not a file: list its files in the manifest (or give the folder "
            "as INPUT without --manifest)",
        )
    fp = fingerprint(info, scheme_of(item.uri))
    return InputItem(item.uri, item.recording_id, fp, int(info.get("size") or 0))
