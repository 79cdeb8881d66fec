"""Give a user a temporary top-up: AMOUNT USD added to their limit until --until.

The top-up replaces any previous one, and stops counting at --until (admission then
checks the budget's own max again). --clear removes it. It raises the limit of a user
whose budget has a max; an uncapped user has nothing to raise.
"""

from __future__ import annotations

from argparse import ArgumentParser
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from budgets.exceptions import UnknownUser
from budgets.management.commands._args import iso_datetime, usd_amount
from budgets.services.accounts import user_topup_set


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("user_id", metavar="USER_ID")
        parser.add_argument("amount", metavar="AMOUNT", nargs="?", type=usd_amount)
        parser.add_argument(
            "--until", type=iso_datetime, metavar="ISO", help="when it ends (naive = UTC)"
        )
        parser.add_argument("--clear", action="store_true", help="remove the user's top-up")

    def handle(self, *args: Any, **options: Any) -> None:
        user_id, amount, until = options["user_id"], options["amount"], options["until"]
        if options["clear"]:
            if amount is not None or until is not None:
                raise CommandError("--clear takes no AMOUNT or --until")
            amount, until = Decimal(0), None
        else:
            if amount is None or until is None:
                raise CommandError("give AMOUNT and --until ISO (or --clear)")
            if until <= timezone.now():
                raise CommandError("--until must be in the future")
            if not amount:
                raise CommandError("AMOUNT must be positive (use --clear to remove a top-up)")
        try:
            user = user_topup_set(user_id=user_id, amount_usd=amount, expires_at=until)
        except UnknownUser:
            raise CommandError(f"no user with id {user_id!r}") from None
        if not user.topup_expires_at:
            self.stdout.write(f"topup_user: {user_id} has no top-up")
            return
        note = "" if user.budget and user.budget.max_budget_usd is not None else " (uncapped)"
        self.stdout.write(
            f"topup_user: {user_id} limit +${user.topup_usd.normalize():f} until "
            f"{user.topup_expires_at.isoformat()}{note}"
        )
