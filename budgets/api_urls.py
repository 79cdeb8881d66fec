"""Management routes of the budgets app, included under /v1/ and /api/v1/ (otari/urls.py)."""

from django.urls import path

from budgets import api, api_tenancy

urlpatterns = [
    path("budgets", api.BudgetListApi.as_view()),
    path("budgets/<str:budget_id>", api.BudgetDetailApi.as_view()),
    path("budgets/<str:budget_id>/reset-logs", api.BudgetResetLogListApi.as_view()),
    path("budgets/<str:budget_id>/alerts", api.BudgetAlertListApi.as_view()),
    path("users", api.UserListApi.as_view()),
    path("users/<str:user_id>", api.UserDetailApi.as_view()),
    path("users/<str:user_id>/topup", api.UserTopupApi.as_view()),
    path("users/<str:user_id>/usage", api.UserUsageApi.as_view()),
    path("keys", api.KeyListApi.as_view()),
    path("keys/<str:key_id>", api.KeyDetailApi.as_view()),
    path("keys/<str:key_id>/rotate", api.KeyRotateApi.as_view()),
    path("workspaces", api_tenancy.WorkspaceListApi.as_view()),
    path("workspaces/<str:workspace_id>", api_tenancy.WorkspaceDetailApi.as_view()),
    path("scoped-budgets", api_tenancy.CeilingListApi.as_view()),
    path("scoped-budgets/<str:ceiling_id>", api_tenancy.CeilingDetailApi.as_view()),
    path("scoped-budgets/<str:ceiling_id>/topup", api_tenancy.CeilingTopupApi.as_view()),
]
