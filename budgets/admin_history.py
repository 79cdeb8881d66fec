"""The history of money settings in the console (common/history.py): one searchable,
read-only list of every change, and the latest changes on each object's own page."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django.contrib import admin
from django.contrib.admin.utils import quote
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from budgets.models import APIKey, Budget, GatewayUser, SettingChange
from common.admin_tools import DateRangeFilter, LedgerAdmin, as_utc
from common.money import format_usd

# How many changes an object's page shows; the rest are one click away.
CHANGES_SHOWN = 10

_TYPES = {
    Budget: SettingChange.ObjectType.BUDGET,
    GatewayUser: SettingChange.ObjectType.USER,
    APIKey: SettingChange.ObjectType.KEY,
}
_ADMIN_URL = {
    SettingChange.ObjectType.BUDGET: "admin:budgets_budget_change",
    SettingChange.ObjectType.USER: "admin:budgets_gatewayuser_change",
    SettingChange.ObjectType.KEY: "admin:budgets_apikey_change",
}
_FIELD_LABELS = {
    "max_budget_usd": "limit",
    "budget_duration_sec": "period (s)",
    "reset_alignment": "calendar period",
    "alert_thresholds_pct": "alert at %",
    "alert_webhook_url": "alert webhook",
    "alert_emails": "alert e-mails",
    "budget_id": "budget",
    "topup_usd": "top-up",
    "topup_expires_at": "top-up until",
    "rpm_limit": "requests/min",
    "tpm_limit": "tokens/min",
    "is_active": "active",
    "input_price_per_mtok_usd": "input / 1M",
    "output_price_per_mtok_usd": "output / 1M",
    "cache_read_price_per_mtok_usd": "cache read / 1M",
    "cache_write_price_per_mtok_usd": "cache write / 1M",
    "deleted_at": "deleted",
}
_MONEY_FIELDS = {"max_budget_usd", "topup_usd"}
# Shown as a fact, never as a value: a webhook URL may carry a token.
_SECRET_FIELDS = {"alert_webhook_url"}


def _value(field: str, value: Any) -> str:
    if value is None or value == "":
        return "—"
    if field in _SECRET_FIELDS:
        return "set"
    if field in _MONEY_FIELDS:
        return format_usd(Decimal(str(value)))
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    if field.endswith("_at") and isinstance(value, str):
        try:
            return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return value
    return str(value)


def changes_html(change: SettingChange) -> SafeString:
    """`limit: $10.00 → $25.00` per changed field; "deleted" for a deletion."""
    if change.kind == SettingChange.Kind.DELETED:
        return format_html('<span class="otari-badge otari-badge--muted">deleted</span>')
    rows = [
        (_FIELD_LABELS.get(field, field.replace("_", " ")), _value(field, old), _value(field, new))
        for field, old, new in change.changes or []
        if field not in ("id", "user_id", "model_key", "effective_at", "origin")
        or change.kind == SettingChange.Kind.CHANGED
    ]
    if not rows:
        return format_html('<span class="otari-muted">{}</span>', change.get_kind_display())
    if change.kind == SettingChange.Kind.CREATED:
        return format_html(
            '<span class="otari-badge otari-badge--good">created</span> {}',
            format_html_join(" · ", "{}: {}", ((label, new) for label, _, new in rows)),
        )
    return format_html_join("", '<span class="otari-change">{}: <s>{}</s> → <b>{}</b></span>', rows)


def who(change: SettingChange) -> str:
    """`console · ops`, `management API · master key`, `gateway`."""
    channel = change.get_channel_display()
    return channel if change.actor in ("", channel) else f"{channel} · {change.actor}"


def setting_changes_of(obj: Any, *, limit: int = CHANGES_SHOWN) -> list[SettingChange]:
    """The latest changes of one budget, user, key or price (one query)."""
    object_type, ids = _object_ref(obj)
    return list(SettingChange.objects.filter(object_type=object_type, object_id__in=ids)[:limit])


def _object_ref(obj: Any) -> tuple[str, list[str]]:
    from usage.models import ModelPricing

    if isinstance(obj, ModelPricing):
        return SettingChange.ObjectType.PRICE, [obj.model_key]
    pk = obj.pk
    # SQLite keeps a UUID as 32 hex digits, PostgreSQL as text with dashes.
    ids = [str(pk), pk.hex] if isinstance(obj, APIKey) else [str(pk)]
    return _TYPES[type(obj)], ids


class SettingHistoryMixin:
    """Adds "Changes to settings" (the latest, newest first, and a link to all of them)
    to a budget's, user's, key's or price's page."""

    change_form_template = "admin/otari/change_form.html"

    def render_change_form(
        self, request: HttpRequest, context: dict[str, Any], *args: Any, obj: Any = None, **kw: Any
    ) -> Any:
        if obj is not None and request.user.has_perm("budgets.view_settingchange"):
            context["setting_history"] = self.setting_history(obj)
        return super().render_change_form(request, context, *args, obj=obj, **kw)

    def setting_history(self, obj: Any) -> SafeString:
        changes = setting_changes_of(obj)
        object_type, ids = _object_ref(obj)
        everything = (
            reverse("admin:budgets_settingchange_changelist")
            + "?"
            + urlencode({"object_type": object_type, "object_id": ids[0]})
        )
        if not changes:
            return format_html('<span class="otari-muted">No changes recorded yet.</span>')
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((as_utc(c.changed_at), changes_html(c), who(c)) for c in changes),
        )
        return format_html(
            '<table class="otari-history"><thead><tr><th>When</th><th>Change</th>'
            "<th>By</th></tr></thead><tbody>{}</tbody></table>"
            '<p><a href="{}">All changes to this {}</a></p>',
            rows,
            everything,
            object_type,
        )


class ObjectFilter(admin.SimpleListFilter):
    """One object's changes (`?object_type=user&object_id=ana`), linked from its page."""

    title = "object"
    parameter_name = "object_id"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [(self.value(), self.value())] if self.value() else []

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(object_id=self.value()) if self.value() else queryset


