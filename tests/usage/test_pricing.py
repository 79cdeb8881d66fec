"""Cost arithmetic: exact Decimal, one half-up rounding per row, to the micro-dollar."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usage.pricing import Rates, TokenUsage, cost_usd, estimate_usd, output_tokens_within

RATES = Rates(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))


def test_cost_sums_the_meters_and_rounds_once():
    # 7 x 0.15 + 3 x 0.60 = 2.85 per million = 0.00000285 -> 0.000003 (half-up, once).
    assert cost_usd(TokenUsage(input_tokens=7, output_tokens=3), RATES) == Decimal("0.000003")
    # 4 x 0.15 + 1 x 0.60 = 1.2 millionths -> 0.000001; rounding each meter first would
    # give 0.000001 + 0.000001 = 0.000002.
    assert cost_usd(TokenUsage(input_tokens=4, output_tokens=1), RATES) == Decimal("0.000001")
    assert cost_usd(TokenUsage(input_tokens=3), RATES) == Decimal("0.000000")


@pytest.mark.parametrize(
    ("millionths", "expected"),
    [("0.4999999", "0.000000"), ("0.5", "0.000001"), ("1.5", "0.000002"), ("2.5", "0.000003")],
)
def test_half_up_at_the_micro_dollar(millionths, expected):
    rates = Rates(input_per_mtok=Decimal(millionths), output_per_mtok=Decimal(0))
    assert cost_usd(TokenUsage(input_tokens=1), rates) == Decimal(expected)


def test_cache_tokens_at_their_own_rates_or_the_input_rate():
    usage = TokenUsage(
        input_tokens=1000, output_tokens=0, cache_read_tokens=2000, cache_write_tokens=4000
    )
    priced = Rates(
        input_per_mtok=Decimal("3"),
        output_per_mtok=Decimal("15"),
        cache_read_per_mtok=Decimal("0.30"),
        cache_write_per_mtok=Decimal("3.75"),
    )
    assert cost_usd(usage, priced) == Decimal("0.003000") + Decimal("0.000600") + Decimal(
        "0.015000"
    )
    fallback = Rates(input_per_mtok=Decimal("3"), output_per_mtok=Decimal("15"))
    assert cost_usd(usage, fallback) == Decimal("0.021000")
    assert usage.prompt_tokens == 7000
    assert usage.total_tokens == 7000


def test_large_amounts_stay_exact():
    rates = Rates(input_per_mtok=Decimal("999999999999.9999999999"), output_per_mtok=Decimal(0))
    # 999999999999999.9999999 before the one rounding to six places.
    assert cost_usd(TokenUsage(input_tokens=1_000_000_000), rates) == Decimal(
        "1000000000000000.000000"
    )
    exact = Rates(input_per_mtok=Decimal("0.0000001234"), output_per_mtok=Decimal(0))
    assert cost_usd(TokenUsage(input_tokens=999_999_999), exact) == Decimal("0.000123")


def test_estimate_is_prompt_chars_over_four_plus_max_output():
    # ceil(27 / 4) = 7 input tokens, 1024 output tokens.
    assert estimate_usd(prompt_chars=27, max_output_tokens=1024, rates=RATES) == Decimal("0.000615")
    assert estimate_usd(prompt_chars=0, max_output_tokens=0, rates=RATES) == Decimal(0)


_RATES = st.decimals(min_value=0, max_value=100, places=4, allow_nan=False)


@given(
    amount=st.decimals(min_value=0, max_value=50, places=6, allow_nan=False),
    prompt_chars=st.integers(min_value=0, max_value=400_000),
    input_rate=_RATES,
    output_rate=_RATES.filter(bool),
)
def test_output_tokens_within_is_the_largest_maximum_the_amount_pays_for(
    amount, prompt_chars, input_rate, output_rate
):
    rates = Rates(input_per_mtok=input_rate, output_per_mtok=output_rate)
    tokens = output_tokens_within(amount, prompt_chars=prompt_chars, rates=rates)

    def estimate(n: int) -> Decimal:
        return estimate_usd(prompt_chars=prompt_chars, max_output_tokens=n, rates=rates)

    assert estimate(tokens + 1) > amount
    assert tokens == 0 or estimate(tokens) <= amount


def test_free_output_is_not_limited_by_money():
    rates = Rates(input_per_mtok=Decimal("1"), output_per_mtok=Decimal("0"))
    assert output_tokens_within(Decimal("0.001"), prompt_chars=10, rates=rates) is None
