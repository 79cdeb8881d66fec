"""The console's aliases and routing policies (issue 15, docs/ROUTING.md), on the budget
console's site (budgets/admin_site.py is the admin's default site).

- The lists show the stored rows (add, edit, delete) and, above them, the configured
  ones (OTARI_CONFIG: read-only, the file is not the console's to change), with their
  source.
- Writes go through llm_proxy.routing.store, the functions the API calls. A form is
  checked by the same service call in a transaction rolled back at its end, so every
  refusal (a spec that cannot work, a shadowed configured name, an unknown user) shows
  on the form in the service's words, and no rule is written twice.
- Each policy (and alias) has a plan page: its select entries, on_failure, a weighted
  router's declared shares, the live explain for a caller with no conditions (what is
  tried, in order, and what is dropped, with why) and which targets are cooling down.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import yaml
from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from common.admin_tools import RefusableDeleteMixin, ServiceAdmin
from common.exceptions import GatewayError
from llm_proxy import selectors
from llm_proxy.models import Alias, RoutingPolicy
from llm_proxy.routing import health, store
from llm_proxy.routing.explain import explain
from llm_proxy.routing.plan import shares_pct
from llm_proxy.routing.spec import Entry, Policy, SpecError, providers_unchecked


class _DryRun(Exception):
    """Rolls back a service call made only to validate a form."""


def service_check(write: Callable[[], Any]) -> None:
    """Run `write` (a store service) and undo it: a ValidationError with the service's
    message when it refuses. The real write is save_model's, after the form is valid."""
    try:
        with transaction.atomic():
            write()
            raise _DryRun
    except _DryRun:
        return
    except SpecError as refused:
        raise forms.ValidationError(refused.message, code="spec") from None
    except (store.NotFound, store.Conflict) as refused:
        raise forms.ValidationError(refused.message, code="refused") from None


def _delete_refusal(exc: store.NotFound) -> GatewayError:
    """The store's refusal to delete, as RefusableDeleteMixin shows it on the page."""
    return GatewayError(exc.message, status=404)


def plan_url(name: str, *, source: str, user_id: str | None = None) -> str:
    url = reverse("admin:llm_proxy_routingpolicy_plan", args=[source, name])
    return f"{url}?{urlencode({'user_id': user_id})}" if user_id else url


def _plan_link(name: str, source: str, user_id: str | None) -> SafeString:
    return format_html('<a href="{}">Plan</a>', plan_url(name, source=source, user_id=user_id))


# ---------------------------------------------------------------------------------------
# Aliases


class AliasForm(forms.ModelForm):
    class Meta:
        model = Alias
        fields = ["name", "target", "user_id"]
        labels = {"user_id": "User"}
        help_texts = {
            "name": "What callers send as `model`, such as “fast”. No “:” or “/”.",
            "target": "provider:model, with a configured provider, such as openai:gpt-4o-mini.",
            "user_id": "Empty: every caller. A user id: that user alone (and, for them, it "
            "shadows a global or configured alias of the same name).",
        }

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        # Name and scope are the alias's identity: fixed once it exists (delete and add).
        name = self.instance.name if self.instance.pk else data.get("name")
        user_id = self.instance.user_id if self.instance.pk else data.get("user_id")
        if name and data.get("target"):
            service_check(
                lambda: store.alias_create(name=name, target=data["target"], user_id=user_id)
            )
        return data


@admin.register(Alias)
class AliasAdmin(RefusableDeleteMixin, ServiceAdmin):
    form = AliasForm
    change_list_template = "admin/llm_proxy/routing_change_list.html"
    list_display = ["name", "target", "scope", "source", "plan"]
    search_fields = ["name", "target", "user_id"]
    search_help_text = "Search by name, target or user id."

    def get_readonly_fields(self, request: HttpRequest, obj: Alias | None = None) -> list[str]:
        return ["name", "user_id", "created_at", "updated_at"] if obj else []

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        configured = [
            {"entry": e, "plan_url": plan_url(e.name, source="config")}
            for e in selectors.alias_list()
            if e.source == "config"
        ]
        context = {
            "configured": configured,
            "configured_kind": "aliases",
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)

    @admin.display(description="Scope")
    def scope(self, obj: Alias) -> str:
        return f"user {obj.user_id}" if obj.user_id else "global"

    @admin.display(description="Source")
    def source(self, obj: Alias) -> str:
        return "stored"

    @admin.display(description="Plan")
    def plan(self, obj: Alias) -> SafeString:
        return _plan_link(obj.name, "stored", obj.user_id)

    def save_model(self, request: HttpRequest, obj: Alias, form: forms.Form, change: bool) -> None:
        data = form.cleaned_data
        saved = store.alias_create(
            name=obj.name, target=data["target"], user_id=obj.user_id or None
        )
        self.adopt(obj, saved)

    def delete_through_service(self, obj: Alias) -> None:
        try:
            store.alias_delete(name=obj.name, user_id=obj.user_id)
        except store.NotFound as exc:
            raise _delete_refusal(exc) from None


