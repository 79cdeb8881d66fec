"""Create the console's first admin (a Django superuser) from environment variables.

Reads OTARI_ADMIN_USERNAME and OTARI_ADMIN_PASSWORD (both required) and
OTARI_ADMIN_EMAIL (optional). Creates the user when it does not exist; when it does, it
is kept as it is (its password too, unless --reset-password) and made an active
superuser again. Safe to run at every start, from several hosts at once. Exits non-zero
without changing anything when a variable is missing or the password is too weak.
"""

from __future__ import annotations

import os
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import IntegrityError

from common.accounts import admin_user_ensure


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--reset-password",
            action="store_true",
            help="Also set an existing user's password to OTARI_ADMIN_PASSWORD.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        username = os.environ.get("OTARI_ADMIN_USERNAME", "").strip()
        password = os.environ.get("OTARI_ADMIN_PASSWORD", "")
        email = os.environ.get("OTARI_ADMIN_EMAIL", "").strip()
        missing = [
            name
            for name, value in (
                ("OTARI_ADMIN_USERNAME", username),
                ("OTARI_ADMIN_PASSWORD", password),
            )
            if not value
        ]
        if missing:
            raise CommandError(f"Set {' and '.join(missing)} to create the admin user.")
        try:
            result = admin_user_ensure(
                username=username,
                password=password,
                email=email,
                reset_password=options["reset_password"],
            )
        except ValidationError as exc:
            raise CommandError("OTARI_ADMIN_PASSWORD: " + " ".join(exc.messages)) from None
        except IntegrityError:
            # Another host created the same user between our check and insert.
            result = admin_user_ensure(username=username, password=password, email=email)
        if result.created:
            summary = "created"
        elif result.password_set:
            summary = "already existed; password reset"
        else:
            summary = "already existed; password kept"
        self.stdout.write(f"create_admin_user: {result.username} {summary}")
