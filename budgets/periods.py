"""Budget period arithmetic (docs/SPEC.md §3.6): pure functions on aware UTC datetimes.

Rolling periods step by a fixed number of seconds from the window's start; calendar
periods end on the next UTC day, week (Monday) or month boundary. Catching up after
several missed periods always lands on a boundary of the original schedule, so a
schedule never drifts however late the roll runs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

CALENDAR_DAY = "calendar_day"
CALENDAR_WEEK = "calendar_week"
CALENDAR_MONTH = "calendar_month"


def _floor_to_boundary(moment: datetime, alignment: str) -> datetime:
    day = moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if alignment == CALENDAR_DAY:
        return day
    if alignment == CALENDAR_WEEK:
        return day - timedelta(days=day.weekday())
    if alignment == CALENDAR_MONTH:
        return day.replace(day=1)
    raise ValueError(f"unknown reset alignment {alignment!r}")


def _next_boundary(boundary: datetime, alignment: str) -> datetime:
    if alignment == CALENDAR_DAY:
        return boundary + timedelta(days=1)
    if alignment == CALENDAR_WEEK:
        return boundary + timedelta(days=7)
    if alignment == CALENDAR_MONTH:
        if boundary.month == 12:
            return boundary.replace(year=boundary.year + 1, month=1)
        return boundary.replace(month=boundary.month + 1)
    raise ValueError(f"unknown reset alignment {alignment!r}")


def has_period(*, duration_sec: int | None, alignment: str | None) -> bool:
    return bool(duration_sec) or bool(alignment)


def fresh_window(
    now: datetime, *, duration_sec: int | None, alignment: str | None
) -> tuple[datetime, datetime | None]:
    """The window a budget starts when it is created or assigned: (start, next reset).

    Rolling windows run a full duration from now; calendar windows end at the next
    boundary (a monthly budget assigned on the 20th resets on the 1st). No period: None.
    """
    if duration_sec:
        return now, now + timedelta(seconds=duration_sec)
    if alignment:
        return now, _next_boundary(_floor_to_boundary(now, alignment), alignment)
    return now, None


def window_after(
    due_at: datetime, now: datetime, *, duration_sec: int | None, alignment: str | None
) -> tuple[datetime, datetime]:
    """The window that contains `now`, given that the previous one ended at `due_at`.

    Precondition: due_at <= now and the budget has a period.
    """
    if duration_sec:
        step = timedelta(seconds=duration_sec)
        missed = (now - due_at) // step
        start = due_at + missed * step
        return start, start + step
    if alignment:
        boundary = _floor_to_boundary(now, alignment)
        # A window never starts before the previous one ended: were `due_at` ever off the
        # calendar grid (hand-edited data), flooring `now` could reach back past it and
        # count the same usage in two windows.
        return max(boundary, due_at), _next_boundary(boundary, alignment)
    raise ValueError("a budget without a period has no next window")
