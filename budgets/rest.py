"""Who may call the management API: the master key (docs/SPEC.md §1, §6).

The master key is this app's (budgets.services keeps its hash and the key prefixes), so
authenticating with it lives here rather than in common/rest.py, which imports no app.
budgets/api.py and usage/api.py build every management view on ManagementMixin.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from budgets import services
from budgets.exceptions import MissingAPIKey
from common.rest import Unprocessable
from common.rest_json import STORABLE_MESSAGE, text_storable
from llm_proxy.auth import credential_from_headers

# The one workspace of a standalone gateway; keys report it because the SDK requires it.
DEFAULT_WORKSPACE_ID = "00000000-0000-4000-8000-000000000000"
# Longest identifier quoted back in a 404 message.
_MAX_QUOTED_ID = 80


# ---------------------------------------------------------------------------------------
# Authentication: the master key, in any of the headers docs/SPEC.md §1 accepts


class MasterKeyAuthentication(BaseAuthentication):
    """`Otari-Key`, `Authorization: Bearer` or `x-api-key` carrying the master key.

    No credential: the permission check answers 401. A `gw-` API key is a valid
    credential for the wrong door: 403. Anything else: 401.
    """

    def authenticate(self, request: Request) -> tuple[str, None] | None:
        try:
            secret = credential_from_headers(request)
        except MissingAPIKey:
            return None
        if services.master_key_matches(secret):
            return ("master", None)
        if secret.startswith(services.API_KEY_PREFIX):
            raise exceptions.PermissionDenied("The management API requires the master key")
        raise exceptions.AuthenticationFailed("Invalid master key")

    def authenticate_header(self, request: Request) -> str:
        # Present, so DRF answers a missing credential with 401 (not 403).
        return 'Bearer realm="otari"'


class IsMaster(BasePermission):
    message = "Missing master key: send Authorization: Bearer <master key>"

    def has_permission(self, request: Request, view: Any) -> bool:
        return request.user == "master"


class MasterKeyScheme(OpenApiAuthenticationExtension):
    target_class = "budgets.rest.MasterKeyAuthentication"
    name = "MasterKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "The master key (OTARI_MASTER_KEY). Also accepted as "
            "`Otari-Key: <key>` or `x-api-key: <key>`.",
        }


class ManagementMixin:
    # Master-key auth for every management view, and a check that the ids in the path
    # and the query string can be stored and compared (no NUL, no lone surrogate).
    # (A comment, not a docstring: the schema generator would show a docstring as
    # each operation's description.)

    authentication_classes = [MasterKeyAuthentication]
    permission_classes = [IsMaster]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        values = [value for value in kwargs.values() if isinstance(value, str)]
        values.extend(value for _, items in request.query_params.lists() for value in items)
        if not all(text_storable(value) for value in values):
            raise Unprocessable(STORABLE_MESSAGE)


def quoted_id(value: str) -> str:
    """An identifier from the URL path, fit to quote in an error message: shortened, and
    withheld when it looks like a secret (someone pasting a key into the wrong place)."""
    if value.startswith((services.API_KEY_PREFIX, services.MASTER_KEY_PREFIX)):
        return "(withheld)"
    if len(value) > _MAX_QUOTED_ID:
        value = value[:_MAX_QUOTED_ID] + "…"
    return repr(value)
