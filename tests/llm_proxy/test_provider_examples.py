"""The OpenAI-compatible examples of docs/PROVIDERS.md, as written there: each is parsed
from the page, checked for the catalog provider its real URL maps to, then pointed at the
fake provider and sent a request through the gateway, billed to the micro-dollar."""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from common.config import _parse_provider, gateway_config
from llm_proxy.providers import providers
from llm_proxy.providers.openai import OpenAIProvider
from tests.conftest import REPO
from tests.factories import make_budget, make_key, make_user
from usage.catalog import catalog_price
from usage.models import UsageLog
from usage.pricing import Rates, TokenUsage, cost_usd
from usage.services import pricing_sync_from_config

pytestmark = pytest.mark.postgres

PAGE = REPO / "docs" / "PROVIDERS.md"
# Heading -> (instance, a model it serves, the catalog provider its documented URL maps to).
EXAMPLES = {
    "Groq": ("groq", "llama-3.3-70b-versatile", "groq"),
    "Mistral": ("mistral", "mistral-large-latest", "mistral"),
    "DeepSeek": ("deepseek", "deepseek-chat", "deepseek"),
    "Together": ("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo", "together"),
    "Ollama": ("ollama", "llama3.2", None),
    "vLLM": ("vllm", "Qwen/Qwen2.5-7B-Instruct", None),
    "LM Studio": ("lmstudio", "qwen2.5-7b-instruct", None),
}
# The fake answers "Say hello to the test suite" with 7 prompt and 20 completion tokens.
USAGE = TokenUsage(input_tokens=7, output_tokens=20)


def documented_examples() -> dict[str, dict]:
    """Heading -> the YAML block that follows it, in the OpenAI-compatible section."""
    section = PAGE.read_text().split("## OpenAI-compatible servers", 1)[1]
    blocks = re.findall(r"^### (.+?)\n.*?```yaml\n(.*?)```", section, re.MULTILINE | re.DOTALL)
    return {heading.strip(): yaml.safe_load(block) for heading, block in blocks}


def test_the_page_documents_every_example():
    assert set(documented_examples()) == set(EXAMPLES)


@pytest.fixture
def documented_config(gateway, settings, tmp_path: Path) -> Iterator[dict[str, dict]]:
    """The page's instances, each on the fake and keeping the catalog provider of its
    real URL, with the page's prices; the test configuration is restored after."""
    examples = documented_examples()
    instances, pricing = {}, {}
    for heading, (name, _, catalog_provider) in EXAMPLES.items():
        example = examples[heading]
        (instance,) = example["providers"].values()
        rewritten = {**instance, "api_base": gateway.fake.base_url}
        if catalog_provider is not None:
            rewritten["catalog_provider"] = catalog_provider
        instances[name] = rewritten
        pricing.update(example.get("pricing") or {})
    path = tmp_path / "otari.yaml"
    path.write_text(yaml.safe_dump({"providers": instances, "pricing": pricing}))
    previous = settings.OTARI_CONFIG
    settings.OTARI_CONFIG = str(path)
    gateway_config.cache_clear()
    providers.cache_clear()
    pricing_sync_from_config()
    yield examples
    settings.OTARI_CONFIG = previous
    gateway_config.cache_clear()
    providers.cache_clear()


@pytest.mark.parametrize("heading", list(EXAMPLES))
def test_a_documented_example_serves_requests(gateway, documented_config, heading):
    name, model, catalog_provider = EXAMPLES[heading]
    (documented,) = documented_config[heading]["providers"].values()
    # The documented URL maps to the catalog provider the page promises (or to none).
    assert providers()[name].kind == "openai"
    real = _parse_provider(name, documented)
    assert (real.api_base, real.catalog_provider) == (documented["api_base"], None)
    assert OpenAIProvider(real).catalog_provider_id() == catalog_provider
    user = make_user(budget=make_budget(max_budget_usd=Decimal("5")))
    _, secret = make_key(user)

    plain = gateway.chat(secret, model=f"{name}:{model}")
    streamed = gateway.chat(secret, model=f"{name}:{model}", stream=True)

    assert plain.status_code == 200, plain.text
    assert streamed.status_code == 200, streamed.text
    sent = gateway.fake.last_request
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == model
    # Mistral refuses stream_options; the others are asked for the usage chunk.
    assert ("stream_options" in sent.body) == (heading != "Mistral")
    if catalog_provider is not None:
        price = catalog_price(catalog_provider, model)
        assert price is not None
        rates = price.rates
    else:
        documented_price = documented_config[heading]["pricing"][f"{name}:{model}"]
        rates = Rates(
            input_per_mtok=Decimal(str(documented_price["input_price_per_million"])),
            output_per_mtok=Decimal(str(documented_price["output_price_per_million"])),
        )
    row = UsageLog.objects.order_by("timestamp").first()
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("success", 7, 20)
    assert row.cost_usd == cost_usd(USAGE, rates)
