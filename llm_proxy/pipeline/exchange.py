"""The exchange: one admitted request, and the one place its books are closed.

An `Exchange` is what admission hands the provider call: the caller, the attempts that
may serve the request, the price and the hold. Every way out of a request closes it
exactly once, here:

- `settle`: charge the cost of what was used and release the hold (success, a stream
  that broke or was abandoned after the commit point, an answer without usage);
- `refund`: release the hold without charging (any failure before the commit point);
- a request with no hold (free model, key excluded from budget) writes its usage row
  alone, through the same two methods;
- `refusal_close`: a known caller refused at admission, before any hold, leaves a
  usage row too (docs/SPEC.md §3.4, §5).

The close runs shielded from cancellation, once; a second close is a no-op that waits
for the first. Every call that closes a hold or writes a usage row, and the budget
alert checks that follow, is in this module; the hold is opened by admission.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from budgets import alerting
from budgets.exceptions import BudgetExceeded
from budgets.services import alerts, holds
from common import pgpool
from common.exceptions import GatewayError, ServiceUnavailable
from llm_proxy import ratelimit
from llm_proxy.errors import ProviderError, error_response
from llm_proxy.pipeline import spool
from llm_proxy.pipeline.budget import budget_headers
from llm_proxy.routing import health
from otari import metrics
from usage import ledger
from usage.models import UsageLog
from usage.pricing import TokenUsage, cost_usd, prompt_tokens_from_chars

if TYPE_CHECKING:
    from datetime import datetime

    from django.http import HttpResponse

    from budgets.selectors import Caller
    from budgets.services.holds import BudgetState
    from llm_proxy.formats.base import ApiFormat
    from llm_proxy.pipeline.attempts import Attempt, Target
    from llm_proxy.pipeline.sse import StreamCodec
    from llm_proxy.providers.base import Provider
    from llm_proxy.ratelimit import RateAdmission
    from usage.pricing import Rates
    from usage.reporting import AttemptReport

logger = logging.getLogger(__name__)

# Closing tasks run to completion even when the request that started them is cancelled
# (client disconnect); the event loop only keeps weak references to tasks.
_closing_tasks: set[asyncio.Task] = set()

# Status codes recorded for endings that have no HTTP status of their own.
STATUS_CLIENT_CLOSED = 499  # the client went away (nginx's convention)
STATUS_STREAM_BROKEN = 502  # the upstream broke after the stream was committed


def track(coro: Awaitable[Any]) -> asyncio.Task:
    """Run `coro` as a task that nothing cancels and the loop cannot garbage-collect."""
    task = asyncio.ensure_future(coro)
    _closing_tasks.add(task)
    task.add_done_callback(_closing_tasks.discard)
    return task


@dataclass(eq=False)
class Exchange:
    """A request that has been admitted: its caller, attempts, price and hold."""

    request_id: uuid.UUID
    fmt: ApiFormat
    caller: Caller
    attempts: list[Attempt]
    prompt_chars: int
    prompt_texts: list[str]
    started: float
    estimate_usd: Decimal
    held: bool
    budget_state: BudgetState | None
    body: dict[str, Any] = field(repr=False)
    # The attempt being tried, or that served the request.
    current: int = 0
    # Platform mode: the platform's id of the request (its attempts are reported).
    platform_request_id: str | None = None
    # What the rate limiter counted (None: the caller has no limits).
    rate: RateAdmission | None = None
    # The cost charged at settlement (None until then, or when the model has no price).
    charged_usd: Decimal | None = None
    # The output maximum the gateway set because the default did not fit the budget
    # (llm_proxy.pipeline.budget); sent back as X-Otari-Max-Tokens.
    fitted_max_tokens: int | None = None
    # What the hold holds now (the estimate, grown by a failover to a dearer attempt).
    hold_usd: Decimal = Decimal(0)
    # The routing policy (or alias) the request named: the response's `model`.
    policy: str | None = None
    # The close could not reach the database and is kept on disk to be replayed.
    spooled: bool = False
    _closing: asyncio.Future | None = field(default=None, repr=False)

    # --- the attempt being tried -------------------------------------------------------------

    @property
    def attempt(self) -> Attempt:
        return self.attempts[self.current]

    @property
    def provider(self) -> Provider:
        provider = self.attempt.provider
        assert provider is not None, "an attempt with a refusal is never sent"  # noqa: S101
        return provider

    @property
    def model(self) -> str:
        return self.attempt.model

    @property
    def model_key(self) -> str:
        return self.attempt.model_key

    @property
    def rates(self) -> Rates | None:
        """The serving attempt's price: what the request is charged at."""
        return self.attempt.rates

    @property
    def target(self) -> Target:
        target = self.attempt.target
        assert target is not None, "an attempt with a refusal is never sent"  # noqa: S101
        return target

    def next_attempt(self, failure: GatewayError) -> bool:
        """The current attempt failed before anything reached the client: move to the
        next one that can be tried. False when none is left; the request then fails with
        `final_failure`."""
        self.attempt.failure = failure
        while self.current + 1 < len(self.attempts):
            self.current += 1
            if self.attempt.refusal is None:
                return True
            self.attempt.failure = self.attempt.refusal
        return False

    async def advance(self, failure: GatewayError) -> bool:
        """The current attempt failed before the commit point: move to the next one that
        can be tried, taking the hold along (budgets.services.holds.hold_move: grown to
        a dearer attempt's estimate, onto the ceilings of the provider it goes to). A
        hold that does not fit stops the chain: the request fails with that refusal.
        False when the request fails (`final_failure`).

        A routed request (a policy) also leaves an `absorbed` usage row for the failed
        attempt, and tells the targets' health."""
        failed = self.attempt
        if self.policy is not None:
            await asyncio.gather(
                holds.usage_record_async(record=self._absorbed(failure), now=timezone.now()),
                health.record(failed.model_key, ok=False),
            )
        held_at = failed.provider_name
        if not self.next_attempt(failure):
            return False
        if not self.held:
            return True
        amount = max(self.hold_usd, self.attempt.estimate_usd)
        if amount == self.hold_usd and self.attempt.provider_name == held_at:
            return True
        try:
            await sync_to_async(holds.hold_move)(
                request_id=self.request_id,
                scopes=self.caller.scopes,
                provider=self.attempt.provider_name,
                amount_usd=amount,
                model_key=self.attempt.model_key,
                now=timezone.now(),
            )
        except BudgetExceeded as exc:
            self.attempt.failure = exc
            return False
        self.hold_usd = amount
        return True

    def _absorbed(self, failure: GatewayError) -> ledger.UsageRecord:
        """The usage row of a routed attempt that failed and was failed over: under its
        own id, never counted toward the budget (docs/ROUTING.md)."""
        return ledger.UsageRecord(
            request_id=uuid.uuid4(),
            user_id=self.caller.user_id,
            api_key_id=self.caller.api_key_id,
            workspace_id=self.caller.workspace_id,
            endpoint=self.fmt.endpoint,
            provider=self.attempt.provider_name,
            model=self.model,
            status=UsageLog.Status.ABSORBED,
            status_code=failure.status,
            counts_toward_budget=False,
            error_message=failure.message,
            error_code=failure.code,
            upstream_status_code=failure.upstream_status
            if isinstance(failure, ProviderError)
            else None,
            upstream_error=failure.upstream_detail if isinstance(failure, ProviderError) else "",
            latency_ms=self.latency_ms(),
        )

    async def served(self) -> None:
        """The current attempt reached its commit point (a routed request's targets'
        health hears of it)."""
        if self.policy is not None:
            await health.record(self.attempt.model_key, ok=True)

    @property
    def final_failure(self) -> GatewayError:
        failure = self.attempt.failure
        assert failure is not None  # noqa: S101
        return failure

    # --- what the client is told ---------------------------------------------------------

    def response_headers(self) -> dict[str, str]:
        """The budget headers of an admitted request, and the output maximum admission set."""
        headers = budget_headers(self.budget_state)
        if self.fitted_max_tokens is not None:
            headers["X-Otari-Max-Tokens"] = str(self.fitted_max_tokens)
        return headers

    def error_response(self, exc: GatewayError) -> HttpResponse:
        return error_response(
            exc, self.fmt.error_style, headers={"X-Otari-Request-Id": str(self.request_id)}
        )

    def closing_summary(self) -> dict[str, str]:
        """What a stream's closing event tells the client once the request is settled:
        what the headers of an answer that is not streamed say (docs/ENDPOINTS.md)."""
        summary = {"request_id": str(self.request_id)}
        if self.charged_usd is not None:
            summary["cost_usd"] = str(self.charged_usd)
        # The X-Otari-Budget-* headers' values, under the names of the summary.
        headers = budget_headers(self.budget_state)
        for header, name in (
            ("X-Otari-Budget-Remaining-Usd", "budget_remaining_usd"),
            ("X-Otari-Budget-Reset-At", "budget_reset_at"),
        ):
            if header in headers:
                summary[name] = headers[header]
        return summary

    # --- the usage row ---------------------------------------------------------------------

    def _reports(
        self, *, status: str, usage: TokenUsage | None, error_class: str
    ) -> tuple[AttemptReport, ...]:
        """Platform mode: a report for every attempt tried up to the one that ended the
        request (which is final); attempts after it were never tried."""
        if self.platform_request_id is None:
            return ()
        reports = []
        for index, attempt in enumerate(self.attempts[: self.current + 1]):
            final = index == self.current
            failed = attempt.failure or attempt.refusal
            success = final and status == UsageLog.Status.SUCCESS
            reports.append(
                attempt.report(
                    platform_request_id=self.platform_request_id,
                    success=success,
                    final=final,
                    usage=usage if final else None,
                    error_class=""
                    if success
                    else (error_class if final else failed.code if failed else "error"),
                )
            )
        return tuple(reports)

    def latency_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)

    def cost_of(self, usage: TokenUsage | None) -> Decimal | None:
        if self.rates is None or usage is None:
            return None
        return cost_usd(usage, self.rates)

    def _record(
        self,
        *,
        status: str,
        status_code: int | None,
        usage: TokenUsage | None = None,
        cost: Decimal | None = None,
        error_message: str = "",
        error_class: str = "",
        upstream: ProviderError | None = None,
    ) -> ledger.UsageRecord:
        return ledger.UsageRecord(
            request_id=self.request_id,
            user_id=self.caller.user_id,
            api_key_id=self.caller.api_key_id,
            workspace_id=self.caller.workspace_id,
            endpoint=self.fmt.endpoint,
            provider=self.attempt.provider_name,
            model=self.model,
            status=status,
            status_code=status_code,
            usage=usage,
            cost_usd=cost,
            counts_toward_budget=not self.caller.exclude_from_budget,
            error_message=error_message,
            # A success that went as it should has no error code; one charged its
            # estimate for lack of usage keeps "usage_missing".
            error_code=error_class if status != UsageLog.Status.SUCCESS or error_message else "",
            upstream_status_code=upstream.upstream_status if upstream else None,
            upstream_error=upstream.upstream_detail if upstream else "",
            latency_ms=self.latency_ms(),
            reports=self._reports(status=status, usage=usage, error_class=error_class),
        )

    # --- closing, exactly once -------------------------------------------------------------

    def _close_once(
        self, close: Callable[[], Awaitable[Any]], record: ledger.UsageRecord, kind: str
    ) -> asyncio.Future:
        """Run the first close of this request, shielded; later calls await that one.

        Shielded: Django cancels the response task when the client disconnects, and a
        settlement cut off half-way would leave the hold open until the sweeper.
        `kind`: the closing statement ("settle", "refund", "record"), kept on disk when
        the database cannot take it now (llm_proxy.pipeline.spool).
        """
        if self._closing is None:
            self._closing = track(self._close(close, record, kind))
        return asyncio.shield(self._closing)

    async def _close(
        self, close: Callable[[], Awaitable[Any]], record: ledger.UsageRecord, kind: str
    ) -> None:
        """Close the books and, concurrently, correct the rate limiter's token count to
        what the request used (its estimate was counted at admission)."""
        metrics.request_closed(record)
        correction = None
        if self.rate is not None:
            used = record.usage.total_tokens if record.usage is not None else 0
            correction = asyncio.ensure_future(ratelimit.rate_settle(self.rate, tokens=used))
        try:
            await close()
        except (ServiceUnavailable, *pgpool.UNAVAILABLE):
            spool.keep(kind, record, timezone.now())
            self.spooled = True
        finally:
            if correction is not None:
                await correction

    async def settle(
        self,
        usage: TokenUsage | None,
        *,
        status: str = UsageLog.Status.SUCCESS,
        status_code: int = 200,
        error_message: str = "",
    ) -> None:
        """Charge the request's cost and release its hold."""
        metrics.provider_call_ended()
        record = self._record(
            status=status,
            status_code=status_code,
            usage=usage,
            cost=self.cost_of(usage),
            error_message=error_message,
            error_class=_settled_error_class(status, status_code),
        )
        self.charged_usd = record.cost_usd

        async def close() -> None:
            now = timezone.now()
            if self.held:
                state = await holds.hold_settle_async(record=record, now=now)
                if state is not None:
                    self.budget_state = state
                    self._alerts_after_settle(state, record.charge_usd, now)
            else:
                await holds.usage_record_async(record=record, now=now)

        await self._close_once(close, record, "settle" if self.held else "record")

    def _alerts_after_settle(self, state: BudgetState, charge_usd: Decimal, now) -> None:
        """Arithmetic only, unless this settlement took spend across an alert threshold;
        then the alert check (a rare database write) runs as its own task, off the
        response path."""
        thresholds = self.caller.alert_thresholds_pct
        if thresholds and alerting.thresholds_crossed(
            thresholds,
            spend_after_usd=state.spend_usd,
            charge_usd=charge_usd,
            limit_usd=state.limit_usd,
        ):
            track(_alerts_check(self.caller.user_id, now))

    async def refund(self, exc: GatewayError, *, status: str = UsageLog.Status.ERROR) -> None:
        """Release the hold without charging; the usage row says why."""
        metrics.provider_call_ended()
        record = self._record(
            status=status,
            status_code=exc.status,
            error_message=exc.message,
            error_class=(
                "client_disconnected" if status == UsageLog.Status.CLIENT_DISCONNECTED else exc.code
            ),
            upstream=exc if isinstance(exc, ProviderError) else None,
        )

        async def close() -> None:
            now = timezone.now()
            if self.held:
                await holds.hold_refund_async(record=record, now=now)
            else:
                await holds.usage_record_async(record=record, now=now)

        await self._close_once(close, record, "refund" if self.held else "record")

    async def refund_disconnected(self) -> None:
        """The client left before anything was sent: release the hold (a no-op when the
        request had already been closed)."""
        await self.refund(
            GatewayError("The client disconnected", status=STATUS_CLIENT_CLOSED),
            status=UsageLog.Status.CLIENT_DISCONNECTED,
        )

    # --- settling by what was delivered ----------------------------------------------------

    def _delivered_usage(self, codec: StreamCodec) -> TokenUsage:
        """What a stream that ended early consumed: its usage if the provider sent it,
        else the prompt estimate plus the output the client was sent."""
        if codec.usage is not None and codec.usage.output_tokens:
            return codec.usage
        input_tokens = (
            codec.usage.input_tokens
            if codec.usage is not None
            else prompt_tokens_from_chars(self.prompt_chars)
        )
        return TokenUsage(
            input_tokens=input_tokens,
            output_tokens=prompt_tokens_from_chars(codec.output_chars()),
            cache_read_tokens=codec.usage.cache_read_tokens if codec.usage else 0,
            cache_write_tokens=codec.usage.cache_write_tokens if codec.usage else 0,
        )

    async def settle_complete(self, usage: TokenUsage | None, output_chars: int) -> None:
        """Settle a finished answer; without reported usage, apply
        OTARI_STREAM_MISSING_USAGE: charge the estimate (default), nothing, or the
        estimate on an error row."""
        if usage is not None:
            await self.settle(usage)
            return
        policy = settings.OTARI_STREAM_MISSING_USAGE
        message = "The provider reported no usage; charged the estimate"
        if policy == "free":
            await self.settle(TokenUsage(), error_message="The provider reported no usage")
            return
        estimated = TokenUsage(
            input_tokens=prompt_tokens_from_chars(self.prompt_chars),
            output_tokens=max(
                prompt_tokens_from_chars(output_chars), self.fmt.output_token_budget(self.body)
            ),
        )
        if policy == "fail":
            await self.settle(
                estimated, status=UsageLog.Status.ERROR, status_code=200, error_message=message
            )
        else:
            await self.settle(estimated, error_message=message)

    async def settle_stream(self, codec: StreamCodec) -> None:
        # What was delivered is counted (its events parsed) only when it is priced.
        usage = codec.usage
        await self.settle_complete(usage, codec.output_chars() if usage is None else 0)

    async def settle_broken_stream(self, codec: StreamCodec) -> None:
        provider = self.attempt.provider_name
        metrics.provider_error_observed(provider=provider, failure="stream_broken")
        await self.settle(
            self._delivered_usage(codec),
            status=UsageLog.Status.ERROR,
            status_code=STATUS_STREAM_BROKEN,
            error_message="The provider's stream broke off; charged what was delivered",
        )

    async def settle_disconnected(self, codec: StreamCodec) -> None:
        await self.settle(
            self._delivered_usage(codec),
            status=UsageLog.Status.CLIENT_DISCONNECTED,
            status_code=STATUS_CLIENT_CLOSED,
            error_message="The client disconnected; charged what was delivered",
        )


