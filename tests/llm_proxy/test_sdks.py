"""The official `openai` and `anthropic` SDKs against the running gateway.

Each endpoint is exercised natively and translated: chat and responses on openai-kind
(`openai`), on an openai-kind server without the Responses API (`chatonly`: responses
translated to chat) and on anthropic-kind (`anthropic`: translated to messages);
messages on `anthropic` (native) and on `openai` (translated to chat). The SDKs'
streaming helpers must accumulate the right final answer from what the gateway sends.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal

import anthropic
import openai
import pytest

from budgets.models import Hold
from tests.assertions import assert_books_balance
from tests.factories import make_budget, make_key, make_user, set_price
from tests.fake_provider import TOOL_ARGUMENTS, TOOL_NAME, WORDS
from tests.llm_proxy.apis import PROMPT
from usage.models import UsageLog
from usage.pricing import Rates, TokenUsage, cost_usd

pytestmark = pytest.mark.postgres

RATES = Rates(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
PROMPT_TOKENS = math.ceil(len(PROMPT) / 4)
WEATHER_TOOL = {
    "name": TOOL_NAME,
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
OPENAI_INSTANCES = ["openai", "chatonly", "anthropic"]
ANTHROPIC_INSTANCES = ["anthropic", "openai"]


def price(*selectors: str) -> None:
    for selector in selectors:
        set_price(selector, "0.15", "0.60")


@pytest.fixture
def dave():
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")), user_id="dave")
    _, secret = make_key(user)
    return user, secret


@pytest.fixture
def oai(gateway, dave):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=dave[1], max_retries=0)


@pytest.fixture
def claude(gateway, dave):
    return anthropic.Anthropic(base_url=gateway.url, api_key=dave[1], max_retries=0)


def _charged(user, completion_tokens: int = 5) -> None:
    """One successful row at the fake's token counts, and books that balance."""
    row = UsageLog.objects.get()
    assert (row.status, row.prompt_tokens, row.completion_tokens) == (
        "success",
        PROMPT_TOKENS,
        completion_tokens,
    )
    assert row.cost_usd == cost_usd(
        TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=completion_tokens), RATES
    )
    assert_books_balance(user)
    assert user.reserved_usd == 0


# --- openai: chat completions ------------------------------------------------------------


@pytest.mark.parametrize("instance", ["openai", "anthropic"])
def test_openai_chat_create(oai, dave, instance):
    price(f"{instance}:m-chunks-5")
    completion = oai.chat.completions.create(
        model=f"{instance}:m-chunks-5", messages=[{"role": "user", "content": PROMPT}]
    )
    assert completion.choices[0].message.content == "".join(WORDS[:5])
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        PROMPT_TOKENS,
        5,
    )
    _charged(dave[0])


@pytest.mark.parametrize("instance", ["openai", "anthropic"])
def test_openai_chat_stream_helper(oai, dave, instance):
    price(f"{instance}:m-chunks-5")
    with oai.chat.completions.stream(
        model=f"{instance}:m-chunks-5",
        messages=[{"role": "user", "content": PROMPT}],
        stream_options={"include_usage": True},
    ) as stream:
        deltas = [event.delta for event in stream if event.type == "content.delta"]
        final = stream.get_final_completion()
    assert "".join(deltas) == "".join(WORDS[:5])
    assert final.choices[0].message.content == "".join(WORDS[:5])
    assert final.usage.completion_tokens == 5
    _charged(dave[0])


@pytest.mark.parametrize("instance", ["openai", "anthropic"])
def test_openai_chat_tool_call_streamed(oai, dave, instance):
    price(f"{instance}:m-tools")
    with oai.chat.completions.stream(
        model=f"{instance}:m-tools",
        messages=[{"role": "user", "content": PROMPT}],
        tools=[{"type": "function", "function": WEATHER_TOOL}],
    ) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls[0].function.name == TOOL_NAME
    assert json.loads(message.tool_calls[0].function.arguments) == json.loads(TOOL_ARGUMENTS)
    _charged(dave[0], completion_tokens=4)


# --- openai: responses -------------------------------------------------------------------


@pytest.mark.parametrize("instance", OPENAI_INSTANCES)
def test_openai_responses_create(oai, dave, instance):
    price(f"{instance}:m-chunks-5")
    response = oai.responses.create(model=f"{instance}:m-chunks-5", input=PROMPT)
    assert response.output_text == "".join(WORDS[:5])
    assert response.status == "completed"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (PROMPT_TOKENS, 5)
    _charged(dave[0])


@pytest.mark.parametrize("instance", OPENAI_INSTANCES)
def test_openai_responses_stream_helper_final_response(oai, dave, instance):
    price(f"{instance}:m-chunks-5")
    with oai.responses.stream(
        model=f"{instance}:m-chunks-5", input=PROMPT, instructions="Be brief."
    ) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "".join(WORDS[:5])
    assert final.output_text == "".join(WORDS[:5])
    assert final.status == "completed"
    assert final.usage.output_tokens == 5
    row = UsageLog.objects.get()
    assert (row.status, row.completion_tokens) == ("success", 5)
    assert_books_balance(dave[0])


@pytest.mark.parametrize("instance", OPENAI_INSTANCES)
def test_openai_responses_tool_call(oai, dave, instance):
    price(f"{instance}:m-tools")
    tool = {"type": "function", **WEATHER_TOOL}
    with oai.responses.stream(model=f"{instance}:m-tools", input=PROMPT, tools=[tool]) as stream:
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert [call.name for call in calls] == [TOOL_NAME]
    assert json.loads(calls[0].arguments) == json.loads(TOOL_ARGUMENTS)
    # The call's result goes back the Responses way, and reaches the provider translated.
    follow_up = oai.responses.create(
        model=f"{instance}:m-tools",
        input=[
            {"role": "user", "content": PROMPT},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": TOOL_NAME,
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
        ],
        tools=[tool],
    )
    assert follow_up.status == "completed"
    assert UsageLog.objects.filter(status="success").count() == 2


