"""A resumable, seeded order of training batches."""

from __future__ import annotations

from typing import Any

import torch


class BatchOrder:
    """Batches of dataset indices from an endless stream of shuffled epochs.

    Epoch e is a permutation drawn from a generator seeded with (seed, e), so the whole stream is a pure
    function of (num_items, seed); the only state is how many indices were handed out, which makes a
    resumed run read exactly the batches an uninterrupted one would. A batch may span two epochs, so a
    dataset smaller than one batch still works.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if num_items < 1:
            raise ValueError(
                f"num_items: the dataset is empty (needs at least one sequence), got {num_items}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0  # indices handed out so far
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from (0-based)."""
        return self.position // self.num_items

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(self.num_items, generator=generator)
            else:
                self._perm = torch.arange(self.num_items)
            self._epoch = epoch
        return self._perm

    def next_batch(self) -> torch.Tensor:
        """The next `batch_size` indices (LongTensor)."""
        out = []
        need = self.batch_size
        while need:
            epoch, offset = divmod(self.position, self.num_items)
            take = min(need, self.num_items - offset)
            out.append(self._permutation(epoch)[offset : offset + take])
            self.position += take
            need -= take
        return out[0] if len(out) == 1 else torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs."""
        return {
            "position": self.position,
            "num_items": self.num_items,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refuses a state taken over a different dataset or seed."""
        for key in ("num_items", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"data order: checkpoint was taken with {key}={state[key]!r}, this run has {getattr(self, key)!r}; "
                    "resume needs the same data and seed"
                )
        self.position = int(state["position"])
