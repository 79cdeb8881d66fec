"""The console's price page (docs/SPEC.md §5, docs/ADMIN.md): prices are usage's, and
this page is registered here because it shows each price's change history, which the
console keeps with the other settings' history (budgets.SettingChange, budgets/admin_history.py);
usage/ imports nothing from budgets/.

Prices are versioned: saving a price adds a version through usage.services.pricing_set,
so every past request keeps the price it was charged at.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import F, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.safestring import SafeString

from budgets.admin_history import SettingHistoryMixin
from common.admin_tools import ServiceAdmin, badge, format_price
from usage.models import ModelPricing
from usage.selectors import price_current_effective_at
from usage.services import pricing_set


class PricingForm(forms.ModelForm):
    class Meta:
        model = ModelPricing
        fields = [
            "model_key",
            "effective_at",
            "input_price_per_mtok_usd",
            "output_price_per_mtok_usd",
            "cache_read_price_per_mtok_usd",
            "cache_write_price_per_mtok_usd",
        ]
        labels = {
            "model_key": "Model",
            "effective_at": "Effective from",
            "input_price_per_mtok_usd": "Input (USD per 1M tokens)",
            "output_price_per_mtok_usd": "Output (USD per 1M tokens)",
            "cache_read_price_per_mtok_usd": "Cache read (USD per 1M tokens)",
            "cache_write_price_per_mtok_usd": "Cache write (USD per 1M tokens)",
        }
        help_texts = {
            "model_key": "provider:model, as callers name it, e.g. openai:gpt-4o-mini.",
            "effective_at": "UTC. Leave empty for “now”, or schedule a future price. Prices "
            "are never back-dated: past requests keep the price they were charged at.",
            "cache_read_price_per_mtok_usd": "Empty = the input rate.",
            "cache_write_price_per_mtok_usd": "Empty = the input rate.",
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "effective_at" in self.fields:
            self.fields["effective_at"].required = False

    def clean_model_key(self) -> str:
        value = (self.cleaned_data.get("model_key") or "").strip()
        provider, _, model = value.partition(":")
        if not provider or not model:
            raise forms.ValidationError("Write the model as provider:model, e.g. openai:gpt-4o.")
        return value

    def clean_effective_at(self) -> Any:
        value = self.cleaned_data.get("effective_at")
        # A minute of slack for the time the form took to fill in.
        if value is not None and value < timezone.now() - timedelta(minutes=1):
            raise forms.ValidationError(
                "Prices cannot be back-dated: leave empty for now, or pick a future time."
            )
        return value


class PriceStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [("current", "In effect"), ("scheduled", "Scheduled"), ("old", "Superseded")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        now = timezone.now()
        if self.value() == "current":
            return queryset.filter(effective_at=F("current_effective_at"))
        if self.value() == "scheduled":
            return queryset.filter(effective_at__gt=now)
        if self.value() == "old":
            return queryset.filter(effective_at__lt=F("current_effective_at"))
        return queryset


@admin.register(ModelPricing)
class ModelPricingAdmin(SettingHistoryMixin, ServiceAdmin):
    form = PricingForm
    list_display = [
        "model_key",
        "effective_at",
        "state",
        "input_rate",
        "output_rate",
        "cache_read_rate",
        "cache_write_rate",
        "source",
    ]
    list_filter = [PriceStateFilter, "origin"]
    search_fields = ["model_key"]
    readonly_fields = ["origin", "created_at"]

    def get_fieldsets(self, request: HttpRequest, obj: ModelPricing | None = None) -> list:
        rates = [
            ("input_price_per_mtok_usd", "output_price_per_mtok_usd"),
            ("cache_read_price_per_mtok_usd", "cache_write_price_per_mtok_usd"),
        ]
        if obj is None:
            return [(None, {"fields": ["model_key", "effective_at"]}), ("Rates", {"fields": rates})]
        return [
            (None, {"fields": self.get_readonly_fields(request, obj)}),
            (
                "Rates",
                {
                    "fields": rates,
                    "description": "Saving adds a new price version, in effect from now (a "
                    "scheduled version is replaced instead). Past requests keep the price "
                    "they were charged at.",
                },
            ),
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: ModelPricing | None = None) -> list:
        if obj is None:
            return []
        return ["model_key", "effective_at", "origin", "catalog_version", "created_at"]

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Versions are history: a wrong price is corrected by a newer version.
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return (
            super()
            .get_queryset(request)
            .annotate(current_effective_at=price_current_effective_at(timezone.now()))
        )

    @admin.display(description="Set by", ordering="origin")
    def source(self, obj: ModelPricing) -> str:
        if obj.origin == ModelPricing.Origin.CATALOG:
            return obj.source  # "catalog 0.2.3": the release it was frozen from
        return {"config": "config file", "api": "API", "admin": "console"}.get(
            obj.origin, obj.origin
        )

    @admin.display(description="State")
    def state(self, obj: ModelPricing) -> SafeString:
        if obj.effective_at > timezone.now():
            return badge("warn", "scheduled")
        if obj.effective_at == getattr(obj, "current_effective_at", None):
            return badge("good", "in effect")
        return badge("muted", "superseded")

    @admin.display(description="Input / 1M", ordering="input_price_per_mtok_usd")
    def input_rate(self, obj: ModelPricing) -> str:
        return format_price(obj.input_price_per_mtok_usd)

    @admin.display(description="Output / 1M", ordering="output_price_per_mtok_usd")
    def output_rate(self, obj: ModelPricing) -> str:
        return format_price(obj.output_price_per_mtok_usd)

    @admin.display(description="Cache read / 1M")
    def cache_read_rate(self, obj: ModelPricing) -> str:
        if obj.cache_read_price_per_mtok_usd is None:
            return "= input"
        return format_price(obj.cache_read_price_per_mtok_usd)

    @admin.display(description="Cache write / 1M")
    def cache_write_rate(self, obj: ModelPricing) -> str:
        if obj.cache_write_price_per_mtok_usd is None:
            return "= input"
        return format_price(obj.cache_write_price_per_mtok_usd)

    def save_model(
        self, request: HttpRequest, obj: ModelPricing, form: forms.Form, change: bool
    ) -> None:
        data = form.cleaned_data
        now = timezone.now()
        if change:
            model_key = obj.model_key
            # A version not yet in effect may be replaced; one in effect never is.
            effective_at = obj.effective_at if obj.effective_at > now else now
        else:
            model_key = data["model_key"]
            effective_at = data.get("effective_at") or now
        saved = pricing_set(
            model_key=model_key,
            input_per_mtok=data["input_price_per_mtok_usd"],
            output_per_mtok=data["output_price_per_mtok_usd"],
            cache_read_per_mtok=data["cache_read_price_per_mtok_usd"],
            cache_write_per_mtok=data["cache_write_price_per_mtok_usd"],
            effective_at=effective_at,
            origin=ModelPricing.Origin.ADMIN,
        )
        self.adopt(obj, saved)


# ---------------------------------------------------------------------------------------
# The usage log
