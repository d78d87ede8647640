"""Training data for the DistributedTrainer: what a path or dataset resolves to, and how ranks share it.

Every rank reads the same global batch order (core's seeded BatchOrder over the whole dataset, batches of
``batch_size * world_size`` sequences) and keeps its own contiguous slice of each global batch. So:

- ranks are disjoint within every step and together read exactly what one process with
  ``batch_size * world_size`` would read: results do not depend on how the batch is split over ranks;
- with one process the order is the CE Trainer's (same BatchOrder, same seed);
- the position in the order is a pure function of the optimizer step, which makes resuming exact.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from deepseek_core.training import BatchOrder, DataError, PackedShardDataset, PackedTokens, load_text_dataset
from torch.utils.data import Dataset, Subset

__all__ = ["EvalBatches", "RankBatches", "check_dataset", "fetch_batch", "resolve_data"]

IGNORE_INDEX = -100


def resolve_data(
    data: Any,
    name: str,
    *,
    seq_len: int,
    eval_fraction: float,
    split: bool,
    tokenizer: Any = None,
    text_field: str = "text",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Dataset, Dataset | None]:
    """(train, held-out eval or None) for a .txt/.jsonl/.parquet file, a packed-shard directory or a Dataset.

    Files and shard directories give their last `eval_fraction` of sequences for evaluation when `split`
    (that is, when no eval_data was passed), as the CE Trainer does. Errors name `name` and the path.
    """
    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data)
        if "://" in text:
            raise DataError(
                f"{name}={text!r}: the DistributedTrainer reads local (or shared-filesystem) paths"
            )
        path = Path(text).expanduser()
        if path.is_dir():
            return _shard_data(path, name, seq_len, eval_fraction if split else 0.0)
        if not path.exists():
            raise DataError(f"{name}={path}: no such file or directory")
        if tokenizer is None:
            raise ValueError(
                f"{name}: a text file needs a tokenizer: pass tokenizer=... or a Model that has one"
            )
        fraction = eval_fraction if split else 0.0
        parts = load_text_dataset(
            path, tokenizer, seq_len, fraction, text_field=text_field, cache_dir=cache_dir
        )
        return parts.train, parts.eval
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return data, None
    raise TypeError(
        f"{name}: expected a file path, a shard directory or a Dataset, got {type(data).__name__}"
    )


def _shard_data(path: Path, name: str, seq_len: int, eval_fraction: float) -> tuple[Dataset, Dataset | None]:
    try:
        # Stream order (seed=None): the global BatchOrder shuffles, identically on every rank.
        dataset = PackedShardDataset(path, seq_len, seed=None)
    except (OSError, ValueError) as exc:
        raise DataError(f"{name}={path}: {exc}") from None
    n = len(dataset)
    n_eval = min(math.ceil(n * eval_fraction), max(0, n - 1)) if eval_fraction > 0 else 0
    if not n_eval:
        return dataset, None
    return Subset(dataset, range(n - n_eval)), Subset(dataset, range(n - n_eval, n))


def fetch_batch(dataset: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), LongTensors [len(indices), seq], from any supported dataset.

    Items may be LongTensor [seq] (labels are then the next tokens, the last position ignored) or dicts
    with "input_ids" and optionally "labels" (already shifted, as packed datasets give them).
    """
    if hasattr(dataset, "get_batch"):
        got = dataset.get_batch(indices)
        input_ids, labels = (got[0], got[1]) if isinstance(got, tuple) else (got, None)
    else:
        items = [dataset[int(i)] for i in indices]
        first = items[0]
        if isinstance(first, dict):
            if "input_ids" not in first:
                raise DataError(
                    f"data: dataset items are dicts without 'input_ids' (keys: {', '.join(first)})"
                )
            input_ids = torch.stack([torch.as_tensor(it["input_ids"], dtype=torch.long) for it in items])
            labels = (
                torch.stack([torch.as_tensor(it["labels"], dtype=torch.long) for it in items])
                if "labels" in first
                else None
            )
        else:
            try:
                input_ids, labels = torch.stack([torch.as_tensor(it, dtype=torch.long) for it in items]), None
            except (TypeError, RuntimeError) as exc:
                raise DataError(
                    f"data: dataset items must be equal-length token id sequences ({exc})"
                ) from None
    input_ids = input_ids.long()
    if labels is None:
        labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], IGNORE_INDEX)], dim=1)
    return input_ids, labels.long()


