#!/usr/bin/env bash
# Benchmark the gateway against the fake provider with an external harness (docs/PERFORMANCE.md).
#
#   scripts/bench.sh [SERVER] [-- extra run_matrix.py arguments]
#
# SERVER: uvicorn (default), daphne or granian. Needs PostgreSQL on 127.0.0.1:5432, wrk, and
# the bench harness, which is not in this repository (BENCH_DIR, default ../shared/bench). Pins the gateway to CPU 1 and the
# fake provider and load generator to CPU 0, as the harness recommends on 2 cores.
# BENCH_LITELLM=1 adds the LiteLLM proxy to the run (installed into a scratch venv); ours'
# CPU is reported with and without its PostgreSQL backends (docs/PERFORMANCE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVER="${1:-uvicorn}"
shift || true
[ "${1:-}" = "--" ] && shift
BENCH_DIR="${BENCH_DIR:-../shared/bench}"
OUT="${OUT:-var/bench}"
# Overridable, so that two benchmarks on one machine do not share a database or ports.
DB="${BENCH_DB:-otari_bench}"
PORT_UPSTREAM="${BENCH_PORT_UPSTREAM:-9100}"
PORT_GATEWAY="${BENCH_PORT_GATEWAY:-8100}"
mkdir -p "$OUT"
[ -f "$BENCH_DIR/run_matrix.py" ] || { echo "no bench harness in BENCH_DIR=$BENCH_DIR" >&2; exit 2; }

[ -x var/benchvenv/bin/python ] || {
  python3 -m venv var/benchvenv
  var/benchvenv/bin/pip install -q -r "$BENCH_DIR/requirements.txt"
}

export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB"
export OTARI_CONFIG="$PWD/$OUT/otari.yaml"
export OTARI_MASTER_KEY=otari-mk-bench
cat > "$OTARI_CONFIG" <<YAML
providers:
  openai: {kind: openai, api_key: bench, api_base: "http://127.0.0.1:$PORT_UPSTREAM/v1"}
pricing:
  "openai:gpt-4o-mini": {input_price_per_million: 0.15, output_price_per_million: 0.60}
YAML
# BENCH_CEILINGS=1: a second target on the same gateway whose requests answer to three
# ceilings (its key's, its workspace's and the organization's, narrowed to the provider
# instance `openai3`, the same fake), next to the plain one, which answers to none:
# the cost of the extra levels, as a ratio measured in one run (docs/PERFORMANCE.md).
if [ -n "${BENCH_CEILINGS:-}" ]; then
  sed -i "s|^providers:|providers:\n  openai3: {kind: openai, api_key: bench, api_base: \"http://127.0.0.1:$PORT_UPSTREAM/v1\"}|" "$OTARI_CONFIG"
  echo '  "openai3:gpt-4o-mini": {input_price_per_million: 0.15, output_price_per_million: 0.60}' >>"$OTARI_CONFIG"
fi
# BENCH_CLOUD=1: also the bedrock, gemini and vertex kinds, on tests/fake_cloud.py (SigV4
# verified, event-stream frames, OAuth), each a target of its own in the same run, so
# their CPU per request compares with the openai kind's (docs/PERFORMANCE.md).
PORT_CLOUD="${BENCH_PORT_CLOUD:-9200}"
if [ -n "${BENCH_CLOUD:-}" ]; then
  CLOUD="http://127.0.0.1:$PORT_CLOUD"
  export AWS_ACCESS_KEY_ID=AKIDFAKETESTKEY00001
  export AWS_SECRET_ACCESS_KEY=fake-test-secret-key-for-sigv4-verification
  export AWS_EC2_METADATA_DISABLED=true
  python3 - "$OTARI_CONFIG" "$CLOUD" "$PWD/$OUT/service-account.json" <<'PY'
