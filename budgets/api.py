"""Management API for budgets, users and API keys (docs/SPEC.md §6), master key only.

Thin views: authenticate (the master key, budgets.rest, settings' default), validate
(budgets.serializers), call a service in budgets.services (which owns the transaction) or a
selector, render. Served under both
`/v1/` and `/api/v1/` (otari/urls.py).

Decisions where docs/SPEC.md is silent (docs/API.md has the full list):
- Deleting a user is soft (budgets.services.user_delete): keys deactivated, usage kept.
  A deleted user is gone from this API (404, not listed) and its id is not reused (409).
- DELETE on a key revokes it (is_active false): the row stays so usage rows keep naming
  the key; it still lists, and can be reactivated with PATCH.
- A key created without `user_id` gets a user of its own (`apikey-<hex>`).
- Settings the `otari` SDK can send but this gateway does not enforce (request/token
  limits, per-key telemetry capture) are refused with 422 rather than silently ignored.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from budgets import selectors
from budgets.exceptions import UnknownUser, UnknownWorkspace
from budgets.models import DEFAULT_WORKSPACE_ID, APIKey, Budget
from budgets.serializers import (
    ALERT_SETTINGS,
    BudgetAlertResponse,
    BudgetResetLogResponse,
    BudgetResponse,
    BudgetSettings,
    CreateKey,
    CreateKeyResponse,
    CreateUser,
    KeyInfo,
    UpdateKey,
    UpdateUser,
    UserResponse,
    UserTopup,
)
from budgets.services import accounts, keys, tenancy
from common.exceptions import BadRequest, Conflict, NotFound
from common.rest import (
    PAGE_PARAMETERS,
    ManagementMixin,
    Unprocessable,
    error_responses,
    page_params,
    quoted_id,
    validated,
)
from usage import selectors as usage_selectors
from usage.serializers import UsageEntry


def _budget_or_404(budget_id: str) -> Budget:
    budget = selectors.budget_get(budget_id=budget_id)
    if budget is None:
        raise NotFound(f"Budget {quoted_id(budget_id)} not found", code="budget_not_found")
    return budget


def _referenced_budget(budget_id: str | None) -> Budget | None:
    """The budget a request body names (None for null). Unknown: 404 naming the field;
    the value itself is body input and is not echoed."""
    if budget_id is None:
        return None
    budget = selectors.budget_get(budget_id=budget_id)
    if budget is None:
        raise NotFound("The budget named by budget_id was not found", code="budget_not_found")
    return budget


def _user_or_404(user_id: str) -> Any:
    user = selectors.user_get(user_id=user_id)
    if user is None:
        raise NotFound(f"User {quoted_id(user_id)} not found", code="user_not_found")
    return user


def _key_id(key_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(key_id)
    except ValueError:
        raise NotFound(f"API key {quoted_id(key_id)} not found", code="key_not_found") from None


def _key_or_404(key_id: str) -> APIKey:
    key = selectors.api_key_get(key_id=_key_id(key_id))
    if key is None:
        raise NotFound(f"API key {quoted_id(key_id)} not found", code="key_not_found")
    return key


# ---------------------------------------------------------------------------------------
# Budgets


def _budget_unsupported_check(data: dict[str, Any]) -> None:
    for name in ("request_limit", "token_limit"):
        if data.get(name) is not None:
            raise Unprocessable(f"{name}: Not supported by this gateway; send null or omit it.")


def _budget_period_check(data: dict[str, Any]) -> None:
    if data.get("budget_duration_sec") is not None and data.get("reset_alignment") is not None:
        raise BadRequest(
            "budget_duration_sec and reset_alignment are mutually exclusive: give one",
            code="period_conflict",
        )


def _alert_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The alert settings that were sent, as sent: budgets.services validates them (an
    omitted one keeps its default on create, its value on update)."""
    return {name: data[name] for name in ALERT_SETTINGS if name in data}


class BudgetListApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="budgets_list",
        tags=["budgets"],
        parameters=PAGE_PARAMETERS,
        responses={200: BudgetResponse(many=True), **error_responses(422)},
    )
    def get(self, request: Request) -> Response:
        skip, limit = page_params(request)
        return Response(
            BudgetResponse(selectors.budget_list(skip=skip, limit=limit), many=True).data
        )

    @extend_schema(
        operation_id="budgets_create",
        tags=["budgets"],
        request=BudgetSettings,
        description="Alert settings are optional: thresholds default to [80, 100], and a "
        "budget alerts only once it has a webhook or an email address. Invalid alert "
        "settings: 422 naming the rule, never the value.",
        responses={200: BudgetResponse, **error_responses(400, 422)},
    )
    def post(self, request: Request) -> Response:
        data = validated(BudgetSettings, request.data)
        _budget_unsupported_check(data)
        _budget_period_check(data)
        budget = accounts.budget_create(
            name=data.get("name") or "",
            max_budget_usd=data.get("max_budget"),
            budget_duration_sec=data.get("budget_duration_sec"),
            reset_alignment=data.get("reset_alignment"),
            **_alert_settings(data),
        )
        return Response(BudgetResponse(_budget_or_404(budget.budget_id)).data)


class BudgetDetailApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="budgets_get",
        tags=["budgets"],
        responses={200: BudgetResponse, **error_responses(404)},
    )
    def get(self, request: Request, budget_id: str) -> Response:
        return Response(BudgetResponse(_budget_or_404(budget_id)).data)

    @extend_schema(
        operation_id="budgets_update",
        tags=["budgets"],
        request=BudgetSettings,
        description="Only the fields sent change. Setting one kind of period clears the "
        "other; sending both is a 400. Takes effect on the next request, everywhere. "
        "`alert_webhook_url` / `alert_emails` null clears them; `alert_thresholds_pct` [] "
        "turns alerts off.",
        responses={200: BudgetResponse, **error_responses(400, 404, 422)},
    )
    def patch(self, request: Request, budget_id: str) -> Response:
        data = validated(BudgetSettings, request.data, partial=True)
        _budget_unsupported_check(data)
        _budget_period_check(data)
        changes: dict[str, Any] = {}
        if data.get("name") is not None:
            changes["name"] = data["name"]
        if "max_budget" in data:
            changes["max_budget_usd"] = data["max_budget"]
        if "budget_duration_sec" in data:
            changes["budget_duration_sec"] = data["budget_duration_sec"]
            if data["budget_duration_sec"] is not None:
                changes["reset_alignment"] = None
        if "reset_alignment" in data:
            changes["reset_alignment"] = data["reset_alignment"]
            if data["reset_alignment"] is not None:
                changes["budget_duration_sec"] = None
        changes.update(_alert_settings(data))
        try:
            accounts.budget_update(budget_id=budget_id, **changes)
        except Budget.DoesNotExist:
            raise NotFound(
                f"Budget {quoted_id(budget_id)} not found", code="budget_not_found"
            ) from None
        return Response(BudgetResponse(_budget_or_404(budget_id)).data)

    @extend_schema(
        operation_id="budgets_delete",
        tags=["budgets"],
        description="Refused (409) while live users are on the budget. Reset logs stay.",
        responses={204: None, **error_responses(404, 409)},
    )
    def delete(self, request: Request, budget_id: str) -> Response:
        try:
            accounts.budget_delete(budget_id=budget_id)
        except Budget.DoesNotExist:
            raise NotFound(
                f"Budget {quoted_id(budget_id)} not found", code="budget_not_found"
            ) from None
        return Response(status=204)


class BudgetResetLogListApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="budgets_reset_logs",
        tags=["budgets"],
        parameters=PAGE_PARAMETERS,
        description="Period rolls of the budget's users, newest first. Kept (and listed "
        "here) after the budget is deleted.",
        responses={200: BudgetResetLogResponse(many=True), **error_responses(404, 422)},
    )
    def get(self, request: Request, budget_id: str) -> Response:
        skip, limit = page_params(request)
        if selectors.budget_get(budget_id=budget_id) is None and not (
            selectors.budget_reset_log_exists(budget_id=budget_id)
        ):
            raise NotFound(f"Budget {quoted_id(budget_id)} not found", code="budget_not_found")
        logs = selectors.budget_reset_log_list(budget_id=budget_id, skip=skip, limit=limit)
        return Response(BudgetResetLogResponse(logs, many=True).data)


class BudgetAlertListApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="budgets_alerts",
        tags=["budgets"],
        parameters=[
            *PAGE_PARAMETERS,
            OpenApiParameter("user_id", str, description="Only this user's alerts."),
        ],
        description="Alerts raised for the budget's users (one per user, threshold and "
        "period), newest first, with their delivery state. Read-only. Kept (and listed "
        "here) after the budget is deleted.",
        responses={200: BudgetAlertResponse(many=True), **error_responses(404, 422)},
    )
    def get(self, request: Request, budget_id: str) -> Response:
        skip, limit = page_params(request)
        if selectors.budget_get(budget_id=budget_id) is None and not (
            selectors.budget_alert_exists(budget_id=budget_id)
        ):
            raise NotFound(f"Budget {quoted_id(budget_id)} not found", code="budget_not_found")
        alerts = selectors.budget_alert_list(
            budget_id=budget_id,
            skip=skip,
            limit=limit,
            user_id=request.query_params.get("user_id"),
        )
        return Response(BudgetAlertResponse(alerts, many=True).data)


# ---------------------------------------------------------------------------------------
# Users


class UserListApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="users_list",
        tags=["users"],
        parameters=PAGE_PARAMETERS,
        responses={200: UserResponse(many=True), **error_responses(422)},
    )
    def get(self, request: Request) -> Response:
        skip, limit = page_params(request)
        return Response(UserResponse(selectors.user_list(skip=skip, limit=limit), many=True).data)

    @extend_schema(
        operation_id="users_create",
        tags=["users"],
        request=CreateUser,
        description="A budget given here starts the user's first window now. "
        "`rpm_limit` / `tpm_limit` (null = unlimited) apply to all the user's requests.",
        responses={200: UserResponse, **error_responses(404, 409, 422)},
    )
    def post(self, request: Request) -> Response:
        data = validated(CreateUser, request.data)
        user_id = data["user_id"]
        if selectors.user_exists(user_id=user_id, include_deleted=True):
            if selectors.user_exists(user_id=user_id):
                raise Conflict(f"User {quoted_id(user_id)} already exists", code="user_exists")
            raise Conflict(
                f"User {quoted_id(user_id)} was deleted; its id stays with its usage history",
                code="user_deleted",
            )
        accounts.user_create(
            user_id=user_id,
            alias=data.get("alias") or "",
            budget=_referenced_budget(data.get("budget_id")),
            blocked=bool(data.get("blocked")),
            allowed_models=data.get("allowed_models"),
            metadata=data.get("metadata") or {},
            rpm_limit=data.get("rpm_limit"),
            tpm_limit=data.get("tpm_limit"),
        )
        return Response(UserResponse(_user_or_404(user_id)).data)


class UserDetailApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="users_get",
        tags=["users"],
        responses={200: UserResponse, **error_responses(404)},
    )
    def get(self, request: Request, user_id: str) -> Response:
        return Response(UserResponse(_user_or_404(user_id)).data)

    @extend_schema(
        operation_id="users_update",
        tags=["users"],
        request=UpdateUser,
        description="Only the fields sent change. Moving the user to a different budget "
        "(or off one) starts a fresh window: spend 0 from now, the old spend kept in a "
        "reset log. A rate limit set to null is removed; a change applies from the next "
        "request, in every process.",
        responses={200: UserResponse, **error_responses(404, 422)},
    )
    def patch(self, request: Request, user_id: str) -> Response:
        data = validated(UpdateUser, request.data, partial=True)
        _user_or_404(user_id)
        changes: dict[str, Any] = {
            name: data[name]
            for name in ("alias", "blocked", "metadata")
            if data.get(name) is not None
        }
        for name in ("allowed_models", "rpm_limit", "tpm_limit"):
            if name in data:
                changes[name] = data[name]
        if "budget_id" in data:
            changes["budget"] = _referenced_budget(data["budget_id"])
        try:
            accounts.user_update(user_id=user_id, **changes)
        except UnknownUser:
            raise NotFound(f"User {quoted_id(user_id)} not found", code="user_not_found") from None
        return Response(UserResponse(_user_or_404(user_id)).data)

    @extend_schema(
        operation_id="users_delete",
        tags=["users"],
        description="Soft delete: the user's keys stop working, their usage is kept "
        "(GET /usage?user_id=...), and the id is not reused.",
        responses={204: None, **error_responses(404)},
    )
    def delete(self, request: Request, user_id: str) -> Response:
        _user_or_404(user_id)
        accounts.user_delete(user_id=user_id)
        return Response(status=204)


class UserTopupApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="users_topup",
        tags=["users"],
        request=UserTopup,
        description="Raise the user's limit by `amount` USD until `expires_at` (replaces "
        "any previous top-up; amount 0 removes it). Admission adds it to the budget's "
        "max_budget while it lasts.",
        responses={200: UserResponse, **error_responses(404, 422)},
    )
    def post(self, request: Request, user_id: str) -> Response:
        data = validated(UserTopup, request.data)
        _user_or_404(user_id)
        amount, expires_at = data["amount"], data.get("expires_at")
        if amount:
            topup_expiry_check(expires_at)
        try:
            accounts.user_topup_set(user_id=user_id, amount_usd=amount, expires_at=expires_at)
        except UnknownUser:
            raise NotFound(f"User {quoted_id(user_id)} not found", code="user_not_found") from None
        return Response(UserResponse(_user_or_404(user_id)).data)


def topup_expiry_check(expires_at: datetime | None) -> None:
    if expires_at is None:
        raise Unprocessable("expires_at: Required with a positive amount.")
    if expires_at <= timezone.now():
        raise Unprocessable("expires_at: Must be in the future.")


# ---------------------------------------------------------------------------------------
# API keys


def _key_unsupported_check(data: dict[str, Any]) -> None:
    if data.get("capture_agent_telemetry"):
        raise Unprocessable("capture_agent_telemetry: Not supported by this gateway.")
    if data.get("reject_user_mismatch") is False:
        raise Unprocessable(
            "reject_user_mismatch: This gateway always refuses a key naming another user."
        )


class KeyListApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="keys_list",
        tags=["keys"],
        parameters=[
            *PAGE_PARAMETERS,
            OpenApiParameter("user_id", str, description="Only this user's keys."),
            OpenApiParameter(
                "workspace_id",
                {"type": "string", "format": "uuid"},
                description="Only keys in this workspace.",
            ),
        ],
        description="Newest first. Never returns secrets; revoked keys are listed with "
        "is_active false.",
        responses={200: KeyInfo(many=True), **error_responses(422)},
    )
    def get(self, request: Request) -> Response:
        skip, limit = page_params(request)
        workspace_id = request.query_params.get("workspace_id")
        if workspace_id is not None:
            try:
                workspace_id = tenancy.workspace_id_parse(workspace_id)
            except UnknownWorkspace:
                # No key can be in a workspace that cannot exist.
                return Response([])
        keys = selectors.api_key_list(
            skip=skip,
            limit=limit,
            user_id=request.query_params.get("user_id"),
            workspace_id=workspace_id,
        )
        return Response(KeyInfo(keys, many=True).data)

    @extend_schema(
        operation_id="keys_create",
        tags=["keys"],
        request=CreateKey,
        description="Returns the secret (`key`) this once. Without user_id, the key gets "
        "a user of its own, `apikey-<hex>`, aliased after the key's name. The key's "
        "`rpm_limit` / `tpm_limit` apply on top of its user's. `workspace_id` names an "
        "existing workspace (404 otherwise); omitted, the default workspace.",
        responses={200: CreateKeyResponse, **error_responses(404, 422)},
    )
    def post(self, request: Request) -> Response:
        data = validated(CreateKey, request.data)
        _key_unsupported_check(data)
        workspace = None
        if data.get("workspace_id") is not None:
            try:
                workspace = tenancy.workspace_get(workspace_id=data["workspace_id"])
            except UnknownWorkspace:
                raise UnknownWorkspace(
                    "The workspace named by workspace_id was not found"
                ) from None
        settings = {
            "workspace": workspace,
            "key_name": data.get("key_name") or "",
            "expires_at": data.get("expires_at"),
            "allowed_models": data.get("allowed_models"),
            "exclude_from_budget": bool(data.get("exclude_from_budget")),
            "metadata": data.get("metadata") or {},
            "rpm_limit": data.get("rpm_limit"),
            "tpm_limit": data.get("tpm_limit"),
        }
        if data.get("user_id") is None:
            key, secret = keys.api_key_create_with_user(**settings)
        else:
            user = selectors.user_get(user_id=data["user_id"])
            if user is None:
                raise NotFound("The user named by user_id was not found", code="user_not_found")
            key, secret = keys.api_key_create(user=user, **settings)
        key.secret = secret  # type: ignore[attr-defined]
        return Response(CreateKeyResponse(key).data)


class KeyDetailApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="keys_get",
        tags=["keys"],
        responses={200: KeyInfo, **error_responses(404)},
    )
    def get(self, request: Request, key_id: str) -> Response:
        return Response(KeyInfo(_key_or_404(key_id)).data)

    @extend_schema(
        operation_id="keys_update",
        tags=["keys"],
        request=UpdateKey,
        description="Only the fields sent change; the secret never does (see rotate). "
        "A rate limit set to null is removed. The workspace is fixed: a different "
        "workspace_id is a 422.",
        responses={200: KeyInfo, **error_responses(404, 422)},
    )
    def patch(self, request: Request, key_id: str) -> Response:
        data = validated(UpdateKey, request.data, partial=True)
        _key_unsupported_check(data)
        if data.get("workspace_id") is not None:
            _key_workspace_fixed_check(_key_or_404(key_id), data["workspace_id"])
        changes: dict[str, Any] = {
            name: data[name]
            for name in ("key_name", "is_active", "exclude_from_budget", "metadata")
            if data.get(name) is not None
        }
        for name in ("expires_at", "allowed_models", "rpm_limit", "tpm_limit"):
            if name in data:
                changes[name] = data[name]
        try:
            key = keys.api_key_update(key_id=_key_id(key_id), **changes)
        except APIKey.DoesNotExist:
            raise NotFound(f"API key {quoted_id(key_id)} not found", code="key_not_found") from None
        return Response(KeyInfo(key).data)

    @extend_schema(
        operation_id="keys_delete",
        tags=["keys"],
        description="Revokes the key: it stops working on the next request, in every "
        "process. The row stays (is_active false) so usage keeps naming it.",
        responses={204: None, **error_responses(404)},
    )
    def delete(self, request: Request, key_id: str) -> Response:
        try:
            keys.api_key_revoke(key_id=_key_id(key_id))
        except APIKey.DoesNotExist:
            raise NotFound(f"API key {quoted_id(key_id)} not found", code="key_not_found") from None
        return Response(status=204)


def _key_workspace_fixed_check(key: APIKey, workspace_id: str) -> None:
    """A key's workspace is read off the key on every request, so it never changes:
    sending its current one back (a whole KeyInfo round-tripped) is fine, another is
    refused rather than ignored."""
    current = key.workspace_id or DEFAULT_WORKSPACE_ID
    try:
        same = tenancy.workspace_id_parse(workspace_id) == current
    except UnknownWorkspace:
        same = False
    if not same:
        raise Unprocessable(
            "workspace_id: A key's workspace is fixed when it is issued; "
            "issue a new key in the other workspace."
        )


class KeyRotateApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="keys_rotate",
        tags=["keys"],
        request=None,
        description="Same id, new secret (returned this once); the old secret stops "
        "working at once.",
        responses={200: CreateKeyResponse, **error_responses(404)},
    )
    def post(self, request: Request, key_id: str) -> Response:
        key = _key_or_404(key_id)
        secret = keys.api_key_rotate(key=key)
        key.secret = secret  # type: ignore[attr-defined]
        return Response(CreateKeyResponse(key).data)


class UserUsageApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="users_usage",
        tags=["users"],
        parameters=PAGE_PARAMETERS,
        description="The user's usage rows, newest first (also for a deleted user: usage is kept).",
        responses={200: UsageEntry(many=True), **error_responses(404, 422)},
    )
    def get(self, request: Request, user_id: str) -> Response:
        skip, limit = page_params(request)
        if not selectors.user_exists(user_id=user_id, include_deleted=True):
            raise NotFound(f"User {quoted_id(user_id)} not found", code="user_not_found")
        rows = usage_selectors.usage_list(
            filters=usage_selectors.UsageFilters(user_ids=[user_id]), skip=skip, limit=limit
        )
        return Response(UsageEntry(rows, many=True).data)
