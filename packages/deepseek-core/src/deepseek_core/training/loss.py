"""The language-model loss: cross entropy of each next token, computed in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross entropy where labels[b, t] is the token that should follow position t (already shifted).

    logits [batch, seq, vocab] in any float dtype, labels [batch, seq]; positions labelled `ignore_index`
    do not count.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits {list(logits.shape)} and labels {list(labels.shape)} do not match")
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index
    )


def causal_lm_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean cross entropy of predicting input_ids[:, t+1] from logits[:, t] (the shift is done here)."""
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits {list(logits.shape)} and input_ids {list(input_ids.shape)} do not match")
    return lm_loss(logits[:, :-1, :], input_ids[:, 1:], ignore_index)


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def chunked_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """lm_loss of `hidden_states` [batch, seq, hidden] @ lm_head, `chunk_size` tokens at a time.

    Each chunk's logits are recomputed in the backward pass rather than kept, so peak memory holds one
    [chunk_size, vocab] block instead of all [batch * seq, vocab] logits (worth it for large vocabularies).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    if labels.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"hidden_states {list(hidden_states.shape)} and labels {list(labels.shape)} do not match"
        )
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(
            _chunk_loss_sum,
            hidden[start:end],
            lm_head_weight,
            targets[start:end],
            ignore_index,
            use_reentrant=False,
        )
    count = (targets != ignore_index).sum().clamp(min=1)
    return total / count
