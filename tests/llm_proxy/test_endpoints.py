"""The new endpoints' own rules: bad input per API, what cannot be translated,
embeddings, count_tokens, the anthropic provider's wire details, and errors in each
endpoint's shape."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from budgets.models import Hold
from tests.assertions import assert_books_balance
from tests.factories import make_budget, make_key, make_user, set_price
from tests.fake_provider import TOOL_NAME
from tests.llm_proxy.apis import PATHS, PROMPT, body_for, error_shape_ok
from usage.models import UsageLog
from usage.pricing import Rates, TokenUsage, cost_usd

pytestmark = pytest.mark.postgres

MASTER_KEY = "otari-mk-test-master"


@pytest.fixture
def erin():
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")), user_id="erin")
    _, secret = make_key(user)
    for selector in (
        "openai:m",
        "anthropic:m",
        "chatonly:m",
        "openai:text-embedding-3-small",
        "anthropic:text-embedding-3-small",
    ):
        set_price(selector, "0.15", "0.60")
    return user, secret


def _refused_without_hold(gateway, secret, api, body, user) -> dict:
    response = gateway.post(PATHS[api], secret, body)
    assert response.status_code == 400, response.text
    assert error_shape_ok(api, response.json())
    assert gateway.fake.hits == 0
    row = UsageLog.objects.get()
    assert (row.status, row.status_code, row.cost_usd) == ("error", 400, None)
    assert not Hold.objects.exists()
    user.refresh_from_db()
    assert user.reserved_usd == 0
    return response.json()


def _message(api: str, body: dict) -> str:
    return body["error"]["message"]


# --- wrong shapes, per API (native routes: the gateway refuses, not the provider) --------

TOOL_USE = {"type": "tool_use", "id": "toolu_1", "name": TOOL_NAME, "input": {}}
BAD_INPUT = {
    "messages-no-max-tokens": (
        "messages",
        {"model": "anthropic:m", "messages": [{"role": "user", "content": "hi"}]},
        "max_tokens",
    ),
    "messages-unknown-block": (
        "messages",
        {
            "model": "anthropic:m",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": [{"type": "hologram"}]}],
        },
        "hologram",
    ),
    "messages-orphan-tool-result": (
        "messages",
        {
            "model": "anthropic:m",
            "max_tokens": 10,
            "messages": [
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9"}]}
            ],
        },
        "toolu_9",
    ),
    "messages-bad-role": (
        "messages",
        {"model": "anthropic:m", "max_tokens": 10, "messages": [{"role": "bot", "content": "x"}]},
        "role",
    ),
    "messages-tool-use-from-user": (
        "messages",
        {
            "model": "anthropic:m",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": [TOOL_USE]}],
        },
        "tool_use",
    ),
    "chat-orphan-tool-message": (
        "chat",
        {
            "model": "openai:m",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "tool", "tool_call_id": "call_9", "content": "sunny"},
            ],
        },
        "call_9",
    ),
    "chat-untyped-parts": (
        "chat",
        {"model": "openai:m", "messages": [{"role": "user", "content": ["hi"]}]},
        "typed parts",
    ),
    "responses-orphan-output": (
        "responses",
        {
            "model": "openai:m",
            "input": [{"type": "function_call_output", "call_id": "call_9", "output": "x"}],
        },
        "call_9",
    ),
    "responses-bad-input": ("responses", {"model": "openai:m", "input": 42}, "input"),
    "responses-no-input": ("responses", {"model": "openai:m"}, "input"),
    "responses-background": (
        "responses",
        {"model": "openai:m", "input": "hi", "background": True},
        "background",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_a_400_in_the_apis_shape_with_no_hold(gateway, erin, case):
    user, secret = erin
    api, body, fragment = BAD_INPUT[case]
    error = _refused_without_hold(gateway, secret, api, body, user)
    message = error["error"]["message"]
    assert fragment in message
    if api == "messages":
        assert error["error"]["type"] == "invalid_request_error"


# --- what cannot be translated -----------------------------------------------------------

UNTRANSLATABLE = {
    "chat-n-2-to-messages": ("chat", "anthropic", {"n": 2}, "'n'"),
    "chat-audio-to-messages": (
        "chat",
        "anthropic",
        {"modalities": ["text", "audio"]},
        "modalities",
    ),
    "chat-json-to-messages": (
        "chat",
        "anthropic",
        {"response_format": {"type": "json_object"}},
        "Structured output",
    ),
    "chat-logprobs-to-messages": ("chat", "anthropic", {"logprobs": True}, "logprobs"),
    "chat-hot-temperature": ("chat", "anthropic", {"temperature": 1.5}, "temperature"),
    "messages-thinking-to-chat": (
        "messages",
        "openai",
        {"thinking": {"type": "enabled", "budget_tokens": 1024}},
        "thinking",
    ),
    "messages-top-k-to-chat": ("messages", "openai", {"top_k": 5}, "top_k"),
    "messages-server-tool-to-chat": (
        "messages",
        "openai",
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        "web_search_20250305",
    ),
    "responses-builtin-tool": (
        "responses",
        "anthropic",
        {"tools": [{"type": "web_search"}]},
        "web_search",
    ),
    "responses-previous-id-on-chat": (
        "responses",
        "chatonly",
        {"previous_response_id": "resp_1"},
        "previous_response_id",
    ),
    "responses-reasoning-items": (
        "responses",
        "chatonly",
        {"input": [{"type": "reasoning", "id": "rs_1", "summary": []}]},
        "reasoning",
    ),
    "responses-json-on-messages": (
        "responses",
        "anthropic",
        {"text": {"format": {"type": "json_object"}}},
        "Structured output",
    ),
}


@pytest.mark.parametrize("case", UNTRANSLATABLE)
def test_what_cannot_be_translated_is_a_400_naming_it(gateway, erin, case):
    user, secret = erin
    api, instance, extra, fragment = UNTRANSLATABLE[case]
    body = {**body_for(api, f"{instance}:m"), **extra}
    error = _refused_without_hold(gateway, secret, api, body, user)
    assert fragment in _message(api, error)


def test_the_same_features_pass_natively(gateway, erin):
    """What translation refuses is the provider's business on a native route."""
    user, secret = erin
    body = {**body_for("chat", "openai:m"), "n": 2, "logprobs": True}
    assert gateway.post(PATHS["chat"], secret, body).status_code == 200
    assert gateway.fake.last_request.body["n"] == 2
    body = {**body_for("messages", "anthropic:m"), "top_k": 5}
    assert gateway.post(PATHS["messages"], secret, body).status_code == 200
    assert gateway.fake.last_request.body["top_k"] == 5
    assert_books_balance(user)


