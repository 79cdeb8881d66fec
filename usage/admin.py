"""The console's usage log and platform reports (docs/SPEC.md §5, §8). The usage log is
history: read-only for everyone, filterable, and exportable as a streamed CSV. (The price
page is budgets/admin/pricing.py.)
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters, ShowFacets
from django.contrib.admin.utils import quote
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, JsonResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from common.admin_tools import (
    CsvExportMixin,
    DateRangeFilter,
    EstimatedCountPaginator,
    InputFilter,
    LedgerAdmin,
    UserIdFilter,
    as_utc,
    format_usd,
    format_usd_exact,
    key_display,
    money,
    status_badge,
)
from usage.models import (
    UsageLog,
    UsageReport,
    api_key_model,
    budget_model,
    user_model,
)
from usage.selectors import (
    TotalsTooSlow,
    providers_known,
    usage_totals,
)
from usage.services import usage_reports_redrive_dead

# The generation endpoints a usage row can name (docs/SPEC.md §2); a fixed list, so the
# filter never runs a DISTINCT over millions of rows.
ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/responses",
    "/v1/embeddings",
)


# ---------------------------------------------------------------------------------------
# Prices


class EndpointFilter(admin.SimpleListFilter):
    title = "endpoint"
    parameter_name = "endpoint"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [(e, e) for e in ENDPOINTS]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value():
            return queryset.filter(endpoint=self.value())
        return queryset


class ModelNameFilter(InputFilter):
    title = "model"
    parameter_name = "model"
    suggest = "models"
    placeholder = "provider:model or model"

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = (self.value() or "").strip()
        if not value:
            return queryset
        provider, sep, model = value.partition(":")
        if sep and provider and model:
            return queryset.filter(provider=provider, model=model)
        return queryset.filter(model=value)


class KeyFilter(InputFilter):
    """By key: its shown prefix (`gw-AbCdEfG`) or its id. Keys are looked up in the keys
    table, then the usage log is read through its (key, time) index."""

    title = "key"
    parameter_name = "key"
    suggest = "keys"
    placeholder = "gw-… prefix"

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = (self.value() or "").strip()
        if not value:
            return queryset
        try:
            return queryset.filter(api_key_id=uuid.UUID(value))
        except ValueError:
            keys = api_key_model().objects.filter(key_prefix=value.rstrip("…")).values("pk")
            return queryset.filter(api_key_id__in=keys)


class ProviderFilter(admin.SimpleListFilter):
    title = "provider"
    parameter_name = "provider"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        providers = providers_known()
        # A provider without a price (its requests refused) is still filterable by URL.
        if self.value() and self.value() not in providers:
            providers.append(self.value())
        return [(p, p) for p in providers]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(provider=self.value()) if self.value() else queryset


# How long the usage log's totals may take before the page says the filter is too wide.
TOTALS_TIMEOUT_MS = 5000

# The status codes the gateway answers with (docs/API.md), as classes and one by one.
STATUS_CODES = (200, 400, 401, 402, 403, 404, 408, 413, 422, 429, 499, 500, 502, 503, 504)


class StatusCodeFilter(admin.SimpleListFilter):
    title = "status code"
    parameter_name = "code"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [("4xx", "4xx"), ("5xx", "5xx"), *((str(c), str(c)) for c in STATUS_CODES)]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        if not value:
            return queryset
        if value in ("4xx", "5xx"):
            low = int(value[0]) * 100
            return queryset.filter(status_code__gte=low, status_code__lt=low + 100)
        if not value.isdigit():
            raise IncorrectLookupParameters(value)
        return queryset.filter(status_code=int(value))


class BudgetFilter(admin.SimpleListFilter):
    """By the budget the user is on now (usage rows do not record the budget they were
    charged under; a user moved to another budget takes their history along)."""

    title = "budget (users now on it)"
    parameter_name = "budget"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [(b.pk, str(b)) for b in budget_model().objects.order_by("name", "created_at")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if not self.value():
            return queryset
        users = user_model().objects.filter(budget_id=self.value()).values("pk")
        return queryset.filter(user_id__in=users)


@admin.register(UsageLog)
class UsageLogAdmin(CsvExportMixin, LedgerAdmin):
    # Fits a 1366-px screen (tests/admin/test_browser_layout.py): the endpoint goes under
    # the model and the failure reason under the status, instead of columns of their own.
    list_display = [
        "when",
        "owner",
        "key",
        "model_name",
        "outcome",
        "tokens",
        "cost",
        "latency",
    ]
    list_display_links = ["when"]
    list_filter = [
        DateRangeFilter,
        UserIdFilter,
        ModelNameFilter,
        "status",
        StatusCodeFilter,
        ProviderFilter,
        KeyFilter,
        BudgetFilter,
        EndpointFilter,
        "counts_toward_budget",
    ]
    list_select_related = ["api_key"]
    search_fields = ["id"]
    search_help_text = "Exact request id (X-Otari-Request-Id) or user id."
    date_hierarchy = "timestamp"
    change_list_template = "admin/usage/usagelog/change_list.html"
    list_per_page = 100
    paginator = EstimatedCountPaginator
    # Counting a million rows for "N total" on every page view is what makes big admin
    # changelists slow.
    show_full_result_count = False
    show_facets = ShowFacets.NEVER
    fieldsets = [
        (None, {"fields": ["id", "timestamp", "owner", "key", "endpoint", "model_name"]}),
        (
            "Outcome",
            {
                "fields": [
                    "outcome",
                    "error_message",
                    ("upstream_status_code", "upstream_error"),
                    "latency",
                ]
            },
        ),
        (
            "Tokens and cost",
            {
                "fields": [
                    ("prompt_tokens", "completion_tokens", "total_tokens"),
                    ("cache_read_tokens", "cache_write_tokens"),
                    "cost_exact",
                    "counts_toward_budget",
                ]
            },
        ),
    ]
    csv_filename = "usage"
    csv_columns = (
        ("request_id", "id"),
        ("timestamp", "timestamp"),
        ("user_id", "user_id"),
        ("api_key_prefix", "api_key__key_prefix"),
        ("endpoint", "endpoint"),
        ("provider", "provider"),
        ("model", "model"),
        ("status", "status"),
        ("status_code", "status_code"),
        ("prompt_tokens", "prompt_tokens"),
        ("completion_tokens", "completion_tokens"),
        ("total_tokens", "total_tokens"),
        ("cache_read_tokens", "cache_read_tokens"),
        ("cache_write_tokens", "cache_write_tokens"),
        ("cost_usd", "cost_usd"),
        ("latency_ms", "latency_ms"),
        ("counts_toward_budget", "counts_toward_budget"),
        ("error_message", "error_message"),
        ("upstream_status_code", "upstream_status_code"),
        ("upstream_error", "upstream_error"),
    )

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        # Exact matches only: a substring search would read every row.
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(id=uuid.UUID(term)), False
        except ValueError:
            return queryset.filter(user_id=term), False

    @admin.display(description="When (UTC)", ordering="timestamp")
    def when(self, obj: UsageLog) -> str:
        return as_utc(obj.timestamp, zone=False)

    @admin.display(description="User", ordering="user_id")
    def owner(self, obj: UsageLog) -> SafeString:
        return format_html(
            '<a href="{}">{}</a>',
            reverse("admin:budgets_gatewayuser_change", args=[quote(obj.user_id)]),
            obj.user_id,
        )

    @admin.display(description="Key")
    def key(self, obj: UsageLog) -> SafeString | str:
        if obj.api_key is None:
            return "master key" if obj.api_key_id is None else "—"
        return format_html("<code>{}</code>", key_display(obj.api_key))

    @admin.display(description="Model", ordering="model")
    def model_name(self, obj: UsageLog) -> SafeString:
        return format_html(
            '{}<span class="otari-sub">{}</span>',
            _model_key(obj),
            obj.endpoint.removeprefix("/v1/"),
        )

    @admin.display(description="Status", ordering="status")
    def outcome(self, obj: UsageLog) -> SafeString:
        reason = usage_reason(obj)
        if not reason:
            return status_badge(obj.status, obj.status_code)
        return format_html(
            '{}<span class="otari-reason" title="{}">{}</span>',
            status_badge(obj.status, obj.status_code),
            reason,
            reason,
        )

    def get_urls(self) -> list:
        totals = path(
            "totals.json",
            self.admin_site.admin_view(self.totals_view),
            name="usage_usagelog_totals",
        )
        return [totals, *super().get_urls()]

    def totals_view(self, request: HttpRequest) -> JsonResponse:
        """Totals over the whole filter (requests, tokens, cost), fetched by the list page
        once it is shown: on a million rows the aggregate takes longer than the page, so
        the page never waits for it, and a filter too wide to total within
        TOTALS_TIMEOUT_MS says so instead of hanging."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        request._otari_queryset_only = True
        changelist = self.get_changelist_instance(request)
        try:
            totals = usage_totals(changelist.queryset, timeout_ms=TOTALS_TIMEOUT_MS)
        except TotalsTooSlow:
            return JsonResponse({"complete": False})
        return JsonResponse(
            {
                "complete": True,
                "requests": totals.requests,
                "failed": totals.failed,
                "prompt_tokens": totals.prompt_tokens,
                "completion_tokens": totals.completion_tokens,
                # The column's ten places on every backend (SQLite's sum has more).
                "cost_usd": f"{totals.cost_usd:.{settings.MONEY_DECIMAL_PLACES}f}",
                "cost": format_usd(totals.cost_usd),
                "cost_exact": format_usd_exact(totals.cost_usd),
            }
        )

    @admin.display(description="Tokens in / out")
    def tokens(self, obj: UsageLog) -> str:
        if obj.prompt_tokens is None and obj.completion_tokens is None:
            return "—"
        return f"{obj.prompt_tokens or 0:,} / {obj.completion_tokens or 0:,}"

    @admin.display(description="Cost", ordering="cost_usd")
    def cost(self, obj: UsageLog) -> SafeString:
        return money(obj.cost_usd)

    @admin.display(description="Cost")
    def cost_exact(self, obj: UsageLog) -> str:
        return format_usd_exact(obj.cost_usd)

    @admin.display(description="Latency", ordering="latency_ms")
    def latency(self, obj: UsageLog) -> str:
        return "—" if obj.latency_ms is None else f"{obj.latency_ms:,} ms"


