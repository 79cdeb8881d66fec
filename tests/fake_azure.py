"""A fake Azure OpenAI resource on loopback, checking requests the way Azure does.

It serves the same answers as tests/fake_provider.py (same token accounting, same fault
injection by model name) behind Azure's front door:

  POST /openai/deployments/{deployment}/chat/completions?api-version=V   (and /embeddings)
  POST /openai/responses?api-version=V            deployment in the body's `model`
  POST /openai/v1/chat/completions                the v1 API: deployment in `model`, and
  POST /openai/v1/responses, /openai/v1/embeddings   no api-version (or `preview`)

- Auth: an `api-key` header equal to `api_key`, or `Authorization: Bearer <ad_token>`;
  anything else is Azure's 401.
- A dated api-version outside `API_VERSIONS` (or none) is Azure's 404 "Resource not
  found"; the Responses API needs one of `RESPONSES_API_VERSIONS`.
- A deployment runs the model `deployments[name]`, or the model of its own name (so fault
  names such as `fail-midstream` work as deployments); a name starting with `missing`
  is Azure's 404 DeploymentNotFound. Answers name the deployment's model, as Azure's do.
- Errors have Azure's shape, `{"error": {"code": "429", "message": ...}}`; a 429 carries
  `retry-after` and `retry-after-ms`.
- Chat answers carry Azure's content-filter annotations, and a chat stream opens with
  Azure's `prompt_filter_results` chunk, whose `choices` is empty.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs

from tests.fake_provider import FakeProvider, RecordedRequest, _Behaviour, _Reply, _sse

API_VERSIONS = frozenset({"2024-10-21", "2025-04-01-preview"})
RESPONSES_API_VERSIONS = frozenset({"2025-04-01-preview"})
V1_API_VERSIONS = frozenset({"", "preview", "latest"})
RETRY_AFTER_S = "7"
API_KEY = "azure-test-api-key"
AD_TOKEN = "azure-test-entra-token"

_DEPLOYMENT_ROUTE = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|embeddings)$")
_V1_ROUTE = re.compile(r"^/openai/v1/(chat/completions|responses|embeddings)$")
_APIS = {"chat/completions": "chat", "responses": "responses", "embeddings": "embeddings"}
_FILTERS = {
    name: {"filtered": False, "severity": "safe"}
    for name in ("hate", "self_harm", "sexual", "violence")
}


def azure_error(status: int, code: str, message: str) -> _Reply:
    headers = {}
    if status == 429:
        headers = {"retry-after": RETRY_AFTER_S, "retry-after-ms": f"{RETRY_AFTER_S}000"}
    return _Reply(status, {"error": {"code": code, "message": message}}, headers=headers)


class FakeAzure(FakeProvider):
    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        ad_token: str = AD_TOKEN,
        deployments: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.api_key = api_key
        self.ad_token = ad_token
        self.deployments = deployments or {}

    def _respond(self, request: RecordedRequest) -> _Reply:
        with self._lock:
            self._requests.append(request)
            self._hits_by_path[request.path] = self._hits_by_path.get(request.path, 0) + 1
        query = {name: values[-1] for name, values in parse_qs(request.query).items()}
        version = query.get("api-version", "")
        route = self._route(request.path, version, request.body)
        if isinstance(route, _Reply):
            return route
        api, deployment = route
        if not self._authorized(request.headers):
            return azure_error(
                401,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. Make "
                "sure to provide a valid key for an active subscription and use a correct "
                "regional API endpoint for your resource.",
            )
        if request.method != "POST" or not isinstance(request.body, dict):
            return azure_error(400, "BadRequest", "The request body must be a JSON object")
        if deployment.startswith("missing"):
            return azure_error(
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the "
                "deployment within the last 5 minutes, please wait a moment and try again.",
            )
        model = self.deployments.get(deployment, deployment)
        behaviour = _Behaviour.from_model(model)
        reply = self._generate(api, {**request.body, "model": model}, model, behaviour)
        reply.delay_before = self.latency_s + behaviour.slow_s
        if reply.status >= 400:
            return self._azure_shaped(reply, api, version)
        if api == "chat":
            self._annotate_chat(reply)
        return reply

    def _route(self, path: str, version: str, body: Any) -> tuple[str, str] | _Reply:
        """(api, deployment), or Azure's answer to a URL it does not serve."""
        not_found = azure_error(404, "404", "Resource not found")
        body_model = body.get("model") if isinstance(body, dict) else None
        if match := _V1_ROUTE.match(path):
            if version not in V1_API_VERSIONS:
                return not_found
            if not isinstance(body_model, str) or not body_model:
                return azure_error(400, "BadRequest", "model is required")
            return _APIS[match.group(1)], body_model
        if path == "/openai/responses":
            if version not in RESPONSES_API_VERSIONS:
                return not_found
            if not isinstance(body_model, str) or not body_model:
                return azure_error(400, "BadRequest", "model is required")
            return "responses", body_model
        if match := _DEPLOYMENT_ROUTE.match(path):
            if version not in API_VERSIONS:
                return not_found
            return _APIS[match.group(2)], match.group(1)
        return not_found

    def _authorized(self, headers: dict[str, str]) -> bool:
        if "api-key" in headers:
            return headers["api-key"] == self.api_key
        return headers.get("authorization", "") == f"Bearer {self.ad_token}"

    @staticmethod
    def _azure_shaped(reply: _Reply, api: str, version: str) -> _Reply:
        message = "The server had an error while processing your request."
        if reply.status == 429:
            message = (
                f"Requests to the ChatCompletions_Create Operation under Azure OpenAI API "
                f"version {version or 'v1'} have exceeded token rate limit of your current "
                f"OpenAI S0 pricing tier. Please retry after {RETRY_AFTER_S} seconds."
            )
        elif reply.status < 500:
            message = f"Azure rejected the request ({reply.status})"
        return azure_error(reply.status, str(reply.status), message)

    @staticmethod
    def _annotate_chat(reply: _Reply) -> None:
        prompt_filter = [{"prompt_index": 0, "content_filter_results": _FILTERS}]
        if reply.events is None:
            if isinstance(reply.body, dict):
                reply.body["prompt_filter_results"] = prompt_filter
                for choice in reply.body.get("choices") or ():
                    choice["content_filter_results"] = _FILTERS
            return
        if reply.events and not reply.events[0].startswith('data: {"error"'):
            opening = _sse(
                {
                    "choices": [],
                    "created": 0,
                    "id": "",
                    "model": "",
                    "object": "",
                    "prompt_filter_results": prompt_filter,
                }
            )
            reply.events = [opening, *reply.events]
            if reply.abort_after:  # keep cutting after the same content chunk
                reply.abort_after += 1