import sys
path, cloud, account = sys.argv[1:]
text = open(path).read().replace("providers:\n", f"""providers:
  bedrock: {{kind: bedrock, region: us-test-1, api_base: "{cloud}"}}
  gemini: {{kind: gemini, api_key: fake-gemini-api-key-0123456789, api_base: "{cloud}/v1beta"}}
  vertex: {{kind: vertex, location: us-test1, api_base: "{cloud}/v1", credentials_file: "{account}"}}
""", 1)
for model in ("bedrock:anthropic.claude-3-5-haiku-20241022-v1:0", "gemini:gemini-2.5-flash",
              "vertex:gemini-2.5-flash"):
    text += f'  "{model}": {{input_price_per_million: 0.8, output_price_per_million: 4}}\n'
open(path, "w").write(text)
PY
  taskset -c 0 .venv/bin/python tests/fake_cloud.py --port "$PORT_CLOUD" \
    --service-account "$PWD/$OUT/service-account.json" >"$OUT/cloud.log" 2>&1 &
  CLOUD_PID=$!
  for _ in $(seq 100); do [ -s "$OUT/service-account.json" ] && break; sleep 0.1; done
fi

psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
.venv/bin/python manage.py migrate -v0
.venv/bin/python manage.py bootstrap >/dev/null
# A user with a budget so large it never refuses: every request takes and settles a hold.
# BENCH_RPM_LIMIT / BENCH_TPM_LIMIT give it rate limits too (never reached, but checked
# and counted on every request), to measure the rate limiter.
KEY=$(.venv/bin/python - <<'PY'
import django, os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "otari.settings")
django.setup()
from decimal import Decimal
from budgets.services import accounts, keys
budget = accounts.budget_create(name="bench", max_budget_usd=Decimal("999999999"))
limits = {
    name: int(os.environ[var])
    for name, var in (("rpm_limit", "BENCH_RPM_LIMIT"), ("tpm_limit", "BENCH_TPM_LIMIT"))
    if os.environ.get(var)
}
user = accounts.user_create(user_id="bench", budget=budget, **limits)
print(keys.api_key_create(user=user)[1])
PY
)
if [ -n "${BENCH_CEILINGS:-}" ]; then
  KEY3=$(.venv/bin/python - <<'PY'
import django, os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "otari.settings")
django.setup()
from decimal import Decimal
from budgets.services import accounts, ceilings, keys, tenancy
budget = accounts.budget_create(name="bench-ceilings", max_budget_usd=Decimal("999999999"))
user = accounts.user_create(user_id="bench3", budget=budget)
workspace = tenancy.workspace_create(name="bench")
key, secret = keys.api_key_create(user=user, workspace=workspace)
for scope_type, scope_id, provider in (
    ("api_token", key.pk, ""),
    ("workspace", workspace.pk, ""),
    ("organization", tenancy.organization_ensure().pk, "openai3"),
):
    ceilings.ceiling_create(
        scope_type=scope_type, scope_id=str(scope_id), budget_id=budget.pk, provider=provider
    )
print(secret)
PY
)
fi

taskset -c 0 var/benchvenv/bin/python "$BENCH_DIR/fake_upstream.py" --port $PORT_UPSTREAM \
  >"$OUT/upstream.log" 2>&1 &
