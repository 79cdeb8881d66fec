"""How a stream ends, as a client sees it (issue 12, item 4).

- A chat stream carries the usage-only chunk (`choices: []`) only when the client asked
  for it with `stream_options.include_usage`, on every provider kind. The provider is
  always asked for usage, so the request is charged what it used either way.
- The closing event that reports usage also carries the gateway's `otari` summary: the
  request's cost and the budget left after it (docs/ENDPOINTS.md). A stream cannot carry
  them as headers: those are sent before the answer exists.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal

import httpx
import openai
import pytest

from tests.assertions import assert_books_balance
from tests.factories import make_budget, make_key, make_user, set_price
from tests.fake_provider import WORDS
from tests.llm_proxy.apis import PATHS, PROMPT, body_for, sse_events
from usage.models import UsageLog

pytestmark = pytest.mark.postgres

PROMPT_TOKENS = math.ceil(len(PROMPT) / 4)
LIMIT = Decimal("5")
# chat on openai is passed through; on anthropic it is translated.
CHAT_INSTANCES = ["openai", "anthropic"]


@pytest.fixture
def fay():
    user = make_user(budget=make_budget(max_budget_usd=LIMIT), user_id="fay")
    _, secret = make_key(user)
    return user, secret


def _stream(gateway, secret: str, api: str, body: dict) -> tuple[httpx.Response, str]:
    with gateway.client(secret) as client:
        response = client.post(PATHS[api], json=body)
    return response, response.text


def _chunks(text: str) -> list[dict]:
    return [json.loads(data) for _, data in sse_events(text) if data != "[DONE]"]


def _assert_summary(summary: dict, user) -> None:
    """The `otari` member: the row's cost and what the budget has left after it."""
    row = UsageLog.objects.get()
    user.refresh_from_db()
    assert summary["request_id"] == str(row.id)
    assert Decimal(summary["cost_usd"]) == row.cost_usd > 0
    assert Decimal(summary["budget_remaining_usd"]) == LIMIT - user.spend_usd
    assert user.spend_usd == row.cost_usd
    assert "budget_reset_at" not in summary  # a budget without a period


@pytest.mark.parametrize("instance", CHAT_INSTANCES)
def test_chat_stream_without_include_usage_has_no_usage_chunk(gateway, fay, instance):
    set_price(f"{instance}:m-chunks-5")
    body = body_for("chat", f"{instance}:m-chunks-5", stream=True)
    response, text = _stream(gateway, fay[1], "chat", body)
    assert response.status_code == 200
    chunks = _chunks(text)
    # Every chunk has a choice: the canonical `chunk.choices[0].delta.content` loop works.
    assert all(chunk["choices"] for chunk in chunks), chunks[-1]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "".join(
        WORDS[:5]
    )
    assert text.endswith("data: [DONE]\n\n")
    # The provider was still asked for usage, and the request charged what it used.
    row = UsageLog.objects.get()
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("success", PROMPT_TOKENS, 5)
    assert row.error_message == ""
    assert_books_balance(fay[0])


def test_chat_stream_with_include_usage_false_is_still_billed_its_usage(gateway, fay):
    set_price("openai:m-chunks-5")
    body = {
        **body_for("chat", "openai:m-chunks-5", stream=True),
        "stream_options": {"include_usage": False},
    }
    response, text = _stream(gateway, fay[1], "chat", body)
    assert response.status_code == 200
    assert all(chunk["choices"] for chunk in _chunks(text))
    assert gateway.fake.last_request.body["stream_options"] == {"include_usage": True}
    row = UsageLog.objects.get()
    assert (row.completion_tokens, row.error_message) == (5, "")


@pytest.mark.parametrize("instance", CHAT_INSTANCES)
def test_chat_usage_chunk_carries_cost_and_budget_when_asked(gateway, fay, instance):
    set_price(f"{instance}:m-chunks-5")
    body = {
        **body_for("chat", f"{instance}:m-chunks-5", stream=True),
        "stream_options": {"include_usage": True},
    }
    response, text = _stream(gateway, fay[1], "chat", body)
    assert response.status_code == 200
    # No cost header on a stream: it is sent before the answer exists.
    assert "x-otari-cost-usd" not in response.headers
    chunks = _chunks(text)
    last = chunks[-1]
    assert last["choices"] == []
    assert (last["usage"]["prompt_tokens"], last["usage"]["completion_tokens"]) == (
        PROMPT_TOKENS,
        5,
    )
    assert [c for c in chunks if "otari" in c] == [last]
    _assert_summary(last["otari"], fay[0])


@pytest.mark.parametrize(
    ("api", "instance", "closing"),
    [
        ("messages", "anthropic", ["message_delta", "message_stop"]),
        ("messages", "openai", ["message_delta", "message_stop"]),
        ("responses", "openai", ["response.completed"]),
        ("responses", "chatonly", ["response.completed"]),
        ("responses", "anthropic", ["response.completed"]),
    ],
)
def test_closing_event_carries_cost_and_budget(gateway, fay, api, instance, closing):
    """`message_delta` (before `message_stop`) and `response.completed` always report
    usage, natively or translated: they carry the summary."""
    set_price(f"{instance}:m-chunks-5")
    response, text = _stream(
        gateway, fay[1], api, body_for(api, f"{instance}:m-chunks-5", stream=True)
    )
    assert response.status_code == 200
    events = [(name, json.loads(data)) for name, data in sse_events(text)]
    assert [name for name, _ in events[-len(closing) :]] == closing
    name, event = events[-len(closing)]
    usage = event["usage"] if api == "messages" else event["response"]["usage"]
    assert usage["output_tokens"] == 5
    assert [n for n, data in events if "otari" in data] == [name]
    _assert_summary(event["otari"], fay[0])


# --- the official openai SDK ----------------------------------------------------------------


@pytest.fixture
def oai(gateway, fay):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=fay[1], max_retries=0)


@pytest.mark.parametrize("instance", CHAT_INSTANCES)
def test_openai_sdk_canonical_stream_loop(oai, fay, instance):
    """The loop of OpenAI's own documentation, which an empty `choices` breaks."""
    set_price(f"{instance}:m-chunks-5")
    stream = oai.chat.completions.create(
        model=f"{instance}:m-chunks-5",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "".join(WORDS[:5])
    assert UsageLog.objects.get().completion_tokens == 5


@pytest.mark.parametrize("instance", CHAT_INSTANCES)
def test_openai_sdk_sees_usage_and_summary_when_asked(oai, fay, instance):
    set_price(f"{instance}:m-chunks-5")
    chunks = list(
        oai.chat.completions.create(
            model=f"{instance}:m-chunks-5",
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 5
    # An extra member the SDK keeps, untyped, beside the ones it knows.
    _assert_summary(last.model_extra["otari"], fay[0])
