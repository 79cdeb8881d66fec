"""URL configuration. Every `/v1/...` route is also served, identically, under `/api/v1/...`
(the path the otari SDK and otari-cli call, CONTRACT §6)."""

from django.contrib import admin
from django.urls import include, path

v1 = [
    path("", include("llm_proxy.urls")),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("v1/", include(v1)),
    path("api/v1/", include(v1)),
]
