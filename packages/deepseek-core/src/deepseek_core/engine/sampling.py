"""Sampling, outside the model: penalties, greedy / temperature / top-k / top-p / min-p, logprobs.

Every request draws from its own torch.Generator, and every filter works row by row, so a seeded request
samples the same tokens whatever else shares its batch. A row that cannot be sampled (the model gave NaN or
+inf logits, or nothing finite) is reported per row, so the engine ends that request alone. Extreme but valid
values stay finite: penalised logits are clamped to the float range, and temperature divides logits shifted
so that their maximum is 0 (a vanishing temperature then tends to greedy instead of overflowing).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from .outputs import TokenLogprob
from .sequence import Sequence

NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or +inf, or no finite value) for this request"
_FLOAT_MAX = torch.finfo(torch.float32).max


class SamplingError(RuntimeError):
    """Some rows of a batch could not be sampled (see sample_rows for per-row results)."""


def bad_rows(logits: torch.Tensor, row_max: torch.Tensor | None = None) -> list[int]:
    """Rows of `logits` [n, vocab] that cannot be sampled: any NaN or +inf, or no finite value.

    -inf alone is a masked token and fine. A row's maximum (`row_max`, computed when not given) is NaN, +inf
    or -inf exactly in those cases, so one reduction and one host sync per step find them.
    """
    finite = (logits.amax(dim=-1) if row_max is None else row_max).isfinite()
    if bool(finite.all()):
        return []
    return (~finite).nonzero().flatten().tolist()


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> None:
    """In place on one row [vocab]: repetition penalty over prompt + output, presence/frequency over output."""
    params = seq.params
    device = logits.device
    if params.repetition_penalty != 1.0:
        ids = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=device)
        values = logits[ids]
        penalty = params.repetition_penalty
        logits[ids] = torch.where(values > 0, values / penalty, values * penalty)
    if (params.presence_penalty or params.frequency_penalty) and seq.output_counts:
        ids = torch.tensor(list(seq.output_counts), dtype=torch.long, device=device)
        counts = torch.tensor(list(seq.output_counts.values()), dtype=logits.dtype, device=device)
        logits[ids] -= params.frequency_penalty * counts + params.presence_penalty
    # An extreme penalty can overflow to +-inf (e.g. 1e10 / 1e-30); keep the row finite so it stays samplable.
    logits.clamp_(-_FLOAT_MAX, _FLOAT_MAX)


def filter_logits(logits: torch.Tensor, params: Seq) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p for rows [n, vocab] with per-row SamplingParams; -inf = removed."""
    device = logits.device
    vocab = logits.shape[-1]
    temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    # Shift each row's maximum to 0 before dividing: the result is <= 0, so a tiny temperature sends the
    # others to -inf (greedy in the limit) instead of overflowing the best ones to +inf (inf - inf = NaN).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temps.unsqueeze(1)
    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    need_top_k = any(k < vocab for k in top_k)
    need_top_p = any(p.top_p < 1.0 for p in params)
    if need_top_k or need_top_p:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if need_top_k:
            ks = torch.tensor(top_k, device=device).clamp(max=vocab)
            ranks = torch.arange(vocab, device=device)
            sorted_logits = sorted_logits.masked_fill(ranks.unsqueeze(0) >= ks.unsqueeze(1), float("-inf"))
        if need_top_p:
            top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=device)
            probs = sorted_logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # the best token always stays (mass_before = 0)
            sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(1), float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=device)
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Choose one token per row of `logits` [n, vocab] for `seqs`; returns token ids and logprobs.

    Logprobs are those of the model's distribution (before penalties, temperature and filters). Raises
    SamplingError when a row cannot be sampled (use sample_rows to get the others' tokens anyway).
    """
    tokens, logprobs, errors = sample_rows(logits, seqs)
    if errors:
        row = min(errors)
        raise SamplingError(f"row {row}: {errors[row]}")
    return [t for t in tokens if t is not None], logprobs


def sample_rows(
    logits: torch.Tensor, seqs: list[Sequence]
) -> tuple[list[int | None], list[TokenLogprob | None], dict[int, str]]:
    """Like sample, row by row: (tokens, logprobs, errors); a failed row has token None and errors[row] why."""
    logits = logits.float()
    row_max, argmax = logits.max(dim=-1)  # one pass: the finiteness check and the greedy tokens
    errors = {row: NON_FINITE_LOGITS for row in bad_rows(logits, row_max)}
    if errors:  # sample the healthy rows on their own; no generator has been touched yet
        keep = [i for i in range(len(seqs)) if i not in errors]
        tokens: list[int | None] = [None] * len(seqs)
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if keep:
            index = torch.tensor(keep, device=logits.device)
            sub_tokens, sub_logprobs, sub_errors = sample_rows(logits[index], [seqs[i] for i in keep])
            for j, i in enumerate(keep):
                tokens[i], logprobs[i] = sub_tokens[j], sub_logprobs[j]
            errors.update({keep[j]: why for j, why in sub_errors.items()})
        return tokens, logprobs, errors
    return _sample_finite(logits, seqs, argmax)


def _sample_finite(
    logits: torch.Tensor, seqs: list[Sequence], argmax: torch.Tensor
) -> tuple[list[int | None], list[TokenLogprob | None], dict[int, str]]:
    """sample_rows for float32 logits whose rows all have a finite maximum and no NaN / +inf (arg-maxes given)."""
    n = logits.shape[0]
    errors: dict[int, str] = {}
    want_logprobs = [s.params.logprobs is not None for s in seqs]
    logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None
    if any(s.params.needs_penalties for s in seqs):
        logits = logits.clone()
        for i, seq in enumerate(seqs):
            if seq.params.needs_penalties:
                apply_penalties(logits[i], seq)
        argmax = logits.argmax(dim=-1)
    tokens = argmax
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        probs = filter_logits(logits[sampled], [seqs[i].params for i in sampled]).softmax(dim=-1)
        for j, i in enumerate(sampled):
            try:
                tokens[i] = torch.multinomial(probs[j], 1, generator=seqs[i].generator)[0]
            except RuntimeError as exc:  # should not happen on finite rows; if it does, only this row fails
                errors[i] = f"sampling failed: {exc}"
    token_list: list[int | None] = list(tokens.tolist())
    results: list[TokenLogprob | None] = [None] * n
    for i in errors:
        token_list[i] = None
    if logprobs is not None:
        for i, seq in enumerate(seqs):
            top_n = seq.params.logprobs
            token = token_list[i]
            if top_n is None or token is None:
                continue
            row = logprobs[i]
            chosen = float(row[token])
            top: list[tuple[int, float]] = []
            if top_n > 0:
                values, ids = row.topk(top_n)
                top = list(zip(ids.tolist(), values.tolist()))
            results[i] = TokenLogprob(token, chosen, top)
    return token_list, results, errors
