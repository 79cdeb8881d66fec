"""Property-based fuzz of the management API against its own /openapi.json (schemathesis):
no 500s, and no response that contradicts the schema (status codes, content types,
bodies). Bounded: a few dozen examples per operation."""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import MASTER_KEY

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


# Per operation; about 30 operations, so a few hundred requests in all.
EXAMPLES_PER_OPERATION = 25


@pytest.mark.slow
def test_management_api_fuzz(gateway, settings):
    settings.OTARI_MASTER_KEY = MASTER_KEY
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    # Generation endpoints call providers; their money paths have tests of their own.
    schema = schema.exclude(tag="generation")
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 25

    for operation in operations:

        @hypothesis.settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy())
        def fuzz(case):
            case.call_and_validate(headers=headers, checks=CHECKS)

        fuzz()


# Per operation: the generation routes (chat, messages, count_tokens, responses,
# embeddings, models). Their money paths are fuzzed from hypothesis strategies of their
# own (tests/llm_proxy/test_generation_fuzz.py); this proves the document holds: every
# status and error body is one it describes.
GENERATION_EXAMPLES_PER_OPERATION = 10


@pytest.mark.slow
def test_generation_api_fuzz(gateway):
    from budgets.models import Hold
    from tests.factories import make_budget, make_key, make_user

    _, secret = make_key(make_user(budget=make_budget(max_budget_usd=100)))
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    schema = schema.include(tag="generation")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6

    for operation in operations:

        @hypothesis.settings(
            max_examples=GENERATION_EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy())
        def fuzz(case):
            case.call_and_validate(headers={"Authorization": f"Bearer {secret}"}, checks=CHECKS)

        fuzz()
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
