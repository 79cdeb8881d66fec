"""The history of every money setting: who changed what, when, through what, old -> new.

Budgets, users, keys and prices keep their versions in django-simple-history tables
(`history = AuditedHistory(...)` on each model). Each version also records:

- `history_channel`: console, api, command or system (the gateway itself, Celery, config);
- `history_actor`: who, in words (the console login, "master key", "manage.py reset_budgets
  (ops)");
- `history_changes`: the fields that changed, old -> new, computed when the version is
  written, so a list of changes costs no query per row.

The actor comes from common/audit.py: set per request by `AuditContextMiddleware` (the
console and the management API; generation routes never pass through it), and for a
whole process by manage.py for commands. Writes through a queryset's `update()` send no
signal, so the services call `history_record` after the settings they change that way.
Spend, reserved and the period's clock are not settings and are excluded from the
versions: the request path never writes one (tests/admin/test_setting_history.py).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.dispatch import receiver
from simple_history.models import HistoricalRecords
from simple_history.signals import pre_create_historical_record

from common.audit import Channel, current_actor

# ---------------------------------------------------------------------------------------
# Versions


class HistoryAudit(models.Model):
    """What each version adds to django-simple-history's (the base of every history
    table here)."""

    history_channel = models.CharField(max_length=10, choices=Channel.choices, default="system")
    history_actor = models.CharField(max_length=255, blank=True, default="")
    # [[field, old, new], ...] as display strings; empty for a deletion.
    history_changes = models.JSONField(default=list, encoder=DjangoJSONEncoder)

    class Meta:
        abstract = True


_RECORDS: dict[type[models.Model], HistoricalRecords] = {}


class AuditedHistory(HistoricalRecords):
    """HistoricalRecords with our audit fields, and findable by model (history_record)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("bases", [HistoryAudit])
        kwargs.setdefault("get_user", _console_user)
        super().__init__(**kwargs)

    def contribute_to_class(self, cls: type[models.Model], name: str) -> None:
        super().contribute_to_class(cls, name)
        _RECORDS[cls] = self


def _console_user(instance: Any = None, request: Any = None, **kwargs: Any) -> Any:
    actor = current_actor()
    user = getattr(actor.request, "user", None)
    return user if getattr(user, "is_authenticated", False) and user != "master" else None


def history_record(instance: models.Model, history_type: str = "~") -> None:
    """Record a version of `instance` as it is now (for changes made with `update()`).
    Call inside the service's transaction, after the change and a refresh."""
    _RECORDS[type(instance)].create_historical_record(instance, history_type)


def _display(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Decimal):
        # Exact, without the column's trailing zeros: "25", "0.15".
        return format(value.normalize(), "f")
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder))


@receiver(pre_create_historical_record)
def _audit_fill(sender: type[models.Model], history_instance: Any, **kwargs: Any) -> None:
    actor = current_actor()
    history_instance.history_channel = actor.channel
    history_instance.history_actor = actor.who()[:255]
    fields = [
        f.attname
        for f in sender.instance_type._meta.concrete_fields
        if f.attname in {g.attname for g in history_instance._meta.concrete_fields}
        and f.attname not in ("created_at", "updated_at")
    ]
    if history_instance.history_type == "-":
        history_instance.history_changes = []
        return
    pk_name = sender.instance_type._meta.pk.attname
    previous = (
        sender.objects.filter(**{pk_name: getattr(history_instance, pk_name)})
        .order_by("-history_date", "-history_id")
        .first()
    )
    changes = []
    for name in fields:
        new = getattr(history_instance, name)
        old = getattr(previous, name) if previous is not None else None
        if previous is None or old != new:
            # A new object lists what it was created with, not its empty defaults.
            if previous is None and (new is False or new in (None, "", [], {}, 0)):
                continue
            changes.append([name, _label(sender, name, old), _label(sender, name, new)])
    history_instance.history_changes = changes


def _label(history_model: Any, attname: str, value: Any) -> Any:
    """A value as a person reads it: a related budget or user by its name, not its id
    (looked up when the change is recorded, so the list needs no query per row)."""
    field = next(
        (f for f in history_model.instance_type._meta.concrete_fields if f.attname == attname),
        None,
    )
    if value is not None and field is not None and field.is_relation:
        related = field.related_model.objects.filter(pk=value).first()
        if related is not None:
            return str(related)
    return _display(value)
