"""One generation request through the gateway: admit, call the provider, close the books.

    authenticate -> admission checks (§3.3) -> hold -> provider call -> settle | refund

In platform mode (docs/SPEC.md §7, llm_proxy.platform) a platform user token is resolved into
the user to bill and an ordered list of attempts; the provider call walks them, and a
failure before the commit point moves to the next one. A local request has exactly one
attempt. Either way the request is one Exchange, closed once, at the price of the
attempt that served it.

Every path out of `handle` closes the request exactly once through `Exchange`: settle
(charge), refund (release), or, for requests refused before a hold, a usage row alone.
Database work per successful request: three statements on PostgreSQL (load the caller
with the model's price; open the hold; settle with the usage row).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.request import RawPostDataException
from django.utils import timezone

from budgets import alerting
from budgets.exceptions import BudgetExceeded, ModelNotAllowed, PricingMissing, UserBlocked
from budgets.rest import credential_from_headers
from budgets.selectors import Caller, rates_current
from budgets.services import alerts, holds
from common.exceptions import BadRequest, GatewayError, PayloadTooLarge, PermissionDenied
from llm_proxy import budget, platform, prices, ratelimit, upstream
from llm_proxy.auth import (
    authenticate,
    authenticate_listing,
    authenticate_platform_user,
    is_platform_user_token,
    model_allowed,
)
from llm_proxy.errors import (
    ProviderError,
    ProviderTimeout,
    ProviderUnreachable,
    error_response,
    provider_error_message,
    redact,
)
from llm_proxy.formats import MESSAGES
from llm_proxy.providers import resolve_model
from llm_proxy.streaming import EventSplitter, relay
from llm_proxy.translate import TranslationError, route_for
from otari import metrics
from otari.celery import embedded_beat_tick
from otari.logging import bind_request, log_payload
from otari.logging import current as current_request
from usage import ledger
from usage.models import UsageLog, UsageReport
from usage.pricing import TokenUsage, cost_usd, prompt_tokens_from_chars
from usage.reporting import AttemptReport
from usage.selectors import prices_current

if TYPE_CHECKING:
    from budgets.services.holds import BudgetState
    from llm_proxy.formats.base import ApiFormat
    from llm_proxy.providers.base import Provider
    from llm_proxy.ratelimit import RateAdmission
    from llm_proxy.streaming import StreamCodec
    from llm_proxy.translate import Route
    from usage.pricing import Rates

logger = logging.getLogger(__name__)

# Closing tasks run to completion even when the request that started them is cancelled
# (client disconnect); the event loop only keeps weak references to tasks.
_closing_tasks: set[asyncio.Task] = set()

# Status codes recorded for endings that have no HTTP status of their own.
STATUS_CLIENT_CLOSED = 499  # the client went away (nginx's convention)
STATUS_STREAM_BROKEN = 502  # the upstream broke after the stream was committed


@dataclass(frozen=True, slots=True)
class Target:
    """How a request reaches its provider: the route (native or translated), and the
    body and extra headers it sends. Decided before admission, so that what cannot be
    translated is refused before anything is held."""

    route: Route
    body: dict[str, Any]
    headers: dict[str, str]


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

    def retarget(self, body: dict[str, Any]) -> None:
        """Send `body` instead of the one the target was built from (a request whose
        output maximum admission changed)."""
        if self.target is not None:
            route = self.target.route
            upstream_body = route.upstream_body(body, self.model, stream=body.get("stream") is True)
            self.target = Target(route=route, body=upstream_body, headers=self.target.headers)


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
    # (llm_proxy.budget); sent back as X-Otari-Max-Tokens.
    fitted_max_tokens: int | None = None
    _closing: asyncio.Future | None = field(default=None, repr=False)

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

    @property
    def final_failure(self) -> GatewayError:
        failure = self.attempt.failure
        assert failure is not None  # noqa: S101
        return failure

    @property
    def counts_toward_budget(self) -> bool:
        return not self.caller.exclude_from_budget

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
                _attempt_report(
                    attempt,
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
            endpoint=self.fmt.endpoint,
            provider=self.attempt.provider_name,
            model=self.model,
            status=status,
            status_code=status_code,
            usage=usage,
            cost_usd=cost,
            counts_toward_budget=self.counts_toward_budget,
            error_message=error_message,
            # A success that went as it should has no error code; one charged its
            # estimate for lack of usage keeps "usage_missing".
            error_code=error_class if status != UsageLog.Status.SUCCESS or error_message else "",
            upstream_status_code=upstream.upstream_status if upstream else None,
            upstream_error=upstream.upstream_detail if upstream else "",
            latency_ms=self.latency_ms(),
            reports=self._reports(status=status, usage=usage, error_class=error_class),
        )

    def _close_once(
        self, close: Callable[[], Awaitable[Any]], record: ledger.UsageRecord
    ) -> asyncio.Future:
        """Run the first close of this request, shielded; later calls await that one.

        Shielded: Django cancels the response task when the client disconnects, and a
        settlement cut off half-way would leave the hold open until the sweeper.
        """
        if self._closing is None:
            self._closing = _track(self._close(close, record))
        return asyncio.shield(self._closing)

    async def _close(self, close: Callable[[], Awaitable[Any]], record: ledger.UsageRecord) -> None:
        """Close the books and, concurrently, correct the rate limiter's token count to
        what the request used (its estimate was counted at admission)."""
        metrics.request_closed(record)
        if self.rate is None:
            await close()
            return
        used = record.usage.total_tokens if record.usage is not None else 0
        correction = asyncio.ensure_future(ratelimit.rate_settle(self.rate, tokens=used))
        try:
            await close()
        finally:
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

        await self._close_once(close, record)

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
            _track(_alerts_check(self.caller.user_id, now))

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

        await self._close_once(close, record)

    def closing_summary(self) -> dict[str, str]:
        """What a stream's closing event tells the client once the request is settled:
        what the headers of an answer that is not streamed say (docs/ENDPOINTS.md)."""
        summary = {"request_id": str(self.request_id)}
        if self.charged_usd is not None:
            summary["cost_usd"] = str(self.charged_usd)
        # The X-Otari-Budget-* headers' values, under the names of the summary.
        headers = budget.budget_headers(self.budget_state)
        for header, name in (
            ("X-Otari-Budget-Remaining-Usd", "budget_remaining_usd"),
            ("X-Otari-Budget-Reset-At", "budget_reset_at"),
        ):
            if header in headers:
                summary[name] = headers[header]
        return summary

    # --- the endings of a committed stream -------------------------------------------------

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
            output_tokens=max(prompt_tokens_from_chars(output_chars), self._max_output_tokens()),
        )
        if policy == "fail":
            await self.settle(
                estimated, status=UsageLog.Status.ERROR, status_code=200, error_message=message
            )
        else:
            await self.settle(estimated, error_message=message)

    def _max_output_tokens(self) -> int:
        return self.fmt.output_token_budget(self.body)

    async def settle_stream(self, codec: StreamCodec) -> None:
        await self.settle_complete(codec.usage, codec.output_chars())

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


def _attempt_report(
    attempt: Attempt,
    *,
    platform_request_id: str,
    success: bool,
    final: bool,
    usage: TokenUsage | None = None,
    error_class: str = "",
) -> AttemptReport:
    resolved = attempt.resolved
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


class EventStreamResponse(StreamingHttpResponse):
    """A streaming response whose body Django iterates directly.

    StreamingHttpResponse wraps async content in two generators of its own; when the
    client disconnects Django closes only the outer one, and ours would learn of it only
    when garbage-collected. Iterating ours directly delivers the close at once, so the
    relay settles and closes the upstream connection right away.
    """

    def __aiter__(self):
        return self._iterator


# ---------------------------------------------------------------------------------------


def _parse_body(request: HttpRequest) -> dict[str, Any]:
    try:
        raw = request.body
    except RequestDataTooBig as exc:
        raise PayloadTooLarge from exc
    except RawPostDataException as exc:  # pragma: no cover - body already consumed
        raise BadRequest("Could not read the request body") from exc
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("Request body is not valid JSON", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object", code="invalid_json")
    return body


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
    _track(_alerts_check(caller.user_id, timezone.now()))


async def _alerts_check(user_id: str, now) -> None:
    try:
        await sync_to_async(alerts.budget_alerts_check)(user_id=user_id, now=now)
    except Exception:
        # The periodic sweep raises any alert this missed (budgets_alerts_sweep).
        logger.exception("budget alert check for user %s failed", user_id)


async def _admit(
    request: HttpRequest, fmt: ApiFormat, request_id: uuid.UUID, started: float
) -> tuple[Exchange, dict[str, Any]]:
    """Authenticate and admit, or raise the refusal (after logging it, for known users)."""
    credential = credential_from_headers(request)
    if await is_platform_user_token(credential):
        return await _admit_platform(request, fmt, request_id, started, credential)
    body: dict[str, Any] = {}
    refusal: GatewayError | None = None
    provider: Provider | None = None
    target: Target | None = None
    model = model_key = ""
    try:
        body = _parse_body(request)
        selector = body.get("model")
        if not isinstance(selector, str) or not selector:
            raise BadRequest("model is required", code="invalid_model", param="model")
        provider, model = resolve_model(selector)
        model_key = f"{provider.name}:{model}"
        fmt.validate(body)
        # Translation is decided (and refused, for what cannot be translated) before
        # anything is held.
        route = route_for(fmt, provider)
        target = Target(
            route=route,
            body=route.upstream_body(body, model, stream=body.get("stream") is True),
            headers={} if route.translated else provider.forwarded_headers(request.headers),
        )
    except GatewayError as exc:
        refusal = exc
    now = timezone.now()
    caller = await authenticate(
        credential=credential, named_user=fmt.named_user(body), model_key=model_key, now=now
    )
    try:
        if refusal is not None or provider is None or target is None:
            raise refusal or BadRequest("model is required")
        named = fmt.named_user(body)
        if (
            caller.api_key_id is not None
            and named is not None
            and named != caller.user_id
            # Some clients fill the user field with ids of their own (Claude Code sets
            # metadata.user_id); operators can let those through. Spend is billed to the
            # key's user either way.
            and settings.OTARI_REJECT_USER_MISMATCH
        ):
            raise PermissionDenied(
                "This API key belongs to a different user than the request names",
                code="user_mismatch",
            )
        allowed = model_allowed(caller.allowed_models, model_key)
        attempt = Attempt(
            provider=provider,
            provider_name=provider.name,
            model=model,
            model_key=model_key,
            # A refused caller does not get to freeze a catalog price.
            rates=(
                await prices.rates_for(
                    caller=caller, provider=provider, model=model, model_key=model_key, now=now
                )
                if allowed and not caller.blocked
                else caller.rates
            ),
            target=target,
            refusal=None if allowed else ModelNotAllowed(),
        )
        exchange = await _admit_known(caller, fmt, body, [attempt], request_id, started, now)
        return exchange, exchange.body
    except GatewayError as exc:
        # A refusal of a known user leaves a usage row (docs/SPEC.md §3.4, §5).
        record = ledger.UsageRecord(
            request_id=request_id,
            user_id=caller.user_id,
            api_key_id=caller.api_key_id,
            endpoint=fmt.endpoint,
            provider=provider.name if provider else "",
            model=model or str(body.get("model") or "")[:255],
            status=UsageLog.Status.ERROR,
            status_code=exc.status,
            counts_toward_budget=not caller.exclude_from_budget,
            error_message=exc.message,
            error_code=exc.code,
            latency_ms=int((time.perf_counter() - started) * 1000),
        )
        await holds.usage_record_async(record=record, now=timezone.now())
        metrics.request_closed(record)
        if isinstance(exc, BudgetExceeded):
            _refused_for_budget(caller)
        exc.headers.setdefault("X-Otari-Request-Id", str(request_id))
        raise


async def _admit_known(
    caller: Caller,
    fmt: ApiFormat,
    body: dict[str, Any],
    attempts: list[Attempt],
    request_id: uuid.UUID,
    started: float,
    now,
    platform_request_id: str | None = None,
) -> Exchange:
    """The admission checks of §3.3, in order, and the hold.

    A local request has one attempt; a platform request (§7) has the resolved ones, and
    an attempt that cannot be tried (a model the user may not use, no route) carries its
    refusal. The hold covers the dearest usable attempt, so whichever serves fits under
    it; the request is charged at the price of the one that serves. The platform prices
    and bills its own attempts: `require_pricing` is for local providers.
    """
    if caller.blocked:
        raise UserBlocked
    usable = [index for index, attempt in enumerate(attempts) if attempt.refusal is None]
    if not usable:
        # Nothing can be tried: the last attempt's reason is the request's.
        refusal = attempts[-1].refusal
        assert refusal is not None  # noqa: S101
        raise refusal
    limit = caller.limit_usd(now)
    state = budget.loaded_state(caller, limit, now)
    priced = [rates for index in usable if (rates := attempts[index].rates) is not None]
    texts = fmt.prompt_texts(body)
    prompt_chars = fmt.prompt_chars(body, texts)
    ask = budget.Ask(fmt, prompt_chars, fmt.output_token_budget(body), priced)
    if not priced and platform_request_id is None and settings.OTARI_REQUIRE_PRICING:
        if state is not None and state.remaining_usd <= 0:
            raise budget.explain(BudgetExceeded(state=state), ask)
        raise PricingMissing.for_model(attempts[usable[0]].model_key)
    # Free models and keys excluded from budget take no hold and are never refused for
    # money (docs/SPEC.md §1, §3.3).
    takes_hold = any(not rates.is_free for rates in priced) and not caller.exclude_from_budget
    fitted = budget.fit_max_output(ask, body, state) if takes_hold else None
    if fitted is not None:
        body = {**body, fmt.max_output_fields[0]: fitted}
        ask = budget.Ask(fmt, prompt_chars, fitted, priced)
        for attempt in attempts:
            attempt.retarget(body)
    # Rate limits (429) before the budget: no hold is taken for a request refused here.
    rate = await ratelimit.rate_admit(
        caller=caller, tokens=prompt_tokens_from_chars(prompt_chars) + ask.max_output_tokens
    )
    estimate = ask.estimate_usd()
    held = False
    if takes_hold:
        try:
            state = await _hold_open(
                rate,
                user_id=caller.user_id,
                request_id=request_id,
                amount_usd=estimate,
                limit_usd=limit,
                model_key=attempts[usable[0]].model_key,
                now=now,
            )
        except BudgetExceeded as exc:
            raise budget.explain(exc, ask) from None
        held = True
    for index in range(usable[0]):
        attempts[index].failure = attempts[index].refusal
    return Exchange(
        request_id=request_id,
        fmt=fmt,
        caller=caller,
        attempts=attempts,
        current=usable[0],
        prompt_chars=prompt_chars,
        prompt_texts=texts,
        started=started,
        estimate_usd=estimate,
        held=held,
        budget_state=state,
        body=body,
        platform_request_id=platform_request_id,
        rate=rate,
        fitted_max_tokens=fitted,
    )


async def _hold_open(rate: RateAdmission | None, **hold: Any) -> BudgetState:
    """`hold_open_async`; a refusal gives the rate limiter back the request's tokens
    (it used none) and still shows the caller its rate limits."""
    try:
        return await holds.hold_open_async(**hold)
    except GatewayError as exc:
        await ratelimit.rate_settle(rate, tokens=0)
        if rate is not None:
            exc.headers.update(ratelimit.rate_headers(rate.windows))
        raise


# --- platform mode (docs/SPEC.md §7) -----------------------------------------------------------


def _platform_attempt(
    request: HttpRequest,
    fmt: ApiFormat,
    body: dict[str, Any],
    caller: Caller,
    resolved: platform.ResolvedAttempt,
    rates: Rates | None,
) -> Attempt:
    """An attempt as the gateway will try it, routed (and translated) exactly as a local
    request is; or, when it cannot be tried, with its refusal."""
    attempt = Attempt(
        provider=None,
        provider_name=resolved.provider,
        model=resolved.model,
        model_key=resolved.model_key,
        rates=rates,
        resolved=resolved,
    )
    try:
        provider = platform.provider_for(resolved)
        # The local operator's restrictions on the user still apply.
        if not model_allowed(caller.allowed_models, resolved.model_key):
            raise ModelNotAllowed
        route = route_for(fmt, provider)
        attempt.target = Target(
            route=route,
            body=route.upstream_body(body, resolved.model, stream=body.get("stream") is True),
            headers={} if route.translated else provider.forwarded_headers(request.headers),
        )
        attempt.provider = provider
    except GatewayError as exc:
        attempt.refusal = exc
    return attempt


def _refusal_reports(
    attempts: list[Attempt], exc: GatewayError, platform_request_id: str
) -> tuple[AttemptReport, ...]:
    """A platform request refused at admission: the attempts up to the first one that
    could have been tried (all, when none could), each with its reason; the last final."""
    reports = []
    for index, attempt in enumerate(attempts):
        final = attempt.refusal is None or index == len(attempts) - 1
        reports.append(
            _attempt_report(
                attempt,
                platform_request_id=platform_request_id,
                success=False,
                final=final,
                error_class=(attempt.refusal or exc).code,
            )
        )
        if final:
            break
    return tuple(reports)


async def _admit_platform(
    request: HttpRequest,
    fmt: ApiFormat,
    request_id: uuid.UUID,
    started: float,
    user_token: str,
) -> tuple[Exchange, dict[str, Any]]:
    """Admission of a request made with a platform user token.

    The request is checked before the platform is asked (a malformed request is the
    caller's 400 without a round trip), then resolved: the platform names the user, held
    and billed locally, and the attempts. Refusals before the user is known leave no
    usage row, as for an unknown key.
    """
    body = _parse_body(request)
    selector = body.get("model")
    if not isinstance(selector, str) or not selector:
        raise BadRequest("model is required", code="invalid_model", param="model")
    fmt.validate(body)
    resolution = await platform.resolve(user_token=user_token, selector=selector)
    now = timezone.now()
    caller = await authenticate_platform_user(user_id=resolution.user_id, now=now)
    rates = await rates_current(
        model_keys=[resolved.model_key for resolved in resolution.attempts], now=now
    )
    attempts = [
        _platform_attempt(request, fmt, body, caller, resolved, rates.get(resolved.model_key))
        for resolved in resolution.attempts
    ]
    try:
        exchange = await _admit_known(
            caller, fmt, body, attempts, request_id, started, now, resolution.request_id
        )
        return exchange, exchange.body
    except GatewayError as exc:
        first = next((a for a in attempts if a.refusal is None), attempts[-1])
        record = ledger.UsageRecord(
            request_id=request_id,
            user_id=caller.user_id,
            api_key_id=None,
            endpoint=fmt.endpoint,
            provider=first.provider_name,
            model=first.model,
            status=UsageLog.Status.ERROR,
            status_code=exc.status,
            error_message=exc.message,
            error_code=exc.code,
            latency_ms=int((time.perf_counter() - started) * 1000),
            reports=_refusal_reports(attempts, exc, resolution.request_id),
        )
        await holds.usage_record_async(record=record, now=timezone.now())
        metrics.request_closed(record)
        if isinstance(exc, BudgetExceeded):
            _refused_for_budget(caller)
        exc.headers.setdefault("X-Otari-Request-Id", str(request_id))
        raise


def _provider_failure(exc: httpx.HTTPError, exchange: Exchange) -> ProviderError:
    if isinstance(exc, httpx.TimeoutException):
        failure: ProviderError = ProviderTimeout()
    elif isinstance(exc, httpx.ConnectError):
        failure = ProviderUnreachable()
    else:
        failure = ProviderError()
    # No status: what went wrong on the wire, for the operator (httpx names the error;
    # its text can carry the URL, which redaction removes).
    detail = redact(f"{type(exc).__name__}: {exc}", secrets=exchange.provider.secrets())
    return failure.upstream(None, detail)


async def _provider_status_error(exchange: Exchange, response: httpx.Response) -> ProviderError:
    content = await response.aread()
    return exchange.provider.upstream_error(
        response.status_code, response.headers, content, echoes=exchange.prompt_texts
    )


async def _fail(exchange: Exchange, failure: GatewayError) -> HttpResponse | None:
    """An attempt failed before anything reached the client. Returns None when there is
    another attempt to try (platform mode); otherwise closes the request with a refund
    and returns the last failure's error response."""
    metrics.provider_error_observed(provider=exchange.attempt.provider_name, failure=failure)
    if isinstance(failure, ProviderError):
        # The cause, which the client is not shown: the provider's status and words.
        logger.warning(
            "request %s: provider %s failed: %s (upstream status %s: %s)",
            exchange.request_id,
            exchange.attempt.provider_name,
            failure.code,
            failure.upstream_status if failure.upstream_status is not None else "none",
            failure.upstream_detail or "no message",
        )
    if exchange.next_attempt(failure):
        logger.info(
            "request %s: attempt failed (%s), trying the next one",
            exchange.request_id,
            failure.code,
        )
        return None
    failure = exchange.final_failure
    await exchange.refund(failure)
    return _error(exchange, failure)


@dataclass(frozen=True, slots=True)
class _Answer:
    content: bytes  # in the client's API
    usage: TokenUsage | None
    output_chars: int


async def _upstream_request(
    exchange: Exchange, client: httpx.AsyncClient, *, stream: bool
) -> httpx.Request | ProviderError:
    """The current attempt's HTTP request, or why none could be made (no credentials).

    Counted as a started provider call either way: a failure to build the request ends
    like any other provider failure.
    """
    target = exchange.target
    metrics.provider_call_started()
    try:
        return await exchange.provider.upstream_request(
            client,
            target.route.upstream.name,
            target.body,
            target.headers,
            model=exchange.model,
            stream=stream,
        )
    except ProviderError as exc:
        return exc


async def _answer(exchange: Exchange, body: dict[str, Any]) -> _Answer | GatewayError:
    """Send the current attempt and read its whole answer, in the client's API; or
    the failure, before anything was charged or sent."""
    route = exchange.target.route
    client = upstream.client()
    request = await _upstream_request(exchange, client, stream=False)
    if isinstance(request, ProviderError):
        return request
    try:
        response = await client.send(request)
    except httpx.HTTPError as exc:
        return _provider_failure(exc, exchange)
    metrics.provider_call_ended()
    if response.status_code >= 400:
        return await _provider_status_error(exchange, response)
    try:
        parsed = json.loads(response.content)
        if not isinstance(parsed, dict):
            raise ValueError("not an object")
    except ValueError:
        return ProviderError("LLM provider error: the response was not valid JSON")
    content = response.content
    if route.translated:
        try:
            content = json.dumps(route.response_body(body, parsed, exchange.model)).encode()
        except TranslationError as exc:
            # Nothing reached the client: like any provider fault before the answer,
            # a full refund (the usage row says what could not be translated).
            return ProviderError(f"LLM provider error: the answer had {exc}")
    return _Answer(
        content=content,
        usage=route.upstream.usage_from_body(parsed),
        output_chars=route.upstream.output_chars_from_body(parsed),
    )


async def _complete(exchange: Exchange, body: dict[str, Any]) -> HttpResponse:
    """A non-streaming request: call (each attempt in turn, in platform mode), settle,
    answer."""
    while True:
        answer = await _answer(exchange, body)
        if isinstance(answer, _Answer):
            break
        failed = await _fail(exchange, answer)
        if failed is not None:
            return failed
    await exchange.settle_complete(answer.usage, answer.output_chars)
    content = answer.content
    result = HttpResponse(content, content_type="application/json")
    result["Content-Length"] = str(len(content))
    result["X-Otari-Request-Id"] = str(exchange.request_id)
    if exchange.charged_usd is not None:
        result["X-Otari-Cost-Usd"] = str(exchange.charged_usd)
    for name, value in _response_headers(exchange).items():
        result[name] = value
    return result


async def _stream_open(
    exchange: Exchange,
) -> tuple[httpx.Response, AsyncIterator[bytes], bytes] | GatewayError:
    """Open the current attempt's upstream stream and read its first bytes: the commit
    point. Returns the failure when anything goes wrong until then."""
    route = exchange.target.route
    client = upstream.client()
    request = await _upstream_request(exchange, client, stream=True)
    if isinstance(request, ProviderError):
        return request
    response: httpx.Response | None = None
    try:
        response = await client.send(request, stream=True)
        if response.status_code >= 400:
            failure = await _provider_status_error(exchange, response)
            await response.aclose()
            return failure
        chunks = exchange.provider.stream_chunks(response)
        first_chunk = await anext(chunks)
        first_events = EventSplitter().feed(first_chunk)
        if first_events and route.upstream.is_stream_error(first_events[0]):
            # A 200 whose stream opens with an error (OpenRouter and other servers report
            # failures so): nothing was generated, so it is a failure before the commit,
            # refunded (or, in platform mode, the next attempt's turn).
            await response.aclose()
            failure = ProviderError("LLM provider error: the stream began with an error")
            said = redact(
                provider_error_message(first_events[0].data)
                or first_events[0].data.decode("utf-8", "replace"),
                secrets=exchange.provider.secrets(),
            )
            return failure.upstream(response.status_code, said)
    except (httpx.HTTPError, StopAsyncIteration) as exc:
        if response is not None:
            await response.aclose()
        return (
            _provider_failure(exc, exchange)
            if isinstance(exc, httpx.HTTPError)
            else ProviderError("LLM provider error: the stream ended before any data")
        )
    except BaseException:
        # Cancelled while the stream was being opened (the client gave up): nothing was
        # delivered, so nothing is charged.
        if response is not None:
            await response.aclose()
        raise
    return response, chunks, first_chunk


async def _stream(exchange: Exchange, body: dict[str, Any]) -> HttpResponse:
    """A streaming request: open the upstream stream and wait for its first bytes before
    committing, so that anything failing until then is an ordinary HTTP error with a
    full refund (docs/SPEC.md §4), or, in platform mode, a move to the next attempt."""
    while True:
        opened = await _stream_open(exchange)
        if not isinstance(opened, GatewayError):
            break
        failed = await _fail(exchange, opened)
        if failed is not None:
            return failed
    response, chunks, first_chunk = opened
    result = EventStreamResponse(
        relay(
            exchange=exchange,
            upstream=response,
            chunks=chunks,
            first_chunk=first_chunk,
            codec=exchange.target.route.stream_codec(body, exchange.model),
            keepalive_s=settings.OTARI_STREAM_KEEPALIVE_SECONDS,
        ),
        content_type="text/event-stream",
    )
    result["Cache-Control"] = "no-cache"
    result["X-Accel-Buffering"] = "no"
    result["X-Otari-Request-Id"] = str(exchange.request_id)
    for name, value in _response_headers(exchange).items():
        result[name] = value
    return result


def _response_headers(exchange: Exchange) -> dict[str, str]:
    """The budget headers of an admitted request, and the output maximum admission set."""
    headers = budget.budget_headers(exchange.budget_state)
    if exchange.fitted_max_tokens is not None:
        headers["X-Otari-Max-Tokens"] = str(exchange.fitted_max_tokens)
    return headers


def _track(coro: Awaitable[Any]) -> asyncio.Task:
    """Run `coro` as a task that nothing cancels and the loop cannot garbage-collect."""
    task = asyncio.ensure_future(coro)
    _closing_tasks.add(task)
    task.add_done_callback(_closing_tasks.discard)
    return task


async def _release_abandoned(admission: asyncio.Task) -> None:
    """The client left during admission: once admission is done, release its hold."""
    try:
        exchange, _ = await admission
    except Exception:  # a refusal: already logged, nothing held
        return
    await exchange.refund(
        GatewayError("The client disconnected", status=STATUS_CLIENT_CLOSED),
        status=UsageLog.Status.CLIENT_DISCONNECTED,
    )


def _error(exchange: Exchange, exc: GatewayError) -> HttpResponse:
    return error_response(
        exc, exchange.fmt.error_style, headers={"X-Otari-Request-Id": str(exchange.request_id)}
    )


async def handle(request: HttpRequest, fmt: ApiFormat) -> HttpResponse:
    """Serve one generation request of API `fmt`."""
    request_id = bind_request(fmt.endpoint)
    started = time.perf_counter()
    embedded_beat_tick()
    # Admission runs shielded: a hold taken by a statement whose caller was cancelled
    # (client gone) must still be seen, and released.
    admission = _track(_admit(request, fmt, request_id, started))
    try:
        exchange, body = await asyncio.shield(admission)
    except GatewayError as exc:
        metrics.refusal_observed(exc)
        exc.headers.setdefault("X-Otari-Request-Id", str(request_id))
        return _with_overhead(error_response(exc, fmt.error_style))
    except asyncio.CancelledError:
        _track(_release_abandoned(admission))
        raise
    if settings.OTARI_LOG_PAYLOADS:
        log_payload("request", body)
    try:
        if body.get("stream") is True:
            response = await _stream(exchange, body)
        else:
            response = await _complete(exchange, body)
    except asyncio.CancelledError:
        # The client left before anything was sent: release the hold (a no-op when the
        # request had already been closed).
        await exchange.refund(
            GatewayError("The client disconnected", status=STATUS_CLIENT_CLOSED),
            status=UsageLog.Status.CLIENT_DISCONNECTED,
        )
        raise
    except Exception:
        logger.exception("request %s failed", request_id)
        failure = GatewayError("Internal error")
        await exchange.refund(failure)
        response = _error(exchange, failure)
    return _finish(exchange, response)


def _finish(exchange: Exchange, response: HttpResponse) -> HttpResponse:
    """Headers every generation response gets: X-RateLimit-* when the caller has limits,
    X-Otari-Overhead-Ms when the response is not a stream."""
    if exchange.rate is not None:
        for name, value in ratelimit.rate_headers(exchange.rate.windows).items():
            response[name] = value
    if not response.streaming:
        _with_overhead(response)
        if settings.OTARI_LOG_PAYLOADS:
            log_payload("response", response.content)
    return response


def _with_overhead(response: HttpResponse) -> HttpResponse:
    ctx = current_request()
    overhead = ctx.overhead_s() if ctx is not None else None
    if overhead is not None:
        response["X-Otari-Overhead-Ms"] = f"{overhead * 1000:.2f}"
    return response


async def list_models(request: HttpRequest) -> HttpResponse:
    """`GET /v1/models`: the priced models this caller may use, with their prices."""
    try:
        now = timezone.now()
        caller = await authenticate_listing(credential=credential_from_headers(request), now=now)
    except GatewayError as exc:
        return error_response(exc, "openai")
    allowed = caller.allowed_models if caller is not None else None
    data = [
        {
            "id": price.model_key,
            "object": "model",
            "created": int(price.effective_at.timestamp()),
            "owned_by": price.model_key.split(":", 1)[0],
            "pricing": {
                "input_price_per_million": float(price.input_price_per_mtok_usd),
                "output_price_per_million": float(price.output_price_per_mtok_usd),
            },
        }
        for price in await sync_to_async(prices_current)(now)
        if model_allowed(allowed, price.model_key)
    ]
    content = json.dumps({"object": "list", "data": data}).encode()
    response = HttpResponse(content, content_type="application/json")
    response["Content-Length"] = str(len(content))
    return response


async def count_tokens(request: HttpRequest) -> HttpResponse:
    """`POST /v1/messages/count_tokens`: a local estimate (MessagesFormat.count_tokens).

    No provider call, no hold, no charge, and no usage row: nothing was generated or
    billed, and counting is not a request the usage log should count. The caller must
    still hold a valid key that may use the model.
    """
    try:
        now = timezone.now()
        caller = await authenticate_listing(credential=credential_from_headers(request), now=now)
        body = _parse_body(request)
        selector = body.get("model")
        if not isinstance(selector, str) or not selector:
            raise BadRequest("model is required", code="invalid_model", param="model")
        provider, model = resolve_model(selector)
        MESSAGES.validate_prompt(body)
        if caller is not None:
            if caller.blocked:
                raise UserBlocked
            if not model_allowed(caller.allowed_models, f"{provider.name}:{model}"):
                raise ModelNotAllowed
    except GatewayError as exc:
        return error_response(exc, MESSAGES.error_style)
    content = json.dumps({"input_tokens": MESSAGES.count_tokens(body)}).encode()
    response = HttpResponse(content, content_type="application/json")
    response["Content-Length"] = str(len(content))
    return response
