"""Management routes of the usage app, included under /v1/ and /api/v1/ (otari/urls.py)."""

from django.urls import path, re_path

from usage import api

urlpatterns = [
    path("pricing", api.PricingListApi.as_view()),
    # Model keys hold ':' and may hold '/' (any character, so [\s\S], not '.'): the
    # history route must come first.
    re_path(r"^pricing/(?P<model_key>[\s\S]+)/history$", api.PricingHistoryApi.as_view()),
    re_path(r"^pricing/(?P<model_key>[\s\S]+)$", api.PricingDetailApi.as_view()),
    path("usage", api.UsageListApi.as_view()),
    path("usage/count", api.UsageCountApi.as_view()),
    path("usage/summary", api.UsageSummaryApi.as_view()),
    path("usage/summary.csv", api.UsageSummaryCsvApi.as_view()),
]
