"""Budgets, the users they cap, their API keys, and the reservation ledger.

Schema and tiny derived properties only; every write goes through budgets/services/.
Money columns are `MoneyField` (Decimal, docs/SPEC.md §3.1) and the database itself refuses
negative amounts.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from budgets import rules
from common.audit import Channel
from common.fields import MoneyField
from common.history import AuditedHistory
from common.money import format_usd


def _new_id() -> str:
    return str(uuid.uuid4())


# Percent of the limit at which a budget alerts, unless configured otherwise.
DEFAULT_ALERT_THRESHOLDS_PCT = (80, 100)


def default_alert_thresholds() -> list[int]:
    return list(DEFAULT_ALERT_THRESHOLDS_PCT)


# Rate limits (rpm_limit, tpm_limit on users and keys) are null (unlimited) or a whole
# number from 1 to these. Far above any real capacity, so a value past them is a typo;
# and they keep every count the limiter keeps exact in Redis's Lua (doubles: 2**53).
MAX_RPM_LIMIT = 1_000_000_000
MAX_TPM_LIMIT = 1_000_000_000_000


class ResetAlignment(models.TextChoices):
    CALENDAR_DAY = "calendar_day", "Calendar day (UTC)"
    CALENDAR_WEEK = "calendar_week", "Calendar week (UTC, from Monday)"
    CALENDAR_MONTH = "calendar_month", "Calendar month (UTC)"


class Budget(models.Model):
    """A spending cap and its period. Shared by several users, it caps each separately."""

    budget_id = models.CharField(primary_key=True, max_length=64, default=_new_id)
    name = models.CharField(max_length=200, blank=True, default="")
    # Null: uncapped, spend is tracked only.
    max_budget_usd = MoneyField(null=True, blank=True)
    budget_duration_sec = models.PositiveBigIntegerField(null=True, blank=True)
    # Null (not ""): the check constraint below tests for "no alignment" with IS NULL.
    reset_alignment = models.CharField(  # noqa: DJ001
        max_length=20, choices=ResetAlignment.choices, null=True, blank=True
    )
    # Alerts (docs/OPERATIONS.md): percent-of-limit thresholds, each reported once per user
    # and period to the webhook and/or the email recipients. No target: no alerts.
    alert_thresholds_pct = models.JSONField(default=default_alert_thresholds, blank=True)
    alert_webhook_url = models.URLField(max_length=2000, blank=True, default="")
    alert_emails = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Every version of its settings (otari/history.py).
    history = AuditedHistory(excluded_fields=["updated_at"])

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(max_budget_usd__isnull=True)
                | Q(max_budget_usd__gte=0, max_budget_usd__lte=settings.MONEY_MAX_USD),
                name="budget_max_budget_in_range",
            ),
            models.CheckConstraint(
                condition=Q(budget_duration_sec__isnull=True) | Q(budget_duration_sec__gt=0),
                name="budget_duration_positive",
            ),
            models.CheckConstraint(
                condition=Q(budget_duration_sec__isnull=True) | Q(reset_alignment__isnull=True),
                name="budget_one_kind_of_period",
            ),
        ]

    def __str__(self) -> str:
        # A budget without a name still reads as something a person can tell apart:
        # its limit and the start of its id ("Unnamed $25.00 budget · 3f2a9c1e").
        if self.name:
            return self.name
        limit = "uncapped" if self.max_budget_usd is None else format_usd(self.max_budget_usd)
        return f"Unnamed {limit} budget · {self.budget_id[:8]}"

    @property
    def has_period(self) -> bool:
        return bool(self.budget_duration_sec) or bool(self.reset_alignment)

    @property
    def alerts_enabled(self) -> bool:
        return rules.alerts_enabled(
            self.alert_thresholds_pct, self.alert_webhook_url, self.alert_emails
        )


class BudgetAccount(models.Model):
    """What a request's money is held against: a user, or a ceiling. Both keep their
    window's money in the same columns, under the same rules (budgets.rules), moved by the
    same statements (budgets.services.holds): `spend` is this period's settled cost,
    `reserved` its open holds, and a live top-up raises the limit by `topup_usd` until
    `topup_expires_at`."""

    spend_usd = MoneyField()
    reserved_usd = MoneyField()
    lifetime_spend_usd = MoneyField()
    budget_started_at = models.DateTimeField(null=True, blank=True)
    next_budget_reset_at = models.DateTimeField(null=True, blank=True)
    topup_usd = MoneyField()
    topup_expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True

    @staticmethod
    def money_constraints(prefix: str) -> list[models.BaseConstraint]:
        """The database's own refusal of impossible money, named `<prefix>_...`."""
        return [
            models.CheckConstraint(
                condition=Q(spend_usd__gte=0), name=f"{prefix}_spend_nonnegative"
            ),
            models.CheckConstraint(
                condition=Q(reserved_usd__gte=0), name=f"{prefix}_reserved_nonnegative"
            ),
            models.CheckConstraint(
                condition=Q(lifetime_spend_usd__gte=0),
                name=f"{prefix}_lifetime_spend_nonnegative",
            ),
            models.CheckConstraint(
                condition=Q(topup_usd__gte=0, topup_usd__lte=settings.MONEY_MAX_USD),
                name=f"{prefix}_topup_in_range",
            ),
        ]

    @staticmethod
    def due_reset_index(prefix: str) -> models.Index:
        """The reset sweep looks for due windows."""
        return models.Index(
            fields=["next_budget_reset_at"],
            condition=Q(next_budget_reset_at__isnull=False),
            name=f"{prefix}_due_reset_idx",
        )


