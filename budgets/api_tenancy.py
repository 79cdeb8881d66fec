"""Management API for workspaces and scoped budgets (ceilings), master key only (issue 14,
docs/API.md "Workspaces" and "Scoped budgets"). otari's routes and shapes.

Thin views, as in budgets/api.py: validate (budgets.serializers), call a service in
budgets.services.tenancy / .ceilings (which own the transactions and raise the 404s and
409s) or a selector, render.

Decisions where otari differs or is silent (docs/API.md has the full list):
- Deleting a workspace is refused (409) while a key, a usage row or a ceiling refers to
  it, and the default workspace is never deleted; otari deletes the ceilings with it.
- Moving a ceiling to another budget starts a fresh window (spend 0, the old spend in a
  reset log), as moving a user does; otari keeps the spend.
- Money is exact JSON numbers, as everywhere in this API; otari narrows to floats.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from budgets import selectors
from budgets.api import topup_expiry_check
from budgets.exceptions import UnknownCeiling
from budgets.models import Ceiling
from budgets.serializers import (
    SCOPE_TYPES,
    CeilingResponse,
    CreateCeiling,
    CreateWorkspace,
    MessageResponse,
    UpdateCeiling,
    UpdateWorkspace,
    UserTopup,
    WorkspaceResponse,
    WorkspacesResponse,
)
from budgets.services import ceilings, tenancy
from budgets.services.accounts import UNSET
from common.rest import (
    PAGE_PARAMETERS,
    ManagementMixin,
    Unprocessable,
    error_responses,
    page_params,
    validated,
)

# ---------------------------------------------------------------------------------------
# Workspaces


class WorkspaceListApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="workspaces_list",
        tags=["workspaces"],
        parameters=PAGE_PARAMETERS,
        description="The organization's workspaces, oldest first (the default one "
        "included), with the total count.",
        responses={200: WorkspacesResponse, **error_responses(422)},
    )
    def get(self, request: Request) -> Response:
        skip, limit = page_params(request)
        # The default workspace always lists, also on a database flushed since migrating.
        tenancy.default_workspace_ensure()
        workspaces, count = selectors.workspace_list(skip=skip, limit=limit)
        return Response({"data": WorkspaceResponse(workspaces, many=True).data, "count": count})

    @extend_schema(
        operation_id="workspaces_create",
        tags=["workspaces"],
        request=CreateWorkspace,
        description="A workspace in the deployment's organization. Names are unique (409).",
        responses={201: WorkspaceResponse, **error_responses(409, 422)},
    )
    def post(self, request: Request) -> Response:
        data = validated(CreateWorkspace, request.data)
        workspace = tenancy.workspace_create(
            name=data["name"], description=data.get("description") or ""
        )
        return Response(WorkspaceResponse(workspace).data, status=201)


class WorkspaceDetailApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="workspaces_get",
        tags=["workspaces"],
        responses={200: WorkspaceResponse, **error_responses(404)},
    )
    def get(self, request: Request, workspace_id: str) -> Response:
        return Response(WorkspaceResponse(tenancy.workspace_get(workspace_id=workspace_id)).data)

    @extend_schema(
        operation_id="workspaces_update",
        tags=["workspaces"],
        request=UpdateWorkspace,
        description="Only the fields sent change. A name another workspace has: 409.",
        responses={200: WorkspaceResponse, **error_responses(404, 409, 422)},
    )
    def patch(self, request: Request, workspace_id: str) -> Response:
        data = validated(UpdateWorkspace, request.data, partial=True)
        changes: dict[str, Any] = {}
        if data.get("name") is not None:
            changes["name"] = data["name"]
        if "description" in data:
            changes["description"] = data["description"] or ""
        workspace = tenancy.workspace_update(workspace_id=workspace_id, **changes)
        return Response(WorkspaceResponse(workspace).data)

    @extend_schema(
        operation_id="workspaces_delete",
        tags=["workspaces"],
        description="Refused (409, saying what refers to it) while API keys (revoked ones "
        "too), usage rows or scoped budgets refer to the workspace; the default "
        "workspace is never deleted.",
        responses={200: MessageResponse, **error_responses(404, 409)},
    )
    def delete(self, request: Request, workspace_id: str) -> Response:
        tenancy.workspace_delete(workspace_id=workspace_id)
        return Response({"message": "Workspace deleted"})


# ---------------------------------------------------------------------------------------
# Scoped budgets (ceilings)


def _scope_filter(request: Request) -> tuple[str | None, str | None]:
    """`scope_type` (one of the scope types, else 422) and `scope_id` (canonical UUID
    text when it is one, as stored; anything else simply matches nothing)."""
    scope_type = request.query_params.get("scope_type")
    if scope_type is not None and scope_type not in SCOPE_TYPES:
        raise Unprocessable("scope_type: Must be one of: " + ", ".join(SCOPE_TYPES) + ".")
    scope_id = request.query_params.get("scope_id")
    if scope_id is not None:
        with contextlib.suppress(ValueError):
            scope_id = str(uuid.UUID(scope_id))
    return scope_type, scope_id


class CeilingListApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="scoped_budgets_list",
        tags=["scoped-budgets"],
        parameters=[
            OpenApiParameter("scope_type", {"type": "string", "enum": SCOPE_TYPES}),
            OpenApiParameter("scope_id", str, description="Only this scope's ceilings."),
            *PAGE_PARAMETERS,
        ],
        description="Ceilings, oldest first.",
        responses={200: CeilingResponse(many=True), **error_responses(422)},
    )
    def get(self, request: Request) -> Response:
        skip, limit = page_params(request)
        scope_type, scope_id = _scope_filter(request)
        rows = selectors.ceiling_list(
            skip=skip, limit=limit, scope_type=scope_type, scope_id=scope_id
        )
        return Response(CeilingResponse(rows, many=True).data)

    @extend_schema(
        operation_id="scoped_budgets_create",
        tags=["scoped-budgets"],
        request=CreateCeiling,
        description="A ceiling on the organization, a workspace or an API key, optionally "
        "at one provider instance, on the limit and period of `budget_id`. Its first "
        "window starts now. Unknown scope, budget or provider: 404; a ceiling on the "
        "same scope and provider already: 409.",
        responses={200: CeilingResponse, **error_responses(404, 409, 422)},
    )
    def post(self, request: Request) -> Response:
        data = validated(CreateCeiling, request.data)
        ceiling = ceilings.ceiling_create(
            scope_type=data["scope_type"],
            scope_id=data["scope_id"],
            budget_id=data["budget_id"],
            name=data.get("name") or "",
            provider=data.get("provider_key_id") or "",
        )
        return Response(CeilingResponse(ceiling).data)


def _ceiling_or_404(ceiling_id: str) -> Ceiling:
    ceiling = selectors.ceiling_get(ceiling_id=ceilings.ceiling_id_parse(ceiling_id))
    if ceiling is None:
        raise UnknownCeiling.named(ceiling_id)
    return ceiling


class CeilingDetailApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="scoped_budgets_get",
        tags=["scoped-budgets"],
        responses={200: CeilingResponse, **error_responses(404)},
    )
    def get(self, request: Request, ceiling_id: str) -> Response:
        return Response(CeilingResponse(_ceiling_or_404(ceiling_id)).data)

    @extend_schema(
        operation_id="scoped_budgets_update",
        tags=["scoped-budgets"],
        request=UpdateCeiling,
        description="Only the fields sent change; `name` null clears it. Another "
        "`budget_id` starts a fresh window now: spend 0, the old spend kept in a reset "
        "log (open holds stay reserved). Scope and provider are fixed.",
        responses={200: CeilingResponse, **error_responses(404, 422)},
    )
    def patch(self, request: Request, ceiling_id: str) -> Response:
        data = validated(UpdateCeiling, request.data, partial=True)
        ceiling = ceilings.ceiling_update(
            ceiling_id=ceiling_id,
            name=(data["name"] or "") if "name" in data else UNSET,
            budget_id=data["budget_id"] if data.get("budget_id") is not None else UNSET,
        )
        return Response(CeilingResponse(ceiling).data)

    @extend_schema(
        operation_id="scoped_budgets_delete",
        tags=["scoped-budgets"],
        description="Requests holding money on it settle into nothing there; its reset "
        "logs are kept.",
        responses={204: None, **error_responses(404)},
    )
    def delete(self, request: Request, ceiling_id: str) -> Response:
        ceilings.ceiling_delete(ceiling_id=ceiling_id)
        return Response(status=204)


class CeilingTopupApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="scoped_budgets_topup",
        tags=["scoped-budgets"],
        request=UserTopup,
        description="Raise the ceiling's limit by `amount` USD until `expires_at` "
        "(replaces any previous top-up; amount 0 removes it), as POST "
        "/v1/users/{id}/topup does for a user.",
        responses={200: CeilingResponse, **error_responses(404, 422)},
    )
    def post(self, request: Request, ceiling_id: str) -> Response:
        data = validated(UserTopup, request.data)
        amount, expires_at = data["amount"], data.get("expires_at")
        _ceiling_or_404(ceiling_id)
        if amount:
            topup_expiry_check(expires_at)
        ceiling = ceilings.ceiling_topup(
            ceiling_id=ceiling_id, amount_usd=amount, expires_at=expires_at
        )
        return Response(CeilingResponse(ceiling).data)
