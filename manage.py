#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "otari.settings")
    from django.core.management import execute_from_command_line

    from common.audit import command_actor_set

    # Money settings changed by a command are recorded as the command's (common/history.py).
    command_actor_set(sys.argv)
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
