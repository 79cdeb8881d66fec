"""URL configuration. Every `/v1/...` route is also served, identically, under `/api/v1/...`
(the path the otari SDK and otari-cli call, docs/SPEC.md §6)."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import (
    SpectacularJSONAPIView,
    SpectacularRedocView,
    SpectacularSwaggerView,
)

from common import health
from common.home import home
from llm_proxy import platform
from otari.metrics import metrics_view

health_urls = [
    path("health", health.HealthApi.as_view(details=platform.health_details)),
    path("health/liveness", health.LivenessApi.as_view()),
    path("health/readiness", health.ReadinessApi.as_view()),
]

v1 = [
    path("", include("llm_proxy.urls")),
    path("", include("llm_proxy.api_urls")),
    path("", include("budgets.api_urls")),
    path("", include("usage.api_urls")),
    *health_urls,
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics_view, name="metrics"),
    path("v1/", include(v1)),
    path("api/v1/", include(v1)),
    # otari-cli's `health` calls /health on the gateway's origin.
    *health_urls,
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="openapi-schema"),
    path("docs", SpectacularSwaggerView.as_view(url_name="openapi-schema"), name="docs"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="openapi-schema")),
    path("redoc", SpectacularRedocView.as_view(url_name="openapi-schema"), name="redoc"),
    path("redoc/", SpectacularRedocView.as_view(url_name="openapi-schema")),
    path("", home, name="home"),
]

handler404 = "common.rest.page_not_found"
# An unhandled exception: JSON in the API's shape on API routes, HTML on the console.
handler500 = "llm_proxy.errors.server_error"