UPSTREAM_PID=$!
# uvicorn's lifespan is left on `auto`: the gateway warms each worker up at startup
# (otari/startup.py), and a BENCH_BASELINE from before that has no lifespan to run.
server_cmd() {  # the server's command line, listening on port $1
  case "$SERVER" in
    uvicorn) CMD=("$VENV/bin/uvicorn" otari.asgi:application --port "$1"
                  --log-level warning --no-access-log) ;;
    daphne)  CMD=("$VENV/bin/daphne" -p "$1" otari.asgi:application) ;;
    granian) CMD=("$VENV/bin/granian" --interface asgi --port "$1" --no-ws
                  --log-level warning otari.asgi:application) ;;
    *) echo "unknown server $SERVER" >&2; exit 2 ;;
  esac
}
VENV="$PWD/.venv"
server_cmd "$PORT_GATEWAY"
taskset -c 1 "${CMD[@]}" >"$OUT/gateway.log" 2>&1 &
GATEWAY_PID=$!
# BENCH_PGBOUNCER=1: a second gateway process, the same in every way but that it reaches
# PostgreSQL through a PgBouncer in transaction mode (scripts/pgbouncer-local, port
# BENCH_PGBOUNCER_PORT), measured in the same run as target `pgbouncer`, its CPU counted
# with PgBouncer's (docs/OPERATIONS.md, "Several hosts").
if [ -n "${BENCH_PGBOUNCER:-}" ]; then
  PGB_PORT="${BENCH_PGBOUNCER_PORT:-6436}"
  PORT_PGB_GATEWAY=$((PORT_GATEWAY + 2))
  rm -f "$OUT/pgbouncer/pgbouncer.pid"
  scripts/pgbouncer-local "$PGB_PORT" "$OUT/pgbouncer"
  PGB_PID=$(cat "$OUT/pgbouncer/pgbouncer.pid" 2>/dev/null || true)
  server_cmd "$PORT_PGB_GATEWAY"
  DATABASE_URL="postgres://postgres@127.0.0.1:$PGB_PORT/$DB" OTARI_DB_POOLER=transaction \
    taskset -c 1 "${CMD[@]}" >"$OUT/gateway-pgbouncer.log" 2>&1 &
  GATEWAY2_PID=$!
fi
# BENCH_BASELINE=<a checkout of another commit, e.g. a `git worktree` of main>: the same
# server started from that tree too (same database, config and key, next port), measured
# as the target `base` in the same run: before/after figures on an equally loaded machine.
if [ -n "${BENCH_BASELINE:-}" ]; then
  PORT_BASE=$((PORT_GATEWAY + 1))
  server_cmd "$PORT_BASE"
  LOG="$PWD/$OUT/gateway-base.log"
  (cd "$BENCH_BASELINE" && exec taskset -c 1 "${CMD[@]}" >"$LOG" 2>&1) &
  BASE_PID=$!
fi
trap 'kill $GATEWAY_PID ${BASE_PID:-} $UPSTREAM_PID ${CLOUD_PID:-} ${LITELLM_PID:-} ${GATEWAY2_PID:-} ${PGB_PID:-} 2>/dev/null || true' EXIT
for port in $PORT_GATEWAY ${PORT_BASE:-} ${PORT_PGB_GATEWAY:-}; do
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/v1/models" && break
    sleep 0.1
  done
done

TARGETS=(--target "ours=http://127.0.0.1:$PORT_GATEWAY,key=$KEY,model=openai:gpt-4o-mini,pid=$GATEWAY_PID")
if [ -n "${BENCH_BASELINE:-}" ]; then
  TARGETS+=(--target "base=http://127.0.0.1:$PORT_BASE,key=$KEY,model=openai:gpt-4o-mini,pid=$BASE_PID")
fi
# BENCH_ROUTING=1: a target naming a routing policy (one default target, the same model):
# what looking up and planning a policy, and renaming the answer's model, cost per
# request, against the direct selector.
if [ -n "${BENCH_ROUTING:-}" ]; then
  .venv/bin/python - <<'PY'
import django, os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "otari.settings")
django.setup()
from llm_proxy.routing import store
store.policy_save(
    name="bench-route",
    spec={"select": [{"default": "openai:gpt-4o-mini"}]},
)
PY
  TARGETS+=(--target "routed=http://127.0.0.1:$PORT_GATEWAY,key=$KEY,model=bench-route,pid=$GATEWAY_PID")
fi
if [ -n "${BENCH_PGBOUNCER:-}" ]; then
  for _ in $(seq 100); do
    curl -s -o /dev/null "http://127.0.0.1:$PORT_PGB_GATEWAY/v1/models" && break
    sleep 0.1
  done
  TARGETS+=(--target "pgbouncer=http://127.0.0.1:$PORT_PGB_GATEWAY,key=$KEY,model=openai:gpt-4o-mini,pid=$GATEWAY2_PID${PGB_PID:++$PGB_PID}")
