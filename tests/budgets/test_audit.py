"""`manage.py audit_budgets` and `manage.py release_stale_holds` (docs/SPEC.md §3.5, §8)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from budgets.models import GatewayUser, Hold
from tests.budgets.ledger import assert_books_balance, charge, open_hold
from tests.factories import make_budget, make_user

T0 = datetime(2025, 3, 10, 9, 0, tzinfo=UTC)


def run(command: str, *args: str) -> str:
    out = StringIO()
    call_command(command, *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def books(db, time_machine):
    """Two users with balanced books: settled spend, an open hold, a reset in between."""
    time_machine.move_to(T0, tick=False)
    daily = make_budget(max_budget_usd=Decimal("20"), reset_alignment="calendar_day")
    alice = make_user(budget=daily, user_id="alice")
    bob = make_user(user_id="bob")  # no budget: every counted row is in his window
    charge("alice", Decimal("4.5"), T0)
    time_machine.move_to(T0 + timedelta(days=1, hours=1), tick=False)
    charge("alice", Decimal("1.25"), T0 + timedelta(days=1, hours=1))
    open_hold("alice", Decimal("0.75"), T0 + timedelta(days=1, hours=1))
    charge("bob", Decimal("2"), T0)
    charge("bob", Decimal("3"), T0 + timedelta(days=1))
    return alice, bob


def test_balanced_books_audit_clean(books):
    alice, _bob = books
    alice.refresh_from_db()
    # The spend before the reset is in the previous window, not in this one.
    assert (alice.spend_usd, alice.reserved_usd) == (Decimal("1.25"), Decimal("0.75"))
    assert (
        run("audit_budgets")
        == "audit_budgets: 0 user(s) and 0 ceiling(s) out of balance, 0 overdue hold(s)\n"
    )


def test_audit_finds_corrupted_books_and_fix_repairs_them(books, caplog):
    # Corruption behind the services' back (a bad hand edit, a bug).
    GatewayUser.objects.filter(pk="alice").update(reserved_usd=Decimal("9.999999"))
    GatewayUser.objects.filter(pk="bob").update(spend_usd=Decimal("0.000001"))

    with pytest.raises(CommandError) as refused:
        call_command("audit_budgets", stdout=(out := StringIO()))
    assert refused.value.returncode == 2
    assert out.getvalue().splitlines() == [
        "user alice: reserved $9.999999 != open holds $0.75",
        "user bob: spend $0.000001 != window usage $5",
        "audit_budgets: 2 user(s) and 0 ceiling(s) out of balance, 0 overdue hold(s)",
    ]
    # Only reads so far.
    assert GatewayUser.objects.get(pk="alice").reserved_usd == Decimal("9.999999")

    with caplog.at_level(logging.WARNING, logger="budgets.services"):
        out = run("audit_budgets", "--fix")
    assert "fixed user alice: reserved $9.999999 -> $0.75, spend $1.25 -> $1.25" in out
    assert "fixed user bob: reserved $0 -> $0, spend $0.000001 -> $5" in out
    assert out.endswith("fixed 2 account(s), expired 0 hold(s)\n")
    assert "audit repair of user alice: reserved 9.999999 -> 0.75, spend 1.25 -> 1.25" in (
        caplog.text
    )
    assert "audit repair of user bob: reserved 0 -> 0, spend 0.000001 -> 5" in caplog.text
    assert_books_balance("alice")
    assert_books_balance("bob")
    assert run("audit_budgets").startswith(
        "audit_budgets: 0 user(s) and 0 ceiling(s) out of balance"
    )


def test_audit_repairs_a_spend_that_missed_a_reset(books):
    # As if the window moved without spend being zeroed.
    GatewayUser.objects.filter(pk="alice").update(spend_usd=Decimal("5.75"))
    out = run("audit_budgets", "--fix")
    assert "fixed user alice: reserved $0.75 -> $0.75, spend $5.75 -> $1.25" in out
    assert GatewayUser.objects.get(pk="alice").spend_usd == Decimal("1.25")


def test_audit_counts_holds_overdue_by_a_sweep_interval_and_fix_expires_them(
    books, time_machine, settings
):
    settings.OTARI_BEAT_INTERVAL_SECONDS = 60
    hold = Hold.objects.get(status=Hold.Status.OPEN)
    # Past expiry, but within one sweep interval: not yet a violation.
    time_machine.move_to(hold.expires_at + timedelta(seconds=30), tick=False)
    assert "0 overdue hold(s)" in run("audit_budgets")
    time_machine.move_to(hold.expires_at + timedelta(seconds=61), tick=False)
    with pytest.raises(CommandError):
        call_command("audit_budgets", stdout=(out := StringIO()))
    assert "1 overdue hold(s)" in out.getvalue()

    assert "expired 1 hold(s)" in run("audit_budgets", "--fix")
    hold.refresh_from_db()
    assert hold.status == Hold.Status.EXPIRED
    alice = GatewayUser.objects.get(pk="alice")
    assert alice.reserved_usd == 0
    assert_books_balance("alice")


def test_release_stale_holds(db, time_machine):
    time_machine.move_to(T0, tick=False)
    user = make_user(budget=make_budget(max_budget_usd=Decimal("10")))
    old = open_hold(user.pk, Decimal("1.5"), T0)
    young = open_hold(user.pk, Decimal("0.5"), T0 + timedelta(minutes=30))
    ttl = Hold.objects.get(pk=old.request_id).expires_at - T0

    time_machine.move_to(T0 + ttl + timedelta(seconds=1), tick=False)
    assert run("release_stale_holds", "--dry-run") == (
        "release_stale_holds (dry run): 1 stale hold(s) holding $1.5\n"
    )
    assert Hold.objects.get(pk=old.request_id).status == Hold.Status.OPEN
    assert run("release_stale_holds") == "release_stale_holds: expired 1 stale hold(s)\n"
    assert run("release_stale_holds") == "release_stale_holds: expired 0 stale hold(s)\n"
    statuses = {h.request_id: h.status for h in Hold.objects.all()}
    assert statuses == {old.request_id: "expired", young.request_id: "open"}
    user.refresh_from_db()
    assert user.reserved_usd == Decimal("0.5")
    assert_books_balance(user.pk)
