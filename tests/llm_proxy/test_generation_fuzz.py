"""Property-based fuzz of the three generation bodies (issue 19, "Hostile input").

Hypothesis builds request bodies that are nearly valid, in the shape of each API, with
hostile values where a client controls them: wrong types, huge and negative output
maxima, NUL bytes, CR/LF and path characters in the model and provider names, deeply
nested content, bytes that are not UTF-8, lone surrogates, `stream` true, false or
neither. Each is sent through HTTP to the gateway (the provider is the fake). Whatever
the body, the gateway:

- never answers a 5xx (the fake provider never fails here, so nothing excuses one);
- answers an error in the shape of the API called (tests/llm_proxy/apis.py), a stream
  in SSE;
- leaves no hold open, and the books balanced (docs/SPEC.md §3.5), after every example.

Bounded for CI: EXAMPLES per API (more under `python3 dev.py soak`). The management
API is fuzzed from its OpenAPI document in tests/test_api_fuzz.py.
"""

from __future__ import annotations

import json
from decimal import Decimal

import hypothesis
import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st

from budgets.models import Hold
from budgets.selectors import books_drift_list
from tests.drills import record, soaking
from tests.factories import make_budget, make_key, make_user, set_price
from tests.llm_proxy.apis import APIS, PATHS, assert_error_shape, sse_events

pytestmark = [pytest.mark.postgres, pytest.mark.drill]

EXAMPLES = 150 if soaking() else 50
MODELS = ["openai:m-chunks-2", "anthropic:m-chunks-2", "chatonly:m-chunks-2"]
# Stands for bytes that are not UTF-8: replaced in the encoded body (JSON cannot say them).
BAD_BYTES = "\u2063BADBYTES\u2063"

# --- strategies ------------------------------------------------------------------------------

hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "\x00",
            "a\x00b",
            "line\r\nX-Injected: 1",
            "%0d%0a",
            "../../etc/passwd",
            "..\\..\\windows",
            "/v1/admin",
            "\ud800",
            "x\udfffy",
            "\U0001f600",
            BAD_BYTES,
            "m" * 300,
            "<script>alert(1)</script>",
            "' OR 1=1 --",
        ]
    ),
)
# Provider and model names: valid ones, and each part made hostile.
model_name = st.one_of(
    st.sampled_from(MODELS),
    st.builds(lambda p, m: f"{p}:{m}", st.sampled_from(["openai", "anthropic"]), hostile_text),
    st.builds(lambda p: f"{p}:m-chunks-2", hostile_text),
    st.builds(lambda p, m: f"{p}/{m}", hostile_text, hostile_text),
    hostile_text,
    st.none(),
    st.integers(),
    st.lists(st.just("openai:m-chunks-2"), max_size=2),
    st.just({"provider": "openai"}),
)
token_count = st.one_of(
    st.integers(min_value=1, max_value=8),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**63, 10**30, -(10**30)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.none(),
    hostile_text,
)
stream_flag = st.one_of(st.booleans(), st.sampled_from(["true", 1, 0, None, [], {}]))
json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), hostile_text
)
deep = st.recursive(
    json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(hostile_text, inner, max_size=3)
    ),
    max_leaves=30,
)
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": hostile_text})
content = st.one_of(
    hostile_text,
    st.lists(st.one_of(text_part, deep), max_size=3),
    deep,
)
role = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "developer"]), deep)
message = st.one_of(
    st.fixed_dictionaries({"role": role, "content": content}),
    deep,
)
messages = st.one_of(
    st.lists(message, min_size=1, max_size=4),
    st.just([{"role": "user", "content": "hi"}]),
    deep,
)
extras = st.dictionaries(
    st.sampled_from(
        [
            "temperature",
            "user",
            "metadata",
            "stream_options",
            "tools",
            "tool_choice",
            "system",
            "instructions",
            "stop",
            "n",
        ]
    ),
    deep,
    max_size=3,
)


