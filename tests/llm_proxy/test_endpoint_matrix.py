"""Every exit path of docs/SPEC.md §3.4 on every endpoint, provider kind and mode.

{chat, messages, responses} x {openai-kind, anthropic-kind provider} x {stream, not}
x {success, provider 500, timeout, connection refused, mid-stream drop, client
disconnect}, through HTTP into the ASGI app, against the fake provider. After each:
no open hold, `reserved == 0`, `spend` = the sum of the usage costs, exactly one usage
row with the right status. Half the combinations are translated (messages on an openai
provider, chat and responses on an anthropic one).
"""

from __future__ import annotations

import json
import math
from decimal import Decimal

import httpx
import pytest

from budgets.models import Hold
from tests.assertions import assert_books_balance
from tests.factories import make_budget, make_key, make_user, set_price
from tests.fake_provider import WORDS, FakeProvider
from tests.llm_proxy.apis import (
    APIS,
    INSTANCES,
    PATHS,
    PROMPT,
    body_for,
    error_shape_ok,
    sse_events,
    stream_error,
    text_of,
)
from usage.models import UsageLog
from usage.pricing import Rates, TokenUsage, cost_usd

pytestmark = pytest.mark.postgres

RATES = Rates(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
PROMPT_TOKENS = math.ceil(len(PROMPT) / 4)
OUTCOMES = ("success", "fail_500", "timeout", "refused", "midstream", "disconnect")


def cost(prompt: int, completion: int) -> Decimal:
    return cost_usd(TokenUsage(input_tokens=prompt, output_tokens=completion), RATES)


@pytest.fixture
def carol():
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")), user_id="carol")
    _, secret = make_key(user)
    return user, secret


def _scenario(kind: str, outcome: str) -> tuple[str, str]:
    """(provider instance, model) for an outcome; behaviours live in the model name."""
    instances = INSTANCES[kind]
    return {
        "success": (instances["ok"], "m-chunks-5"),
        "fail_500": (instances["ok"], "m-fail-500"),
        "timeout": (instances["short"], "m-hang"),
        "refused": (instances["dead"], "m"),
        "midstream": (instances["ok"], "m-chunks-10-dropafter-3"),
        "disconnect": (instances["ok"], "m-chunks-40-delay-100"),
    }[outcome]


def _row_when_settled() -> UsageLog:
    """The request's usage row; a disconnect is settled after the client has gone."""
    assert FakeProvider.wait_for(lambda: UsageLog.objects.exists(), timeout=10)
    return UsageLog.objects.get()


@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("api", APIS)
def test_every_exit_closes_the_hold_once(gateway, carol, api, kind, stream, outcome):
    user, secret = carol
    instance, model = _scenario(kind, outcome)
    if outcome == "disconnect" and not stream:
        model = "m-slow-2000"
    set_price(f"{instance}:{model}", "0.15", "0.60")
    body = body_for(api, f"{instance}:{model}", stream=stream)

    if outcome == "disconnect":
        _disconnect(gateway, secret, api, body, stream)
        row = _row_when_settled()
        assert (row.status, row.status_code) == ("client_disconnected", 499)
        if stream:
            # Charged what it was sent (the first word or so, not the 40 it asked for),
            # and the upstream stream was closed rather than left running.
            assert 1 <= row.completion_tokens <= 10
            assert row.cost_usd == cost(row.prompt_tokens, row.completion_tokens)
            assert gateway.fake.wait_for(lambda: gateway.fake.aborted_by_client == 1)
        else:
            assert row.cost_usd is None
    else:
        with gateway.client(secret) as client:
            response = client.post(PATHS[api], json=body)
        row = UsageLog.objects.get()
        assert response.headers["X-Otari-Request-Id"] == str(row.id)
        _check_outcome(api, stream, outcome, response, row)

    assert UsageLog.objects.count() == 1
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
    user.refresh_from_db()
    assert user.reserved_usd == 0
    assert user.spend_usd == (row.cost_usd or 0)
    assert_books_balance(user)


def _check_outcome(api, stream, outcome, response, row) -> None:
    if outcome == "success":
        assert response.status_code == 200
        assert (row.status, row.status_code) == ("success", 200)
        assert (row.prompt_tokens, row.completion_tokens) == (PROMPT_TOKENS, 5)
        assert row.cost_usd == cost(PROMPT_TOKENS, 5)
        if not stream:
            assert text_of(api, response.json()) == "".join(WORDS[:5])
            assert Decimal(response.headers["X-Otari-Cost-Usd"]) == row.cost_usd
        else:
            assert stream_error(api, response.text) is None
        return
    if outcome == "midstream" and stream:
        # Committed: 200, then an error event in the API's shape; charged what was sent.
        assert response.status_code == 200
        error = stream_error(api, response.text)
        assert error is not None
        if api == "messages":
            assert error["type"] == "error"
            assert error["error"]["type"] == "api_error"
        elif api == "responses":
            assert error["type"] == "error"
            assert isinstance(error["sequence_number"], int)
        else:
            assert response.text.rstrip().endswith("data: [DONE]")
        delivered = math.ceil(len("".join(WORDS[:3])) / 4)
        assert (row.status, row.status_code) == ("error", 502)
        assert (row.prompt_tokens, row.completion_tokens) == (PROMPT_TOKENS, delivered)
        assert row.cost_usd == cost(PROMPT_TOKENS, delivered)
        return
    # Pre-commit: an ordinary HTTP error in the API's shape, and a full refund.
    status = 504 if outcome == "timeout" else 502
    assert response.status_code == status
    assert error_shape_ok(api, response.json())
    assert (row.status, row.status_code, row.cost_usd) == ("error", status, None)
    assert Hold.objects.get().status == Hold.Status.REFUNDED


def _disconnect(gateway, secret, api, body, stream) -> None:
    if not stream:
        # Give up while the provider is still thinking.
        with gateway.client(secret) as client, pytest.raises(httpx.ReadTimeout):
            client.post(PATHS[api], json=body, timeout=0.5)
        return
    with gateway.client(secret) as client, client.stream("POST", PATHS[api], json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if "Hello" in line:  # the first word arrived: hang up
                break


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("api", APIS)
def test_fifty_failed_streams_leak_nothing(gateway, api, kind):
    """50 streams failing before their first byte, on a budget that fits about one
    hold: if any hold leaked, the normal request at the end would be refused."""
    instances = INSTANCES[kind]
    failing = [
        (instances["ok"], "m-fail-500"),
        (instances["ok"], "m-fail-503"),
        (instances["dead"], "m"),
    ]
    for instance, model in [*failing, (instances["ok"], "m-chunks-5")]:
        set_price(f"{instance}:{model}", "0.15", "0.60")
    estimate = cost(PROMPT_TOKENS, 64)
    user = make_user(budget=make_budget(max_budget_usd=estimate * Decimal("1.5")))
    _, secret = make_key(user)

    with gateway.client(secret) as client:
        for i in range(50):
            instance, model = failing[i % len(failing)]
            response = client.post(
                PATHS[api], json=body_for(api, f"{instance}:{model}", stream=True)
            )
            assert response.status_code == 502
            assert error_shape_ok(api, response.json())
        response = client.post(
            PATHS[api], json=body_for(api, f"{instances['ok']}:m-chunks-5", stream=True)
        )

    assert response.status_code == 200
    assert stream_error(api, response.text) is None
    assert UsageLog.objects.filter(status="error", status_code=502).count() == 50
    assert UsageLog.objects.filter(status="success").count() == 1
    user.refresh_from_db()
    assert user.reserved_usd == 0
    assert user.spend_usd == cost(PROMPT_TOKENS, 5)
    assert_books_balance(user)


@pytest.mark.parametrize("instance", ["openai", "anthropic", "chatonly"])
@pytest.mark.parametrize("api", APIS)
def test_identical_requests_cost_the_same_streamed_or_not(gateway, carol, api, instance):
    user, secret = carol
    model = f"{instance}:m-chunks-7-cached-3"
    set_price(model, "0.15", "0.60", cache_read_per_mtok=Decimal("0.075"))
    with gateway.client(secret) as client:
        plain = client.post(PATHS[api], json=body_for(api, model))
        streamed = client.post(PATHS[api], json=body_for(api, model, stream=True))
    assert (plain.status_code, streamed.status_code) == (200, 200)
    rows = list(UsageLog.objects.order_by("timestamp"))
    assert [row.status for row in rows] == ["success", "success"]
    first, second = rows
    assert first.cost_usd == second.cost_usd
    assert (first.prompt_tokens, first.completion_tokens, first.cache_read_tokens) == (
        second.prompt_tokens,
        second.completion_tokens,
        second.cache_read_tokens,
    )
    # Cache reads are priced at their own rate on every route (docs/SPEC.md §5).
    assert first.cache_read_tokens == 3
    assert_books_balance(user)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("api", APIS)
def test_client_giving_up_while_the_stream_opens_leaves_no_hold(gateway, carol, api, kind):
    """docs/SPEC.md §4: a client that leaves while the upstream stream is still being opened
    is refunded, and its hold released."""
    user, secret = carol
    model = f"{INSTANCES[kind]['ok']}:m-slow-2000"
    set_price(model, "0.15", "0.60")
    with gateway.client(secret) as client, pytest.raises(httpx.ReadTimeout):
        client.post(PATHS[api], json=body_for(api, model, stream=True), timeout=0.5)
    row = _row_when_settled()
    assert (row.status, row.status_code, row.cost_usd) == ("client_disconnected", 499, None)
    assert FakeProvider.wait_for(lambda: not Hold.objects.filter(status=Hold.Status.OPEN).exists())
    assert Hold.objects.get().status == Hold.Status.REFUNDED
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (0, 0)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("api", APIS)
def test_a_stream_that_opens_with_an_error_is_refunded(gateway, carol, api, kind):
    """Some servers answer 200 and report their failure as the stream's first event:
    nothing was generated, so it is a failure before the commit (an HTTP error in the
    client's API shape, a full refund), not a broken stream."""
    user, secret = carol
    instance = INSTANCES[kind]["ok"]
    set_price(f"{instance}:m-errorfirst")
    with gateway.client(secret) as client:
        response = client.post(
            PATHS[api], json=body_for(api, f"{instance}:m-errorfirst", stream=True)
        )

    assert response.status_code == 502
    assert not response.headers["content-type"].startswith("text/event-stream")
    assert error_shape_ok(api, response.json())
    row = UsageLog.objects.get()
    assert (row.status, row.status_code, row.cost_usd) == ("error", 502, None)
    assert Hold.objects.get().status == Hold.Status.REFUNDED
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (0, 0)
    assert_books_balance(user)


# The instance kind that speaks each API natively: its stream is passed through.
NATIVE = {"chat": "openai", "messages": "anthropic", "responses": "openai"}


def _stream_seen(api: str, text: str) -> tuple[list[str | None], str]:
    """What a client reads from a stream: its events' types, and the answer's text."""
    kinds, answer = [], ""
    for name, data in sse_events(text):
        if data == "[DONE]":
            kinds.append("[DONE]")
            continue
        event = json.loads(data)
        kinds.append(name or event.get("object"))
        if api == "chat":
            for choice in event.get("choices") or ():
                answer += choice["delta"].get("content") or ""
        elif name in ("content_block_delta", "response.output_text.delta"):
            delta = event["delta"]
            answer += delta if isinstance(delta, str) else delta.get("text", "")
    return kinds, answer


@pytest.mark.parametrize("api", APIS)
def test_a_passed_through_stream_is_the_same_whatever_its_framing(gateway, carol, api):
    """A native stream goes to the client as the provider sent it, read only for its usage
    and its end (llm_proxy/pipeline/sse.py PassThroughCodec). CRLF line ends, comments and
    blank lines between events, as some servers send them, change nothing the client
    reads or pays, whether the stream ends or breaks off: comments are not forwarded, and
    a broken stream is charged the text it delivered."""
    user, secret = carol
    seen = {}
    for framing in ("", "-sseframing"):
        for ending in ("", "-dropafter-4"):
            model = f"{NATIVE[api]}:m-chunks-9{ending}{framing}"
            set_price(model, "0.15", "0.60")
            response = gateway.post(PATHS[api], secret, body_for(api, model, stream=True))
            assert response.status_code == 200
            assert "\r" not in response.text
            assert not [line for line in response.text.split("\n") if line.startswith(":")]
            row = UsageLog.objects.get(model=model.split(":", 1)[1])
            seen[framing, ending] = (
                _stream_seen(api, response.text),
                (row.status, row.status_code, row.completion_tokens, row.cost_usd),
            )
    assert seen["-sseframing", ""] == seen["", ""]
    assert seen["-sseframing", "-dropafter-4"] == seen["", "-dropafter-4"]
    (_, answer), (status, _, completion, _) = seen["", ""]
    assert (answer, status, completion) == ("".join(WORDS[:9]), "success", 9)
    (_, answer), (status, code, completion, charged) = seen["", "-dropafter-4"]
    assert (answer, status, code) == ("".join(WORDS[:4]), "error", 502)
    # Charged what was delivered: the prompt estimate and the text sent, 4 characters a token.
    delivered = math.ceil(len("".join(WORDS[:4])) / 4)
    assert (completion, charged) == (delivered, cost(PROMPT_TOKENS, delivered))
    assert_books_balance(user)
