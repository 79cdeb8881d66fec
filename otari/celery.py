"""The Celery app, and `enqueue_on_commit`, the one way the project enqueues work.

With CELERY_BROKER_URL set, tasks go to the broker and run on workers; beat runs the
periodic jobs (`CELERY_BEAT_SCHEDULE` in settings). Without a broker (the embedded
default), `enqueue_on_commit` runs the task in a background thread of this process after
the transaction commits: never on the request path, and with the same task code. The
periodic jobs then run through the management commands, lazily at admission (expired
periods roll when a request arrives), and through `embedded_beat_tick`, which the
gateway calls on each request and which starts each job at most once per interval.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from celery import Celery

if TYPE_CHECKING:
    from celery import Task

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "otari.settings")

logger = logging.getLogger(__name__)

app = Celery("otari")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

_background: ThreadPoolExecutor | None = None


def _run_in_background(task: Task, args: tuple, kwargs: dict) -> None:
    global _background
    if _background is None:
        _background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="otari-tasks")

    def run() -> None:
        from django.db import close_old_connections

        try:
            task.apply(args=args, kwargs=kwargs, throw=True)
        except Exception:
            logger.exception("background task %s failed", task.name)
        finally:
            close_old_connections()

    _background.submit(run)


def enqueue(task: Task, *args: Any, countdown: float | None = None, **kwargs: Any) -> None:
    """Send a task to the broker, or run it in the background when there is none;
    `countdown`: not before that many seconds from now."""
    from django.conf import settings

    if settings.CELERY_BROKER_URL:
        task.apply_async(args=args, kwargs=kwargs, countdown=countdown)
    elif countdown:
        timer = threading.Timer(countdown, _run_in_background, args=(task, args, kwargs))
        timer.daemon = True
        timer.start()
    else:
        _run_in_background(task, args, kwargs)


def enqueue_on_commit(task: Task, *args: Any, **kwargs: Any) -> None:
    """Enqueue once the current transaction commits (immediately outside one)."""
    from django.db import transaction

    transaction.on_commit(lambda: enqueue(task, *args, **kwargs))


# --- the relay of detached publishes: one rule for work whose record is committed -----------

_publisher: ThreadPoolExecutor | None = None
_publisher_lock = threading.Lock()
# While the broker is down, the publishes waiting are kept (in order) and tried again this
# often; the first that goes through empties the rest.
_BROKER_PROBE_S = 1.0
# Past this many waiting publishes the oldest are dropped: each has its durable record, and
# the periodic re-drive of its kind finds it (docs/PLATFORM.md, docs/OPERATIONS.md).
_HELD_MAX = 10_000


class _Outage:
    """The publisher thread's view of the broker. Touched only on that thread (the
    executor has one worker), so it needs no lock."""

    def __init__(self) -> None:
        self.since: float | None = None  # monotonic time of the failed publish
        self.held: deque[tuple[Task, tuple, dict]] = deque()
        self.dropped = 0
        self.sent = 0


_outage = _Outage()


def _publisher_submit(fn: Any, *args: Any) -> None:
    global _publisher
    if _publisher is None:
        with _publisher_lock:
            if _publisher is None:
                _publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otari-publish")
    _publisher.submit(fn, *args)


def _hold(item: tuple[Task, tuple, dict]) -> None:
    if len(_outage.held) >= _HELD_MAX:
        _outage.held.popleft()
        _outage.dropped += 1
    _outage.held.append(item)


def _probe_later() -> None:
    timer = threading.Timer(_BROKER_PROBE_S, _publisher_submit, args=(_flush_held,))
    timer.daemon = True
    timer.start()


def _publish(item: tuple[Task, tuple, dict]) -> None:
    if _outage.since is None:
        task, args, kwargs = item
        try:
            enqueue(task, *args, **kwargs)
            return
        except Exception as exc:
            _outage.since = time.monotonic()
            # One line for the outage, whatever it holds up. The exception's name only:
            # its text can carry the broker URL's password.
            logger.warning(
                "broker unreachable (%s): tasks are kept and sent as soon as it is back",
                type(exc).__name__,
            )
            _probe_later()
    _hold(item)


def _flush_held() -> None:
    """Send what waits, oldest first; the first failure means the broker is still down."""
    while _outage.held:
        task, args, kwargs = _outage.held[0]
        try:
            enqueue(task, *args, **kwargs)
        except Exception:
            _probe_later()
            return
        _outage.held.popleft()
        _outage.sent += 1
    if _outage.since is None:
        return
    logger.warning(
        "broker reachable again after %.0f s: sent %d waiting task(s)%s",
        time.monotonic() - _outage.since,
        _outage.sent,
        f", {_outage.dropped} left to the periodic re-drive" if _outage.dropped else "",
    )
    _outage.since = None
    _outage.sent = _outage.dropped = 0


def enqueue_detached(task: Task, *args: Any, **kwargs: Any) -> None:
    """Enqueue from a background thread: never raises, never waits for the broker.

    For work whose durable record the caller has already committed (an outbox row: a
    platform usage report, a budget alert). Publishing to a broker that is down blocks on
    kombu's connection retries, and that must never slow or fail the request that produced
    the work. One thread keeps the publishes in order. When a publish fails, the broker is
    down: that is logged once, what follows is kept without trying, and the broker is
    probed every _BROKER_PROBE_S; the first probe that goes through sends everything kept,
    so the work goes out as soon as the broker is back rather than at the next re-drive.
    What a process cannot keep (it died, or more than _HELD_MAX waited) is found again by
    the periodic re-drive of its kind, from its durable record.
    """
    _publisher_submit(_publish, (task, args, kwargs))


def enqueue_detached_on_commit(task: Task, *args: Any, **kwargs: Any) -> None:
    """`enqueue_detached` once the current transaction commits (at once outside one)."""
    from django.db import transaction

    transaction.on_commit(lambda: enqueue_detached(task, *args, **kwargs))


# --- the embedded beat: periodic jobs without a broker ---------------------------------------

# monotonic time at which the next job is due; read on every request, so kept as a float.
_beat_next_due = 0.0
_beat_due_by_job: dict[str, float] = {}
_beat_lock = threading.Lock()


def _interval_s(schedule: Any, default: float) -> float:
    if isinstance(schedule, int | float):
        return float(schedule)
    if isinstance(schedule, timedelta):
        return schedule.total_seconds()
    # A crontab: approximate by the default interval (the jobs are idempotent sweeps).
    return default


def embedded_beat_tick() -> None:
    """With no broker, start the beat schedule's jobs in the background, each at most once
    per its interval in this process.

    Called by every gateway request, so the common case is one clock read and one
    comparison. Several gateway processes each run the jobs; they are idempotent and
    safe to run concurrently (budgets.services).
    """
    global _beat_next_due
    now = time.monotonic()
    if now < _beat_next_due:
        return
    from django.conf import settings

    with _beat_lock:
        if now < _beat_next_due:
            return
        interval = settings.OTARI_BEAT_INTERVAL_SECONDS
        if settings.CELERY_BROKER_URL or not settings.OTARI_EMBEDDED_BEAT:
            # celery beat runs the jobs (or they were switched off): look again later.
            _beat_next_due = now + interval
            return
        due = []
        for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
            if _beat_due_by_job.get(name, 0.0) <= now:
                _beat_due_by_job[name] = now + _interval_s(entry["schedule"], interval)
                due.append(entry["task"])
        _beat_next_due = min(_beat_due_by_job.values(), default=now + interval)
    for task_name in due:
        _run_in_background(app.tasks[task_name], (), {})


def embedded_beat_reset() -> None:
    """Forget when the jobs last ran (tests; a process that changed its settings)."""
    global _beat_next_due
    with _beat_lock:
        _beat_next_due = 0.0
        _beat_due_by_job.clear()