def _valid(api: str, model: str, stream: bool, listed: bool) -> dict:
    """A body the gateway serves: the starting point that mutations make hostile
    (`listed`: the Responses API's input as a list of turns rather than a string)."""
    hello = [{"role": "user", "content": "Say hello"}]
    if api == "chat":
        return {"model": model, "messages": hello, "max_tokens": 4, "stream": stream}
    if api == "messages":
        return {"model": model, "messages": hello, "max_tokens": 4, "stream": stream}
    turns = hello if listed else "Say hello"
    return {"model": model, "input": turns, "max_output_tokens": 4, "stream": stream}


# Where a mutation puts its value: a top-level field, or inside the first message.
_FIELDS = {
    "chat": ["model", "messages", "max_tokens", "max_completion_tokens", "stream"],
    "messages": ["model", "messages", "max_tokens", "stream", "system"],
    "responses": ["model", "input", "max_output_tokens", "stream", "instructions"],
}
_VALUES = {
    "model": model_name,
    "messages": messages,
    "input": st.one_of(hostile_text, messages),
    "max_tokens": token_count,
    "max_completion_tokens": token_count,
    "max_output_tokens": token_count,
    "stream": stream_flag,
}


@st.composite
def _body(draw, api: str) -> dict:
    """A valid body with up to three fields made hostile (none: about one in four, so
    that the money path is fuzzed too, streamed or not), and maybe extra fields."""
    body = _valid(api, draw(st.sampled_from(MODELS)), draw(st.booleans()), draw(st.booleans()))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from([*_FIELDS[api], "content", "role", "drop"]))
        if where == "drop":
            body.pop(draw(st.sampled_from(_FIELDS[api])), None)
        elif where in ("content", "role"):
            turns = body.get("messages") if api != "responses" else body.get("input")
            if isinstance(turns, list) and turns and isinstance(turns[0], dict):
                turns[0] = {**turns[0], where: draw(content if where == "content" else role)}
        else:
            body[where] = draw(_VALUES.get(where, deep))
    if draw(st.integers(0, 3)) == 0:
        body.update(draw(extras))
    return body


@st.composite
def encoded(draw, api: str) -> bytes:
    """The body as bytes: JSON, escaped or raw UTF-8 (lone surrogates then become bytes
    that are not UTF-8), with the BAD_BYTES marker replaced by bytes that are not."""
    body = draw(_body(api))
    if draw(st.booleans()):
        raw = json.dumps(body).encode()
    else:
        raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
    raw = raw.replace(BAD_BYTES.encode(), b"\xff\xfe\xc3(").replace(
        json.dumps(BAD_BYTES).strip('"').encode(), b"\xff\xfe\xc3("
    )
    if draw(st.integers(0, 20)) == 0:  # now and then, not JSON at all
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    return raw


# --- the property ------------------------------------------------------------------------------


@pytest.fixture
def fuzz_key(gateway):
    for model in MODELS:
        set_price(model, "0.15", "0.60")
    user = make_user(budget=make_budget(max_budget_usd=Decimal("1000")), user_id="fuzz")
    _, secret = make_key(user)
    return secret


@pytest.mark.parametrize("api", APIS)
def test_hostile_generation_bodies(gateway, fuzz_key, api):
    statuses: dict[int, int] = {}

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(raw=encoded(api))
    def example(raw: bytes) -> None:
        with gateway.client(fuzz_key) as client:
            response = client.post(
                PATHS[api], content=raw, headers={"Content-Type": "application/json"}
            )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (response.status_code, response.text[:500], raw)
        if response.status_code != 200:
            assert_error_shape(api, response.status_code, response.json())
        elif response.headers["content-type"].startswith("text/event-stream"):
            assert sse_events(response.text), response.text
        else:
            response.json()
        assert not Hold.objects.filter(status=Hold.Status.OPEN).exists(), raw

    example()
    assert not books_drift_list()
    record(
        f"generation body fuzz ({PATHS[api]})",
        requests=sum(statuses.values()),
        statuses={str(k): v for k, v in sorted(statuses.items())},
        server_errors=sum(v for k, v in statuses.items() if k >= 500),
        holds_leaked=Hold.objects.filter(status=Hold.Status.OPEN).count(),
    )