# ---------------------------------------------------------------------------------------
# Routing policies


def spec_text(spec: dict[str, Any]) -> str:
    """A spec as the YAML an operator writes in OTARI_CONFIG."""
    return yaml.safe_dump(spec, sort_keys=False, default_flow_style=False)


class PolicyForm(forms.ModelForm):
    spec_text = forms.CharField(
        label="Spec",
        widget=forms.Textarea(attrs={"rows": 16, "cols": 80, "class": "vLargeTextField"}),
        help_text="YAML or JSON, as a `routing.policies` entry in OTARI_CONFIG: `select` "
        "(entries tried in order: {when: {...}, target}, {router: weighted, candidates, "
        "weights}, and a final {default: target}) and `on_failure` (targets tried after a "
        "failure).",
    )

    class Meta:
        model = RoutingPolicy
        fields = ["name", "user_id"]
        labels = {"user_id": "User"}
        help_texts = {
            "name": "What callers send as `model`, such as “balanced”. No “:” or “/”. "
            "Renaming changes what callers must send.",
            "user_id": "Empty: every caller. A user id: that user alone.",
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk and not self.is_bound:
            self.initial["spec_text"] = spec_text(self.instance.spec)

    def clean_spec_text(self) -> Any:
        try:
            return yaml.safe_load(self.cleaned_data["spec_text"])
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(exc, "problem", None)
            raise forms.ValidationError(
                f"Not valid YAML or JSON{where}" + (f": {problem}." if problem else ".")
            ) from None

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if "name" not in data or "spec_text" not in data:
            return data
        user_id = self.instance.user_id if self.instance.pk else data.get("user_id")
        rename_from = self.instance.name if self.instance.pk else None
        try:
            service_check(
                lambda: store.policy_save(
                    name=data["name"],
                    spec=data["spec_text"],
                    user_id=user_id,
                    rename_from=rename_from,
                )
            )
        except forms.ValidationError as refused:
            # The spec's (and the name's) problems next to the spec; an unknown user or a
            # taken name above the form.
            self.add_error("spec_text" if refused.code == "spec" else None, refused)
        return data


@admin.register(RoutingPolicy)
class RoutingPolicyAdmin(RefusableDeleteMixin, ServiceAdmin):
    form = PolicyForm
    change_list_template = "admin/llm_proxy/routing_change_list.html"
    list_display = ["name", "scope", "summary", "source", "plan"]
    search_fields = ["name", "user_id"]
    search_help_text = "Search by name or user id."

    def get_readonly_fields(
        self, request: HttpRequest, obj: RoutingPolicy | None = None
    ) -> list[str]:
        return ["user_id", "plan", "created_at", "updated_at"] if obj else []

    def get_fields(self, request: HttpRequest, obj: RoutingPolicy | None = None) -> list[str]:
        if obj is None:
            return ["name", "user_id", "spec_text"]
        return ["name", "user_id", "spec_text", "plan", "created_at", "updated_at"]

    def get_urls(self) -> list:
        plan = path(
            "plan/<str:source>/<str:name>/",
            self.admin_site.admin_view(self.plan_view),
            name="llm_proxy_routingpolicy_plan",
        )
        return [plan, *super().get_urls()]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        configured = [
            {"entry": e, "plan_url": plan_url(e.name, source="config")}
            for e in selectors.policy_list()
            if e.source == "config"
        ]
        context = {
            "configured": configured,
            "configured_kind": "routing policies",
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)

    # -- columns -------------------------------------------------------------------------

    @admin.display(description="Scope")
    def scope(self, obj: RoutingPolicy) -> str:
        return f"user {obj.user_id}" if obj.user_id else "global"

    @admin.display(description="Targets")
    def summary(self, obj: RoutingPolicy) -> str:
        return policy_summary(obj.spec)

    @admin.display(description="Source")
    def source(self, obj: RoutingPolicy) -> str:
        return "stored"

    @admin.display(description="Plan")
    def plan(self, obj: RoutingPolicy) -> SafeString:
        return _plan_link(obj.name, "stored", obj.user_id)

    # -- saving through the services -------------------------------------------------

    def save_model(
        self, request: HttpRequest, obj: RoutingPolicy, form: forms.Form, change: bool
    ) -> None:
        data = form.cleaned_data
        saved = store.policy_save(
            name=data["name"],
            spec=data["spec_text"],
            user_id=(form.instance.user_id if change else data.get("user_id")) or None,
            rename_from=form.initial.get("name") if change else None,
        )
        self.adopt(obj, saved)

    def delete_through_service(self, obj: RoutingPolicy) -> None:
        try:
            store.policy_delete(name=obj.name, user_id=obj.user_id)
        except store.NotFound as exc:
            raise _delete_refusal(exc) from None

    # -- the plan page ---------------------------------------------------------------

    def plan_view(self, request: HttpRequest, source: str, name: str) -> HttpResponse:
        user_id = request.GET.get("user_id") or None
        entry = selectors.policy_entry(name, user_id=user_id, source=source)
        if entry is None:
            raise Http404(f"No routing policy or alias named {name!r} here")
        model = Alias if entry.kind == "alias" else RoutingPolicy
        if not request.user.has_perm(f"llm_proxy.view_{model._meta.model_name}"):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            "title": f"{'Alias' if entry.kind == 'alias' else 'Routing policy'} {entry.name}",
            "entry": entry,
            "spec_yaml": spec_text(entry.spec),
            **plan_context(entry),
            "opts": model._meta,
        }
        return TemplateResponse(request, "admin/llm_proxy/plan.html", context)


