"""infra/: the KubeRay manifests, the image's pins and the local-cluster script, checked without a cluster.

Every entrypoint in the manifests is parsed by the real parser of its module and turned into a RunConfig with the
ConfigMap's run.yaml, so a renamed flag or a bad YAML key fails here and not at 3 a.m. in a CronJob.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from pipeline.cli import config_from_args
from pipeline.config import RunConfig, load_yaml, make_config

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
SECRET_NAME = "mert-storage-credentials"
RUN_CONFIGMAP = "mert-run-config"
SAMPLE_TICK = "2026-11-25T06:05:03Z"
SAMPLE_EPOCH = "1795586703"  # 2026-11-25T06:05:03Z
# Placeholders the CronJob's script fills into its RayJob template, with sample values.
PLACEHOLDERS = {"__RAYJOB_NAME__": "mert-tick-20261125-0600", "__TICK__": SAMPLE_TICK}
SECRETISH = re.compile(r"(secret|password|passwd|token|access_key|private_key|credential)", re.I)


# ------------------------------------------------------------------------------------------------ loading
def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _fill(text: str) -> str:
    for k, v in PLACEHOLDERS.items():
        text = text.replace(k, v)
    return text


def _embedded(doc: dict) -> list[dict]:
    """Kubernetes objects held as YAML text in a ConfigMap (the CronJob's RayJob template)."""
    out = []
    if doc.get("kind") == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            if not key.endswith((".yaml", ".yml")):
                continue
            for d in yaml.safe_load_all(_fill(text)):
                if isinstance(d, dict) and "apiVersion" in d and "kind" in d:
                    out.append(d)
    return out


def objects() -> list[tuple[str, dict]]:
    """(label, object) for every manifest document and every object embedded in a ConfigMap."""
    out = []
    for path in MANIFESTS:
        for d in _docs(path):
            label = f"{path.name}:{d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
            out.append((label, d))
            out += [(f"{label}[{e['kind']}]", e) for e in _embedded(d)]
    return out


def _find(kind: str) -> list[tuple[str, dict]]:
    return [(label, d) for label, d in objects() if d.get("kind") == kind]


def run_yaml_text() -> str:
    (cm,) = [d for _, d in _find("ConfigMap") if d["metadata"]["name"] == RUN_CONFIGMAP]
    return cm["data"]["run.yaml"]


def cluster_specs() -> list[tuple[str, dict]]:
    out = [(label, d["spec"]) for label, d in _find("RayCluster")]
    out += [(label, d["spec"]["rayClusterSpec"]) for label, d in _find("RayJob")]
    out += [(label, d["spec"]["jobTemplate"]["rayClusterSpec"]) for label, d in _find("RayCronJob")]
    return out


def ray_containers(spec: dict) -> list[tuple[str, dict, dict]]:
    """(group, pod spec, container) for the head and every worker group."""
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    return [
        (name, g["template"]["spec"], c) for name, g in groups for c in g["template"]["spec"]["containers"]
    ]


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


def _walk_dicts(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk_dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_dicts(v)


# ------------------------------------------------------------------------------------------------ structure
def test_every_manifest_parses_and_names_its_kind():
    assert {p.name for p in MANIFESTS} >= {
        "raycluster.yaml",
        "rayjob.yaml",
        "configmap.yaml",
        "cronjob.yaml",
        "raycronjob.yaml",
    }
    for path in MANIFESTS:
        docs = _docs(path)
        assert docs, f"{path.name}: no YAML document"
        for d in docs:
            assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), (
                f"{path.name}: {str(d)[:80]}"
            )
            assert (d.get("metadata") or {}).get("name") or d["metadata"].get("generateName"), path.name
    kinds = {d["kind"]: d["apiVersion"] for _, d in objects()}
    assert kinds["RayCluster"] == kinds["RayJob"] == kinds["RayCronJob"] == "ray.io/v1"
    assert kinds["CronJob"] == "batch/v1"


def test_every_ray_cluster_has_one_gpu_per_gpu_pod_a_cpu_group_and_token_auth():
    specs = cluster_specs()
    assert len(specs) >= 4, [label for label, _ in specs]  # RayCluster, RayJob, RayCronJob, the tick template
    for label, spec in specs:
        assert spec.get("authOptions", {}).get("mode") == "token", label
        assert Version(spec["rayVersion"]) >= Version("2.52"), label  # authOptions needs Ray >= 2.52
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in (head.get("resources", {}).get("limits") or {}), (
            f"{label}: GPU on head"
        )
        gpu_groups, cpu_groups = [], []
        for g in spec["workerGroupSpecs"]:
            c = g["template"]["spec"]["containers"][0]
            limits, requests = c["resources"].get("limits", {}), c["resources"].get("requests", {})
            if "nvidia.com/gpu" in limits:
                assert int(limits["nvidia.com/gpu"]) == 1, f"{label}/{g['groupName']}: one GPU per pod"
                assert int(requests.get("nvidia.com/gpu", 1)) == 1, f"{label}/{g['groupName']}"
                assert "num-gpus" not in g.get("rayStartParams", {}) or g["rayStartParams"]["num-gpus"] == "1"
                gpu_groups.append(g)
            else:
                assert float(str(limits["cpu"])) >= 2, (
                    f"{label}/{g['groupName']}: a decode pod wants several CPUs"
                )
                cpu_groups.append(g)
        assert gpu_groups and cpu_groups, f"{label}: needs a GPU group and a CPU group"


def test_all_ray_clusters_are_the_same_cluster():
    """rayjob.yaml, raycronjob.yaml and the tick template repeat raycluster.yaml's spec: keep them identical."""
    (ref_label, ref), *others = cluster_specs()
    assert ref_label.startswith("raycluster.yaml")
    for label, spec in others:
        assert spec == ref, f"{label}: rayClusterSpec differs from {ref_label}'s spec"


def test_ray_pods_mount_the_run_config_and_a_model_cache_and_get_credentials_from_the_secret():
    cfg = make_config(yaml.safe_load(run_yaml_text()))
    assert cfg.model.startswith("s3://"), "the cluster stages weights from object storage"
    assert cfg.model_cache, "model_cache: a node-local path (an emptyDir)"
    for label, spec in cluster_specs():
        for group, pod, c in ray_containers(spec):
            where = f"{label}/{group}"
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c.get("volumeMounts", [])}
            assert mounts.get("/config", {}).get("configMap", {}).get("name") == RUN_CONFIGMAP, where
            assert "emptyDir" in mounts.get(cfg.model_cache, {}), (
                f"{where}: model_cache is not an emptyDir mount"
            )
            refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            refs += [
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in c.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            ]
            assert SECRET_NAME in refs, f"{where}: credentials must come from the Secret {SECRET_NAME}"
    images = {c["image"] for _, spec in cluster_specs() for _, _, c in ray_containers(spec)}
    assert len(images) == 1, images


