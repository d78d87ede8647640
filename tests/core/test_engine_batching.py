"""Continuous batching: requests that share steps give exactly what each gives alone."""

from __future__ import annotations

import pytest
import torch
from deepseek_core.engine import LLM, SamplingParams

pytest.importorskip("transformers")


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _alone(llm: LLM, prompt: list[int], params: SamplingParams):
    return llm.generate([prompt], params)[0]


def _run(llm: LLM, schedule: dict[int, list[tuple[str, list[int], SamplingParams]]], aborts: dict[int, str]):
    """Drive the engine by hand: add requests / abort at given step numbers; return final outputs by id."""
    engine = llm.engine
    finals = {}
    step = 0
    pending = dict(schedule)
    while pending or engine.has_unfinished_requests():
        for rid, prompt, params in pending.pop(step, []):
            engine.add_request(prompt, params, request_id=rid)
        if step in aborts:
            out = engine.abort_request(aborts[step])
            finals[out.request_id] = out
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        step += 1
        assert step < 2000
    return finals


@pytest.mark.parametrize(
    ("kind", "per_sequence"), [("llama_gqa", False), ("deepseek_v3", False), ("llama_gqa", True)]
)
def test_mixed_batch_equals_each_alone(kind, per_sequence, engine_hf_checkpoint, monkeypatch):
    if per_sequence:  # decode attention one sequence at a time (long contexts on CPU)
        monkeypatch.setattr("deepseek_core.engine.runner._LOOP_MIN_BYTES", 0)
    directory, _ = engine_hf_checkpoint(kind)
    llm = LLM(str(directory), max_num_seqs=4, max_num_batched_tokens=16, block_size=4)
    vocab = llm.config.vocab_size
    greedy = dict(temperature=0.0, ignore_eos=True)
    probe = _alone(llm, _prompt(vocab, 9, 3), SamplingParams(max_tokens=30, **greedy)).token_ids
    stop_at = next(i for i in range(5, 30) if probe[i] not in probe[:i])
    requests = {
        "short": (_prompt(vocab, 3, 1), SamplingParams(max_tokens=20, **greedy)),
        "long": (_prompt(vocab, 25, 2), SamplingParams(max_tokens=9, **greedy)),
        "stop_id": (
            _prompt(vocab, 9, 3),
            SamplingParams(max_tokens=30, stop_token_ids=[probe[stop_at]], **greedy),
        ),
        "seeded": (_prompt(vocab, 14, 4), SamplingParams(max_tokens=18, temperature=0.8, top_p=0.9, seed=3)),
        "late": (_prompt(vocab, 40, 5), SamplingParams(max_tokens=16, **greedy)),
        "later": (_prompt(vocab, 7, 6), SamplingParams(max_tokens=25, logprobs=2, **greedy)),
        "aborted": (_prompt(vocab, 11, 7), SamplingParams(max_tokens=40, **greedy)),
    }
    alone = {rid: _alone(llm, p, sp) for rid, (p, sp) in requests.items()}
    assert alone["stop_id"].token_ids == probe[: stop_at + 1] and alone["stop_id"].finish_reason == "stop"

    schedule = {
        0: [(rid, *requests[rid]) for rid in ("short", "long", "stop_id", "seeded", "aborted")],
        5: [("late", *requests["late"])],
        8: [("later", *requests["later"])],
    }
    finals = _run(llm, schedule, aborts={6: "aborted"})
    for rid in requests:
        if rid == "aborted":
            continue
        assert finals[rid].token_ids == alone[rid].token_ids, rid
        assert finals[rid].finish_reason == alone[rid].finish_reason, rid
    got_lp = [(lp.token_id, [t for t, _ in lp.top]) for lp in finals["later"].logprobs]
    want_lp = [(lp.token_id, [t for t, _ in lp.top]) for lp in alone["later"].logprobs]
    assert got_lp == want_lp
    aborted = finals["aborted"]
    assert aborted.finish_reason == "abort" and aborted.finished
    assert aborted.token_ids == alone["aborted"].token_ids[: len(aborted.token_ids)]
    assert llm.engine.stats().num_free_blocks == llm.engine.cache.num_blocks


