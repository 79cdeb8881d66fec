"""user_period_reset: an operator's "reset the budget period now" (docs/SPEC.md §3.6)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine

from budgets import selectors
from budgets.exceptions import UnknownUser
from budgets.models import DEFAULT_ORGANIZATION_ID, BudgetResetLog, GatewayUser, Hold, Organization
from budgets.rules import Scopes
from budgets.services import holds, periods
from tests.admin.conftest import charge, open_hold
from tests.factories import make_budget, make_ceiling, make_user
from usage import ledger

pytestmark = [pytest.mark.django_db, pytest.mark.calendar]
START = datetime(2025, 1, 20, 8, 0, tzinfo=UTC)
LATER = datetime(2025, 1, 23, 17, 45, tzinfo=UTC)


@pytest.mark.parametrize(
    ("budget_kwargs", "next_reset"),
    [
        ({"reset_alignment": "calendar_month"}, datetime(2025, 2, 1, tzinfo=UTC)),
        ({"reset_alignment": "calendar_week"}, datetime(2025, 1, 27, tzinfo=UTC)),
        ({"budget_duration_sec": 7 * 86400}, LATER + timedelta(days=7)),
        ({}, None),
    ],
)
def test_reset_starts_a_fresh_window_now_and_keeps_reserved(budget_kwargs, next_reset):
    with time_machine.travel(START, tick=False):
        user = make_user(budget=make_budget(max_budget_usd=Decimal("10"), **budget_kwargs))
    charge(user, "4.25", at=START + timedelta(hours=1))
    hold = open_hold(user, "0.75", at=LATER - timedelta(seconds=5))

    log = periods.user_period_reset(user_id=user.pk, now=LATER)

    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd, user.lifetime_spend_usd) == (
        0,
        Decimal("0.75"),
        Decimal("4.25"),
    )
    assert (user.budget_started_at, user.next_budget_reset_at) == (LATER, next_reset)
    assert (log.previous_spend_usd, log.reset_at, log.next_reset_at, log.budget_id) == (
        Decimal("4.25"),
        LATER,
        next_reset,
        user.budget_id,
    )
    assert Hold.objects.get(pk=hold.pk).status == Hold.Status.OPEN


def test_an_open_hold_settles_into_the_new_window():
    user = make_user(budget=make_budget(max_budget_usd=Decimal("10"), budget_duration_sec=3600))
    charge(user, "2")
    hold = open_hold(user, "1")
    periods.user_period_reset(user_id=user.pk)
    holds.hold_settle(
        record=ledger.UsageRecord(
            request_id=hold.pk,
            user_id=user.pk,
            api_key_id=None,
            endpoint="/v1/chat/completions",
            provider="openai",
            model="gpt-4o-mini",
            status="success",
            status_code=200,
            cost_usd=Decimal("0.8"),
        ),
        now=datetime.now(UTC),
    )
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (Decimal("0.8"), 0)


# The reset's fixed instant precedes the charge at the later calendar instants: time runs
# backwards for this user, so its books cannot balance afterwards (what the test checks is
# the reset log).
@pytest.mark.books_unbalanced
def test_a_user_without_a_budget_can_be_reset():
    user = make_user()
    charge(user, "1")
    log = periods.user_period_reset(user_id=user.pk, now=LATER)
    assert (log.previous_spend_usd, log.next_reset_at, log.budget_id) == (Decimal("1"), None, None)
    assert GatewayUser.objects.get(pk=user.pk).spend_usd == 0


# The reset's fixed instant precedes the charge at the later calendar instants: time runs
# backwards for this user, so its books cannot balance afterwards (what the test checks is
# the reset log).
@pytest.mark.books_unbalanced
def test_a_second_reset_at_the_same_instant_is_a_no_op():
    user = make_user(budget=make_budget(max_budget_usd=Decimal("10"), budget_duration_sec=60))
    charge(user, "1")
    first = periods.user_period_reset(user_id=user.pk, now=LATER)
    second = periods.user_period_reset(user_id=user.pk, now=LATER)
    assert first.pk == second.pk
    assert BudgetResetLog.objects.filter(user=user).count() == 1


def test_unknown_user():
    with pytest.raises(UnknownUser):
        periods.user_period_reset(user_id="nobody")


def test_a_reset_whose_instant_precedes_a_charge_it_zeroes_starts_after_that_charge():
    """The console reads `now` before the user's lock: a request that settles in between
    is stamped after `now`, and its cost is part of the spend the reset moves to the log.
    The new window must start after it, or the charge counts in both windows (the
    deadlock drill found spend 0 with usage in the window)."""
    user = make_user(budget=make_budget(max_budget_usd=Decimal("10"), budget_duration_sec=3600))
    requested = datetime.now(UTC)
    charged = charge(user, "1.5", at=requested + timedelta(milliseconds=3))

    log = periods.user_period_reset(user_id=user.pk, now=requested)

    user.refresh_from_db()
    assert log.previous_spend_usd == Decimal("1.5")
    assert user.spend_usd == 0
    assert user.budget_started_at > charged.timestamp
    assert log.reset_at == user.budget_started_at


def test_a_ceiling_reset_whose_instant_precedes_a_charge_it_zeroes_starts_after_that_charge():
    """The same race on a ceiling's "reset period now": its window must start after the
    charge the reset moves to the log, or the audit finds spend 0 with usage in it."""
    budget = make_budget(max_budget_usd=Decimal("10"), budget_duration_sec=3600)
    organization = Organization.objects.get(pk=DEFAULT_ORGANIZATION_ID)
    ceiling = make_ceiling(organization, budget)
    user = make_user()
    requested = datetime.now(UTC)
    request_id = uuid.uuid4()
    scopes = Scopes(str(DEFAULT_ORGANIZATION_ID), None, None)
    holds.hold_open(
        user_id=user.pk,
        request_id=request_id,
        amount_usd=Decimal("2"),
        model_key="openai:gpt-4o-mini",
        now=requested,
        scopes=scopes,
    )
    charged_at = requested + timedelta(milliseconds=3)
    holds.hold_settle(record=_settled(user, request_id, "1.5"), now=charged_at)

    log = periods.ceiling_period_reset(ceiling_id=ceiling.pk, now=requested)

    ceiling.refresh_from_db()
    assert log.previous_spend_usd == Decimal("1.5")
    assert ceiling.spend_usd == 0
    assert ceiling.budget_started_at > charged_at
    (book,) = selectors.books_for_ceilings(ceiling_id=ceiling.pk)
    assert book.balanced, book


def _settled(user: GatewayUser, request_id: uuid.UUID, cost: str) -> ledger.UsageRecord:
    return ledger.UsageRecord(
        request_id=request_id,
        user_id=user.pk,
        api_key_id=None,
        endpoint="/v1/chat/completions",
        provider="openai",
        model="gpt-4o-mini",
        status="success",
        status_code=200,
        cost_usd=Decimal(cost),
    )
