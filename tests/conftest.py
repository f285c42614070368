"""Shared fixtures: a real S3-protocol server (moto's server mode) on localhost, and one shared local Ray."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid

import pytest

# Staged checkpoints and content hashes go to a throwaway cache, not the user's (set before any Ray starts,
# so workers inherit it).
os.environ.setdefault("MERT_PIPELINE_CACHE", tempfile.mkdtemp(prefix="mert-cache-"))
# transformers copies a checkpoint's own code (tests/test_remote_code.py) into its modules cache: a throwaway one
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf-modules-"))

S3_KEY = "testing-key-id"
S3_SECRET = "testing-secret-key-do-not-log"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1. Yields its endpoint URL; credentials are test values."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_options(s3_server) -> dict:
    """fsspec/s3fs storage options for the moto server (explicit credentials, never the environment's)."""
    return {
        "key": S3_KEY,
        "secret": S3_SECRET,
        "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"},
    }


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket (created with boto3: s3fs.mkdir sends a location constraint moto refuses)."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray shared by the tests that do not kill processes (starting one takes ~8 s)."""
    import ray

    # Inputs named with these markers make the isolated decoder child crash or hang (pipeline.audio.isolate).
    os.environ["MERT_PIPELINE_FAULT_INJECTION"] = "crash:__crash_me__,hang:__hang_me__"
    if not ray.is_initialized():
        # address="local": always a new local Ray, never a `ray start` cluster that another test (or a person)
        # left running on this machine (ray.init would join it and refuse num_cpus)
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    yield ray
    ray.shutdown()