def test_embeddings_on_an_anthropic_provider_is_a_clear_400(gateway, erin):
    _user, secret = erin
    response = gateway.post(
        "/v1/embeddings", secret, {"model": "anthropic:text-embedding-3-small", "input": "hi"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported_endpoint"
    assert "has no Embeddings API" in response.json()["error"]["message"]
    assert gateway.fake.hits == 0
    assert not Hold.objects.exists()


# --- embeddings --------------------------------------------------------------------------


def test_embeddings_are_priced_on_input_tokens(gateway, erin):
    user, secret = erin
    inputs = ["The quick brown fox", "jumps over the lazy dog"]
    response = gateway.post(
        "/v1/embeddings", secret, {"model": "openai:text-embedding-3-small", "input": inputs}
    )
    assert response.status_code == 200
    assert len(response.json()["data"]) == 2
    tokens = math.ceil(sum(len(text) for text in inputs) / 4)
    expected = cost_usd(
        TokenUsage(input_tokens=tokens),
        Rates(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60")),
    )
    assert Decimal(response.headers["X-Otari-Cost-Usd"]) == expected
    row = UsageLog.objects.get()
    assert (row.endpoint, row.prompt_tokens, row.completion_tokens) == (
        "/v1/embeddings",
        tokens,
        0,
    )
    # The hold was the input estimate alone, not input plus a default output allowance.
    assert Hold.objects.get().amount_usd == expected
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (expected, 0)


def test_embeddings_refuse_streaming_and_empty_input(gateway, erin):
    _user, secret = erin
    for body in ({"input": "hi", "stream": True}, {"input": []}, {"input": ["ok", ""]}):
        response = gateway.post(
            "/v1/embeddings", secret, {"model": "openai:text-embedding-3-small", **body}
        )
        assert response.status_code == 400
        assert error_shape_ok("embeddings", response.json())
    assert gateway.fake.hits == 0
    assert not Hold.objects.exists()


# --- count_tokens -------------------------------------------------------------------------


def test_count_tokens_counts_prompt_and_tools_without_a_provider(gateway, erin):
    user, secret = erin
    tools = [{"name": TOOL_NAME, "input_schema": {"type": "object"}}]
    body = {
        "model": "anthropic:m",
        "system": "Be brief.",
        "messages": [{"role": "user", "content": PROMPT}],
        "tools": tools,
    }
    response = gateway.post("/v1/messages/count_tokens", secret, body)
    assert response.status_code == 200
    tools_chars = len('[{"name":"get_weather","input_schema":{"type":"object"}}]')
    assert response.json() == {
        "input_tokens": math.ceil((len("Be brief.") + len(PROMPT) + tools_chars) / 4)
    }
    assert gateway.fake.hits == 0
    assert not UsageLog.objects.exists()
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (0, 0)


def test_count_tokens_checks_key_model_and_shape(gateway, erin, settings):
    user, secret = erin
    body = {"model": "anthropic:m", "messages": [{"role": "user", "content": "hi"}]}
    response = gateway.post("/v1/messages/count_tokens", "gw-unknown", body)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    response = gateway.post("/v1/messages/count_tokens", secret, {**body, "model": "nowhere:m"})
    assert response.status_code == 400
    assert response.json()["type"] == "error"
    response = gateway.post("/v1/messages/count_tokens", secret, {**body, "messages": []})
    assert response.status_code == 400
    _, limited = make_key(user, allowed_models=["openai:*"])
    response = gateway.post("/v1/messages/count_tokens", limited, body)
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    settings.OTARI_MASTER_KEY = MASTER_KEY
    assert gateway.post("/v1/messages/count_tokens", MASTER_KEY, body).status_code == 200


# --- the master key names the user by metadata.user_id on /v1/messages -------------------


def test_master_key_names_the_user_with_metadata_user_id(gateway, erin, settings):
    _user, secret = erin
    settings.OTARI_MASTER_KEY = MASTER_KEY
    body = body_for("messages", "anthropic:m")
    response = gateway.post(PATHS["messages"], MASTER_KEY, body)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    response = gateway.post(
        PATHS["messages"], MASTER_KEY, {**body, "metadata": {"user_id": "nobody"}}
    )
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"
    response = gateway.post(
        PATHS["messages"], MASTER_KEY, {**body, "metadata": {"user_id": "erin"}}
    )
    assert response.status_code == 200
    assert UsageLog.objects.get().user_id == "erin"
    # An API key naming someone else is refused.
    response = gateway.post(PATHS["messages"], secret, {**body, "metadata": {"user_id": "zed"}})
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"


# --- the anthropic provider on the wire ---------------------------------------------------


def test_anthropic_provider_headers_and_path(gateway, erin):
    _user, secret = erin
    with gateway.client(secret) as client:
        response = client.post(
            PATHS["messages"],
            json=body_for("messages", "anthropic:m"),
            headers={"anthropic-version": "2023-06-01", "anthropic-beta": "some-beta-2025"},
        )
    assert response.status_code == 200
    sent = gateway.fake.last_request
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-test-provider-key"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == "some-beta-2025"
    assert "authorization" not in sent.headers
    assert sent.body["model"] == "m"
    # A translated request does not carry the client's Anthropic headers to OpenAI.
    with gateway.client(secret) as client:
        client.post(
            PATHS["messages"],
            json=body_for("messages", "openai:m"),
            headers={"anthropic-beta": "some-beta-2025"},
        )
    sent = gateway.fake.last_request
    assert sent.path == "/v1/chat/completions"
    assert "anthropic-beta" not in sent.headers
    assert sent.headers["authorization"] == "Bearer sk-test-provider-key"


def test_anthropic_api_base_with_or_without_v1():
    from common.config import ProviderConfig
    from llm_proxy.providers.anthropic import AnthropicProvider

    root = AnthropicProvider(ProviderConfig(name="a", kind="anthropic", api_base="http://h:1/"))
    v1 = AnthropicProvider(ProviderConfig(name="b", kind="anthropic", api_base="http://h:1/v1"))
    default = AnthropicProvider(ProviderConfig(name="c", kind="anthropic"))
    assert root.api_base + root.path("messages") == "http://h:1/v1/messages"
    assert v1.api_base + v1.path("messages") == "http://h:1/v1/messages"
    assert default.api_base + default.path("messages") == "https://api.anthropic.com/v1/messages"


def test_provider_errors_keep_each_endpoints_shape(gateway, erin):
    user, secret = erin
    for selector in ("anthropic:m-fail-429", "openai:m-fail-429", "anthropic:m-fail-400"):
        set_price(selector, "0.15", "0.60")
    response = gateway.post(PATHS["messages"], secret, body_for("messages", "anthropic:m-fail-429"))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"
    # An OpenAI-style provider error reaches a messages client in the messages shape...
    response = gateway.post(PATHS["messages"], secret, body_for("messages", "openai:m-fail-429"))
    assert response.json()["error"]["type"] == "rate_limit_error"
    # ...and an Anthropic one a responses client in the OpenAI shape, redacted.
    response = gateway.post(
        PATHS["responses"], secret, body_for("responses", "anthropic:m-fail-400")
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "sk-secret" not in error["message"]
    assert "internal.example" not in error["message"]
    assert_books_balance(user)


# --- keepalives while the provider is silent (docs/SPEC.md §4) -------------------------------

KEEPALIVES = {"chat": ": keepalive", "messages": "event: ping", "responses": ": keepalive"}


@pytest.mark.parametrize("instance", ["openai", "anthropic"])
@pytest.mark.parametrize("api", ["chat", "messages", "responses"])
def test_keepalive_in_each_apis_form(gateway, erin, settings, api, instance):
    user, secret = erin
    settings.OTARI_STREAM_KEEPALIVE_SECONDS = 0.05
    model = f"{instance}:m-chunks-2-delay-200"
    set_price(model, "0.15", "0.60")
    response = gateway.post(PATHS[api], secret, body_for(api, model, stream=True))
    assert response.status_code == 200
    # The fake's own Anthropic stream carries one ping of its own; ours are the rest.
    assert response.text.count(KEEPALIVES[api]) >= 3
    assert UsageLog.objects.get().status == "success"
    assert_books_balance(user)


# --- malformed bodies never crash the gateway ---------------------------------------------

GARBAGE = (42, "text", True, [1], {"a": 1}, [{"type": 3}], [{"type": "text"}], None)
FIELDS = {
    "chat": (
        "messages",
        "tools",
        "tool_choice",
        "stop",
        "temperature",
        "response_format",
        "stream_options",
        "parallel_tool_calls",
        "user",
        "max_tokens",
    ),
    "messages": (
        "messages",
        "system",
        "tools",
        "tool_choice",
        "stop_sequences",
        "temperature",
        "metadata",
        "max_tokens",
        "thinking",
    ),
    "responses": (
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "text",
        "reasoning",
        "temperature",
        "max_output_tokens",
        "user",
        "previous_response_id",
    ),
}


@pytest.mark.parametrize("api", ["chat", "messages", "responses"])
def test_malformed_fields_are_refused_in_shape_never_a_500(gateway, erin, api):
    """Every field of each API set to values of the wrong type, on a native and a
    translated route: a 4xx in the API's shape (or the provider's answer), never a 500,
    and nothing left held."""
    user, secret = erin
    with gateway.client(secret) as client:
        for instance in ("openai", "anthropic"):
            for field in FIELDS[api]:
                for value in GARBAGE:
                    body = {**body_for(api, f"{instance}:m"), field: value}
                    response = client.post(PATHS[api], json=body)
                    assert response.status_code < 500, (instance, field, value, response.text)
                    if response.status_code >= 400:
                        assert error_shape_ok(api, response.json())
                    # Also as a list item, where the API expects objects in arrays.
                    if field in ("messages", "input", "tools"):
                        body = {**body_for(api, f"{instance}:m"), field: [value]}
                        response = client.post(PATHS[api], json=body)
                        assert response.status_code < 500, (instance, field, value)
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
    assert_books_balance(user)


def test_an_instance_serves_only_apis_its_kind_speaks():
    from django.core.exceptions import ImproperlyConfigured

    from common.config import ProviderConfig
    from llm_proxy.providers.openai import OpenAIProvider

    chat_only = OpenAIProvider(ProviderConfig(name="v", kind="openai", apis=("chat",)))
    assert chat_only.apis == {"chat"}
    with pytest.raises(ImproperlyConfigured, match="does not speak messages"):
        OpenAIProvider(ProviderConfig(name="v", kind="openai", apis=("chat", "messages")))
