"""Fuzz the running service from its own OpenAPI spec (schemathesis): no request gets a 5xx."""

from __future__ import annotations

import collections

import pytest
import requests

from tests.serving.conftest import FakeApp

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")


def test_no_5xx_from_generated_requests(fake_app: FakeApp) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    spec = requests.get(f"{fake_app.url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    seen: collections.Counter[tuple[str, int]] = collections.Counter()
    session = requests.Session()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"POST /v1/search", "GET /v1/images/{image_id}", "GET /v1/admin/config"} <= {op.label for op in operations}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                # with the search key: the requests get past auth and reach the handlers
                resp = case.call(base_url=fake_app.url, session=session, headers=fake_app.search_headers, timeout=60)
                seen[(case.operation.label, resp.status_code)] += 1
                case.validate_response(resp, checks=[not_a_server_error])

            try:
                check()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # e.g. GET / has nothing to make invalid
    codes = {code for (_, code) in seen}
    assert not any(code >= 500 for code in codes), seen
    # the fuzzer reached the handlers, both accepted and rejected
    assert seen[("POST /v1/search", 200)] > 0 and seen[("POST /v1/search", 422)] > 0, seen
    assert seen[("GET /v1/admin/config", 403)] > 0, seen
