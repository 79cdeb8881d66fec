"""Admin registrations of the usage app."""

from usage import admin_reports  # noqa: F401 - registers the platform report outbox
