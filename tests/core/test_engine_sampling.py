"""Sampling outside the model: filters, penalties, logprobs, per-request generators."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from deepseek_core.engine import SamplingParams
from deepseek_core.engine.outputs import RequestMetrics
from deepseek_core.engine.sampling import apply_penalties, filter_logits, sample
from deepseek_core.engine.sequence import Sequence

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _seq(params: SamplingParams, prompt=(0,), seed: int = 0) -> Sequence:
    return Sequence(
        request_id="r",
        prompt_token_ids=list(prompt),
        params=params,
        arrival=0,
        generator=torch.Generator().manual_seed(seed),
        metrics=RequestMetrics(0.0),
    )


def _kept(params: SamplingParams) -> set[int]:
    filtered = filter_logits(PROBS.log().unsqueeze(0), [params])[0]
    return {i for i, v in enumerate(filtered.tolist()) if v != float("-inf")}


@pytest.mark.parametrize(
    ("kwargs", "kept"),
    [
        ({}, {0, 1, 2, 3}),
        ({"top_k": 2}, {0, 1}),
        ({"top_k": 10}, {0, 1, 2, 3}),
        ({"top_p": 0.7}, {0, 1}),
        ({"top_p": 0.85}, {0, 1, 2}),
        ({"top_p": 0.1}, {0}),
        ({"min_p": 0.4}, {0, 1}),
        ({"min_p": 0.29}, {0, 1, 2}),
        ({"top_k": 3, "top_p": 0.6}, {0, 1}),
    ],
)
def test_filters(kwargs, kept):
    assert _kept(SamplingParams(**kwargs)) == kept


def test_temperature_scales_logits_per_row():
    logits = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
    out = filter_logits(logits, [SamplingParams(temperature=0.5), SamplingParams(temperature=2.0)])
    assert out.tolist() == [[-2.0, 0.0], [-0.5, 0.0]]  # each row shifted to a maximum of 0, then scaled
    tiny = filter_logits(torch.tensor([[3e38, 1e38, 0.0]]), [SamplingParams(temperature=1e-4)])
    assert tiny.tolist() == [[0.0, float("-inf"), float("-inf")]]  # no overflow to inf - inf = NaN


def test_samples_follow_the_filtered_distribution():
    seq = _seq(SamplingParams(top_k=3, seed=0))
    logits = PROBS.log().unsqueeze(0)
    counts = Counter(sample(logits, [seq])[0][0] for _ in range(3000))
    assert set(counts) == {0, 1, 2}
    renorm = PROBS[:3] / PROBS[:3].sum()
    for token in range(3):
        assert counts[token] / 3000 == pytest.approx(renorm[token].item(), abs=0.04)


def test_greedy_ignores_the_generator_and_takes_the_argmax():
    seqs = [_seq(SamplingParams(temperature=0.0), seed=s) for s in range(3)]
    logits = torch.tensor([[0.1, 3.0, 2.0]]).repeat(3, 1)
    assert sample(logits, seqs)[0] == [1, 1, 1]


def test_penalties():
    seq = _seq(
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25), prompt=[0]
    )
    seq.append_token(1, None)
    seq.append_token(1, None)
    seq.append_token(2, None)
    logits = torch.tensor([4.0, -1.0, 1.0, 3.0])
    apply_penalties(logits, seq)
    # token 0: prompt only -> 4/2; token 1: -1*2 - (0.25*2 + 0.5); token 2: 1/2 - (0.25 + 0.5); token 3 untouched
    assert logits.tolist() == pytest.approx([2.0, -3.0, -0.25, 3.0])
    # Greedy honours penalties: the best raw token (0) loses to token 3.
    assert sample(
        torch.tensor([[4.0, -1.0, 1.0, 3.0]]), [_seq(SamplingParams(temperature=0, repetition_penalty=2.0))]
    )[0] == [3]


def test_logprobs_of_chosen_and_top_tokens():
    logits = torch.tensor([[2.0, 0.5, 1.0, -1.0], [0.0, 0.0, 5.0, 0.0]])
    seqs = [_seq(SamplingParams(temperature=0.0, logprobs=2)), _seq(SamplingParams(temperature=0.0))]
    tokens, logprobs = sample(logits, seqs)
    assert tokens == [0, 2] and logprobs[1] is None
    expected = logits[0].log_softmax(-1)
    lp = logprobs[0]
    assert lp.token_id == 0 and math.isclose(lp.logprob, expected[0].item(), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [0, 2]
    assert [v for _, v in lp.top] == pytest.approx([expected[0].item(), expected[2].item()])
    chosen_only = sample(logits[:1], [_seq(SamplingParams(temperature=0.0, logprobs=0))])[1][0]
    assert chosen_only.top == [] and chosen_only.logprob == pytest.approx(expected[0].item())


def test_each_row_draws_from_its_own_generator():
    logits = torch.zeros(1, 50)
    alone = [sample(logits, [_seq(SamplingParams(seed=7), seed=7)])[0][0] for _ in range(1)]
    batch = sample(logits.repeat(3, 1), [_seq(SamplingParams(), seed=s) for s in (1, 7, 2)])[0]
    assert batch[1] == alone[0]
