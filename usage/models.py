"""Prices and the usage log (CONTRACT §5). Schema only; writes go through services."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q

from budgets.models import APIKey, GatewayUser
from otari.fields import MoneyField


class ModelPricing(models.Model):
    """Per-million-token rates for one `provider:model`, valid from `effective_at` on.

    Rows are versions: a price change adds a row, so every request is priced as of its
    own time and past costs can be explained. Null cache rates fall back to the input rate.
    """

    class Origin(models.TextChoices):
        CONFIG = "config"
        API = "api"
        ADMIN = "admin"

    model_key = models.CharField(max_length=255)
    effective_at = models.DateTimeField()
    input_price_per_mtok_usd = MoneyField()
    output_price_per_mtok_usd = MoneyField()
    cache_read_price_per_mtok_usd = MoneyField(null=True, blank=True)
    cache_write_price_per_mtok_usd = MoneyField(null=True, blank=True)
    unit = models.CharField(max_length=16, default="tokens")
    origin = models.CharField(max_length=10, choices=Origin.choices, default=Origin.API)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model_key", "-effective_at"]
        verbose_name = "model price"
        constraints = [
            models.UniqueConstraint(
                fields=["model_key", "effective_at"], name="pricing_one_version_per_instant"
            ),
            models.CheckConstraint(
                condition=Q(input_price_per_mtok_usd__gte=0, output_price_per_mtok_usd__gte=0)
                & (
                    Q(cache_read_price_per_mtok_usd__isnull=True)
                    | Q(cache_read_price_per_mtok_usd__gte=0)
                )
                & (
                    Q(cache_write_price_per_mtok_usd__isnull=True)
                    | Q(cache_write_price_per_mtok_usd__gte=0)
                ),
                name="pricing_rates_nonnegative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model_key} from {self.effective_at:%Y-%m-%d %H:%M}"

    @property
    def is_free(self) -> bool:
        return not self.input_price_per_mtok_usd and not self.output_price_per_mtok_usd


class UsageLog(models.Model):
    """One row per request that reached a known user, success or not."""

    class Status(models.TextChoices):
        SUCCESS = "success"
        ERROR = "error"
        CLIENT_DISCONNECTED = "client_disconnected"

    # Also the request id (X-Otari-Request-Id) and the id of its hold.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    user = models.ForeignKey(GatewayUser, on_delete=models.PROTECT, related_name="usage_logs")
    api_key = models.ForeignKey(
        APIKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage_logs"
    )
    # When the request was settled (a hold open across a reset counts in the new period).
    timestamp = models.DateTimeField()
    endpoint = models.CharField(max_length=64)
    provider = models.CharField(max_length=100, blank=True, default="")
    model = models.CharField(max_length=255)
    prompt_tokens = models.IntegerField(null=True)
    completion_tokens = models.IntegerField(null=True)
    total_tokens = models.IntegerField(null=True)
    cache_read_tokens = models.IntegerField(null=True)
    cache_write_tokens = models.IntegerField(null=True)
    cost_usd = MoneyField(null=True, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices)
    status_code = models.IntegerField(null=True)
    error_message = models.TextField(blank=True, default="")
    latency_ms = models.IntegerField(null=True)
    counts_toward_budget = models.BooleanField(default=True)

    class Meta:
        ordering = ["-timestamp"]
        verbose_name = "usage log entry"
        verbose_name_plural = "usage log"
        constraints = [
            models.CheckConstraint(
                condition=Q(cost_usd__isnull=True) | Q(cost_usd__gte=0),
                name="usage_cost_nonnegative",
            ),
        ]
        indexes = [
            models.Index(fields=["-timestamp"], name="usage_time_idx"),
            models.Index(fields=["user", "-timestamp"], name="usage_user_time_idx"),
            models.Index(fields=["model", "-timestamp"], name="usage_model_time_idx"),
            # The console's "recent errors" and status=error list: errors are a small
            # fraction of rows, and walking the time index to find them can read them all.
            models.Index(
                fields=["-timestamp"], condition=Q(status="error"), name="usage_error_time_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.timestamp:%Y-%m-%d %H:%M:%S} {self.user_id} {self.model} {self.status}"
