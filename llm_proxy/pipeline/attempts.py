"""Where a request may be sent: its attempts, each with its target.

A local request has one attempt, at the provider its model names. A platform request
(docs/SPEC.md §7) has one per attempt the platform resolved, tried in order until one
reaches its commit point (llm_proxy.pipeline.call); an attempt that cannot be tried
carries its refusal and is skipped. The platform is told of every attempt tried
(`Attempt.report`), with the usage row that closes the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from llm_proxy.translate import route_for
from usage.models import UsageReport
from usage.reporting import AttemptReport

if TYPE_CHECKING:
    from django.http.request import HttpHeaders

    from common.exceptions import GatewayError
    from llm_proxy import platform
    from llm_proxy.formats.base import ApiFormat
    from llm_proxy.providers.base import Provider
    from llm_proxy.translate import Route
    from usage.pricing import Rates, TokenUsage


@dataclass(frozen=True, slots=True)
class Target:
    """How a request reaches its provider: the route (native or translated), and the
    body and extra headers it sends. Decided before admission, so that what cannot be
    translated is refused before anything is held."""

    route: Route
    body: dict[str, Any]
    headers: dict[str, str]

    @classmethod
    def build(
        cls,
        fmt: ApiFormat,
        provider: Provider,
        body: dict[str, Any],
        model: str,
        request_headers: HttpHeaders,
    ) -> Target:
        """The target of `body` at `provider`; raises the refusal of what has no route."""
        route = route_for(fmt, provider)
        return cls(
            route=route,
            body=route.upstream_body(body, model, stream=body.get("stream") is True),
            headers={} if route.translated else provider.forwarded_headers(request_headers),
        )


@dataclass(eq=False)
class Attempt:
    """One place a request may be sent: a provider, its model, price and route.

    A local request has one. A platform request has one per resolved attempt; an attempt
    the gateway cannot use (no route to it, a model the user may not use) carries its
    `refusal` and is skipped, and reported like a failed one.
    """

    provider: Provider | None
    provider_name: str
    model: str
    model_key: str
    rates: Rates | None
    target: Target | None = field(default=None, repr=False)
    refusal: GatewayError | None = None
    resolved: platform.ResolvedAttempt | None = field(default=None, repr=False)
    # Why it failed, once tried.
    failure: GatewayError | None = None
    # What a hold for this attempt alone holds (0 when free or unpriced); set at admission.
    estimate_usd: Decimal = Decimal(0)

    def retarget(self, body: dict[str, Any]) -> None:
        """Send `body` instead of the one the target was built from (a request whose
        output maximum admission changed)."""
        if self.target is not None:
            route = self.target.route
            upstream_body = route.upstream_body(body, self.model, stream=body.get("stream") is True)
            self.target = Target(route=route, body=upstream_body, headers=self.target.headers)

    def report(
        self,
        *,
        platform_request_id: str,
        success: bool,
        final: bool,
        usage: TokenUsage | None = None,
        error_class: str = "",
    ) -> AttemptReport:
        """Platform mode: what the platform is told of this attempt."""
        resolved = self.resolved
        assert resolved is not None  # noqa: S101
        return AttemptReport(
            correlation_id=resolved.attempt_id,
            platform_request_id=platform_request_id,
            position=resolved.position,
            provider=resolved.provider,
            model=resolved.model,
            status=UsageReport.Outcome.SUCCESS if success else UsageReport.Outcome.ERROR,
            is_final_attempt=final,
            usage=usage,
            error_class=error_class[:100],
        )


def refusal_reports(
    attempts: list[Attempt], exc: GatewayError, platform_request_id: str
) -> tuple[AttemptReport, ...]:
    """A platform request refused at admission: the attempts up to the first one that
    could have been tried (all, when none could), each with its reason; the last final."""
    reports = []
    for index, attempt in enumerate(attempts):
        final = attempt.refusal is None or index == len(attempts) - 1
        reports.append(
            attempt.report(
                platform_request_id=platform_request_id,
                success=False,
                final=final,
                error_class=(attempt.refusal or exc).code,
            )
        )
        if final:
            break
    return tuple(reports)
