"""Packed token shards: the on-disk format (index.json + raw .bin shards) and a map-style reader.

A prepared dataset is a directory holding shard files (flat arrays of uint16 or uint32 token ids, no
header) and `index.json`, which lists the shards in stream order. Concatenating the shards in that order
gives the token stream; `PackedShardDataset` cuts it into fixed windows of seq_len + 1 tokens.
Writers: deepseek_ee.data (Dask pipeline). Readers: the CE Trainer and EE DistributedTrainer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

INDEX_NAME = "index.json"
INDEX_FORMAT = "deepseek-packed-tokens"
INDEX_VERSION = 1
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest shard dtype that holds every id of a vocabulary of `vocab_size` tokens."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass
class ShardInfo:
    """One shard file: its name (relative to the dataset directory), token count and source files."""

    file: str
    tokens: int
    sources: list[str] = field(default_factory=list)


@dataclass
class DatasetIndex:
    """The parsed index.json of a packed-token dataset."""

    dtype: str
    shards: list[ShardInfo]
    complete: bool = True
    tokenizer: dict[str, Any] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        """Tokens over all shards."""
        return sum(s.tokens for s in self.shards)

    @property
    def itemsize(self) -> int:
        """Bytes per token in the shard files."""
        return int(np.dtype(DTYPES[self.dtype]).itemsize)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to index.json."""
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "complete": self.complete,
            "dtype": self.dtype,
            "total_tokens": self.total_tokens,
            "tokenizer": self.tokenizer,
            "options": self.options,
            "shards": [{"file": s.file, "tokens": s.tokens, "sources": s.sources} for s in self.shards],
            "sources": self.sources,
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = INDEX_NAME) -> DatasetIndex:
        """Parse and validate the JSON form; errors name `where` and the field."""
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise ValueError(f"{where}: not a packed-token index (format must be {INDEX_FORMAT!r})")
        if data.get("version") != INDEX_VERSION:
            raise ValueError(f"{where}: unsupported index version {data.get('version')!r}")
        dtype = data.get("dtype")
        if dtype not in DTYPES:
            raise ValueError(f"{where}: field 'dtype' must be one of {sorted(DTYPES)}, got {dtype!r}")
        shards = []
        for i, raw in enumerate(data.get("shards", [])):
            try:
                name, tokens = str(raw["file"]), int(raw["tokens"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: shards[{i}] needs 'file' and an integer 'tokens'") from None
            if tokens < 0 or "/" in name or name.startswith("."):
                raise ValueError(f"{where}: shards[{i}] has a bad file name or token count")
            shards.append(ShardInfo(name, tokens, list(raw.get("sources", []))))
        return cls(
            dtype=dtype,
            shards=shards,
            complete=bool(data.get("complete", False)),
            tokenizer=dict(data.get("tokenizer", {})),
            sources=list(data.get("sources", [])),
            skipped=list(data.get("skipped", [])),
            options=dict(data.get("options", {})),
        )


def read_index(directory: str | os.PathLike[str]) -> DatasetIndex:
    """Read `directory`/index.json of a packed-token dataset."""
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index.json (is this a prepared dataset directory?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    return DatasetIndex.from_dict(data, where=str(path))


class _AffinePermutation:
    """A bijection of range(n), i -> (a*i + b) mod n with gcd(a, n) = 1: a shuffle in O(1) memory."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.n = n
        self.a, self.b = 1, 0
        if n > 1:
            a = int(rng.integers(1, n))
            while math.gcd(a, n) != 1:
                a = a % (n - 1) + 1
            self.a, self.b = a, int(rng.integers(0, n))

    def __call__(self, i: int) -> int:
        return (self.a * i + self.b) % self.n


class PackedShardDataset(Dataset):
    """Map-style torch Dataset of (seq_len + 1)-token windows over a packed-token dataset.

    Window w covers stream tokens [w*seq_len, w*seq_len + seq_len + 1): consecutive windows share one
    token, so every token is a label exactly once. Windows are shuffled by `seed` (None keeps stream order)
    and dealt round-robin to ranks: rank r gets shuffled windows r, r + world_size, ... so ranks are disjoint
    and together cover every window. `drop_remainder` trims ranks to equal lengths (for DDP).
    Items are {"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len]}.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = 0,
        drop_remainder: bool = False,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
        self.directory = Path(directory)
        self.index = read_index(self.directory)
        if not self.index.complete:
            raise ValueError(f"{self.directory / INDEX_NAME}: dataset is incomplete; rerun the prepare step")
        self.seq_len, self.rank, self.world_size = seq_len, rank, world_size
        self.dtype = DTYPES[self.index.dtype]
        shards = [s for s in self.index.shards if s.tokens > 0]
        itemsize = self.index.itemsize
        for shard in shards:
            path = self.directory / shard.file
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in index.json is missing")
            if path.stat().st_size != shard.tokens * itemsize:
                raise ValueError(
                    f"{path}: size {path.stat().st_size} bytes, index.json says {shard.tokens} tokens "
                    f"x {itemsize} bytes"
                )
        self._paths = [str(self.directory / s.file) for s in shards]
        # offsets[k] = stream position of shard k's first token; offsets[-1] = total tokens
        self._offsets = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s.tokens for s in shards], out=self._offsets[1:])
        self.total_tokens = int(self._offsets[-1])
        self.num_windows = max(0, (self.total_tokens - 1) // seq_len)
        self._perm = None if seed is None else _AffinePermutation(self.num_windows, seed)
        length = len(range(rank, self.num_windows, world_size))
        if drop_remainder:
            length = self.num_windows // world_size
        self._length = length
        self._maps: list[np.memmap | None] = [None] * len(self._paths)

    def __len__(self) -> int:
        return self._length

    def window_id(self, i: int) -> int:
        """The stream window behind this rank's item `i`."""
        if not 0 <= i < self._length:
            raise IndexError(f"index {i} out of range for a dataset of {self._length} windows")
        j = self.rank + i * self.world_size
        return j if self._perm is None else self._perm(j)

    def window(self, window_id: int) -> np.ndarray:
        """Tokens of stream window `window_id` (seq_len + 1 of them), read across shard boundaries."""
        start = window_id * self.seq_len
        stop = start + self.seq_len + 1
        parts = []
        k = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while start < stop:
            local = start - int(self._offsets[k])
            take = min(stop, int(self._offsets[k + 1])) - start
            parts.append(self._map(k)[local : local + take])
            start += take
            k += 1
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        tokens = torch.from_numpy(self.window(self.window_id(i)).astype(np.int64))
        return {"input_ids": tokens[:-1], "labels": tokens[1:]}

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), each LongTensor [len(indices), seq_len], for this rank's items `indices`."""
        windows = np.stack([self.window(self.window_id(int(i))) for i in indices]).astype(np.int64)
        batch = torch.from_numpy(windows.reshape(len(windows), self.seq_len + 1))
        return batch[:, :-1], batch[:, 1:]

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole stream (all ranks)."""
        return self.total_tokens

    def _map(self, k: int) -> np.memmap:
        mapped = self._maps[k]
        if mapped is None:  # opened lazily so the dataset pickles cheaply into DataLoader workers
            mapped = np.memmap(self._paths[k], dtype=self.dtype, mode="r")
            self._maps[k] = mapped
        return mapped

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._paths)
        return state