class GatewayUser(BudgetAccount):
    """Who is billed."""

    user_id = models.CharField(primary_key=True, max_length=255)
    alias = models.CharField(max_length=255, blank=True, default="")
    budget = models.ForeignKey(
        Budget, on_delete=models.PROTECT, null=True, blank=True, related_name="users"
    )
    blocked = models.BooleanField(default=False)
    # Null: any model; []: none; entries "provider:model" or "provider:*".
    allowed_models = models.JSONField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)

    # Rate limits (llm_proxy/ratelimit.py), per window of OTARI_RATELIMIT_WINDOW_SECONDS
    # (a minute): null = unlimited, else 1..MAX_RPM_LIMIT / MAX_TPM_LIMIT (checked by
    # budgets.services; to stop a user, block them). A key's own limits apply on top.
    rpm_limit = models.PositiveIntegerField(null=True, blank=True)
    tpm_limit = models.PositiveBigIntegerField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    # Every version of the user's settings (otari/history.py). Money the gateway moves on
    # every request, and the period's clock, are not settings: not versioned.
    history = AuditedHistory(
        excluded_fields=[
            "spend_usd",
            "reserved_usd",
            "lifetime_spend_usd",
            "budget_started_at",
            "next_budget_reset_at",
            "updated_at",
        ]
    )

    class Meta:
        ordering = ["created_at"]
        verbose_name = "user"
        constraints = BudgetAccount.money_constraints("user")
        indexes = [BudgetAccount.due_reset_index("user")]

    def __str__(self) -> str:
        return self.alias or self.user_id

    @property
    def is_deleted(self) -> bool:
        return self.deleted_at is not None


