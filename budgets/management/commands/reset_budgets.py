"""Roll every budget period that has ended (docs/SPEC.md §3.6).

Acts on users whose `next_budget_reset_at` is at or before now (or --now): sets their
spend to 0, moves their window to the one containing now (on the original schedule, so
a late run never drifts it), and writes one reset-log row per user. Never touches a user
whose window is still running (a budget created or assigned a moment ago), a budget with
no period, or `reserved` (open holds settle into the new period). Safe to run twice, or
from several hosts at once: a window can begin only once.
"""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from budgets.management.commands._args import iso_datetime
from budgets.models import Budget, GatewayUser
from budgets.services.periods import budgets_roll_due


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--user", metavar="ID", help="only this user")
        parser.add_argument("--budget", metavar="ID", help="only the users of this budget")
        parser.add_argument(
            "--dry-run", action="store_true", help="list what is due, change nothing"
        )
        parser.add_argument(
            "--now",
            type=iso_datetime,
            metavar="ISO",
            help="roll as of this instant instead of the clock (naive = UTC); "
            "a future instant only with --dry-run",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        user_id, budget_id = options["user"], options["budget"]
        future = options["now"] is not None and options["now"] > timezone.now()
        if future and not options["dry_run"]:
            # Rolling into the future would start windows that have not begun, and
            # requests settled until then would be stamped into them.
            raise CommandError("--now in the future is only allowed with --dry-run")
        if user_id is not None and not GatewayUser.objects.filter(pk=user_id).exists():
            raise CommandError(f"no user with id {user_id!r}")
        if budget_id is not None and not Budget.objects.filter(pk=budget_id).exists():
            raise CommandError(f"no budget with id {budget_id!r}")
        summary = budgets_roll_due(
            now=options["now"], user_id=user_id, budget_id=budget_id, dry_run=options["dry_run"]
        )
        if options["verbosity"] >= 2:
            for log in summary.rolled:
                self.stdout.write(
                    f"  {log.user_id}: closed ${log.previous_spend_usd.normalize():f}, "
                    f"window {log.reset_at.isoformat()} -> "
                    f"{log.next_reset_at.isoformat() if log.next_reset_at else 'never'}"
                )
            if summary.dry_run:
                for uid in summary.due_user_ids:
                    self.stdout.write(f"  {uid}: due")
        when = summary.now.isoformat()
        if summary.dry_run:
            self.stdout.write(
                f"reset_budgets (dry run): {len(summary.due_user_ids)} user(s) due, and "
                f"{len(summary.due_ceiling_ids)} ceiling(s), as of {when}"
            )
            return
        self.stdout.write(
            f"reset_budgets: rolled {len(summary.rolled)} user(s) "
            f"(closing ${summary.previous_spend_usd.normalize():f} of spend), "
            f"{summary.busy} busy, {summary.rolled_elsewhere} rolled elsewhere, "
            f"{summary.cleared} without a period; "
            f"rolled {len(summary.rolled_ceilings)} ceiling(s); as of {when}"
        )
