"""The ledger: how a request ended becomes its usage row (and, in platform mode, its attempt
reports), written once, in the same transaction as the money it moves (docs/SPEC.md §5).

The money core (budgets/services/holds.py) closes a request in one statement: the hold,
the user's counters and the ledger rows together. This module owns the ledger's part of
those statements, in its two spellings: the SQL that the PostgreSQL statements embed, and
the ORM writes that run on SQLite. The columns are listed once (`COLUMNS`) and both
spellings are built from that list.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import transaction
from psycopg.types.json import Jsonb

from otari.celery import enqueue_detached
from usage.models import UsageLog, UsageReport
from usage.pricing import TokenUsage
from usage.reporting import AttemptReport
from usage.tasks import usage_report_push as usage_report_push_task

ZERO = Decimal("0")
_PROVIDER_CHARS = UsageLog._meta.get_field("provider").max_length
_MODEL_CHARS = UsageLog._meta.get_field("model").max_length


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """How a request ended: becomes its usage row, and its charge when it had a hold."""

    request_id: uuid.UUID
    user_id: str
    api_key_id: uuid.UUID | None
    endpoint: str
    provider: str
    model: str
    status: str
    status_code: int | None
    usage: TokenUsage | None = None
    cost_usd: Decimal | None = None
    counts_toward_budget: bool = True
    error_message: str = ""
    error_code: str = ""
    upstream_status_code: int | None = None
    upstream_error: str = ""
    latency_ms: int | None = None
    # Platform mode: one report per resolved attempt, written with the usage row (§7).
    reports: tuple[AttemptReport, ...] = ()
    # The caller's workspace (None only where no workspace exists yet).
    workspace_id: uuid.UUID | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as JSON (exact: amounts and ids as strings), to be kept on disk."""
        data = dataclasses.asdict(self)
        data["request_id"] = str(self.request_id)
        data["api_key_id"] = str(self.api_key_id) if self.api_key_id else None
        data["workspace_id"] = str(self.workspace_id) if self.workspace_id else None
        data["cost_usd"] = str(self.cost_usd) if self.cost_usd is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageRecord:
        def usage(value: dict[str, int] | None) -> TokenUsage | None:
            return TokenUsage(**value) if value is not None else None

        return cls(
            **{
                **data,
                "request_id": uuid.UUID(data["request_id"]),
                "api_key_id": uuid.UUID(data["api_key_id"]) if data["api_key_id"] else None,
                "workspace_id": (uuid.UUID(data["workspace_id"]) if data["workspace_id"] else None),
                "cost_usd": Decimal(data["cost_usd"]) if data["cost_usd"] is not None else None,
                "usage": usage(data["usage"]),
                "reports": tuple(
                    AttemptReport(**{**report, "usage": usage(report["usage"])})
                    for report in data["reports"]
                ),
            }
        )

    @property
    def charge_usd(self) -> Decimal:
        """What this request adds to the user's spend."""
        if not self.counts_toward_budget or self.cost_usd is None:
            return ZERO
        return self.cost_usd

    def params(self, now: datetime) -> dict[str, Any]:
        """The statement parameters of this record: one per ledger column, and the
        reports as one JSON array."""
        u = self.usage
        params = {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "api_key_id": self.api_key_id,
            "workspace_id": self.workspace_id,
            "now": now,
            "endpoint": self.endpoint,
            # A client's text, cut to its column: the row is written whatever was sent.
            "provider": self.provider[:_PROVIDER_CHARS],
            "model": self.model[:_MODEL_CHARS],
            "prompt_tokens": u.prompt_tokens if u else None,
            "completion_tokens": u.output_tokens if u else None,
            "total_tokens": u.total_tokens if u else None,
            "cache_read_tokens": u.cache_read_tokens if u else None,
            "cache_write_tokens": u.cache_write_tokens if u else None,
            "cost_usd": self.cost_usd,
            "charge_usd": self.charge_usd,
            "status": self.status,
            "status_code": self.status_code,
            "error_message": self.error_message,
            "error_code": self.error_code,
            "upstream_status_code": self.upstream_status_code,
            "upstream_error": self.upstream_error,
            "latency_ms": self.latency_ms,
            "counts_toward_budget": self.counts_toward_budget,
        }
        if self.reports:
            params["reports"] = Jsonb([r.row() for r in self.reports])
        return params


