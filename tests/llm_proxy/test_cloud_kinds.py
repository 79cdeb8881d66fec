"""The bedrock, gemini and vertex kinds through HTTP into the ASGI app, against fakes of
their real wire formats on loopback (tests/fake_cloud.py): SigV4-verified Converse and
binary ConverseStream; generateContent with an API key; Vertex with a service account's
OAuth token from a fake token endpoint.

Every kind x client API x stream mode is answered, translated, and charged to the
micro-dollar from the provider's usage (cache tokens included); a stream that breaks
or a client that leaves is charged what was delivered, a failure before the commit
point is refunded, and a 429 keeps its Retry-After.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import time_machine
from django.conf import settings

from budgets.models import Hold
from tests.assertions import assert_books_balance
from tests.factories import make_budget, make_key, make_user, set_price
from tests.fake_cloud import (
    AWS_ACCESS_KEY,
    AWS_REGION,
    AWS_SECRET_KEY,
    GEMINI_API_KEY,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    TEXT,
    TOOL_ARGUMENTS,
    WORDS,
    FakeCloud,
)
from tests.llm_proxy.apis import APIS, PATHS, body_for, error_shape_ok, sse_events, stream_error
from tests.llm_proxy.apis import text_of as json_text_of
from usage.models import UsageLog
from usage.pricing import Rates, TokenUsage, cost_usd, prompt_tokens_from_chars

pytestmark = pytest.mark.postgres

KINDS = ("bedrock", "gemini", "vertex")
# An AWS credential_process: the test key pair with a session token numbered by how many
# times it ran, expiring after the lifetime (seconds) written in its directory.
CREDENTIAL_PROCESS = f"""
import json, sys, datetime, pathlib
directory = pathlib.Path(sys.argv[1])
runs = directory / "runs"
count = len(runs.read_text()) + 1 if runs.exists() else 1
runs.write_text("x" * count)
lifetime = int((directory / "lifetime").read_text())
expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=lifetime)
print(json.dumps({{"Version": 1, "AccessKeyId": "{AWS_ACCESS_KEY}",
                  "SecretAccessKey": "{AWS_SECRET_KEY}", "SessionToken": f"session-{{count}}",
                  "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}}))
"""
RATES = Rates(
    input_per_mtok=Decimal("3"),
    output_per_mtok=Decimal("15"),
    cache_read_per_mtok=Decimal("0.3"),
    cache_write_per_mtok=Decimal("3.75"),
)
MODELS = {
    "bedrock": "anthropic.claude-3-5-haiku-20241022-v1:0",
    "gemini": "gemini-2.5-flash",
    "vertex": "gemini-2.5-pro",
}


@pytest.fixture(scope="module")
def cloud(gateway_config_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """The fake cloud, and the gateway's configuration extended with one instance of
    each kind on it; AWS credentials in the environment (the chain's first link)."""
    from common.config import gateway_config
    from llm_proxy.providers import providers

    directory = tmp_path_factory.mktemp("cloud")
    env = {
        "AWS_ACCESS_KEY_ID": AWS_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET_KEY,
        # Nothing from the machine's own AWS setup or instance metadata.
        "AWS_CONFIG_FILE": str(directory / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(directory / "aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {name: os.environ.get(name) for name in (*env, "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    os.environ.update(env)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(name, None)
    with FakeCloud() as fake:
        account = fake.write_service_account(directory / "service-account.json")
        # A profile whose credentials come from a process, with an expiry: botocore's
        # refreshable credentials, as a role session gives them.
        process = directory / "credential_process.py"
        process.write_text(CREDENTIAL_PROCESS)
        (directory / "aws-config").write_text(
            f"[profile temp]\ncredential_process = {sys.executable} {process} {directory}\n"
        )
        (directory / "aws-credentials").write_text(
            "[wrong]\naws_access_key_id = AKIDWRONGPROFILEKEY1\n"
            "aws_secret_access_key = wrong-profile-secret\n"
        )
        config = directory / "otari.yaml"
        config.write_text(
            gateway_config_file.read_text().replace(
                "providers:\n",
                f"""providers:
  bedrock: {{kind: bedrock, region: {AWS_REGION}, api_base: "{fake.url}", timeout: 10}}
  bedrock-temp: {{kind: bedrock, region: {AWS_REGION}, profile: temp,
                 api_base: "{fake.url}", timeout: 10}}
  bedrock-wrongkey: {{kind: bedrock, region: {AWS_REGION}, profile: wrong,
                     api_base: "{fake.url}", timeout: 10}}
  gemini: {{kind: gemini, api_key: {GEMINI_API_KEY}, api_base: "{fake.url}/v1beta",
           timeout: 10}}
  gemini-wrongkey: {{kind: gemini, api_key: not-the-key, api_base: "{fake.url}/v1beta"}}
  vertex: {{kind: vertex, location: {fake.vertex_location}, api_base: "{fake.url}/v1",
           credentials_file: "{account}", timeout: 10}}
""",
                1,
            )
        )
        previous = settings.OTARI_CONFIG
        settings.OTARI_CONFIG = str(config)
        gateway_config.cache_clear()
        providers.cache_clear()
        try:
            yield fake
        finally:
            settings.OTARI_CONFIG = previous
            gateway_config.cache_clear()
            providers.cache_clear()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture
def dana(gateway, cloud):
    cloud.reset()
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")), user_id="dana")
    _, secret = make_key(user)
    return user, secret


def _price(kind: str, model: str) -> str:
    set_price(
        f"{kind}:{model}",
        "3",
        "15",
        cache_read_per_mtok=Decimal("0.3"),
        cache_write_per_mtok=Decimal("3.75"),
    )
    return f"{kind}:{model}"


def _streamed_text(api: str, text: str) -> str:
    out = []
    for name, data in sse_events(text):
        if data == "[DONE]":
            continue
        event = json.loads(data)
        if api == "chat":
            for choice in event.get("choices") or ():
                out.append(choice["delta"].get("content") or "")
        elif api == "messages" and name == "content_block_delta":
            out.append(event["delta"].get("text", ""))
        elif api == "responses" and name == "response.output_text.delta":
            out.append(event["delta"])
    return "".join(out)


def _streamed_usage(api: str, text: str) -> dict:
    """The usage the client was told, from the stream's last event that carries it."""
    usage = {}
    for _, data in sse_events(text):
        if data == "[DONE]":
            continue
        event = json.loads(data)
        found = event.get("usage") or (event.get("response") or {}).get("usage")
        if found:
            usage = found
    return usage


def _tokens_shown(api: str, usage: dict) -> tuple[int, int]:
    """(All prompt tokens, cache reads) as each client API reports them."""
    if api == "chat":
        return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]
    if api == "messages":
        prompt = (
            usage["input_tokens"]
            + usage["cache_read_input_tokens"]
            + usage["cache_creation_input_tokens"]
        )
        return prompt, usage["cache_read_input_tokens"]
    return usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_api_is_answered_and_charged_exactly(gateway, dana, cloud, kind, api, stream):
    user, secret = dana
    # Bedrock reports cache writes; Gemini only cache reads.
    model = MODELS[kind] + ("-cached-40-cachewrite-8" if kind == "bedrock" else "-cached-40")
    body = body_for(api, _price(kind, model), stream=stream)
    if api == "chat" and stream:
        body["stream_options"] = {"include_usage": True}

    response = gateway.post(PATHS[api], secret, body)

    assert response.status_code == 200, response.text
    usage = TokenUsage(
        input_tokens=INPUT_TOKENS,
        output_tokens=OUTPUT_TOKENS,
        cache_read_tokens=40,
        cache_write_tokens=8 if kind == "bedrock" else 0,
    )
    expected = cost_usd(usage, RATES)
    if stream:
        assert stream_error(api, response.text) is None
        assert _streamed_text(api, response.text) == TEXT
        shown = _streamed_usage(api, response.text)
    else:
        assert json_text_of(api, response.json()) == TEXT
        assert Decimal(response.headers["X-Otari-Cost-Usd"]) == expected
        shown = response.json()["usage"]
    assert _tokens_shown(api, shown) == (usage.prompt_tokens, 40)
    row = UsageLog.objects.get()
    assert (row.status, row.status_code, row.provider) == ("success", 200, kind)
    assert (row.completion_tokens, row.cache_read_tokens) == (OUTPUT_TOKENS, 40)
    assert row.cache_write_tokens == usage.cache_write_tokens
    assert row.cost_usd == expected
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (expected, 0)
    assert_books_balance(user)
    # The provider got the model in its URL, and the stream mode it was asked for.
    sent = cloud.of_kind(kind)[-1]
    assert sent.path.split("?")[0].endswith(
        ("/converse-stream" if stream else "/converse")
        if kind == "bedrock"
        else (":streamGenerateContent" if stream else ":generateContent")
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", KINDS)
def test_tool_calls_come_back_in_the_clients_api(gateway, dana, cloud, kind, stream):
    _, secret = dana
    selector = _price(kind, MODELS[kind] + "-tools")
    body = body_for("chat", selector, stream=stream)
    body["tools"] = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]

    response = gateway.post(PATHS["chat"], secret, body)

    assert response.status_code == 200, response.text
    if stream:
        arguments, names, finish = "", [], None
        for _, data in sse_events(response.text):
            if data == "[DONE]":
                continue
            for choice in json.loads(data).get("choices") or ():
                for call in choice["delta"].get("tool_calls") or ():
                    names.append(call["function"].get("name"))
                    arguments += call["function"].get("arguments") or ""
                finish = choice.get("finish_reason") or finish
        assert "get_weather" in names
    else:
        message = response.json()["choices"][0]
        call = message["message"]["tool_calls"][0]
        arguments, finish = call["function"]["arguments"], message["finish_reason"]
        assert call["function"]["name"] == "get_weather"
    assert json.loads(arguments) == TOOL_ARGUMENTS
    assert finish == "tool_calls"
    # The tool's declaration reached the provider in its own shape.
    sent = cloud.of_kind(kind)[-1].body
    if kind == "bedrock":
        assert sent["toolConfig"]["tools"][0]["toolSpec"]["name"] == "get_weather"
    else:
        assert sent["tools"][0]["functionDeclarations"][0]["name"] == "get_weather"


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_that_breaks_is_charged_what_was_delivered(gateway, dana, kind, api):
    user, secret = dana
    body = body_for(api, _price(kind, MODELS[kind] + "-midstream"), stream=True)

    response = gateway.post(PATHS[api], secret, body)

    # Committed: 200, then an error event in the client's API.
    assert response.status_code == 200
    assert stream_error(api, response.text) is not None
    delivered = "".join(WORDS[:2])
    assert _streamed_text(api, response.text) == delivered
    row = UsageLog.objects.get()
    assert (row.status, row.status_code) == ("error", 502)
    # No usage reached the gateway (Bedrock sends it last; Gemini's running count has
    # no output yet): the prompt estimate plus the output the client was sent.
    prompt = prompt_tokens_from_chars(len(body.get("input") or body["messages"][0]["content"]))
    charged = TokenUsage(
        input_tokens=INPUT_TOKENS if kind != "bedrock" else prompt,
        output_tokens=prompt_tokens_from_chars(len(delivered)),
    )
    assert (row.prompt_tokens, row.completion_tokens) == (
        charged.input_tokens,
        charged.output_tokens,
    )
    assert row.cost_usd == cost_usd(charged, RATES)
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
    assert_books_balance(user)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_429_is_a_rate_limit_with_retry_after_and_a_refund(gateway, dana, kind, api, stream):
    user, secret = dana
    body = body_for(api, _price(kind, MODELS[kind] + "-fail-429"), stream=stream)

    response = gateway.post(PATHS[api], secret, body)

    assert response.status_code == 429
    assert error_shape_ok(api, response.json())
    # Bedrock's header passed on; Google's RetryInfo detail ("7s") turned into one.
    assert response.headers["Retry-After"] == "7"
    row = UsageLog.objects.get()
    assert (row.status, row.status_code, row.cost_usd) == ("error", 429, None)
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (0, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_opening_with_an_error_is_refunded(gateway, dana, kind):
    user, secret = dana
    body = body_for("chat", _price(kind, MODELS[kind] + "-errorfirst"), stream=True)

    response = gateway.post(PATHS["chat"], secret, body)

    assert response.status_code == 502
    assert error_shape_ok("chat", response.json())
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (0, 0)


@pytest.mark.parametrize("status", [400, 500])
@pytest.mark.parametrize("kind", KINDS)
def test_provider_errors_map_as_on_the_other_kinds(gateway, dana, kind, status):
    _, secret = dana
    body = body_for("messages", _price(kind, f"{MODELS[kind]}-fail-{status}"))

    response = gateway.post(PATHS["messages"], secret, body)

    assert response.status_code == {400: 400, 500: 502}[status]
    assert error_shape_ok("messages", response.json())


def test_bedrock_requests_carry_a_valid_sigv4_signature(gateway, dana, cloud):
    """The fake answers only correctly signed requests (403 otherwise), so every success
    above proves the signature; this one looks at what was signed."""
    _, secret = dana
    response = gateway.post(PATHS["chat"], secret, body_for("chat", _price("bedrock", "m:0")))

    assert response.status_code == 200
    sent = cloud.of_kind("bedrock")[-1]
    assert sent.headers["authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={AWS_ACCESS_KEY}/"
    )
    assert f"/{AWS_REGION}/bedrock/aws4_request" in sent.headers["authorization"]
    assert AWS_SECRET_KEY not in json.dumps(sent.headers)
    # The model id's ':' is percent-encoded in its one path segment.
    assert sent.path == "/model/m%3A0/converse"


def test_bedrock_credentials_from_a_profile_and_a_wrong_key(gateway, dana, cloud):
    """The `profile` option reads the shared credentials file (the chain's profile link);
    a key the service rejects is a provider auth error, its secret never shown."""
    _, secret = dana
    response = gateway.post(
        PATHS["chat"], secret, body_for("chat", _price("bedrock-wrongkey", "m"))
    )

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "provider_auth_error"
    sent = cloud.of_kind("bedrock")[-1]
    assert "Credential=AKIDWRONGPROFILEKEY1/" in sent.headers["authorization"]
    assert "wrong-profile-secret" not in response.text


def test_vertex_fetches_a_token_once_and_refreshes_it_before_expiry(gateway, dana, cloud):
    from llm_proxy.providers import providers

    _, secret = dana
    provider = providers()["vertex"]
    provider._token._value = None  # start without a token
    issued = len(cloud.tokens_issued)
    selector = _price("vertex", "gemini-2.5-pro")

    for _ in range(3):
        assert gateway.chat(secret, model=selector).status_code == 200
    # One token for all three requests, each sent with it.
    assert len(cloud.tokens_issued) == issued + 1
    used = {r.headers["authorization"] for r in cloud.of_kind("vertex")}
    assert used == {f"Bearer {cloud.tokens_issued[-1]}"}

    # A token inside the refresh window (5 minutes) but still valid is used while a new
    # one is fetched in the background; the next request gets the new one.
    cloud.token_lifetime_s = 240
    provider._token._value = None
    assert gateway.chat(secret, model=selector).status_code == 200
    near_expiry = cloud.tokens_issued[-1]
    cloud.token_lifetime_s = 3600
    assert gateway.chat(secret, model=selector).status_code == 200
    assert _wait_for(lambda: len(cloud.tokens_issued) == issued + 3)
    assert cloud.of_kind("vertex")[-1].headers["authorization"] == f"Bearer {near_expiry}"
    assert gateway.chat(secret, model=selector).status_code == 200
    assert cloud.of_kind("vertex")[-1].headers["authorization"] == (
        f"Bearer {cloud.tokens_issued[-1]}"
    )
    assert len(cloud.tokens_issued) == issued + 3


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.mark.parametrize("kind", KINDS)
def test_the_request_reaches_the_provider_in_its_own_shape(gateway, dana, cloud, kind):
    _, secret = dana
    response = gateway.chat(
        secret,
        model=_price(kind, MODELS[kind]),
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        max_tokens=64,
        temperature=0.5,
        stop=["END"],
    )

    assert response.status_code == 200
    sent = cloud.of_kind(kind)[-1].body
    if kind == "bedrock":
        assert sent == {
            "messages": [{"role": "user", "content": [{"text": "Hi"}]}],
            "system": [{"text": "Be brief."}],
            "inferenceConfig": {"maxTokens": 64, "temperature": 0.5, "stopSequences": ["END"]},
        }
    else:
        assert sent == {
            "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "generationConfig": {
                "maxOutputTokens": 64,
                "temperature": 0.5,
                "stopSequences": ["END"],
            },
        }


@pytest.mark.parametrize("kind", KINDS)
def test_what_the_provider_cannot_express_is_refused_before_any_hold(gateway, dana, kind):
    user, secret = dana
    response = gateway.chat(secret, model=_price(kind, MODELS[kind]), reasoning_effort="high")

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "untranslatable_request"
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (0, 0)


def test_bedrock_role_credentials_are_refreshed_ahead_of_expiry(gateway, dana, cloud):
    """Temporary AWS credentials (here from a credential_process, as from a role) are
    loaded once, then renewed in the background within 15 minutes of their expiry while
    requests go on with the current ones."""
    _, secret = dana
    directory = Path(os.environ["AWS_CONFIG_FILE"]).parent
    runs = directory / "runs"
    runs.unlink(missing_ok=True)
    (directory / "lifetime").write_text("3600")
    selector = _price("bedrock-temp", "m")

    for _ in range(3):
        assert gateway.chat(secret, model=selector).status_code == 200
    # One process run for three requests, each signed with its session token.
    assert len(runs.read_text()) == 1
    tokens = {r.headers.get("x-amz-security-token") for r in cloud.of_kind("bedrock")}
    assert tokens == {"session-1"}

    # 48 minutes on, 12 minutes before expiry (the whole process: the fake checks the
    # signature's date against the same clock).
    with time_machine.travel(datetime.now(UTC) + timedelta(minutes=48), tick=True):
        assert gateway.chat(secret, model=selector).status_code == 200
        assert cloud.of_kind("bedrock")[-1].headers["x-amz-security-token"] == "session-1"
        assert _wait_for(lambda: len(runs.read_text()) == 2)
        assert gateway.chat(secret, model=selector).status_code == 200
        assert cloud.of_kind("bedrock")[-1].headers["x-amz-security-token"] == "session-2"
    assert len(runs.read_text()) == 2


@pytest.mark.parametrize(
    ("kind", "options", "complaint"),
    [
        ("bedrock", {"region": "us-east-1", "regoin": "x"}, "unknown option"),
        ("vertex", {"project": "p", "credentials": "x"}, "unknown option"),
        ("gemini", {"location": "x"}, "unknown option"),
    ],
)
def test_a_kind_refuses_options_it_does_not_know(kind, options, complaint):
    from django.core.exceptions import ImproperlyConfigured

    from common.config import ProviderConfig
    from llm_proxy.providers import PROVIDER_CLASSES

    with pytest.raises(ImproperlyConfigured, match=complaint):
        PROVIDER_CLASSES[kind](ProviderConfig(name="x", kind=kind, options=options))


def test_bedrock_needs_a_region(monkeypatch, tmp_path):
    from django.core.exceptions import ImproperlyConfigured

    from common.config import ProviderConfig
    from llm_proxy.providers.bedrock import BedrockProvider

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ImproperlyConfigured, match="needs a region"):
        BedrockProvider(ProviderConfig(name="b", kind="bedrock"))
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    provider = BedrockProvider(ProviderConfig(name="b", kind="bedrock"))
    assert provider.api_base == "https://bedrock-runtime.eu-west-3.amazonaws.com"


def test_a_gemini_key_the_service_rejects_is_a_provider_auth_error(gateway, dana):
    """AI Studio says 400 for a bad key; the caller's request is not what is wrong."""
    user, secret = dana
    response = gateway.chat(secret, model=_price("gemini-wrongkey", "gemini-2.5-flash"))

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "provider_auth_error"
    assert "not-the-key" not in response.text
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (0, 0)


@pytest.mark.parametrize("api", ["chat", "messages"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_client_that_leaves_mid_stream_is_charged_what_it_was_sent(
    gateway, dana, cloud, kind, api
):
    user, secret = dana
    body = body_for(api, _price(kind, MODELS[kind] + "-slow"), stream=True)

    with gateway.client(secret) as client, client.stream("POST", PATHS[api], json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if "Hello" in line:  # the first word arrived: hang up
                break

    assert _wait_for(lambda: UsageLog.objects.exists(), timeout=10)
    row = UsageLog.objects.get()
    assert (row.status, row.status_code) == ("client_disconnected", 499)
    assert 1 <= row.completion_tokens <= 3
    charged = TokenUsage(input_tokens=row.prompt_tokens, output_tokens=row.completion_tokens)
    assert row.cost_usd == cost_usd(charged, RATES)
    # The upstream stream was closed, not left running.
    assert _wait_for(lambda: cloud.aborted_by_client == 1)
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
    assert_books_balance(user)
