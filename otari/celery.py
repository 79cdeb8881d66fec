"""The Celery app, and `enqueue_on_commit`, the one way the project enqueues work.

With CELERY_BROKER_URL set, tasks go to the broker and run on workers; beat runs the
periodic jobs (`CELERY_BEAT_SCHEDULE` below). Without a broker (the embedded default),
`enqueue_on_commit` runs the task in a background thread of this process after the
transaction commits: never on the request path, and with the same task code. The
periodic jobs then run through the management commands and lazily at admission
(expired periods roll when a request arrives).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
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


def enqueue(task: Task, *args: Any, **kwargs: Any) -> None:
    """Send a task to the broker, or run it in the background when there is none."""
    from django.conf import settings

    if settings.CELERY_BROKER_URL:
        task.apply_async(args=args, kwargs=kwargs)
    else:
        _run_in_background(task, args, kwargs)


def enqueue_on_commit(task: Task, *args: Any, **kwargs: Any) -> None:
    """Enqueue once the current transaction commits (immediately outside one)."""
    from django.db import transaction

    transaction.on_commit(lambda: enqueue(task, *args, **kwargs))
