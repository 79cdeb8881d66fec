"""Generation endpoints: async views, thin (llm_proxy.gateway does the work)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from llm_proxy import gateway
from llm_proxy.formats import CHAT


@csrf_exempt
@require_POST
async def chat_completions(request: HttpRequest) -> HttpResponse:
    return await gateway.handle(request, CHAT)


async def models(request: HttpRequest) -> HttpResponse:
    return await gateway.list_models(request)