def _model_key(row: UsageLog) -> str:
    return f"{row.provider}:{row.model}" if row.provider else row.model


def usage_reason(row: UsageLog) -> str:
    """Why a request did not succeed, in a line: the gateway's message, or the status,
    and what the provider itself answered when it was the provider that failed."""
    if row.status == UsageLog.Status.SUCCESS:
        return ""
    reason = row.error_message or (
        "client disconnected" if row.status == UsageLog.Status.CLIENT_DISCONNECTED else ""
    )
    if row.upstream_status_code is None and not row.upstream_error:
        return reason
    said = (
        "provider" if row.upstream_status_code is None else f"provider {row.upstream_status_code}"
    )
    if row.upstream_error:
        said = f"{said}: {row.upstream_error}"
    return f"{reason} · {said}" if reason else said


@admin.register(UsageReport)
class UsageReportAdmin(LedgerAdmin):
    """The platform's usage-report outbox (docs/SPEC.md §7): dead letters with their last
    status, and a re-drive (the same service as `manage.py redrive_usage_reports`)."""

    list_display = (
        "correlation_id",
        "delivery_status",
        "last_status_code",
        "attempts",
        "status",
        "is_final_attempt",
        "user",
        "provider",
        "model",
        "created_at",
        "next_attempt_at",
    )
    list_filter = ("delivery_status", "last_status_code", "status", "is_final_attempt")
    search_fields = ("correlation_id", "=request_id", "platform_request_id", "user__user_id")
    list_select_related = ("user",)
    raw_id_fields = ("user",)
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    actions = ("redrive_reports",)
    readonly_fields = [field.name for field in UsageReport._meta.fields]

    def has_redrive_permission(self, request: HttpRequest) -> bool:
        """Re-driving changes delivery state: for those the auth system lets change
        reports, although the admin itself never edits one."""
        return request.user.has_perm("usage.change_usagereport")

    @admin.action(description="Re-drive the selected dead reports", permissions=["redrive"])
    def redrive_reports(self, request: HttpRequest, queryset: QuerySet[UsageReport]) -> None:
        count = usage_reports_redrive_dead(report_ids=list(queryset.values_list("pk", flat=True)))
        skipped = queryset.count() - count
        self.message_user(
            request,
            f"Re-drove {count} dead report(s)"
            + (f"; {skipped} not dead, left alone" if skipped > 0 else ""),
            messages.SUCCESS,
        )
