"""Helpers for infra/local-cluster.sh (run as `python infra/local_cluster.py CMD ...`; infra/ is not a package).

    wait-s3  --endpoint URL [--timeout S]          wait until the S3-protocol server answers
    seed     --endpoint URL --state DIR [--files N] buckets, a random-weight checkpoint and audio, run.yaml
    procs    --state DIR                            list the processes this local cluster started
    stop     --state DIR [--grace S]                stop exactly those processes (SIGTERM, then SIGKILL)
    port-free PORT...                               exit 1 if one of the ports is taken on 127.0.0.1

Which processes are "ours": local-cluster.sh exports MERT_LOCAL_CLUSTER_ID=<id> (a random id kept in
$STATE/cluster_id) before it starts the S3 server and every `ray start`. Every Ray process (GCS, raylet,
dashboard, agents, workers, job drivers) inherits that environment, so a process is ours when its environment
carries our id, or its command line names our Ray temp dir, or it descends from such a process. Nothing else on the machine is touched (no `ray stop`, no matching by program name).
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKER = "MERT_LOCAL_CLUSTER_ID"
BUCKETS = ("audio", "features", "models")
MODEL_PREFIX = "models/MERT-v1-95M-random"
AUDIO_PREFIX = "audio/catalog"
TABLE = "s3://features/mert/MERT-v1-95M-random"


def _log(msg: str) -> None:
    print(f"[local-cluster] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- S3 server
def wait_s3(endpoint: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answered (moto answers / with 200, other servers with 403): it is up
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"S3 server at {endpoint} did not answer within {timeout:.0f} s") from None
            time.sleep(0.3)


def wait_jobs(dashboard: str, timeout: float) -> None:
    """Until the job server accepts a job. Right after start the head's dashboard agent may not be registered
    yet, and a submission fails with "No available agent to submit job": a no-op job shows when it is."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            client = JobSubmissionClient(dashboard)
            job = client.submit_job(
                entrypoint="true", submission_id=f"local-cluster-ready-{secrets.token_hex(4)}"
            )
            while not client.get_job_status(job).is_terminal():
                time.sleep(0.2)
            return
        except Exception as exc:  # not ready yet
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"the job server at {dashboard} accepted no job within {timeout:.0f} s: {exc}"
                ) from None
            time.sleep(1.0)


def seed(endpoint: str, state: Path, files: int) -> None:
    """Buckets (boto3: s3fs.mkdir sends a location constraint moto refuses), a tiny random-weight MERT-v1-95M
    checkpoint in hub layout at s3://models/..., generated audio at s3://audio/..., and $STATE/run.yaml."""
    import boto3
    import s3fs

    sys.path.insert(0, str(REPO))
    from pipeline.checkpoints import write_random_checkpoint
    from pipeline.config import load_yaml, make_config
    from pipeline.synth import write_corpus

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    )
    have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for b in BUCKETS:
        if b not in have:
            s3.create_bucket(Bucket=b)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})

    work = state / "seed"
    model_dir, audio_dir = work / "MERT-v1-95M-random", work / "audio"
    if not (model_dir / "config.json").exists():
        write_random_checkpoint(model_dir, like="MERT-v1-95M", size="tiny", seed=0)
    if not audio_dir.exists():
        write_corpus(audio_dir, n=files, seed=0)
    for local, prefix in ((model_dir, MODEL_PREFIX), (audio_dir, AUDIO_PREFIX)):
        n = 0
        for p in sorted(local.rglob("*")):
            if p.is_file():
                fs.put_file(str(p), f"{prefix}/{p.relative_to(local).as_posix()}")
                n += 1
        _log(f"uploaded {n} file(s) to s3://{prefix}/")

    run_yaml = state / "run.yaml"
    run_yaml.write_text(
        "# Written by infra/local-cluster.sh up: a run config for the local cluster (keys = RunConfig fields).\n"
        "# Credentials are not here: they come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).\n"
        "# RANDOM WEIGHTS: the features are meaningless; this only exercises the pipeline end to end.\n"
        f"input: s3://{AUDIO_PREFIX}/\n"
        f"output: {TABLE}\n"
        f"model: s3://{MODEL_PREFIX}/\n"
        f"model_cache: {state / 'model-cache'}\n"
        "storage_options:\n"
        "  client_kwargs:\n"
        f"    endpoint_url: {endpoint}\n"
        "num_gpus: 0\n"
        "num_actors: 1\n"
        "batch_size: 4\n"
        "lease_wait_s: 60\n"
    )
    make_config(load_yaml(str(run_yaml)))  # the file must be a valid run config
    _log(f"wrote {run_yaml}")


