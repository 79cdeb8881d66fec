"""Which package may import which (issue 13).

- `otari/` is the project's wiring: settings, URLs, the ASGI and Celery entry points,
  logging and metrics. Shared code lives in `common/`, app code in the apps.
- `common/` imports no app and not `otari`, so any app can use it without a cycle.

Read from the source with `ast`, so nothing is imported and lazy imports inside
functions count like the others.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPS = ("budgets", "usage", "llm_proxy")
PACKAGES = ("otari", "common", *APPS)

# The wiring modules `otari/` may hold, and its one subpackage (Django's locale formats).
OTARI_MODULES = {
    "__init__.py",
    "apps.py",
    "settings.py",
    "urls.py",
    "asgi.py",
    # The ASGI lifespan: what a worker process warms up before its first request.
    "startup.py",
    "celery.py",
    "logging.py",
    "metrics.py",
    "openapi.py",
}
OTARI_SUBPACKAGES = {"formats"}


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports (absolute names), at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _top(module: str) -> str:
    return module.partition(".")[0]


def import_graph(packages: tuple[str, ...] = PACKAGES) -> dict[str, dict[str, set[str]]]:
    """{importing package: {imported package: {files that import it}}}, between the
    project's own top-level packages (a package importing itself is left out)."""
    graph: dict[str, dict[str, set[str]]] = {}
    for package in packages:
        edges: dict[str, set[str]] = defaultdict(set)
        for path in _sources(package):
            for module in _imported_modules(path):
                target = _top(module)
                if target in packages and target != package:
                    edges[target].add(str(path.relative_to(ROOT)))
        graph[package] = dict(edges)
    return graph


def test_common_imports_no_app_and_not_the_project():
    imported = import_graph()["common"]
    assert imported == {}, f"common/ must import no app nor otari: {imported}"


def test_otari_is_wiring_only():
    package = ROOT / "otari"
    modules = {path.name for path in package.glob("*.py")}
    subpackages = {
        path.name
        for path in package.iterdir()
        if path.is_dir() and path.name != "__pycache__" and any(path.glob("*.py"))
    }
    assert modules - OTARI_MODULES == set(), "otari/ holds wiring only; shared code: common/"
    assert subpackages <= OTARI_SUBPACKAGES


# The apps' layers: the request path (llm_proxy) uses the money core (budgets), which
# writes the ledger (usage: usage rows, prices, reports); never the other way round, so
# no two apps import each other.
APP_LAYERS = {"llm_proxy": {"budgets", "usage"}, "budgets": {"usage"}, "usage": set()}


def test_the_apps_import_each_other_one_way_only():
    graph = import_graph()
    for app in APPS:
        imported = {target: files for target, files in graph[app].items() if target in APPS}
        wrong = {
            target: files for target, files in imported.items() if target not in APP_LAYERS[app]
        }
        assert not wrong, f"{app} must not import {sorted(wrong)}: {wrong}"
