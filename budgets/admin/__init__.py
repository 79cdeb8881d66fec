"""The budget console (docs/SPEC.md §8, docs/ADMIN.md): one module per page family.

Every change of money-related state goes through budgets.services, the same functions
the API and the commands call: the forms validate, then save_model/delete_model and the
actions call a service. Spend, reserved and lifetime spend are never editable; holds,
reset logs and budget alerts are history, read-only for everyone. Secrets are shown once
and never stored. (Django's admin autodiscovery imports this package; importing the
modules registers their pages.)
"""

from budgets.admin import (  # noqa: F401
    alerts,
    budgets,
    ceilings,
    keys,
    ledgers,
    pricing,
    users,
    workspaces,
)
