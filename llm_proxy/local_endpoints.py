"""Endpoints the gateway answers itself: no provider call, no hold, no usage row.

`GET /v1/models` lists the priced models a caller may use; `POST
/v1/messages/count_tokens` estimates a prompt's tokens locally. Both authenticate like
a generation request (llm_proxy.auth) but bill nobody.
"""

from __future__ import annotations

import json
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from budgets.exceptions import ModelNotAllowed, UserBlocked
from budgets.rest import credential_from_headers
from common.exceptions import GatewayError
from llm_proxy.auth import authenticate_listing, model_allowed
from llm_proxy.errors import error_response
from llm_proxy.formats import MESSAGES
from llm_proxy.pipeline.admission import model_selector, parse_body
from llm_proxy.providers import resolve_model
from usage.selectors import prices_current


async def list_models(request: HttpRequest) -> HttpResponse:
    """`GET /v1/models`: the priced models this caller may use, with their prices."""
    try:
        now = timezone.now()
        caller = await authenticate_listing(credential=credential_from_headers(request), now=now)
    except GatewayError as exc:
        return error_response(exc, "openai")
    allowed = caller.allowed_models if caller is not None else None
    data = [
        {
            "id": price.model_key,
            "object": "model",
            "created": int(price.effective_at.timestamp()),
            "owned_by": price.model_key.split(":", 1)[0],
            "pricing": {
                "input_price_per_million": float(price.input_price_per_mtok_usd),
                "output_price_per_million": float(price.output_price_per_mtok_usd),
            },
        }
        for price in await sync_to_async(prices_current)(now)
        if model_allowed(allowed, price.model_key)
    ]
    return _json({"object": "list", "data": data})


async def count_tokens(request: HttpRequest) -> HttpResponse:
    """`POST /v1/messages/count_tokens`: a local estimate (MessagesFormat.count_tokens).

    No provider call, no hold, no charge, and no usage row: nothing was generated or
    billed, and counting is not a request the usage log should count. The caller must
    still hold a valid key that may use the model.
    """
    try:
        now = timezone.now()
        caller = await authenticate_listing(credential=credential_from_headers(request), now=now)
        body = parse_body(request)
        provider, model = resolve_model(model_selector(body))
        MESSAGES.validate_prompt(body)
        if caller is not None:
            if caller.blocked:
                raise UserBlocked
            if not model_allowed(caller.allowed_models, f"{provider.name}:{model}"):
                raise ModelNotAllowed
    except GatewayError as exc:
        return error_response(exc, MESSAGES.error_style)
    return _json({"input_tokens": MESSAGES.count_tokens(body)})


def _json(payload: dict[str, Any]) -> HttpResponse:
    content = json.dumps(payload).encode()
    response = HttpResponse(content, content_type="application/json")
    response["Content-Length"] = str(len(content))
    return response
