"""Latency of the usage API on a large usage log (issue 4's performance check).

Creates a scratch PostgreSQL database, migrates it, seeds N usage rows with
generate_series (default 1,000,000, over 90 days in time order like the real append-only
log, 1,000 users with a key each, 20 models, 2% errors), serves the
gateway with uvicorn in a subprocess and reports p50/p90 latency of:

- a filtered list page: GET /v1/usage?user_id=...&start_date=<30 days ago>&limit=100
- a list page filtered by model and status
- a list page filtered by API key
- GET /v1/usage/count with a user filter
- a 30-day summary: GET /v1/usage/summary?start_date=<30 days ago>

Not part of the test suite. Run from the repository root:

    .venv/bin/python scripts/bench_usage_api.py [--rows 1000000] [--keep] [--reuse]

--reuse skips creating and seeding when the scratch database already exists (e.g. to
measure again after a migration: `--reuse --migrate`).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

REPO = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = os.environ.get("BENCH_DB", "otari_bench_usage")
MASTER_KEY = "otari-mk-bench"

SEED_SQL = """
INSERT INTO budgets_gatewayuser (user_id, alias, blocked, metadata, spend_usd, reserved_usd,
    lifetime_spend_usd, topup_usd, created_at, updated_at)
SELECT 'user-' || i, 'User ' || i, false, '{}', 0, 0, 0, 0, now(), now()
FROM generate_series(1, 1000) AS i;

INSERT INTO budgets_apikey (id, user_id, key_hash, key_prefix, key_suffix, key_name,
    is_active, exclude_from_budget, metadata, created_at, updated_at)
SELECT md5('key' || i)::uuid, 'user-' || i, md5('a' || i) || md5('b' || i), 'gw-bench00',
    '', 'bench-' || i, true, false, '{}', now(), now()
FROM generate_series(1, 1000) AS i;

INSERT INTO usage_usagelog (id, user_id, api_key_id, timestamp, endpoint, provider, model,
    prompt_tokens, completion_tokens, total_tokens, cache_read_tokens, cache_write_tokens,
    cost_usd, status, status_code, error_message, latency_ms, counts_toward_budget)
SELECT gen_random_uuid(), 'user-' || u, md5('key' || u)::uuid,
    now() - interval '90 days' + (i::float8 / %(rows)s) * interval '90 days',
    '/v1/chat/completions', 'openai',
    'model-' || (i % 20), p, c, p + c, 0, 0,
    CASE WHEN i % 50 = 0 THEN NULL ELSE round((p * 0.15 + c * 0.6) / 1000000.0, 6) END,
    CASE WHEN i % 50 = 0 THEN 'error' ELSE 'success' END,
    CASE WHEN i % 50 = 0 THEN 502 ELSE 200 END, '', 100 + i % 900, true
FROM (
    SELECT i, 1 + (i::bigint * 7919) % 1000 AS u, 50 + i % 2000 AS p, 10 + i % 500 AS c
    FROM generate_series(1, %(rows)s) AS i
) AS g
-- An append-only log: rows land in settlement-time order, as the gateway writes them.
ORDER BY i;
ANALYZE;
"""


def _db_url(name: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _exists() -> bool:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        return bool(
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DB_NAME]).fetchone()
        )


def _manage(*args: str) -> None:
    env = {**os.environ, "DATABASE_URL": _db_url(DB_NAME)}
    subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env, check=True)


def seed(rows: int) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    _manage("migrate", "-v", "0")
    started = time.monotonic()
    with psycopg.connect(_db_url(DB_NAME), autocommit=True) as conn:
        conn.execute(SEED_SQL.replace("%(rows)s", str(int(rows))))
    print(f"seeded {rows:,} usage rows in {time.monotonic() - started:.1f}s")


def serve() -> tuple[subprocess.Popen, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {
        **os.environ,
        "DATABASE_URL": _db_url(DB_NAME),
        "OTARI_MASTER_KEY": MASTER_KEY,
        "OTARI_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "otari.asgi:application",
            "--port",
            str(port),
            "--lifespan",
            "off",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/health/liveness", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the gateway did not start")


def measure(client: httpx.Client, name: str, path: str, params: dict, samples: int) -> None:
    for _ in range(3):
        client.get(path, params=params).raise_for_status()
    timings = []
    for _ in range(samples):
        started = time.perf_counter()
        response = client.get(path, params=params)
        timings.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    timings.sort()
    p90 = timings[max(0, int(len(timings) * 0.9) - 1)]
    print(f"{name:<44} p50 {statistics.median(timings):8.1f} ms   p90 {p90:8.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--reuse", action="store_true", help="keep an existing scratch DB")
    parser.add_argument("--migrate", action="store_true", help="migrate before measuring")
    parser.add_argument("--keep", action="store_true", help="do not drop the scratch DB")
    args = parser.parse_args()

    if not (args.reuse and _exists()):
        seed(args.rows)
    elif args.migrate:
        _manage("migrate", "-v", "0")
    process, url = serve()
    month_ago = (datetime.now(UTC) - timedelta(days=30)).isoformat()
    key_id = "2f7c7d4e-0000-0000-0000-000000000000"
    with psycopg.connect(_db_url(DB_NAME)) as conn:
        key_id = str(conn.execute("SELECT md5('key7')::uuid").fetchone()[0])
    try:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=60
        ) as client:
            measure(
                client,
                "list: user + 30 days, limit 100",
                "/v1/usage",
                {"user_id": "user-7", "start_date": month_ago, "limit": 100},
                args.samples,
            )
            measure(
                client,
                "list: model + status=error, limit 100",
                "/v1/usage",
                {"model": "model-3", "status": "error", "limit": 100},
                args.samples,
            )
            measure(
                client,
                "list: api_key_id, limit 100",
                "/v1/usage",
                {"api_key_id": key_id, "limit": 100},
                args.samples,
            )
            measure(
                client,
                "list: no filter, skip 1000, limit 100",
                "/v1/usage",
                {"skip": 1000, "limit": 100},
                args.samples,
            )
            measure(client, "count: user", "/v1/usage/count", {"user_id": "user-7"}, args.samples)
            measure(
                client,
                "summary: 30 days, all breakdowns",
                "/v1/usage/summary",
                {"start_date": month_ago},
                args.samples,
            )
            measure(
                client,
                "summary: 30 days, one user",
                "/v1/usage/summary",
                {"start_date": month_ago, "user_id": "user-7"},
                args.samples,
            )
    finally:
        process.terminate()
        process.wait(timeout=10)
        if not args.keep:
            with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


if __name__ == "__main__":
    main()
