"""Management routes of routing (aliases and policies), included under /v1/ and
/api/v1/ (otari/urls.py). `explain` comes before the `{name}` route, so that a
policy's name cannot shadow it; a policy named "explain" is still deleted by DELETE on
that path (api.PolicyExplainApi.delete)."""

from django.urls import path

from llm_proxy import api

urlpatterns = [
    path("aliases", api.AliasListApi.as_view()),
    path("aliases/<str:name>", api.AliasDetailApi.as_view()),
    path("routing/policies", api.PolicyListApi.as_view()),
    path("routing/policies/explain", api.PolicyExplainApi.as_view()),
    path("routing/policies/<str:name>", api.PolicyDetailApi.as_view()),
]
