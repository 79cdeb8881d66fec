"""The otari gateway's Django project package."""

from otari.celery import app as celery_app

__all__ = ["celery_app"]
