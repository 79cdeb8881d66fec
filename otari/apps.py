"""The admin app, configured with Otari's admin site (the budget console)."""

from django.contrib.admin.apps import AdminConfig


class OtariAdminConfig(AdminConfig):
    # A dotted path, imported when the admin autodiscovers: importing the site here
    # would load models before the app registry is ready.
    default_site = "budgets.admin_site.OtariAdminSite"
