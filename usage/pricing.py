"""Cost arithmetic: pure Decimal functions, and the only place that rounds money.

Prices are USD per million tokens. A row's cost is the sum over its meters (input,
output, cache read, cache write) of tokens x rate / 1e6, rounded half-up once, to the
micro-dollar (docs/SPEC.md §3.1, §5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal, localcontext

MICRO_USD = Decimal("0.000001")
_PER_MILLION = Decimal(1_000_000)
# Token counts (up to ~1e9) times rates with ten places and twelve integer digits need
# more than Decimal's default 28 significant digits to stay exact before the one rounding.
_EXACT = Context(prec=60)


@dataclass(frozen=True, slots=True)
class Rates:
    """One price version's rates, USD per million tokens; null cache rates = input rate."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cache_read_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None

    @property
    def is_free(self) -> bool:
        return not self.input_per_mtok and not self.output_per_mtok


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """What a request consumed, normalised across APIs.

    `input_tokens` are the prompt tokens billed at the input rate, i.e. without cache
    reads and writes. OpenAI reports cached tokens inside `prompt_tokens` and Anthropic
    beside `input_tokens`; the parsers in llm_proxy normalise both to this shape.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens


def round_usd(amount: Decimal) -> Decimal:
    """Round half-up to the micro-dollar."""
    return amount.quantize(MICRO_USD, rounding=ROUND_HALF_UP)


def cost_usd(usage: TokenUsage, rates: Rates) -> Decimal:
    """The cost of `usage` at `rates`, rounded once."""
    cache_read_rate = rates.cache_read_per_mtok
    cache_write_rate = rates.cache_write_per_mtok
    with localcontext(_EXACT):
        total = (
            usage.input_tokens * rates.input_per_mtok
            + usage.output_tokens * rates.output_per_mtok
            + usage.cache_read_tokens
            * (rates.input_per_mtok if cache_read_rate is None else cache_read_rate)
            + usage.cache_write_tokens
            * (rates.input_per_mtok if cache_write_rate is None else cache_write_rate)
        ) / _PER_MILLION
        return round_usd(total)


def prompt_tokens_from_chars(prompt_chars: int) -> int:
    """The admission-time token estimate: one token per four characters, rounded up."""
    return math.ceil(prompt_chars / 4)


def estimate_usd(*, prompt_chars: int, max_output_tokens: int, rates: Rates) -> Decimal:
    """The hold for a request (docs/SPEC.md §3.3): ceil(chars/4) x input + max_output x output."""
    return cost_usd(
        TokenUsage(
            input_tokens=prompt_tokens_from_chars(prompt_chars), output_tokens=max_output_tokens
        ),
        rates,
    )


def output_tokens_within(amount_usd: Decimal, *, prompt_chars: int, rates: Rates) -> int | None:
    """The most output tokens whose estimate (with this prompt) is at most `amount_usd`:
    the inverse of `estimate_usd`. None when output is free (no amount limits it); 0 when
    the prompt alone costs more."""
    if not rates.output_per_mtok:
        return None
    with localcontext(_EXACT):
        prompt = prompt_tokens_from_chars(prompt_chars) * rates.input_per_mtok / _PER_MILLION
        # The estimate is rounded half-up once: it stays within the amount while the exact
        # total is below the amount plus half a micro-dollar.
        room = (amount_usd + MICRO_USD / 2 - prompt) * _PER_MILLION / rates.output_per_mtok
        tokens = max(0, math.ceil(room) - 1)
    while (
        tokens
        and estimate_usd(prompt_chars=prompt_chars, max_output_tokens=tokens, rates=rates)
        > amount_usd
    ):
        tokens -= 1
    return tokens
