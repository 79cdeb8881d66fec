#!/usr/bin/env bash
# One benchmark run, one gateway process, four targets (docs/PERFORMANCE.md, "Provider kinds
# and the price catalog"):
#   openai        openai kind, operator price, the harness's fake upstream
#   catalog       openai kind, catalog price (frozen on the first request), the same upstream
#   openai-pyfake openai kind, operator price, tests/fake_provider.py as upstream
#   azure         azure kind (v1 API, api-key, a deployment), tests/fake_azure.py as upstream
# `azure` against `openai-pyfake` compares kinds on upstreams of the same code; `catalog`
# against `openai` shows what a catalog price costs once frozen.
#
#   scripts/bench_providers.sh [-- extra run_matrix.py arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = "--" ] && shift
BENCH_DIR="${BENCH_DIR:-../shared/bench}"
OUT="${OUT:-var/bench-providers}"
DB="${BENCH_DB:-otari_bench_providers}"
BASE_PORT="${BENCH_BASE_PORT:-9300}"
P_UP=$BASE_PORT P_PY=$((BASE_PORT + 1)) P_AZ=$((BASE_PORT + 2)) P_GW=$((BASE_PORT + 3))
mkdir -p "$OUT"
[ -x var/benchvenv/bin/python ] || {
  python3 -m venv var/benchvenv
  var/benchvenv/bin/pip install -q -r "$BENCH_DIR/requirements.txt"
}

export DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB"
export OTARI_CONFIG="$PWD/$OUT/otari.yaml"
export OTARI_MASTER_KEY=otari-mk-bench
cat > "$OTARI_CONFIG" <<YAML
providers:
  openai: {kind: openai, api_key: bench, api_base: "http://127.0.0.1:$P_UP/v1"}
  catalog: {kind: openai, api_key: bench, api_base: "http://127.0.0.1:$P_UP/v1",
            catalog_provider: openai}
  pyfake: {kind: openai, api_key: bench, api_base: "http://127.0.0.1:$P_PY/v1"}
  azure: {kind: azure, api_key: azure-bench-key, api_base: "http://127.0.0.1:$P_AZ",
          deployments: {gpt-4o-mini: mini}}
pricing:
  "openai:gpt-4o-mini": {input_price_per_million: 0.15, output_price_per_million: 0.60}
  "pyfake:gpt-4o-mini": {input_price_per_million: 0.15, output_price_per_million: 0.60}
  "azure:gpt-4o-mini": {input_price_per_million: 0.15, output_price_per_million: 0.60}
YAML

psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
.venv/bin/python manage.py migrate -v0
.venv/bin/python manage.py bootstrap >/dev/null
KEY=$(.venv/bin/python - <<'PY'
import django, os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "otari.settings")
django.setup()
from decimal import Decimal
from budgets.services import accounts, keys
budget = accounts.budget_create(name="bench", max_budget_usd=Decimal("999999999"))
user = accounts.user_create(user_id="bench", budget=budget)
print(keys.api_key_create(user=user)[1])
PY
)

taskset -c 0 var/benchvenv/bin/python "$BENCH_DIR/fake_upstream.py" --port "$P_UP" \
  >"$OUT/upstream.log" 2>&1 &
UP_PID=$!
taskset -c 0 .venv/bin/python tests/fake_provider.py --port "$P_PY" >"$OUT/pyfake.log" 2>&1 &
PY_PID=$!
taskset -c 0 .venv/bin/python - "$P_AZ" >"$OUT/azure.log" 2>&1 <<'PY' &
import sys, threading
sys.path.insert(0, ".")
from tests.fake_azure import FakeAzure
FakeAzure(port=int(sys.argv[1]), api_key="azure-bench-key", deployments={"mini": "gpt-4o-mini"}).start()
threading.Event().wait()
PY
AZ_PID=$!
taskset -c 1 .venv/bin/uvicorn otari.asgi:application --port "$P_GW" --log-level warning \
  --no-access-log --lifespan off >"$OUT/gateway.log" 2>&1 &
GW_PID=$!
trap 'kill $GW_PID $UP_PID $PY_PID $AZ_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -s -o /dev/null "http://127.0.0.1:$P_GW/v1/models" && break
  sleep 0.1
done

target() { echo "$1=http://127.0.0.1:$P_GW,key=$KEY,model=$2,pid=$GW_PID"; }
var/benchvenv/bin/python "$BENCH_DIR/run_matrix.py" \
  --upstream "http://127.0.0.1:$P_UP" --upstream-pid "$UP_PID" \
  --target "$(target openai openai:gpt-4o-mini)" \
  --target "$(target catalog catalog:gpt-4o-mini)" \
  --target "$(target openai-pyfake pyfake:gpt-4o-mini)" \
  --target "$(target azure azure:gpt-4o-mini)" \
  --driver-cpus 0 --out "$OUT/results.json" --markdown "$OUT/results.md" "$@"

psql -h 127.0.0.1 -U postgres -d "$DB" -Atc "SELECT model_key || ': ' || origin || ' ' || catalog_version FROM usage_modelpricing ORDER BY 1"
psql -h 127.0.0.1 -U postgres -d "$DB" -Atc "SELECT 'open holds: ' || count(*) FROM budgets_hold WHERE status = 'open'"
psql -h 127.0.0.1 -U postgres -d "$DB" -Atc "SELECT 'reserved: ' || reserved_usd || ', spend: ' || spend_usd || ', usage sum: ' || (SELECT sum(cost_usd) FROM usage_usagelog) FROM budgets_gatewayuser WHERE user_id = 'bench'"
