"""Wire shapes of the pricing and usage API (docs/SPEC.md §6), as the `otari` SDK reads them.

Prices are USD per million tokens (`input_price_per_million`, ...) over the models'
`*_per_mtok_usd` columns; usage rows report `cost` over `cost_usd`.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from common.rest import (
    ChoiceField,
    ConstantField,
    DateTimeField,
    MoneyField,
    MoneyOutField,
    NullIntegerField,
    QueryDateTimeField,
    StrictCharField,
)
from usage.models import UsageLog
from usage.selectors import DIMENSIONS

_STATUSES = [choice.value for choice in UsageLog.Status]


def _model_key_validate(value: str) -> str:
    provider, sep, model = value.partition(":")
    if not (sep and provider and model):
        raise serializers.ValidationError("Must look like provider:model.")
    return value


# ---------------------------------------------------------------------------------------
# Pricing


class PricingTier(serializers.Serializer):
    min_input_tokens = serializers.IntegerField(min_value=1)


class SetPricing(serializers.Serializer):
    model_key = StrictCharField(
        max_length=255,
        trim_whitespace=False,
        validators=[_model_key_validate],
        help_text="provider:model, as in the generation endpoints' model selector.",
    )
    input_price_per_million = MoneyField(help_text="USD per million input tokens.")
    output_price_per_million = MoneyField(help_text="USD per million output tokens.")
    cache_read_price_per_million = MoneyField(
        allow_null=True, required=False, help_text="Null: the input rate."
    )
    cache_write_price_per_million = MoneyField(
        allow_null=True, required=False, help_text="Null: the input rate."
    )
    cache_write_1h_price_per_million = MoneyField(
        allow_null=True, required=False, help_text="Not supported: must be null."
    )
    pricing_tiers = serializers.ListField(
        child=PricingTier(),
        allow_null=True,
        required=False,
        help_text="Not supported: must be null or empty.",
    )
    unit = ChoiceField(["tokens"], default="tokens", help_text="Only tokens are priced.")
    effective_at = DateTimeField(
        allow_null=True,
        required=False,
        help_text="From when this version applies (default now); may be in the future.",
    )


@extend_schema_field({"type": "number", "nullable": True})
class NullNumberField(ConstantField):
    """Always null."""


@extend_schema_field({"type": "array", "items": {"type": "object"}})
class EmptyListField(ConstantField):
    """Always []: tiered prices are not supported."""

    def get_attribute(self, instance: Any) -> list[Any]:
        return []


class PricingResponse(serializers.Serializer):
    model_key = serializers.CharField()
    input_price_per_million = MoneyOutField(source="input_price_per_mtok_usd")
    output_price_per_million = MoneyOutField(source="output_price_per_mtok_usd")
    cache_read_price_per_million = MoneyOutField(
        source="cache_read_price_per_mtok_usd", allow_null=True
    )
    cache_write_price_per_million = MoneyOutField(
        source="cache_write_price_per_mtok_usd", allow_null=True
    )
    cache_write_1h_price_per_million = NullNumberField()
    pricing_tiers = EmptyListField()
    unit = serializers.CharField()
    origin = serializers.CharField(
        help_text="Who set it: config, api or admin (the operator), or catalog (a default "
        "price frozen from the genai-prices catalog on the model's first use)."
    )
    catalog_version = serializers.CharField(
        help_text="The catalog release a catalog price was taken from; empty otherwise."
    )
    source = serializers.CharField(
        help_text='"catalog <version>" or "operator (<origin>)".', read_only=True
    )
    effective_at = DateTimeField()
    created_at = DateTimeField()
    updated_at = DateTimeField()


class AsOfQuery(serializers.Serializer):
    as_of = QueryDateTimeField(required=False)


class EffectiveAtQuery(serializers.Serializer):
    effective_at = QueryDateTimeField(required=False)


# ---------------------------------------------------------------------------------------
# Usage


class UsageFilterQuery(serializers.Serializer):
    start_date = QueryDateTimeField(required=False, help_text="timestamp >= start_date.")
    end_date = QueryDateTimeField(required=False, help_text="timestamp < end_date.")
    user_id = serializers.ListField(
        child=serializers.CharField(max_length=255), required=False, max_length=50
    )
    model = serializers.ListField(
        child=serializers.CharField(max_length=255), required=False, max_length=50
    )
    api_key_id = serializers.ListField(
        child=serializers.UUIDField(error_messages={"invalid": "Must be a UUID."}),
        required=False,
        max_length=50,
    )
    endpoint = serializers.CharField(max_length=64, required=False)
    status = ChoiceField(_STATUSES, required=False)
    provider = serializers.CharField(max_length=100, required=False)
    status_code = serializers.IntegerField(
        min_value=100,
        max_value=599,
        required=False,
        error_messages={"invalid": "Must be an integer."},
    )
    counts_toward_budget = serializers.BooleanField(required=False, allow_null=True, default=None)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        start, end = attrs.get("start_date"), attrs.get("end_date")
        if start is not None and end is not None and start > end:
            raise serializers.ValidationError({"end_date": "Must not be before start_date."})
        return attrs


class UsageSummaryQuery(UsageFilterQuery):
    bucket = ChoiceField(["day", "hour"], default="day")
    dimensions = serializers.ListField(
        child=ChoiceField([*DIMENSIONS, "none"]), required=False, max_length=10
    )


class UsageEntry(serializers.Serializer):
    id = serializers.CharField()
    user_id = serializers.CharField(allow_null=True)
    user_alias = serializers.CharField(allow_null=True)
    api_key_id = serializers.CharField(allow_null=True)
    api_key_name = serializers.CharField(allow_null=True)
    timestamp = DateTimeField(help_text="When the request was settled.")
    endpoint = serializers.CharField()
    provider = serializers.CharField(allow_null=True)
    model = serializers.CharField()
    prompt_tokens = serializers.IntegerField(allow_null=True)
    completion_tokens = serializers.IntegerField(allow_null=True)
    total_tokens = serializers.IntegerField(allow_null=True)
    cache_read_tokens = serializers.IntegerField(allow_null=True)
    cache_write_tokens = serializers.IntegerField(allow_null=True)
    cache_write_1h_tokens = NullIntegerField()
    cost = MoneyOutField(source="cost_usd", allow_null=True)
    status = serializers.ChoiceField(_STATUSES)
    status_code = serializers.IntegerField(allow_null=True)
    error_message = serializers.CharField(allow_null=True)
    latency_ms = serializers.IntegerField(allow_null=True)
    counts_toward_budget = serializers.BooleanField()
    bulk_editable = serializers.SerializerMethodField(
        help_text="Always false: gateway rows are ledger history."
    )
    source = serializers.SerializerMethodField(help_text="Always 'gateway'.")
    source_label = serializers.SerializerMethodField()
    billing_meters = serializers.SerializerMethodField()
    pricing_breakdown = serializers.SerializerMethodField()

    def get_bulk_editable(self, row: UsageLog) -> bool:
        return False

    def get_source(self, row: UsageLog) -> str:
        return "gateway"

    @extend_schema_field({"type": "string", "nullable": True})
    def get_source_label(self, row: UsageLog) -> None:
        return None

    @extend_schema_field({"type": "object", "nullable": True})
    def get_billing_meters(self, row: UsageLog) -> None:
        return None

    @extend_schema_field({"type": "array", "items": {"type": "object"}, "nullable": True})
    def get_pricing_breakdown(self, row: UsageLog) -> None:
        return None


class UsageCount(serializers.Serializer):
    total = serializers.IntegerField()


class UsageGroupRow(serializers.Serializer):
    key = serializers.CharField(allow_null=True)
    label = serializers.CharField(allow_null=True)
    requests = serializers.IntegerField()
    tokens = serializers.IntegerField()
    cost = MoneyOutField()
    is_other = serializers.BooleanField()


class UsageErrorCodeRow(serializers.Serializer):
    status_code = serializers.IntegerField(allow_null=True)
    error_class = serializers.ChoiceField(
        ["pricing", "rate_limit", "auth", "provider_error", "client_error", "unknown"]
    )
    requests = serializers.IntegerField()


class UsageSeriesPoint(serializers.Serializer):
    bucket_start = serializers.CharField()
    requests = serializers.IntegerField()
    errors = serializers.IntegerField()
    tokens = serializers.IntegerField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cache_read_tokens = serializers.IntegerField()
    cache_write_tokens = serializers.IntegerField()
    cost = MoneyOutField()


class UsageTotals(serializers.Serializer):
    request_count = serializers.IntegerField()
    error_count = serializers.IntegerField()
    unpriced_requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    cache_read_tokens = serializers.IntegerField()
    cache_write_tokens = serializers.IntegerField()
    cache_write_1h_tokens = serializers.IntegerField()
    billed_input_tokens = serializers.IntegerField()
    billed_output_tokens = serializers.IntegerField()
    cost = MoneyOutField()
    avg_latency_ms = serializers.FloatField(allow_null=True)


class UsageSummary(serializers.Serializer):
    start_date = DateTimeField()
    end_date = DateTimeField()
    bucket = serializers.ChoiceField(["day", "hour"])
    totals = UsageTotals()
    by_user = UsageGroupRow(many=True)
    by_model = UsageGroupRow(many=True)
    by_provider = UsageGroupRow(many=True)
    by_endpoint = UsageGroupRow(many=True)
    by_api_key = UsageGroupRow(many=True)
    by_source = UsageGroupRow(many=True)
    by_source_label = UsageGroupRow(many=True)
    errors_by_status_code = UsageErrorCodeRow(many=True)
    series = UsageSeriesPoint(many=True)
