"""`GET /`: where a person who opens the gateway in a browser can go next.

A browser gets a small HTML page; a client that prefers JSON (`Accept: application/json`)
gets the same links as JSON.

It links to routes, it imports nothing from them, so it sits with the shared code
rather than in one app; otari/urls.py serves it.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_safe

LINKS = (
    {
        "name": "console",
        "href": "/admin/",
        "title": "Budget console",
        "what": "users, keys, budgets, spend (staff login)",
    },
    {
        "name": "docs",
        "href": "/docs",
        "title": "API docs",
        "what": "the interactive OpenAPI documentation (Swagger UI)",
    },
    {
        "name": "redoc",
        "href": "/redoc",
        "title": "API reference",
        "what": "the same, as a ReDoc page",
    },
    {
        "name": "openapi",
        "href": "/openapi.json",
        "title": "OpenAPI document",
        "what": "for code generators",
    },
    {
        "name": "health",
        "href": "/health",
        "title": "Health",
        "what": "whether the gateway is up (also /health/readiness)",
    },
)


@require_safe
def home(request: HttpRequest) -> HttpResponse:
    if request.get_preferred_type(["text/html", "application/json"]) == "application/json":
        return JsonResponse({link["name"]: link["href"] for link in LINKS})
    return render(
        request, "otari/home.html", {"links": LINKS, "api_base": request.build_absolute_uri("/v1")}
    )
