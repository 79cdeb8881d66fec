"""The console's API keys: created, edited, rotated and revoked through
budgets.services.keys; a new secret is shown once and never stored."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from budgets.admin.ceilings import ceilings_table
from budgets.admin.display import (
    RATE_LIMITS_DESCRIPTION,
    limits_cell,
    metadata_field_value,
    model_list_value,
    rpm_limit_field,
    tpm_limit_field,
    user_link,
    workspace_keys,
    workspace_link,
    workspace_of,
)
from budgets.admin_history import SettingHistoryMixin
from budgets.models import APIKey, Ceiling, Workspace
from budgets.services import keys
from common.admin_tools import (
    ServiceAdmin,
    as_utc,
    key_display,
    key_state,
)

# ---------------------------------------------------------------------------------------
# API keys


class _KeyFormBase(forms.ModelForm):
    rpm_limit = rpm_limit_field("Requests with this key, on top of its user's limit.")
    tpm_limit = tpm_limit_field("Tokens of requests with this key, on top of its user's limit.")

    def clean_allowed_models(self) -> list[str] | None:
        return model_list_value(self.cleaned_data.get("allowed_models"))

    def clean_metadata(self) -> dict[str, Any]:
        return metadata_field_value(self.cleaned_data.get("metadata"))

    def clean_expires_at(self) -> Any:
        value = self.cleaned_data.get("expires_at")
        if value is not None and "expires_at" in self.changed_data and value <= timezone.now():
            raise forms.ValidationError("The expiry must be in the future.")
        return value


_KEY_HELP = {
    "key_name": "A label to recognise the key by, such as “ci” or “alice's laptop”.",
    "expires_at": "UTC. Empty = never expires.",
    "allowed_models": 'A JSON list such as ["openai:gpt-4o-mini"]; empty = the user\'s list.',
    "exclude_from_budget": "Requests with this key are logged with their cost but never held "
    "or charged to the budget.",
    "is_active": "Untick to revoke the key: it stops working on the next request.",
    "workspace": "Fixed for the key's life: its requests count toward this workspace's "
    "ceilings. Empty = the default workspace.",
}


class KeyAddForm(_KeyFormBase):
    class Meta:
        model = APIKey
        fields = [
            "user",
            "workspace",
            "key_name",
            "expires_at",
            "allowed_models",
            "exclude_from_budget",
            "metadata",
            "rpm_limit",
            "tpm_limit",
        ]
        help_texts = _KEY_HELP


class KeyChangeForm(_KeyFormBase):
    class Meta:
        model = APIKey
        fields = [
            "key_name",
            "is_active",
            "expires_at",
            "allowed_models",
            "exclude_from_budget",
            "metadata",
            "rpm_limit",
            "tpm_limit",
        ]
        help_texts = _KEY_HELP


class KeyWorkspaceFilter(admin.SimpleListFilter):
    title = "workspace"
    parameter_name = "workspace"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [(str(pk), name) for pk, name in Workspace.objects.values_list("id", "name")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if not self.value():
            return queryset
        try:
            workspace_id = uuid.UUID(self.value())
        except ValueError:
            return queryset.none()
        return queryset.filter(workspace_keys(workspace_id))


class KeyExpiryFilter(admin.SimpleListFilter):
    title = "expiry"
    parameter_name = "expiry"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple]:
        return [("expired", "Expired"), ("week", "Expires within 7 days"), ("never", "Never")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        now = timezone.now()
        if self.value() == "expired":
            return queryset.filter(expires_at__lte=now)
        if self.value() == "week":
            return queryset.filter(expires_at__gt=now, expires_at__lte=now + timedelta(days=7))
        if self.value() == "never":
            return queryset.filter(expires_at__isnull=True)
        return queryset


@admin.register(APIKey)
class APIKeyAdmin(SettingHistoryMixin, ServiceAdmin):
    """Keys: created, edited, revoked and rotated through the services. The secret is
    rendered once, in the response to the request that made it; it is never stored (not
    in the database, the session or the messages) and the hash is never shown."""

    list_display = [
        "key",
        "key_name",
        "owner",
        "workspace_name",
        "state",
        "expires",
        "last_used",
        "created_at",
        "budget_mode",
        "limits",
    ]
    list_filter = ["is_active", KeyWorkspaceFilter, KeyExpiryFilter, "exclude_from_budget"]
    list_select_related = ["user", "workspace"]
    search_fields = ["key_name", "key_prefix", "user__user_id", "user__alias"]
    search_help_text = "Search by key name, key prefix (gw-…), user id or alias."
    raw_id_fields = ["user"]
    actions = ["revoke_keys", "rotate_keys"]
    issued_key_template = "admin/budgets/apikey/key_secret.html"

    def get_form(
        self, request: HttpRequest, obj: APIKey | None = None, change: bool = False, **kwargs: Any
    ) -> type[forms.ModelForm]:
        kwargs["form"] = KeyChangeForm if obj is not None else KeyAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj: APIKey | None = None) -> list:
        if obj is None:
            return [
                (
                    None,
                    {
                        "fields": ["user", "workspace", "key_name", "expires_at"],
                        "description": "The secret is shown once, on the next page. "
                        "Only its hash is stored.",
                    },
                ),
                ("Access", {"fields": ["allowed_models", "exclude_from_budget", "metadata"]}),
                self._rate_limits_fieldset,
            ]
        return [
            (
                None,
                {
                    "fields": [
                        "key",
                        "owner",
                        "workspace_name",
                        "key_name",
                        "is_active",
                        "expires_at",
                    ]
                },
            ),
            ("Access", {"fields": ["allowed_models", "exclude_from_budget", "metadata"]}),
            self._rate_limits_fieldset,
            ("Ceilings on this key", {"fields": ["ceilings"]}),
            ("Record", {"fields": ["created_at", "updated_at", "last_used_at"]}),
        ]

    _rate_limits_fieldset = (
        "Rate limits",
        {
            "fields": [("rpm_limit", "tpm_limit")],
            "description": RATE_LIMITS_DESCRIPTION + " The user's own limits apply as well.",
        },
    )

    def get_readonly_fields(self, request: HttpRequest, obj: APIKey | None = None) -> list:
        if obj is None:
            return []
        return [
            "key",
            "owner",
            "workspace_name",
            "ceilings",
            "created_at",
            "updated_at",
            "last_used_at",
        ]

    def has_delete_permission(self, request: HttpRequest, obj: APIKey | None = None) -> bool:
        # Usage rows refer to their key: revoke instead, and history keeps its key.
        return False

    @admin.display(description="Key", ordering="key_prefix")
    def key(self, obj: APIKey) -> SafeString:
        return format_html("<code>{}</code>", key_display(obj))

    @admin.display(description="User", ordering="user__user_id")
    def owner(self, obj: APIKey) -> SafeString:
        return user_link(obj.user_id, str(obj.user))

    @admin.display(description="Workspace", ordering="workspace__name")
    def workspace_name(self, obj: APIKey) -> SafeString:
        # A key issued before workspaces existed has none: it is in the default one.
        name = obj.workspace.name if obj.workspace is not None else "Default"
        return workspace_link(workspace_of(obj), name)

    @admin.display(description="Ceilings")
    def ceilings(self, obj: APIKey) -> SafeString:
        return ceilings_table(Ceiling.Scope.API_TOKEN, obj.pk)

    @admin.display(description="State", ordering="is_active")
    def state(self, obj: APIKey) -> SafeString:
        return key_state(obj)

    @admin.display(description="Expires", ordering="expires_at")
    def expires(self, obj: APIKey) -> str:
        return as_utc(obj.expires_at) if obj.expires_at else "never"

    @admin.display(description="Last used", ordering="last_used_at")
    def last_used(self, obj: APIKey) -> str:
        return as_utc(obj.last_used_at) if obj.last_used_at else "never"

    @admin.display(description="Budget", ordering="exclude_from_budget")
    def budget_mode(self, obj: APIKey) -> SafeString | str:
        if obj.exclude_from_budget:
            return format_html(
                '<span class="otari-badge otari-badge--warn" title="{}">{}</span>',
                "Cost is logged but never held or charged",
                "excluded",
            )
        return "charged"

    @admin.display(description="Rate limits")
    def limits(self, obj: APIKey) -> SafeString:
        return limits_cell(obj)

    def save_model(self, request: HttpRequest, obj: APIKey, form: forms.Form, change: bool) -> None:
        data = form.cleaned_data
        if change:
            changes = {name: data[name] for name in form.changed_data if name in form.fields}
            keys.api_key_update(key_id=obj.pk, **changes)
            self.adopt(obj, obj)
            return
        key, secret = keys.api_key_create(
            user=data["user"],
            key_name=data["key_name"],
            expires_at=data["expires_at"],
            allowed_models=data["allowed_models"],
            exclude_from_budget=data["exclude_from_budget"],
            metadata=data["metadata"],
            rpm_limit=data["rpm_limit"],
            tpm_limit=data["tpm_limit"],
            workspace=data["workspace"],
        )
        # Handed to response_add through the request object only: it dies with this
        # request, and nothing persists it.
        request._otari_issued = [(key, secret)]
        self.adopt(obj, key)

    def response_add(self, request: HttpRequest, obj: APIKey, post_url_continue: Any = None):
        issued = getattr(request, "_otari_issued", None)
        if not issued:
            return super().response_add(request, obj, post_url_continue)
        return self._secret_response(request, issued, created=True)

    def _secret_response(
        self, request: HttpRequest, issued: list[tuple[APIKey, str]], *, created: bool
    ) -> TemplateResponse:
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Copy your new key now" if created else "Copy the rotated keys now",
            "issued": [(key, secret, key_display(key)) for key, secret in issued],
            "created": created,
        }
        response = TemplateResponse(request, self.issued_key_template, context)
        # Keep the page out of every cache (browser back/forward included).
        response["Cache-Control"] = "no-store, max-age=0"
        response["Pragma"] = "no-cache"
        return response

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = 0
        for key in queryset.filter(is_active=True).order_by("pk"):
            keys.api_key_revoke(key_id=key.pk)
            self.log_change(request, key, "Revoked the key.")
            count += 1
        self.message_user(request, f"Revoked {count} key{'s' if count != 1 else ''}.")

    @admin.action(
        description="Rotate selected keys (new secret, old one stops working)",
        permissions=["change"],
    )
    def rotate_keys(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse:
        issued = []
        for key in queryset.order_by("pk"):
            secret = keys.api_key_rotate(key=key)
            self.log_change(request, key, "Rotated the key's secret.")
            issued.append((key, secret))
        return self._secret_response(request, issued, created=False)
