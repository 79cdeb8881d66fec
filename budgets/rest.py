"""Who may call the management API: the master key (docs/SPEC.md §1, §6).

The master key is this app's (budgets.services.keys keeps its hash), so authenticating
with it lives here rather than in common/rest.py, which imports no app. Settings make it
every DRF view's default (REST_FRAMEWORK): a management view is master-key only unless it
says otherwise (common.health's public views do), and no app has to import this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from budgets.exceptions import MissingAPIKey
from budgets.services import keys

if TYPE_CHECKING:
    from django.http import HttpRequest

# ---------------------------------------------------------------------------------------
# Authentication: the master key, in any of the headers docs/SPEC.md §1 accepts


def credential_from_headers(request: HttpRequest) -> str:
    """The presented secret: `Otari-Key` (optionally `Bearer ...`), then
    `Authorization: Bearer ...`, then `x-api-key` (what the Anthropic SDK sends). The
    generation endpoints (llm_proxy.auth) read credentials the same way."""
    headers = request.headers
    otari_key = headers.get("Otari-Key", "").strip()
    if otari_key:
        return otari_key[7:].strip() if otari_key[:7].lower() == "bearer " else otari_key
    authorization = headers.get("Authorization", "").strip()
    if authorization[:7].lower() == "bearer " and authorization[7:].strip():
        return authorization[7:].strip()
    api_key = headers.get("x-api-key", "").strip()
    if api_key:
        return api_key
    raise MissingAPIKey


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
        if keys.master_key_matches(secret):
            return ("master", None)
        if secret.startswith(keys.API_KEY_PREFIX):
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
