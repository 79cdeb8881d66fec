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


_publisher: ThreadPoolExecutor | None = None
_publisher_lock = threading.Lock()
# After a failed publish the broker is presumed down for this long: the work waiting
# meanwhile is left to the re-drive instead of each item paying for its own failure.
_PUBLISH_PAUSE_S = 5.0
_publish_paused_until = 0.0


def enqueue_detached(task: Task, *args: Any, **kwargs: Any) -> None:
    """Enqueue from a background thread, and only log a failure.

    For work whose durable record the caller has already committed and which a periodic
    re-drive finds again (platform usage reports): publishing to a broker that is down
    blocks on kombu's connection retries, and that must never slow or fail the request
    that produced the work. One thread keeps the publishes in order and bounds their cost.
    """
    global _publisher
    if _publisher is None:
        with _publisher_lock:
            if _publisher is None:
                _publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otari-publish")

    def publish() -> None:
        global _publish_paused_until
        if time.monotonic() < _publish_paused_until:
            return
        try:
            enqueue(task, *args, **kwargs)
        except Exception as exc:
            _publish_paused_until = time.monotonic() + _PUBLISH_PAUSE_S
            # The exception's name only: its text can carry the broker URL's password.
            logger.warning(
                "could not enqueue %s, broker presumed down for %.0f s (the re-drive will "
                "send what waits): %s",
                task.name,
                _PUBLISH_PAUSE_S,
                type(exc).__name__,
            )

    _publisher.submit(publish)


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