class ChangedAtFilter(DateRangeFilter):
    date_field = "changed_at"


@admin.register(SettingChange)
class SettingChangeAdmin(LedgerAdmin):
    """Every change to a money setting, through the console, the API or a command.
    History: nobody adds, edits or deletes it here (LedgerAdmin), and the rows come from
    a database view, not a table anyone writes to directly."""

    list_display = ["when", "object", "change", "by"]
    list_display_links = None
    list_filter = [ChangedAtFilter, "object_type", "channel", "kind", ObjectFilter]
    search_fields = ["object_id", "object_label", "actor"]
    search_help_text = "Object id or name (user, budget, key prefix, model), or who changed it."
    list_per_page = 50

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        term = search_term.strip()
        if not term:
            return queryset, False
        return (
            queryset.filter(
                Q(object_id__istartswith=term)
                | Q(object_label__icontains=term)
                | Q(actor__icontains=term)
            ),
            False,
        )

    @admin.display(description="When (UTC)", ordering="changed_at")
    def when(self, obj: SettingChange) -> str:
        return as_utc(obj.changed_at, zone=False)

    @admin.display(description="Setting of", ordering="object_type")
    def object(self, obj: SettingChange) -> SafeString:
        label = obj.object_label or obj.object_id
        url_name = _ADMIN_URL.get(obj.object_type)
        if url_name is None or obj.kind == SettingChange.Kind.DELETED:
            link = (
                reverse("admin:usage_modelpricing_changelist")
                + "?"
                + urlencode({"q": obj.object_id})
                if obj.object_type == SettingChange.ObjectType.PRICE
                else None
            )
        else:
            link = reverse(url_name, args=[quote(obj.object_id)])
        if link is None:
            return format_html("{} <b>{}</b>", obj.object_type, label)
        return format_html('{} <a href="{}">{}</a>', obj.object_type, link, label)

    @admin.display(description="Change (old → new)")
    def change(self, obj: SettingChange) -> SafeString:
        return changes_html(obj)

    @admin.display(description="By (through)", ordering="channel")
    def by(self, obj: SettingChange) -> str:
        return who(obj)
