"""Bad requests fail alone, with a ValueError naming the parameter; the engine keeps serving the others."""

from __future__ import annotations

import pytest
from deepseek_core import ModelConfig, Transformer
from deepseek_core.engine import LLM, SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("stop", [""]),
        ("stop", 5),
        ("stop_token_ids", [-1]),
        ("seed", "7"),
        ("logprobs", -1),
        ("logprobs", 21),
        ("ignore_eos", "yes"),
    ],
)
def test_sampling_params_validated_at_construction(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_defaults_and_normalization():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (16, 1.0, 1.0, -1, 0.0)
    assert p.logprobs is None and p.stop is None and not p.greedy
    assert SamplingParams(stop="ab").stop_strings == ("ab",)
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    SamplingParams(top_k=0, top_p=1.0, min_p=0.0, logprobs=0, seed=0)  # boundary values are valid


@pytest.fixture(scope="module")
def llm():
    config = ModelConfig.from_preset("deepseek-tiny", max_position_embeddings=64, num_hidden_layers=2)
    return LLM(Transformer(config), max_num_seqs=4, block_size=8)


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ([], None, "prompt: is empty"),
        ([5] * 65, None, r"prompt: 65 tokens exceed the context window \(max_model_len=64\)"),
        ([5, 4096], None, r"prompt: token id 4096 is outside the vocabulary \[0, 4096\)"),
        ([5, -1], None, "prompt: token id -1"),
        ([5, 2.0], None, "prompt: token ids must be integers"),
        ("text", None, "prompt: text prompts need a tokenizer"),
        ([5, 6], SamplingParams(stop="x"), "SamplingParams.stop: stop strings need a tokenizer"),
        ([5, 6], SamplingParams(stop_token_ids=[9999]), "SamplingParams.stop_token_ids"),
        ([5, 6], {"max_tokens": 3}, "params: must be a SamplingParams"),
    ],
)
def test_bad_request_fails_alone(llm, prompt, params, match):
    engine = llm.engine
    good = engine.add_request([3, 4, 5], SamplingParams(max_tokens=6, temperature=0.0), request_id="good")
    engine.step()
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt, params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals[good].finish_reason == "length" and len(finals[good].token_ids) == 6
    assert engine.stats().num_free_blocks == engine.cache.num_blocks


def test_abort_unknown_request_id(llm):
    with pytest.raises(ValueError, match="request_id: unknown request 'nope'"):
        llm.engine.abort_request("nope")


def test_duplicate_request_id(llm):
    llm.engine.add_request([1, 2], SamplingParams(max_tokens=2), request_id="dup")
    with pytest.raises(ValueError, match="request_id: 'dup' is already in use"):
        llm.engine.add_request([1, 2], SamplingParams(max_tokens=2), request_id="dup")
    llm.engine.abort_request("dup")


def test_generate_rejects_a_bad_prompt_in_a_list_then_keeps_working(llm):
    params = SamplingParams(max_tokens=5, temperature=0.0)
    before = llm.generate([[7, 8, 9]], params)[0].token_ids
    with pytest.raises(ValueError, match=r"prompts\[1\]: prompt: is empty"):
        llm.generate([[7, 8, 9], []], params)
    assert llm.engine.stats().running == llm.engine.stats().waiting == 0  # the good one was withdrawn
    assert llm.generate([[7, 8, 9]], params)[0].token_ids == before
    with pytest.raises(ValueError, match="params: 1 SamplingParams for 2 prompts"):
        llm.generate([[1], [2]], [params])


def test_prompt_as_long_as_the_context_window_finishes_by_length(llm):
    out = llm.generate([[5] * 64], SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_kv_blocks": 0}, "num_kv_blocks"),
        ({"block_size": 0}, "block_size"),
        ({"kv_cache_bytes": 10}, "kv_cache_bytes"),
        ({"num_kv_blocks": 4, "kv_cache_bytes": 1 << 20}, "num_kv_blocks, kv_cache_bytes"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"dtype": "float12"}, "dtype"),
    ],
)
def test_bad_engine_arguments(kwargs, match):
    config = ModelConfig.from_preset("deepseek-tiny", num_hidden_layers=1)
    with pytest.raises(ValueError, match=match):
        LLM(Transformer(config), **kwargs)


def test_model_argument_must_be_model_or_directory():
    with pytest.raises(ValueError, match="model_or_dir"):
        LLM(42)  # type: ignore[arg-type]
