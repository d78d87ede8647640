"""Serving pieces that need no model: error shapes, request schemas, auth, audit log, metrics, CLI."""

from __future__ import annotations

import hashlib
import json

import pytest

pytest.importorskip("fastapi")

from deepseek_core import cli
from deepseek_core.serving.audit import AuditLog, AuditRecord
from deepseek_core.serving.auth import APIKeyChecker, bearer_token, key_id, read_key_file
from deepseek_core.serving.errors import OpenAIError, validation_error_to_openai
from deepseek_core.serving.metrics import ServerMetrics
from deepseek_core.serving.protocol import ChatCompletionRequest, CompletionRequest
from deepseek_core.serving.requests import check_context, choice_seed, sampling_kwargs
from pydantic import ValidationError


def _openai_error_from(exc: ValidationError) -> OpenAIError:
    return validation_error_to_openai(exc.errors())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": "x", "temperature": 2.5}, "temperature"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": "m", "prompt": "x", "stop": ""}, "stop"),
        ({"model": "m"}, "prompt"),
    ],
)
def test_invalid_completion_params_become_400_naming_the_param(body: dict, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    err = _openai_error_from(info.value)
    assert err.status_code == 400
    payload = err.body()["error"]
    assert set(payload) == {"message", "type", "param", "code"}
    assert payload["type"] == "invalid_request_error"
    assert payload["param"].split(".")[0] == param
    assert param in payload["message"]


def test_prompt_forms_and_chat_content_parts_are_accepted() -> None:
    for prompt in ("text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompt == prompt
    chat = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "future": 1,
        }
    )
    assert chat.messages[0].content[0].text == "hi"  # type: ignore[index,union-attr]


def test_sampling_kwargs_map_openai_names() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "logprobs": True,
            "top_logprobs": 3,
            "stop": "END",
            "top_p": 0.0,
            "top_k": 5,
            "presence_penalty": 0.5,
        }
    )
    kwargs = sampling_kwargs(req, 7)
    assert kwargs["max_tokens"] == 7 and kwargs["logprobs"] == 3 and kwargs["stop"] == ["END"]
    assert kwargs["temperature"] == 0.0 and kwargs["top_p"] == 1.0  # top_p 0 means greedy
    assert kwargs["top_k"] == 5 and kwargs["presence_penalty"] == 0.5
    plain = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    assert sampling_kwargs(plain, 16)["logprobs"] is None and sampling_kwargs(plain, 16)["temperature"] == 1.0


def test_seeds_of_choices_are_derived_and_distinct() -> None:
    assert choice_seed(None, 3) is None
    seeds = [choice_seed(2**64 - 1, i) for i in range(4)]
    assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)  # type: ignore[operator]
    assert seeds == [choice_seed(2**64 - 1, i) for i in range(4)]


def test_context_length_checks() -> None:
    assert check_context(10, None, 64, "prompt") == 54
    assert check_context(10, 54, 64, "prompt") == 54
    with pytest.raises(OpenAIError) as info:
        check_context(64, None, 64, "prompt")
    assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
    with pytest.raises(OpenAIError) as info:
        check_context(10, 55, 64, "prompt")
    assert info.value.param == "max_tokens"


def test_api_keys_are_checked_and_never_logged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    checker = APIKeyChecker(["alpha", "beta"])
    checker.check("Bearer beta")
    for header in (None, "beta", "Basic beta", "Bearer gamma", "Bearer "):
        with pytest.raises(OpenAIError) as info:
            checker.check(header)
        assert info.value.status_code == 401
    APIKeyChecker(None).check(None)  # no keys: open
    assert bearer_token("Bearer  tok ") == "tok"
    assert key_id("alpha") == hashlib.sha256(b"alpha").hexdigest()[:12] and key_id(None) is None
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\nalpha\n\n beta \n")
    assert read_key_file(keys) == ["alpha", "beta"]
    keys.write_text("\n# none\n")
    with pytest.raises(ValueError, match="no keys"):
        read_key_file(keys)
    with pytest.raises(ValueError, match="missing.txt"):
        read_key_file(tmp_path / "missing.txt")


def test_audit_log_lines_exclude_text_unless_enabled(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "logs" / "audit.jsonl"
    log = AuditLog(path)
    record = AuditRecord(
        request_id="r1",
        key_id=key_id("secret"),
        endpoint="/v1/completions",
        model="m",
        prompt_tokens=5,
        completion_tokens=7,
        prompt_text="SECRET PROMPT",
        completion_text=["SECRET ANSWER"],
    )
    log.write(record, 200, 0.25)
    log.write(AuditRecord(endpoint="/v1/models", error="incorrect API key provided"), 401, 0.001)
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["status"] for x in lines] == [200, 401]
    assert lines[0]["total_tokens"] == 12 and lines[0]["key_id"] == key_id("secret")
    assert lines[0]["outcome"] == "ok" and lines[1]["outcome"] == "error"
    text = path.read_text()
    assert "SECRET" not in text and "secret" not in text
    with_text = AuditLog(tmp_path / "with-text.jsonl", include_text=True)
    with_text.write(record, 200, 0.1)
    with_text.close()
    line = json.loads((tmp_path / "with-text.jsonl").read_text())
    assert line["prompt"] == "SECRET PROMPT" and line["completion"] == ["SECRET ANSWER"]


