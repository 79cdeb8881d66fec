"""Budget periods (docs/SPEC.md §3.6): the period arithmetic, and `manage.py reset_budgets`
over frozen clocks: twelve consecutive periods of each kind with no drift, month ends and
leap years, resets while holds are open, and racing resets."""

from __future__ import annotations

import dataclasses
import itertools
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from budgets import periods
from budgets.models import BudgetResetLog, GatewayUser, Hold
from budgets.selectors import books_drift_list
from budgets.services import holds
from budgets.services import periods as period_services
from tests.budgets.ledger import assert_books_balance, charge, open_hold
from tests.conftest import REPO, database_url
from tests.factories import make_budget, make_user

pytestmark = pytest.mark.calendar

# A Wednesday, the last day of January of a leap year, mid-afternoon.
T0 = datetime(2024, 1, 31, 15, 30, 7, tzinfo=UTC)
ODD_DURATION = timedelta(days=3, hours=1, seconds=1)


def reset_budgets(*args: str) -> str:
    out = StringIO()
    call_command("reset_budgets", *args, stdout=out)
    return out.getvalue()


# --- the arithmetic ------------------------------------------------------------------------


def _midnight(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def expected_windows(kind: str, start: datetime, count: int) -> list[tuple[datetime, datetime]]:
    """The windows after the first, computed independently of budgets.periods."""
    if kind == "rolling":
        bounds = [start + k * ODD_DURATION for k in range(1, count + 2)]
    elif kind == "calendar_day":
        first = _midnight(start) + timedelta(days=1)
        bounds = [first + timedelta(days=k) for k in range(count + 1)]
    elif kind == "calendar_week":
        first = _midnight(start) + timedelta(days=7 - start.weekday())
        bounds = [first + timedelta(weeks=k) for k in range(count + 1)]
    else:
        month_index = start.year * 12 + start.month  # the month after `start`, 0-based
        bounds = [
            datetime((month_index + k) // 12, (month_index + k) % 12 + 1, 1, tzinfo=UTC)
            for k in range(count + 1)
        ]
    return list(itertools.pairwise(bounds))


def test_a_month_that_starts_on_the_31st_ends_on_the_1st_of_the_next():
    assert periods.fresh_window(T0, duration_sec=None, alignment="calendar_month") == (
        T0,
        datetime(2024, 2, 1, tzinfo=UTC),
    )
    # February of a leap year has 29 days; of a common year, 28.
    assert periods.window_after(
        datetime(2024, 2, 1, tzinfo=UTC),
        datetime(2024, 2, 29, 23, 59, tzinfo=UTC),
        duration_sec=None,
        alignment="calendar_month",
    ) == (datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC))
    assert periods.window_after(
        datetime(2023, 3, 1, tzinfo=UTC),
        datetime(2023, 3, 1, tzinfo=UTC),
        duration_sec=None,
        alignment="calendar_month",
    ) == (datetime(2023, 3, 1, tzinfo=UTC), datetime(2023, 4, 1, tzinfo=UTC))
    # December rolls into January of the next year.
    assert periods.fresh_window(
        datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC),
        duration_sec=None,
        alignment="calendar_month",
    )[1] == datetime(2025, 1, 1, tzinfo=UTC)


def test_calendar_days_cross_the_leap_day():
    start = datetime(2024, 2, 28, 12, tzinfo=UTC)
    _, due = periods.fresh_window(start, duration_sec=None, alignment="calendar_day")
    assert due == datetime(2024, 2, 29, tzinfo=UTC)
    assert periods.window_after(due, due, duration_sec=None, alignment="calendar_day") == (
        datetime(2024, 2, 29, tzinfo=UTC),
        datetime(2024, 3, 1, tzinfo=UTC),
    )


def test_calendar_weeks_start_on_monday():
    # Sunday 2024-03-03 23:59 belongs to the week that began on Monday 2024-02-26.
    sunday = datetime(2024, 3, 3, 23, 59, tzinfo=UTC)
    assert periods.fresh_window(sunday, duration_sec=None, alignment="calendar_week")[1] == (
        datetime(2024, 3, 4, tzinfo=UTC)
    )
    monday = datetime(2024, 3, 4, tzinfo=UTC)
    assert periods.window_after(monday, monday, duration_sec=None, alignment="calendar_week") == (
        monday,
        datetime(2024, 3, 11, tzinfo=UTC),
    )


