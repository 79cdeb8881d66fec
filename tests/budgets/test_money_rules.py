"""Every spelling of every money rule agrees, on PostgreSQL, for generated inputs.

The rules (budgets/rules.py, the current price in usage/selectors.py) are written in
Python, as Django expressions and as SQL; the statements that move money
(budgets/services/holds.py) in SQL and in their ORM spelling (SQLite's). Here each
spelling is evaluated against the same rows and the answers must be equal: a drift
between two copies of a rule is a failing example, shrunk to the smallest one.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection, transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgets import rules
from budgets.models import APIKey, Budget, Ceiling, GatewayUser, Hold, HoldCeiling
from budgets.services import holds
from usage import ledger
from usage.models import ModelPricing, UsageLog
from usage.pricing import TokenUsage
from usage.selectors import price_at, price_at_sql, price_current_effective_at

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
EXAMPLES = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

money = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
# Around `NOW`, with the boundary itself likely: the rules differ exactly there.
offsets = st.one_of(st.none(), st.sampled_from([-1, 0, 1]), st.integers(-86_400, 86_400))


def _at(offset: int | None) -> datetime | None:
    return None if offset is None else NOW + timedelta(seconds=offset)


class _Rollback(Exception):
    """Ends an example: its rows are rolled back with its savepoint."""


def _in_savepoint(check) -> None:
    try:
        with transaction.atomic():
            check()
            raise _Rollback
    except _Rollback:
        pass


def _sql_row(sql: str, params: dict[str, Any]) -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        names = [c.name for c in cursor.description]
        return dict(zip(names, cursor.fetchone(), strict=True))


users = st.fixed_dictionaries(
    {
        "max_budget_usd": st.one_of(st.none(), money),
        "topup_usd": money,
        "topup_expires_at": offsets,
        "spend_usd": money,
        "reserved_usd": money,
        "next_budget_reset_at": offsets,
        "deleted_at": offsets,
        "blocked": st.booleans(),
        "has_budget": st.booleans(),
        "alert_thresholds_pct": st.sampled_from([[], [80], [50, 100]]),
        "alert_webhook_url": st.sampled_from(["", "https://hooks.example/a"]),
        "alert_emails": st.sampled_from([[], ["ops@example.com"]]),
    }
)


def _make_user(spec: dict[str, Any]) -> GatewayUser:
    budget = None
    if spec["has_budget"]:
        budget = Budget.objects.create(
            name="rules",
            max_budget_usd=spec["max_budget_usd"],
            alert_thresholds_pct=spec["alert_thresholds_pct"],
            alert_webhook_url=spec["alert_webhook_url"],
            alert_emails=spec["alert_emails"],
        )
    return GatewayUser.objects.create(
        user_id=f"rules-{uuid.uuid4().hex[:12]}",
        budget=budget,
        spend_usd=spec["spend_usd"],
        reserved_usd=spec["reserved_usd"],
        topup_usd=spec["topup_usd"] if spec["topup_expires_at"] is not None else Decimal(0),
        topup_expires_at=_at(spec["topup_expires_at"]),
        next_budget_reset_at=_at(spec["next_budget_reset_at"]),
        deleted_at=_at(spec["deleted_at"]),
        blocked=spec["blocked"],
    )


@EXAMPLES
@given(spec=users, amount=money)
def test_the_user_rules_agree_in_python_django_and_sql(spec, amount):
    def check() -> None:
        user = _make_user(spec)
        budget = user.budget
        limit = rules.limit_usd(
            budget.max_budget_usd if budget else None,
            user.topup_usd,
            user.topup_expires_at,
            NOW,
        )
        python = {
            "limit": limit,
            "admits": rules.admits(user.spend_usd, user.reserved_usd, amount, limit),
            "period_current": rules.period_current(user.next_budget_reset_at, NOW),
            "billable": rules.billable(user.deleted_at, user.blocked),
            "alerts_enabled": budget.alerts_enabled if budget else None,
        }
        row = GatewayUser.objects.filter(pk=user.pk)
        django = {
            "limit": row.annotate(limit=rules.limit_expression(NOW)).values_list(
                "limit", flat=True
            )[0],
            "admits": row.filter(rules.admits_q(amount, limit)).exists(),
            "period_current": row.filter(rules.period_current_q(NOW)).exists(),
            "billable": row.filter(rules.billable_q()).exists(),
            "alerts_enabled": (
                row.filter(rules.alerts_enabled_q("budget__")).exists() if budget else None
            ),
        }
        sql = _sql_row(
            f"""SELECT {rules.LIMIT_SQL} AS limit, {rules.ADMITS_SQL} AS admits,
                       {rules.PERIOD_CURRENT_SQL} AS period_current,
                       {rules.BILLABLE_SQL} AS billable,
                       {rules.ALERTS_ENABLED_SQL} AS alerts_enabled
                FROM budgets_gatewayuser u
                LEFT JOIN budgets_budget b ON b.budget_id = u.budget_id
                WHERE u.user_id = %(user_id)s""",
            {"user_id": user.pk, "now": NOW, "amount": amount, "limit": limit},
        )
        assert python == django == sql

    _in_savepoint(check)


@EXAMPLES
@given(last_used=offsets)
def test_the_key_touch_rule_agrees_in_python_django_and_sql(last_used):
    def check() -> None:
        user = GatewayUser.objects.create(user_id=f"rules-{uuid.uuid4().hex[:12]}")
        key = APIKey.objects.create(
            user=user, key_hash=uuid.uuid4().hex, last_used_at=_at(last_used)
        )
        touch_before = NOW - timedelta(seconds=rules.KEY_TOUCH_INTERVAL_S)
        python = rules.key_touch_due(key.last_used_at, touch_before)
        django = APIKey.objects.filter(rules.key_touch_due_q(touch_before), pk=key.pk).exists()
        sql = _sql_row(
            f"SELECT {rules.KEY_TOUCH_DUE_SQL} AS due FROM budgets_apikey WHERE id = %(id)s",
            {"id": key.pk, "touch_before": touch_before},
        )["due"]
        assert python == django == sql

    _in_savepoint(check)


@EXAMPLES
@given(versions=st.lists(st.integers(-3_600, 3_600), unique=True, max_size=5))
def test_the_current_price_agrees_in_django_sql_and_the_console(versions):
    def check() -> None:
        model_key = f"openai:rules-{uuid.uuid4().hex[:8]}"
        for offset in versions:
            ModelPricing.objects.create(
                model_key=model_key,
                effective_at=NOW + timedelta(seconds=offset),
                input_price_per_mtok_usd=Decimal(offset + 4000),
                output_price_per_mtok_usd=Decimal(1),
            )
        python = price_at(model_key, NOW)
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT id FROM ({price_at_sql()}) p", {"model_key": model_key, "now": NOW}
            )
            sql = cursor.fetchone()
        console = set(
            ModelPricing.objects.filter(
                model_key=model_key, effective_at=price_current_effective_at(NOW)
            ).values_list("pk", flat=True)
        )
        expected = max((o for o in versions if o <= 0), default=None)
        assert (python.pk if python else None) == (sql[0] if sql else None)
        assert console == ({python.pk} if python else set())
        assert (python.effective_at if python else None) == _at(expected)

    _in_savepoint(check)


# ---------------------------------------------------------------------------------------
# The statements: the SQL and the ORM spelling, run from twin rows, leave twin results.
# Each twin may answer to a ceiling of its own (on its key's scope), generated like a user.

ceilings = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "max_budget_usd": st.one_of(st.none(), money),
            "topup_usd": money,
            "topup_expires_at": offsets,
            "spend_usd": money,
            "reserved_usd": money,
            "next_budget_reset_at": offsets,
            "budget_started_at": offsets,
            "provider": st.sampled_from(["", "openai", "anthropic"]),
        }
    ),
)


def _make_ceiling(spec: dict[str, Any] | None) -> Ceiling | None:
    if spec is None:
        return None
    return Ceiling.objects.create(
        scope_type="api_token",
        scope_id=str(uuid.uuid4()),
        provider=spec["provider"],
        budget=Budget.objects.create(name="ceiling", max_budget_usd=spec["max_budget_usd"]),
        spend_usd=spec["spend_usd"],
        reserved_usd=spec["reserved_usd"],
        topup_usd=spec["topup_usd"] if spec["topup_expires_at"] is not None else Decimal(0),
        topup_expires_at=_at(spec["topup_expires_at"]),
        next_budget_reset_at=_at(spec["next_budget_reset_at"]),
        budget_started_at=_at(spec["budget_started_at"]),
    )


def _scopes(ceiling: Ceiling | None) -> dict[str, Any]:
    scopes = rules.Scopes(None, None, ceiling.scope_id if ceiling else None)
    return scopes.params("openai")


def _twins(spec: dict[str, Any]) -> tuple[GatewayUser, GatewayUser]:
    return _make_user(spec), _make_user(spec)


def _ceiling_state(ceiling: Ceiling | None) -> dict[str, Any] | None:
    if ceiling is None:
        return None
    ceiling.refresh_from_db()
    return {
        "spend_usd": ceiling.spend_usd,
        "reserved_usd": ceiling.reserved_usd,
        "lifetime_spend_usd": ceiling.lifetime_spend_usd,
        "holds": sorted(
            (link.hold.status, link.hold.amount_usd) for link in ceiling.hold_links.all()
        ),
    }


def _state(user_id: str) -> dict[str, Any]:
    user = GatewayUser.objects.get(pk=user_id)
    return {
        "spend_usd": user.spend_usd,
        "reserved_usd": user.reserved_usd,
        "lifetime_spend_usd": user.lifetime_spend_usd,
        "holds": sorted((h.status, h.amount_usd) for h in Hold.objects.filter(user_id=user_id)),
        "usage": sorted(
            (u.status, u.cost_usd, u.timestamp, u.prompt_tokens)
            for u in UsageLog.objects.filter(user_id=user_id)
        ),
    }


def _run_both(statement: holds.Statement, params_of, record_of=None) -> tuple[Any, Any]:
    """Run `statement` as SQL for the first twin and as ORM for the second."""
    sql_params, orm_params = params_of(0), params_of(1)
    with connection.cursor() as cursor:
        cursor.execute(statement.sql, sql_params)
        row = cursor.fetchone()
        sql = dict(zip([c.name for c in cursor.description], row, strict=True)) if row else None
    orm = statement.orm(orm_params, record_of(1) if record_of else None)
    return sql, orm


@EXAMPLES
@given(spec=users, amount=money, ceiling=ceilings)
def test_admit_does_the_same_in_sql_and_in_its_orm_spelling(spec, amount, ceiling):
    def check() -> None:
        twins = _twins(spec)
        twin_ceilings = _make_ceiling(ceiling), _make_ceiling(ceiling)
        limit = holds.BudgetState.of(twins[0], NOW).limit_usd

        def params(i: int) -> dict[str, Any]:
            return {
                **_scopes(twin_ceilings[i]),
                "user_id": twins[i].pk,
                "request_id": uuid.uuid4(),
                "amount": amount,
                "limit": limit,
                "model_key": "openai:gpt-4o-mini",
                "now": NOW,
                "expires_at": NOW + timedelta(minutes=5),
            }

        sql, orm = _run_both(holds.ADMIT, params)
        assert sql == orm
        assert _state(twins[0].pk) == _state(twins[1].pk)
        assert _ceiling_state(twin_ceilings[0]) == _ceiling_state(twin_ceilings[1])

    _in_savepoint(check)


closings = st.fixed_dictionaries(
    {
        "hold_usd": money,
        "hold_status": st.sampled_from(["open", "expired", "settled", "refunded"]),
        "from_status": st.sampled_from(["open", "expired"]),
        "cost_usd": st.one_of(st.none(), money),
        "counts": st.booleans(),
        "budget_started_at": offsets,
        "expires_at": offsets,
        "step": st.sampled_from(["settle", "refund", "record", "expire"]),
    }
)


@EXAMPLES
@given(spec=users, closing=closings, ceiling=ceilings)
def test_the_closing_statements_do_the_same_in_sql_and_in_their_orm_spelling(
    spec, closing, ceiling
):
    def check() -> None:
        twins = _twins(spec)
        twin_ceilings = _make_ceiling(ceiling), _make_ceiling(ceiling)
        request_ids = [uuid.uuid4(), uuid.uuid4()]
        for user, request_id, twin_ceiling in zip(twins, request_ids, twin_ceilings, strict=True):
            # The books balance before the step: an open hold is in `reserved`.
            GatewayUser.objects.filter(pk=user.pk).update(
                budget_started_at=_at(closing["budget_started_at"]),
                reserved_usd=user.reserved_usd
                + (closing["hold_usd"] if closing["hold_status"] == "open" else 0),
            )
            Hold.objects.create(
                request_id=request_id,
                user=user,
                amount_usd=closing["hold_usd"],
                status=closing["hold_status"],
                model_key="openai:gpt-4o-mini",
                created_at=NOW - timedelta(minutes=1),
                expires_at=_at(closing["expires_at"]) or NOW,
            )
            if twin_ceiling is not None:
                # Balanced as the user is: an open hold is in the ceiling's `reserved`.
                HoldCeiling.objects.create(hold_id=request_id, ceiling=twin_ceiling)
                if closing["hold_status"] == "open":
                    Ceiling.objects.filter(pk=twin_ceiling.pk).update(
                        reserved_usd=twin_ceiling.reserved_usd + closing["hold_usd"]
                    )

        def record(i: int) -> ledger.UsageRecord:
            return ledger.UsageRecord(
                request_id=request_ids[i],
                user_id=twins[i].pk,
                api_key_id=None,
                endpoint="/v1/chat/completions",
                provider="openai",
                model="gpt-4o-mini",
                status="success",
                status_code=200,
                usage=TokenUsage(input_tokens=3, output_tokens=2),
                cost_usd=closing["cost_usd"],
                counts_toward_budget=closing["counts"],
            )

        def params(i: int) -> dict[str, Any]:
            if closing["step"] == "expire":
                return {"request_id": request_ids[i], "now": NOW}
            return holds._closing_params(record(i), NOW, from_status=closing["from_status"])

        statement = {
            "settle": holds.SETTLE,
            "refund": holds.REFUND,
            "record": holds.RECORD,
            "expire": holds.EXPIRE,
        }[closing["step"]]
        sql, orm = _run_both(statement, params, record)
        assert sql == orm
        assert _state(twins[0].pk) == _state(twins[1].pk)
        assert _ceiling_state(twin_ceilings[0]) == _ceiling_state(twin_ceilings[1])

    _in_savepoint(check)
