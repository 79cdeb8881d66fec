"""Self-tests for the fake provider (plain httpx and the official SDKs; no Django needed)."""

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fake_provider import (
    SECRET_IN_ERRORS,
    TOOL_ARGUMENTS,
    URL_IN_ERRORS,
    WORDS,
    FakeProvider,
)

pytestmark: list[pytest.MarkDecorator] = []

PROMPT = [{"role": "user", "content": "x" * 40}]  # 40 characters = 10 prompt tokens


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


@pytest.fixture
def client(fake: FakeProvider) -> Iterator[httpx.Client]:
    fake.reset()
    with httpx.Client(base_url=fake.base_url, timeout=5) as http_client:
        yield http_client


def sse(response: httpx.Response) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE body."""
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event"), fields["data"]))
    return events


def test_chat_non_stream_usage_and_recording(fake: FakeProvider, client: httpx.Client) -> None:
    body = {"model": "gpt-4o-mini-chunks-5-cached-3", "messages": PROMPT}
    r = client.post("/chat/completions", json=body, headers={"X-Trace": "t1"})
    assert r.status_code == 200
    assert r.headers["content-length"] == str(len(r.content))
    doc = r.json()
    assert doc["model"] == body["model"]
    assert doc["choices"][0]["message"]["content"] == "".join(WORDS[:5])
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"]["prompt_tokens"] == 13
    assert doc["usage"]["prompt_tokens_details"]["cached_tokens"] == 3
    assert doc["usage"]["completion_tokens"] == 5
    assert doc["usage"]["total_tokens"] == 18
    assert fake.hits == 1
    assert fake.hits_by_path == {"/v1/chat/completions": 1}
    recorded = fake.requests[0]
    assert (recorded.method, recorded.path, recorded.body) == ("POST", "/v1/chat/completions", body)
    assert recorded.headers["x-trace"] == "t1"


def test_max_tokens_truncates(client: httpx.Client) -> None:
    r = client.post("/chat/completions", json={"model": "m", "messages": PROMPT, "max_tokens": 3})
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 3
    r = client.post("/responses", json={"model": "m", "input": "hi", "max_output_tokens": 2})
    assert (r.json()["status"], r.json()["usage"]["output_tokens"]) == ("incomplete", 2)


def test_keep_alive_and_chunked_request_body(fake: FakeProvider, client: httpx.Client) -> None:
    payload = json.dumps({"model": "m", "messages": PROMPT}).encode()
    r = client.post("/chat/completions", content=iter([payload[:10], payload[10:]]))
    assert r.status_code == 200
    assert fake.requests[-1].headers["transfer-encoding"] == "chunked"
    assert fake.requests[-1].body["messages"] == PROMPT
    client.get("/models").raise_for_status()
    # Both requests shared one pooled connection (earlier tests' connections close async).
    assert fake.wait_for(lambda: fake.open_connections == 1)


def test_chat_stream_ends_with_usage_then_done(client: httpx.Client) -> None:
    body = {
        "model": "m-chunks-4",
        "messages": PROMPT,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = client.post("/chat/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["transfer-encoding"] == "chunked"
    data = [d for _, d in sse(r)]
    assert data[-1] == "[DONE]"
    usage_chunk = json.loads(data[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["prompt_tokens"] == 10
    chunks = [json.loads(d) for d in data[:-2]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "".join(
        WORDS[:4]
    )

    body["model"] = "m-chunks-4-nousage"
    data = [d for _, d in sse(client.post("/chat/completions", json=body))]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["choices"][0]["finish_reason"] == "stop"


def test_messages_stream_event_order(client: httpx.Client) -> None:
    body = {
        "model": "claude-chunks-2-cached-7-cachewrite-3",
        "max_tokens": 100,
        "stream": True,
        "system": "y" * 8,
        "messages": PROMPT,
    }
    events = sse(client.post("/messages", json=body))
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    usage = json.loads(events[0][1])["message"]["usage"]
    assert usage == {
        "input_tokens": 12,
        "cache_creation_input_tokens": 3,
        "cache_read_input_tokens": 7,
        "output_tokens": 1,
    }
    delta = json.loads(events[-2][1])
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] == 2


def test_responses_stream_ends_with_completed(client: httpx.Client) -> None:
    body = {"model": "gpt-chunks-3", "instructions": "abcd", "input": "efgh", "stream": True}
    events = sse(client.post("/responses", json=body))
    docs = [json.loads(d) for _, d in events]
    assert [d["sequence_number"] for d in docs] == list(range(len(docs)))
    assert events[0][0] == "response.created"
    assert events[-1][0] == "response.completed"
    final = docs[-1]["response"]
    assert final["usage"]["input_tokens"] == 2
    assert final["usage"]["output_tokens"] == 3
    assert final["output"][0]["content"][0]["text"] == "".join(WORDS[:3])


def test_embeddings(client: httpx.Client) -> None:
    r = client.post(
        "/embeddings", json={"model": "text-embedding-3-small", "input": ["abcd", "efghij"]}
    )
    doc = r.json()
    assert [d["index"] for d in doc["data"]] == [0, 1]
    assert all(len(d["embedding"]) == 8 for d in doc["data"])
    assert doc["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    one = client.post("/embeddings", json={"model": "e", "input": "abcd"}).json()
    assert one["data"][0]["embedding"] == doc["data"][0]["embedding"]  # deterministic


def test_fail_status_bodies(client: httpx.Client) -> None:
    r = client.post("/chat/completions", json={"model": "gpt-fail-500", "messages": PROMPT})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    r = client.post("/messages", json={"model": "claude-fail-429", "messages": PROMPT})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "rate_limit_error"
    r = client.post("/responses", json={"model": "fail-400", "input": "x"})
    assert r.status_code == 400
    assert SECRET_IN_ERRORS in r.json()["error"]["message"]
    assert URL_IN_ERRORS in r.json()["error"]["message"]


def test_require_key() -> None:
    with FakeProvider(require_key="k1") as fake, httpx.Client(base_url=fake.base_url) as c:
        body = {"model": "m", "messages": PROMPT}
        assert c.post("/chat/completions", json=body).status_code == 401
        r = c.post("/messages", json=body)
        assert (r.status_code, r.json()["error"]["type"]) == (401, "authentication_error")
        ok = c.post("/chat/completions", json=body, headers={"Authorization": "Bearer k1"})
        assert ok.status_code == 200
        assert c.post("/messages", json=body, headers={"x-api-key": "k1"}).status_code == 200


@pytest.mark.parametrize("stream", [True, False])
def test_fail_midstream_breaks_the_read(client: httpx.Client, stream: bool) -> None:
    body = {"model": "gpt-fail-midstream", "messages": PROMPT, "stream": stream}
    with pytest.raises(httpx.TransportError):
        client.post("/chat/completions", json=body)


def test_dropafter_stops_after_n_content_chunks(client: httpx.Client) -> None:
    body = {"model": "claude-dropafter-3", "max_tokens": 50, "messages": PROMPT, "stream": True}
    received: list[str] = []
    with pytest.raises(httpx.TransportError), client.stream("POST", "/messages", json=body) as r:
        received.extend(line for line in r.iter_lines() if line.startswith("event:"))
    assert received == [
        "event: message_start",
        "event: content_block_start",
        "event: ping",
        *["event: content_block_delta"] * 3,
    ]


def test_hang_and_client_timeout_counts_abort(fake: FakeProvider, client: httpx.Client) -> None:
    with pytest.raises(httpx.ReadTimeout):
        client.post("/chat/completions", json={"model": "hang", "messages": PROMPT}, timeout=0.3)
    assert fake.wait_for(lambda: fake.aborted_by_client == 1, timeout=2)
    assert fake.wait_for(lambda: fake.open_connections == 0, timeout=2)


def test_client_leaving_a_slow_stream_counts_abort(
    fake: FakeProvider, client: httpx.Client
) -> None:
    body = {"model": "m-delay-50", "messages": PROMPT, "stream": True}
    with client.stream("POST", "/chat/completions", json=body) as r:
        next(r.iter_lines())
    assert fake.wait_for(lambda: fake.aborted_by_client == 1, timeout=2)


def test_tools_chat(client: httpx.Client) -> None:
    body: dict[str, Any] = {"model": "gpt-tools", "messages": PROMPT}
    doc = client.post("/chat/completions", json=body).json()
    choice = doc["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": TOOL_ARGUMENTS}
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    body["stream"] = True
    chunks = [json.loads(d) for _, d in sse(client.post("/chat/completions", json=body))[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d)
    assert args == TOOL_ARGUMENTS
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# ------------------------------------------------------------------- the official SDKs


def test_openai_sdk(fake: FakeProvider) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0)
    done = client.chat.completions.create(model="gpt-4o-mini-chunks-3", messages=PROMPT)
    assert done.choices[0].message.content == "".join(WORDS[:3])
    assert done.usage.prompt_tokens == 10

    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=PROMPT, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(
        WORDS[i % len(WORDS)] for i in range(20)
    )
    assert chunks[-1].usage.completion_tokens == 20

    chat = client.chat.completions  # the stream helper lived under client.beta before 1.9x
    stream_helper = getattr(chat, "stream", None) or client.beta.chat.completions.stream
    with stream_helper(model="gpt-tools", messages=PROMPT) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == TOOL_ARGUMENTS

    with client.responses.stream(model="gpt-chunks-4-cached-2", input="abcd") as s:
        response = s.get_final_response()
    assert response.output_text == "".join(WORDS[:4])
    assert response.usage.input_tokens_details.cached_tokens == 2

    vectors = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(vectors.data[1].embedding) == 8
    b64 = client.embeddings.create(model="e", input="a", encoding_format="base64")
    assert isinstance(b64.data[0].embedding, str)

    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="fail-429", messages=PROMPT)


def test_anthropic_sdk(fake: FakeProvider) -> None:
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=fake.root_url, api_key="x", max_retries=0)
    with client.messages.stream(model="claude-cached-4", max_tokens=100, messages=PROMPT) as s:
        message = s.get_final_message()
    assert message.content[0].text == "".join(WORDS[i % len(WORDS)] for i in range(20))
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (10, 20)
    assert message.usage.cache_read_input_tokens == 4

    with client.messages.stream(model="claude-tools", max_tokens=100, messages=PROMPT) as s:
        message = s.get_final_message()
    assert message.stop_reason == "tool_use"
    assert message.content[0].input == {"city": "Paris"}

    done = client.messages.create(model="claude-chunks-2", max_tokens=1, messages=PROMPT)
    assert (done.stop_reason, done.usage.output_tokens) == ("max_tokens", 1)

    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(model="fail-503", max_tokens=10, messages=PROMPT)