class Hold(models.Model):
    """One request's reservation: taken before the provider call, closed exactly once.

    open -> settled | refunded | expired, and expired -> settled for a request that
    finished after the sweeper released its hold (its cost is still charged).
    """

    class Status(models.TextChoices):
        OPEN = "open"
        SETTLED = "settled"
        REFUNDED = "refunded"
        EXPIRED = "expired"

    # The request's id: also the usage row's id and the X-Otari-Request-Id header.
    request_id = models.UUIDField(primary_key=True)
    user = models.ForeignKey(GatewayUser, on_delete=models.PROTECT, related_name="holds")
    amount_usd = MoneyField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.OPEN)
    model_key = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(amount_usd__gte=0), name="hold_amount_nonnegative"),
            models.CheckConstraint(
                condition=Q(status__in=["open", "settled", "refunded", "expired"]),
                name="hold_status_valid",
            ),
        ]
        indexes = [
            # The sweeper's query: open holds past their expiry.
            models.Index(
                fields=["expires_at"], condition=Q(status="open"), name="hold_open_expiry_idx"
            ),
            models.Index(fields=["user", "status"], name="hold_user_status_idx"),
            # The console lists holds newest first (and its date drill-down reads the
            # first and last): without it, each page sorted the whole table.
            models.Index(fields=["-created_at"], name="hold_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.status} ${self.amount_usd}"


class BudgetResetLog(models.Model):
    """A period roll of one user: what they had spent and the window that began."""

    user = models.ForeignKey(GatewayUser, on_delete=models.PROTECT, related_name="reset_logs")
    # History outlives edits: no database constraint, so deleting a budget keeps its logs.
    budget = models.ForeignKey(
        Budget,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        null=True,
        related_name="reset_logs",
    )
    previous_spend_usd = MoneyField()
    reset_at = models.DateTimeField()
    next_reset_at = models.DateTimeField(null=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-reset_at"]
        verbose_name = "budget reset"
        constraints = [
            # Belt and braces for the compare-and-swap in budgets.services: a window can
            # only begin once for a user.
            models.UniqueConstraint(fields=["user", "reset_at"], name="reset_log_once_per_window"),
        ]
        indexes = [
            # The console lists resets newest first; one row per user and period adds up.
            models.Index(fields=["-reset_at"], name="reset_log_time_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.user_id} reset at {self.reset_at:%Y-%m-%d %H:%M}"


class BudgetAlert(models.Model):
    """A user's spend reached a threshold of their limit in one period: recorded once.

    The unique constraint is what makes an alert exactly-once per user, threshold and
    period, however many requests cross the threshold at the same moment and however
    many processes check. Delivery state is kept per channel so that a retry never
    repeats a channel that already succeeded.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"

    user = models.ForeignKey(GatewayUser, on_delete=models.PROTECT, related_name="budget_alerts")
    # History outlives edits, as for reset logs.
    budget = models.ForeignKey(
        Budget, on_delete=models.DO_NOTHING, db_constraint=False, related_name="alerts"
    )
    threshold_pct = models.PositiveSmallIntegerField()
    period_started_at = models.DateTimeField()
    period_ends_at = models.DateTimeField(null=True, blank=True)
    # The user's spend and limit when the threshold was found reached.
    spend_usd = MoneyField()
    limit_usd = MoneyField()
    # Where it goes, as configured when it was raised.
    webhook_url = models.URLField(max_length=2000, blank=True, default="")
    emails = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    webhook_delivered_at = models.DateTimeField(null=True, blank=True)
    email_delivered_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    # Set while an attempt runs: a second worker handed the same alert stays away.
    leased_until = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "budget alert"
        constraints = [
            models.UniqueConstraint(
                fields=["user", "budget", "threshold_pct", "period_started_at"],
                name="budget_alert_once_per_period",
            ),
            models.CheckConstraint(
                condition=Q(status__in=["pending", "delivered", "failed"]),
                name="budget_alert_status_valid",
            ),
        ]
        indexes = [
            # The re-drive looks for alerts whose delivery never finished.
            models.Index(
                fields=["created_at"], condition=Q(status="pending"), name="alert_pending_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.user_id} reached {self.threshold_pct}% ({self.status})"


class APIKey(models.Model):
    """A `gw-` key. Only its SHA-256 is stored; the secret is shown once at creation."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    user = models.ForeignKey(GatewayUser, on_delete=models.PROTECT, related_name="api_keys")
    key_hash = models.CharField(max_length=64, unique=True)
    key_prefix = models.CharField(max_length=10)
    key_suffix = models.CharField(max_length=4, blank=True, default="")
    key_name = models.CharField(max_length=200, blank=True, default="")
    is_active = models.BooleanField(default=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    allowed_models = models.JSONField(null=True, blank=True)
    # Fixed when the key is issued; null: the default workspace.
    workspace = models.ForeignKey(
        "Workspace", on_delete=models.PROTECT, null=True, blank=True, related_name="api_keys"
    )
    # Cost is logged, never held or charged.
    exclude_from_budget = models.BooleanField(default=False)
    # Rate limits of this key alone, on top of its user's (null = unlimited).
    rpm_limit = models.PositiveIntegerField(null=True, blank=True)
    tpm_limit = models.PositiveBigIntegerField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    # Every version of the key's settings (otari/history.py); never its hash.
    history = AuditedHistory(excluded_fields=["key_hash", "last_used_at", "updated_at"])

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.key_prefix}… ({self.key_name or self.user_id})"


# The deployment's one organization and its default workspace have fixed ids, so that a
# request's scopes are known without a lookup (and the ids the otari SDK saw before
# workspaces existed stay valid). Both rows are provisioned on first use
# (budgets.services.tenancy).
DEFAULT_ORGANIZATION_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")
DEFAULT_WORKSPACE_ID = uuid.UUID("00000000-0000-4000-8000-000000000000")


class Organization(models.Model):
    """The deployment: one row, the scope of organization-wide ceilings."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    name = models.CharField(max_length=255, default="Organization")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.name


class Workspace(models.Model):
    """A group of keys (a team, a product) that a ceiling can cap together.

    A key belongs to one workspace from its creation; a key without one belongs to the
    default workspace, as do requests made with the master key.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="workspaces"
    )
    name = models.CharField(max_length=255)
    description = models.CharField(max_length=1024, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "name"], name="workspace_name_unique_in_org"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def is_default(self) -> bool:
        return self.pk == DEFAULT_WORKSPACE_ID


class Ceiling(BudgetAccount):
    """A cap on what one scope (the organization, a workspace, an API key) spends,
    optionally at one provider only, enforced together with the user's own budget.

    Its limit and period come from the budget it names; its counters work exactly as a
    user's do (`spend` this period, `reserved` by open holds, a live top-up raises the
    limit), under the same rules (budgets.rules) and statements (budgets.services.holds).
    """

    class Scope(models.TextChoices):
        ORGANIZATION = "organization"
        WORKSPACE = "workspace"
        API_TOKEN = "api_token"  # noqa: S105 (a scope type, not a secret)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    scope_type = models.CharField(max_length=20, choices=Scope.choices)
    # The organization's, the workspace's or the key's id, as text (otari's wire shape).
    scope_id = models.CharField(max_length=255)
    # The provider instance (a configured provider's name) this ceiling caps; "" for
    # every provider. Not null, so that the uniqueness of (scope, provider) is plain.
    provider = models.CharField(max_length=255, blank=True, default="")
    budget = models.ForeignKey(Budget, on_delete=models.PROTECT, related_name="ceilings")
    name = models.CharField(max_length=200, blank=True, default="")

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at"]
        verbose_name = "ceiling"
        constraints = [
            models.UniqueConstraint(
                fields=["scope_type", "scope_id", "provider"], name="ceiling_one_per_scope"
            ),
            models.CheckConstraint(
                condition=Q(scope_type__in=["organization", "workspace", "api_token"]),
                name="ceiling_scope_type_valid",
            ),
            *BudgetAccount.money_constraints("ceiling"),
        ]
        indexes = [BudgetAccount.due_reset_index("ceiling")]

    def __str__(self) -> str:
        if self.name:
            return self.name
        where = f" at {self.provider}" if self.provider else ""
        return f"{self.get_scope_type_display()} {self.scope_id}{where}"

    @property
    def level(self) -> str:
        """How a refusal names it: "Workspace", "Organization", "API key"."""
        return CEILING_LEVELS[self.scope_type]


CEILING_LEVELS = {
    Ceiling.Scope.ORGANIZATION: "Organization",
    Ceiling.Scope.WORKSPACE: "Workspace",
    Ceiling.Scope.API_TOKEN: "API key",
}


class HoldCeiling(models.Model):
    """A hold's reservation on one ceiling: the hold's amount, taken and closed with it.

    The link is what settlement, refund and expiry close, and what the audit sums: a
    ceiling's `reserved` is the total of its open holds, its `spend` the cost of the
    usage rows of its settled holds in its window.
    """

    hold = models.ForeignKey(Hold, on_delete=models.PROTECT, related_name="ceiling_links")
    # A deleted ceiling takes its links with it: its holds then settle into nothing there.
    ceiling = models.ForeignKey(Ceiling, on_delete=models.CASCADE, related_name="hold_links")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["hold", "ceiling"], name="hold_ceiling_once"),
        ]
        indexes = [models.Index(fields=["ceiling", "hold"], name="hold_ceiling_by_ceiling_idx")]

    def __str__(self) -> str:
        return f"{self.hold_id} on {self.ceiling_id}"


class CeilingResetLog(models.Model):
    """A period roll of one ceiling: what it had spent and the window that began."""

    # History outlives the ceiling, as reset logs outlive budgets.
    ceiling = models.ForeignKey(
        Ceiling,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="reset_logs",
    )
    budget = models.ForeignKey(
        Budget, on_delete=models.DO_NOTHING, db_constraint=False, null=True, related_name="+"
    )
    previous_spend_usd = MoneyField()
    reset_at = models.DateTimeField()
    next_reset_at = models.DateTimeField(null=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-reset_at"]
        verbose_name = "ceiling reset"
        constraints = [
            models.UniqueConstraint(
                fields=["ceiling", "reset_at"], name="ceiling_reset_once_per_window"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.ceiling_id} reset at {self.reset_at:%Y-%m-%d %H:%M}"


class MasterKey(models.Model):
    """The SHA-256 of a master key generated on first start (when OTARI_MASTER_KEY is unset)."""

    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"master key created {self.created_at:%Y-%m-%d}"


class SettingChange(models.Model):
    """One version of a money setting (a budget, user, key or price), from any of their
    history tables: a read-only database view (migration 0002), so one list can search
    and page them all. Written only by common.history, never edited or deleted."""

    class ObjectType(models.TextChoices):
        BUDGET = "budget"
        USER = "user"
        KEY = "key"
        PRICE = "price"

    class Kind(models.TextChoices):
        CREATED = "+", "created"
        CHANGED = "~", "changed"
        DELETED = "-", "deleted"

    id = models.CharField(primary_key=True, max_length=64)
    object_type = models.CharField(max_length=10, choices=ObjectType.choices)
    object_id = models.CharField(max_length=255)
    object_label = models.CharField(max_length=255)
    kind = models.CharField(max_length=1, choices=Kind.choices)
    changed_at = models.DateTimeField()
    channel = models.CharField(max_length=10, choices=Channel.choices)
    actor = models.CharField(max_length=255)
    changes = models.JSONField()

    class Meta:
        managed = False
        db_table = "otari_setting_change"
        ordering = ["-changed_at", "-id"]
        verbose_name = "setting change"

    def __str__(self) -> str:
        return f"{self.object_type} {self.object_label} {self.get_kind_display()}"