# ---------------------------------------------------------------------------------------
# What a policy does, for the plan page and the lists


def policy_summary(spec: dict[str, Any]) -> str:
    """One line: the select entries' targets, then on_failure's."""
    parts = []
    for raw in spec.get("select") or []:
        if not isinstance(raw, dict):
            continue
        if "default" in raw:
            parts.append(f"default {raw['default']}")
        elif "router" in raw:
            parts.append(f"{raw['router']} over {', '.join(raw.get('candidates') or [])}")
        elif "target" in raw:
            parts.append(f"when … {raw['target']}")
    failover = spec.get("on_failure") or []
    if failover:
        parts.append(f"then {', '.join(failover)}")
    return "; ".join(parts)


def _conditions(entry: Entry) -> str:
    when = entry.when
    if when is None:
        return ""
    described = []
    for name in when.conditions():
        value = getattr(when, name)
        described.append(
            f"{name} {value.describe()}" if hasattr(value, "describe") else f"{name} in {value}"
        )
    return " and ".join(described)


def select_rows(policy: Policy) -> list[dict[str, Any]]:
    rows = []
    for index, entry in enumerate(policy.select):
        if entry.kind == "router":
            shares = shares_pct(entry.candidates, entry.weights)
            targets = [
                {"target": t, "weight": entry.weights.get(t, 0), "share": shares[t]}
                for t in entry.candidates
            ]
            rows.append({"index": index, "kind": f"router: {entry.router}", "targets": targets})
        elif entry.kind == "when":
            rows.append(
                {
                    "index": index,
                    "kind": "when",
                    "conditions": _conditions(entry),
                    "targets": [{"target": entry.target}],
                }
            )
        else:
            rows.append({"index": index, "kind": "default", "targets": [{"target": entry.target}]})
    return rows


def plan_context(entry: selectors.RoutingEntry) -> dict[str, Any]:
    """The declared plan of `entry` and its live explain for a caller with no conditions
    (no budget numbers, no key, no allow-list): what serves when no `when` matches."""
    policy = entry.policy
    if policy is None:
        return {"invalid": "This stored row is not a valid policy for this build."}
    try:
        # A stored row keeps a target whose provider was removed since: shown as dropped.
        with providers_unchecked():
            live = explain(name=entry.name, spec=entry.spec, user_id=entry.user_id)
    except SpecError as exc:
        return {"invalid": exc.message}
    cooling: dict[str, datetime] = health.cooling_sync(policy.targets())
    return {
        "select_rows": select_rows(policy),
        "on_failure": list(policy.on_failure),
        "live": live,
        "targets_health": [{"target": t, "until": cooling.get(t)} for t in policy.targets()],
    }