fi
if [ -n "${BENCH_CEILINGS:-}" ]; then
  TARGETS+=(--target "ceilings3=http://127.0.0.1:$PORT_GATEWAY,key=$KEY3,model=openai3:gpt-4o-mini,pid=$GATEWAY_PID")
fi
if [ -n "${BENCH_CLOUD:-}" ]; then
  for model in bedrock:anthropic.claude-3-5-haiku-20241022-v1:0 gemini:gemini-2.5-flash \
               vertex:gemini-2.5-flash; do
    TARGETS+=(--target "${model%%:*}=http://127.0.0.1:$PORT_GATEWAY,key=$KEY,model=$model,pid=$GATEWAY_PID")
  done
fi
# BENCH_LITELLM=1: the LiteLLM proxy as a peer in the same run, on the same fake provider
# (an OpenAI-compatible model), pinned to the gateway's core, with no database (it does no
# budget work). It is installed from PyPI into a scratch venv outside the repository
# (BENCH_SCRATCH); no LiteLLM code is part of this repository.
if [ -n "${BENCH_LITELLM:-}" ]; then
  SCRATCH="${BENCH_SCRATCH:-${TMPDIR:-/tmp}/otari-bench}"
  PORT_LITELLM="${BENCH_PORT_LITELLM:-4100}"
  mkdir -p "$SCRATCH"
  [ -x "$SCRATCH/litellm-venv/bin/litellm" ] || {
    python3 -m venv "$SCRATCH/litellm-venv"
    "$SCRATCH/litellm-venv/bin/pip" install -q 'litellm[proxy]'
  }
  cat >"$SCRATCH/litellm.yaml" <<YAML
model_list:
  - model_name: gpt-4o-mini
    litellm_params: {model: openai/gpt-4o-mini, api_key: bench, api_base: "http://127.0.0.1:$PORT_UPSTREAM/v1"}
general_settings: {master_key: sk-bench}
YAML
  # Without DATABASE_URL: with one, LiteLLM sets up its own database (and needs prisma).
  env -u DATABASE_URL LITELLM_LOCAL_MODEL_COST_MAP=True taskset -c 1 \
    "$SCRATCH/litellm-venv/bin/litellm" --config "$SCRATCH/litellm.yaml" --port "$PORT_LITELLM" \
    >"$OUT/litellm.log" 2>&1 &
  LITELLM_PID=$!
  for _ in $(seq 600); do
    curl -s -o /dev/null -H 'Authorization: Bearer sk-bench' \
      "http://127.0.0.1:$PORT_LITELLM/v1/models" && break
    sleep 0.2
  done
  TARGETS+=(--target "litellm=http://127.0.0.1:$PORT_LITELLM,key=sk-bench,model=gpt-4o-mini,pid=$LITELLM_PID")
fi
# scripts/bench_matrix.py runs the harness's run_matrix.py and also counts the CPU of the
# PostgreSQL backends serving $DB during each measured run of `ours` (and of `pgbouncer`:
# its backends serve the same database, idle while the other target runs;
# docs/PERFORMANCE.md), then writes the side-by-side summary ($OUT/summary-$SERVER.md).
var/benchvenv/bin/python scripts/bench_matrix.py --bench-dir "$BENCH_DIR" --pg-db "$DB" \
  --pg-targets "ours${BENCH_PGBOUNCER:+,pgbouncer}" ${BENCH_PG_TREE:+--pg-tree} --summary "$OUT/summary-$SERVER.md" -- \
  --upstream "http://127.0.0.1:$PORT_UPSTREAM" --upstream-pid "$UPSTREAM_PID" \
  "${TARGETS[@]}" \
  --driver-cpus 0 --out "$OUT/results-$SERVER.json" --markdown "$OUT/results-$SERVER.md" "$@"

# The books after the run: every hold closed, and every user's and ceiling's spend the sum of
# its usage rows (manage.py audit_budgets exits 2 when they are not).
.venv/bin/python manage.py audit_budgets
