"""The money core: every write of budgets, users, keys, holds and periods (docs/SPEC.md §1,
§3). One module per concern:

- holds: admission, settlement, refund, record and expiry, the statements that move money;
- periods: rolling and resetting budget windows;
- accounts: budgets and users;
- keys: API keys and the master key;
- alerts: budget alerts and their delivery;
- audit: the books against their ledger, and the repair.

The rules these statements apply are written once, in budgets/rules.py.

Invariants kept here, and checked by `manage.py audit_budgets` and the tests:

1. `reserved` is the sum of the user's open holds.
2. `spend` is the sum of the costs of the user's counted usage rows settled since
   `budget_started_at`.
3. No admission makes `spend + reserved` exceed the limit, however many requests race,
   in however many processes.
4. Every hold is closed exactly once: open -> settled | refunded | expired, by
   compare-and-swap on its status; a second close is a no-op. (A request that finishes
   after the sweeper expired its hold still has its cost charged: expired -> settled.)

How: every change of `spend`/`reserved` happens in one conditional statement
(holds.py), run alone or in a transaction that holds the user's row lock, and always in
the same lock order, hold before user. Nothing is read, compared in Python and written
back unlocked.
"""
