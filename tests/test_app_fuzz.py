"""The REST API fuzzed from its own OpenAPI document (schemathesis + hypothesis), against a real uvicorn serving
the shipped model: whatever a client sends, inside the schema or not, the answer is a documented status in the
documented shape, never a 500, and a request without the key is refused."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from app_helpers import Server
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi import checks

from app.main import create_app
from app.settings import Settings

pytestmark = pytest.mark.slow

# The schema cannot say everything the service checks: "exactly one of subject or subject_id", a face box with
# left < right, a far that the weights were calibrated for, a non-empty image. Requests that break those rules
# are schema-valid and refused with a documented 4xx, which this one check would count as a failure.
NOT_EXPRESSIBLE = [checks.positive_data_acceptance]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("fuzz") / "data").start()
    yield running
    running.stop()


# The document is built in-process at collection (an app object starts nothing until its lifespan runs), so
# pytest lists one test per operation; the first test checks that the server publishes this same document.
# (schemathesis.pytest.from_fixture would fetch it from the server, but breaks on pytest 9.2: no Node._nodeid.)
DOCUMENT = create_app(Settings(api_keys="unused")).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)


def test_the_server_publishes_the_document_fuzzed_here(server: Server) -> None:
    assert httpx.get(f"{server.url}/openapi.json").json() == DOCUMENT


@schema.parametrize()
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error_or_an_undocumented_answer(case, server: Server) -> None:
    # Every request carries the key, so a header negation (the key left out) is void: the auth checks judge the
    # key. A case negated only there and in its query was judged on the query alone, which schemathesis can send
    # as a valid one (`GET /subjects?limit=1`: "schema-violating request accepted"; schemathesis PR #4762 fixes
    # a kin of it upstream). Such cases keep every other check; negations of the query alone stay judged.
    negated = {loc.value for loc, part in (case.meta.components if case.meta else {}).items() if part.mode.is_negative}
    void = "header" in negated and negated <= {"header", "query"}
    case.call_and_validate(base_url=server.url, headers={"X-API-Key": server.api_key}, timeout=60,
                           excluded_checks=NOT_EXPRESSIBLE + ([checks.negative_data_rejection] if void else []))
