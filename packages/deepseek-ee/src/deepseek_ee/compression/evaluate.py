"""Held-out perplexity over fixed-length windows: the number the accuracy gate compares.

The eval text is tokenized with the checkpoint's tokenizer (documents of a .txt/.jsonl/.parquet file, each
with its BOS), concatenated and cut into non-overlapping windows of `window` tokens; each window predicts
its tokens 2..window from the ones before, so every model sees exactly the same predictions.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from deepseek_core.training import iter_documents
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    """Mean negative log-likelihood (nats/token) over `tokens` predictions, and exp of it."""

    nll: float
    tokens: int
    windows: int

    @property
    def perplexity(self) -> float:
        """exp(mean NLL)."""
        return math.exp(self.nll)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, perplexity included."""
        return {**asdict(self), "perplexity": self.perplexity}


def load_eval_tokens(
    path: str | os.PathLike[str], tokenizer: Any, max_tokens: int | None = None, text_field: str = "text"
) -> torch.Tensor:
    """Token ids [N] of the documents in `path`, truncated to `max_tokens`; errors name the file."""
    ids: list[int] = []
    for text in iter_documents(path, text_field):
        if not text.strip():
            continue
        ids.extend(tokenizer.encode(text, add_special_tokens=True))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"{path}: eval data has {len(ids)} tokens; at least 2 are needed for a perplexity")
    return torch.tensor(ids, dtype=torch.long)


def windows_of(tokens: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Non-overlapping windows of `window` tokens; a last partial window is kept when it has >= 2 tokens."""
    if window < 2:
        raise ValueError(f"window: must be >= 2 tokens, got {window}")
    out = [tokens[i : i + window] for i in range(0, len(tokens), window)]
    return [w for w in out if len(w) >= 2]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    window: int = 256,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "perplexity",
) -> Perplexity:
    """Perplexity of `model` (logits = model(input_ids)) on `tokens` in windows of `window` tokens."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    model.eval()
    device = next(iter(model.state_dict().values())).device
    chunks = windows_of(tokens, window)
    total_nll = 0.0
    total_tokens = 0
    # Full windows batch together; the (at most one) shorter last window runs on its own.
    groups: list[list[torch.Tensor]] = []
    for chunk in chunks:
        if groups and len(groups[-1]) < batch_size and len(groups[-1][0]) == len(chunk):
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    for group in tqdm(groups, desc=desc, disable=not progress, unit="batch"):
        batch = torch.stack(group).to(device)
        logits = model(batch)[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
    return Perplexity(nll=total_nll / total_tokens, tokens=total_tokens, windows=len(chunks))
