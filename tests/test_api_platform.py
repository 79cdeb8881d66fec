"""Health probes, the OpenAPI schema and its docs page, and properties every management
route shares (docs/SPEC.md §6)."""

from __future__ import annotations

import re
import string

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import start_server_process


def test_health_routes(gateway):
    with gateway.client() as client:
        for prefix in ("", "/v1", "/api/v1"):
            assert client.get(f"{prefix}/health").json() == {"status": "healthy"}
            assert client.get(f"{prefix}/health/liveness").status_code == 200
            ready = client.get(f"{prefix}/health/readiness")
            assert ready.status_code == 200
            assert ready.json() == {"status": "ready", "database": "ok"}


@pytest.mark.slow
def test_readiness_is_503_without_leaking_the_cause(tmp_path):
    """A gateway whose database cannot be opened is alive but not ready."""
    config = tmp_path / "otari.yaml"
    config.write_text("providers: {}\n")
    server = start_server_process(
        config, DATABASE_URL="sqlite:////nonexistent-dir/secret-path/otari.sqlite3"
    )
    try:
        assert httpx.get(server.url + "/health/liveness").status_code == 200
        ready = httpx.get(server.url + "/health/readiness")
        assert ready.status_code == 503
        assert ready.json()["database"] == "unreachable"
        assert "secret-path" not in ready.text
        assert "sqlite" not in ready.text.lower()
    finally:
        server.kill()


def test_openapi_schema_covers_management_and_generation(gateway):
    with gateway.client() as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    for path in (
        "/v1/users",
        "/v1/users/{user_id}",
        "/v1/users/{user_id}/usage",
        "/v1/budgets/{budget_id}/reset-logs",
        "/v1/keys/{key_id}/rotate",
        "/v1/pricing/{model_key}/history",
        "/v1/usage/summary.csv",
        "/health/readiness",
        "/v1/chat/completions",
        "/v1/models",
    ):
        assert path in paths, path
    user = schema["components"]["schemas"]["UserResponse"]
    for field in ("spend", "reserved", "current_requests", "next_budget_reset_at"):
        assert field in user["required"]
    assert user["properties"]["spend"]["type"] == "number"
    assert paths["/v1/users"]["get"]["security"] == [{"MasterKey": []}]


def test_docs_page_works_offline(gateway):
    """The page and every script and stylesheet it loads come from this server."""
    with gateway.client() as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', page.text)
        assert assets
        for asset in assets:
            assert asset.startswith("/"), asset
            assert client.get(asset).status_code == 200, asset
    assert "cdn" not in page.text.lower()


def test_api_v1_alias_serves_the_same_routes(admin):
    created = admin.post("/api/v1/budgets", json={"name": "alias"}).json()
    assert admin.get(f"/v1/budgets/{created['budget_id']}").json() == created


_MARKER = st.text(alphabet=string.ascii_letters, min_size=12, max_size=20).map(
    lambda text: "zq" + text
)
_BAD_VALUES = st.one_of(
    _MARKER,
    _MARKER.map(lambda m: [m]),
    _MARKER.map(lambda m: {m: m}),
)


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        (
            "/v1/budgets",
            [
                "max_budget",
                "budget_duration_sec",
                "reset_alignment",
                "name",
                "alert_thresholds_pct",
                "alert_webhook_url",
                "alert_emails",
            ],
        ),
        ("/v1/users", ["user_id", "blocked", "allowed_models", "metadata", "budget_id"]),
        ("/v1/keys", ["expires_at", "allowed_models", "is_active", "exclude_from_budget"]),
        ("/v1/pricing", ["model_key", "input_price_per_million", "unit", "effective_at"]),
    ],
)
def test_rejected_values_are_never_echoed(admin, path, fields):
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(field=st.sampled_from(fields), value=_BAD_VALUES)
    def check(field, value):
        response = admin.post(path, json={field: value, "user_id": "u-" + field})
        assert response.status_code < 500
        marker = value if isinstance(value, str) else str(value)[2:-2].split("'")[0]
        if response.status_code >= 400:
            assert marker not in response.text

    check()


def test_unknown_route_under_v1_is_not_a_server_error(admin):
    response = admin.get("/v1/nope")
    assert response.status_code == 404
