"""Training primitives shared by CE's Trainer and EE's DistributedTrainer.

TrainingConfig, single-file datasets (tokenized once, cached, packed), packed token shards, the
warmup + cosine schedule, AdamW parameter groups, the language-model loss, atomic checkpoints with the
state an exact resume needs, and byte-level BPE tokenizer training.
"""

from .checkpoints import (
    COMPLETE_MARKER,
    capture_rng_state,
    checkpoint_name,
    fetch_remote_checkpoint,
    latest_checkpoint,
    latest_remote_checkpoint,
    list_checkpoints,
    list_remote_checkpoints,
    load_trainer_state,
    load_weights_into,
    prune_checkpoints,
    publish_checkpoint,
    remove_stale_temp_dirs,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from .config import TrainingConfig
from .data import (
    SUPPORTED_EXTENSIONS,
    PackedTokens,
    SplitDataset,
    check_data_file,
    iter_documents,
    load_text_dataset,
    read_documents,
    tokenize_file,
)
from .errors import DataError, TrainingDivergedError
from .loss import causal_lm_loss, chunked_lm_loss, lm_loss
from .optim import build_adamw, parameter_groups
from .sampler import BatchOrder
from .schedule import WarmupCosine, warmup_cosine_scheduler
from .shards import PackedShardDataset
from .tokenizer_training import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, train_tokenizer

__all__ = [
    "BOS_TOKEN",
    "COMPLETE_MARKER",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SUPPORTED_EXTENSIONS",
    "BatchOrder",
    "DataError",
    "PackedShardDataset",
    "PackedTokens",
    "SplitDataset",
    "TrainingConfig",
    "TrainingDivergedError",
    "WarmupCosine",
    "build_adamw",
    "capture_rng_state",
    "causal_lm_loss",
    "check_data_file",
    "checkpoint_name",
    "chunked_lm_loss",
    "fetch_remote_checkpoint",
    "iter_documents",
    "latest_checkpoint",
    "latest_remote_checkpoint",
    "list_checkpoints",
    "list_remote_checkpoints",
    "lm_loss",
    "load_text_dataset",
    "load_trainer_state",
    "load_weights_into",
    "parameter_groups",
    "prune_checkpoints",
    "publish_checkpoint",
    "read_documents",
    "remove_stale_temp_dirs",
    "restore_rng_state",
    "save_checkpoint",
    "seed_everything",
    "tokenize_file",
    "train_tokenizer",
    "warmup_cosine_scheduler",
]
