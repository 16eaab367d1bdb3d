#!/usr/bin/env bash
# make demo: start a local Ray head (token auth on, dashboard on 127.0.0.1 only), submit the
# demo sweep with `ray job submit --working-dir .`, follow its log, print the summary, and
# stop the Ray head it started. Needs `make setup base-model` first (make demo does both).
#
#   FARM_DEMO_SPEC=jobs/configs/demo.yaml FARM_DASHBOARD_PORT=8265 bash jobs/run_demo.sh
#   FARM_DEMO_JOB=jobs/full_ft_baseline.py FARM_DEMO_ARGS="--tenants acme" bash jobs/run_demo.sh  # make baseline
#   FARM_DEMO_SPEC=jobs/configs/methods.yaml bash jobs/run_demo.sh                               # make methods
# Where things go (defaults under .farm/): FARM_DEMO_BASE_MODEL, FARM_DEMO_OUTPUT,
# FARM_DEMO_REGISTRY, FARM_DEMO_SWEEP_ID; FARM_RAY_PORT (6379) and FARM_DASHBOARD_PORT (8265).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SPEC="${FARM_DEMO_SPEC:-jobs/configs/demo.yaml}"
PORT="${FARM_DASHBOARD_PORT:-8265}"
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
if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
  (umask 077; python -c "import secrets; print(secrets.token_hex(32))" > "$RAY_AUTH_TOKEN_PATH")
fi

ray start --head --port="${FARM_RAY_PORT:-6379}" --num-cpus="$(nproc)" --include-dashboard=true --dashboard-host=127.0.0.1 \
  --dashboard-port="$PORT" --disable-usage-stats >"$ROOT/.farm/ray-start.log" 2>&1 \
  || { cat "$ROOT/.farm/ray-start.log"; exit 1; }
trap 'ray stop >/dev/null 2>&1 || true' EXIT
echo "Ray head started (dashboard http://127.0.0.1:$PORT); submitting sweep $SWEEP_ID"

status=0
ray job submit --address "http://127.0.0.1:$PORT" --working-dir . -- \
  python "$JOB" --config "$SPEC" --sweep-id "$SWEEP_ID" "${EXTRA[@]}" \
  --base-model "$BASE_MODEL" --output-dir "$OUTPUT" --registry-store "$REGISTRY" || status=$?

echo
echo "summary: $OUTPUT/$SWEEP_ID/report.md"
[ -f "$OUTPUT/$SWEEP_ID/report.md" ] && cat "$OUTPUT/$SWEEP_ID/report.md"
exit $status