def test_seeded_sampling_same_alone_and_in_any_batch(engine_hf_checkpoint):
    directory, _ = engine_hf_checkpoint("deepseek_v2")
    llm = LLM(str(directory), max_num_seqs=8, block_size=8)
    vocab = llm.config.vocab_size
    seeded = [
        (_prompt(vocab, 5, 11), SamplingParams(max_tokens=24, temperature=1.0, top_k=20, seed=1)),
        (
            _prompt(vocab, 12, 12),
            SamplingParams(max_tokens=24, temperature=0.7, top_p=0.8, min_p=0.02, seed=2),
        ),
        (
            _prompt(vocab, 8, 13),
            SamplingParams(
                max_tokens=24,
                temperature=1.3,
                seed=3,
                repetition_penalty=1.3,
                presence_penalty=0.5,
                frequency_penalty=0.4,
            ),
        ),
    ]
    alone = [_alone(llm, p, sp).token_ids for p, sp in seeded]
    assert alone == [_alone(llm, p, sp).token_ids for p, sp in seeded]  # reproducible
    noise = [
        (_prompt(vocab, n, 20 + n), SamplingParams(max_tokens=10 + n, temperature=1.0)) for n in (3, 17, 30)
    ]
    mixed = noise[:2] + seeded[::-1] + noise[2:]
    outs = llm.generate([p for p, _ in mixed], [sp for _, sp in mixed])
    assert [o.token_ids for o in outs[2:5]] == alone[::-1]
    # A different seed gives different tokens (the seed is really used).
    other = SamplingParams(max_tokens=24, temperature=1.0, top_k=20, seed=99)
    assert _alone(llm, seeded[0][0], other).token_ids != alone[0]


def test_more_requests_than_the_cache_holds_all_complete(engine_hf_checkpoint):
    """12 blocks of 4 tokens, 8 requests of up to 40 tokens each: preemption and recompute, same outputs."""
    directory, _ = engine_hf_checkpoint("deepseek_v3")
    llm = LLM(str(directory), max_num_seqs=8, num_kv_blocks=12, block_size=4)
    assert llm.max_model_len == 48
    vocab = llm.config.vocab_size
    requests = [
        (
            _prompt(vocab, 4 + 2 * i, 30 + i),
            SamplingParams(max_tokens=20 + 2 * i, temperature=0.0, ignore_eos=True),
        )
        for i in range(6)
    ]
    requests.append((_prompt(vocab, 10, 40), SamplingParams(max_tokens=30, temperature=0.9, seed=5)))
    requests.append((_prompt(vocab, 45, 41), SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)))
    alone = [_alone(llm, p, sp) for p, sp in requests]
    before = llm.engine.stats().num_preemptions
    outs = llm.generate([p for p, _ in requests], [sp for _, sp in requests])
    stats = llm.engine.stats()
    assert stats.num_preemptions > before
    for got, want in zip(outs, alone):
        assert got.token_ids == want.token_ids
        assert got.finish_reason == want.finish_reason
    # The 45-token prompt stops at the context window (48), not at max_tokens.
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 48 - 45 + 1
    assert stats.num_free_blocks == stats.num_blocks and stats.running == stats.waiting == 0


def test_chunked_prefill_does_not_stall_decoding(engine_hf_checkpoint):
    directory, _ = engine_hf_checkpoint("llama_gqa")
    llm = LLM(str(directory), max_num_seqs=4, max_num_batched_tokens=8, block_size=4)
    engine = llm.engine
    vocab = llm.config.vocab_size
    engine.add_request(
        _prompt(vocab, 4, 50), SamplingParams(max_tokens=30, temperature=0.0), request_id="decoder"
    )
    engine.step()  # prefill + first token
    engine.add_request(
        _prompt(vocab, 70, 51), SamplingParams(max_tokens=3, temperature=0.0), request_id="long"
    )
    steps_until_long = 0
    while True:
        outs = {o.request_id: o for o in engine.step()}
        steps_until_long += 1
        if "long" in outs:
            break
        # While the long prompt prefills (7 tokens a step), the decoding request still gets a token every step.
        assert "decoder" in outs and len(outs["decoder"].token_ids_delta) == 1
    assert steps_until_long == 10  # ceil(70 / 7): one token of each step's budget goes to the decoder
    while engine.has_unfinished_requests():
        engine.step()
