"""The `azure` kind through HTTP, against a fake Azure OpenAI resource that checks URLs,
api-version and credentials as Azure does (tests/fake_azure.py).

Two instances (tests/conftest.py azure_config): `azure` on the v1 API with an api-key,
`azure-dated` on deployment URLs (api-version 2025-04-01-preview) with an Entra ID token.
Every client API (chat, messages, responses) x stream or not x both instances is charged
to the micro-dollar, cache reads included; failures are refunded or, once committed,
charged what was delivered, exactly as on the other kinds.
"""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
from django.core.exceptions import ImproperlyConfigured

from budgets.models import Hold
from common.config import ProviderConfig
from llm_proxy.providers.azure import AzureProvider
from tests.assertions import assert_books_balance
from tests.factories import make_budget, make_key, make_user, set_price
from tests.fake_azure import AD_TOKEN, API_KEY, RETRY_AFTER_S, FakeAzure
from tests.fake_provider import WORDS
from tests.llm_proxy.apis import (
    APIS,
    PATHS,
    PROMPT,
    body_for,
    error_shape_ok,
    stream_error,
    text_of,
)
from usage.catalog import catalog_version
from usage.models import ModelPricing, UsageLog
from usage.pricing import Rates, TokenUsage, cost_usd

pytestmark = pytest.mark.postgres

RATES = Rates(
    input_per_mtok=Decimal("2.5"),
    output_per_mtok=Decimal("10"),
    cache_read_per_mtok=Decimal("1.25"),
)


def _price(model_key: str) -> None:
    set_price(model_key, "2.5", "10", cache_read_per_mtok=Decimal("1.25"))


PROMPT_TOKENS = math.ceil(len(PROMPT) / 4)
INSTANCES = ("azure", "azure-dated")
# The upstream API each client API is sent as: Azure speaks chat and responses natively;
# messages is translated to chat.
UPSTREAM_PATHS = {
    "azure": {"chat": "/openai/v1/chat/completions", "responses": "/openai/v1/responses"},
    "azure-dated": {
        "chat": "/openai/deployments/{deployment}/chat/completions",
        "responses": "/openai/responses",
    },
}
UPSTREAM_API = {"chat": "chat", "messages": "chat", "responses": "responses"}


@pytest.fixture
def azure(gateway, fake_azure: FakeAzure) -> FakeAzure:
    fake_azure.reset()
    return fake_azure


@pytest.fixture
def dana():
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")), user_id="dana")
    _, secret = make_key(user)
    return user, secret


def _post(gateway, secret: str, api: str, body: dict):
    with gateway.client(secret) as client:
        return client.post(PATHS[api], json=body)


def _check_wire(azure: FakeAzure, instance: str, api: str, deployment: str) -> None:
    """The request as Azure saw it: URL, api-version, credentials, deployment."""
    seen = azure.last_request
    assert seen is not None
    upstream = UPSTREAM_API[api]
    assert seen.path == UPSTREAM_PATHS[instance][upstream].format(deployment=deployment)
    if instance == "azure":
        assert seen.query == ""
        assert seen.headers["api-key"] == API_KEY
        assert "authorization" not in seen.headers
        assert seen.body["model"] == deployment
    else:
        assert seen.query == "api-version=2025-04-01-preview"
        assert seen.headers["authorization"] == f"Bearer {AD_TOKEN}"
        assert "api-key" not in seen.headers
        if upstream == "responses":
            assert seen.body["model"] == deployment


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("instance", INSTANCES)
@pytest.mark.parametrize("api", APIS)
def test_every_api_is_served_and_charged_exactly(gateway, azure, dana, api, instance, stream):
    user, secret = dana
    model = "m-chunks-5-cached-3"  # no deployment mapping: the deployment of that name
    _price(f"{instance}:{model}")

    response = _post(gateway, secret, api, body_for(api, f"{instance}:{model}", stream=stream))

    assert response.status_code == 200, response.text
    _check_wire(azure, instance, api, model)
    row = UsageLog.objects.get()
    assert (row.status, row.provider, row.model) == ("success", instance, model)
    # Azure, like OpenAI, counts cached tokens inside prompt_tokens: 7 + 3 cached.
    assert (row.prompt_tokens, row.cache_read_tokens, row.completion_tokens) == (10, 3, 5)
    expected = cost_usd(
        TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=5, cache_read_tokens=3), RATES
    )
    # 7 x 2.5 + 5 x 10 + 3 x 1.25 = 71.25 micro-dollars, half-up.
    assert row.cost_usd == expected == Decimal("0.000071")
    if stream:
        assert stream_error(api, response.text) is None
        assert "".join(WORDS[:5]).split()[-1] in response.text
    else:
        assert text_of(api, response.json()) == "".join(WORDS[:5])
        assert Decimal(response.headers["X-Otari-Cost-Usd"]) == expected
    assert Hold.objects.get().status == Hold.Status.SETTLED
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (expected, 0)
    assert_books_balance(user)


@pytest.mark.parametrize("instance", INSTANCES)
def test_a_deployment_serves_its_model_priced_from_the_azure_catalog(
    gateway, azure, dana, instance
):
    """`gpt-4o` is deployed as `prod-gpt4o`; Azure answers with the deployment's model
    (`gpt-4o-2024-08-06`). Without an operator price, the catalog's Azure gpt-4o prices
    it: 7 x 2.50 + 20 x 10 = 217.5 micro-dollars, half-up."""
    user, secret = dana
    response = gateway.chat(secret, model=f"{instance}:gpt-4o")

    assert response.status_code == 200, response.text
    assert response.json()["model"] == "gpt-4o-2024-08-06"
    _check_wire(azure, instance, "chat", "prod-gpt4o")
    assert UsageLog.objects.get().cost_usd == Decimal("0.000218")
    price = ModelPricing.objects.get()
    assert (price.model_key, price.source) == (f"{instance}:gpt-4o", f"catalog {catalog_version()}")
    assert price.input_price_per_mtok_usd == Decimal("2.5")
    assert_books_balance(user)


