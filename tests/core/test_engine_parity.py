"""The engine's cached generation against transformers' generate and against our own full forward pass."""

from __future__ import annotations

import pytest
import torch
from deepseek_core.engine import LLM, SamplingParams

pytest.importorskip("transformers")

KINDS = ["llama_gqa", "deepseek_v2", "deepseek_v3"]
NEW_TOKENS = 64


def _prompts(vocab: int, lengths: tuple[int, ...], seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers_generate(kind, engine_hf_checkpoint):
    """64 greedy tokens, batched in our engine (small blocks: many block boundaries), each equal to HF's."""
    directory, hf = engine_hf_checkpoint(kind)
    llm = LLM(str(directory), max_num_seqs=4, block_size=4)
    prompts = _prompts(llm.config.vocab_size, (1, 6, 13, 29))
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True))
    hf.generation_config.eos_token_id = None  # like ignore_eos: EOS is an ordinary token, never suppressed
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        assert out.token_ids == ref
        assert out.finish_reason == "length" and len(out.token_ids) == NEW_TOKENS
        # A degenerate model that repeats one token would make this test vacuous.
        assert len(set(ref)) > 3


@pytest.mark.parametrize("backend", ["matmul", "sdpa", "per-sequence", "per-sequence-torch"])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_logprobs_equal_full_forward(kind, backend, engine_hf_checkpoint, monkeypatch):
    """Chunked prefill (8-token budget) + decode through the paged cache (MLA: absorbed decode) give the
    logprobs of a full forward pass over the whole sequence, for several sequences at once; with both decode
    attention backends (grouped matmuls: the CPU default; SDPA: the CUDA default), and with the CPU's
    per-sequence decode (views of consecutive blocks, or gathered blocks; what long contexts and batch 1 use),
    through the native kernel and through torch ops."""
    directory, _ = engine_hf_checkpoint(kind)
    llm = LLM(str(directory), max_num_seqs=3, max_num_batched_tokens=8, block_size=4)
    if backend.startswith("per-sequence"):
        monkeypatch.setattr("deepseek_core.engine.runner._LOOP_MIN_BYTES", 0)
        if backend == "per-sequence-torch":
            llm.engine.runner.decode_backend = "matmul"
    else:
        monkeypatch.setattr("deepseek_core.engine.runner._LOOP_MIN_BYTES", 1 << 60)
        llm.engine.runner.decode_backend = backend
    prompts = _prompts(llm.config.vocab_size, (3, 19, 30), seed=7)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3))
    for prompt, out in zip(prompts, outs):
        full = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            expected = llm.model(full)[0].float().log_softmax(-1)
        for i, lp in enumerate(out.logprobs):
            row = expected[len(prompt) - 1 + i]
            assert lp.token_id == out.token_ids[i]
            assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
            assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()
            assert lp.token_id == lp.top[0][0]  # greedy chose the best
