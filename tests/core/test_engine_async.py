"""AsyncLLM: streaming from a background engine thread, abort, stats, health, shutdown."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from deepseek_core.engine import LLM, AsyncLLM, EngineDeadError, SamplingParams

CHAIN = "aé中ж→b"


@pytest.fixture
def chain_llm(chain_model):
    model = chain_model(CHAIN, then="loop")
    llm = AsyncLLM(model.model, tokenizer=model.tokenizer, max_num_seqs=4, block_size=4)
    yield model, llm
    llm.shutdown()


async def _collect(llm: AsyncLLM, prompt, params, request_id=None):
    return [out async for out in llm.generate(prompt, params, request_id=request_id)]


def test_async_stream_deltas(chain_llm):
    _, llm = chain_llm
    outs = asyncio.run(_collect(llm, "a", SamplingParams(max_tokens=11, temperature=0.0), "r1"))
    assert [o.text_delta for o in outs if o.text_delta] == ["é", "中", "ж", "→", "b"]
    assert all(o.request_id == "r1" for o in outs)
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert (
        outs[-1].finish_reason == "length" and outs[-1].text == "é中ж→b" and outs[-1].completion_tokens == 11
    )
    assert outs[-1].metrics.first_token_time >= outs[-1].metrics.arrival_time


def test_concurrent_requests_match_sync_engine(engine_hf_checkpoint):
    directory, _ = engine_hf_checkpoint("deepseek_v3")
    prompts = [
        torch.randint(2, 160, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        for n in (2, 9, 20, 33)
    ]
    params = [SamplingParams(max_tokens=10 + 5 * i, temperature=0.0, ignore_eos=True) for i in range(4)]
    params[2] = SamplingParams(max_tokens=20, temperature=0.9, top_k=30, seed=4)
    expected = [o.token_ids for o in LLM(str(directory)).generate(prompts, params)]
    llm = AsyncLLM(str(directory), max_num_seqs=3, max_num_batched_tokens=16, block_size=4)

    async def main():
        return await asyncio.gather(*(_collect(llm, p, sp) for p, sp in zip(prompts, params)))

    try:
        results = asyncio.run(main())
        assert [r[-1].token_ids for r in results] == expected
        assert [sum((o.token_ids_delta for o in r), []) for r in results] == expected
        stats = llm.stats()
        assert stats.requests_finished_total == 4 and stats.generation_tokens_total == sum(map(len, expected))
        assert stats.running == stats.waiting == 0 and stats.kv_cache_usage == 0.0
    finally:
        llm.shutdown()


def test_abort_frees_blocks_at_once(chain_llm):
    _, llm = chain_llm
    total = llm.stats().num_blocks

    async def main():
        stream = llm.generate("a", SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True), "long")
        outs = [await stream.__anext__(), await stream.__anext__()]
        stats = llm.stats()
        assert stats.running == 1 and stats.num_free_blocks < total and 0 < stats.kv_cache_usage < 1
        llm.abort("long")
        assert llm.stats().num_free_blocks == total and llm.stats().running == 0
        outs += [o async for o in stream]
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert 2 <= len(outs[-1].token_ids) < 500
    with pytest.raises(ValueError, match="request_id: unknown request 'long'"):
        llm.abort("long")
    with pytest.raises(ValueError, match="request_id: unknown request 'never'"):
        llm.abort("never")


def test_leaving_the_stream_early_aborts(chain_llm):
    _, llm = chain_llm

    async def main():
        stream = llm.generate("a", SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True), "early")
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(main())
    stats = llm.stats()
    assert stats.running == 0 and stats.num_free_blocks == stats.num_blocks
    with pytest.raises(ValueError):
        llm.abort("early")


def test_bad_request_fails_alone(chain_llm):
    _, llm = chain_llm

    async def main():
        good = asyncio.create_task(_collect(llm, "a", SamplingParams(max_tokens=30, temperature=0.0), "good"))
        await asyncio.sleep(0)
        errors = []
        for prompt, params in [
            ([], None),
            ([1] * 600, None),
            ([1, 999], None),
            ("a", SamplingParams(max_tokens=3, stop_token_ids=[10_000])),
        ]:
            with pytest.raises(ValueError) as info:
                await _collect(llm, prompt, params)
            errors.append(str(info.value))
        with pytest.raises(ValueError, match="request_id: 'good' is already in use"):
            await _collect(llm, "a", None, "good")
        return errors, await good

    errors, good = asyncio.run(main())
    assert errors[0].startswith("prompt: is empty")
    assert "max_model_len=512" in errors[1] and "token id 999" in errors[2] and "stop_token_ids" in errors[3]
    assert good[-1].finish_reason == "length" and good[-1].completion_tokens == 30
    assert good[-1].text.startswith("é中ж→baé中")


def test_health_and_shutdown(chain_model):
    model = chain_model(CHAIN, then="loop")
    llm = AsyncLLM(model.model, tokenizer=model.tokenizer)
    assert llm.max_model_len == 512 and llm.config is model.config and llm.tokenizer is model.tokenizer

    async def main():
        await llm.check_health()
        stream = llm.generate("a", SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True))
        first = await stream.__anext__()
        llm.shutdown()
        rest = [o async for o in stream]
        with pytest.raises(EngineDeadError):
            await llm.check_health()
        with pytest.raises(EngineDeadError):
            await _collect(llm, "a", None)
        return first, rest

    first, rest = asyncio.run(main())
    assert not first.finished and rest[-1].finish_reason == "abort"


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_idle_step_priority_runs_only_the_stepping_thread_at_idle(chain_model):
    model = chain_model(CHAIN, then="loop")
    idle = AsyncLLM(
        model.model, tokenizer=model.tokenizer, max_num_seqs=2, block_size=4, step_priority="idle"
    )
    normal = AsyncLLM(model.model, tokenizer=model.tokenizer, max_num_seqs=2, block_size=4)
    try:
        # The engine steps (and answers) at idle priority; the caller's thread and the default keep theirs.
        outs = asyncio.run(_collect(idle, "a", SamplingParams(max_tokens=11, temperature=0.0)))
        assert outs[-1].text == "é中ж→b"
        assert os.sched_getscheduler(idle._thread.native_id) == os.SCHED_IDLE
        assert os.sched_getscheduler(normal._thread.native_id) == os.SCHED_OTHER
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        idle.shutdown()
        normal.shutdown()


def test_a_bad_step_priority_names_the_parameter(chain_model):
    model = chain_model(CHAIN, then="loop")
    with pytest.raises(ValueError, match="step_priority: must be one of 'normal', 'idle', got 'high'"):
        AsyncLLM(model.model, tokenizer=model.tokenizer, step_priority="high")
