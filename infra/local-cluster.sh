#!/usr/bin/env bash
# A Ray cluster and an S3-protocol object store on this one machine, to try the jobs the way a cluster runs
# them (ray job submit, object storage, several Ray nodes) without Kubernetes or a cloud account.
#
#   infra/local-cluster.sh up       S3 server (moto) + Ray head (dashboard, job server) + N worker nodes,
#                                   buckets audio/features/models, a RANDOM-WEIGHT checkpoint, generated audio,
#                                   $STATE/run.yaml and $STATE/env
#   infra/local-cluster.sh status   what is running
#   infra/local-cluster.sh down     stop exactly what `up` started (by pid; never `ray stop`)
#
# Needs the project installed with its test extra, which brings moto's server, boto3 and s3fs:
#     pip install -e '.[test]'
#
# Settings (environment; defaults in brackets):
#   LC_STATE [<repo>/.local-cluster]   state dir: env, run.yaml, logs, the Ray temp dir, the auth token
#   LC_PYTHON [<repo>/.venv/bin/python if present, else python3]
#   LC_WORKERS [1]        extra Ray worker nodes        LC_CPUS_PER_NODE [1]   CPUs each node offers Ray
#   LC_S3_PORT [5055]     moto's S3 endpoint            LC_GCS_PORT [6479]     Ray head (GCS) port
#   LC_DASH_PORT [8366]   dashboard + job server        LC_CLIENT_PORT [10201] Ray client server port
#   LC_AGENT_PORT [52465] first dashboard-agent port (one per node: +0 head, +1, +2 ... workers)
#   LC_WORKER_PORTS [23000-23999]  port range of Ray worker processes
#   LC_OBJECT_STORE_MB [300]       object store per node      LC_FILES [8]  generated audio files
#   LC_RAY_TMP [$LC_STATE/ray]     Ray temp dir (unix socket paths must stay short: keep it < 50 chars)
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${LC_STATE:-$REPO/.local-cluster}"
if [[ -z "${LC_PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then LC_PYTHON="$REPO/.venv/bin/python"; else LC_PYTHON="python3"; fi
fi
PY="$LC_PYTHON"
PYBIN="$(cd "$(dirname "$(command -v "$PY")")" && pwd)"
WORKERS="${LC_WORKERS:-1}"
CPUS="${LC_CPUS_PER_NODE:-1}"
S3_PORT="${LC_S3_PORT:-5055}"
GCS_PORT="${LC_GCS_PORT:-6479}"
DASH_PORT="${LC_DASH_PORT:-8366}"
CLIENT_PORT="${LC_CLIENT_PORT:-10201}"
AGENT_PORT="${LC_AGENT_PORT:-52465}"
WORKER_PORTS="${LC_WORKER_PORTS:-23000-23999}"
OBJ_MB="${LC_OBJECT_STORE_MB:-300}"
FILES="${LC_FILES:-8}"
RAY_TMP="${LC_RAY_TMP:-$STATE/ray}"
S3="http://127.0.0.1:$S3_PORT"
HELPER="$REPO/infra/local_cluster.py"

log() { printf '[local-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The environment every process of the cluster is started with (and that `source $STATE/env` gives a shell).
cluster_env() {
  export PATH="$PYBIN:$PATH"                 # `python` and `ray` in job entrypoints = this environment's
  export RAY_AUTH_MODE=token                 # Ray >= 2.59 wants token auth for local clusters
  export RAY_AUTH_TOKEN_PATH="$STATE/auth_token"
  unset RAY_AUTH_TOKEN RAY_ADDRESS
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
  export MERT_PIPELINE_CACHE="$STATE/model-cache"
  export HF_HUB_OFFLINE=1                    # like a cluster that cannot reach the hub: models come from S3
  export RAY_JOB_STOP_WAIT_TIME_S=60         # `ray job stop`: SIGTERM, then this long to reach a commit boundary
  export RAY_USAGE_STATS_ENABLED=0
}

is_up() { [[ -f "$STATE/cluster_id" ]]; }

cmd_up() {
  is_up && die "a local cluster is already recorded in $STATE (run: $0 status, or $0 down)"
  "$PY" -c 'import moto.server, boto3, s3fs, ray' 2>/dev/null \
    || die "$PY lacks moto/boto3/s3fs/ray: install the test extra: pip install -e '.[test]'"
  (( ${#RAY_TMP} < 50 )) || die "LC_RAY_TMP=$RAY_TMP is too long for Ray's unix sockets; set a shorter LC_RAY_TMP"
  local ports=("$S3_PORT" "$GCS_PORT" "$DASH_PORT" "$CLIENT_PORT")
  local i
  for ((i = 0; i <= WORKERS; i++)); do ports+=("$((AGENT_PORT + i))"); done
  local busy
  if ! busy="$("$PY" "$HELPER" port-free "${ports[@]}")"; then
    die "port(s) already in use on 127.0.0.1: $busy (set LC_*_PORT to free ones)"
  fi

  mkdir -p "$STATE/logs" "$RAY_TMP" "$STATE/model-cache"
  "$PY" "$HELPER" new-id >"$STATE/cluster_id"
  printf '%s\n' "$RAY_TMP" >"$STATE/ray-tmp-path"
  ( umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$STATE/auth_token" )
  cat >"$STATE/ports" <<EOF
S3_PORT=$S3_PORT
GCS_PORT=$GCS_PORT
DASH_PORT=$DASH_PORT
EOF
  cluster_env
  export MERT_LOCAL_CLUSTER_ID; MERT_LOCAL_CLUSTER_ID="$(cat "$STATE/cluster_id")"
  # From here on, a failure takes down what was started.
  trap 'log "up failed: stopping what was started"; "$PY" "$HELPER" stop --state "$STATE" || true; rm -f "$STATE/cluster_id"' ERR

  log "S3 server (moto) on $S3"
  nohup "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$STATE/logs/moto.log" 2>&1 &
  "$PY" "$HELPER" wait-s3 --endpoint "$S3" --timeout 60

  local common=(--num-cpus "$CPUS" --object-store-memory "$((OBJ_MB * 1024 * 1024))" --temp-dir "$RAY_TMP"
    --min-worker-port "${WORKER_PORTS%-*}" --max-worker-port "${WORKER_PORTS#*-}" --disable-usage-stats)
  log "Ray head: GCS 127.0.0.1:$GCS_PORT, dashboard/job server http://127.0.0.1:$DASH_PORT"
  ray start --head --node-ip-address 127.0.0.1 --port "$GCS_PORT" \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" \
    --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
    "${common[@]}" >"$STATE/logs/ray-head.log" 2>&1 || { cat "$STATE/logs/ray-head.log" >&2; false; }
  for ((i = 1; i <= WORKERS; i++)); do
    log "Ray worker node $i"
    ray start --address "127.0.0.1:$GCS_PORT" --node-ip-address 127.0.0.1 \
      --dashboard-agent-listen-port "$((AGENT_PORT + i))" \
      "${common[@]}" >"$STATE/logs/ray-worker-$i.log" 2>&1 || { cat "$STATE/logs/ray-worker-$i.log" >&2; false; }
  done

  log "buckets, a random-weight MERT-v1-95M checkpoint (tiny) and $FILES audio files"
  "$PY" "$HELPER" seed --endpoint "$S3" --state "$STATE" --files "$FILES"

  cat >"$STATE/env" <<EOF
# source this file to talk to the local cluster in $STATE (written by infra/local-cluster.sh up)
export RAY_ADDRESS=http://127.0.0.1:$DASH_PORT
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$STATE/auth_token
unset RAY_AUTH_TOKEN
export AWS_ACCESS_KEY_ID=testing
export AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1
export MERT_LOCAL_S3=$S3
export MERT_LOCAL_GCS=127.0.0.1:$GCS_PORT
export PATH=$PYBIN:\$PATH
EOF
  trap - ERR
  wait_nodes
  next_steps
}

wait_nodes() {
  local want=$((WORKERS + 1)) n=0 t
  for ((t = 0; t < 60; t++)); do
    n="$("$PY" - "$GCS_PORT" 2>/dev/null <<'EOF' || echo 0
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
print(sum(1 for x in ray.nodes() if x["Alive"]))
EOF
)"
    [[ "$n" == "$want" ]] && break
    sleep 1
  done
  if [[ "$n" != "$want" ]]; then
    log "warning: $n of $want Ray node(s) alive after 60 s (see $STATE/logs)"
    return 0
  fi
  log "$n Ray node(s) alive"
  # the job server takes a few more seconds to accept jobs (its agent registers late on a busy machine)
  ( cluster_env; "$PY" "$HELPER" wait-jobs --dashboard "http://127.0.0.1:$DASH_PORT" --timeout 90 ) \
    && log "the job server accepts jobs" || log "warning: the job server accepts no job yet (see $STATE/logs)"
}

next_steps() {
  cat <<EOF

Local cluster is up ($((WORKERS + 1)) Ray node(s), S3 at $S3). The checkpoint has RANDOM WEIGHTS: features are meaningless.

  source $STATE/env

  # one run (what a RayJob does)
  ray job submit --working-dir $REPO -- python -m jobs.extract --config $STATE/run.yaml

  # a scheduled tick (what the CronJob / RayCronJob does); a second tick in the same hour does nothing
  ray job submit --working-dir $REPO -- python -m jobs.scheduled tick --config $STATE/run.yaml \\
      --tick "\$(date -u +%Y-%m-%dT%H:%M:%SZ)" --period 1h --mirror-deletions --lease-wait 600

  # what the table holds
  python -m pipeline.cli inspect s3://features/mert/MERT-v1-95M-random \\
      --storage-options '{"client_kwargs": {"endpoint_url": "$S3"}}'

  ray job list                       # jobs; ray job stop <id> sends SIGTERM (ends at a commit boundary)
  $0 status
  $0 down
EOF
}

cmd_status() {
  if ! is_up; then echo "no local cluster recorded in $STATE"; return 0; fi
  # shellcheck disable=SC1091
  source "$STATE/ports"
  cluster_env
  echo "state: $STATE"
  if "$PY" "$HELPER" wait-s3 --endpoint "http://127.0.0.1:$S3_PORT" --timeout 1 2>/dev/null; then
    echo "S3 (moto): up at http://127.0.0.1:$S3_PORT"
  else
    echo "S3 (moto): DOWN (http://127.0.0.1:$S3_PORT)"
  fi
  ray status --address "127.0.0.1:$GCS_PORT" 2>/dev/null | sed -n '/Node status/,/Demands/p' \
    || echo "Ray: head not reachable at 127.0.0.1:$GCS_PORT"
  "$PY" "$HELPER" procs --state "$STATE" | tail -n 1
}

cmd_down() {
  if ! is_up; then log "no local cluster recorded in $STATE"; return 0; fi
  "$PY" "$HELPER" stop --state "$STATE"
  rm -f "$STATE/cluster_id" "$STATE/env" "$STATE/ports"
  log "stopped; logs, seed files and the Ray temp dir stay in $STATE (rm -rf it to start clean)"
}

case "${1:-}" in
  up) cmd_up ;;
  status) cmd_status ;;
  down) cmd_down ;;
  *) echo "usage: $0 up|status|down   (settings: see the top of $0)" >&2; exit 2 ;;
esac
