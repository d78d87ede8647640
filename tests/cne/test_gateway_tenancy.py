"""The multi-tenant gateway over HTTPS: keys, private models, usage isolation, rate limits, metrics, audit log.

Every test talks to the session's real `deepseek-cne serve --config` process (tests/cne/conftest.py).
"""

from __future__ import annotations

import json
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import GATEWAY_ADMIN_KEY, GATEWAY_KEYS, GatewayProcess

pytestmark = pytest.mark.integration

PROMPT = "the model reads a token and"


@pytest.fixture(scope="module")
def reference(gateway_tiny_dir: Path):  # type: ignore[no-untyped-def]
    """Greedy output of the in-process engine on the gateway's tiny checkpoint."""
    from deepseek_core.engine import LLM, SamplingParams

    llm = LLM(str(gateway_tiny_dir), max_num_seqs=4, kv_cache_bytes=4 * 1024**2)

    def greedy(prompt: str, max_tokens: int) -> Any:
        return llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]

    return greedy


def _sse(response: httpx.Response) -> list[dict[str, Any]]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def _complete(gateway: GatewayProcess, tenant: str, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **extra}
    with gateway.client(tenant) as c:
        return c.post("/v1/completions", json=body)


# ---------------------------------------------------------------------------------------------- keys
@pytest.mark.parametrize("key", [None, "not-a-key", GATEWAY_KEYS["alpha"] + "x", GATEWAY_ADMIN_KEY])
def test_missing_or_wrong_key_is_401(gateway: GatewayProcess, key: str | None) -> None:
    with gateway.client(key=key) as c:
        answers = [
            c.get("/v1/models"),
            c.get("/v1/usage"),
            c.post("/v1/completions", json={"model": "shared-tiny", "prompt": "x", "max_tokens": 1}),
            c.post(
                "/v1/chat/completions",
                json={"model": "shared-tiny", "messages": [{"role": "user", "content": "x"}]},
            ),
        ]
    for response in answers:
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "authentication_error"


def test_admin_endpoints_and_metrics_need_the_admin_key(gateway: GatewayProcess) -> None:
    with gateway.client("alpha") as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/admin/status").status_code == 401
        assert c.post("/admin/models/shared-tiny/unload").status_code == 401
    with gateway.client(key=GATEWAY_ADMIN_KEY) as c:
        assert c.get("/metrics").status_code == 200
        assert set(c.get("/admin/status").json()["models"]) >= {"alpha-private", "beta-private"}


# ---------------------------------------------------------------------------------------------- isolation
def test_models_list_shows_only_the_tenants_models(gateway: GatewayProcess) -> None:
    def listed(tenant: str) -> set[str]:
        with gateway.client(tenant) as c:
            response = c.get("/v1/models")
        assert response.status_code == 200
        return {m["id"] for m in response.json()["data"]}

    alpha, beta = listed("alpha"), listed("beta")
    assert alpha == {"alpha-private", "shared-tiny", "fair-tiny", "big", "s3-tiny"}
    assert beta == {"beta-private", "shared-tiny"}
    assert listed("flood") == {"fair-tiny"}


def _neutral(body: dict[str, Any], name: str) -> str:
    return json.dumps(body, sort_keys=True).replace(name, "<model>")


def test_another_tenants_private_model_is_404_like_an_unknown_one(gateway: GatewayProcess) -> None:
    with gateway.client("alpha") as c:
        private = c.post("/v1/completions", json={"model": "beta-private", "prompt": "x", "max_tokens": 1})
        unknown = c.post("/v1/completions", json={"model": "no-such-model", "prompt": "x", "max_tokens": 1})
        chat = c.post(
            "/v1/chat/completions",
            json={"model": "beta-private", "messages": [{"role": "user", "content": "x"}]},
        )
        get_private, get_unknown = c.get("/v1/models/beta-private"), c.get("/v1/models/no-such-model")
    for response in (private, unknown, chat, get_private, get_unknown):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found"
    assert _neutral(private.json(), "beta-private") == _neutral(unknown.json(), "no-such-model")
    assert _neutral(get_private.json(), "beta-private") == _neutral(get_unknown.json(), "no-such-model")
    assert "beta" not in private.text.replace("beta-private", "")
    # A shared model a tenant is not allowed to use is just as invisible.
    with gateway.client("beta") as c:
        assert c.post("/v1/completions", json={"model": "fair-tiny", "prompt": "x"}).status_code == 404
    # The owner reaches it.
    assert _complete(gateway, "beta", "beta-private").status_code == 200


