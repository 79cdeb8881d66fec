"""What the caller's budget allows a request: the output maximum that fits what is left,
the refusal that says why and how to fix it, and the X-Otari-Budget-* headers.

All of it reads; the hold itself is taken (and re-checked under the row lock) by
budgets.services. See docs/ARCHITECTURE.md, "Fitting a request to the budget".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.conf import settings

from budgets.exceptions import BudgetExceeded
from budgets.services.holds import BudgetState
from usage.pricing import estimate_usd, output_tokens_within

if TYPE_CHECKING:
    from budgets.selectors import Caller
    from llm_proxy.formats.base import ApiFormat
    from usage.pricing import Rates


def money(amount: Decimal) -> str:
    """Exact, without the column's trailing zeros ("9.999973", not "9.9999730000")."""
    return f"{amount.normalize():f}"


def budget_headers(state: BudgetState | None) -> dict[str, str]:
    if state is None or state.limit_usd is None:
        return {}
    headers = {"X-Otari-Budget-Remaining-Usd": money(state.remaining_usd)}
    if state.next_reset_at is not None:
        headers["X-Otari-Budget-Reset-At"] = state.next_reset_at.isoformat()
    return headers


def loaded_state(caller: Caller, limit: Decimal | None, now: datetime) -> BudgetState | None:
    """The caller's money as loaded with it; a window that has ended counts from zero,
    as admission will count it once the period rolls."""
    if limit is None:
        return None
    due = caller.next_budget_reset_at is not None and caller.next_budget_reset_at <= now
    return BudgetState(
        spend_usd=Decimal(0) if due else caller.spend_usd,
        reserved_usd=caller.reserved_usd,
        limit_usd=limit,
        next_reset_at=caller.next_budget_reset_at,
    )


@dataclass(frozen=True, slots=True)
class Ask:
    """What a request asks of the budget: its prompt, its output maximum, and the
    prices of the attempts that may serve it (the hold covers the dearest)."""

    fmt: ApiFormat
    prompt_chars: int
    max_output_tokens: int
    priced: list[Rates]

    def estimate_usd(self, max_output_tokens: int | None = None) -> Decimal:
        tokens = self.max_output_tokens if max_output_tokens is None else max_output_tokens
        return max(
            (
                estimate_usd(prompt_chars=self.prompt_chars, max_output_tokens=tokens, rates=r)
                for r in self.priced
            ),
            default=Decimal(0),
        )

    def tokens_within(self, amount_usd: Decimal) -> int | None:
        """The largest output maximum `amount_usd` pays for at every attempt's price
        (None: output is free everywhere)."""
        fits = [
            tokens
            for rates in self.priced
            if (
                tokens := output_tokens_within(
                    amount_usd, prompt_chars=self.prompt_chars, rates=rates
                )
            )
            is not None
        ]
        return min(fits, default=None)


def fit_max_output(ask: Ask, body: dict[str, Any], state: BudgetState | None) -> int | None:
    """The output maximum to send instead of the default, or None to send the request as
    it is. Only for a request that set no maximum of its own, when the default does not
    fit what is left; raises the explained refusal when not even the configured floor
    of output tokens fits."""
    if (
        not settings.OTARI_FIT_MAX_TOKENS
        or state is None
        or state.limit_usd is None
        or not ask.fmt.max_output_fields
        or ask.fmt.max_output_tokens(body) is not None
    ):
        return None
    left = state.remaining_usd
    if ask.estimate_usd() <= left:
        return None
    fits = ask.tokens_within(left)
    if fits is None or fits >= ask.max_output_tokens:
        return None
    if fits < settings.OTARI_FIT_MIN_OUTPUT_TOKENS:
        raise explain(BudgetExceeded(state=state, needed_usd=ask.estimate_usd()), ask)
    return fits


def explain(exc: BudgetExceeded, ask: Ask) -> BudgetExceeded:
    """The refusal with what is left, what the request needed, and the fix, and the
    X-Otari-Budget-* headers; unchanged when the refusal carries no state."""
    state = exc.state
    if state is None or state.limit_usd is None:
        return exc
    left = state.remaining_usd
    level = f"{exc.level} budget" if exc.level else "Budget"
    parts = [f"{level} exceeded: ${money(left)} left of ${money(state.limit_usd)}"]
    if state.reserved_usd:
        parts.append(f" (${money(state.reserved_usd)} held by requests in flight)")
    needed = exc.needed_usd if exc.needed_usd is not None else ask.estimate_usd()
    if left > 0 and needed:
        parts.append(
            f"; this request needs up to ${money(needed)} "
            f"({ask.max_output_tokens} output tokens at most)"
        )
        fits = ask.tokens_within(left)
        if fits:
            fields = " or ".join(ask.fmt.max_output_fields)
            parts.append(f". Set {fields} to {fits} or less")
        else:
            parts.append(". The prompt alone costs more than what is left")
    if state.next_reset_at is not None:
        parts.append(f". The {level.lower()} resets at {state.next_reset_at.isoformat()}")
    exc.message = "".join(parts) + "."
    exc.args = (exc.message,)
    exc.headers.update(budget_headers(state))
    return exc
