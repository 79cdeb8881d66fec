"""Pricing and the usage log over HTTP, through the ASGI app (docs/SPEC.md §6, §5)."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from tests.factories import make_key, make_user, set_price
from usage.models import ModelPricing, UsageLog

# The usage API is read here from rows written directly (a fixed log over three days), not
# by requests, so the users' counters do not match them.
pytestmark = pytest.mark.books_unbalanced

# --- pricing -------------------------------------------------------------------------


def test_pricing_set_get_history_list_delete(admin):
    now = timezone.now()
    earlier = (now - timedelta(days=2)).isoformat()
    first = admin.post(
        "/v1/pricing",
        json={
            "model_key": "openai:gpt-4o",
            "input_price_per_million": 2.5,
            "output_price_per_million": 10,
            "effective_at": earlier,
        },
    )
    assert first.status_code == 200
    assert first.json()["unit"] == "tokens"
    assert first.json()["pricing_tiers"] == []
    second = admin.post(
        "/v1/pricing",
        json={
            "model_key": "openai:gpt-4o",
            "input_price_per_million": 0.0000001,
            "output_price_per_million": 12.5,
            "cache_read_price_per_million": 1.25,
        },
    )
    assert second.status_code == 200
    assert b'"input_price_per_million":0.0000001' in second.content
    current = admin.get("/v1/pricing/openai:gpt-4o").json()
    assert (current["input_price_per_million"], current["cache_read_price_per_million"]) == (
        0.0000001,
        1.25,
    )
    as_of = (now - timedelta(days=1)).isoformat()
    assert (
        admin.get("/v1/pricing/openai:gpt-4o", params={"as_of": as_of}).json()[
            "output_price_per_million"
        ]
        == 10
    )
    history = admin.get("/v1/pricing/openai:gpt-4o/history").json()
    assert [p["output_price_per_million"] for p in history] == [12.5, 10]
    assert [p["model_key"] for p in admin.get("/api/v1/pricing").json()] == ["openai:gpt-4o"]
    assert ModelPricing.objects.get(output_price_per_mtok_usd=12.5).input_price_per_mtok_usd == (
        Decimal("0.0000001")
    )

    one = admin.delete("/v1/pricing/openai:gpt-4o", params={"effective_at": earlier})
    assert one.status_code == 204
    assert len(admin.get("/v1/pricing/openai:gpt-4o/history").json()) == 1
    assert admin.delete("/v1/pricing/openai:gpt-4o").status_code == 204
    assert admin.get("/v1/pricing/openai:gpt-4o").status_code == 404
    assert admin.delete("/v1/pricing/openai:gpt-4o").status_code == 404
    assert admin.get("/v1/pricing/openai:gpt-4o/history").status_code == 404


def test_model_keys_with_slashes(admin):
    key = "openrouter:meta-llama/llama-3-8b"
    body = {"model_key": key, "input_price_per_million": 1, "output_price_per_million": 2}
    assert admin.post("/v1/pricing", json=body).status_code == 200
    assert admin.get(f"/v1/pricing/{key}").json()["model_key"] == key
    assert len(admin.get(f"/v1/pricing/{key}/history").json()) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"model_key": "gpt-4o"},
        {"model_key": ":gpt"},
        {"input_price_per_million": -0.01},
        {"output_price_per_million": "1"},
        {"output_price_per_million": None},
        {"unit": "images"},
        {"cache_write_1h_price_per_million": 1},
        {"pricing_tiers": [{"min_input_tokens": 1000}]},
        {"effective_at": "yesterday"},
    ],
)
def test_pricing_validation(admin, change):
    body = {"model_key": "openai:m", "input_price_per_million": 1, "output_price_per_million": 1}
    response = admin.post("/v1/pricing", json={**body, **change})
    assert response.status_code == 422
    assert "yesterday" not in response.json()["detail"]
    assert not ModelPricing.objects.exists()


def test_pricing_pagination(admin):
    for name in ("c", "a", "b"):
        set_price(f"openai:{name}")
    assert [p["model_key"] for p in admin.get("/v1/pricing?limit=2").json()] == [
        "openai:a",
        "openai:b",
    ]
    assert [p["model_key"] for p in admin.get("/v1/pricing?skip=2").json()] == ["openai:c"]
    assert admin.get("/v1/pricing?limit=0").status_code == 422


# --- usage ---------------------------------------------------------------------------


def _row(user, moment, **kwargs) -> UsageLog:
    kwargs.setdefault("endpoint", "/v1/chat/completions")
    kwargs.setdefault("provider", "openai")
    kwargs.setdefault("model", "gpt-4o-mini")
    kwargs.setdefault("status", "success")
    kwargs.setdefault("status_code", 200)
    kwargs.setdefault("prompt_tokens", 10)
    kwargs.setdefault("completion_tokens", 5)
    kwargs.setdefault("total_tokens", 15)
    kwargs.setdefault("cost_usd", Decimal("0.000123"))
    return UsageLog.objects.create(user=user, timestamp=moment, **kwargs)


@pytest.fixture
def log():
    """Rows over three days for two users, one of them with a key and an error."""
    alice, bob = make_user(user_id="alice", alias="Alice"), make_user(user_id="bob")
    key, _ = make_key(alice, key_name="ci")
    day = datetime(2026, 3, 1, 12, tzinfo=UTC)
    rows = [
        _row(alice, day, api_key=key),
        _row(alice, day + timedelta(days=1), api_key=key, model="gpt-4o"),
        _row(
            alice,
            day + timedelta(days=1, hours=1),
            status="error",
            status_code=502,
            cost_usd=None,
            prompt_tokens=None,
            completion_tokens=None,
            total_tokens=None,
        ),
        _row(bob, day + timedelta(days=2), model="=HYPERLINK(1)", cost_usd=Decimal("1.5")),
    ]
    return {"alice": alice, "bob": bob, "key": key, "day": day, "rows": rows}


def test_list_newest_first_with_every_field(admin, log):
    entries = admin.get("/v1/usage").json()
    assert [e["id"] for e in entries] == [str(r.id) for r in reversed(log["rows"])]
    first = entries[-1]
    assert first["user_id"] == "alice"
    assert first["user_alias"] == "Alice"
    assert (first["api_key_id"], first["api_key_name"]) == (str(log["key"].pk), "ci")
    assert first["cost"] == 0.000123
    assert (first["prompt_tokens"], first["completion_tokens"], first["total_tokens"]) == (
        10,
        5,
        15,
    )
    assert (first["bulk_editable"], first["counts_toward_budget"], first["source"]) == (
        False,
        True,
        "gateway",
    )
    assert first["timestamp"] == "2026-03-01T12:00:00+00:00"


def test_filters(admin, log):
    def ids(**params):
        return [e["id"] for e in admin.get("/v1/usage", params=params).json()]

    rows = [str(r.id) for r in log["rows"]]
    assert ids(user_id="bob") == [rows[3]]
    assert ids(user_id=["bob", "alice"]) == rows[::-1]
    assert ids(model="gpt-4o") == [rows[1]]
    assert ids(status="error") == [rows[2]]
    assert ids(status_code=502) == [rows[2]]
    assert ids(api_key_id=str(log["key"].pk)) == [rows[1], rows[0]]
    assert ids(endpoint="/v1/messages") == []
    day = log["day"]
    # Half-open: start inclusive, end exclusive; naive = UTC; epoch seconds too.
    assert ids(start_date="2026-03-02T12:00:00", end_date="2026-03-03T12:00:00") == [
        rows[2],
        rows[1],
    ]
    assert ids(start_date=str(int((day + timedelta(days=2)).timestamp()))) == [rows[3]]
    assert ids(end_date="2026-03-01T13:00:00.000000+0100") == []
    assert ids(end_date="2026-03-02") == [rows[0]]
    assert admin.get("/v1/usage/count", params={"user_id": "alice"}).json() == {"total": 3}
    assert admin.get("/v1/usage/count").json() == {"total": 4}


@pytest.mark.parametrize(
    "params",
    [
        {"start_date": "last tuesday"},
        {"status": "ok"},
        {"api_key_id": "nope"},
        {"status_code": "abc"},
        {"limit": 0},
        {"limit": 1001},
        {"skip": -1},
        {"start_date": "2026-03-02", "end_date": "2026-03-01"},
        {"user_id": [f"u{i}" for i in range(51)]},
    ],
)
def test_usage_query_validation(admin, log, params):
    response = admin.get("/v1/usage", params=params)
    assert response.status_code == 422
    assert "tuesday" not in response.text
    assert admin.get("/v1/usage/count", params=params).status_code in (200, 422)


def test_pagination_is_stable(admin, log):
    user = log["bob"]
    moment = datetime(2026, 4, 1, tzinfo=UTC)
    same_time = {_row(user, moment).id for _ in range(5)}
    pages = [
        admin.get("/v1/usage", params={"user_id": "bob", "skip": skip, "limit": 2}).json()
        for skip in (0, 2, 4)
    ]
    seen = [e["id"] for page in pages for e in page]
    assert len(seen) == len(set(seen)) == 6
    assert {uuid.UUID(i) for i in seen[:5]} == same_time


def test_user_usage_route(admin, log):
    assert len(admin.get("/v1/users/alice/usage").json()) == 3
    assert len(admin.get("/v1/users/alice/usage?limit=1").json()) == 1
    assert admin.get("/v1/users/ghost/usage").status_code == 404


def test_summary(admin, log):
    params = {"start_date": "2026-03-01", "end_date": "2026-03-05"}
    summary = admin.get("/v1/usage/summary", params=params).json()
    totals = summary["totals"]
    assert (totals["request_count"], totals["error_count"], totals["unpriced_requests"]) == (
        4,
        1,
        1,
    )
    assert totals["cost"] == 1.500246
    assert totals["total_tokens"] == 45
    by_user = {row["key"]: row for row in summary["by_user"]}
    assert (by_user["bob"]["cost"], by_user["alice"]["requests"]) == (1.5, 3)
    assert by_user["alice"]["label"] == "Alice"
    assert summary["by_user"][0]["key"] == "bob"
    assert {row["key"]: row["requests"] for row in summary["by_model"]} == {
        "gpt-4o-mini": 2,
        "gpt-4o": 1,
        "=HYPERLINK(1)": 1,
    }
    assert [(p["bucket_start"], p["requests"]) for p in summary["series"]] == [
        ("2026-03-01T00:00:00+00:00", 1),
        ("2026-03-02T00:00:00+00:00", 2),
        ("2026-03-03T00:00:00+00:00", 1),
    ]
    assert summary["errors_by_status_code"] == [
        {"status_code": 502, "error_class": "provider_error", "requests": 1}
    ]
    narrow = admin.get(
        "/v1/usage/summary", params={**params, "dimensions": "none", "bucket": "hour"}
    ).json()
    assert narrow["by_user"] == narrow["by_model"] == []
    assert len(narrow["series"]) == 4
    assert admin.get("/v1/usage/summary", params={"bucket": "week"}).status_code == 422


def test_summary_csv_is_streamed_and_formula_safe(admin, log):
    response = admin.get(
        "/v1/usage/summary.csv", params={"start_date": "2026-03-01", "end_date": "2026-03-05"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0][:3] == ["date", "user_id", "model"]
    by_key = {(r[0], r[1], r[2]): r for r in rows[1:]}
    assert by_key[("2026-03-03", "bob", "'=HYPERLINK(1)")][-1] == "1.5"
    assert by_key[("2026-03-01", "alice", "gpt-4o-mini")][3:] == [
        "1",
        "0",
        "10",
        "5",
        "15",
        "0.000123",
    ]
    assert len(rows) == 1 + 4
    bad = admin.get("/v1/usage/summary.csv", params={"start_date": "x"})
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/json")
