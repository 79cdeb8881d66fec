"""Expire every open hold whose `expires_at` has passed (docs/SPEC.md §3.4, §3.5 invariant 4).

Such a hold belongs to a request whose process died before closing it: its amount is
released from the user's `reserved` and the hold is marked expired. If the request does
finish after all, its cost is still charged. A hold that is settled, refunded or expired
concurrently is left to whoever got there first. Safe to run twice or from several hosts.
"""

from __future__ import annotations

from argparse import ArgumentParser
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand
from django.db.models import Sum
from django.utils import timezone

from budgets.selectors import holds_stale
from budgets.services.holds import holds_expire_stale


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="count the stale holds, change nothing"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        now = timezone.now()
        if options["dry_run"]:
            stale = holds_stale(now=now)
            total = stale.aggregate(total=Sum("amount_usd"))["total"] or Decimal(0)
            self.stdout.write(
                f"release_stale_holds (dry run): {stale.count()} stale hold(s) "
                f"holding ${total.normalize():f}"
            )
            return
        expired = holds_expire_stale(now=now)
        self.stdout.write(f"release_stale_holds: expired {expired} stale hold(s)")
