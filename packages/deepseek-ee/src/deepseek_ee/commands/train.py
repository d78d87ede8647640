"""`deepseek-ee train --config ee.yaml`: run the DistributedTrainer as an EE config describes.

Every process of the job runs this same command: Lightning starts the extra local processes itself; on
several nodes run it on each with NODE_RANK, MASTER_ADDR and MASTER_PORT set (``deepseek-ee launch``
renders that for Kubernetes); torchrun and SLURM are detected. Relative paths in the config are taken
from the working directory.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from . import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` subcommand."""
    parser = subparsers.add_parser(
        "train",
        help="train a model with the DistributedTrainer (Lightning DDP/FSDP, multi-node, MLflow tracking)",
        description=(
            "Train the model of an EE config (model.preset or model.path) on data.path (a .txt/.jsonl/.parquet "
            "file or a prepared shard directory), with the distributed layout of the `distributed` section and the "
            "hyper-parameters of `training`; checkpoints go to training.output_dir, the final Hugging Face-format "
            "model to <output_dir>/final, metrics to MLflow (the `tracking` section)."
        ),
    )
    parser.add_argument(
        "--config",
        required=True,
        help="EE YAML config, a path or an s3:// / gs:// URL (see deepseek_ee.config)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="override the config's model: a preset name, a checkpoint directory or URL",
    )
    parser.add_argument(
        "--data", default=None, help="override data.path: a data file or a prepared shard directory (or URL)"
    )
    parser.add_argument("--output-dir", default=None, help="override training.output_dir (a path or URL)")
    parser.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even when a checkpoint exists")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    parser.add_argument("--tracking-uri", default=None, help="override tracking.tracking_uri")
    parser.set_defaults(func=run)


def _model_and_tokenizer(config: Any) -> tuple[Any, Any]:
    from deepseek_core import Model, Tokenizer
    from deepseek_core.errors import ConfigError

    source = config.source or "config"
    tokenizer = None
    if config.data.tokenizer:
        tokenizer = Tokenizer.from_pretrained(config.data.tokenizer)
    dtype = config.model.dtype
    seed = config.training.hyperparameters.seed
    if config.model.preset:
        model = Model.from_config(config.model.preset, tokenizer=tokenizer, seed=seed)
        if dtype:
            model.to(dtype=_torch_dtype(dtype))
    elif config.model.path:
        model = Model.from_pretrained(config.model.path, dtype=dtype)
        if tokenizer is not None:
            model.tokenizer = tokenizer
    else:
        raise ConfigError(
            f"{source}: model: give model.preset (a fresh model) or model.path (a checkpoint) to train"
        )
    return model, model.tokenizer


def _override_model(config: Any, model: str) -> None:
    """--model: a known preset name starts a fresh model; anything else is a checkpoint path or URL."""
    from deepseek_core.presets import preset_names

    if model in preset_names():
        config.model.preset, config.model.path = model, None
    else:
        config.model.preset, config.model.path = None, model


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def run(args: argparse.Namespace) -> int:
    """Load the config, build model and trainer, train; rank 0 prints where the results are."""
    from deepseek_core import storage
    from deepseek_core.errors import ConfigError

    from ..config import load_ee_config

    config = load_ee_config(args.config)
    source = config.source or args.config
    if args.model:
        _override_model(config, args.model)
    if args.data:
        config.data.path = args.data
    hyper = config.training.hyperparameters
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise CommandError(f"--max-steps: must be >= 1, got {args.max_steps}", 2)
        hyper = hyper.replace(max_steps=args.max_steps)
    if not config.data.path:
        raise ConfigError(
            f"{source}: data.path: required for training (a data file or a prepared shard directory)"
        )
    dist = config.distributed
    tracking: Any = None
    if not args.no_tracking and config.tracking.enabled:
        tracking = config.tracking
        if args.tracking_uri:
            tracking = dataclasses.replace(tracking, tracking_uri=args.tracking_uri)

    from ..trainer import EXIT_PEER_LOST, DistributedTrainer, PeerLostError

    model, tokenizer = _model_and_tokenizer(config)
    try:
        trainer = DistributedTrainer(
            model=model,
            train_data=config.data.path,
            eval_data=config.data.eval_path,
            config=hyper,
            output_dir=args.output_dir or config.training.output_dir,
            tokenizer=tokenizer,
            num_nodes=dist.num_nodes,
            gpus_per_node=dist.devices_per_node,
            accelerator="gpu" if dist.gpus > 0 else "cpu",
            strategy=dist.strategy,
            backend=dist.backend,
            tracking=tracking,
            optimizer=config.training.optimizer,
            optimizer_options=config.training.optimizer_options or None,
            collective_timeout_s=dist.collective_timeout_s,
            peer_timeout_s=dist.peer_timeout_s,
            config_files=[] if storage.is_remote(args.config) else [Path(args.config)],
        )
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise CommandError(f"{source}: {exc}", 2) from None
    try:
        result = trainer.fit(resume=config.training.resume and not args.no_resume)
    except PeerLostError as exc:
        raise CommandError(str(exc), EXIT_PEER_LOST) from None
    if result.global_rank == 0:
        print(f"model: {result.checkpoint}")
        if result.mlflow_run_id:
            print(f"mlflow run: {result.mlflow_run_id}")
    return 0
