"""OpenAPI description of the generation endpoints (docs/SPEC.md §2), written by hand.

The views are plain async Django views (no DRF), so nothing can introspect them; this
module is their documentation, merged into /openapi.json by otari/openapi.py for each
route the URLconf serves. Request and response bodies are the providers' own wire
formats: the schemas name the fields the gateway itself reads and allow everything else.
"""

from __future__ import annotations

from typing import Any

_API_KEY_SECURITY = [{"ApiKey": []}]

_OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIError"}
_ANTHROPIC_ERROR = {"$ref": "#/components/schemas/AnthropicError"}

_GATEWAY_HEADERS = {
    "X-Otari-Request-Id": {
        "description": "The request's usage-row id (GET /v1/usage).",
        "schema": {"type": "string", "format": "uuid"},
    },
    "X-Otari-Cost-Usd": {
        "description": "What the request cost (non-streaming responses).",
        "schema": {"type": "string"},
    },
    "X-Otari-Budget-Remaining-Usd": {
        "description": "What is left of the caller's budget, when it has a cap.",
        "schema": {"type": "string"},
    },
    "X-Otari-Budget-Reset-At": {
        "description": "When the caller's budget period ends.",
        "schema": {"type": "string", "format": "date-time"},
    },
}

_ERROR_TEXT = {
    "400": "Invalid request, unknown provider, or the provider refused the request",
    "401": "Missing, unknown, inactive or expired key",
    "402": "The model has no price: neither the operator's nor the catalog's "
    "(OTARI_REQUIRE_PRICING, OTARI_PRICE_CATALOG)",
    "403": "User blocked, model not allowed, or budget exceeded (code budget_exceeded)",
    "404": "Unknown user (master key) or model",
    "413": "The body is over OTARI_MAX_REQUEST_BYTES (answered before it is read)",
    "429": "The provider is rate limiting (Retry-After kept)",
    "502": "The provider failed or rejected the gateway's credentials",
    "504": "The provider timed out",
}


def _errors(shape: dict[str, Any], statuses: tuple[str, ...]) -> dict[str, Any]:
    return {
        status: {
            "description": _ERROR_TEXT[status],
            "content": {"application/json": {"schema": shape}},
        }
        for status in statuses
    }


def _generation(
    *,
    operation_id: str,
    summary: str,
    description: str,
    request: str,
    error: dict[str, Any],
    streams: bool,
    statuses: tuple[str, ...] = ("400", "401", "402", "403", "404", "413", "429", "502", "504"),
) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        content["text/event-stream"] = {
            "schema": {"type": "string", "description": "Server-sent events (stream: true)."}
        }
    return {
        "post": {
            "operationId": operation_id,
            "summary": summary,
            "description": description,
            "tags": ["generation"],
            "security": _API_KEY_SECURITY,
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}
                },
            },
            "responses": {
                "200": {
                    "description": "The provider's response body, passed through.",
                    "headers": _GATEWAY_HEADERS,
                    "content": content,
                },
                **_errors(error, statuses),
            },
        }
    }


_MODEL = {
    "type": "string",
    "description": "provider:model or provider/model, provider being a configured instance.",
    "example": "openai:gpt-4o-mini",
}

GENERATION_PATHS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": _generation(
        operation_id="chat_completions",
        summary="Chat completion (OpenAI format)",
        description="Held against the caller's budget before the provider is called, "
        "settled on the provider's reported usage. With the master key, `user` names who "
        "is billed.",
        request="ChatCompletionRequest",
        error=_OPENAI_ERROR,
        streams=True,
    ),
    "/v1/messages": _generation(
        operation_id="messages",
        summary="Message (Anthropic format)",
        description="With the master key, `metadata.user_id` names who is billed.",
        request="MessagesRequest",
        error=_ANTHROPIC_ERROR,
        streams=True,
    ),
    "/v1/messages/count_tokens": _generation(
        operation_id="messages_count_tokens",
        summary="Count tokens (local estimate)",
        description="No provider call, no charge.",
        request="MessagesRequest",
        error=_ANTHROPIC_ERROR,
        streams=False,
        statuses=("400", "401", "403", "404"),
    ),
    "/v1/responses": _generation(
        operation_id="responses",
        summary="Response (OpenAI Responses format)",
        description="Held and settled like chat completions.",
        request="ResponsesRequest",
        error=_OPENAI_ERROR,
        streams=True,
    ),
    "/v1/embeddings": _generation(
        operation_id="embeddings",
        summary="Embeddings (OpenAI format)",
        description="Priced on input tokens.",
        request="EmbeddingsRequest",
        error=_OPENAI_ERROR,
        streams=False,
    ),
    "/v1/models": {
        "get": {
            "operationId": "models_list",
            "summary": "Models the caller may use, with their current prices",
            "tags": ["generation"],
            "security": [{"ApiKey": []}, {"MasterKey": []}],
            "responses": {
                "200": {
                    "description": "OpenAI's list shape, plus `pricing` per model.",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}
                    },
                },
                **_errors(_OPENAI_ERROR, ("401",)),
            },
        }
    },
}

_MESSAGES = {"type": "array", "items": {"type": "object"}}

GENERATION_COMPONENTS: dict[str, Any] = {
    "securitySchemes": {
        "ApiKey": {
            "type": "http",
            "scheme": "bearer",
            "description": "A `gw-` API key (or the master key with a named user). Also "
            "accepted as `Otari-Key: <key>` or `x-api-key: <key>`.",
        }
    },
    "schemas": {
        "OpenAIError": {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "code": {"type": "string", "nullable": True},
                        "param": {"type": "string", "nullable": True},
                    },
                    "required": ["message", "type"],
                }
            },
            "required": ["error"],
        },
        "AnthropicError": {
            "type": "object",
            "properties": {
                "type": {"type": "string", "enum": ["error"]},
                "error": {
                    "type": "object",
                    "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                    "required": ["type", "message"],
                },
            },
            "required": ["type", "error"],
        },
        "ChatCompletionRequest": {
            "type": "object",
            "additionalProperties": True,
            "properties": {
                "model": _MODEL,
                "messages": _MESSAGES,
                "stream": {"type": "boolean"},
                "max_tokens": {"type": "integer"},
                "max_completion_tokens": {"type": "integer"},
                "user": {"type": "string", "description": "Billed user (master key only)."},
            },
            "required": ["model", "messages"],
        },
        "MessagesRequest": {
            "type": "object",
            "additionalProperties": True,
            "properties": {
                "model": _MODEL,
                "messages": _MESSAGES,
                "system": {},
                "max_tokens": {"type": "integer"},
                "stream": {"type": "boolean"},
                "metadata": {
                    "type": "object",
                    "properties": {"user_id": {"type": "string"}},
                },
            },
            "required": ["model", "messages"],
        },
        "ResponsesRequest": {
            "type": "object",
            "additionalProperties": True,
            "properties": {
                "model": _MODEL,
                "input": {},
                "max_output_tokens": {"type": "integer"},
                "stream": {"type": "boolean"},
                "user": {"type": "string"},
            },
            "required": ["model", "input"],
        },
        "EmbeddingsRequest": {
            "type": "object",
            "additionalProperties": True,
            "properties": {"model": _MODEL, "input": {}, "user": {"type": "string"}},
            "required": ["model", "input"],
        },
        "ModelList": {
            "type": "object",
            "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string"},
                            "object": {"type": "string"},
                            "created": {"type": "integer"},
                            "owned_by": {"type": "string"},
                            "pricing": {"type": "object"},
                        },
                    },
                },
            },
        },
    },
}
