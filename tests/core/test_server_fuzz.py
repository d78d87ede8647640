"""Property-based fuzzing of the server's OpenAPI schema (schemathesis): no input gets a 5xx answer."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer test-key"}
MAX_EXAMPLES = 30  # per operation
# Generation is bounded so the fuzz stays quick on a CPU, and `model` names the served model; every other
# field is left as generated.
MAX_FUZZ_TOKENS = 8
MAX_FUZZ_N = 2


def _bound(body: object) -> None:
    if not isinstance(body, dict):
        return
    if "model" in body:
        body["model"] = "tiny"  # an unknown model is a 404 before anything else is looked at
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and body[key] > MAX_FUZZ_TOKENS:
            body[key] = MAX_FUZZ_TOKENS
    if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = MAX_FUZZ_TOKENS  # chat defaults to the whole context otherwise
    for key in ("n", "best_of"):
        if isinstance(body.get(key), int) and body[key] > MAX_FUZZ_N:
            body[key] = MAX_FUZZ_N


def _fuzz(operation, seen: dict[str, set[int]]) -> None:  # type: ignore[no-untyped-def]
    """Run MAX_EXAMPLES generated requests against one operation; no answer may be a 5xx."""
    label = f"{operation.method.upper()} {operation.path}"

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def check(case) -> None:  # type: ignore[no-untyped-def]
        _bound(case.body)
        response = case.call(headers=AUTH, timeout=120)
        seen.setdefault(label, set()).add(response.status_code)
        assert response.status_code < 500, (label, case.body, response.status_code, response.text[:500])
        if response.status_code >= 400 and operation.path.startswith("/v1/"):
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert error["message"]

    check()


def test_fuzzed_requests_never_get_a_server_error(live_server) -> None:  # type: ignore[no-untyped-def]
    # The schema is loaded from the live server (schemathesis' pytest plugin predates pytest 9, so the
    # operations are driven with hypothesis directly).
    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {(op.method.upper(), op.path) for op in operations}
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")} <= paths
    seen: dict[str, set[int]] = {}
    for operation in operations:
        _fuzz(operation, seen)
    # The generated inputs reached the handlers, valid and invalid alike.
    assert 200 in seen["POST /v1/completions"] and 400 in seen["POST /v1/completions"], seen
    assert 200 in seen["POST /v1/chat/completions"] and 400 in seen["POST /v1/chat/completions"], seen
