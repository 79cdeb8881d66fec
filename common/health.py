"""Health probes (docs/SPEC.md §6): unauthenticated, served at `/health...` (what otari-cli's
`health` command calls) and under `/v1/` and `/api/v1/`.

What else `/health` reports (in platform mode, whether the platform answers) is the
gateway's business: otari/urls.py hands HealthApi a `details` function
(llm_proxy.platform.health_details), so this package imports no app.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from asgiref.sync import async_to_sync
from django.db import connection
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from common import pgpool

logger = logging.getLogger(__name__)


class _Public(APIView):
    authentication_classes: list = []
    permission_classes: list = []


class HealthApi(_Public):
    # Extra fields of the body, read on each call; set with as_view(details=...).
    details: Callable[[], dict[str, str]] | None = None

    @extend_schema(
        operation_id="health",
        tags=["health"],
        auth=[],
        description="In platform mode (docs/SPEC.md §7) `platform` says whether the platform "
        "answers: `reachable` or `unreachable`. The gateway stays healthy either way: "
        "requests made with `gw-` keys do not need the platform.",
        responses={
            200: inline_serializer(
                "Health",
                {
                    "status": serializers.CharField(),
                    "platform": serializers.ChoiceField(
                        choices=["reachable", "unreachable"], required=False
                    ),
                },
            ),
        },
    )
    def get(self, request: Request) -> Response:
        body = {"status": "healthy"}
        if self.details is not None:
            body.update(self.details())
        return Response(body)


class LivenessApi(_Public):
    @extend_schema(
        operation_id="health_liveness",
        tags=["health"],
        auth=[],
        description="The process answers (no dependency is checked).",
        responses={200: inline_serializer("Liveness", {"status": serializers.CharField()})},
    )
    def get(self, request: Request) -> Response:
        return Response({"status": "alive"})


class ReadinessApi(_Public):
    @extend_schema(
        operation_id="health_readiness",
        tags=["health"],
        auth=[],
        description="The database answers a query. 503 when it does not; the cause is "
        "logged, never returned.",
        responses={
            200: inline_serializer(
                "Readiness",
                {"status": serializers.CharField(), "database": serializers.CharField()},
            ),
            503: inline_serializer(
                "NotReady",
                {
                    "status": serializers.CharField(),
                    "database": serializers.CharField(),
                    "detail": serializers.CharField(),
                },
            ),
        },
    )
    def get(self, request: Request) -> Response:
        try:
            if pgpool.enabled():
                # Through the hot path's pool: it answers within OTARI_DB_TIMEOUT_SECONDS
                # when the database is down (docs/RELIABILITY.md).
                async_to_sync(pgpool.fetchone)("SELECT 1", {})
            else:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
                    cursor.fetchone()
        except Exception:
            # Any failure means "not ready"; the message may name hosts or users, so it
            # goes to the log only.
            logger.warning("Readiness check: the database is unreachable", exc_info=True)
            return Response(
                {
                    "status": "unavailable",
                    "database": "unreachable",
                    "detail": "The database is unreachable",
                },
                status=503,
            )
        return Response({"status": "ready", "database": "ok"})
