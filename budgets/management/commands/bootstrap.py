"""Prepare a gateway to serve: first-start credentials and the configured prices.

Generates the master key (when OTARI_MASTER_KEY is unset and none was generated before)
and a `bootstrap` API key for user `default` (when no API key exists), printing each
secret once; then makes the YAML file's prices current. Safe to run at every start.
"""

from django.core.management.base import BaseCommand

from budgets.services.keys import credentials_bootstrap
from usage.services import pricing_sync_from_config


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args, **options) -> None:
        result = credentials_bootstrap()
        if result.master_key:
            self.stdout.write(
                "Generated the master key (shown once, only its hash is stored):\n"
                f"    {result.master_key}"
            )
        if result.api_key:
            self.stdout.write(
                "Created API key 'bootstrap' for user 'default' (shown once):\n"
                f"    {result.api_key}"
            )
        prices = pricing_sync_from_config()
        self.stdout.write(
            f"bootstrap: master key {'generated' if result.master_key else 'present'}, "
            f"bootstrap key {'created' if result.api_key else 'not needed'}, "
            f"{len(prices)} price(s) updated from config"
        )
