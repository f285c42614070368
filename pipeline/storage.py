"""Object storage through fsspec: canonical URIs, filesystems, and storage errors turned into named faults.

Storage options (endpoint, credentials, anonymous) pass straight to fsspec; they never appear in messages.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import fsspec

from pipeline.errors import AccessDenied, InputFault, InputNotFound, StorageError

# Schemes the pipeline knows, and the optional package that provides each.
SCHEME_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
}
# Read through fsspec's HTTP filesystem (aiohttp), and only when a run allows it (`allow_http`).
HTTP_SCHEMES = ("http", "https")
HTTP_PACKAGE = "aiohttp"


def scheme_of(uri: str) -> str:
    parsed = urlparse(uri)
    # a Windows drive letter or a plain path has no real scheme
    return parsed.scheme if len(parsed.scheme) > 1 else "file"


def canonical_uri(path_or_uri: str) -> str:
    """The input's canonical URI with its scheme: `file:///abs/path`, `s3://bucket/key`, ..."""
    scheme = scheme_of(path_or_uri)
    if scheme == "file":
        path = path_or_uri[len("file://") :] if path_or_uri.startswith("file://") else path_or_uri
        return "file://" + os.path.abspath(os.path.expanduser(path))
    if scheme == "s3a":
        return "s3://" + path_or_uri[len("s3a://") :]
    return path_or_uri


def display_uri(uri: str) -> str:
    """`uri` fit for a message: user and password in it (http://user:secret@host/...) are replaced by ***."""
    parsed = urlparse(uri)
    if parsed.scheme and "@" in parsed.netloc:
        return parsed._replace(netloc="***@" + parsed.netloc.rsplit("@", 1)[1]).geturl()
    return uri


def get_fs(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URI or a plain path. Raises ImportError naming the missing extra."""
    scheme = scheme_of(uri)
    pkg = SCHEME_PACKAGES.get(scheme) or (HTTP_PACKAGE if scheme in HTTP_SCHEMES else None)
    if pkg is not None:
        try:
            __import__(pkg)
        except ImportError as exc:
            raise ImportError(
                f"{scheme}:// needs the {pkg} package: pip install 'mert-pipeline[{_extra(scheme)}]'"
            ) from exc
    uri = canonical_uri(uri)
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def _extra(scheme: str) -> str:
    extras = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}
    return extras.get(scheme, "azure")


def scheme_problem(uri: str, *, allow_http: bool = False) -> str | None:
    """Why the pipeline will not read `uri` because of its scheme, or None when it may.

    Known: plain paths and file://, the object stores of SCHEME_PACKAGES, and http(s):// when `allow_http`.
    """
    scheme = scheme_of(uri)
    if scheme == "file" or scheme in SCHEME_PACKAGES:
        return None
    if scheme in HTTP_SCHEMES:
        if allow_http:
            return None
        return f"{scheme}:// inputs are read only when allowed: rerun with --allow-http (allow_http: true)"
    known = ", ".join(["file", *SCHEME_PACKAGES, *HTTP_SCHEMES])
    return f"unknown scheme {scheme}:// (known: {known}): fix the URI"


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the scheme."""
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


_TRANSIENT_WORDS = (
    "timeout",
    "timed out",
    "throttl",
    "slowdown",
    "slow down",
    "503",
    "500",
    "connection reset",
    "connection aborted",
    "temporarily",
    "too many requests",
    "429",
    "serviceunavailable",
)


def storage_fault(uri: str, exc: BaseException) -> InputFault:
    """Turn an exception raised while opening or reading `uri` into a named, classified fault."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if isinstance(exc, FileNotFoundError) or "nosuchkey" in low or "does not exist" in low:
        return InputNotFound(uri, "no such file or object", "check the path, or the manifest that names it")
    if isinstance(exc, PermissionError) or "accessdenied" in low or "forbidden" in low or "403" in low:
        return AccessDenied(uri, "access denied", "check the credentials and the bucket policy")
    if isinstance(exc, (TimeoutError, ConnectionError)) or any(w in low for w in _TRANSIENT_WORDS):
        return StorageError(uri, f"storage error: {text}", "transient; a rerun retries it")
    if isinstance(exc, OSError):
        return StorageError(uri, f"cannot read: {text}", "a rerun retries it")
    return StorageError(uri, f"cannot read: {text}")
