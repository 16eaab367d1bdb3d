#!/usr/bin/env bash
# make demo: start a local Ray head (token auth on, dashboard on 127.0.0.1 only), submit the
# demo sweep as a Ray job (working dir: this checkout), follow its log, print the summary, and
# stop the Ray head it started (only its own processes, by PID). Needs `make setup base-model` first (make demo does both).
#
#   FARM_DEMO_SPEC=jobs/configs/demo.yaml FARM_DASHBOARD_PORT=8265 bash jobs/run_demo.sh
#   FARM_DEMO_JOB=jobs/full_ft_baseline.py FARM_DEMO_ARGS="--tenants acme" bash jobs/run_demo.sh  # make baseline
#   FARM_DEMO_SPEC=jobs/configs/methods.yaml bash jobs/run_demo.sh                               # make methods
# Where things go (defaults under .farm/): FARM_DEMO_BASE_MODEL, FARM_DEMO_OUTPUT,
# FARM_DEMO_REGISTRY, FARM_DEMO_SWEEP_ID. Ports: FARM_RAY_PORT, FARM_DASHBOARD_PORT,
# FARM_DASHBOARD_AGENT_PORT and FARM_RAY_CLIENT_PORT; each left unset is a free port picked
# here, so the demo runs beside any other Ray instance on the machine (Ray's own defaults, 6379,
# 8265, 52365 and 10001, are taken by the first instance that starts).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SPEC="${FARM_DEMO_SPEC:-jobs/configs/demo.yaml}"
free_port() { "$ROOT/.venv/bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
PORT="${FARM_DASHBOARD_PORT:-$(free_port)}"
RAY_PORT="${FARM_RAY_PORT:-$(free_port)}"
AGENT_PORT="${FARM_DASHBOARD_AGENT_PORT:-$(free_port)}"
CLIENT_PORT="${FARM_RAY_CLIENT_PORT:-$(free_port)}"
JOB="${FARM_DEMO_JOB:-jobs/tenant_sweep.py}"
read -r -a EXTRA <<< "${FARM_DEMO_ARGS:-}"
SWEEP_ID="${FARM_DEMO_SWEEP_ID:-demo-$(date +%Y%m%d-%H%M%S)}"
BASE_MODEL="${FARM_DEMO_BASE_MODEL:-$ROOT/.farm/base-model}"
OUTPUT="${FARM_DEMO_OUTPUT:-$ROOT/.farm/runs}"
REGISTRY="${FARM_DEMO_REGISTRY:-$ROOT/.farm/registry}"
export PATH="$ROOT/.venv/bin:$PATH"       # `python` in the job is the project's interpreter
# Token authentication: the Jobs API runs arbitrary code, so nothing talks to it without the token.
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH="$ROOT/.farm/ray_auth_token"
mkdir -p "$ROOT/.farm"
# The demo's own registry may come from an older checkout: bring its catalog to this release's
# schema first (additive migrations; a no-op when current). Other registries are migrated by
# their operators, after a backup (`farm registry migrate`).
if [ -f "$REGISTRY/catalog.sqlite" ]; then
  farm registry migrate --store "$REGISTRY"
fi
if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
  (umask 077; python -c "import secrets; print(secrets.token_hex(32))" > "$RAY_AUTH_TOKEN_PATH")
fi

# This head's own temp dir (short: Ray's socket paths have a length limit) is on the command
# line of every process it starts, so the exit trap stops exactly those and their descendants
# (Ray's agents rename themselves to ray::*), never another Ray instance on the machine.
RAY_TMP="$(mktemp -d /tmp/farm-ray-XXXXXX)"
descendants() { local child; for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$child"; descendants "$child"; done; }
stop_our_ray() {
  local roots pids pid
  roots=$(pgrep -f -- "$RAY_TMP" || true)  # a unique path: matches this head only
  pids="$roots"
  for pid in $roots; do pids="$pids $(descendants "$pid")"; done
  [ -n "${pids// /}" ] && kill -TERM $pids 2>/dev/null || true
  sleep 3
  [ -n "${pids// /}" ] && kill -KILL $pids 2>/dev/null || true
  rm -rf "$RAY_TMP"
}
trap stop_our_ray EXIT
ray start --head --port="$RAY_PORT" --temp-dir="$RAY_TMP" --ray-client-server-port="$CLIENT_PORT" \
  --dashboard-agent-listen-port="$AGENT_PORT" --num-cpus="$(nproc)" --include-dashboard=true --dashboard-host=127.0.0.1 \
  --dashboard-port="$PORT" --disable-usage-stats >"$ROOT/.farm/ray-start.log" 2>&1 \
  || { cat "$ROOT/.farm/ray-start.log"; exit 1; }
echo "Ray head started (dashboard http://127.0.0.1:$PORT); submitting sweep $SWEEP_ID"

# Submitted, waited for and judged through Ray's JobSubmissionClient (farm/ray_jobs.py; a
# fresh head's job agent may not be registered yet: it retries); the log is followed with
# `ray job logs`, as Ray prints it.
ADDRESS="http://127.0.0.1:$PORT"
JOB_ID="farm-$SWEEP_ID"
# The job's working dir arrives without .git: stamp the code version here for its lineage.
CODE_VERSION="$(python -c 'from farm.registry.core import code_version; print(code_version())')"
python -m farm.ray_jobs submit --address "$ADDRESS" --submission-id "$JOB_ID" --env "FARM_CODE_VERSION=$CODE_VERSION" -- \
  python "$JOB" --config "$SPEC" --sweep-id "$SWEEP_ID" "${EXTRA[@]}" \
  --base-model "$BASE_MODEL" --output-dir "$OUTPUT" --registry-store "$REGISTRY"
echo "following the log of job $JOB_ID (ray job logs)"
ray job logs --address "$ADDRESS" --follow "$JOB_ID" || true
status=0
python -m farm.ray_jobs wait --address "$ADDRESS" "$JOB_ID" || status=1
echo
echo "summary: $OUTPUT/$SWEEP_ID/report.md"
[ -f "$OUTPUT/$SWEEP_ID/report.md" ] && cat "$OUTPUT/$SWEEP_ID/report.md"
exit $status
