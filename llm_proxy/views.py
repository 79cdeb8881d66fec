"""Generation endpoints: async views, thin (llm_proxy.pipeline does the work)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from llm_proxy import local_endpoints
from llm_proxy.formats import CHAT, EMBEDDINGS, MESSAGES, RESPONSES, ApiFormat
from llm_proxy.pipeline.request import handle


def _generation(fmt: ApiFormat) -> Callable[[HttpRequest], Awaitable[HttpResponse]]:
    """The view of a generation endpoint of API `fmt`."""

    @csrf_exempt
    @require_POST
    async def view(request: HttpRequest) -> HttpResponse:
        return await handle(request, fmt)

    return view


chat_completions = _generation(CHAT)
messages = _generation(MESSAGES)
responses = _generation(RESPONSES)
embeddings = _generation(EMBEDDINGS)


@csrf_exempt
@require_POST
async def messages_count_tokens(request: HttpRequest) -> HttpResponse:
    return await local_endpoints.count_tokens(request)


async def models(request: HttpRequest) -> HttpResponse:
    return await local_endpoints.list_models(request)