def check_dataset(dataset: Any, name: str, model_config: Any) -> int:
    """The sequence length of `dataset`; DataError when it is empty or does not fit the model."""
    if len(dataset) < 1:
        raise DataError(f"{name}: the dataset has no sequences (is the data shorter than seq_len?)")
    input_ids, _ = fetch_batch(dataset, torch.tensor([0]))
    seq_len = int(input_ids.shape[1])
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise DataError(
            f"{name}: sequences of {seq_len} tokens exceed the model's max_position_embeddings={max_pos}"
        )
    vocab = getattr(model_config, "vocab_size", None)
    if isinstance(dataset, PackedTokens) and vocab is not None and dataset.max_token_id() >= vocab:
        raise DataError(
            f"{name}: token id {dataset.max_token_id()} is outside the model's vocabulary (vocab_size={vocab}); "
            "the tokenizer and the model do not match"
        )
    return seq_len


class RankBatches:
    """Endless micro-batches of one rank: its slice of each global batch of a seeded, resumable order.

    `start_position()` is asked for the number of sequences (all ranks together) already consumed each time
    iteration starts, i.e. after a checkpoint was restored; it is ``global_step * grad_accum * global batch``.
    Items are {"input_ids": LongTensor [batch_size, seq], "labels": LongTensor [batch_size, seq]}.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        start_position: Callable[[], int] = lambda: 0,
        vocab_size: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_position = start_position
        self.vocab_size = vocab_size
        self.global_batch = batch_size * world_size

    def indices(self, position: int) -> Iterator[torch.Tensor]:
        """This rank's dataset indices of each global batch from `position` on (for tests and inspection)."""
        order = BatchOrder(len(self.dataset), self.global_batch, seed=self.seed)
        order.position = position
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        while True:
            yield order.next_batch()[lo:hi]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        check_vocab = self.vocab_size is not None and not isinstance(self.dataset, PackedTokens)
        for mine in self.indices(self.start_position()):
            input_ids, labels = fetch_batch(self.dataset, mine)
            if check_vocab:
                top = int(input_ids.max())
                if top >= self.vocab_size:  # type: ignore[operator]
                    raise DataError(
                        f"data: token id {top} is outside the model's vocabulary (vocab_size={self.vocab_size})"
                    )
            yield {"input_ids": input_ids, "labels": labels}


class EvalBatches:
    """This rank's part of an eval set, in order, padded so every rank runs the same number of batches.

    Sequence j of the eval set goes to rank j % world_size; padding items (repeats of sequence 0) carry
    weight 0 so they do not count. `max_batches` (0: all) bounds the batches per rank.
    Items add "weight": FloatTensor [batch_size].
    """

    def __init__(
        self, dataset: Any, batch_size: int, rank: int, world_size: int, max_batches: int = 0
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        per_rank = math.ceil(len(dataset) / world_size)
        batches = math.ceil(per_rank / batch_size)
        self.num_batches = min(batches, max_batches) if max_batches else batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.dataset)
        for b in range(self.num_batches):
            local = torch.arange(b * self.batch_size, (b + 1) * self.batch_size)
            global_ids = local * self.world_size + self.rank
            valid = global_ids < n
            global_ids = torch.where(valid, global_ids, torch.zeros_like(global_ids))
            input_ids, labels = fetch_batch(self.dataset, global_ids)
            yield {"input_ids": input_ids, "labels": labels, "weight": valid.float()}
