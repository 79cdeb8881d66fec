"""A routing policy's spec, parsed and validated (docs/ROUTING.md; otari's docs/routing.md).

```yaml
select:                                   # evaluated in order; the first that applies wins
  - when: {budget_used_pct: {gte: 80}}    # every condition present must match
    target: openai:gpt-4o-mini
  - router: weighted                      # a per-request draw, in proportion to the weights
    candidates: [openai:gpt-4o, anthropic:claude-sonnet-4-5]
    weights: {openai:gpt-4o: 3, anthropic:claude-sonnet-4-5: 1}
  - default: openai:gpt-4o                # the fallthrough: required, and last
on_failure: [anthropic:claude-haiku-4-5]  # tried, in order, after a failure
```

A spec that cannot work is refused, with a message that says why (`SpecError`), when it
is saved or at startup: a wrong or unknown target, an entry after `default` or none, a
`budget_used_pct` gte/gt threshold of 100 or more (the budget gate refuses the request
before selection, so such a rule could never fire), an empty or single candidate list,
weights that name a non-candidate, are negative or are all zero, and any unknown key (so
a typo is refused rather than a condition that silently never matches).

The rules are otari's (src/gateway/models/routing.py), including its cap of 5 candidates
per policy (the selected entry's, a router's whole pool, plus on_failure) and its refusal
of the default target repeated in on_failure. An alias is a Policy whose select is one
`default` (`alias_policy`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from common.config import gateway_config
from llm_proxy.models import NAME_MAX_LENGTH

# otari's cap: a longer chain is refused rather than silently truncated.
MAX_CANDIDATES = 5
WEIGHTED = "weighted"
_COMPARATORS = ("gte", "gt", "lte", "lt")
_SYMBOLS = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}
_CONDITIONS = ("budget_used_pct", "budget_remaining_usd", "user_id", "key_id")
_ENTRY_KEYS = frozenset({"when", "target", "default", "router", "candidates", "weights"})
_SPEC_KEYS = frozenset({"select", "on_failure"})

Source = Literal["config", "stored"]

# Set while reading a stored row back (`providers_unchecked`): it was valid when saved,
# and a provider removed from the configuration since must not make the whole policy
# unreadable. plan() drops such a target instead, with the reason.
_providers_unchecked: ContextVar[bool] = ContextVar("providers_unchecked", default=False)


@contextmanager
def providers_unchecked() -> Iterator[None]:
    token = _providers_unchecked.set(True)
    try:
        yield
    finally:
        _providers_unchecked.reset(token)


class SpecError(ValueError):
    """A policy, alias or name that cannot work; `message` says why (the API's 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Threshold:
    """One comparison, e.g. `{gte: 80}`."""

    op: str  # gte | gt | lte | lt
    value: Decimal

    def matches(self, observed: Decimal) -> bool:
        if self.op == "gte":
            return observed >= self.value
        if self.op == "gt":
            return observed > self.value
        if self.op == "lte":
            return observed <= self.value
        return observed < self.value

    def describe(self) -> str:
        return f"{_SYMBOLS[self.op]} {self.value}"


@dataclass(frozen=True, slots=True)
class When:
    """The conditions of one entry; all that are present must match."""

    budget_used_pct: Threshold | None = None
    budget_remaining_usd: Threshold | None = None
    user_id: tuple[str, ...] | None = None
    key_id: tuple[str, ...] | None = None

    def conditions(self) -> list[str]:
        return [name for name in _CONDITIONS if getattr(self, name) is not None]


@dataclass(frozen=True, slots=True)
class Entry:
    """One `select` entry: a conditional target, a weighted router, or the default."""

    kind: Literal["when", "router", "default"]
    target: str = ""  # when / default
    when: When | None = None
    router: str = ""
    # A router's pool, the policy's default appended when the spec left it out (otari:
    # what serves when the router cannot is one of the models it could have picked).
    candidates: tuple[str, ...] = ()
    weights: Mapping[str, Decimal] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed, valid policy (or alias). `spec` is its normalised JSON, as stored."""

    name: str
    select: tuple[Entry, ...]
    on_failure: tuple[str, ...] = ()
    user_id: str = ""  # "" = global
    source: Source = "stored"
    kind: Literal["policy", "alias"] = "policy"
    spec: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def default_target(self) -> str:
        return self.select[-1].target

    @property
    def is_dynamic(self) -> bool:
        """Whether the selected target depends on the request (a condition or a router)."""
        return any(entry.kind != "default" for entry in self.select)

    def targets(self) -> list[str]:
        """Every target the policy can send to, in plan order, each once."""
        ordered: list[str] = []
        for entry in self.select:
            for target in (*entry.candidates, entry.target):
                if target and target not in ordered:
                    ordered.append(target)
        ordered += [t for t in self.on_failure if t not in ordered]
        return ordered


# --- names -----------------------------------------------------------------------------------


def check_name(name: Any, *, kind: str = "routing policy") -> str:
    """A policy or alias name: what callers send as `model`.

    No ':' or '/', so a `provider:model` selector can never be a routing name (the
    request path asks routing only about names without them, at no cost to the others);
    not a configured provider's name, which would read as ambiguous (otari refuses it).
    """
    if not isinstance(name, str) or not name.strip():
        raise SpecError(f"{kind} name must be a non-empty string")
    if name != name.strip():
        raise SpecError(f"{kind} name '{name}' must not start or end with whitespace")
    if len(name) > NAME_MAX_LENGTH:
        raise SpecError(f"{kind} name is longer than {NAME_MAX_LENGTH} characters")
    if ":" in name or "/" in name:
        raise SpecError(
            f"{kind} name '{name}' must not contain ':' or '/' "
            "(it would shadow a real provider:model selector)"
        )
    if name in gateway_config().providers:
        raise SpecError(f"{kind} name '{name}' collides with a configured provider's name")
    return name


def check_target(target: Any, *, where: str) -> str:
    """A target is `provider:model` with a configured provider: no chaining to another
    alias or policy, and no provider a request could never reach."""
    if not isinstance(target, str) or ":" not in target:
        raise SpecError(f"{where}: target {target!r} must be of the form 'provider:model'")
    provider, _, model = target.partition(":")
    if not provider or not model.strip():
        raise SpecError(f"{where}: target {target!r} must be of the form 'provider:model'")
    providers = gateway_config().providers
    if provider not in providers and not _providers_unchecked.get():
        configured = ", ".join(sorted(providers)) or "none"
        raise SpecError(
            f"{where}: target '{target}' names provider '{provider}', which is not configured "
            f"(configured: {configured})"
        )
    return target


# --- the spec ----------------------------------------------------------------------------------


def _number(raw: Any, where: str) -> Decimal:
    # YAML and JSON numbers arrive as int/float: through their shortest text form (80.5
    # stays 80.5); a bool is a YAML accident, not a number.
    if isinstance(raw, bool) or not isinstance(raw, int | float | Decimal | str):
        raise SpecError(f"{where} must be a number, not {raw!r}")
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise SpecError(f"{where} must be a number, not {raw!r}") from None
    if not value.is_finite():
        raise SpecError(f"{where} must be a finite number")
    return value


def _threshold(raw: Any, where: str) -> Threshold:
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a comparison such as {{gte: 80}}")
    unknown = sorted(set(raw) - set(_COMPARATORS), key=str)
    if unknown:
        raise SpecError(
            f"{where}: unknown comparison {unknown[0]!r} (use one of {', '.join(_COMPARATORS)})"
        )
    if len(raw) != 1:
        raise SpecError(f"{where} needs exactly one of {', '.join(_COMPARATORS)}; got {len(raw)}")
    ((op, value),) = raw.items()
    return Threshold(op=op, value=_number(value, f"{where}.{op}"))


def _ids(raw: Any, where: str) -> tuple[str, ...]:
    values = [raw] if isinstance(raw, str) else raw
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, str) and v for v in values)
    ):
        raise SpecError(f"{where} must be a non-empty string or a non-empty list of strings")
    return tuple(values)


def _when(raw: Any, where: str) -> When:
    if not isinstance(raw, dict) or not raw:
        raise SpecError(
            f"{where} needs at least one condition ({', '.join(_CONDITIONS)}); "
            "use `default` for an unconditional entry"
        )
    unknown = sorted(set(raw) - set(_CONDITIONS), key=str)
    if unknown:
        raise SpecError(
            f"{where}: unknown condition {unknown[0]!r} (conditions: {', '.join(_CONDITIONS)})"
        )
    used = raw.get("budget_used_pct")
    when = When(
        budget_used_pct=_threshold(used, f"{where}.budget_used_pct") if used is not None else None,
        budget_remaining_usd=(
            _threshold(raw["budget_remaining_usd"], f"{where}.budget_remaining_usd")
            if raw.get("budget_remaining_usd") is not None
            else None
        ),
        user_id=_ids(raw["user_id"], f"{where}.user_id") if "user_id" in raw else None,
        key_id=_ids(raw["key_id"], f"{where}.key_id") if "key_id" in raw else None,
    )
    if not when.conditions():
        raise SpecError(f"{where} needs at least one condition ({', '.join(_CONDITIONS)})")
    pct = when.budget_used_pct
    if pct is not None and pct.op in ("gte", "gt") and pct.value >= 100:
        raise SpecError(
            f"{where}.budget_used_pct {pct.describe()} can never match: the budget gate "
            "refuses a request once the cap is reached, before selection. Tiering down keeps "
            "a caller under a budget; use a threshold below 100 (e.g. {gte: 80})"
        )
    return when


def _entry(raw: Any, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping")
    unknown = sorted(set(raw) - _ENTRY_KEYS, key=str)
    if unknown:
        raise SpecError(
            f"{where}: unknown key {unknown[0]!r} (an entry has when+target, "
            "router+candidates+weights, or default)"
        )
    chosen = [key for key in ("target", "default", "router") if key in raw]
    if len(chosen) != 1:
        raise SpecError(
            f"{where} needs exactly one of target, default, router; got "
            f"{', '.join(chosen) or 'none'}"
        )
    kind = chosen[0]
    if kind != "router" and ("candidates" in raw or "weights" in raw):
        raise SpecError(f"{where}: `candidates` and `weights` belong to a `router` entry only")
    if kind == "target":
        if "when" not in raw:
            raise SpecError(f"{where}: a `target` entry needs a `when` (or use `default`)")
        return Entry(
            kind="when",
            target=check_target(raw["target"], where=f"{where}.target"),
            when=_when(raw["when"], f"{where}.when"),
        )
    if "when" in raw:
        raise SpecError(
            f"{where}: a `{kind}` entry cannot carry a `when` "
            + (
                "(it is the fallthrough)"
                if kind == "default"
                else "(the router orders the whole pool)"
            )
        )
    if kind == "default":
        return Entry(kind="default", target=check_target(raw["default"], where=f"{where}.default"))
    if raw["router"] != WEIGHTED:
        raise SpecError(
            f"{where}: unknown router {raw['router']!r} (this gateway has '{WEIGHTED}')"
        )
    candidates = raw.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        raise SpecError(f"{where}: a router entry needs a non-empty `candidates` list")
    if len(candidates) < 2:
        raise SpecError(
            f"{where}: a router entry needs at least 2 candidates "
            "(ordering a single model is not a routing decision)"
        )
    pool = [check_target(c, where=f"{where}.candidates") for c in candidates]
    if len(set(pool)) != len(pool):
        raise SpecError(f"{where}: a candidate is listed twice")
    weights_raw = raw.get("weights")
    if not isinstance(weights_raw, dict) or not weights_raw:
        raise SpecError(
            f"{where}: a `router: {WEIGHTED}` entry needs `weights` (for an even split, give "
            "every candidate the same number, e.g. {a: 1, b: 1})"
        )
    weights = {str(k): _number(v, f"{where}.weights.{k}") for k, v in weights_raw.items()}
    for target, weight in weights.items():
        if weight < 0:
            raise SpecError(f"{where}.weights.{target} must not be negative; got {weight}")
    if not any(weight > 0 for weight in weights.values()):
        raise SpecError(
            f"{where}: every weight is 0, so the router could never select anything; "
            "give at least one candidate a positive weight"
        )
    return Entry(kind="router", router=WEIGHTED, candidates=tuple(pool), weights=weights)


def parse_policy(name: str, raw: Any, *, user_id: str = "", source: Source = "stored") -> Policy:
    """`raw` (a spec's JSON/YAML) as a valid Policy, or SpecError saying why not."""
    check_name(name)
    if not isinstance(raw, dict):
        raise SpecError("a routing policy spec must be a mapping with `select`")
    unknown = sorted(set(raw) - _SPEC_KEYS, key=str)
    if unknown:
        raise SpecError(f"unknown key {unknown[0]!r} (a spec has select and on_failure)")
    select_raw = raw.get("select")
    if not isinstance(select_raw, list) or not select_raw:
        raise SpecError("select must be a non-empty list ending with a `default` entry")
    entries: list[Entry] = []
    for index, item in enumerate(select_raw):
        if entries and entries[-1].kind == "default":
            raise SpecError(
                f"select[{index}] comes after the `default` entry, so it could never be "
                "reached: `default` is the fallthrough and must come last"
            )
        entries.append(_entry(item, f"select[{index}]"))
    if entries[-1].kind != "default":
        raise SpecError("select needs a final `default` entry (the fallthrough)")
    if sum(entry.kind == "router" for entry in entries) > 1:
        raise SpecError("select may have one router entry")
    default = entries[-1].target
    declared = list(entries)  # as written: the stored spec keeps the declared pool
    for index, entry in enumerate(entries):
        if entry.kind != "router":
            continue
        pool = entry.candidates if default in entry.candidates else (*entry.candidates, default)
        stray = [t for t in entry.weights if t not in pool]
        if stray:
            raise SpecError(
                f"select[{index}].weights names {stray[0]!r}, which is not a candidate "
                f"(candidates: {', '.join(pool)})"
            )
        entries[index] = Entry(
            kind="router", router=entry.router, candidates=pool, weights=entry.weights
        )
    on_failure_raw = raw.get("on_failure") or []
    if not isinstance(on_failure_raw, list):
        raise SpecError("on_failure must be a list of targets")
    on_failure = [check_target(t, where=f"on_failure[{i}]") for i, t in enumerate(on_failure_raw)]
    if len(set(on_failure)) != len(on_failure):
        raise SpecError("on_failure lists a target twice")
    if default in on_failure:
        raise SpecError(
            f"'{default}' is both the default target and in on_failure: retrying the target "
            "that just failed cannot help"
        )
    routers = [e for e in entries if e.kind == "router"]
    total = (len(routers[0].candidates) if routers else 1) + len(on_failure)
    if total > MAX_CANDIDATES:
        raise SpecError(
            f"a policy may have at most {MAX_CANDIDATES} candidates (the selected entry's, a "
            f"router's whole pool, plus on_failure); this one has {total}"
        )
    return Policy(
        name=name,
        select=tuple(entries),
        on_failure=tuple(on_failure),
        user_id=user_id,
        source=source,
        spec=_normalised(declared, on_failure),
    )


def alias_policy(name: str, target: Any, *, user_id: str = "", source: Source = "stored") -> Policy:
    """An alias: the policy `{select: [{default: target}]}`."""
    check_name(name, kind="alias")
    target = check_target(target, where=f"alias '{name}'")
    return Policy(
        name=name,
        select=(Entry(kind="default", target=target),),
        user_id=user_id,
        source=source,
        kind="alias",
        spec=_normalised([Entry(kind="default", target=target)], []),
    )


def _json_number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def _normalised(entries: Iterable[Entry], on_failure: list[str]) -> dict[str, Any]:
    """The spec as stored and listed: key order stable, numbers plain JSON."""
    select: list[dict[str, Any]] = []
    for entry in entries:
        if entry.kind == "default":
            select.append({"default": entry.target})
        elif entry.kind == "router":
            select.append(
                {
                    "router": entry.router,
                    "candidates": list(entry.candidates),
                    "weights": {t: _json_number(w) for t, w in entry.weights.items()},
                }
            )
        elif entry.when is not None:
            when: dict[str, Any] = {}
            for name in _CONDITIONS:
                value = getattr(entry.when, name)
                if isinstance(value, Threshold):
                    when[name] = {value.op: _json_number(value.value)}
                elif value is not None:
                    when[name] = value[0] if len(value) == 1 else list(value)
            select.append({"when": when, "target": entry.target})
    return {"select": select, "on_failure": list(on_failure)}
