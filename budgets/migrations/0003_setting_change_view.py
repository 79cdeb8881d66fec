"""One read-only view over the four history tables of money settings, so the console
lists, searches and pages every change in one place (budgets.models.SettingChange).
Plain SQL that PostgreSQL and SQLite both run."""

from django.db import migrations

_ROWS = """
SELECT {prefix} || CAST(history_id AS TEXT) AS id, '{kind}' AS object_type,
       CAST({object_id} AS TEXT) AS object_id, {label} AS object_label,
       history_type AS kind, history_date AS changed_at, history_channel AS channel,
       history_actor AS actor, history_changes AS changes
FROM {table}
"""

_VIEW = "CREATE VIEW otari_setting_change AS " + " UNION ALL ".join(
    _ROWS.format(prefix=f"'{kind}:'", kind=kind, object_id=object_id, label=label, table=table)
    for kind, object_id, label, table in (
        ("budget", "budget_id", "name", "budgets_historicalbudget"),
        ("user", "user_id", "alias", "budgets_historicalgatewayuser"),
        ("key", "id", "key_prefix", "budgets_historicalapikey"),
        ("price", "model_key", "model_key", "usage_historicalmodelpricing"),
    )
)


class Migration(migrations.Migration):
    dependencies = [
        ("budgets", "0002_setting_history"),
        ("usage", "0004_price_history"),
    ]

    operations = [
        migrations.RunSQL(_VIEW, reverse_sql="DROP VIEW otari_setting_change"),
    ]