def test_metrics_have_the_contract_names_and_model_label() -> None:
    class Stats:
        running, waiting, kv_cache_usage = 3, 2, 0.25

    metrics = ServerMetrics("my-model")
    metrics.bind_engine_stats(lambda: Stats())
    metrics.generation_tokens.inc(5)
    metrics.finished("length")
    metrics.error(429)
    metrics.time_to_first_token.observe(0.1)
    text = metrics.render().decode()
    for name in (
        "deepseek_time_to_first_token_seconds_bucket",
        "deepseek_inter_token_latency_seconds_bucket",
        "deepseek_e2e_request_latency_seconds_bucket",
        "deepseek_queue_time_seconds_bucket",
        "deepseek_prompt_tokens_total",
        "deepseek_requests_running",
        "deepseek_requests_waiting",
    ):
        assert name in text, name
    assert 'deepseek_generation_tokens_total{model="my-model"} 5.0' in text
    assert 'deepseek_requests_finished_total{finish_reason="length",model="my-model"} 1.0' in text
    assert 'deepseek_request_errors_total{code="429",model="my-model"} 1.0' in text
    assert 'deepseek_kv_cache_usage_ratio{model="my-model"} 0.25' in text
    assert 'deepseek_requests_running{model="my-model"} 3.0' in text
    # Each server has its own registry: a second one starts from zero.
    assert (
        'deepseek_generation_tokens_total{model="my-model"} 0.0'
        in ServerMetrics("my-model").render().decode()
    )


def test_cli_info_prints_params_and_memory(capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(["info", "deepseek-tiny"]) == 0
    out = capsys.readouterr().out
    from deepseek_core import ModelConfig

    params = ModelConfig.from_preset("deepseek-tiny").param_count()
    assert f"{params:,}" in out and "bfloat16" in out and "float32" in out


def test_cli_errors_name_the_problem(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(["info", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--model", "x", "--port", "70000"])
    assert "70000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--model", "x", "--api-key", "a", "--api-key-file", "f"])
    empty = tmp_path / "keys"
    empty.write_text("")
    assert cli.main(["serve", "--model", "x", "--api-key-file", str(empty)]) == 2
    assert "no keys" in capsys.readouterr().err


def _context(max_waiting: int | None, capacity: int | None, waiting: int = 0, running: bool = True):  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    from deepseek_core.serving.context import ServingContext

    engine = SimpleNamespace(
        tokenizer=None,
        is_running=running,
        stats=lambda: SimpleNamespace(running=0, waiting=waiting, kv_cache_usage=0.0),
    )
    return ServingContext(
        engine=engine,  # type: ignore[arg-type]
        served_model_name="m",
        metrics=ServerMetrics("m"),
        auth=APIKeyChecker(None),
        sampling_params_cls=dict,
        max_model_len=64,
        vocab_size=100,
        max_waiting=max_waiting,
        capacity=capacity,
    )


def test_admission_counts_waiting_sequences_and_refuses_the_excess() -> None:
    ctx = _context(max_waiting=2, capacity=4)
    ctx.admit(4)  # fills the running slots
    ctx.admit(2)  # two waiting: at the limit
    with pytest.raises(OpenAIError) as info:
        ctx.admit(1)
    assert info.value.status_code == 429 and info.value.headers["Retry-After"] == "1"
    ctx.release(3)
    ctx.admit(3)
    assert ctx.inflight_seqs == 6
    with pytest.raises(OpenAIError) as info:  # can never fit: a 400, not an endless 429
        _context(max_waiting=2, capacity=4).admit(7)
    assert info.value.status_code == 400 and info.value.param == "n"
    # The engine's own waiting queue counts too (e.g. when its KV cache, not max_num_seqs, is the limit).
    with pytest.raises(OpenAIError):
        _context(max_waiting=2, capacity=4, waiting=2).admit(1)
    _context(max_waiting=None, capacity=4, waiting=100).admit(50)  # unbounded


def test_draining_and_dead_engine_refuse_with_503() -> None:
    import asyncio

    ctx = _context(max_waiting=None, capacity=4)
    ctx.admit(1)

    async def drain_then_release() -> bool:
        task = asyncio.create_task(ctx.drain(timeout=5))
        await asyncio.sleep(0.01)
        with pytest.raises(OpenAIError) as info:
            ctx.admit(1)
        assert info.value.status_code == 503 and info.value.code == "shutting_down"
        ctx.release(1)
        return await task

    assert asyncio.run(drain_then_release()) is True
    stuck = _context(max_waiting=None, capacity=4)
    stuck.admit(1)
    assert asyncio.run(stuck.drain(timeout=0.05)) is False  # gives up after the timeout
    with pytest.raises(OpenAIError) as info:
        _context(max_waiting=None, capacity=4, running=False).admit(1)
    assert info.value.status_code == 503
