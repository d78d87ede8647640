"""One bad request never harms another: numerical edges, NaN/inf logits, failing detokenizers, bad prompts.

The model is a ChainModel (greedy decoding known in advance) whose token "Z" has a NaN embedding: a request
that reaches "Z" gets NaN logits from the next step on, while the others never touch it. Its NaN keys and
values stay in its cache blocks, so the tests also catch another request reading them (0 * NaN is NaN even
under an attention mask), in the same batch or later from recycled blocks.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch
from deepseek_core.engine import LLM, AsyncLLM, RequestFailedError, SamplingParams
from deepseek_core.engine.sampling import sample

CHAIN = "WXYZabcdefghijklmnopqrstuvw"  # "W" walks into the NaN token "Z" after 3 tokens; "a" never does
GOOD = "bcdefghijklmnopqrstuvw"  # what "a" greedily continues with (then EOS)
GREEDY = SamplingParams(max_tokens=40, temperature=0.0)


def _poisoned(chain_model, logit_scale: float = 1.0):  # type: ignore[no-untyped-def]
    """The chain model with a NaN embedding for "Z" (and logits scaled by `logit_scale`)."""
    model = chain_model(CHAIN, default=".")
    with torch.no_grad():
        model.model.model.embed_tokens.weight[model.encode("Z")[0]] = float("nan")
        model.model.lm_head.weight.mul_(logit_scale)
    return model


def _llm(model, **kwargs) -> LLM:  # type: ignore[no-untyped-def]
    return LLM(
        model.model, tokenizer=model.tokenizer, max_num_seqs=8, block_size=4, num_kv_blocks=64, **kwargs
    )


def _assert_idle(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.running == stats.waiting == 0 and not llm.engine.has_unfinished_requests()
    assert stats.num_free_blocks == stats.num_blocks


# ------------------------------------------------------------------------------------------ non-finite logits
@pytest.mark.parametrize("bad_first", [True, False])
def test_nan_logits_end_only_their_request(chain_model, bad_first) -> None:  # type: ignore[no-untyped-def]
    llm = _llm(_poisoned(chain_model))
    # Long prompts of digits (not in the chain: each maps to ".", the last token decides the rest) make the
    # requests' block tables differ in length, so decode attention pads the shorter ones' gathers.
    good = {"a": "a", "long_a": "0123456789" * 2 + "a", "dots": "9"}
    bad = {"W": "W", "long_W": "0123456789" * 3 + "W", "Z_prompt": "01Z"}
    names = [*bad, *good] if bad_first else [*good, *bad]
    prompts = {**good, **bad}
    params = [SamplingParams(max_tokens=12, temperature=0.0) if n == "dots" else GREEDY for n in names]
    outs = dict(zip(names, llm.generate([prompts[n] for n in names], params)))

    assert outs["a"].text == outs["long_a"].text == GOOD and outs["a"].finish_reason == "stop"
    assert outs["dots"].text == "." * 12 and outs["dots"].finish_reason == "length"
    for name in ("W", "long_W"):  # "X", "Y", "Z" came out; the step that read "Z" failed
        assert outs[name].text == "XYZ" and outs[name].finish_reason == "abort", name
        assert "non-finite logits" in outs[name].error, outs[name].error
    assert outs["Z_prompt"].token_ids == [] and outs["Z_prompt"].finish_reason == "abort"
    assert all(outs[n].error is None for n in good)
    _assert_idle(llm)
    assert llm.engine.stats().requests_failed_total == 3
    # The failed requests' blocks (NaN keys/values) are recycled: later requests must not read garbage.
    again = llm.generate(["a", "0123456789" * 3 + "a", "5a"], GREEDY)
    assert [o.text for o in again] == [GOOD] * 3 and all(o.error is None for o in again)


def test_nan_logits_with_sampling_and_logprobs(chain_model) -> None:  # type: ignore[no-untyped-def]
    """Seeded sampling, penalties and logprobs of the healthy rows are exactly what they are alone."""
    llm = _llm(_poisoned(chain_model, logit_scale=4.0))
    healthy = [
        ("a", SamplingParams(max_tokens=15, temperature=1.0, seed=5, logprobs=2, ignore_eos=True)),
        ("c", SamplingParams(max_tokens=15, temperature=0.7, top_p=0.9, min_p=0.01, seed=9)),
        ("e", SamplingParams(max_tokens=15, temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5)),
    ]
    alone = [llm.generate([p], sp)[0] for p, sp in healthy]
    mixed = llm.generate(["W", *(p for p, _ in healthy), "Z"], [GREEDY, *(sp for _, sp in healthy), GREEDY])
    assert mixed[0].finish_reason == mixed[-1].finish_reason == "abort"
    for got, want in zip(mixed[1:-1], alone):
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
        assert got.error is None
    assert [(lp.token_id, lp.top) for lp in mixed[1].logprobs] == [
        (lp.token_id, lp.top) for lp in alone[0].logprobs
    ]
    _assert_idle(llm)


@pytest.mark.parametrize("kind", ["llama_gqa", "deepseek_v3"])
def test_nan_token_in_real_models_isolated(kind, engine_hf_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """GQA and MLA+MoE models: a request whose prompt holds a NaN-embedded token fails alone."""
    from deepseek_core import load_model

    directory, _ = engine_hf_checkpoint(kind)
    model = load_model(directory)
    llm = LLM(model, max_num_seqs=6, max_num_batched_tokens=32, block_size=4, num_kv_blocks=96)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(2, 160, (n,), generator=gen).tolist() for n in (3, 17, 9)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts]
    used = {t for p, out in zip(prompts, alone) for t in p + out}
    poison = next(t for t in range(2, 160) if t not in used)
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    bad = [[poison], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, poison, 3]]
    outs = llm.generate([bad[1], *prompts, bad[0]], params)
    assert [o.finish_reason for o in (outs[0], outs[-1])] == ["abort", "abort"]
    assert [o.token_ids for o in outs[1:-1]] == alone
    assert [llm.generate([p], params)[0].token_ids for p in prompts] == alone
    _assert_idle(llm)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=6, temperature=1e-30),
        SamplingParams(max_tokens=6, temperature=1e-30, top_p=0.5, top_k=3, min_p=0.2),
        SamplingParams(max_tokens=6, temperature=1.0, repetition_penalty=1e-30),
        SamplingParams(max_tokens=6, temperature=0.5, repetition_penalty=1e30, top_p=0.9),
        SamplingParams(max_tokens=6, temperature=0.0, repetition_penalty=1e-30),
        SamplingParams(max_tokens=6, temperature=2.0, presence_penalty=2, frequency_penalty=-2, seed=1),
    ],
    ids=["tiny_temperature", "tiny_temperature_filters", "tiny_rep", "huge_rep", "greedy_tiny_rep", "pen"],
)
def test_extreme_sampling_values_are_numerically_safe(chain_model, params) -> None:  # type: ignore[no-untyped-def]
    """Huge logits (1e10) with a vanishing temperature or an extreme penalty: no error, no harm to others."""
    model = chain_model(CHAIN, default=".")
    with torch.no_grad():
        model.model.lm_head.weight.mul_(1e10)
    llm = _llm(model)
    outs = llm.generate(["abc", "a"], [params, GREEDY])
    assert outs[1].text == GOOD and outs[1].finish_reason == "stop"
    assert outs[0].error is None and outs[0].finish_reason == "length" and len(outs[0].token_ids) == 6
    if params.temperature < 1e-5:  # a vanishing temperature is greedy
        assert outs[0].text == "defghi"
    _assert_idle(llm)


def test_sample_handles_infinite_and_tiny_temperature_rows() -> None:
    from deepseek_core.engine.sampling import sample_rows

    from .test_engine_sampling import _seq

    logits = torch.tensor(
        [
            [1e38, 3e38, -1e38, 0.0],  # finite, but overflows once divided by a small temperature
            [0.0, float("nan"), 1.0, 2.0],  # broken row
            [float("-inf"), 1.0, float("-inf"), 0.5],  # -inf masks are fine
            [0.0, float("inf"), 1.0, 2.0],  # +inf is not a logit
            [float("-inf")] * 4,  # nothing left to choose from
        ]
    )
    seqs = [_seq(SamplingParams(temperature=1e-3, seed=s), seed=s) for s in range(5)]
    tokens, _, errors = sample_rows(logits, seqs)
    assert tokens[0] == 1 and tokens[2] == 1
    assert sorted(errors) == [1, 3, 4] and all("non-finite" in e for e in errors.values())
    with pytest.raises(RuntimeError, match=r"row 1: .*non-finite"):
        sample(logits, seqs)


# ------------------------------------------------------------------------------------------ detokenization
class _ExplodingDecoder:
    """Decodes like the real one, then raises on the `after`-th token."""

    def __init__(self, inner, after: int) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.left = inner, after

    def push(self, ids):  # type: ignore[no-untyped-def]
        self.left -= 1
        if self.left == 0:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "broken tokenizer")
        return self.inner.push(ids)

    def flush(self) -> str:
        return self.inner.flush()


def test_detokenizer_failure_ends_only_its_request(chain_model) -> None:  # type: ignore[no-untyped-def]
    model = chain_model(CHAIN, default=".")
    llm = _llm(model)
    engine = llm.engine
    rids = [engine.add_request(p, GREEDY) for p in ("a", "c", "e")]
    stop = engine.add_request("a", SamplingParams(max_tokens=40, temperature=0.0, stop=["klm"]))
    broken = engine._requests[rids[1]]
    broken.decoder = _ExplodingDecoder(broken.decoder, after=4)
    finals = {}
    for _ in range(200):
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert finals[rids[0]].text == GOOD and finals[rids[2]].text == GOOD[4:]
    assert finals[stop].text == "bcdefghij" and finals[stop].finish_reason == "stop"
    failed = finals[rids[1]]
    assert failed.finish_reason == "abort" and failed.text == "def"
    assert "UnicodeDecodeError" in failed.error and "broken tokenizer" in failed.error
    _assert_idle(llm)


# ------------------------------------------------------------------------------------------ LLM.generate
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("x" * 300, r"prompts\[2\]: prompt: 300 tokens exceed the context window \(max_model_len=256\)"),
        ("", r"prompts\[2\]: prompt: is empty"),
        ([5, 258, 6], r"prompts\[2\]: prompt: token id 258 is outside the vocabulary \[0, 258\)"),
        ([], r"prompts\[2\]: prompt: is empty"),
        (3.5, r"prompts\[2\]: prompt: must be a string or a list of token ids, got float"),
    ],
)
def test_generate_validates_every_prompt_before_running(chain_model, bad, message) -> None:  # type: ignore[no-untyped-def]
    model = chain_model(CHAIN, default=".")
    llm = _llm(model)
    before = llm.engine.stats()
    with pytest.raises(ValueError, match=message):
        llm.generate(["a", "c", bad, "e"], GREEDY)
    after = llm.engine.stats()
    _assert_idle(llm)
    assert (after.prompt_tokens_total, after.requests_finished_total, after.steps_total) == (
        before.prompt_tokens_total,
        before.requests_finished_total,
        before.steps_total,
    )
    assert [o.text for o in llm.generate(["a", "e"], GREEDY)] == [GOOD, GOOD[4:]]


def test_generate_validates_every_params_before_running(chain_model) -> None:  # type: ignore[no-untyped-def]
    model = chain_model(CHAIN, default=".")
    llm = _llm(model)
    broken = SamplingParams(max_tokens=4)
    broken.temperature = -1.0  # dataclass fields can be changed after validation
    with pytest.raises(ValueError, match=r"params\[1\]: SamplingParams.temperature"):
        llm.generate(["a", "c"], [GREEDY, broken])
    with pytest.raises(ValueError, match=r"params\[0\]: params: must be a SamplingParams, got dict"):
        llm.generate(["a"], [{"max_tokens": 3}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"params\[1\]: SamplingParams.stop_token_ids"):
        llm.generate(["a", "c"], [GREEDY, SamplingParams(stop_token_ids=[999])])
    _assert_idle(llm)
    assert llm.engine.stats().requests_finished_total == 0
    assert llm.generate("a", GREEDY)[0].text == GOOD


def test_stream_raises_when_its_request_fails(chain_model) -> None:  # type: ignore[no-untyped-def]
    llm = _llm(_poisoned(chain_model))
    deltas = []
    with pytest.raises(RequestFailedError, match="non-finite logits") as info:
        for delta in llm.stream("W", GREEDY):
            deltas.append(delta)
    assert "".join(deltas) == "XYZ" and info.value.reason.startswith("the model produced non-finite")
    _assert_idle(llm)


# ------------------------------------------------------------------------------------------ AsyncLLM
def test_async_failed_request_gets_an_error_others_complete(chain_model) -> None:  # type: ignore[no-untyped-def]
    model = _poisoned(chain_model)
    llm = AsyncLLM(model.model, tokenizer=model.tokenizer, max_num_seqs=8, block_size=4, num_kv_blocks=64)

    async def run(prompt: str):  # type: ignore[no-untyped-def]
        outs = []
        try:
            async for out in llm.generate(prompt, GREEDY):
                outs.append(out)
        except RequestFailedError as exc:
            return outs, exc
        return outs, None

    async def main():  # type: ignore[no-untyped-def]
        return await asyncio.gather(*(run(p) for p in ("a", "W", "0123456789a", "0123W", "c")))

    try:
        results = asyncio.run(main())
        for (outs, error), want in zip(results, (GOOD, None, GOOD, None, GOOD[2:])):
            if want is None:
                assert isinstance(error, RequestFailedError) and "non-finite logits" in error.reason
                assert "".join(o.text_delta for o in outs) == "XYZ"
            else:
                assert error is None and outs[-1].text == want and outs[-1].finish_reason == "stop"
        asyncio.run(llm.check_health())
        assert llm.is_running
        stats = llm.stats()
        assert stats.running == stats.waiting == 0 and stats.num_free_blocks == stats.num_blocks
        assert stats.requests_failed_total == 2
        again = asyncio.run(run("a"))
        assert again[1] is None and again[0][-1].text == GOOD
    finally:
        llm.shutdown()


# ------------------------------------------------------------------------------------------ the HTTP server
@pytest.mark.integration
def test_server_failed_request_gets_an_error_others_complete(chain_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A real `deepseek-core serve`: the failing request gets a 500 / an SSE error event, the rest succeed."""
    httpx = pytest.importorskip("httpx")
    from deepseek_core import save_model

    from .conftest import ServerProcess

    model = _poisoned(chain_model)
    directory = save_model(model.model, tmp_path / "poisoned", tokenizer=model.tokenizer)
    server = ServerProcess(
        ["--model", str(directory), "--served-model-name", "chain", "--log-level", "warning"],
        tmp_path / "server.log",
    )
    try:
        server.wait_ready()
        url = server.url + "/v1/completions"

        def body(prompt: str, stream: bool = False) -> dict:  # type: ignore[type-arg]
            return {"model": "chain", "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": stream}

        results: dict[str, object] = {}

        def call(name: str, prompt: str, stream: bool) -> None:
            with httpx.Client(timeout=60) as client:
                if not stream:
                    results[name] = client.post(url, json=body(prompt))
                    return
                with client.stream("POST", url, json=body(prompt, True)) as response:
                    events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
                results[name] = (response.status_code, events)

        calls = [
            ("good", "a", False),
            ("bad", "W", False),
            ("good_stream", "0123456789a", True),
            ("bad_stream", "0123W", True),
            ("good2", "c", False),
        ]
        threads = [threading.Thread(target=call, args=c) for c in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)

        for name, want in (("good", GOOD), ("good2", GOOD[2:])):
            response = results[name]
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            assert choice["text"] == want and choice["finish_reason"] == "stop"
        bad = results["bad"]
        assert bad.status_code == 500
        error = bad.json()["error"]
        assert "non-finite logits" in error["message"] and error["code"] == "generation_failed"

        status, events = results["good_stream"]
        chunks = [json.loads(e) for e in events[:-1]]
        assert status == 200 and events[-1] == "[DONE]"
        assert "".join(c["choices"][0]["text"] for c in chunks) == GOOD
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        status, events = results["bad_stream"]
        assert status == 200 and events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert "non-finite logits" in last["error"]["message"]
        streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
        assert streamed == "XYZ"

        with httpx.Client(timeout=30) as client:
            assert client.get(server.url + "/health").status_code == 200
            assert client.get(server.url + "/ready").status_code == 200
            after = client.post(url, json=body("a"))
            assert after.status_code == 200 and after.json()["choices"][0]["text"] == GOOD
            metrics = client.get(server.url + "/metrics").text
        assert 'deepseek_requests_running{model="chain"} 0.0' in metrics
        # The 500 answer and the failed stream (its headers said 200) are both counted.
        assert 'deepseek_request_errors_total{code="500",model="chain"} 2.0' in metrics
        assert 'deepseek_requests_finished_total{finish_reason="abort",model="chain"} 2.0' in metrics
    finally:
        server.stop()
