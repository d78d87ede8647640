"""Dask data pipeline: many .txt/.jsonl/.parquet files -> packed token shards (resumable, bounded memory).

The shard format and its reader (PackedShardDataset) live in deepseek_core.training.shards, shared with
the Community Edition's Trainer; they are re-exported here.
"""

from deepseek_core.training.shards import DatasetIndex, PackedShardDataset, ShardInfo, read_index

from .errors import DataError
from .pipeline import prepare_dataset

__all__ = ["DataError", "DatasetIndex", "PackedShardDataset", "ShardInfo", "prepare_dataset", "read_index"]
