"""Console accounts: the people who log in to the admin (Django's auth users)."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.db import transaction


@dataclass(frozen=True)
class AdminUserResult:
    username: str
    created: bool
    password_set: bool


def admin_user_ensure(
    *, username: str, password: str, email: str = "", reset_password: bool = False
) -> AdminUserResult:
    """Make sure a superuser `username` exists; idempotent.

    Creates it with `password` when missing. An existing account keeps its password
    (someone may have changed it in the console) unless `reset_password`; it is made an
    active superuser again either way, so the command always leaves a way in. Raises
    django.core.exceptions.ValidationError when the password fails the project's
    password validators.
    """
    User = get_user_model()
    with transaction.atomic(durable=True):
        user = User.objects.select_for_update().filter(username=username).first()
        created = user is None
        if created:
            user = User(username=username, email=email)
        if created or reset_password:
            validate_password(password, user)
            user.set_password(password)
        if email:
            user.email = email
        user.is_staff = user.is_superuser = user.is_active = True
        user.save()
        return AdminUserResult(
            username=username, created=created, password_set=created or reset_password
        )
