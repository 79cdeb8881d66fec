"""Date formats for the console: ISO-style and explicit about UTC, everywhere.

Django's English defaults ("Nov. 25, 2026, 2:22 p.m.") are ambiguous next to the
UTC timestamps of budgets and usage rows.
"""

DATETIME_FORMAT = "Y-m-d H:i T"
SHORT_DATETIME_FORMAT = "Y-m-d H:i T"
DATE_FORMAT = "Y-m-d"
SHORT_DATE_FORMAT = "Y-m-d"
TIME_FORMAT = "H:i"