# ---------------------------------------------------------------------------------------------- serving
def test_completions_and_chat_match_the_engine(gateway: GatewayProcess, reference) -> None:  # type: ignore[no-untyped-def]
    expected = reference(PROMPT, 8)
    r = _complete(gateway, "alpha", "shared-tiny", max_tokens=8)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == expected.text
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)
    assert body["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)

    with gateway.client("alpha") as c:
        stream_body = {
            "model": "shared-tiny",
            "prompt": PROMPT,
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
        }
        with c.stream("POST", "/v1/completions", json=stream_body) as response:
            assert response.status_code == 200
            events = _sse(response)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == expected.text
    # The gateway asked the worker for usage on its own account: the client, which did not, never sees it.
    assert all("usage" not in e for e in events)

    with gateway.client("alpha") as c:
        with_usage = {**stream_body, "stream_options": {"include_usage": True}}
        with c.stream("POST", "/v1/completions", json=with_usage) as response:
            events = _sse(response)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == len(expected.token_ids)

    with gateway.client("alpha") as c:
        chat = c.post(
            "/v1/chat/completions",
            json={
                "model": "shared-tiny",
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 3,
            },
        )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"


def test_bad_requests_use_cores_error_shapes(gateway: GatewayProcess) -> None:
    with gateway.client("alpha") as c:
        not_json = c.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        bad_field = c.post("/v1/completions", json={"model": "shared-tiny", "prompt": "x", "temperature": 9})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    assert bad_field.status_code == 400 and bad_field.json()["error"]["param"] == "temperature"


def test_usage_shows_only_the_callers_usage(gateway: GatewayProcess) -> None:
    def usage(tenant: str, query: str = "") -> dict[str, Any]:
        with gateway.client(tenant) as c:
            response = c.get("/v1/usage" + query)
        assert response.status_code == 200
        return dict(response.json())

    before_alpha, before_beta = usage("alpha"), usage("beta")
    answers = [_complete(gateway, "alpha", "shared-tiny", max_tokens=3).json()["usage"] for _ in range(2)]
    after_alpha, after_beta = usage("alpha"), usage("beta", "?tenant=alpha")
    assert after_alpha["tenant"] == "alpha" and after_beta["tenant"] == "beta"
    assert after_alpha["total"]["requests"] == before_alpha["total"]["requests"] + 2
    spent = sum(a["total_tokens"] for a in answers)
    assert after_alpha["total"]["total_tokens"] == before_alpha["total"]["total_tokens"] + spent
    assert after_beta["total"] == before_beta["total"]  # alpha's traffic is not in beta's report
    assert all(row["model"] in {"beta-private", "shared-tiny"} for row in after_beta["data"])


# ---------------------------------------------------------------------------------------------- limits
def test_requests_per_minute_gives_429_with_retry_after(gateway: GatewayProcess) -> None:
    statuses = [_complete(gateway, "limited", "shared-tiny", max_tokens=1) for _ in range(4)]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    refused = statuses[3]
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "rate_limit_error"
    retry_after = int(refused.headers["Retry-After"])
    assert 1 <= retry_after <= 20  # 3 per minute: the next request is allowed within 20 s
    # Other tenants are not affected.
    assert _complete(gateway, "alpha", "shared-tiny", max_tokens=1).status_code == 200


def test_tokens_per_minute_gives_429_with_retry_after(gateway: GatewayProcess) -> None:
    # 60 tokens per minute: each request spends its prompt plus 40 generated tokens.
    first = _complete(gateway, "tokens", "shared-tiny", max_tokens=40, ignore_eos=True)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["total_tokens"] > 40
    second = _complete(gateway, "tokens", "shared-tiny", max_tokens=40, ignore_eos=True)
    assert second.status_code == 200  # the bucket still had tokens left; now it is in debt
    third = _complete(gateway, "tokens", "shared-tiny", max_tokens=40, ignore_eos=True)
    assert third.status_code == 429, third.text
    assert "tokens per minute" in third.json()["error"]["message"]
    assert int(third.headers["Retry-After"]) >= 10


# ---------------------------------------------------------------------------------------------- observability
def test_per_tenant_metrics_and_audit_log(gateway: GatewayProcess) -> None:
    assert _complete(gateway, "beta", "shared-tiny", max_tokens=2, stream=True).status_code == 200
    with gateway.client(key=GATEWAY_ADMIN_KEY) as c:
        text = c.get("/metrics").text
    assert 'deepseek_tenant_requests_total{code="200",model="shared-tiny",tenant="beta"}' in text
    assert 'deepseek_time_to_first_token_seconds_count{model="shared-tiny",tenant="beta"}' in text
    assert 'deepseek_generation_tokens_total{model="shared-tiny",tenant="beta"}' in text
    assert 'deepseek_model_loaded{model="shared-tiny"} 1.0' in text

    deadline = time.monotonic() + 10
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in gateway.audit_path.read_text().splitlines()]
        if any(x.get("tenant") == "beta" and x["endpoint"] == "/v1/completions" for x in lines):
            break
        time.sleep(0.1)
    beta = [x for x in lines if x.get("tenant") == "beta" and x["endpoint"] == "/v1/completions"]
    assert beta and beta[-1]["status"] == 200 and beta[-1]["model"] == "shared-tiny"
    assert beta[-1]["key_id"] == __import__("hashlib").sha256(GATEWAY_KEYS["beta"].encode()).hexdigest()[:12]
    assert beta[-1]["completion_tokens"] > 0
    raw = gateway.audit_path.read_text()
    assert PROMPT not in raw and GATEWAY_KEYS["beta"] not in raw  # no prompt text, no key
    assert any(x["status"] == 401 and "tenant" not in x for x in lines)


# ---------------------------------------------------------------------------------------------- TLS
def test_tls_is_required_and_verified(gateway: GatewayProcess) -> None:
    plain = gateway.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):
        httpx.get(plain + "/health", timeout=10)
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate refuses it
        httpx.get(gateway.url + "/health", verify=ssl.create_default_context(), timeout=10)
    with gateway.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
