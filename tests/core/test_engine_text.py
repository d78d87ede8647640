"""Text out of the engine: UTF-8-safe streaming, EOS, stop strings and stop token ids, on a model whose greedy
output is known in advance (conftest.ChainModel: it spells the chain text byte by byte, then EOS)."""

from __future__ import annotations

import pytest
from deepseek_core import save_model
from deepseek_core.engine import LLM, SamplingParams

CHAIN = "aé中ж→b"  # 1 + 2 + 3 + 2 + 3 + 1 bytes, no byte repeated


@pytest.fixture
def chain(chain_model):
    model = chain_model(CHAIN)
    return model, LLM(model.model, tokenizer=model.tokenizer, max_num_seqs=4, block_size=4)


def greedy(**kwargs):
    return SamplingParams(temperature=0.0, **{"max_tokens": 32, **kwargs})


def test_stream_never_splits_a_utf8_character(chain):
    _, llm = chain
    assert list(llm.stream("a", greedy())) == ["é", "中", "ж", "→", "b"]


def test_eos_stops_and_is_reported(chain):
    model, llm = chain
    out = llm.generate("a", greedy())[0]
    assert out.prompt_token_ids == model.encode("a")
    assert out.text == "é中ж→b"
    assert out.token_ids == model.chain_ids[1:] + [model.eos_id]
    assert out.finish_reason == "stop" and out.stop_reason is None


def test_ignore_eos_runs_to_max_tokens(chain):
    model, llm = chain
    out = llm.generate("a", greedy(max_tokens=15, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 15
    assert out.token_ids[11] == model.eos_id and out.text == "é中ж→b" + "x" * 3


@pytest.mark.parametrize(
    ("stop", "include", "text"),
    [
        ("ж→", False, "é中"),
        ("ж→", True, "é中ж→"),
        (["zz", "→", "中ж"], False, "é"),  # the earliest match wins
        ("中x", False, "é中ж→b"),  # a partial match that fails is released
    ],
)
def test_stop_strings(chain, stop, include, text):
    _, llm = chain
    out = llm.generate("a", greedy(stop=stop, include_stop_str_in_output=include))[0]
    assert out.text == text
    if text != "é中ж→b":
        assert out.finish_reason == "stop" and out.stop_reason in (stop if isinstance(stop, list) else [stop])
    streamed = list(llm.stream("a", greedy(stop=stop, include_stop_str_in_output=include)))
    assert "".join(streamed) == text


def test_stream_holds_back_a_possible_stop_string(chain):
    _, llm = chain
    deltas = list(llm.stream("a", greedy(stop="→b")))
    assert "".join(deltas) == "é中ж"
    assert all("→" not in d for d in deltas)


def test_stop_token_id(chain):
    model, llm = chain
    zhe_first_byte = model.encode("ж")[0]
    out = llm.generate("a", greedy(stop_token_ids=[zhe_first_byte]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == zhe_first_byte
    assert out.token_ids[-1] == zhe_first_byte and out.text == "é中"


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4])
def test_max_tokens_and_deltas_add_up(chain, max_tokens):
    model, llm = chain
    engine = llm.engine
    rid = engine.add_request("a", greedy(max_tokens=max_tokens, logprobs=1))
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.request_id == rid)
    final = outs[-1]
    assert final.finished and final.finish_reason == "length" and len(final.token_ids) == max_tokens
    assert "".join(o.text_delta for o in outs) == final.text == model.tokenizer.decode(final.token_ids)
    assert sum((o.token_ids_delta for o in outs), []) == final.token_ids
    assert [lp.token_id for o in outs for lp in o.logprobs_delta] == final.token_ids
    assert all(lp.top[0][0] == lp.token_id for lp in final.logprobs)


def test_llm_loads_tokenizer_from_checkpoint_dir(chain_model, tmp_path):
    model = chain_model(CHAIN)
    save_model(model.model, tmp_path / "ckpt", tokenizer=model.tokenizer)
    llm = LLM(str(tmp_path / "ckpt"))
    assert llm.tokenizer is not None
    out = llm.generate(["a", "中"], greedy())
    assert [o.text for o in out] == ["é中ж→b", "ж→b"]
    assert out[1].prompt_token_ids == model.encode("中")
