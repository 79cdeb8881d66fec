"""Time the console's heaviest pages on a large seeded database (PostgreSQL only).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/otari_bench_admin \
        .venv/bin/python scripts/bench_admin.py --rows 1000000 [--reuse]

Creates (or, with --reuse, keeps) that scratch database, migrates it, seeds it with
`--rows` usage rows and as many holds over 90 days, 1,000 users on 5 budgets and 2,000
keys (one INSERT ... SELECT generate_series per table), ANALYZEs, then requests each page
through Django's test client as a superuser and prints the median time and the number of
SQL queries. Never point it at a database you care about: it drops and recreates it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "otari.settings")

SEED_SQL = """
INSERT INTO budgets_budget (budget_id, name, max_budget_usd, budget_duration_sec,
                            reset_alignment, alert_thresholds_pct, alert_webhook_url,
                            alert_emails, created_at, updated_at)
SELECT 'bench-budget-' || b, 'Bench budget ' || b, (b * 50)::numeric, NULL,
       'calendar_month', '[80, 100]', '', '[]', now() - interval '120 days', now()
FROM generate_series(1, 5) AS b;

INSERT INTO budgets_gatewayuser (user_id, alias, budget_id, blocked, allowed_models, metadata,
    spend_usd, reserved_usd, lifetime_spend_usd, budget_started_at, next_budget_reset_at,
    topup_usd, topup_expires_at, created_at, updated_at, deleted_at)
SELECT 'user-' || u, 'User ' || u, 'bench-budget-' || (1 + u % 5), u % 97 = 0, NULL, '{}',
       round((random() * (1 + u % 5) * 55)::numeric, 6), 0, round((random() * 900)::numeric, 6),
       date_trunc('month', now()), date_trunc('month', now()) + interval '1 month',
       0, NULL, now() - interval '120 days', now(), NULL
FROM generate_series(1, 1000) AS u;

INSERT INTO budgets_apikey (id, user_id, key_hash, key_prefix, key_suffix, key_name, is_active,
    expires_at, allowed_models, exclude_from_budget, metadata, created_at, updated_at,
    last_used_at)
SELECT md5('key' || k)::uuid, 'user-' || (1 + k % 1000), md5('hash' || k) || md5('h2' || k),
       'gw-' || substr(md5('p' || k), 1, 7), substr(md5('s' || k), 1, 4), 'key ' || k,
       k % 50 <> 0, NULL, NULL, false, '{}', now() - interval '100 days', now(), now()
FROM generate_series(1, 2000) AS k;

INSERT INTO usage_usagelog (id, user_id, api_key_id, timestamp, endpoint, provider, model,
    prompt_tokens, completion_tokens, total_tokens, cache_read_tokens, cache_write_tokens,
    cost_usd, status, status_code, error_message, latency_ms, counts_toward_budget)
SELECT md5('usage' || i)::uuid, 'user-' || (1 + i % 1000), md5('key' || (1 + i % 2000))::uuid,
       now() - (i * (interval '90 days' / %(rows)s)),
       (ARRAY['/v1/chat/completions', '/v1/messages', '/v1/responses'])[1 + i % 3],
       (ARRAY['openai', 'anthropic'])[1 + i % 2],
       (ARRAY['gpt-4o-mini', 'gpt-4o', 'claude-sonnet', 'claude-haiku', 'o3-mini'])[1 + i % 5],
       100 + i % 900, 20 + i % 400, 120 + i % 900 + i % 400, NULL, NULL,
       CASE WHEN i % 50 = 0 THEN NULL ELSE round(((100 + i % 900) * 0.15 + (20 + i % 400) * 0.6)
            / 1000000, 6) END,
       CASE WHEN i % 50 = 0 THEN 'error' WHEN i % 333 = 0 THEN 'client_disconnected'
            ELSE 'success' END,
       CASE WHEN i % 50 = 0 THEN (ARRAY[502, 429, 403, 500])[1 + (i / 50) % 4] ELSE 200 END,
       CASE WHEN i % 50 = 0 THEN 'LLM provider error' ELSE '' END,
       50 + i % 3000, true
FROM generate_series(1, %(rows)s) AS i;

INSERT INTO budgets_hold (request_id, user_id, amount_usd, status, model_key, created_at,
                          expires_at, closed_at)
SELECT md5('usage' || i)::uuid, 'user-' || (1 + i % 1000), 0.0005,
       CASE WHEN i <= 40 THEN 'open' WHEN i % 50 = 0 THEN 'refunded' ELSE 'settled' END,
       'openai:gpt-4o-mini', now() - (i * (interval '90 days' / %(rows)s)),
       now() - (i * (interval '90 days' / %(rows)s)) + interval '15 minutes',
       CASE WHEN i <= 40 THEN NULL ELSE now() - (i * (interval '90 days' / %(rows)s)) END
FROM generate_series(1, %(rows)s) AS i;

INSERT INTO budgets_budgetresetlog (user_id, budget_id, previous_spend_usd, reset_at,
                                    next_reset_at, created_at)
SELECT 'user-' || u, 'bench-budget-' || (1 + u % 5), round((random() * 200)::numeric, 6),
       date_trunc('month', now()) - (m || ' months')::interval,
       date_trunc('month', now()) - ((m - 1) || ' months')::interval, now()
FROM generate_series(1, 1000) AS u, generate_series(0, 2) AS m;

UPDATE budgets_gatewayuser u SET reserved_usd = h.total
FROM (SELECT user_id, sum(amount_usd) AS total FROM budgets_hold WHERE status = 'open'
      GROUP BY user_id) h
