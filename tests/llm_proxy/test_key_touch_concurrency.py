"""Two requests of one key closing at the same moment (a settle and a refund): both
statements update the user's row and touch the key's `last_used_at`, in either order.
The touch used to wait for the other statement's lock while holding what that one
waited for (a deadlock: a 500, and a hold left open until the sweeper)."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest

from budgets.models import Hold
from tests.factories import make_budget, make_key, make_user, priced, set_price


@pytest.mark.postgres
@pytest.mark.slow
def test_a_settle_and_a_refund_of_one_key_at_once_both_complete(gateway):
    set_price()
    failing = priced("gpt-4o-mini-fail-400")
    results = []
    for _ in range(60):
        # A fresh key each round: its first requests both want to touch last_used_at.
        user = make_user(budget=make_budget(max_budget_usd=Decimal("10")))
        _, secret = make_key(user)
        statuses: dict[str, int] = {}

        def send(name: str, model: str, secret: str = secret, statuses: dict = statuses) -> None:
            statuses[name] = gateway.chat(secret, model=model).status_code

        threads = [
            threading.Thread(target=send, args=("ok", "openai:gpt-4o-mini")),
            threading.Thread(target=send, args=("failed", failing)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results.append((statuses["ok"], statuses["failed"]))

    assert results == [(200, 400)] * 60
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
