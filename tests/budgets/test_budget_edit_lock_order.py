"""A budget edit against a settlement on the general path (found by the deadlock drill,
tests/budgets/test_deadlock_drill.py).

The general path rolls a user's period and then charges it, in one transaction: two
updates of the user row. The second updates a row version the transaction wrote itself,
so PostgreSQL checks the row's foreign key to its budget again at commit (a KEY SHARE lock
on the budget row). A budget edit that changes the period locks the budget and then its
users. When it locked the budget FOR UPDATE, the settlement's commit waited for the edit,
and the edit for the settlement's user row: a deadlock, which reached the client as a 503.
The edit now locks the budget FOR NO KEY UPDATE (it changes no key), which KEY SHARE does
not wait for.
"""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
from django.db import connection, connections, transaction
from django.db.models import F

from budgets.models import GatewayUser
from budgets.services import accounts
from tests.factories import make_budget, make_user

pytestmark = pytest.mark.postgres


def _waiting_on_a_lock() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]


def test_a_period_edit_and_a_settlement_rolling_the_period_do_not_deadlock(transactional_db):
    budget = make_budget(max_budget_usd=Decimal("5"), budget_duration_sec=60)
    user = make_user(budget=budget)
    errors: list[BaseException] = []
    edit_started = threading.Event()

    def edit() -> None:
        try:
            edit_started.set()
            accounts.budget_update(budget_id=budget.pk, budget_duration_sec=120)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    editor = threading.Thread(target=edit)
    try:
        with transaction.atomic():
            # What the general path does under the user's lock: two updates of the row
            # (a roll, then a charge; here they change nothing, to keep the books).
            GatewayUser.objects.select_for_update(no_key=True).get(pk=user.pk)
            GatewayUser.objects.filter(pk=user.pk).update(spend_usd=F("spend_usd"))
            GatewayUser.objects.filter(pk=user.pk).update(reserved_usd=F("reserved_usd"))
            editor.start()
            edit_started.wait(5)
            deadline = time.monotonic() + 10
            while _waiting_on_a_lock() == 0:  # the edit waits for the user's row
                assert time.monotonic() < deadline, "the edit never waited for the user"
                time.sleep(0.02)
    except BaseException as exc:
        errors.append(exc)
    editor.join(timeout=30)

    assert errors == []
    budget.refresh_from_db()
    assert budget.budget_duration_sec == 120
