"""The console's users: list with money against the limit, page with keys, usage and spend,
and the form that changes a user through budgets.services.accounts (top-ups, moves, resets)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import F, Q, QuerySet
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from budgets import rules
from budgets.admin.budgets import alerts_link
from budgets.admin.display import (
    RATE_LIMITS_DESCRIPTION,
    USER_CHART_DAYS,
    USER_KEYS_SHOWN,
    USER_RECENT_USAGE_SHOWN,
    console_url,
    describe_period,
    limits_cell,
    metadata_field_value,
    model_list_value,
    money_cell,
    rpm_limit_field,
    topup_cell,
    topup_form_clean,
    tpm_limit_field,
)
from budgets.admin_history import SettingHistoryMixin
from budgets.models import (
    APIKey,
    Budget,
    BudgetAlert,
    GatewayUser,
)
from budgets.selectors import user_money_annotate
from budgets.services import accounts, periods
from common.admin_tools import (
    ZERO,
    ServiceAdmin,
    as_utc,
    badge,
    format_usd,
    usage_bar,
)
from common.charts import daily_spend_chart
from usage.selectors import spend_by_day


class UserForm(forms.ModelForm):
    rpm_limit = rpm_limit_field("All of this user's requests, whatever the key.")
    tpm_limit = tpm_limit_field(
        "Prompt and completion tokens of all of this user's requests (estimated when a "
        "request starts, corrected when it ends)."
    )

    class Meta:
        model = GatewayUser
        fields = [
            "user_id",
            "alias",
            "budget",
            "blocked",
            "topup_usd",
            "topup_expires_at",
            "allowed_models",
            "metadata",
            "rpm_limit",
            "tpm_limit",
        ]
        labels = {
            "user_id": "User id",
            "topup_usd": "Top-up (USD)",
            "topup_expires_at": "Top-up expires at",
            "blocked": "Blocked",
        }
        help_texts = {
            "user_id": "The id API callers and the management API use; cannot be changed.",
            "budget": "Moving the user to a different budget starts a fresh window: "
            "spend goes to $0.00 (the old spend is kept in the reset log).",
            "blocked": "A blocked user's requests are refused with 403 user_blocked.",
            "topup_usd": "Added to the budget's limit until the expiry below. Set 0 to remove it.",
            "topup_expires_at": "UTC. Required with a top-up, and in the future.",
            "allowed_models": 'A JSON list such as ["openai:gpt-4o-mini", "anthropic:*"]; '
            "empty = any model, [] = none.",
            "metadata": "A JSON object, for your own use.",
        }

    def clean_allowed_models(self) -> list[str] | None:
        return model_list_value(self.cleaned_data.get("allowed_models"))

    def clean_metadata(self) -> dict[str, Any]:
        return metadata_field_value(self.cleaned_data.get("metadata"))

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        topup_form_clean(self, cleaned)
        return cleaned


class UsageLevelFilter(admin.SimpleListFilter):
    """Against the limit admission checks (spend + reserved vs budget + live top-up)."""

    title = "budget usage"
    parameter_name = "usage"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [
            ("near", "80% or more"),
            ("over", "At or over the limit, or refused for budget"),
            ("uncapped", "No limit"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "near":
            return queryset.filter(
                cap_usd__isnull=False, committed_usd__gte=F("cap_usd") * Decimal("0.8")
            )
        if self.value() == "over":
            return queryset.filter(
                Q(committed_usd__gte=F("cap_usd")) | Q(budget_refused_at__isnull=False),
                cap_usd__isnull=False,
            )
        if self.value() == "uncapped":
            return queryset.filter(cap_usd__isnull=True)
        return queryset


class UserStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [("active", "Active"), ("blocked", "Blocked"), ("deleted", "Deleted")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "active":
            return queryset.filter(deleted_at__isnull=True, blocked=False)
        if self.value() == "blocked":
            return queryset.filter(deleted_at__isnull=True, blocked=True)
        if self.value() == "deleted":
            return queryset.filter(deleted_at__isnull=False)
        return queryset


@admin.register(GatewayUser)
class GatewayUserAdmin(SettingHistoryMixin, ServiceAdmin):
    form = UserForm
    list_display = [
        "user_id",
        "alias",
        "budget_link",
        "spend",
        "reserved",
        "limit",
        "remaining",
        "usage",
        "next_reset",
        "limits",
        "state",
    ]
    list_display_links = ["user_id"]
    list_filter = [UsageLevelFilter, "budget", UserStateFilter]
    list_select_related = ["budget"]
    search_fields = ["user_id", "alias"]
    search_help_text = "Search by user id or alias."
    actions = ["block_users", "unblock_users", "reset_period_now"]
    readonly_fields = [
        "spend",
        "reserved",
        "limit",
        "remaining",
        "usage",
        "budget_refusal",
        "lifetime_spend",
        "topup_state",
        "budget_started_at",
        "next_budget_reset_at",
        "period",
        "api_keys_table",
        "recent_usage",
        "alerts_link",
        "created_at",
        "updated_at",
        "deleted_at",
    ]
    delete_confirmation_template = "admin/budgets/gatewayuser/delete_confirmation.html"
    delete_selected_confirmation_template = (
        "admin/budgets/gatewayuser/delete_selected_confirmation.html"
    )

    def render_change_form(
        self, request: HttpRequest, context: dict[str, Any], *args: Any, obj: Any = None, **kw: Any
    ) -> Any:
        # The user's spend per day: one aggregate on their (user, time) index.
        if obj is not None and request.user.has_perm("usage.view_usagelog"):
            days = spend_by_day(now=timezone.now(), days=USER_CHART_DAYS, user_id=obj.pk)
            context["otari_chart"] = daily_spend_chart(days)
            context["otari_chart_title"] = f"Spend per day, last {USER_CHART_DAYS} days (UTC)"
        return super().render_change_form(request, context, *args, obj=obj, **kw)

    def get_fieldsets(self, request: HttpRequest, obj: GatewayUser | None = None) -> list:
        if obj is None:
            return [
                (None, {"fields": ["user_id", "alias", "budget", "blocked"]}),
                ("Temporary top-up", {"fields": ["topup_usd", "topup_expires_at"]}),
                (
                    "Rate limits",
                    {
                        "fields": [("rpm_limit", "tpm_limit")],
                        "description": RATE_LIMITS_DESCRIPTION,
                    },
                ),
                ("Access", {"fields": ["allowed_models", "metadata"]}),
            ]
        return [
            (None, {"fields": ["alias", "budget", "blocked"]}),
            (
                "This period",
                {
                    "fields": [
                        "usage",
                        "budget_refusal",
                        ("spend", "reserved"),
                        ("limit", "remaining"),
                        "period",
                        ("budget_started_at", "next_budget_reset_at"),
                        "lifetime_spend",
                    ],
                    "description": "Computed by the gateway; never edited by hand. Use the "
                    "“Reset budget period now” action to start a fresh window.",
                },
            ),
            (
                "Temporary top-up",
                {
                    "fields": ["topup_state", "topup_usd", "topup_expires_at"],
                    "description": "Raises this user's limit until the expiry; replaces "
                    "any previous top-up.",
                },
            ),
            (
                "Rate limits",
                {
                    "fields": [("rpm_limit", "tpm_limit")],
                    "description": RATE_LIMITS_DESCRIPTION
                    + " Each key may have limits of its own as well.",
                },
            ),
            ("API keys", {"fields": ["api_keys_table"]}),
            ("Recent requests", {"fields": ["recent_usage"]}),
            *(
                [("Budget alerts", {"fields": ["alerts_link"]})]
                if request.user.has_perm("budgets.view_budgetalert")
                else []
            ),
            ("Access", {"fields": ["allowed_models", "metadata"], "classes": ["collapse"]}),
            ("Record", {"fields": ["created_at", "updated_at", "deleted_at"]}),
        ]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return user_money_annotate(super().get_queryset(request), now=timezone.now())

    def formfield_for_dbfield(self, db_field: Any, request: HttpRequest, **kwargs: Any) -> Any:
        field = super().formfield_for_dbfield(db_field, request, **kwargs)
        if db_field.name == "budget" and field is not None:
            # Editing or deleting a budget from a user's page would change it for every
            # user on it: that belongs on the budget's own page.
            field.widget.can_change_related = False
            field.widget.can_delete_related = False
        return field

    # -- columns -------------------------------------------------------------------------

    @admin.display(description="Budget", ordering="budget__name")
    def budget_link(self, obj: GatewayUser) -> SafeString | str:
        if obj.budget is None:
            return "—"
        return format_html(
            '<a href="{}">{}</a>', console_url(Budget, "change", obj.budget_id), str(obj.budget)
        )

    @admin.display(description="Spend", ordering="spend_usd")
    def spend(self, obj: GatewayUser) -> SafeString:
        return money_cell(obj.spend_usd)

    @admin.display(description="Reserved", ordering="reserved_usd")
    def reserved(self, obj: GatewayUser) -> SafeString:
        return money_cell(obj.reserved_usd)

    @admin.display(description="Limit", ordering="cap_usd")
    def limit(self, obj: GatewayUser) -> SafeString:
        if obj.cap_usd is None:
            return format_html('<span class="otari-muted">{}</span>', "uncapped")
        if obj.topup_usd and rules.topup_live(obj.topup_expires_at, timezone.now()):
            return format_html(
                '<span class="otari-money" title="Includes a top-up of {} until {}">{} *</span>',
                format_usd(obj.topup_usd),
                as_utc(obj.topup_expires_at),
                format_usd(obj.cap_usd),
            )
        return money_cell(obj.cap_usd)

    @admin.display(description="Left")
    def remaining(self, obj: GatewayUser) -> SafeString:
        if obj.cap_usd is None:
            return format_html('<span class="otari-muted">{}</span>', "—")
        return money_cell(max(ZERO, obj.cap_usd - obj.committed_usd))

    @admin.display(description="Usage", ordering="used_ratio")
    def usage(self, obj: GatewayUser) -> SafeString:
        return usage_bar(
            spend=obj.spend_usd,
            reserved=obj.reserved_usd,
            limit=obj.cap_usd,
            refused_at=obj.budget_refused_at,
        )

    @admin.display(description="Refused for budget")
    def budget_refusal(self, obj: GatewayUser) -> SafeString | str:
        if obj.budget_refused_at is None:
            return "not in this period"
        from usage.models import UsageLog

        refusals = console_url(
            UsageLog, "changelist", query={"user": obj.user_id, "status__exact": "error"}
        )
        return format_html(
            '<span class="otari-usage__refused">last at {}</span>: requests do not fit what '
            'is left. <a href="{}">See the failed requests</a>',
            as_utc(obj.budget_refused_at),
            refusals,
        )

    @admin.display(description="Next reset (UTC)", ordering="next_budget_reset_at")
    def next_reset(self, obj: GatewayUser) -> str:
        if obj.next_budget_reset_at is None:
            return "never" if obj.budget_id else "—"
        return as_utc(obj.next_budget_reset_at, zone=False)

    @admin.display(description="Rate limits")
    def limits(self, obj: GatewayUser) -> SafeString:
        return limits_cell(obj)

    @admin.display(description="State", ordering="blocked")
    def state(self, obj: GatewayUser) -> SafeString:
        if obj.deleted_at is not None:
            return badge("muted", "deleted")
        if obj.blocked:
            return badge("bad", "blocked")
        return badge("good", "active")

    @admin.display(description="Top-up now")
    def topup_state(self, obj: GatewayUser) -> SafeString:
        return topup_cell(obj.topup_usd, obj.topup_expires_at)

    @admin.display(description="Lifetime spend")
    def lifetime_spend(self, obj: GatewayUser) -> SafeString:
        return money_cell(obj.lifetime_spend_usd)

    @admin.display(description="Period")
    def period(self, obj: GatewayUser) -> str:
        return describe_period(obj.budget)

    @admin.display(description="Keys")
    def api_keys_table(self, obj: GatewayUser) -> SafeString:
        return render_to_string(
            "admin/budgets/gatewayuser/keys_table.html",
            {
                "keys": list(obj.api_keys.all()[:USER_KEYS_SHOWN]),
                "add_url": console_url(APIKey, "add", query={"user": obj.pk}),
            },
        )

    @admin.display(description="Requests")
    def recent_usage(self, obj: GatewayUser) -> SafeString:
        from usage.models import UsageLog

        rows = (
            UsageLog.objects.filter(user_id=obj.pk)
            .only("id", "timestamp", "model", "provider", "status", "status_code", "cost_usd")
            .order_by("-timestamp")[:USER_RECENT_USAGE_SHOWN]
        )
        return render_to_string(
            "admin/budgets/gatewayuser/recent_usage.html",
            {
                "rows": list(rows),
                "all_url": console_url(UsageLog, "changelist", query={"user": obj.pk}),
            },
        )

    @admin.display(description="Raised")
    def alerts_link(self, obj: GatewayUser) -> SafeString:
        return alerts_link(BudgetAlert.objects.filter(user_id=obj.pk).count(), user=obj.pk)

    # -- saving through the services -------------------------------------------------

    def save_model(
        self, request: HttpRequest, obj: GatewayUser, form: forms.Form, change: bool
    ) -> None:
        data = form.cleaned_data
        if change:
            changes = {
                name: data[name]
                for name in (
                    "alias",
                    "blocked",
                    "allowed_models",
                    "metadata",
                    "budget",
                    "rpm_limit",
                    "tpm_limit",
                )
                if name in form.changed_data
            }
            if changes:
                accounts.user_update(user_id=obj.pk, **changes)
        else:
            accounts.user_create(
                user_id=data["user_id"],
                alias=data["alias"],
                budget=data["budget"],
                blocked=data["blocked"],
                allowed_models=data["allowed_models"],
                metadata=data["metadata"],
                rpm_limit=data["rpm_limit"],
                tpm_limit=data["tpm_limit"],
            )
        if {"topup_usd", "topup_expires_at"} & set(form.changed_data):
            accounts.user_topup_set(
                user_id=obj.pk,
                amount_usd=data.get("topup_usd") or ZERO,
                expires_at=data.get("topup_expires_at"),
            )
        self.adopt(obj, obj)

    # Deleting a user is soft (docs/SPEC.md §6): the row, its usage and its history stay, its
    # keys stop working. Nothing else is deleted, so the confirmation lists only the user.
    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> tuple:
        return [str(o) for o in objs], {self.opts.verbose_name_plural: len(objs)}, set(), []

    def delete_model(self, request: HttpRequest, obj: GatewayUser) -> None:
        accounts.user_delete(user_id=obj.pk)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        for user_id in queryset.values_list("pk", flat=True):
            accounts.user_delete(user_id=user_id)

    # -- actions ---------------------------------------------------------------------

    def _set_blocked(self, request: HttpRequest, queryset: QuerySet, blocked: bool) -> None:
        changed = 0
        for user in queryset.filter(blocked=not blocked):
            accounts.user_update(user_id=user.pk, blocked=blocked)
            self.log_change(request, user, [{"changed": {"fields": ["Blocked"]}}])
            changed += 1
        verb = "Blocked" if blocked else "Unblocked"
        self.message_user(request, f"{verb} {changed} user{'s' if changed != 1 else ''}.")

    @admin.action(description="Block selected users", permissions=["change"])
    def block_users(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._set_blocked(request, queryset, True)

    @admin.action(description="Unblock selected users", permissions=["change"])
    def unblock_users(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._set_blocked(request, queryset, False)

    @admin.action(description="Reset budget period now", permissions=["change"])
    def reset_period_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        now = timezone.now()
        total = ZERO
        users = list(queryset.order_by("pk"))
        for user in users:
            log = periods.user_period_reset(user_id=user.pk, now=now)
            total += log.previous_spend_usd
            self.log_change(
                request,
                user,
                f"Reset the budget period: spend {format_usd(log.previous_spend_usd)} moved "
                "to the reset log.",
            )
        count = len(users)
        self.message_user(
            request,
            f"Started a fresh budget period for {count} user{'s' if count != 1 else ''}; "
            f"{format_usd(total)} of spend moved to the reset log.",
            messages.SUCCESS,
        )
