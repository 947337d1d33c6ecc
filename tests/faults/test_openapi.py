"""Schemathesis against the running dispatcher's ``/openapi.json`` (SPEC §6): requests generated from the
document, positive and negative; no answer is a 500, and every answer (status, content type, body) is one
the document declares, with the Authorization header schemathesis generates and again with the API token.
The event stream (``/tasks/{id}/events``) is left out: it stays open by design.

Nothing is left out: every operation (the event stream too: for an unknown or ended task it ends) and every
check, ``not_a_server_error`` included (the simulated GPUs answer embeddings jobs with vectors, so
``/v1/embeddings`` has no reason for its 502).

Found: 401 (API_TOKEN), 404 (unknown task) and 503 (store down) were missing from the document, and
``/metrics`` was declared JSON; fixed in dispatcher/http/routes.py and dispatcher/http/app.py. ``GET /tasks`` answered
422 with a string where the document declared FastAPI's list, and refused schema-valid filters (an unknown
state, any cursor not from a page): the one error body (dispatcher/errors.py) and patterns for ``state`` and
``cursor`` that say exactly what the server takes fixed it. An input text of "\u001d"
passed the document's ``\\S`` (ECMAScript's) but not the server's check; fixed in dispatcher/http/openai_shapes.py
and kept below as an explicit example (``EXAMPLES``), tried on every run whatever hypothesis draws.

Driven through hypothesis directly (``operation.as_strategy()``): schemathesis's pytest plugin does not
run under pytest 9 (it reads ``Function._nodeid``)."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from schemathesis.core.failures import FailureGroup
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation.meta import (
    CaseMetadata,
    ComponentInfo,
    ExamplesPhaseData,
    GenerationInfo,
    GenerationMode,
    PhaseInfo,
    TestPhase,
)

from tests.conftest import scaled
from tests.dispatcher.harness import push_jobs, wait_final

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]  # slow: schemathesis explores every route: minutes

API_TOKEN = "op-token-for-schemathesis"
# Bodies to try on every run, whatever hypothesis draws: what exploration found. Schemathesis judges them
# against the document like generated ones (valid data must be accepted, invalid data refused).
EXAMPLES: dict[str, list[dict[str, Any]]] = {
    # "\u001d" passed the document's \S (JSON Schema's regex) while the server refused it as empty
    "POST /v1/embeddings": [
        {"input": "\u001d", "model": "m"},
        {"input": ["a", "\u001c\u001f"], "model": "m"},
    ],
}


def _judged(operation: Any, body: dict[str, Any]) -> Any:
    """A case with this body whose validity schemathesis decides from the document, as for generated data."""
    meta = CaseMetadata(
        generation=GenerationInfo(time=0.0, mode=GenerationMode.POSITIVE),
        components={ParameterLocation.BODY: ComponentInfo(mode=GenerationMode.POSITIVE)},
        phase=PhaseInfo(
            name=TestPhase.EXAMPLES,
            data=ExamplesPhaseData(description=None, parameter=None, parameter_location=None, location=None),
        ),
    )
    meta.mark_dirty(ParameterLocation.BODY)  # revalidated against the document before the checks
    return operation.Case(body=body, media_type="application/json", _meta=meta)


def test_dispatcher_answers_match_its_openapi(stack):
    fleet = stack.fleet(gpus=2, service_time="0")
    d = stack.dispatcher(fleet, API_TOKEN=API_TOKEN)
    wait_final(stack.engine, push_jobs(stack.rds, stack.queues[0], 3))
    schema = schemathesis.openapi.from_url(f"{d.url}/openapi.json")
    failures = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=scaled(25), deadline=None, suppress_health_check=list(HealthCheck))
        def check(case):
            # the Authorization header as generated (mostly 401), then the token
            case.call_and_validate()
            case.call_and_validate(headers={"Authorization": f"Bearer {API_TOKEN}"})

        for body in EXAMPLES.get(operation.label, []):
            check = example(case=_judged(operation, body))(check)
        try:
            check()
        except (Exception, BaseExceptionGroup) as exc:
            failures[operation.label] = exc
    assert not failures, "\n\n".join(f"{k}: {_explain(v)[:4000]}" for k, v in failures.items())


def _explain(exc: BaseException) -> str:
    """What failed, down to the calls: hypothesis's FlakyFailure only says "failed on the first call but not
    on a later one"; the schemathesis failures it wraps carry the status code, the body and the curl of the
    failing call, and hypothesis's notes carry the falsifying example."""
    if type(exc).__name__ == "_WrappedBaseException" and exc.__cause__ is not None:
        exc = exc.__cause__  # how FlakyFailure holds a BaseException such as schemathesis's FailureGroup
    lines = [f"{type(exc).__name__}: {exc}", *getattr(exc, "__notes__", [])]
    if isinstance(exc, FailureGroup):  # its message already renders each failure with the response
        return "\n".join(lines)
    for inner in getattr(exc, "exceptions", ()):
        lines.append("  " + _explain(inner).replace("\n", "\n  "))
    return "\n".join(lines)
