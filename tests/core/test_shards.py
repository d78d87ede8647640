"""PackedShardDataset and read_index over a hand-written packed-token dataset."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from deepseek_core.training.shards import (
    DatasetIndex,
    PackedShardDataset,
    ShardInfo,
    dtype_for_vocab,
    read_index,
)


def _write_dataset(
    directory: Path, sizes: list[int], dtype: str = "uint16", complete: bool = True
) -> np.ndarray:
    """Shards of the given sizes holding one stream of distinct-ish tokens; returns that stream."""
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 60000 if dtype == "uint16" else 100_000, size=sum(sizes)).astype(np.int64)
    shards, pos = [], 0
    for k, size in enumerate(sizes):
        name = f"shard-{k:06d}-000.bin"
        stream[pos : pos + size].astype(dtype).tofile(directory / name)
        shards.append(ShardInfo(name, size, [f"src{k}.txt"]))
        pos += size
    index = DatasetIndex(dtype=dtype, shards=shards, complete=complete)
    (directory / "index.json").write_text(json.dumps(index.to_dict()))
    return stream


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("seed", [None, 0, 5])
def test_ranks_get_disjoint_windows_that_cover_all(tmp_path: Path, world_size: int, seed: int | None) -> None:
    stream = _write_dataset(tmp_path, [100, 1, 37, 0, 250, 64])
    seq_len = 16
    n_windows = (len(stream) - 1) // seq_len
    seen: list[int] = []
    for rank in range(world_size):
        ds = PackedShardDataset(tmp_path, seq_len, rank=rank, world_size=world_size, seed=seed)
        ids = [ds.window_id(i) for i in range(len(ds))]
        seen += ids
        for i in (0, len(ds) - 1):  # contents, including windows that straddle shard boundaries
            w = ds.window_id(i)
            item = ds[i]
            assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (seq_len,)
            np.testing.assert_array_equal(item["input_ids"].numpy(), stream[w * seq_len : (w + 1) * seq_len])
            np.testing.assert_array_equal(
                item["labels"].numpy(), stream[w * seq_len + 1 : (w + 1) * seq_len + 1]
            )
    assert len(seen) == len(set(seen)) == n_windows
    assert set(seen) == set(range(n_windows))
    if seed is not None and world_size == 1:
        assert seen != sorted(seen)  # shuffled


def test_every_window_reads_the_stream_across_shard_boundaries(tmp_path: Path) -> None:
    stream = _write_dataset(tmp_path, [5, 3, 1, 1, 20, 7], dtype="uint32")
    ds = PackedShardDataset(tmp_path, 4, seed=None)
    assert len(ds) == (len(stream) - 1) // 4
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds.window(i), stream[i * 4 : i * 4 + 5])


def test_drop_remainder_equal_lengths_and_pickling(tmp_path: Path) -> None:
    _write_dataset(tmp_path, [101])
    ranks = [PackedShardDataset(tmp_path, 10, rank=r, world_size=3, drop_remainder=True) for r in range(3)]
    assert [len(d) for d in ranks] == [3, 3, 3]  # 10 windows, one dropped
    ds = ranks[1]
    _ = ds[0]  # opens a memmap; pickling (DataLoader workers) must still work
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[2]["labels"], ds[2]["labels"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    first = next(iter(loader))
    assert first["input_ids"].shape == (2, 10)
    input_ids, labels = ds.get_batch(torch.tensor([0, 1]))
    assert torch.equal(input_ids, first["input_ids"]) and torch.equal(labels, first["labels"])


def test_bad_datasets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="index.json"):
        read_index(tmp_path)
    _write_dataset(tmp_path, [50], complete=False)
    with pytest.raises(ValueError, match="incomplete"):
        PackedShardDataset(tmp_path, 8)
    _write_dataset(tmp_path, [50])
    with (tmp_path / "shard-000000-000.bin").open("ab") as handle:
        handle.write(b"\0\0")
    with pytest.raises(ValueError, match=r"shard-000000-000.bin: size 102 bytes"):
        PackedShardDataset(tmp_path, 8)
    data = json.loads((tmp_path / "index.json").read_text())
    data["dtype"] = "int8"
    (tmp_path / "index.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'dtype'"):
        read_index(tmp_path)
    with pytest.raises(ValueError, match="rank"):
        PackedShardDataset(tmp_path, 8, rank=2, world_size=2)


def test_dtype_for_vocab() -> None:
    assert dtype_for_vocab(1000) == "uint16"
    assert dtype_for_vocab(65536) == "uint16"
    assert dtype_for_vocab(102400) == "uint32"
