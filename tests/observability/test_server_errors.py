"""An error nobody handled, on each kind of route, through HTTP into the ASGI app: API
routes answer a JSON 500 in their own API's shape that names the request id and not the
error, and the traceback is logged once under that id; the console keeps Django's HTML
500 page."""

from __future__ import annotations

import logging
import time
from decimal import Decimal

import pytest
from django.test import Client

from tests.conftest import MASTER_KEY
from tests.factories import make_budget, make_key, make_user, priced
from usage.models import UsageLog

# What the forced errors say: a client must never read it.
CANARY = "canary-internal-detail-5d1e"


def boom(*args, **kwargs):
    raise RuntimeError(CANARY)


async def async_boom(*args, **kwargs):
    raise RuntimeError(CANARY)


def _traceback_records(caplog, request_id: str, timeout: float = 5) -> list[logging.LogRecord]:
    """The records with a traceback logged under `request_id`, once its access line is
    written (after the last byte went out)."""
    deadline = time.monotonic() + timeout
    while not any(r.name == "otari.access" and r.request_id == request_id for r in caplog.records):
        assert time.monotonic() < deadline, "the access line was not written"
        time.sleep(0.01)
    return [r for r in caplog.records if r.request_id == request_id and r.exc_info]


def assert_generic_500(response, caplog) -> str:
    """A JSON 500 with the request id in its header and message, no trace of the error
    in the body, and one record of its traceback in the log under that id."""
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    request_id = response.headers["x-otari-request-id"]
    assert request_id
    assert CANARY not in response.text
    assert "Traceback" not in response.text
    assert "RuntimeError" not in response.text
    [record] = _traceback_records(caplog, request_id)
    assert record.exc_info[0] is RuntimeError
    assert CANARY in logging.Formatter().formatException(record.exc_info)
    return request_id


@pytest.mark.parametrize(
    "path",
    ["/v1/chat/completions", "/api/v1/chat/completions", "/v1/responses", "/v1/embeddings"],
)
def test_an_openai_route_answers_an_openai_error(gateway, caplog, monkeypatch, path):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr("llm_proxy.pipeline.admission.admit", async_boom)
    response = gateway.post(path, None, {"model": "openai:gpt-4o-mini", "input": "hi"})
    request_id = assert_generic_500(response, caplog)
    message = f"Internal server error (request id {request_id})"
    assert response.json() == {
        "error": {
            "message": message,
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        },
        "detail": message,
    }


@pytest.mark.parametrize("path", ["/v1/messages", "/api/v1/messages"])
def test_the_anthropic_route_answers_an_anthropic_error(gateway, caplog, monkeypatch, path):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr("llm_proxy.pipeline.admission.admit", async_boom)
    response = gateway.post(path, None, {"model": "anthropic:claude", "max_tokens": 5})
    request_id = assert_generic_500(response, caplog)
    message = f"Internal server error (request id {request_id})"
    assert response.json() == {
        "type": "error",
        "error": {"type": "api_error", "message": message},
        "detail": message,
        "request_id": request_id,
    }


def test_an_admitted_request_that_fails_is_refunded_and_answers_the_same(
    gateway, caplog, monkeypatch
):
    caplog.set_level(logging.INFO)
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")), user_id="erin")
    _, secret = make_key(user)
    monkeypatch.setattr("llm_proxy.pipeline.call.complete", async_boom)
    response = gateway.post(
        "/v1/messages",
        secret,
        {
            "model": priced("gpt-4o-mini"),
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    request_id = assert_generic_500(response, caplog)
    assert response.json()["type"] == "error"
    assert response.json()["request_id"] == request_id
    row = UsageLog.objects.get()
    assert str(row.id) == request_id
    assert row.status == UsageLog.Status.ERROR
    assert not row.cost_usd  # refunded: nothing charged
    assert CANARY not in row.error_message


def test_models_answers_an_openai_error(gateway, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    _, secret = make_key(make_user(user_id="frank"))
    monkeypatch.setattr("llm_proxy.local_endpoints.prices_current", boom)
    with gateway.client(secret) as client:
        response = client.get("/v1/models")
    request_id = assert_generic_500(response, caplog)
    assert response.json()["error"]["type"] == "server_error"
    assert request_id in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/budgets", "/api/v1/budgets"])
def test_a_management_route_answers_its_detail_shape(gateway, caplog, monkeypatch, settings, path):
    caplog.set_level(logging.INFO)
    settings.OTARI_MASTER_KEY = MASTER_KEY
    monkeypatch.setattr("budgets.selectors.budget_list", boom)
    with gateway.client(MASTER_KEY) as client:
        response = client.get(path)
    request_id = assert_generic_500(response, caplog)
    assert response.json() == {"detail": f"Internal server error (request id {request_id})"}


@pytest.mark.parametrize("path", ["/health", "/v1/health", "/health/liveness"])
def test_health_answers_the_detail_shape(gateway, caplog, monkeypatch, path):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr("common.health.HealthApi.get", boom)
    monkeypatch.setattr("common.health.LivenessApi.get", boom)
    with gateway.client() as client:
        response = client.get(path)
    request_id = assert_generic_500(response, caplog)
    assert response.json() == {"detail": f"Internal server error (request id {request_id})"}


def test_metrics_answers_the_detail_shape(gateway, caplog, monkeypatch, settings):
    caplog.set_level(logging.INFO)
    settings.OTARI_ENABLE_METRICS = True
    settings.OTARI_METRICS_TOKEN = ""
    # Served without a token only when the operator says so (issue 19, item 6).
    settings.OTARI_METRICS_PUBLIC = True
    monkeypatch.setattr("otari.metrics._scrape_registry", boom)
    with gateway.client() as client:
        response = client.get("/metrics")
    request_id = assert_generic_500(response, caplog)
    assert response.json() == {"detail": f"Internal server error (request id {request_id})"}


def test_an_error_around_django_is_answered_the_same(gateway, caplog, monkeypatch):
    """An exception outside Django's handler (here in the allowed-hosts check) is caught
    by the outermost middleware, before anything was sent."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr("common.hosts.host_allowed", boom)
    response = gateway.post("/v1/messages", None, {})
    request_id = assert_generic_500(response, caplog)
    assert response.json()["error"]["type"] == "api_error"
    assert response.json()["request_id"] == request_id


def test_the_console_keeps_djangos_html_page(db, django_user_model, monkeypatch):
    monkeypatch.setattr("budgets.admin_site.dashboard_build", boom)
    user = django_user_model.objects.create_superuser("root", password="not-used-1")
    client = Client(raise_request_exception=False)
    client.force_login(user)
    response = client.get("/admin/")
    assert response.status_code == 500
    assert response["content-type"].startswith("text/html")
    assert CANARY not in response.content.decode()