def test_no_manifest_holds_a_secret_value():
    for label, d in objects():
        assert d["kind"] != "Secret", f"{label}: create the Secret with kubectl, never in a manifest"
        for node in _walk_dicts(d):
            name = node.get("name")
            if isinstance(name, str) and SECRETISH.search(name) and ("value" in node):
                pytest.fail(f"{label}: env {name} has an inline value; use valueFrom.secretKeyRef or envFrom")
    run = yaml.safe_load(run_yaml_text())
    keys = [
        p for opt in ("storage_options", "output_storage_options") for p, _ in _walk(run.get(opt) or {}, opt)
    ]
    bad = [k for k in keys if SECRETISH.search(k) or k.split(".")[-1] in ("key", "secret")]
    assert not bad, f"run.yaml storage_options hold credentials: {bad}"
    for path in MANIFESTS:
        text = path.read_text()
        assert not re.search(r"\bA(KIA|SIA)[0-9A-Z]{16}\b", text), f"{path.name}: an AWS access key id"
        assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}", text), path.name


# ------------------------------------------------------------------------------------------------ entrypoints
def _command_strings() -> list[tuple[str, str]]:
    """Every string in the manifests that runs `python -m jobs.<module>` (not the ConfigMap text holding a
    template: its object is parsed on its own by objects())."""
    out = []
    for label, d in objects():
        held = d.get("data") if d.get("kind") == "ConfigMap" else None
        for path, value in _walk(d):
            if isinstance(value, str) and re.search(r"python3?\s+-m\s+jobs\.", value):
                if held and path.startswith(".data."):
                    continue
                out.append((f"{label}{path}", value))
    return out