# The usage row's columns, each filled from the statement parameter of the same name;
# `id` is the request id and `timestamp` is given by the statement (see `insert_sql`).
COLUMNS = (
    "user_id",
    "api_key_id",
    "workspace_id",
    "endpoint",
    "provider",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
    "status",
    "status_code",
    "error_message",
    "error_code",
    "upstream_status_code",
    "upstream_error",
    "latency_ms",
    "counts_toward_budget",
)


def insert_sql(*, timestamp: str, source: str = "") -> str:
    """The usage row's INSERT, for a statement's CTE: stamped with the SQL expression
    `timestamp`, once per row of `source` ("FROM charged") or once when no source is
    given. A second write of the same request is a no-op."""
    columns = ", ".join(("id", "timestamp", *COLUMNS))
    values = ", ".join(("%(request_id)s", timestamp, *(f"%({c})s" for c in COLUMNS)))
    return (
        f"INSERT INTO usage_usagelog ({columns}) SELECT {values} {source}"
        " ON CONFLICT (id) DO NOTHING"
    )


def row_create(record: UsageRecord, params: dict[str, Any], timestamp: datetime) -> None:
    """The ORM spelling of `insert_sql` and `REPORTS_INSERT_SQL`, inside the caller's
    transaction."""
    UsageLog.objects.bulk_create(
        [
            UsageLog(
                id=record.request_id,
                timestamp=timestamp,
                **{column: params[column] for column in COLUMNS},
            )
        ],
        ignore_conflicts=True,
    )
    if record.reports:
        UsageReport.objects.bulk_create(
            [
                UsageReport(
                    request_id=record.request_id,
                    user_id=record.user_id,
                    next_attempt_at=timestamp,
                    created_at=timestamp,
                    **report.row(),
                )
                for report in record.reports
            ],
            ignore_conflicts=True,
        )
        transaction.on_commit(lambda: reports_enqueue(record))


# Platform mode (§7): the request's attempt reports, inserted by the statement that writes
# its usage row, so both commit together. `{condition}` ties them to that row's insert.
_REPORTS_INSERT_SQL = """
    INSERT INTO usage_usagereport
        (correlation_id, request_id, platform_request_id, user_id, position, provider, model,
         status, is_final_attempt, prompt_tokens, completion_tokens, total_tokens,
         cache_read_tokens, cache_write_tokens, error_class, delivery_status, attempts,
         next_attempt_at, last_error, created_at)
    SELECT r.correlation_id, %(request_id)s, r.platform_request_id, %(user_id)s, r.position,
           r.provider, r.model, r.status, r.is_final_attempt, r.prompt_tokens,
           r.completion_tokens, r.total_tokens, r.cache_read_tokens, r.cache_write_tokens,
           r.error_class, 'pending', 0, %(now)s, '', %(now)s
    FROM jsonb_to_recordset(%(reports)s) AS r(
        correlation_id text, platform_request_id text, position int, provider text,
        model text, status text, is_final_attempt boolean, prompt_tokens int,
        completion_tokens int, total_tokens int, cache_read_tokens int,
        cache_write_tokens int, error_class text)
    {condition}
    ON CONFLICT (correlation_id) DO NOTHING"""


def reports_insert_sql(condition: str = "") -> str:
    """The reports' INSERT for a statement's CTE; `condition` (a WHERE clause) ties them
    to the usage row's insert when that is conditional."""
    return _REPORTS_INSERT_SQL.format(condition=condition)


def reports_enqueue(record: UsageRecord) -> None:
    """Hand the reports to the delivery task, without waiting for the broker: the rows
    are committed, and the periodic re-drive finds any report whose message was lost."""
    for report in record.reports:
        enqueue_detached(usage_report_push_task, report.correlation_id)
