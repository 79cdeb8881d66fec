"""Code shared by the apps (budgets, usage, llm_proxy): the error hierarchy, money fields
and formatting, the management API's generic plumbing, console building blocks, the
audit context and setting history, configuration and the hot path's connection pool.

It imports Django, DRF, third-party packages and the standard library, never an app nor
the project package `otari` (tests/test_layout.py checks): whatever needs an app takes
it as a hook from the wiring in otari/ (asgi.py, urls.py) or lives in that app.
"""
