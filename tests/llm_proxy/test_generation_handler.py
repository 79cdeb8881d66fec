"""The generation routes' own ASGI handler (otari/asgi.py): what Django's handler did for
them, it still does, through HTTP into the ASGI app."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest
from django.db import connections

from tests.factories import make_budget, make_key, make_user, set_price
from usage.models import UsageLog

MODEL = "openai:gpt-4o-mini"


@pytest.mark.postgres
def test_orm_connections_of_generation_requests_go_back_to_the_pool(gateway):
    """The ORM's connections (the general path, the model list) are taken from Django's
    pool and given back at the end of each request, as request_finished did."""
    set_price()
    pool = connections["default"].pool
    before = pool.get_stats()
    for n in range(12):  # more than the pool's 10 connections
        _, secret = make_key(make_user(user_id=f"pool-{n}"))
        assert gateway.chat(secret, model=MODEL).status_code == 200
        listed = httpx.get(
            f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {secret}"}, timeout=30
        )
        assert listed.status_code == 200
    after = pool.get_stats()
    # Taken from the pool at each request, not kept by a thread between requests...
    assert after["requests_num"] - before.get("requests_num", 0) >= 12
    # ...and all given back.
    assert after["pool_size"] - after["pool_available"] == (
        before["pool_size"] - before["pool_available"]
    )
    assert UsageLog.objects.filter(user__user_id__startswith="pool-").count() == 12


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions/"),
        ("POST", "/v1/chat/completionsX"),
        ("GET", "/v1/models/gpt-4o"),
        ("POST", "/api/v1/messages/batches"),
    ],
)
def test_a_path_beside_a_generation_route_is_a_404_in_json(gateway, method, path):
    response = httpx.request(method, f"{gateway.url}{path}", json={}, timeout=30)
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith("application/json")
    assert "Traceback" not in response.text


def test_a_generation_route_answers_only_its_method(gateway):
    _, secret = make_key(make_user(budget=make_budget(max_budget_usd=Decimal("1"))))
    response = httpx.get(
        f"{gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30,
    )
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
