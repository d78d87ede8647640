"""The official `openai` client, unchanged, against a real `deepseek-core serve` on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.integration

PROMPT = "the model reads a token and"


@pytest.fixture(scope="module")
def client(live_server):  # type: ignore[no-untyped-def]
    with openai.OpenAI(base_url=live_server.url + "/v1", api_key="test-key", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(serving_model_dir: Path):  # type: ignore[no-untyped-def]
    """The in-process engine on the same checkpoint: what the server must reproduce."""
    from deepseek_core.engine import LLM, SamplingParams

    llm = LLM(str(serving_model_dir), max_num_seqs=8)

    def greedy(prompt: str | list[int], max_tokens: int, **kwargs):  # type: ignore[no-untyped-def]
        return llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs))[0]

    greedy.llm = llm  # type: ignore[attr-defined]
    return greedy


def test_models_list(client) -> None:  # type: ignore[no-untyped-def]
    models = list(client.models.list())
    assert [m.id for m in models] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_completion_matches_the_engine(client, reference) -> None:  # type: ignore[no-untyped-def]
    expected = reference(PROMPT, 12)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny" and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream_equals_non_stream(client, reference) -> None:  # type: ignore[no-untyped-def]
    expected = reference(PROMPT, 20)
    stream = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        for c in chunk.choices:
            texts.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(texts) == expected.text
    assert finish == expected.finish_reason
    assert usage is not None and usage.completion_tokens == len(expected.token_ids)


def test_chat_completion_and_stream(client, serving_model_dir: Path, reference) -> None:  # type: ignore[no-untyped-def]
    from deepseek_core import Tokenizer

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a cache ?"}]
    prompt_ids = Tokenizer.from_pretrained(serving_model_dir).apply_chat_template(messages, tokenize=True)
    expected = reference(list(prompt_ids), 16)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(expected.token_ids)

    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_completion_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [expected.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_stop_sequences(client, reference) -> None:  # type: ignore[no-untyped-def]
    full = reference(PROMPT, 40, ignore_eos=True).text
    stop = next(full[i : i + 3] for i in range(4, len(full) - 3) if full[i : i + 3].strip())
    want = full[: full.index(stop)]
    r = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    # A list of stops, streamed: the earliest match wins, the stop string is not in the output.
    stream = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=40,
        temperature=0,
        stream=True,
        stop=["\u0000never", stop],
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens(client) -> None:  # type: ignore[no-untyped-def]
    for max_tokens in (1, 7):
        r = client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=max_tokens,
            temperature=0.8,
            extra_body={"ignore_eos": True},
        )
        assert r.usage.completion_tokens == max_tokens and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=5,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_n_choices_and_seeded_sampling_repeats(client) -> None:  # type: ignore[no-untyped-def]
    def sample(seed: int | None, n: int = 3):  # type: ignore[no-untyped-def]
        return client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=12,
            temperature=1.0,
            n=n,
            seed=seed,
            extra_body={"ignore_eos": True},
        )

    first, again, other = sample(1234), sample(1234), sample(99)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]  # the same seed repeats, choice by choice
    assert len(set(texts)) > 1  # choices use different derived seeds
    assert [c.text for c in other.choices] != texts
    assert first.usage.completion_tokens == 3 * 12
    # Choice i of n is seeded as a single request would be with the i-th derived seed: choice 0 == n=1.
    assert sample(1234, n=1).choices[0].text == texts[0]
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        max_tokens=6,
        seed=5,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    per_choice: dict[int, str] = {}
    for chunk in chat:
        for c in chunk.choices:
            per_choice[c.index] = per_choice.get(c.index, "") + (c.delta.content or "")
    assert sorted(per_choice) == [0, 1]


def test_logprobs(client, reference) -> None:  # type: ignore[no-untyped-def]
    expected = reference(PROMPT, 6, logprobs=3)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text or r.choices[0].finish_reason == "stop"
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for chosen, top, ref in zip(lp.token_logprobs, lp.top_logprobs, expected.logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert chosen == pytest.approx(ref.logprob, abs=1e-4)
        assert chosen >= max(top.values()) - 1e-4  # greedy picks the most likely token

    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob <= 0
        assert item.bytes == list(item.token.encode("utf-8"))
    none = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert none.choices[0].logprobs is None


def test_errors_have_the_openai_shape(client, live_server) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x " * 2000, max_tokens=4)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=600)
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=PROMPT, temperature=3.0)
    assert info.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=PROMPT)
    with (
        openai.OpenAI(base_url=live_server.url + "/v1", api_key="wrong", max_retries=0) as bad,
        pytest.raises(openai.AuthenticationError),
    ):
        bad.models.list()
    raw = httpx.post(
        live_server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": "Bearer test-key", "Content-Type": "application/json"},
    )
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.get(live_server.url + "/v1/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"


def test_health_ready_metrics_and_audit(client, live_server) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(live_server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(live_server.url + "/ready").status_code == 200
    secret = "PROMPT-TEXT-MUST-NOT-BE-LOGGED"
    client.completions.create(model="tiny", prompt=secret, max_tokens=3)
    assert (
        httpx.get(live_server.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    )
    metrics = httpx.get(live_server.url + "/metrics").text
    assert 'deepseek_generation_tokens_total{model="tiny"}' in metrics
    assert 'deepseek_request_errors_total{code="401",model="tiny"}' in metrics
    deadline = time.monotonic() + 10
    lines: list[dict] = []
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in live_server.audit_path.read_text().splitlines()]
        if any(x["status"] == 200 and x["endpoint"] == "/v1/completions" for x in lines) and any(
            x["status"] == 401 for x in lines
        ):
            break
        time.sleep(0.1)
    text = live_server.audit_path.read_text()
    assert secret not in text and "test-key" not in text
    ok = [x for x in lines if x["status"] == 200 and x["endpoint"] == "/v1/completions"]
    assert ok and all(x["key_id"] == hashlib.sha256(b"test-key").hexdigest()[:12] for x in ok)
    assert all(x["completion_tokens"] >= 1 and x["latency_s"] > 0 for x in ok)
    refused = [x for x in lines if x["status"] == 401 and x["endpoint"] == "/v1/models"]
    assert refused and refused[-1]["key_id"] == hashlib.sha256(b"nope").hexdigest()[:12]
    assert refused[-1]["outcome"] == "error"
