"""The official `openai` SDK pointed at the gateway with a `gw-` key."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from budgets.models import GatewayUser
from tests.assertions import assert_books_balance
from tests.factories import make_budget, make_key, make_user, set_price
from usage.models import UsageLog

MODEL = "openai:gpt-4o-mini"


@pytest.fixture
def sdk_user():
    set_price()
    user = make_user(budget=make_budget(max_budget_usd=Decimal("1")))
    _, secret = make_key(user)
    return user, secret


def client(gateway, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=secret, max_retries=0)


def test_sdk_create_and_stream(gateway, sdk_user):
    user, secret = sdk_user
    sdk = client(gateway, secret)

    completion = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}]
    )
    assert completion.choices[0].message.content.startswith("Hello from the fake")
    assert completion.usage.completion_tokens == 20

    chunks = list(
        sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True
        )
    )
    # Not asked for usage: no usage-only chunk, as from OpenAI itself.
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("Hello from the fake")
    asked = list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert asked[-1].usage.completion_tokens == 20

    with sdk.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}]
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content.startswith("Hello from the fake")

    assert UsageLog.objects.filter(status="success").count() == 4
    assert_books_balance(user)
    user.refresh_from_db()
    assert user.reserved_usd == 0


# Stages a full budget by writing spend directly: its books cannot balance afterwards.
@pytest.mark.books_unbalanced
def test_sdk_typed_errors(gateway, sdk_user):
    user, secret = sdk_user
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "gw-wrong").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}]
        )
    GatewayUser.objects.filter(pk=user.pk).update(spend_usd=Decimal("1"))
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(gateway, secret).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}]
        )
    assert denied.value.code == "budget_exceeded"
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway, secret).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hello"}], stream=True
        )
    with pytest.raises(openai.BadRequestError):
        client(gateway, secret).chat.completions.create(
            model="nowhere:gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
        )
    set_price("openai:gpt-4o-mini-fail-429")
    GatewayUser.objects.filter(pk=user.pk).update(spend_usd=Decimal("0"))
    with pytest.raises(openai.RateLimitError):
        client(gateway, secret).chat.completions.create(
            model="openai:gpt-4o-mini-fail-429", messages=[{"role": "user", "content": "Hi"}]
        )