def test_openai_responses_capped_answer_is_incomplete(oai, dave):
    price("anthropic:m-chunks-9")
    with oai.responses.stream(
        model="anthropic:m-chunks-9", input=PROMPT, max_output_tokens=3
    ) as stream:
        events = [event.type for event in stream]
    assert events[-1] == "response.incomplete"
    assert UsageLog.objects.get().completion_tokens == 3


# --- anthropic: messages -----------------------------------------------------------------


@pytest.mark.parametrize("instance", ANTHROPIC_INSTANCES)
def test_anthropic_messages_create(claude, dave, instance):
    price(f"{instance}:m-chunks-5")
    message = claude.messages.create(
        model=f"{instance}:m-chunks-5",
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": PROMPT}],
    )
    assert message.content[0].text == "".join(WORDS[:5])
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 5
    row = UsageLog.objects.get()
    assert (row.status, row.completion_tokens) == ("success", 5)
    assert_books_balance(dave[0])


@pytest.mark.parametrize("instance", ANTHROPIC_INSTANCES)
def test_anthropic_stream_helper_final_message(claude, dave, instance):
    price(f"{instance}:m-chunks-5")
    with claude.messages.stream(
        model=f"{instance}:m-chunks-5",
        max_tokens=100,
        messages=[{"role": "user", "content": PROMPT}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join(WORDS[:5])
    assert final.content[0].text == "".join(WORDS[:5])
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 5)
    _charged(dave[0])


@pytest.mark.parametrize("instance", ANTHROPIC_INSTANCES)
def test_anthropic_tool_use_round_trip(claude, dave, instance):
    price(f"{instance}:m-tools")
    tool = {
        "name": TOOL_NAME,
        "description": "The weather in a city",
        "input_schema": WEATHER_TOOL["parameters"],
    }
    with claude.messages.stream(
        model=f"{instance}:m-tools",
        max_tokens=100,
        tools=[tool],
        messages=[{"role": "user", "content": PROMPT}],
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    call = next(block for block in final.content if block.type == "tool_use")
    assert (call.name, call.input) == (TOOL_NAME, json.loads(TOOL_ARGUMENTS))
    answer = claude.messages.create(
        model=f"{instance}:m-tools",
        max_tokens=100,
        tools=[tool],
        messages=[
            {"role": "user", "content": PROMPT},
            {"role": "assistant", "content": [block.model_dump() for block in final.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
            },
        ],
    )
    assert answer.stop_reason == "tool_use"
    assert UsageLog.objects.filter(status="success").count() == 2


def test_anthropic_count_tokens_is_local_and_free(claude, dave, gateway):
    price("anthropic:m")
    result = claude.messages.count_tokens(
        model="anthropic:m", system="Be brief.", messages=[{"role": "user", "content": PROMPT}]
    )
    assert result.input_tokens == math.ceil(len("Be brief." + PROMPT) / 4)
    assert gateway.fake.hits == 0
    assert not UsageLog.objects.exists()
    assert not Hold.objects.exists()


def test_anthropic_mid_stream_error_raises(claude, dave):
    price("anthropic:m-chunks-10-dropafter-3")
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        claude.messages.stream(
            model="anthropic:m-chunks-10-dropafter-3",
            max_tokens=100,
            messages=[{"role": "user", "content": PROMPT}],
        ) as stream,
    ):
        stream.get_final_message()
    assert "An error occurred during streaming" in str(caught.value)
    assert UsageLog.objects.get().status == "error"
    assert_books_balance(dave[0])


# --- typed errors ------------------------------------------------------------------------


def test_sdks_raise_typed_errors_for_gateway_refusals(gateway, dave):
    user, secret = dave
    price("anthropic:m", "openai:m")
    bad_claude = anthropic.Anthropic(base_url=gateway.url, api_key="gw-nope", max_retries=0)
    bad_oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key="gw-nope", max_retries=0)
    request = {"max_tokens": 10, "messages": [{"role": "user", "content": PROMPT}]}
    with pytest.raises(anthropic.AuthenticationError):
        bad_claude.messages.create(model="anthropic:m", **request)
    with pytest.raises(openai.AuthenticationError):
        bad_oai.responses.create(model="openai:m", input=PROMPT)

    broke = make_user(budget=make_budget(max_budget_usd=Decimal("0")), user_id="broke")
    _, broke_secret = make_key(broke)
    broke_claude = anthropic.Anthropic(base_url=gateway.url, api_key=broke_secret, max_retries=0)
    broke_oai = openai.OpenAI(base_url=gateway.url + "/v1", api_key=broke_secret, max_retries=0)
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        broke_claude.messages.create(model="anthropic:m", **request)
    assert denied.value.body["error"]["type"] == "permission_error"
    with (
        pytest.raises(anthropic.PermissionDeniedError),
        broke_claude.messages.stream(model="openai:m", **request) as stream,
    ):
        stream.get_final_message()
    with pytest.raises(openai.PermissionDeniedError) as denied_oai:
        broke_oai.responses.create(model="anthropic:m", input=PROMPT)
    assert denied_oai.value.code == "budget_exceeded"

    good_claude = anthropic.Anthropic(base_url=gateway.url, api_key=secret, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as bad:
        good_claude.messages.create(
            model="anthropic:m",
            max_tokens=10,
            messages=[{"role": "user", "content": [{"type": "hologram", "data": "x"}]}],
        )
    assert "hologram" in bad.value.body["error"]["message"]
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
    assert_books_balance(user)
