"""Re-drive dead-lettered platform usage reports (docs/SPEC.md §7, docs/PLATFORM.md).

A report is dead when the platform refused it for good (a status of the non-retryable set,
such as 402 when the user's wallet was overdrawn, or another 4xx) or kept failing for all
of its tries. This gives every dead report, or those whose last answer had `--status`, a
fresh round of tries: it becomes pending again and its delivery task is enqueued. Reports
that are pending or delivered are never touched, and the platform deduplicates by
correlation id, so running this twice, or on two hosts, sends nothing twice.
"""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand

from usage.selectors import usage_reports_dead
from usage.services import usage_reports_redrive_dead


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--status",
            type=int,
            metavar="CODE",
            help="only the reports whose last answer had this HTTP status (e.g. 402)",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="count the reports, change nothing"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        status = options["status"]
        if options["dry_run"]:
            count = usage_reports_dead(status_code=status).count()
            self.stdout.write(
                f"redrive_usage_reports (dry run): {count} dead report(s) would be re-driven"
            )
            return
        count = usage_reports_redrive_dead(status_code=status)
        self.stdout.write(f"redrive_usage_reports: re-drove {count} dead report(s)")