WHERE u.user_id = h.user_id;
"""

PAGES = [
    ("dashboard (admin index)", "/admin/"),
    ("usage log changelist", "/admin/usage/usagelog/"),
    ("usage log, page 50", "/admin/usage/usagelog/?p=50"),
    ("usage log, status=error", "/admin/usage/usagelog/?status__exact=error"),
    ("usage log, one user", "/admin/usage/usagelog/?user=user-7"),
    ("usage log, one model", "/admin/usage/usagelog/?model=openai:gpt-4o"),
    ("usage log, date drill-down (month)", None),
    ("usage log, search request id", None),
    ("usage log, date range (one month)", None),
    ("usage log, date range (one day)", None),
    ("usage log, status code 429", "/admin/usage/usagelog/?code=429"),
    ("usage log, status code 5xx", "/admin/usage/usagelog/?code=5xx"),
    ("usage log, provider", "/admin/usage/usagelog/?provider=anthropic"),
    ("usage log, one key", None),
    ("usage log, one budget", "/admin/usage/usagelog/?budget=bench-budget-1"),
    ("usage log, budget + model + month", None),
    ("suggest users", "/admin/suggest/users/?q=user-1"),
    ("usage log totals, all rows", "/admin/usage/usagelog/totals.json"),
    ("usage log totals, one month", None),
    ("usage log totals, one user", "/admin/usage/usagelog/totals.json?user=user-7"),
    ("spend report by user, this month", "/admin/reports/spend/?by=user"),
    ("spend report by model, this month", "/admin/reports/spend/?by=model"),
    ("spend report by budget, this month", "/admin/reports/spend/?by=budget"),
    ("setting changes list", "/admin/budgets/settingchange/"),
    ("holds changelist", "/admin/budgets/hold/"),
    ("holds, open only", "/admin/budgets/hold/?status__exact=open"),
    ("users changelist", "/admin/budgets/gatewayuser/"),
    ("users, 80%+ filter", "/admin/budgets/gatewayuser/?usage=near"),
    ("budgets changelist", "/admin/budgets/budget/"),
    ("budget change page", "/admin/budgets/budget/bench-budget-1/change/"),
    ("user change page", "/admin/budgets/gatewayuser/user-7/change/"),
    ("keys changelist", "/admin/budgets/apikey/"),
    ("reset logs changelist", "/admin/budgets/budgetresetlog/"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reuse", action="store_true", help="keep an already seeded database")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-export", action="store_true", help="skip the full CSV export")
    args = parser.parse_args()

    import django
    import environ

    db = environ.Env.db_url_config(os.environ["DATABASE_URL"])
    if not db["NAME"].startswith("otari_bench"):
        sys.exit("refusing: the scratch database's name must start with otari_bench")
    conn = ["-h", db.get("HOST") or "127.0.0.1", "-U", db.get("USER") or "postgres"]
    if not args.reuse:
        subprocess.run(["dropdb", *conn, "--if-exists", db["NAME"]], check=True)
        subprocess.run(["createdb", *conn, db["NAME"]], check=True)

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    if not args.reuse:
        started = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute(SEED_SQL.replace("%(rows)s", str(int(args.rows))))
            cursor.execute("ANALYZE")
        print(f"seeded {args.rows:,} usage rows and holds in {time.perf_counter() - started:.1f} s")
    measure(args.repeat, export=not args.no_export)


def measure(repeat: int, *, export: bool = True) -> None:
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext, setup_test_environment

    from budgets.models import APIKey
    from usage.models import UsageLog

    setup_test_environment()
    User = get_user_model()
    admin_user = User.objects.filter(username="bench-admin").first()
    if admin_user is None:
        admin_user = User.objects.create_superuser("bench-admin", "", "bench-pass-123")
    client = Client()
    client.force_login(admin_user)
    newest = UsageLog.objects.order_by("-timestamp").values_list("timestamp", "id").first()
    today = newest[0].date()
    month_ago = today - timedelta(days=30)
    key_prefix = APIKey.objects.order_by("pk").values_list("key_prefix", flat=True).first()
    pages = []
    for name, url in PAGES:
        if name.startswith("usage log, date"):
            year, month = newest[0].year, newest[0].month
            url = f"/admin/usage/usagelog/?timestamp__year={year}&timestamp__month={month}"
        elif name.startswith("usage log, search"):
            url = f"/admin/usage/usagelog/?q={newest[1]}"
        elif name.startswith("usage log, date range (one month)"):
            url = f"/admin/usage/usagelog/?date_from={month_ago}&date_to={today}"
        elif name.startswith("usage log, date range (one day)"):
            url = f"/admin/usage/usagelog/?date_from={today}&date_to={today}"
        elif name.startswith("usage log totals, one month"):
            url = f"/admin/usage/usagelog/totals.json?date_from={month_ago}&date_to={today}"
        elif name.startswith("usage log, one key"):
            url = f"/admin/usage/usagelog/?key={key_prefix}"
        elif name.startswith("usage log, budget + model"):
            url = (
                "/admin/usage/usagelog/?budget=bench-budget-2&model=openai:gpt-4o"
                f"&date_from={month_ago}&date_to={today}"
            )
        pages.append((name, url))
    if export:
        pages.append(("usage CSV export, all rows (streamed)", "/admin/usage/usagelog/export.csv"))

    print(f"{'page':42} {'median ms':>10} {'queries':>8}")
    for name, url in pages:
        timings = []
        runs = 1 if "export" in url else repeat
        for _ in range(runs):
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(url)
                if response.streaming:
                    size = sum(len(chunk) for chunk in response.streaming_content)
                else:
                    size = len(response.content)
                timings.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                sys.exit(f"{url}: HTTP {response.status_code}")
        extra = f"  ({size / 1e6:.0f} MB)" if "export" in url else ""
        print(f"{name:42} {statistics.median(timings):10.0f} {len(queries):8d}{extra}")


if __name__ == "__main__":
    main()
