"""Stored routing (docs/ROUTING.md): aliases and routing policies written through the
management API, next to the ones in OTARI_CONFIG.

A row with `user_id == ""` is global; otherwise it applies to that user alone and, for
that user, shadows a global or configured one of the same name. `user_id` is a plain
string, not a foreign key: the request path looks a name up by (name, user_id) in one
statement and never needs the user row, and deleting a user leaves nothing to cascade
that could surprise (its scoped names simply stop resolving).

A spec is stored as its normalised JSON (llm_proxy.routing.spec.Policy.as_spec), so a
row always holds a body this build accepts.
"""

from django.db import models

# Names are what callers send as `model`; 255 is the width of every model key column.
NAME_MAX_LENGTH = 255


class Alias(models.Model):
    """`name` -> one `provider:model`: a policy whose select is a single default."""

    name = models.CharField(max_length=NAME_MAX_LENGTH)
    target = models.CharField(max_length=NAME_MAX_LENGTH)
    user_id = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "user_id"]
        constraints = [
            models.UniqueConstraint(fields=["name", "user_id"], name="alias_name_user_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.name} -> {self.target}"


class RoutingPolicy(models.Model):
    """A named policy: `select` entries and `on_failure` targets (spec.parse_policy)."""

    name = models.CharField(max_length=NAME_MAX_LENGTH)
    spec = models.JSONField()
    user_id = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "user_id"]
        verbose_name_plural = "routing policies"
        constraints = [
            models.UniqueConstraint(
                fields=["name", "user_id"], name="routingpolicy_name_user_unique"
            ),
        ]

    def __str__(self) -> str:
        return self.name
