"""The budget service's hold lifecycle, on both the fast (one statement) and the general
(ORM, locked) path: same inputs, same books (docs/SPEC.md §3.3-§3.5)."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connections
from django.utils import timezone

from budgets import services
from budgets.exceptions import BudgetExceeded, UnknownUser, UserBlocked
from budgets.models import BudgetResetLog, GatewayUser, Hold
from common import pgpool
from tests.assertions import assert_books_balance
from tests.conftest import is_postgres, run_async
from tests.factories import make_budget, make_user
from usage.models import UsageLog
from usage.pricing import TokenUsage

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["fast", "general"])
def path(request, monkeypatch):
    """Run the async services on the one-statement path (PostgreSQL) or the ORM path."""
    if request.param == "fast":
        if not is_postgres():
            pytest.skip("the fast path is PostgreSQL's")
    else:
        monkeypatch.setattr(pgpool, "enabled", lambda: False)
    return request.param


def open_hold(user, amount: str, *, now=None, limit: str | None = "1") -> uuid.UUID:
    request_id = uuid.uuid4()
    run_async(
        services.hold_open_async(
            user_id=user.user_id,
            request_id=request_id,
            amount_usd=Decimal(amount),
            limit_usd=None if limit is None else Decimal(limit),
            model_key="openai:gpt-4o-mini",
            now=now or timezone.now(),
        )
    )
    return request_id


def record(user, request_id, cost: str | None, status="success") -> services.UsageRecord:
    return services.UsageRecord(
        request_id=request_id,
        user_id=user.user_id,
        api_key_id=None,
        endpoint="/v1/chat/completions",
        provider="openai",
        model="gpt-4o-mini",
        status=status,
        status_code=200,
        usage=TokenUsage(input_tokens=10, output_tokens=5),
        cost_usd=None if cost is None else Decimal(cost),
    )


def settle(user, request_id, cost: str, now=None):
    return run_async(
        services.hold_settle_async(record=record(user, request_id, cost), now=now or timezone.now())
    )


def refund(user, request_id):
    run_async(
        services.hold_refund_async(
            record=record(user, request_id, None, status="error"), now=timezone.now()
        )
    )


@pytest.fixture
def capped_user():
    return make_user(budget=make_budget(max_budget_usd=Decimal("1")))


def money(user) -> tuple[Decimal, Decimal]:
    user.refresh_from_db()
    return user.spend_usd, user.reserved_usd


def test_admission_takes_exactly_what_fits(path, capped_user):
    open_hold(capped_user, "0.6")
    with pytest.raises(BudgetExceeded):
        open_hold(capped_user, "0.400001")
    open_hold(capped_user, "0.4")
    assert money(capped_user) == (Decimal(0), Decimal("1"))
    # spend + reserved == limit: nothing more, not even a zero estimate.
    with pytest.raises(BudgetExceeded):
        open_hold(capped_user, "0")
    assert Hold.objects.filter(status="open").count() == 2
    assert_books_balance(capped_user)


def test_uncapped_user_is_held_but_never_refused(path):
    user = make_user()
    open_hold(user, "1000", limit=None)
    assert money(user) == (Decimal(0), Decimal(1000))


def test_blocked_and_deleted_users_are_refused(path, capped_user):
    services.user_update(user_id=capped_user.user_id, blocked=True)
    with pytest.raises(UserBlocked):
        open_hold(capped_user, "0.1")
    services.user_delete(user_id=capped_user.user_id)
    with pytest.raises(UnknownUser):
        open_hold(capped_user, "0.1")
    assert not Hold.objects.exists()


def test_settle_charges_once_and_releases(path, capped_user):
    request_id = open_hold(capped_user, "0.5")
    state = settle(capped_user, request_id, "0.123456")
    assert (state.spend_usd, state.reserved_usd, state.limit_usd) == (
        Decimal("0.123456"),
        Decimal(0),
        Decimal(1),
    )
    assert state.remaining_usd == Decimal("0.876544")
    # A second close of any kind is a no-op.
    assert settle(capped_user, request_id, "0.123456") is None
    refund(capped_user, request_id)
    assert money(capped_user) == (Decimal("0.123456"), Decimal(0))
    capped_user.refresh_from_db()
    assert capped_user.lifetime_spend_usd == Decimal("0.123456")
    assert Hold.objects.get().status == Hold.Status.SETTLED
    assert UsageLog.objects.get().status == "success"
    assert_books_balance(capped_user)


def test_refund_releases_without_charging(path, capped_user):
    request_id = open_hold(capped_user, "0.5")
    refund(capped_user, request_id)
    refund(capped_user, request_id)
    assert settle(capped_user, request_id, "0.2") is None
    assert money(capped_user) == (Decimal(0), Decimal(0))
    assert Hold.objects.get().status == Hold.Status.REFUNDED
    assert UsageLog.objects.get().status == "error"


def test_settle_after_the_sweeper_still_charges(path, capped_user):
    past = timezone.now() - timedelta(days=1)
    request_id = open_hold(capped_user, "0.5", now=past)
    assert services.holds_expire_stale() == 1
    assert money(capped_user) == (Decimal(0), Decimal(0))

    settle(capped_user, request_id, "0.2")

    # Charged, and the reservation the sweeper released is not released twice.
    assert money(capped_user) == (Decimal("0.2"), Decimal(0))
    assert Hold.objects.get().status == Hold.Status.SETTLED
    assert services.holds_expire_stale() == 0
    assert_books_balance(capped_user)


def test_settle_across_a_reset_counts_in_the_new_period(path):
    budget = make_budget(max_budget_usd=Decimal("1"), budget_duration_sec=3600)
    user = make_user(budget=budget)
    now = timezone.now()
    request_id = open_hold(user, "0.5", now=now)
    # The window ends while the request is running.
    GatewayUser.objects.filter(pk=user.pk).update(
        spend_usd=Decimal("0.3"), next_budget_reset_at=now + timedelta(seconds=1)
    )

    settle(user, request_id, "0.2", now=now + timedelta(seconds=2))

    log = BudgetResetLog.objects.get(reset_at=now + timedelta(seconds=1))
    assert log.previous_spend_usd == Decimal("0.3")
    assert money(user) == (Decimal("0.2"), Decimal(0))
    user.refresh_from_db()
    assert UsageLog.objects.get().timestamp >= user.budget_started_at
    assert_books_balance(user)


def test_admission_rolls_an_ended_period_first(path):
    budget = make_budget(max_budget_usd=Decimal("1"), budget_duration_sec=60)
    user = make_user(budget=budget)
    ended = timezone.now() - timedelta(seconds=130)
    GatewayUser.objects.filter(pk=user.pk).update(
        spend_usd=Decimal("1"),
        budget_started_at=ended - timedelta(seconds=60),
        next_budget_reset_at=ended,
    )
    open_hold(user, "0.9")
    user.refresh_from_db()
    # Two periods were missed; the window is the one containing now, on the schedule.
    assert user.budget_started_at == ended + timedelta(seconds=120)
    assert user.next_budget_reset_at == ended + timedelta(seconds=180)
    assert (user.spend_usd, user.reserved_usd) == (Decimal(0), Decimal("0.9"))
    assert BudgetResetLog.objects.count() == 1


@pytest.mark.postgres
def test_settle_and_sweeper_racing_close_the_hold_once(capped_user):
    """Many rounds of a settle and an expire of the same overdue hold, at once, from two
    threads (two database connections): the hold is closed once, the money moves once."""
    for _ in range(10):
        past = timezone.now() - timedelta(days=1)
        request_id = open_hold(capped_user, "0.01", now=past)
        barrier = threading.Barrier(2)

        def sweep(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            services.holds_expire_stale()
            connections.close_all()

        thread = threading.Thread(target=sweep)
        thread.start()
        barrier.wait()
        settle(capped_user, request_id, "0.001")
        thread.join()
    assert money(capped_user) == (Decimal("0.010"), Decimal(0))
    assert_books_balance(capped_user)
