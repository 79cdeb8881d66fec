"""Prices and the usage log (docs/SPEC.md §5). Schema only; writes go through services."""

from __future__ import annotations

import uuid

from django.apps import apps
from django.db import models
from django.db.models import Q

from common.fields import MoneyField
from common.history import AuditedHistory
from usage.pricing import Rates


class ModelPricing(models.Model):
    """Per-million-token rates for one `provider:model`, valid from `effective_at` on.

    Rows are versions: a price change adds a row, so every request is priced as of its
    own time and past costs can be explained. Null cache rates fall back to the input rate.
    `config`, `api` and `admin` rows are the operator's; a `catalog` row is a default
    price frozen from the genai-prices catalog the first time the model was used
    (usage.catalog), and changes only through `manage.py prices sync`.
    """

    class Origin(models.TextChoices):
        CONFIG = "config"
        API = "api"
        ADMIN = "admin"
        CATALOG = "catalog"

    model_key = models.CharField(max_length=255)
    effective_at = models.DateTimeField()
    input_price_per_mtok_usd = MoneyField()
    output_price_per_mtok_usd = MoneyField()
    cache_read_price_per_mtok_usd = MoneyField(null=True, blank=True)
    cache_write_price_per_mtok_usd = MoneyField(null=True, blank=True)
    unit = models.CharField(max_length=16, default="tokens")
    origin = models.CharField(max_length=10, choices=Origin.choices, default=Origin.API)
    # The catalog release a `catalog` row was taken from (e.g. "0.2.3"); blank otherwise.
    catalog_version = models.CharField(max_length=32, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Every version of every price row, with who set it (otari/history.py).
    history = AuditedHistory(excluded_fields=["updated_at"])

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

    @property
    def rates(self) -> Rates:
        return Rates(
            input_per_mtok=self.input_price_per_mtok_usd,
            output_per_mtok=self.output_price_per_mtok_usd,
            cache_read_per_mtok=self.cache_read_price_per_mtok_usd,
            cache_write_per_mtok=self.cache_write_price_per_mtok_usd,
        )

    @property
    def source(self) -> str:
        """Where the price came from: "catalog 0.2.3", or "operator (config|api|admin)"."""
        if self.origin == self.Origin.CATALOG:
            return f"catalog {self.catalog_version}".strip()
        return f"operator ({self.origin})"


# The error code of a refusal for budget (budgets.exceptions.BudgetExceeded.code).
BUDGET_EXCEEDED = "budget_exceeded"

# Budgets' models, by name: usage rows refer to users and keys by foreign key only, so that
# this app imports nothing from budgets (budgets imports usage: it writes the ledger in the
# statements that move money).
USER_MODEL = "budgets.GatewayUser"
API_KEY_MODEL = "budgets.APIKey"
WORKSPACE_MODEL = "budgets.Workspace"
BUDGET_MODEL = "budgets.Budget"


def user_model() -> type[models.Model]:
    return apps.get_model(USER_MODEL)


def api_key_model() -> type[models.Model]:
    return apps.get_model(API_KEY_MODEL)


def budget_model() -> type[models.Model]:
    return apps.get_model(BUDGET_MODEL)


def workspace_model() -> type[models.Model]:
    return apps.get_model(WORKSPACE_MODEL)


class UsageLog(models.Model):
    """One row per request that reached a known user, success or not."""

    class Status(models.TextChoices):
        SUCCESS = "success"
        ERROR = "error"
        CLIENT_DISCONNECTED = "client_disconnected"
        # A routed attempt that failed before the commit point and was failed over: its
        # own row, never counted toward a budget (docs/ROUTING.md).
        ABSORBED = "absorbed"

    # Also the request id (X-Otari-Request-Id) and the id of its hold.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    user = models.ForeignKey(USER_MODEL, on_delete=models.PROTECT, related_name="usage_logs")
    api_key = models.ForeignKey(
        API_KEY_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="usage_logs"
    )
    # The key's workspace (the default one for the master key): what workspace spend is
    # summed from. PROTECT: a workspace with usage is not deleted.
    workspace = models.ForeignKey(
        WORKSPACE_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="usage_logs",
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
    # The machine code of what went wrong ("budget_exceeded", "provider_error", ...), as
    # in the error body the client got; empty on success.
    error_code = models.CharField(max_length=64, blank=True, default="")
    # What the provider itself answered when it failed: its HTTP status and its redacted,
    # bounded message. For operators only; the client sees `error_message`.
    upstream_status_code = models.IntegerField(null=True, blank=True)
    upstream_error = models.TextField(blank=True, default="")
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
            # GET /v1/usage?api_key_id=...: a busy key's newest rows without a sort.
            models.Index(fields=["api_key", "-timestamp"], name="usage_key_time_idx"),
            models.Index(fields=["workspace", "-timestamp"], name="usage_workspace_time_idx"),
            # GET /v1/usage?status=error: errors are rare, so without this a filtered
            # page walks the time index through every success row.
            models.Index(
                fields=["-timestamp"],
                condition=Q(status="error"),
                name="usage_error_time_idx",
            ),
            # Who was refused for budget in their current window (the console, the API,
            # alerts): refusals are few, so the index is small.
            models.Index(
                fields=["user", "-timestamp"],
                condition=Q(error_code=BUDGET_EXCEEDED),
                name="usage_budget_refusal_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.timestamp:%Y-%m-%d %H:%M:%S} {self.user_id} {self.model} {self.status}"


class UsageReport(models.Model):
    """Platform mode: the outcome of one resolved attempt, to be pushed to the platform
    (docs/SPEC.md §7). A durable outbox row: written in the same transaction as the request's
    usage row, then delivered by a Celery task (usage.reporting).

    pending -> delivered | dead, each move a compare-and-swap; `leased_until` marks a try
    in progress so that two workers never push the same row at once.
    """

    class Outcome(models.TextChoices):
        SUCCESS = "success"
        ERROR = "error"

    class Delivery(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        DEAD = "dead"

    # The platform's attempt_id: what it deduplicates redeliveries by.
    correlation_id = models.CharField(max_length=255, unique=True)
    # The gateway request (the usage row's id, X-Otari-Request-Id) and the platform's.
    request_id = models.UUIDField(db_index=True)
    platform_request_id = models.CharField(max_length=255, blank=True, default="")
    user = models.ForeignKey(USER_MODEL, on_delete=models.PROTECT, related_name="usage_reports")
    position = models.IntegerField(default=0)
    provider = models.CharField(max_length=100, blank=True, default="")
    model = models.CharField(max_length=255, blank=True, default="")
    status = models.CharField(max_length=10, choices=Outcome.choices)
    is_final_attempt = models.BooleanField()
    prompt_tokens = models.IntegerField(default=0)
    completion_tokens = models.IntegerField(default=0)
    total_tokens = models.IntegerField(default=0)
    cache_read_tokens = models.IntegerField(default=0)
    cache_write_tokens = models.IntegerField(default=0)
    error_class = models.CharField(max_length=100, blank=True, default="")

    delivery_status = models.CharField(
        max_length=10, choices=Delivery.choices, default=Delivery.PENDING
    )
    # Tries so far (each POST, whatever its outcome).
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    leased_until = models.DateTimeField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.IntegerField(null=True, blank=True)
    # The platform's answer (or the transport error), truncated.
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField()
    delivered_at = models.DateTimeField(null=True, blank=True)
    dead_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "platform usage report"
        constraints = [
            models.CheckConstraint(
                condition=Q(delivery_status__in=["pending", "delivered", "dead"]),
                name="usage_report_delivery_valid",
            ),
            models.CheckConstraint(
                condition=Q(status__in=["success", "error"]), name="usage_report_status_valid"
            ),
        ]
        indexes = [
            # The re-drive: pending rows whose try is overdue.
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(delivery_status="pending"),
                name="usage_report_pending_idx",
            ),
            # The dead-letter views: by status code, newest first.
            models.Index(
                fields=["last_status_code", "-created_at"],
                condition=Q(delivery_status="dead"),
                name="usage_report_dead_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.correlation_id} {self.status} ({self.delivery_status})"

    def payload(self) -> dict[str, object]:
        """The body of `POST {platform}/gateway/usage`."""
        body: dict[str, object] = {
            "correlation_id": self.correlation_id,
            "status": self.status,
            "is_final_attempt": self.is_final_attempt,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens,
                "cache_read_tokens": self.cache_read_tokens,
                "cache_write_tokens": self.cache_write_tokens,
            },
        }
        if self.error_class:
            body["error_class"] = self.error_class
        return body