@pytest.mark.parametrize("instance", INSTANCES)
@pytest.mark.parametrize("api", APIS)
def test_a_stream_that_breaks_is_charged_what_was_delivered(gateway, azure, dana, api, instance):
    user, secret = dana
    model = f"{instance}:m-chunks-10-dropafter-3"
    _price(model)

    response = _post(gateway, secret, api, body_for(api, model, stream=True))

    # Committed: 200, then an error event in the client API's shape.
    assert response.status_code == 200
    assert stream_error(api, response.text) is not None
    row = UsageLog.objects.get()
    delivered = math.ceil(len("".join(WORDS[:3])) / 4)
    assert (row.status, row.status_code) == ("error", 502)
    assert (row.prompt_tokens, row.completion_tokens) == (PROMPT_TOKENS, delivered)
    assert row.cost_usd == cost_usd(
        TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=delivered), RATES
    )
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (row.cost_usd, 0)
    assert_books_balance(user)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("azure:m-fail-429", 429, "provider_rate_limited"),
        ("azure-dated:m-fail-500", 502, "provider_error"),
        ("azure:missing-deployment", 404, "provider_not_found"),
        ("azure-badkey:m", 502, "provider_auth_error"),
    ],
    ids=["429", "500", "no-deployment", "bad-key"],
)
@pytest.mark.parametrize("api", APIS)
def test_azure_errors_are_mapped_and_refunded(
    gateway, azure, dana, api, model, status, code, stream
):
    user, secret = dana
    _price(model)

    response = _post(gateway, secret, api, body_for(api, model, stream=stream))

    assert response.status_code == status, response.text
    body = response.json()
    assert error_shape_ok(api, body)
    if api != "messages":
        assert body["error"]["code"] == code
    if status == 429:
        assert response.headers["Retry-After"] == RETRY_AFTER_S
    assert "not-the-key" not in response.text
    row = UsageLog.objects.get()
    assert (row.status, row.status_code, row.cost_usd) == ("error", status, None)
    assert Hold.objects.get().status == Hold.Status.REFUNDED
    user.refresh_from_db()
    assert (user.spend_usd, user.reserved_usd) == (0, 0)


@pytest.mark.parametrize("instance", INSTANCES)
def test_a_client_that_leaves_mid_stream_is_charged_what_it_was_sent(
    gateway, azure, dana, instance
):
    user, secret = dana
    model = f"{instance}:m-chunks-40-delay-100"
    _price(model)

    with (
        gateway.client(secret) as client,
        client.stream("POST", PATHS["chat"], json=body_for("chat", model, stream=True)) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if "Hello" in line:
                break

    assert FakeAzure.wait_for(lambda: UsageLog.objects.exists(), timeout=10)
    row = UsageLog.objects.get()
    assert (row.status, row.status_code) == ("client_disconnected", 499)
    assert 1 <= row.completion_tokens <= 10
    assert row.cost_usd == cost_usd(
        TokenUsage(input_tokens=row.prompt_tokens, output_tokens=row.completion_tokens), RATES
    )
    assert azure.wait_for(lambda: azure.aborted_by_client == 1)
    assert FakeAzure.wait_for(lambda: not Hold.objects.filter(status=Hold.Status.OPEN).exists())
    assert_books_balance(user)


@pytest.mark.parametrize(
    ("instance", "path", "query"),
    [
        ("azure", "/openai/v1/embeddings", ""),
        (
            "azure-dated",
            "/openai/deployments/text-embedding-3-small/embeddings",
            "api-version=2025-04-01-preview",
        ),
    ],
)
def test_embeddings_go_to_the_deployment(gateway, azure, dana, instance, path, query):
    _, secret = dana
    response = gateway.post(
        "/v1/embeddings",
        secret,
        {"model": f"{instance}:text-embedding-3-small", "input": "hello there"},
    )
    assert response.status_code == 200, response.text
    assert (azure.last_request.path, azure.last_request.query) == (path, query)
    # Priced by the catalog (Azure's text-embedding-3-small: $0.02 per million input).
    assert ModelPricing.objects.get().input_price_per_mtok_usd == Decimal("0.02")


def _azure(**options) -> AzureProvider:
    common = {key: options.pop(key) for key in ("api_key", "api_base") if key in options}
    return AzureProvider(ProviderConfig(name="az", kind="azure", options=options, **common))


def test_configuration_is_checked_at_start():
    endpoint = "https://res.openai.azure.com"
    with pytest.raises(ImproperlyConfigured, match="exactly one of api_key"):
        _azure(api_base=endpoint)
    with pytest.raises(ImproperlyConfigured, match="exactly one of api_key"):
        _azure(api_base=endpoint, api_key="k" * 32, azure_ad_token="t" * 32)
    with pytest.raises(ImproperlyConfigured, match="api_base"):
        _azure(api_key="k" * 32)
    with pytest.raises(ImproperlyConfigured, match="deployments"):
        _azure(api_base=endpoint, api_key="k" * 32, deployments=["gpt-4o"])
    # An endpoint pasted with its /openai suffix is the same resource.
    provider = _azure(api_base=endpoint + "/openai/v1/", azure_ad_token="entra-" + "t" * 32)
    assert str(provider.deployment_url("chat", "d")) == f"{endpoint}/openai/v1/chat/completions"
    # The Entra ID token is a secret: redacted from error messages and logs.
    assert "entra-" + "t" * 32 in provider.secrets()
    assert provider.catalog_provider_id() == "azure"