def _settled_error_class(status: str, status_code: int) -> str:
    """What a charged request that did not end well reports as its error class."""
    if status == UsageLog.Status.CLIENT_DISCONNECTED:
        return "client_disconnected"
    if status_code == STATUS_STREAM_BROKEN:
        return "stream_broken"
    return "usage_missing"


# --- refusals at admission ---------------------------------------------------------------------


async def refusal_close(
    exc: GatewayError,
    caller: Caller,
    fmt: ApiFormat,
    request_id: uuid.UUID,
    started: float,
    provider: str,
    model: str,
    reports: tuple[AttemptReport, ...] = (),
) -> None:
    """A known caller's request refused at admission, before any hold: its usage row
    (docs/SPEC.md §3.4, §5). The caller re-raises `exc`."""
    record = ledger.UsageRecord(
        request_id=request_id,
        user_id=caller.user_id,
        api_key_id=caller.api_key_id,
        workspace_id=caller.workspace_id,
        endpoint=fmt.endpoint,
        provider=provider,
        model=model,
        status=UsageLog.Status.ERROR,
        status_code=exc.status,
        counts_toward_budget=not caller.exclude_from_budget,
        error_message=exc.message,
        error_code=exc.code,
        latency_ms=int((time.perf_counter() - started) * 1000),
        reports=reports,
    )
    await holds.usage_record_async(record=record, now=timezone.now())
    metrics.request_closed(record)
    if isinstance(exc, BudgetExceeded):
        _refused_for_budget(caller)
    exc.headers.setdefault("X-Otari-Request-Id", str(request_id))


# (user, window end) whose refusal for budget this process has handed to the alert check.
_refusals_alerted: set[tuple[str, object]] = set()


def _refused_for_budget(caller: Caller) -> None:
    """A refusal for budget counts as reaching 100% of it for alerting. The alert itself
    is raised at most once per user and window (the database decides); this only keeps a
    flood of refusals from running a check each."""
    if not caller.alert_thresholds_pct:
        return
    window = (caller.user_id, caller.next_budget_reset_at)
    if window in _refusals_alerted:
        return
    if len(_refusals_alerted) > 10_000:
        _refusals_alerted.clear()
    _refusals_alerted.add(window)
    track(_alerts_check(caller.user_id, timezone.now()))


async def _alerts_check(user_id: str, now: datetime) -> None:
    try:
        await sync_to_async(alerts.budget_alerts_check)(user_id=user_id, now=now)
    except Exception:
        # The periodic sweep raises any alert this missed (budgets_alerts_sweep).
        logger.exception("budget alert check for user %s failed", user_id)
