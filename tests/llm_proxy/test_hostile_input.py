"""Client input that used to end in a 500 (issue 19, item 2): each is a 4xx in the error
shape of the API it came through, nothing is held, and the provider is never called."""

from __future__ import annotations

import pytest

from budgets.models import Hold
from tests.factories import make_budget, make_key, make_user, set_price
from usage.models import UsageLog

MODEL = "openai:gpt-4o-mini"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def secret(gateway):
    set_price(MODEL)
    _, secret = make_key(make_user(budget=make_budget(max_budget_usd=100)))
    return secret


def _post_raw(gateway, path: str, secret: str, content: bytes) -> object:
    with gateway.client(secret) as client:
        return client.post(path, content=content, headers={"Content-Type": "application/json"})


def _refused(gateway, response, status: int, text: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert text in body["error"]["message"]
    assert gateway.fake.hits == 0
    assert not Hold.objects.exists()


def test_json_nested_ten_thousand_levels_deep(gateway, secret):
    body = b'{"model": "openai:gpt-4o-mini", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    response = _post_raw(gateway, "/v1/chat/completions", secret, body)
    _refused(gateway, response, 400, "not valid JSON")
    assert response.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 10**30}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": HELLO, "max_completion_tokens": 2**31},
        ),
        ("/v1/messages", {"model": MODEL, "messages": HELLO, "max_tokens": 10**30}),
        ("/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 10**30}),
    ],
)
def test_an_output_cap_past_any_column_is_refused(gateway, secret, path, body):
    response = gateway.post(path, secret, body)
    field = next(
        f for f in ("max_completion_tokens", "max_tokens", "max_output_tokens") if f in body
    )
    _refused(gateway, response, 400, f"{field} must be at most 2147483647")


def test_the_largest_output_cap_still_works(gateway, secret):
    response = gateway.chat(secret, model=MODEL, max_tokens=2**31 - 1)
    assert response.status_code in (200, 403), response.text  # served, or over the budget
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()


def test_a_model_name_longer_than_its_column_is_refused_and_logged(gateway, secret):
    model = "openai:" + "m" * 300
    response = gateway.chat(secret, model=model)
    _refused(gateway, response, 400, "model must be at most 255 characters")
    (row,) = UsageLog.objects.all()
    assert row.status_code == 400
    assert row.model == model[:255] or row.model == model.split(":", 1)[1][:255]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            b'{"model": "openai:gpt-4o-mini", "messages": '
            b'[{"role": "user", "content": "a\\ud800b"}]}',
        ),
        (
            "/v1/messages",
            b'{"model": "openai:gpt-4o-mini", "max_tokens": 5, "messages": '
            b'[{"role": "user", "content": "\\udfff"}]}',
        ),
        ("/v1/responses", b'{"model": "openai:gpt-4o-mini", "input": "x\\ud83d"}'),
    ],
)
def test_a_lone_surrogate_in_the_content_is_refused(gateway, secret, path, body):
    response = _post_raw(gateway, path, secret, body)
    _refused(gateway, response, 400, "unpaired surrogates")


def test_a_paired_surrogate_escape_is_an_emoji_and_passes(gateway, secret):
    body = (
        b'{"model": "openai:gpt-4o-mini", "messages": '
        b'[{"role": "user", "content": "smile \\ud83d\\ude00"}]}'
    )
    response = _post_raw(gateway, "/v1/chat/completions", secret, body)
    assert response.status_code == 200, response.text
    assert gateway.fake.hits == 1


def test_a_management_body_over_the_size_limit_is_a_413(admin, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1_000
    response = admin.post("/v1/users", json={"user_id": "big", "alias": "x" * 5_000})
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body is too large"}