def _shell_words(command: str) -> list[str]:
    """The words a POSIX shell would pass, with the tick's command substitutions and variables replaced by a
    sample: $(date ...) -> Unix seconds, $TICK / ${TICK} -> an ISO time, $PWD -> a folder."""
    s = re.sub(r"\$\((?:[^()]|\([^()]*\))*\)", SAMPLE_EPOCH, command)
    for var, sample in (("TICK", SAMPLE_TICK), ("PWD", "/repo")):
        s = re.sub(r"\$\{?" + var + r"\b\}?", sample, s)
    left = re.findall(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", s)
    assert not left, f"unknown shell variable(s) {left} in: {command}"
    return shlex.split(s)


def _jobs_invocations(command: str) -> list[tuple[str, list[str]]]:
    words = _shell_words(command)
    out = []
    for i in range(len(words) - 2):
        if (
            re.fullmatch(r"python3?", Path(words[i]).name)
            and words[i + 1] == "-m"
            and words[i + 2].startswith("jobs.")
        ):
            args = []
            for w in words[i + 3 :]:
                if w in (";", "&&", "||", "|", "&"):
                    break
                args.append(w)
            out.append((words[i + 2], args))
    return out


def _parse(module: str, args: list[str], where: str):
    parser = importlib.import_module(module).build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: {module} rejects {shlex.join(args)}:\n{err.getvalue()}")


def test_every_entrypoint_parses_and_makes_a_run_config(tmp_path):
    from jobs.scheduled import floor_tick, parse_period, parse_tick

    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(run_yaml_text())
    commands = _command_strings()
    labels = " ".join(label for label, _ in commands)
    for kind in ("RayJob", "RayCronJob", "[RayJob]"):
        assert kind in labels, f"no entrypoint found in a {kind}: {labels}"
    seen = set()
    for where, command in commands:
        calls = _jobs_invocations(command)
        assert calls, f"{where}: no `python -m jobs.*` in {command!r}"
        for module, args in calls:
            assert module in ("jobs.extract", "jobs.scheduled"), f"{where}: {module}"
            ns = _parse(module, args, where)
            sub = getattr(ns, "command", "extract")
            seen.add(sub)
            if sub in ("promote", "compact"):
                continue
            assert ns.config == "/config/run.yaml", f"{where}: --config must be the ConfigMap's mount"
            ns.config = str(run_yaml)
            if sub == "reprocess":
                ns.output = ns.tables_root
            cfg = config_from_args(ns)
            assert isinstance(cfg, RunConfig)
            if sub == "tick":
                start = floor_tick(parse_tick(ns.tick), parse_period(ns.period))
                assert start == datetime(2026, 11, 25, 6, 0, tzinfo=timezone.utc), where
                assert ns.lease_wait_s > 0, f"{where}: overlapping ticks should wait for the lease"
    assert {"extract", "tick"} <= seen, seen


def test_run_configmap_is_a_valid_run_config(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(run_yaml_text())
    cfg = make_config(load_yaml(str(p)))
    assert cfg.input.startswith("s3://") and cfg.output.startswith("s3://")
    assert cfg.num_gpus is None or cfg.num_gpus >= 1


def test_every_jobs_command_in_the_infra_readme_parses():
    text = (INFRA / "README.md").read_text().replace("\\\n", " ")
    found = re.findall(r"python3? -m jobs\.[a-z_]+[^|`;\n]*", text)
    assert len(found) >= 5, found
    for command in found:
        for module, args in _jobs_invocations(command):
            _parse(module, args, f"infra/README.md: {command}")


# ------------------------------------------------------------------------------------------------ schedules
def test_cronjob_creates_one_rayjob_per_tick_and_rbac_allows_it():
    from jobs.scheduled import parse_period

    ((_, cron),) = _find("CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec.get("startingDeadlineSeconds", 0) > 0
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    ((_, tpl),) = [(label, d) for label, d in _find("RayJob") if "[RayJob]" in label]
    ((_, args),) = _jobs_invocations(tpl["spec"]["entrypoint"])
    ns = _parse("jobs.scheduled", args, "tick template")
    assert parse_period(ns.period) == int(env["PERIOD_S"]), "--period and PERIOD_S must agree"
    assert tpl["metadata"]["name"] == PLACEHOLDERS["__RAYJOB_NAME__"]
    assert tpl["spec"]["shutdownAfterJobFinishes"] is True
    script = "\n".join(c.get("command", []) + c.get("args", []))
    for placeholder in PLACEHOLDERS:
        assert placeholder in script, f"the script never fills {placeholder}"
    assert "AlreadyExists" in script
    ((_, role),) = _find("Role")
    ((_, binding),) = _find("RoleBinding")
    verbs = {
        v
        for r in role["rules"]
        if "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"]
        for v in r["verbs"]
    }
    assert {"create", "get"} <= verbs
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert pod["serviceAccountName"] in {s["name"] for s in binding["subjects"]}
    assert pod["restartPolicy"] == "Never"


def test_raycronjob_schedules_a_rayjob_spec():
    ((_, rcj),) = _find("RayCronJob")
    assert len(rcj["spec"]["schedule"].split()) == 5
    job = rcj["spec"]["jobTemplate"]
    assert job["shutdownAfterJobFinishes"] is True and "rayClusterSpec" in job and "entrypoint" in job


def test_rayjob_shuts_its_cluster_down_and_retries_boundedly():
    for label, d in _find("RayJob"):
        assert d["spec"]["shutdownAfterJobFinishes"] is True, label
        assert 0 <= d["spec"].get("backoffLimit", 0) <= 3, label


def _cron_script() -> str:
    ((_, cron),) = _find("CronJob")
    (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert c["command"][-1] == "-c"
    return c["args"][0]


FAKE_KUBECTL = r"""#!/usr/bin/env bash
# A stand-in for kubectl: records what the script asks for.
case "$1 $2" in
  "create -f")
    cat > "$FAKE/created.yaml"
    if [[ -n "${FAKE_EXISTS:-}" ]]; then
      echo 'Error from server (AlreadyExists): rayjobs.ray.io "x" already exists' >&2; exit 1
    fi
    echo "rayjob.ray.io/created" ;;
  "get rayjobs")
    printf 'mert-tick-20200101-0000 2020-01-01T00:05:00Z\nmert-tick-recent 2999-01-01T00:00:00Z\n' ;;
  "get rayjob")
    echo -n "${FAKE_STATUS:-Complete/SUCCEEDED}" ;;
  "delete rayjob")
    echo "$3" >> "$FAKE/deleted" ;;
  *) echo "unexpected kubectl $*" >&2; exit 9 ;;
esac
"""


def _run_cron_script(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    if (
        shutil.which("bash") is None
        or subprocess.run(["date", "-u", "-d", "@0"], capture_output=True).returncode
    ):
        pytest.skip("needs bash and GNU date")
    (tmp_path / "bin").mkdir(exist_ok=True)
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    (cm,) = [d for _, d in _find("ConfigMap") if "rayjob.yaml" in (d.get("data") or {})]
    (tmp_path / "rayjob.yaml").write_text(cm["data"]["rayjob.yaml"])
    (c,) = _find("CronJob")[0][1]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    full_env = {
        **os.environ,
        **{e["name"]: e["value"] for e in c["env"]},
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "FAKE": str(tmp_path),
        "TEMPLATE": str(tmp_path / "rayjob.yaml"),
        **env,
    }
    return subprocess.run(
        ["bash", "-c", _cron_script()], env=full_env, capture_output=True, text=True, timeout=60
    )


def test_cron_script_creates_the_ticks_rayjob_and_treats_already_exists_as_done(tmp_path):
    from jobs.scheduled import floor_tick, parse_period, parse_tick

    r = _run_cron_script(tmp_path)
    assert r.returncode == 0, r.stderr
    job = yaml.safe_load((tmp_path / "created.yaml").read_text())
    assert job["kind"] == "RayJob"
    ((_, args),) = _jobs_invocations(job["spec"]["entrypoint"])
    ns = _parse("jobs.scheduled", args, "created RayJob")
    start = floor_tick(parse_tick(ns.tick), parse_period(ns.period))
    assert job["metadata"]["name"] == f"mert-tick-{start.strftime('%Y%m%d-%H%M')}", "name = the floored tick"
    assert job["metadata"]["annotations"]["mert-pipeline/tick"] == ns.tick
    assert (tmp_path / "deleted").read_text().split() == ["mert-tick-20200101-0000"], "prunes only old ticks"

    r = _run_cron_script(tmp_path, FAKE_EXISTS="1")
    assert r.returncode == 0 and "already exists" in r.stdout, r.stdout + r.stderr
    r = _run_cron_script(tmp_path, FAKE_STATUS="Failed/FAILED")
    assert r.returncode == 3, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------ image
def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _image_requirements() -> list[Requirement]:
    p = _pyproject()["project"]
    return [Requirement(r) for r in p["dependencies"] + p["optional-dependencies"]["s3"]]


def _key(r: Requirement):
    return canonicalize_name(r.name), tuple(sorted(r.extras)), str(r.specifier)


def test_constraints_pin_every_dependency_within_pyproject():
    pins = _pins()
    for req in _image_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"
    assert pins["torch"] == Version("2.11.0") and pins["torchaudio"] == Version("2.11.0")
    for label, spec in cluster_specs():
        assert Version(spec["rayVersion"]) == pins["ray"], f"{label}: rayVersion must be the image's Ray"


def test_dockerfile_base_image_and_installs_match_pyproject():
    text = (INFRA / "Dockerfile").read_text()
    m = re.search(r"^FROM\s+(?:docker\.io/)?(?:library/)?python:(\d+\.\d+)(?:\.\d+)?[-\w]*", text, re.M)
    assert m, "the base image must be an official python:X.Y image"
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert requires.contains(m.group(1)), f"python {m.group(1)} does not satisfy requires-python {requires}"
    runs = re.findall(r"^RUN\s+((?:.*\\\n)*.*)$", text, re.M)
    installs = [shlex.split(r.replace("\\\n", " ").split("&&")[0]) for r in runs if "pip install" in r]
    assert installs, "no pip install in the Dockerfile"
    pins = _pins()
    for words in installs:
        assert "-c" in words and words[words.index("-c") + 1] == "infra/constraints.txt", words
        reqs = [
            Requirement(w)
            for w in words[2:]
            if not w.startswith("-") and w != "infra/constraints.txt" and not w.startswith(".")
        ]
        for r in reqs:  # an exact version anywhere in the Dockerfile must agree with pyproject and the pins
            for s in r.specifier:
                if s.operator == "==" and "*" not in s.version:
                    assert Version(s.version) == pins[canonicalize_name(r.name)], r
        if reqs:
            assert sorted(map(_key, reqs)) == sorted(map(_key, _image_requirements())), (
                "the Dockerfile's dependency layer must list pyproject's dependencies (+ [s3]) exactly"
            )
    assert any(".[s3]" in w for words in installs for w in words), "the project itself is installed with [s3]"
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", text, re.M), "the image must not run as root"


# ------------------------------------------------------------------------------------------------ scripts
def test_shell_scripts_pass_bash_n(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    r = subprocess.run(["bash", "-n", str(INFRA / "local-cluster.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    script = tmp_path / "cron.sh"
    script.write_text(_cron_script())
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "set -euo pipefail" in _cron_script()
    assert re.search(r"^set -E?euo pipefail$", (INFRA / "local-cluster.sh").read_text(), re.M)
