"""Management API for aliases and routing policies, master key only (issue 15,
docs/ROUTING.md, docs/API.md "Routing"). otari's routes and shapes: `/v1/aliases`,
`/v1/routing/policies` and `/v1/routing/policies/explain`.

Thin views: check the JSON types (422), call llm_proxy.routing.store (which validates
the name, target or spec through routing's rules and owns the write) or a selector,
render. Routing's refusals become the API's error shape here, as otari answers them:
a name, target or spec that cannot work → 400 with the reason; an unknown user, policy
or `rename_from`, or a configured one asked to be deleted → 404 saying so; a rename onto
a taken name → 409.

Configured (OTARI_CONFIG) aliases and policies are listed with `source: "config"` and
are read-only here: the file is not this process's to change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from common.exceptions import BadRequest, Conflict, NotFound
from common.rest import PAGE_PARAMETERS, ManagementMixin, error_responses, page_params, validated
from llm_proxy import selectors
from llm_proxy.routing import store
from llm_proxy.routing.explain import explain
from llm_proxy.routing.spec import SpecError
from llm_proxy.serializers import (
    AliasRequest,
    AliasResponse,
    ExplainRequest,
    ExplainResponse,
    PolicyRequest,
    PolicyResponse,
)


@contextmanager
def routing_errors() -> Iterator[None]:
    """Routing's refusals in the API's error shape, with otari's status codes."""
    try:
        yield
    except SpecError as exc:
        raise BadRequest(exc.message) from exc
    except store.NotFound as exc:
        raise NotFound(exc.message) from exc
    except store.Conflict as exc:
        raise Conflict(exc.message) from exc


SCOPE_PARAMETER = OpenApiParameter(
    "user_id",
    str,
    description="The scope: the stored one of this user. Omit for the global one.",
)


def _page(request: Request, rows: list[Any]) -> list[Any]:
    skip, limit = page_params(request)
    return rows[skip : skip + limit]


# ---------------------------------------------------------------------------------------
# Aliases


class AliasListApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="aliases_list",
        tags=["routing"],
        parameters=PAGE_PARAMETERS,
        description="Every alias in force, configured (`source: config`) and stored, "
        "every scope at once, by name then user.",
        responses={200: AliasResponse(many=True), **error_responses(422)},
    )
    def get(self, request: Request) -> Response:
        rows = _page(request, selectors.alias_list())
        return Response(AliasResponse(rows, many=True).data)

    @extend_schema(
        operation_id="aliases_set",
        tags=["routing"],
        request=AliasRequest,
        description="Create or re-point the stored alias `name` in its scope (global, or "
        "`user_id`'s alone). A name or target that cannot work, a global name the "
        "configuration already has, or a policy's name → 400 saying why; an unknown "
        "`user_id` → 404.",
        responses={200: AliasResponse, **error_responses(404, 409, 422)},
    )
    def post(self, request: Request) -> Response:
        data = validated(AliasRequest, request.data)
        with routing_errors():
            alias = store.alias_create(
                name=data["name"], target=data["target"], user_id=data.get("user_id")
            )
        return Response(AliasResponse(_alias_row(alias)).data)


def _alias_row(alias: Any) -> dict[str, Any]:
    return {
        "name": alias.name,
        "target": alias.target,
        "source": "stored",
        "user_id": alias.user_id or None,
        "created_at": alias.created_at,
        "updated_at": alias.updated_at,
    }


class AliasDetailApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="aliases_delete",
        tags=["routing"],
        parameters=[SCOPE_PARAMETER],
        description="Delete the stored alias in one scope (the other scopes' stay). A "
        "configured alias is not deleted here: 404 saying so.",
        responses={204: None, **error_responses(404, 422)},
    )
    def delete(self, request: Request, name: str) -> Response:
        with routing_errors():
            store.alias_delete(name=name, user_id=request.query_params.get("user_id"))
        return Response(status=204)


# ---------------------------------------------------------------------------------------
# Routing policies


class PolicyListApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="routing_policies_list",
        tags=["routing"],
        parameters=PAGE_PARAMETERS,
        description="Every routing policy in force, configured (`source: config`) and "
        "stored, every scope at once, by name then user.",
        responses={200: PolicyResponse(many=True), **error_responses(422)},
    )
    def get(self, request: Request) -> Response:
        rows = _page(request, selectors.policy_list())
        return Response(PolicyResponse(rows, many=True).data)

    @extend_schema(
        operation_id="routing_policies_set",
        tags=["routing"],
        request=PolicyRequest,
        description="Create or replace the stored policy `name` in its scope; with "
        "`rename_from`, the stored policy of that name becomes `name` with this spec in "
        "one write. A spec that cannot work → 400 with the reason (an unknown provider, "
        "an entry after `default`, a threshold of 100% or more, an empty candidate list, "
        "a typo in a condition...); an unknown user or `rename_from` → 404; a rename "
        "onto a name this scope already has → 409.",
        responses={200: PolicyResponse, **error_responses(404, 409, 422)},
    )
    def post(self, request: Request) -> Response:
        data = validated(PolicyRequest, request.data)
        with routing_errors():
            row = store.policy_save(
                name=data["name"],
                spec=data["spec"],
                user_id=data.get("user_id"),
                rename_from=data.get("rename_from"),
            )
        entry = selectors.policy_entry(row.name, user_id=row.user_id, source="stored")
        return Response(PolicyResponse(entry).data)


class PolicyDetailApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="routing_policies_delete",
        tags=["routing"],
        parameters=[SCOPE_PARAMETER],
        description="Delete the stored policy in one scope (the other scopes' stay). A "
        "configured policy is not deleted here: 404 saying so.",
        responses={204: None, **error_responses(404, 422)},
    )
    def delete(self, request: Request, name: str) -> Response:
        with routing_errors():
            store.policy_delete(name=name, user_id=request.query_params.get("user_id"))
        return Response(status=204)


class PolicyExplainApi(ManagementMixin, APIView):
    @extend_schema(
        operation_id="routing_policies_explain",
        tags=["routing"],
        request=ExplainRequest,
        description="What a policy (`name`, as `user_id` resolves it) or an unsaved "
        "`spec` would do for the caller described, dispatching nothing: the targets in "
        "the order they are tried, why the first was selected, each target left out "
        "with why (not allowed, cooling down after failures), and a weighted router's "
        "shares. Neither `name` nor `spec`, or a spec that cannot work → 400; an unknown "
        "name → 404.",
        responses={200: ExplainResponse, **error_responses(404, 422)},
    )
    def post(self, request: Request) -> Response:
        data = validated(ExplainRequest, request.data)
        with routing_errors():
            plan = explain(
                name=data.get("name"),
                spec=data.get("spec"),
                user_id=data.get("user_id"),
                key_id=data.get("key_id"),
                budget_used_pct=data.get("budget_used_pct"),
                budget_remaining_usd=data.get("budget_remaining_usd"),
                allowed_models=data.get("allowed_models"),
            )
        return Response(ExplainResponse(plan).data)

    # Django matches the path before the method, so DELETE .../explain lands here: it is
    # the delete of a policy named "explain" (a valid name), as otari's router answers.
    @extend_schema(exclude=True)
    def delete(self, request: Request) -> Response:
        return PolicyDetailApi().delete(request, "explain")
