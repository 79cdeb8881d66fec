"""Closings the database could not take, kept on disk until it can (docs/RELIABILITY.md).

A request that ends while the database is down (a stream that was delivered, an answer
already read) cannot be settled then. Its closing (settle, refund or record, with the
usage record and the moment it ended) is written to a file under
`$OTARI_VAR_DIR/spool/`, and retried once a second by this process until the database
takes it: nothing delivered goes unbilled, and the closing stays exactly-once, because
the statements it replays close a hold by compare-and-swap (a hold the sweeper expired
meanwhile is still charged: expired -> settled). Files a process left behind (it was
stopped during the outage) are retried by the next process on the host to start serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

from budgets.services import holds
from common import pgpool
from common.exceptions import ServiceUnavailable
from usage.ledger import UsageRecord

logger = logging.getLogger(__name__)

RETRY_INTERVAL_S = 1.0
_CLOSINGS = {
    "settle": holds.hold_settle,
    "refund": holds.hold_refund,
    "record": holds.usage_record,
}
_draining: asyncio.Task | None = None


def directory() -> Path:
    return Path(settings.VAR_DIR) / "spool"


def keep(kind: str, record: UsageRecord, now: datetime) -> None:
    """Write the closing to disk (atomically: a file is whole or absent) and make sure
    this process retries it."""
    path = directory()
    path.mkdir(parents=True, exist_ok=True)
    final = path / f"{record.request_id}.json"
    partial = final.with_suffix(".part")
    partial.write_text(
        json.dumps({"kind": kind, "now": now.isoformat(), "record": record.to_json()})
    )
    os.replace(partial, final)
    logger.warning(
        "request %s: the database is unavailable; its %s is kept in %s until it returns",
        record.request_id,
        kind,
        final,
    )
    drain_soon()


_redriven = False


def redrive_once() -> None:
    """On a process's first request: retry what a previous process of this host kept."""
    global _redriven
    if not _redriven:
        _redriven = True
        drain_soon()


def drain_soon() -> None:
    """Start this process's retry loop, unless it runs already or nothing is kept."""
    global _draining
    if _draining is not None and not _draining.done():
        return
    if not directory().is_dir() or not any(directory().glob("*.json")):
        return
    _draining = asyncio.ensure_future(_drain())


async def _drain() -> None:
    # A poll: what ends the wait is the database coming back.
    while True:
        if await sync_to_async(_replay_all)():
            return
        await asyncio.sleep(RETRY_INTERVAL_S)


def _replay_all() -> bool:
    """Replay every kept closing, oldest name first; False when the database is still
    unavailable (the rest wait for the next try)."""
    return all(_replay(file) for file in sorted(directory().glob("*.json")))


def _replay(file: Path) -> bool:
    """Run one kept closing; False while the database is still unavailable."""
    try:
        kept: dict[str, Any] = json.loads(file.read_text())
    except FileNotFoundError:
        return True  # another process of this host replayed it
    record = UsageRecord.from_json(kept["record"])
    try:
        _CLOSINGS[kept["kind"]](record=record, now=datetime.fromisoformat(kept["now"]))
    except (ServiceUnavailable, *pgpool.UNAVAILABLE):
        return False
    except Exception:
        # Not the outage (a bug, a database that is not this one's): set aside for an
        # operator, never retried in a loop, never lost.
        logger.exception("request %s: its kept %s failed", record.request_id, kept["kind"])
        (file.parent / "failed").mkdir(exist_ok=True)
        os.replace(file, file.parent / "failed" / file.name)
        return True
    file.unlink(missing_ok=True)
    logger.info("request %s: its kept %s is done", record.request_id, kept["kind"])
    return True
