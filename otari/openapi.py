"""drf-spectacular hooks: one schema for the whole API (docs/SPEC.md §6, §2).

- `/api/v1/...` duplicates `/v1/...` route for route, so the schema lists `/v1/` only
  (the alias is stated in the description); likewise `/health*` for `/v1/health*`.
- The generation endpoints are plain async Django views, invisible to drf-spectacular:
  their documentation is written by hand in llm_proxy/openapi.py and merged here, for
  each route the URLconf actually serves.
- Every management operation may answer 401/403 (master key) and, with a body, 400
  (malformed JSON): those responses are added in one place instead of on every view.

Wiring, like urls.py: it joins the apps' schemas into the project's one document, so it
stays in the project package (settings.SPECTACULAR_SETTINGS names these hooks).
"""

from __future__ import annotations

from typing import Any

from django.urls import Resolver404, resolve

from llm_proxy.openapi import GENERATION_COMPONENTS, GENERATION_PATHS

_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
_COMMON_ERRORS = {
    "401": "Missing or invalid master key",
    "403": "A credential that is not the master key",
}


def endpoints_dedupe(endpoints: list[tuple], **kwargs: Any) -> list[tuple]:
    """`/v1/...` once: not its `/api/v1/` twin, nor `/v1/health*` (same as `/health*`)."""
    return [
        endpoint for endpoint in endpoints if not endpoint[0].startswith(("/api/v1/", "/v1/health"))
    ]


def _served(path: str) -> bool:
    try:
        resolve(path)
    except Resolver404:
        return False
    return True


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}


def schema_complete(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict:
    components = result.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.setdefault("Error", _ERROR_SCHEMA)
    for path_item in result.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict) or not operation.get("security"):
                continue
            responses = operation.setdefault("responses", {})
            for status, description in _COMMON_ERRORS.items():
                responses.setdefault(status, _error_response(description))
            if "requestBody" in operation:
                responses.setdefault("400", _error_response("Malformed JSON body"))
                responses.setdefault("415", _error_response("Body is not application/json"))
    for path, item in GENERATION_PATHS.items():
        if _served(path):
            result["paths"][path] = item
    schemas.update(GENERATION_COMPONENTS["schemas"])
    components.setdefault("securitySchemes", {}).update(GENERATION_COMPONENTS["securitySchemes"])
    result.setdefault("tags", [])
    return result
