"""The console's ceilings (issue 14): caps on what the organization, a workspace or one
API key spends, on a budget's limit and period. Created, changed, topped up, reset and
deleted through budgets.services.ceilings and periods, the functions the API calls; the
page shows the spend bar, the open holds reserved on it and its resets, as a user's page
does for a user."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.loader import render_to_string
from django.urls import path
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from budgets.admin.display import (
    TOPUP_FIELDS,
    ceiling_bar,
    ceiling_limit,
    console_url,
    describe_period,
    money_cell,
    muted,
    provider_label,
    scope_choices,
    scope_label,
    scope_labels,
    scope_value,
    topup_cell,
    topup_form_clean,
)
from budgets.models import Budget, Ceiling, CeilingResetLog, Hold
from budgets.services import ceilings, periods
from common.admin_tools import (
    ZERO,
    PageRowsMixin,
    RefusableDeleteMixin,
    ServiceAdmin,
    as_utc,
    format_usd,
)
from common.config import gateway_config

# How many open holds and resets a ceiling's page lists (newest first).
CEILING_HOLDS_SHOWN = 50
CEILING_RESETS_SHOWN = 20


# ---------------------------------------------------------------------------------------
# A ceiling as a row of a table (on a workspace's or a key's page)


@dataclass(frozen=True)
class CeilingRow:
    ceiling: Ceiling
    title: str
    provider: str
    bar: SafeString
    spend: SafeString
    reserved: SafeString
    limit: SafeString
    period_end: str


def period_end(ceiling: Ceiling) -> str:
    if ceiling.next_budget_reset_at is None:
        return "never"
    return as_utc(ceiling.next_budget_reset_at, zone=False)


def limit_cell(ceiling: Ceiling, now: datetime) -> SafeString:
    """The limit admission checks, marked `*` when a live top-up is in it (as users')."""
    limit = ceiling_limit(ceiling, now)
    if limit is None:
        return muted("uncapped")
    if limit != ceiling.budget.max_budget_usd:
        return format_html(
            '<span class="otari-money" title="Includes a top-up of {} until {}">{} *</span>',
            format_usd(ceiling.topup_usd),
            as_utc(ceiling.topup_expires_at),
            format_usd(limit),
        )
    return money_cell(limit)


def ceilings_table(scope_type: str, scope_id: Any) -> SafeString:
    """The ceilings on one scope, each with its bar (a workspace's or a key's page)."""
    now = timezone.now()
    rows = [
        CeilingRow(
            ceiling=c,
            title=c.name or f"{c.level} ceiling",
            provider=provider_label(c.provider),
            bar=ceiling_bar(c, now),
            spend=money_cell(c.spend_usd),
            reserved=money_cell(c.reserved_usd),
            limit=limit_cell(c, now),
            period_end=period_end(c),
        )
        for c in Ceiling.objects.filter(scope_type=scope_type, scope_id=str(scope_id))
        .select_related("budget")
        .order_by("provider")
    ]
    add_url = console_url(Ceiling, "add", query={"scope": scope_value(scope_type, scope_id)})
    return render_to_string(
        "admin/budgets/ceiling/ceilings_table.html",
        {"rows": rows, "add_url": add_url, "organization_note": True},
    )


# ---------------------------------------------------------------------------------------
# The form


def provider_choices() -> list[tuple[str, str]]:
    """Every provider, or one configured provider instance (what the service accepts)."""
    return [("", "Every provider"), *((name, name) for name in sorted(gateway_config().providers))]


_CEILING_HELP = {
    "name": "Optional: how the console and the API name it, such as “research monthly”.",
    "budget": "The limit and the period come from this budget. Moving the ceiling to a "
    "different budget starts a fresh window: spend goes to $0.00 (the old spend is kept in "
    "the reset log).",
    "topup_usd": "Added to the budget's limit until the expiry below. Set 0 to remove it.",
    "topup_expires_at": "UTC. Required with a top-up, and in the future.",
}
_CEILING_LABELS = {"topup_usd": "Top-up (USD)", "topup_expires_at": "Top-up expires at"}


class CeilingChangeForm(forms.ModelForm):
    """Name, budget and top-up. Scope and provider are the ceiling's identity: fixed once
    created (the service changes neither; delete and create instead)."""

    class Meta:
        model = Ceiling
        fields = ["name", "budget", *TOPUP_FIELDS]
        labels = _CEILING_LABELS
        help_texts = _CEILING_HELP

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "budget" in self.fields:
            # Editing a budget from here would change it for every user and ceiling on it.
            self.fields["budget"].widget.can_change_related = False
            self.fields["budget"].widget.can_delete_related = False

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        topup_form_clean(self, cleaned)
        return cleaned


class CeilingAddForm(CeilingChangeForm):
    scope = forms.ChoiceField(
        label="Caps",
        help_text="The organization (every request), a workspace (its keys) or one API key.",
    )
    provider = forms.ChoiceField(
        required=False,
        label="Provider",
        help_text="Cap spend at one configured provider only, or at every provider together.",
    )

    class Meta(CeilingChangeForm.Meta):
        fields = ["name", "budget", "provider", *TOPUP_FIELDS]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["scope"].choices = scope_choices()
        self.fields["provider"].choices = provider_choices()

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if cleaned.get("scope"):
            scope_type, _, scope_id = cleaned["scope"].partition(":")
            cleaned["scope_type"], cleaned["scope_id"] = scope_type, scope_id
            provider = cleaned.get("provider") or ""
            taken = Ceiling.objects.filter(
                scope_type=scope_type, scope_id=scope_id, provider=provider
            ).first()
            if taken is not None:
                self.add_error(
                    "scope",
                    f"“{taken}” already caps this at {provider_label(provider)}: "
                    "change that one instead.",
                )
        return cleaned


class ScopeTypeFilter(admin.SimpleListFilter):
    title = "level"
    parameter_name = "level"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [(Ceiling.Scope.ORGANIZATION, "Organization"), *_LEVELS_BELOW]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value():
            return queryset.filter(scope_type=self.value())
        return queryset


_LEVELS_BELOW = [(Ceiling.Scope.WORKSPACE, "Workspace"), (Ceiling.Scope.API_TOKEN, "API key")]


@admin.register(Ceiling)
class CeilingAdmin(PageRowsMixin, RefusableDeleteMixin, ServiceAdmin):
    change_form_template = "admin/budgets/ceiling/change_form.html"
    list_display = [
        "display_name",
        "level",
        "caps",
        "provider_name",
        "budget_link",
        "usage",
        "spend",
        "reserved",
        "limit",
        "period_ends",
    ]
    list_display_links = ["display_name"]
    list_filter = [ScopeTypeFilter, "budget"]
    list_select_related = ["budget"]
    search_fields = ["name", "scope_id"]
    search_help_text = "Search by ceiling name or scope id."
    actions = ["reset_period_now"]
    readonly_fields = [
        "level",
        "caps",
        "provider_name",
        "usage",
        "spend",
        "reserved",
        "limit",
        "remaining",
        "period",
        "budget_started_at",
        "next_budget_reset_at",
        "lifetime_spend",
        "topup_state",
        "open_holds",
        "resets",
        "id",
        "created_at",
        "updated_at",
    ]

    def get_form(
        self, request: HttpRequest, obj: Ceiling | None = None, change: bool = False, **kw: Any
    ) -> type[forms.ModelForm]:
        kw["form"] = CeilingChangeForm if obj is not None else CeilingAddForm
        return super().get_form(request, obj, change=change, **kw)

    def get_fieldsets(self, request: HttpRequest, obj: Ceiling | None = None) -> list:
        topup = (
            "Temporary top-up",
            {
                "fields": [*(["topup_state"] if obj is not None else []), *TOPUP_FIELDS],
                "description": "Raises this ceiling's limit until the expiry; replaces any "
                "previous top-up.",
            },
        )
        if obj is None:
            return [
                (
                    None,
                    {
                        "fields": ["scope", "provider", "budget", "name"],
                        "description": "A request is admitted only if every ceiling on "
                        "its key, its workspace and the organization, and its user's own "
                        "budget, has room for it. The first window starts now.",
                    },
                ),
                topup,
            ]
        return [
            (None, {"fields": [("level", "caps"), "provider_name", "name", "budget"]}),
            (
                "This period",
                {
                    "fields": [
                        "usage",
                        ("spend", "reserved"),
                        ("limit", "remaining"),
                        "period",
                        ("budget_started_at", "next_budget_reset_at"),
                        "lifetime_spend",
                    ],
                    "description": "Computed by the gateway; never edited by hand. Use "
                    "“Reset period now” (top right) to start a fresh window.",
                },
            ),
            topup,
            ("Open holds", {"fields": ["open_holds"]}),
            ("Resets", {"fields": ["resets"]}),
            ("Record", {"fields": ["id", "created_at", "updated_at"]}),
        ]

    def get_urls(self) -> list:
        reset = path(
            "<path:object_id>/reset-period/",
            self.admin_site.admin_view(self.reset_period_view),
            name="budgets_ceiling_reset_period",
        )
        return [reset, *super().get_urls()]

    def render_change_form(
        self, request: HttpRequest, context: dict[str, Any], *args: Any, obj: Any = None, **kw: Any
    ) -> Any:
        if obj is not None:
            context["can_reset_period"] = self.has_change_permission(request, obj)
            context["reset_period_url"] = console_url(Ceiling, "reset_period", obj.pk)
        return super().render_change_form(request, context, *args, obj=obj, **kw)

    def page_rows(self, request: HttpRequest, rows: list[Ceiling]) -> None:
        labels = scope_labels(rows)
        for ceiling in rows:
            ceiling.scope_html = scope_label(labels, ceiling)

    # -- columns -------------------------------------------------------------------------

    @admin.display(description="Ceiling", ordering="name")
    def display_name(self, obj: Ceiling) -> str:
        return obj.name or f"{obj.level} ceiling"

    @admin.display(description="Level", ordering="scope_type")
    def level(self, obj: Ceiling) -> str:
        return obj.level

    @admin.display(description="Caps")
    def caps(self, obj: Ceiling) -> SafeString:
        cached = getattr(obj, "scope_html", None)
        return cached if cached is not None else scope_label(scope_labels([obj]), obj)

    @admin.display(description="Provider", ordering="provider")
    def provider_name(self, obj: Ceiling) -> str:
        return provider_label(obj.provider)

    @admin.display(description="Budget", ordering="budget__name")
    def budget_link(self, obj: Ceiling) -> SafeString:
        return format_html(
            '<a href="{}">{}</a>', console_url(Budget, "change", obj.budget_id), str(obj.budget)
        )

    @admin.display(description="Usage")
    def usage(self, obj: Ceiling) -> SafeString:
        return ceiling_bar(obj, timezone.now())

    @admin.display(description="Spend", ordering="spend_usd")
    def spend(self, obj: Ceiling) -> SafeString:
        return money_cell(obj.spend_usd)

    @admin.display(description="Reserved", ordering="reserved_usd")
    def reserved(self, obj: Ceiling) -> SafeString:
        return money_cell(obj.reserved_usd)

    @admin.display(description="Limit")
    def limit(self, obj: Ceiling) -> SafeString:
        return limit_cell(obj, timezone.now())

    @admin.display(description="Left")
    def remaining(self, obj: Ceiling) -> SafeString:
        limit = ceiling_limit(obj, timezone.now())
        if limit is None:
            return muted("—")
        return money_cell(max(ZERO, limit - obj.spend_usd - obj.reserved_usd))

    @admin.display(description="Period ends (UTC)", ordering="next_budget_reset_at")
    def period_ends(self, obj: Ceiling) -> str:
        return period_end(obj)

    @admin.display(description="Period")
    def period(self, obj: Ceiling) -> str:
        return describe_period(obj.budget)

    @admin.display(description="Lifetime spend")
    def lifetime_spend(self, obj: Ceiling) -> SafeString:
        return money_cell(obj.lifetime_spend_usd)

    @admin.display(description="Top-up now")
    def topup_state(self, obj: Ceiling) -> SafeString:
        return topup_cell(obj.topup_usd, obj.topup_expires_at)

    @admin.display(description="Reserved by")
    def open_holds(self, obj: Ceiling) -> SafeString:
        holds = Hold.objects.filter(status=Hold.Status.OPEN, ceiling_links__ceiling=obj)
        return render_to_string(
            "admin/budgets/ceiling/holds_table.html",
            {
                "holds": list(holds.order_by("-created_at")[:CEILING_HOLDS_SHOWN]),
                "total": holds.count(),
                "now": timezone.now(),
            },
        )

    @admin.display(description="Period resets")
    def resets(self, obj: Ceiling) -> SafeString:
        logs = CeilingResetLog.objects.filter(ceiling_id=obj.pk)
        return render_to_string(
            "admin/budgets/ceiling/resets_table.html",
            {
                "resets": list(logs.select_related("budget")[:CEILING_RESETS_SHOWN]),
                "total": logs.count(),
            },
        )

    # -- saving through the services -------------------------------------------------

    def save_model(
        self, request: HttpRequest, obj: Ceiling, form: forms.Form, change: bool
    ) -> None:
        data = form.cleaned_data
        if change:
            changes: dict[str, Any] = {}
            if "name" in form.changed_data:
                changes["name"] = data["name"]
            if "budget" in form.changed_data:
                changes["budget_id"] = data["budget"].pk
            saved = ceilings.ceiling_update(ceiling_id=obj.pk, **changes) if changes else obj
        else:
            saved = ceilings.ceiling_create(
                scope_type=data["scope_type"],
                scope_id=data["scope_id"],
                budget_id=data["budget"].pk,
                name=data["name"],
                provider=data.get("provider") or "",
            )
        if set(TOPUP_FIELDS) & set(form.changed_data):
            ceilings.ceiling_topup(
                ceiling_id=saved.pk,
                amount_usd=data.get("topup_usd") or ZERO,
                expires_at=data.get("topup_expires_at"),
            )
        self.adopt(obj, saved)

    def delete_through_service(self, obj: Ceiling) -> None:
        ceilings.ceiling_delete(ceiling_id=obj.pk)

    # -- "reset period now" ------------------------------------------------------------

    def _reset(self, request: HttpRequest, ceiling: Ceiling, now: datetime) -> CeilingResetLog:
        log = periods.ceiling_period_reset(ceiling_id=ceiling.pk, now=now)
        self.log_change(
            request,
            ceiling,
            f"Reset the period: spend {format_usd(log.previous_spend_usd)} moved to the reset log.",
        )
        return log

    def reset_period_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        ceiling = self.get_object(request, unquote(object_id))
        if ceiling is None:
            raise Http404
        page = console_url(Ceiling, "change", ceiling.pk)
        if request.method != "POST":
            return HttpResponseRedirect(page)
        if not self.has_change_permission(request, ceiling):
            raise PermissionDenied
        log = self._reset(request, ceiling, timezone.now())
        self.message_user(
            request,
            f"Started a fresh period for “{self.display_name(ceiling)}”; "
            f"{format_usd(log.previous_spend_usd)} of spend moved to the reset log.",
            messages.SUCCESS,
        )
        return HttpResponseRedirect(page)

    @admin.action(description="Reset period now", permissions=["change"])
    def reset_period_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        now = timezone.now()
        total = ZERO
        chosen = list(queryset.order_by("pk"))
        for ceiling in chosen:
            total += self._reset(request, ceiling, now).previous_spend_usd
        count = len(chosen)
        self.message_user(
            request,
            f"Started a fresh period for {count} ceiling{'s' if count != 1 else ''}; "
            f"{format_usd(total)} of spend moved to the reset log.",
            messages.SUCCESS,
        )