def test_boundaries_are_utc_whatever_the_zone_of_the_clock():
    # 01:30 on March 1st in UTC+2 is still February 29th in UTC.
    moment = datetime(2024, 3, 1, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert periods.fresh_window(moment, duration_sec=None, alignment="calendar_month")[1] == (
        datetime(2024, 3, 1, tzinfo=UTC)
    )
    assert periods.fresh_window(moment, duration_sec=None, alignment="calendar_day")[1] == (
        datetime(2024, 3, 1, tzinfo=UTC)
    )


def test_a_late_rolling_roll_stays_on_the_original_grid():
    start, due = periods.fresh_window(T0, duration_sec=3600, alignment=None)
    # Five and a half periods late: the window is the one that contains now.
    now = due + timedelta(hours=4, minutes=30)
    assert periods.window_after(due, now, duration_sec=3600, alignment=None) == (
        T0 + timedelta(hours=5),
        T0 + timedelta(hours=6),
    )
    assert start == T0


# --- reset_budgets over twelve periods ----------------------------------------------------


@pytest.mark.parametrize("kind", ["rolling", "calendar_day", "calendar_week", "calendar_month"])
def test_twelve_consecutive_periods_roll_on_schedule_without_drift(db, time_machine, kind):
    time_machine.move_to(T0, tick=False)
    period = (
        {"budget_duration_sec": int(ODD_DURATION.total_seconds())}
        if kind == "rolling"
        else {"reset_alignment": kind}
    )
    user = make_user(budget=make_budget(max_budget_usd=Decimal("100"), **period))
    charge(user.pk, Decimal("1.000001"), T0)
    windows = expected_windows(kind, T0, 12)
    first_due = windows[0][0]
    assert GatewayUser.objects.get(pk=user.pk).next_budget_reset_at == first_due

    for k, (start, next_reset) in enumerate(windows, start=1):
        # The roll runs late by a different amount each time (up to ~20 minutes): the
        # schedule must not move with it.
        late = timedelta(minutes=k * 1.7, microseconds=k)
        time_machine.move_to(start - timedelta(microseconds=1), tick=False)
        assert "rolled 0 user(s)" in reset_budgets()  # not yet due
        time_machine.move_to(start + late, tick=False)
        closed = (Decimal("1.000001") * k).normalize()
        assert f"rolled 1 user(s) (closing ${closed:f} of spend)" in reset_budgets()

        user.refresh_from_db()
        assert (user.budget_started_at, user.next_budget_reset_at) == (start, next_reset)
        assert (user.spend_usd, user.reserved_usd) == (0, 0)
        log = BudgetResetLog.objects.get(user=user, reset_at=start)
        assert log.next_reset_at == next_reset
        assert log.previous_spend_usd == Decimal("1.000001") * k
        # Running it again at the same instant changes nothing (idempotent).
        assert "rolled 0 user(s)" in reset_budgets()
        charge(user.pk, Decimal("1.000001") * (k + 1), start + late)
        assert_books_balance(user.pk)

    # Twelve windows began, one each, plus none twice.
    assert BudgetResetLog.objects.filter(user=user).count() == 12


def test_a_late_reset_catches_up_on_the_original_grid(db, time_machine):
    time_machine.move_to(T0, tick=False)
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5"), budget_duration_sec=3600))
    charge(user.pk, Decimal("2"), T0)
    time_machine.move_to(T0 + timedelta(hours=5, minutes=30), tick=False)

    assert "rolled 1 user(s) (closing $2" in reset_budgets()
    user.refresh_from_db()
    assert user.budget_started_at == T0 + timedelta(hours=5)
    assert user.next_budget_reset_at == T0 + timedelta(hours=6)
    # One roll for the missed periods: the spend they closed is in one log row.
    assert BudgetResetLog.objects.filter(user=user).count() == 1


def test_now_option_rolls_as_of_the_given_instant(db, time_machine):
    time_machine.move_to(T0, tick=False)
    user = make_user(
        budget=make_budget(max_budget_usd=Decimal("5"), reset_alignment="calendar_day")
    )
    charge(user.pk, Decimal("1"), T0)

    time_machine.move_to(datetime(2024, 2, 5, tzinfo=UTC), tick=False)
    assert "rolled 0 user(s)" in reset_budgets("--now", "2024-01-31T23:59:59Z")
    # A naive instant is UTC.
    assert "rolled 1 user(s)" in reset_budgets("--now", "2024-02-03T08:00:00")
    user.refresh_from_db()
    assert user.budget_started_at == datetime(2024, 2, 3, tzinfo=UTC)
    assert user.next_budget_reset_at == datetime(2024, 2, 4, tzinfo=UTC)


def test_now_in_the_future_only_previews(db, time_machine):
    time_machine.move_to(T0, tick=False)
    user = make_user(
        budget=make_budget(max_budget_usd=Decimal("5"), reset_alignment="calendar_day")
    )
    charge(user.pk, Decimal("1"), T0)

    with pytest.raises(CommandError, match="only allowed with --dry-run"):
        reset_budgets("--now", "2024-02-01T00:00:01Z")
    assert "(dry run): 1 user(s) due" in reset_budgets("--now", "2024-02-01T00:00:01Z", "--dry-run")
    user.refresh_from_db()
    assert (user.spend_usd, user.budget_started_at) == (1, T0)


def test_never_zeroes_a_window_that_has_not_ended(db, time_machine):
    time_machine.move_to(T0, tick=False)
    fresh = make_user(budget=make_budget(max_budget_usd=Decimal("5"), budget_duration_sec=60))
    monthly = make_user(
        budget=make_budget(max_budget_usd=Decimal("5"), reset_alignment="calendar_month")
    )
    no_period = make_user(budget=make_budget(max_budget_usd=Decimal("5")))
    for user in (fresh, monthly, no_period):
        charge(user.pk, Decimal("0.5"), T0)
        open_hold(user.pk, Decimal("0.25"), T0)

    assert "rolled 0 user(s)" in reset_budgets()
    time_machine.move_to(T0 + timedelta(seconds=59), tick=False)
    assert "rolled 0 user(s)" in reset_budgets()
    # Ten years later, the budget with no period has still never reset.
    time_machine.move_to(T0 + timedelta(days=3650), tick=False)
    assert "rolled 2 user(s)" in reset_budgets()
    for user in (fresh, monthly, no_period):
        user.refresh_from_db()
        # `reserved` is never touched by a reset.
        assert user.reserved_usd == Decimal("0.25")
    assert (fresh.spend_usd, monthly.spend_usd, no_period.spend_usd) == (0, 0, Decimal("0.5"))
    assert not BudgetResetLog.objects.filter(user=no_period).exclude(previous_spend_usd=0).exists()
    assert no_period.next_budget_reset_at is None


def test_dry_run_and_filters(db, time_machine):
    time_machine.move_to(T0, tick=False)
    daily = make_budget(max_budget_usd=Decimal("5"), reset_alignment="calendar_day")
    alice, bob = make_user(budget=daily, user_id="alice"), make_user(budget=daily, user_id="bob")
    carol = make_user(
        budget=make_budget(max_budget_usd=Decimal("5"), reset_alignment="calendar_day"),
        user_id="carol",
    )
    for user in (alice, bob, carol):
        charge(user.pk, Decimal("1"), T0)
    time_machine.move_to(T0 + timedelta(days=1), tick=False)

    out = StringIO()
    call_command("reset_budgets", "--dry-run", verbosity=2, stdout=out)
    assert "(dry run): 3 user(s) due" in out.getvalue()
    assert "alice: due" in out.getvalue()
    assert not BudgetResetLog.objects.exclude(previous_spend_usd=0).exists()
    assert GatewayUser.objects.get(pk="alice").spend_usd == 1

    assert "rolled 1 user(s)" in reset_budgets("--user", "alice")
    assert "rolled 1 user(s)" in reset_budgets("--budget", daily.pk)  # bob; alice is done
    assert GatewayUser.objects.get(pk="carol").spend_usd == 1
    assert "rolled 1 user(s)" in reset_budgets()

    with pytest.raises(CommandError, match="no user"):
        reset_budgets("--user", "nobody")
    with pytest.raises(CommandError, match="no budget"):
        reset_budgets("--budget", "nope")


def test_a_period_removed_from_a_budget_stops_its_resets(db, time_machine):
    time_machine.move_to(T0, tick=False)
    budget = make_budget(max_budget_usd=Decimal("5"), budget_duration_sec=60)
    user = make_user(budget=budget)
    charge(user.pk, Decimal("1"), T0)
    # The period is removed behind the service's back (as if by an older release).
    type(budget).objects.filter(pk=budget.pk).update(budget_duration_sec=None)
    time_machine.move_to(T0 + timedelta(minutes=5), tick=False)

    assert "rolled 0 user(s) (closing $0 of spend), 0 busy, 0 rolled elsewhere, 1 without" in (
        reset_budgets()
    )
    user.refresh_from_db()
    assert (user.spend_usd, user.next_budget_reset_at) == (1, None)


# --- resets and open holds ------------------------------------------------------------------


def test_holds_open_across_a_reset_settle_into_the_new_period(db, time_machine):
    time_machine.move_to(T0, tick=False)
    user = make_user(budget=make_budget(max_budget_usd=Decimal("10"), budget_duration_sec=3600))
    charge(user.pk, Decimal("3"), T0)
    first = open_hold(user.pk, Decimal("2"), T0 + timedelta(minutes=59))
    second = open_hold(user.pk, Decimal("1.5"), T0 + timedelta(minutes=59))

    time_machine.move_to(T0 + timedelta(hours=1, seconds=1), tick=False)
    assert "rolled 1 user(s) (closing $3 of spend)" in reset_budgets()
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (0, Decimal("3.5"))
    assert Hold.objects.filter(user=user, status=Hold.Status.OPEN).count() == 2
    assert_books_balance(user.pk)

    # They finish in the new period and are charged there, at their actual cost.
    now = T0 + timedelta(hours=1, minutes=2)
    holds.hold_settle(record=first, now=now)
    holds.hold_refund(
        record=dataclasses.replace(second, status="error", status_code=502, cost_usd=None), now=now
    )
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (Decimal("2"), 0)
    assert user.lifetime_spend_usd == Decimal("5")
    assert_books_balance(user.pk)
    assert books_drift_list() == []


@pytest.mark.postgres
def test_a_stream_open_across_a_reset_is_charged_in_the_new_period(gateway, time_machine):
    """Through HTTP: the stream's hold is open when reset_budgets rolls the period."""
    from tests.factories import make_key, priced

    time_machine.move_to(T0, tick=True)
    user = make_user(budget=make_budget(max_budget_usd=Decimal("10"), budget_duration_sec=3600))
    first_window = user.budget_started_at
    _, secret = make_key(user)
    model = priced("gpt-4o-mini-chunks-6-delay-100")
    with (
        gateway.client(secret) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        ) as response,
    ):
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert Hold.objects.get().status == Hold.Status.OPEN
        time_machine.shift(timedelta(hours=1))
        assert "rolled 1 user(s) (closing $0 of spend)" in reset_budgets()
        user.refresh_from_db()
        held = Hold.objects.get().amount_usd
        assert (user.spend_usd, user.reserved_usd) == (0, held)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"

    user.refresh_from_db()
    hold = Hold.objects.get()
    assert hold.status == Hold.Status.SETTLED
    assert user.reserved_usd == 0
    assert user.spend_usd > 0
    usage = user.usage_logs.get()
    assert usage.cost_usd == user.spend_usd
    assert usage.timestamp >= user.budget_started_at == first_window + timedelta(hours=1)
    assert_books_balance(user.pk)


