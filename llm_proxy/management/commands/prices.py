"""Price catalog maintenance: `prices sync [--apply]`.

`sync` compares every model whose current price was frozen from the genai-prices catalog
(origin `catalog`) with the catalog installed now, and lists each price that would change,
old and new. It changes nothing unless `--apply` is given; then each listed model gets a
new catalog price version, in effect from now. Operator prices (config file, API,
console) are never touched, past usage rows keep the cost they were charged, and a model
the installed catalog no longer prices keeps its frozen price (listed as such). Running
it twice, or on two hosts, adds nothing the second time: a price equal to the catalog's is
not a change.

Lives in llm_proxy because a catalog price belongs to a provider instance: the command asks
each configured provider which catalog provider it is.
"""

from __future__ import annotations

from argparse import ArgumentParser
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from llm_proxy.providers import providers
from usage.catalog import catalog_version
from usage.services import CatalogPriceChange, pricing_catalog_sync


def _rates(values: tuple[Decimal | None, ...]) -> str:
    def one(value: Decimal | None) -> str:
        return "=input" if value is None else f"{value.normalize():f}"

    return "/".join(one(value) for value in values)


def _describe(change: CatalogPriceChange) -> str:
    row = change.current
    old = _rates(
        (
            row.input_price_per_mtok_usd,
            row.output_price_per_mtok_usd,
            row.cache_read_price_per_mtok_usd,
            row.cache_write_price_per_mtok_usd,
        )
    )
    if change.new is None:
        return f"  {change.model_key}: {old} ({row.source}) no longer in the catalog; kept"
    rates = change.new.rates
    new = _rates(
        (
            rates.input_per_mtok,
            rates.output_per_mtok,
            rates.cache_read_per_mtok,
            rates.cache_write_per_mtok,
        )
    )
    return f"  {change.model_key}: {old} ({row.source}) -> {new} (catalog {change.new.version})"


def _catalog_provider_of(provider_name: str) -> str | None:
    provider = providers().get(provider_name)
    return provider.catalog_provider_id() if provider is not None else None


class Command(BaseCommand):
    help = __doc__

    def add_arguments(self, parser: ArgumentParser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="ACTION")
        sync = actions.add_parser(
            "sync", help="update catalog prices to the installed catalog (dry run by default)"
        )
        sync.add_argument(
            "--apply", action="store_true", help="write the new prices (default: only list them)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options.get("action") != "sync":
            raise CommandError("usage: manage.py prices sync [--apply]")
        apply = options["apply"]
        found = pricing_catalog_sync(catalog_provider_of=_catalog_provider_of, apply=apply)
        changes = [change for change in found if change.changes]
        for change in found:
            self.stdout.write(_describe(change))
        units = "price" if len(changes) == 1 else "prices"
        if apply:
            self.stdout.write(
                f"prices sync: {len(changes)} {units} updated to catalog {catalog_version()}"
            )
        else:
            self.stdout.write(
                f"prices sync (dry run): {len(changes)} {units} would change to catalog "
                f"{catalog_version()}; run with --apply to write them"
            )