# ---------------------------------------------------------------------------------------------- processes
def _cluster_id(state: Path) -> str | None:
    f = state / "cluster_id"
    return f.read_text().strip() if f.exists() else None


def our_processes(state: Path) -> list:
    import psutil

    cid = _cluster_id(state)
    tmp_file = state / "ray-tmp-path"
    ray_tmp = tmp_file.read_text().strip() if tmp_file.exists() else None
    me = psutil.Process()
    spare = {me.pid} | {p.pid for p in me.parents()}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid in spare:
            continue
        try:
            hit = bool(ray_tmp) and any(ray_tmp in part for part in (p.info["cmdline"] or []))
            if not hit and cid is not None:
                hit = p.environ().get(MARKER) == cid
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if hit:
            found[p.pid] = p
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True):
                if c.pid not in spare:
                    found.setdefault(c.pid, c)
        except psutil.NoSuchProcess:
            pass
    return sorted(found.values(), key=lambda p: p.pid)


def _describe(p) -> str:
    try:
        cmd = " ".join(p.cmdline())[:110] or p.name()
    except Exception:  # it may be gone already
        cmd = "?"
    return f"{p.pid:>7}  {cmd}"


def procs(state: Path) -> int:
    ps = our_processes(state)
    for p in ps:
        print(_describe(p))
    print(f"{len(ps)} process(es) of this local cluster")
    return 0


def _signal_all(ps: list, how: str) -> None:
    import psutil

    for p in ps:
        try:
            getattr(p, how)()
        except psutil.NoSuchProcess:
            pass


def stop(state: Path, grace: float) -> int:
    import psutil

    ps = our_processes(state)
    if not ps:
        _log("no process of this local cluster is running")
        return 0
    _log(f"stopping {len(ps)} process(es) by pid (SIGTERM, then SIGKILL after {grace:.0f} s)")
    _signal_all(ps, "terminate")
    _, alive = psutil.wait_procs(ps, timeout=grace)
    _signal_all(alive, "kill")
    psutil.wait_procs(alive, timeout=5)
    left = our_processes(state)  # workers that a dying raylet started in the meantime
    _signal_all(left, "kill")
    psutil.wait_procs(left, timeout=5)
    left = our_processes(state)
    if left:
        for p in left:
            _log(f"still running: {_describe(p)}")
        return 1
    return 0


def port_free(ports: list[int]) -> int:
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    if busy:
        print(" ".join(map(str, busy)))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python infra/local_cluster.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait-s3")
    w.add_argument("--endpoint", required=True)
    w.add_argument("--timeout", type=float, default=30.0)
    wj = sub.add_parser("wait-jobs")
    wj.add_argument("--dashboard", required=True)
    wj.add_argument("--timeout", type=float, default=60.0)
    s = sub.add_parser("seed")
    s.add_argument("--endpoint", required=True)
    s.add_argument("--state", required=True, type=Path)
    s.add_argument("--files", type=int, default=8)
    p = sub.add_parser("procs")
    p.add_argument("--state", required=True, type=Path)
    st = sub.add_parser("stop")
    st.add_argument("--state", required=True, type=Path)
    st.add_argument("--grace", type=float, default=10.0)
    pf = sub.add_parser("port-free")
    pf.add_argument("ports", nargs="+", type=int)
    sub.add_parser("new-id")
    a = ap.parse_args(argv)
    if a.cmd == "wait-s3":
        wait_s3(a.endpoint, a.timeout)
        return 0
    if a.cmd == "wait-jobs":
        wait_jobs(a.dashboard, a.timeout)
        return 0
    if a.cmd == "seed":
        seed(a.endpoint, a.state.resolve(), a.files)
        return 0
    if a.cmd == "procs":
        return procs(a.state.resolve())
    if a.cmd == "stop":
        return stop(a.state.resolve(), a.grace)
    if a.cmd == "port-free":
        return port_free(a.ports)
    if a.cmd == "new-id":
        print(secrets.token_hex(12))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