# --- racing resets --------------------------------------------------------------------------


@pytest.mark.postgres
def test_threads_racing_to_roll_one_user_write_one_reset_log(transactional_db, time_machine):
    time_machine.move_to(T0, tick=False)
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5"), budget_duration_sec=60))
    charge(user.pk, Decimal("1"), T0)
    now = T0 + timedelta(minutes=3)
    barrier = threading.Barrier(8)
    results: list[object] = []

    def roll() -> None:
        from django.db import connection

        barrier.wait()
        try:
            results.append(period_services.user_period_roll(user_id=user.pk, now=now))
        finally:
            connection.close()

    threads = [threading.Thread(target=roll) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(results) == 8
    assert sum(result is not None for result in results) == 1
    log = BudgetResetLog.objects.get(user=user, previous_spend_usd=1)
    assert log.reset_at == T0 + timedelta(minutes=3)


@pytest.mark.postgres
@pytest.mark.slow
def test_two_reset_processes_racing_roll_each_window_once(transactional_db):
    """Two `manage.py reset_budgets` processes on the same 2000 due users, at once."""
    now = datetime.now(UTC)
    users = 2000
    budget = make_budget(max_budget_usd=Decimal("50"), budget_duration_sec=60)
    # Rows as user_create + a settled request would leave them, a window that has ended
    # (written in bulk: creating 2000 users one by one would take most of the test).
    GatewayUser.objects.bulk_create(
        GatewayUser(
            user_id=f"racer-{i:05}",
            budget=budget,
            spend_usd=Decimal("0.25"),
            budget_started_at=now - timedelta(seconds=90),
            next_budget_reset_at=now - timedelta(seconds=30),
        )
        for i in range(users)
    )
    env = {**os.environ, "DATABASE_URL": database_url(), "DJANGO_SETTINGS_MODULE": "otari.settings"}
    command = [sys.executable, "manage.py", "reset_budgets", "--now", now.isoformat()]
    racers = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [racer.communicate(timeout=120)[0] for racer in racers]

    assert [racer.returncode for racer in racers] == [0, 0]
    rolled = [int(out.split("rolled ")[1].split(" ")[0]) for out in outputs]
    # Every due window rolled exactly once between the two, and both did real work at
    # the same time (each skipped rows the other held, and rolled others).
    assert sum(rolled) == users, outputs
    assert min(rolled) > 0, outputs
    assert BudgetResetLog.objects.filter(user__budget=budget).count() == users
    assert not GatewayUser.objects.filter(budget=budget).exclude(spend_usd=0).exists()
    assert (
        GatewayUser.objects.filter(
            budget=budget, budget_started_at=now - timedelta(seconds=30)
        ).count()
        == users
    )
