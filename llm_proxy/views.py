"""Generation endpoints: async views, thin (llm_proxy.gateway does the work)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from llm_proxy import gateway
from llm_proxy.formats import CHAT, EMBEDDINGS, MESSAGES, RESPONSES


@csrf_exempt
@require_POST
async def chat_completions(request: HttpRequest) -> HttpResponse:
    return await gateway.handle(request, CHAT)


@csrf_exempt
@require_POST
async def messages(request: HttpRequest) -> HttpResponse:
    return await gateway.handle(request, MESSAGES)


@csrf_exempt
@require_POST
async def messages_count_tokens(request: HttpRequest) -> HttpResponse:
    return await gateway.count_tokens(request)


@csrf_exempt
@require_POST
async def responses(request: HttpRequest) -> HttpResponse:
    return await gateway.handle(request, RESPONSES)


@csrf_exempt
@require_POST
async def embeddings(request: HttpRequest) -> HttpResponse:
    return await gateway.handle(request, EMBEDDINGS)


async def models(request: HttpRequest) -> HttpResponse:
    return await gateway.list_models(request)
