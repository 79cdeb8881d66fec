"""Check the books (docs/SPEC.md §3.5) and print every user out of balance.

For each user: `reserved` must equal the sum of their open holds, and `spend` the sum of
the cost of their usage rows that count toward the budget and were settled since
`budget_started_at` (all of them for a user who never had a window). Also counts open
holds past `expires_at` plus one sweep interval. With --fix: expires those holds, then
sets each drifted user's `reserved` and `spend` to what the ledger says, under the
user's row lock, and logs every change. Exit status 2 when drift is found and not fixed.
"""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from budgets.services.audit import budgets_audit


def _usd(amount) -> str:
    return f"${amount.normalize():f}"


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--fix", action="store_true", help="repair what is found, through the services"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        result = budgets_audit(fix=options["fix"])
        for drift in result.drifts:
            parts = []
            if not drift.reserved_ok:
                parts.append(
                    f"reserved {_usd(drift.reserved_usd)} != open holds "
                    f"{_usd(drift.open_holds_usd)}"
                )
            if not drift.spend_ok:
                parts.append(
                    f"spend {_usd(drift.spend_usd)} != window usage {_usd(drift.window_usage_usd)}"
                )
            self.stdout.write(f"{drift}: " + "; ".join(parts))
        for repair in result.repairs:
            self.stdout.write(
                f"fixed {repair.kind} {repair.account_id}: "
                f"reserved {_usd(repair.reserved_before_usd)} -> "
                f"{_usd(repair.reserved_after_usd)}, spend {_usd(repair.spend_before_usd)} -> "
                f"{_usd(repair.spend_after_usd)}"
            )
        summary = (
            f"audit_budgets: {result.count('user')} user(s) and {result.count('ceiling')} "
            "ceiling(s) out of balance, "
            f"{result.stale_holds} overdue hold(s)"
        )
        if options["fix"]:
            summary += (
                f"; fixed {len(result.repairs)} account(s), "
                f"expired {result.stale_holds_expired} hold(s)"
            )
        self.stdout.write(summary)
        if not result.clean and not options["fix"]:
            raise CommandError("the books do not balance (run with --fix to repair)", returncode=2)
