"""Inputs: list a prefix (or read a manifest) into work items with fingerprints.

A fingerprint says whether an input changed since it was processed: s3 size + ETag (+ version id when
versioned), gs generation, az ETag, local size + mtime in ns.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.storage import canonical_uri, get_fs, scheme_of


@dataclass(frozen=True)
class InputItem:
    uri: str  # canonical URI with scheme
    recording_id: str  # the URI unless a manifest gives an id
    fingerprint: str
    size: int  # bytes


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
    return f"size={size};mtime={info.get('mtime') or info.get('LastModified')}"


def _uri_of(scheme: str, path: str) -> str:
    if scheme == "file":
        return canonical_uri(path)
    if scheme == "s3a":
        scheme = "s3"
    return f"{scheme}://{path}"


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
    missing storage package: a systemic failure, not one error per input.
    """
    scheme = scheme_of(source)
    try:
        fs, root = get_fs(source, storage_options)
        if fs.isfile(root):
            infos = {root: fs.info(root)}
        else:
            if not fs.exists(root):
                raise FileNotFoundError(root)
            infos = fs.find(root, detail=True, withdirs=False)
    except ImportError as exc:
        raise PipelineError(str(exc)) from exc
    except FileNotFoundError:
        raise PipelineError(f"input {source} does not exist: check the path or bucket name") from None
    except PermissionError as exc:
        raise PipelineError(
            f"input {source}: access denied ({type(exc).__name__}); check the credentials"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any listing failure is systemic
        raise PipelineError(f"cannot list input {source}: {type(exc).__name__}: {exc}") from None
    exts = tuple(e.lower() for e in extensions)
    base = root.rstrip("/")
    items = []
    for path, info in sorted(infos.items()):
        if info.get("type", "file") != "file":
            continue
        rel = path[len(base) :].lstrip("/") if path.startswith(base) else os.path.basename(path)
        parts = rel.split("/") if rel else [os.path.basename(path)]
        if any(p.startswith((".", "_")) for p in parts):
            continue
        if glob and not (fnmatch.fnmatch(rel, glob) or fnmatch.fnmatch(os.path.basename(path), glob)):
            continue
        if exts and not path.lower().endswith(exts):
            continue
        uri = _uri_of(scheme, path)
        items.append(InputItem(uri, uri, fingerprint(info, scheme), int(info.get("size") or 0)))
    return items


def read_manifest(manifest: str, *, storage_options: dict | None = None) -> list[InputItem]:
    """A Parquet or CSV manifest with a `uri` column and an optional `recording_id` column.

    Each URI is stat'ed for its fingerprint; a URI that does not exist is kept (its ledger row will say so).
    """
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        fs, path = get_fs(manifest, storage_options)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f) if path.lower().endswith(".parquet") else pcsv.read_csv(f)
    except FileNotFoundError:
        raise PipelineError(f"manifest {manifest} does not exist") from None
    except Exception as exc:  # noqa: BLE001
        raise PipelineError(f"cannot read manifest {manifest}: {type(exc).__name__}: {exc}") from None
    if "uri" not in table.column_names:
        raise PipelineError(
            f"manifest {manifest} has no `uri` column (columns: {', '.join(table.column_names)})"
        )
    uris = [str(u) for u in table.column("uri").to_pylist()]
    ids = (
        [str(i) for i in table.column("recording_id").to_pylist()]
        if "recording_id" in table.column_names
        else None
    )
    items: list[InputItem] = []
    seen: set[str] = set()
    for n, raw in enumerate(uris):
        uri = canonical_uri(raw)
        rid = ids[n] if ids else uri
        if rid in seen:
            continue  # one row per recording
        seen.add(rid)
        scheme = scheme_of(uri)
        try:
            fs, p = get_fs(uri, storage_options)
            info = fs.info(p)
            items.append(InputItem(uri, rid, fingerprint(info, scheme), int(info.get("size") or 0)))
        except FileNotFoundError:
            items.append(InputItem(uri, rid, "missing", 0))
        except ImportError as exc:
            raise PipelineError(str(exc)) from exc
        except PermissionError:
            raise PipelineError(f"manifest input {uri}: access denied; check the credentials") from None
    return items
