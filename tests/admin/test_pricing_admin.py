"""Prices in the console: every save adds a version through usage.services.pricing_set,
history is never edited or deleted, and rates are validated like every money field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.contrib.admin.models import LogEntry

from tests.admin.conftest import admin_url
from tests.factories import set_price
from usage.models import ModelPricing

pytestmark = pytest.mark.django_db
NOW = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


def _rates(**overrides: str) -> dict[str, str]:
    data = {
        "input_price_per_mtok_usd": "0.15",
        "output_price_per_mtok_usd": "0.60",
        "cache_read_price_per_mtok_usd": "",
        "cache_write_price_per_mtok_usd": "",
    }
    data.update(overrides)
    return data


def test_adding_a_price_creates_a_version_in_effect_now(admin_client):
    with time_machine.travel(NOW, tick=False):
        response = admin_client.post(
            admin_url(ModelPricing, "add"),
            {"model_key": "openai:gpt-4o-mini", **_rates(cache_read_price_per_mtok_usd="0.075")},
        )

    assert response.status_code == 302
    price = ModelPricing.objects.get()
    assert (price.model_key, price.effective_at, price.origin) == (
        "openai:gpt-4o-mini",
        NOW,
        "admin",
    )
    assert price.input_price_per_mtok_usd == Decimal("0.15")
    assert price.cache_read_price_per_mtok_usd == Decimal("0.075")
    assert price.cache_write_price_per_mtok_usd is None
    assert LogEntry.objects.count() == 1


def test_editing_a_price_in_effect_adds_a_version_and_keeps_history(admin_client):
    old = set_price("openai:gpt-4o", "2.50", "10", effective_at=NOW - timedelta(days=30))
    with time_machine.travel(NOW, tick=False):
        response = admin_client.post(
            admin_url(old, "change"),
            _rates(input_price_per_mtok_usd="2.00", output_price_per_mtok_usd="8.00"),
        )

    assert response.status_code == 302
    old.refresh_from_db()
    assert (old.input_price_per_mtok_usd, old.output_price_per_mtok_usd) == (
        Decimal("2.5"),
        Decimal("10"),
    )
    new = ModelPricing.objects.get(effective_at=NOW)
    assert (new.model_key, new.input_price_per_mtok_usd, new.origin) == (
        "openai:gpt-4o",
        Decimal("2.00"),
        "admin",
    )
    listing = admin_client.get(admin_url(ModelPricing, "changelist")).content.decode()
    assert ">in effect<" in listing
    assert ">superseded<" in listing


def test_editing_a_scheduled_price_replaces_it(admin_client):
    future = set_price("openai:gpt-4o", "2.50", "10", effective_at=NOW + timedelta(days=7))
    with time_machine.travel(NOW, tick=False):
        admin_client.post(admin_url(future, "change"), _rates(input_price_per_mtok_usd="2.25"))
        listing = admin_client.get(admin_url(ModelPricing, "changelist"), {"state": "scheduled"})

    assert ModelPricing.objects.count() == 1
    future.refresh_from_db()
    assert future.input_price_per_mtok_usd == Decimal("2.25")
    assert [p.pk for p in listing.context["cl"].result_list] == [future.pk]


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        (
            {"model_key": "gpt-4o"},
            "model_key",
            "Write the model as provider:model, e.g. openai:gpt-4o.",
        ),
        (
            {"effective_at_0": "2020-01-01", "effective_at_1": "00:00"},
            "effective_at",
            "Prices cannot be back-dated: leave empty for now, or pick a future time.",
        ),
        (
            {"input_price_per_mtok_usd": "-0.01"},
            "input_price_per_mtok_usd",
            "Amounts cannot be negative.",
        ),
        (
            {"output_price_per_mtok_usd": "0.00000000001"},
            "output_price_per_mtok_usd",
            "Use at most 10 decimal places.",
        ),
    ],
)
def test_bad_prices_are_refused(admin_client, values, field, message):
    data = {"model_key": "openai:gpt-4o", **_rates(), **values}
    response = admin_client.post(admin_url(ModelPricing, "add"), data)
    assert response.status_code == 200
    assert message in response.context["adminform"].form.errors[field]
    assert not ModelPricing.objects.exists()


def test_price_versions_cannot_be_deleted(admin_client):
    price = set_price()
    assert admin_client.post(admin_url(price, "delete"), {"post": "yes"}).status_code == 403
    assert ModelPricing.objects.filter(pk=price.pk).exists()


def test_prices_show_ten_decimal_places_when_they_have_them(admin_client):
    set_price("openai:tiny", "0.0000000123", "0.1")
    html = admin_client.get(admin_url(ModelPricing, "changelist")).content.decode()
    assert "$0.0000000123" in html
    assert "$0.10" in html
