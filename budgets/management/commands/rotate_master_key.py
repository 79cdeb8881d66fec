"""Replace the generated master key and print the new one, once.

For a master key that `bootstrap` generated (OTARI_MASTER_KEY unset) and that was lost:
only its hash is stored, so it cannot be shown again, only replaced. The old key stops
working at once in this process and within a few seconds in running gateways (no restart).
Refused when OTARI_MASTER_KEY is set: change that variable instead.
"""

from django.core.management.base import BaseCommand, CommandError

from budgets.services.keys import master_key_rotate
from common.exceptions import GatewayError


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args, **options) -> None:
        try:
            master = master_key_rotate()
        except GatewayError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            "New master key (shown once, only its hash is stored; the old key no longer "
            f"works):\n    {master}"
        )
