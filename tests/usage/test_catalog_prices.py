"""Default prices from the genai-prices catalog, through HTTP: a model without an operator
price is billed at the catalog's price, frozen into a price row on first use; an operator
price wins; the catalog can be turned off; `prices sync` is the only way a catalog upgrade
reaches a current price, and never a past usage row."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from budgets.models import GatewayUser, Hold
from tests.admin.conftest import admin_url
from tests.assertions import assert_books_balance, assert_untouched
from tests.factories import make_budget, make_key, make_user, set_price
from usage.catalog import catalog_price, catalog_provider_for, catalog_version
from usage.models import ModelPricing, UsageLog
from usage.services import pricing_freeze_catalog

VERSION = catalog_version()
# `catalog` is an openai-kind instance on the fake with `catalog_provider: openai`
# (tests/conftest.py). The fake answers "Say hello to the test suite" (27 characters) with
# 7 prompt tokens and 20 completion tokens; gpt-4o is $2.50 in / $10 out / $1.25 cache
# read per million in the catalog: 7 x 2.5 + 20 x 10 = 217.5 micro-dollars, half-up.
SNAPSHOT = "catalog:gpt-4o-2024-08-06"
COST = Decimal("0.000218")


def _keyed_user(limit: str = "10") -> tuple[GatewayUser, str]:
    user = make_user(budget=make_budget(max_budget_usd=Decimal(limit)))
    _, secret = make_key(user)
    return user, secret


def test_catalog_prices_a_dated_snapshot_and_freezes_the_price_once(gateway, admin):
    user, secret = _keyed_user()

    first = gateway.chat(secret, model=SNAPSHOT)
    second = gateway.chat(secret, model=SNAPSHOT, stream=True)

    assert first.status_code == 200, first.text
    assert first.headers["X-Otari-Cost-Usd"] == str(COST)
    assert second.status_code == 200
    assert [row.cost_usd for row in UsageLog.objects.order_by("timestamp")] == [COST, COST]
    price = ModelPricing.objects.get()  # frozen once, not once per request
    assert (price.model_key, price.origin, price.catalog_version) == (
        SNAPSHOT,
        "catalog",
        VERSION,
    )
    assert (
        price.input_price_per_mtok_usd,
        price.output_price_per_mtok_usd,
        price.cache_read_price_per_mtok_usd,
        price.cache_write_price_per_mtok_usd,
    ) == (Decimal("2.5"), Decimal("10"), Decimal("1.25"), None)
    assert_books_balance(user)
    user.refresh_from_db()
    assert user.spend_usd == 2 * COST

    shown = admin.get(f"/v1/pricing/{SNAPSHOT}").json()
    assert (shown["origin"], shown["catalog_version"], shown["source"]) == (
        "catalog",
        VERSION,
        f"catalog {VERSION}",
    )
    assert shown["input_price_per_million"] == 2.5
    listed = {row["model_key"]: row["source"] for row in admin.get("/v1/pricing").json()}
    assert listed == {SNAPSHOT: f"catalog {VERSION}"}


def test_the_console_shows_a_catalog_price_with_its_source(gateway, admin_client):
    _, secret = _keyed_user()
    assert gateway.chat(secret, model=SNAPSHOT).status_code == 200

    page = admin_client.get(admin_url(ModelPricing, "changelist")).content.decode()

    assert SNAPSHOT in page
    assert f"catalog {VERSION}" in page


def test_the_hold_of_a_catalog_priced_model_is_its_estimate(gateway):
    # The estimate at gpt-4o's catalog price: ceil(27/4) = 7 input tokens and the default
    # 1024 output tokens, 7 x 2.5 + 1024 x 10 = 10257.5 micro-dollars. A budget of one
    # cent cannot hold it: refused before the provider is called, like an operator price
    # (a maximum the client set is never fitted to the budget).
    user, secret = _keyed_user("0.01")
    response = gateway.chat(secret, model=SNAPSHOT, max_tokens=1024)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "budget_exceeded"
    assert gateway.fake.hits == 0
    assert_untouched(user)

    # With room for it, the hold is exactly that estimate while the request runs.
    user, secret = _keyed_user("0.0103")
    response = gateway.chat(secret, model=SNAPSHOT, stream=True)
    assert response.status_code == 200
    hold = Hold.objects.get(user=user)
    assert hold.amount_usd == Decimal("0.010258")
    assert_books_balance(user)


def test_an_operator_price_wins_over_the_catalog(gateway):
    set_price(SNAPSHOT, "1", "2")
    _, secret = _keyed_user()

    response = gateway.chat(secret, model=SNAPSHOT)

    assert response.status_code == 200
    # 7 x 1 + 20 x 2 = 47 micro-dollars.
    assert UsageLog.objects.get().cost_usd == Decimal("0.000047")
    assert list(ModelPricing.objects.values_list("origin", flat=True)) == ["api"]


def test_a_model_unknown_to_both_gets_a_402_that_says_how_to_price_it(gateway):
    user, secret = _keyed_user()

    for model in ("catalog:no-such-model-anywhere", "openai:gpt-4o"):
        # `openai` is on loopback, which no catalog provider matches: unpriced.
        response = gateway.chat(secret, model=model)
        assert response.status_code == 402, response.text
        error = response.json()["error"]
        assert error["code"] == "pricing_not_found"
        assert f"No price for model '{model}'" in error["message"]
        assert "`pricing:` in the config file" in error["message"]
        assert "POST /v1/pricing" in error["message"]
        assert "console" in error["message"]
    assert gateway.fake.hits == 0
    assert not ModelPricing.objects.exists()
    assert_untouched(user)


def test_turning_the_catalog_off_restores_the_402(gateway, settings):
    _, secret = _keyed_user()
    assert gateway.chat(secret, model=SNAPSHOT).status_code == 200  # frozen from the catalog
    settings.OTARI_PRICE_CATALOG = False

    refused = gateway.chat(secret, model=SNAPSHOT)
    never_priced = gateway.chat(secret, model="catalog:gpt-4o-mini-2024-07-18")

    for response in (refused, never_priced):
        assert response.status_code == 402
        assert "the price catalog is off" in response.json()["error"]["message"]
    assert ModelPricing.objects.count() == 1
    assert gateway.fake.hits == 1


def _sync(*args: str) -> str:
    out = StringIO()
    call_command("prices", "sync", *args, stdout=out)
    return out.getvalue()


def test_prices_sync_lists_then_applies_a_catalog_upgrade_and_keeps_the_past(gateway):
    # A price frozen by an older catalog release, and a usage row charged at it.
    old = ModelPricing.objects.create(
        model_key="catalog:gpt-4o",
        effective_at=timezone.now() - timedelta(days=30),
        input_price_per_mtok_usd=Decimal("5"),
        output_price_per_mtok_usd=Decimal("15"),
        origin=ModelPricing.Origin.CATALOG,
        catalog_version="0.1.0",
    )
    set_price("catalog:gpt-4o-mini", "9", "9")  # the operator's: never synced
    user, secret = _keyed_user()
    assert gateway.chat(secret, model="catalog:gpt-4o").status_code == 200
    charged = UsageLog.objects.get().cost_usd
    assert charged == Decimal("0.000335")  # 7 x 5 + 20 x 15

    dry = _sync()

    assert "catalog:gpt-4o: 5/15/=input/=input (catalog 0.1.0) -> 2.5/10/1.25/=input" in dry
    assert f"(catalog {VERSION})" in dry
    assert "gpt-4o-mini" not in dry
    assert f"1 price would change to catalog {VERSION}" in dry
    assert ModelPricing.objects.count() == 2  # a dry run writes nothing

    applied = _sync("--apply")

    assert f"1 price updated to catalog {VERSION}" in applied
    new = ModelPricing.objects.filter(model_key="catalog:gpt-4o").order_by("-effective_at")[0]
    assert (new.origin, new.catalog_version, new.input_price_per_mtok_usd) == (
        "catalog",
        VERSION,
        Decimal("2.5"),
    )
    old.refresh_from_db()
    assert old.input_price_per_mtok_usd == Decimal("5")  # history kept
    assert UsageLog.objects.get().cost_usd == charged  # the past is never re-priced
    assert "0 prices would change" in _sync()  # idempotent

    assert gateway.chat(secret, model="catalog:gpt-4o").status_code == 200
    assert UsageLog.objects.order_by("-timestamp")[0].cost_usd == COST
    assert_books_balance(user)


@pytest.mark.parametrize(
    ("configured", "api_base", "kind_provider", "expected"),
    [
        (None, "https://api.openai.com/v1", None, "openai"),
        (None, "https://api.anthropic.com", None, "anthropic"),
        (None, "https://api.groq.com/openai/v1", None, "groq"),
        (None, "https://api.mistral.ai/v1", None, "mistral"),
        (None, "https://api.deepseek.com", None, "deepseek"),
        (None, "https://api.together.xyz/v1", None, "together"),
        (None, "http://127.0.0.1:11434/v1", None, None),  # Ollama: the operator prices it
        (None, "https://my-resource.openai.azure.com", "azure", "azure"),
        (None, "https://gateway.internal.example", "azure", "azure"),  # the kind's own
        ("openai", "http://127.0.0.1:8000/v1", None, "openai"),  # named in the config
        ("", "https://api.openai.com/v1", None, None),  # `catalog_provider: false`
    ],
)
def test_which_catalog_provider_prices_an_instance(configured, api_base, kind_provider, expected):
    assert (
        catalog_provider_for(configured=configured, api_base=api_base, kind_provider=kind_provider)
        == expected
    )


@pytest.mark.parametrize(
    ("provider", "model", "catalog_model", "rates"),
    [
        ("openai", "gpt-4o-mini-2024-07-18", "openai:gpt-4o-mini", ("0.15", "0.6", "0.075", None)),
        (
            "anthropic",
            "claude-3-5-sonnet-latest",
            "anthropic:claude-3-5-sonnet",
            ("3", "15", "0.3", "3.75"),
        ),
        ("azure", "gpt-4o", "azure:gpt-4o", ("2.5", "10", "1.25", None)),
        (
            "openai",
            "text-embedding-3-small",
            "openai:text-embedding-3-small",
            ("0.02", "0", None, None),
        ),
    ],
)
def test_the_catalog_matches_snapshots_and_aliases(provider, model, catalog_model, rates):
    price = catalog_price(provider, model)
    assert price is not None
    assert price.catalog_model == catalog_model
    got = price.rates
    assert (
        got.input_per_mtok,
        got.output_per_mtok,
        got.cache_read_per_mtok,
        got.cache_write_per_mtok,
    ) == tuple(None if rate is None else Decimal(rate) for rate in rates)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_processes_meeting_a_new_model_at_once_freeze_one_price():
    """Eight first uses at the same moment (threads, each with its own connection, as
    processes would be) leave one catalog price row, and all of them price with it."""
    price = catalog_price("openai", "gpt-4o")
    now = timezone.now()
    start = threading.Barrier(8)

    def first_use(_: int) -> int:
        try:
            start.wait()
            return pricing_freeze_catalog(model_key="x:gpt-4o", price=price, now=now).pk
        finally:
            connection.close()

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(first_use, range(8)))

    assert ids == set(ModelPricing.objects.values_list("pk", flat=True))
    assert len(ids) == 1
