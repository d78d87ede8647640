"""DistributedTrainer: the CE Trainer's job on many devices and nodes, on PyTorch Lightning.

    trainer = DistributedTrainer(model=model, train_data="/data/shards", num_nodes=2, gpus_per_node=4,
                                 config=TrainingConfig(max_steps=1000, batch_size=8, grad_accum_steps=4))
    result = trainer.fit()      # resumes from output_dir/checkpoints/last.ckpt when there is one

Batch semantics: `config.batch_size` sequences per micro-batch per process; one optimizer step averages
the gradients of ``batch_size x grad_accum_steps x world_size`` sequences (the global batch), where
world_size = num_nodes x gpus_per_node. Every process reads its own disjoint slice of each global batch
of one seeded order (see trainer/data.py), so a run's weights depend on the global batch, not on how it is
split over processes: 2 processes x batch 4 train the same weights as 1 process x batch 8.

The same script runs on one machine (Lightning starts gpus_per_node processes), on several (run it on
each node with NODE_RANK, MASTER_ADDR, MASTER_PORT set), under torchrun or under SLURM (detected).
Without GPUs, gpus_per_node CPU processes talk over gloo. Checkpoints are Lightning checkpoints in
output_dir/checkpoints (every save_every steps, keep_last of them, plus last.ckpt); at the end global
rank 0 exports the weights as a Hugging Face-format directory (output_dir/final) and, with tracking on,
logs the run to MLflow (deepseek_ee.tracking). With a local output_dir all processes must see it (a shared
filesystem across nodes) for resuming.

output_dir may be an s3:// or gs:// URL: the run then works in a local staging directory keyed by the URL,
global rank 0 publishes every checkpoint to <url>/checkpoints/step-NNNNNN/ (sha256 manifest last, so only
complete ones are ever visible) and, at the end, the export (<url>/final), loss curve, config and log; a
resume, on any machine, fetches the newest complete checkpoint from the URL (see trainer/remote.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from deepseek_core import storage
from deepseek_core.training import DataError, TrainingConfig, seed_everything
from deepseek_core.training.output import OutputLocation, resolve_output_dir
from torch import nn

from ..config import TrackingConfig
from ..lightning_module import CausalLMModule
from .data import EvalBatches, RankBatches, check_dataset, resolve_data
from .launch import make_strategy
from .plots import plot_loss_curve
from .remote import (
    REMOTE_CHECKPOINTS,
    PublishingCheckpointIO,
    fetch_lightning_checkpoint,
    latest_published_checkpoint,
    remove_stale_stages,
)
from .watchdog import PeerLostError, PeerWatchdog

__all__ = ["DistributedTrainResult", "DistributedTrainer"]

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
FINAL_DIR = "final"
LOSS_CURVE_FILE = "loss_curve.png"
LOG_FILE = "train.log"
CONFIG_FILE = "training_config.json"
STRATEGIES = ("ddp", "fsdp")
BACKENDS = ("nccl", "gloo")
PRECISIONS = {"auto": None, "fp32": "32-true", "bf16": "bf16-mixed", "32-true": "32-true", "bf16-mixed": "bf16-mixed",
              "bf16-true": "bf16-true"}  # fmt: skip


@dataclass
class DistributedTrainResult:
    """What `DistributedTrainer.fit` reached, seen from this process (paths and run id on global rank 0)."""

    steps: int
    tokens: int
    train_loss: float | None  # mean over the last logging window (all ranks)
    eval_loss: float | None
    eval_perplexity: float | None
    checkpoint: Path | None  # the Hugging Face-format export (global rank 0)
    lightning_checkpoint: Path | None  # last.ckpt, for resuming
    loss_curve: Path | None
    elapsed_s: float  # the whole fit(), start-up and export included
    tokens_per_s: float  # over the training steps this process ran
    world_size: int
    global_rank: int
    stopped_by: str  # "max_steps" | "max_time_s" | "already_done"
    mlflow_run_id: str | None = None
    start_step: int = 0  # the step this fit() started from (> 0 after a resume)
    resumed_from: str | None = None  # the checkpoint resumed from (a local path or a URL)
    checkpoint_url: str | None = None  # where the export was published, for a URL output_dir (rank 0)
    lightning_checkpoint_url: str | None = None  # the last checkpoint published, for a URL output_dir


def _is_facade(model: Any) -> bool:
    return isinstance(getattr(model, "module", None), nn.Module) and not isinstance(model, nn.Module)


class DistributedTrainer:
    """Data-parallel (DDP) or sharded (FSDP) training of a DeepSeek Model or Transformer; see the module doc.

    Takes what the CE Trainer takes (model, train_data, eval_data, config, output_dir, tokenizer,
    cache_dir) plus:
      num_nodes, gpus_per_node: the layout; without GPUs (or accelerator="cpu") gpus_per_node CPU processes.
      strategy: "ddp" (replicated weights) or "fsdp" (sharded weights, gradients and optimizer state).
      backend: "nccl" or "gloo" (default: nccl on GPUs, gloo on CPU).
      precision: "auto" | "bf16" | "fp32" (default config.precision; Lightning's "bf16-mixed", "32-true" and
        "bf16-true" are accepted too).
      activation_checkpointing: recompute activations in backward (default config.gradient_checkpointing).
      tracking: MLflow settings (a deepseek_ee.config.TrackingConfig, a dict of its fields, True for the
        defaults, False/None for none). Default: None (off); `deepseek-ee train` turns it on.
      optimizer, optimizer_options: "adamw" (core's, as CE) or "adafactor" (deepseek_ee.optimizers).
      collective_timeout_s, peer_timeout_s: a collective waiting longer fails; a rank whose heartbeat stops
        for peer_timeout_s is reported lost by name (trainer/watchdog.py).
      config_files: extra files (e.g. the ee.yaml) logged to MLflow next to the training config.
    output_dir may be an s3:// or gs:// URL (see the module doc); storage_options go to fsspec (e.g.
    {"endpoint_url": ...}). A URL whose bucket is missing or whose filesystem package (gcsfs for gs://) is
    not installed fails here, naming output_dir.
    """

    def __init__(
        self,
        model: Any,
        train_data: Any,
        eval_data: Any = None,
        config: TrainingConfig | None = None,
        output_dir: str | os.PathLike[str] = "deepseek-ee-output",
        tokenizer: Any = None,
        *,
        num_nodes: int = 1,
        gpus_per_node: int = 1,
        strategy: str = "ddp",
        backend: str | None = None,
        precision: str | None = None,
        activation_checkpointing: bool | None = None,
        tracking: TrackingConfig | dict[str, Any] | bool | None = None,
        accelerator: str = "auto",
        optimizer: str = "adamw",
        optimizer_options: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        collective_timeout_s: float = 1800.0,
        peer_timeout_s: float = 60.0,
        callbacks: list[pl.Callback] | None = None,
        config_files: list[str | os.PathLike[str]] | None = None,
        echo: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if config is not None and not isinstance(config, TrainingConfig):
            raise TypeError(f"config: expected a TrainingConfig, got {type(config).__name__}")
        self.config = config or TrainingConfig()
        self.facade = model if _is_facade(model) else None
        module = model.module if self.facade is not None else model
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"model: expected a deepseek Model or a Transformer (torch.nn.Module), got {type(model).__name__}"
            )
        self.module: nn.Module = module
        self.tokenizer = tokenizer if tokenizer is not None else getattr(self.facade, "tokenizer", None)
        self.output: OutputLocation = resolve_output_dir(output_dir, storage_options)
        self.output.check_access("output_dir")
        self.output_dir = self.output.local_dir
        self.resumed_from: str | None = None
        self.last_published: str | None = None
        for name, value in (("num_nodes", num_nodes), ("gpus_per_node", gpus_per_node)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        self.num_nodes, self.devices_per_node = num_nodes, gpus_per_node
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        self.strategy_name = strategy
        if accelerator not in ("auto", "gpu", "cuda", "cpu"):
            raise ValueError(f"accelerator: must be 'auto', 'gpu' or 'cpu', got {accelerator!r}")
        use_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        if use_gpu and not torch.cuda.is_available():
            raise ValueError("accelerator: 'gpu' requested but CUDA is not available on this machine")
        self.accelerator = "gpu" if use_gpu else "cpu"
        self.backend = backend or ("nccl" if use_gpu else "gloo")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if strategy == "fsdp" and not use_gpu:
            raise ValueError(
                "strategy: 'fsdp' needs GPUs (Lightning's FSDPStrategy is CUDA-only); use 'ddp' on CPU"
            )
        if self.backend == "nccl" and not use_gpu:
            raise ValueError(
                "backend: 'nccl' needs GPUs; use 'gloo' on CPU (no GPU was found or accelerator='cpu')"
            )
        wanted = precision if precision is not None else self.config.precision
        if wanted not in PRECISIONS:
            raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}, got {wanted!r}")
        self.precision = PRECISIONS[wanted] or (
            "bf16-mixed" if use_gpu and torch.cuda.is_bf16_supported() else "32-true"
        )
        self.activation_checkpointing = (
            self.config.gradient_checkpointing
            if activation_checkpointing is None
            else bool(activation_checkpointing)
        )
        self.tracking = _tracking_settings(tracking)
        if optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer: must be 'adamw' or 'adafactor', got {optimizer!r}")
        if optimizer_options and optimizer != "adafactor":
            raise ValueError("optimizer_options: only apply to optimizer='adafactor'")
        self.optimizer, self.optimizer_options = optimizer, dict(optimizer_options or {})
        if collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s: must be > 0, got {collective_timeout_s}")
        if peer_timeout_s < 2:
            raise ValueError(f"peer_timeout_s: must be >= 2 seconds, got {peer_timeout_s}")
        self.collective_timeout_s, self.peer_timeout_s = collective_timeout_s, peer_timeout_s
        self.extra_callbacks = list(callbacks or [])
        self.config_files = [Path(p) for p in (config_files or [])]
        self.echo = echo

        cfg = self.config
        self.train_dataset, split_eval = resolve_data(
            train_data, "train_data", seq_len=cfg.seq_len, eval_fraction=cfg.eval_fraction, split=eval_data is None,
            tokenizer=self.tokenizer, text_field=cfg.text_field, cache_dir=cache_dir,
        )  # fmt: skip
        if eval_data is None:
            self.eval_dataset = split_eval
        else:
            self.eval_dataset = resolve_data(
                eval_data, "eval_data", seq_len=cfg.seq_len, eval_fraction=0.0, split=False,
                tokenizer=self.tokenizer, text_field=cfg.text_field, cache_dir=cache_dir,
            )[0]  # fmt: skip
        model_config = getattr(self.module, "config", None)
        self.seq_len = check_dataset(self.train_dataset, "train_data", model_config)
        if self.eval_dataset is not None:
            check_dataset(self.eval_dataset, "eval_data", model_config)
        self.watchdog: PeerWatchdog | None = None
        self.trainer: pl.Trainer | None = None
        self.lightning_module: CausalLMModule | None = None
        self.tracker: Any = None

    # ------------------------------------------------------------------ layout
    @property
    def world_size(self) -> int:
        """Training processes in the job."""
        return self.num_nodes * self.devices_per_node

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all processes: batch_size x grad_accum_steps x world_size."""
        return self.config.batch_size * self.config.grad_accum_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step over all processes."""
        return self.global_batch_size * self.seq_len

    @property
    def checkpoint_dir(self) -> Path:
        """Where the Lightning checkpoints go."""
        return self.output_dir / CHECKPOINT_DIR

    def _layer_class(self) -> type | None:
        layers = getattr(getattr(self.module, "model", None), "layers", None)
        return type(layers[0]) if layers is not None and len(layers) else None

    # ------------------------------------------------------------------ building blocks
    def _callbacks(self) -> tuple[list[pl.Callback], Any]:
        from lightning.pytorch.callbacks import ModelCheckpoint

        cfg = self.config
        callbacks: list[pl.Callback] = []
        checkpointing: ModelCheckpoint | None = None
        if cfg.save_every > 0:
            checkpointing = ModelCheckpoint(
                dirpath=self.checkpoint_dir,
                filename="step-{step:06d}",
                auto_insert_metric_name=False,
                every_n_train_steps=cfg.save_every,
                save_top_k=cfg.keep_last if cfg.keep_last > 0 else -1,
                monitor="step",
                mode="max",
                save_last="link",
            )
            callbacks.append(checkpointing)
        callbacks.append(_FinalCheckpoint(self.checkpoint_dir / LAST_CHECKPOINT, checkpointing))
        if self.output.is_remote:
            callbacks.insert(0, _RemoteLog(self))
        callbacks.append(_Watchdog(self))
        callbacks.append(_TextLog(self))
        if self.tracking is not None:
            from ..tracking import MLflowCallback

            callbacks.append(_StartTracking(self))
            callbacks.append(MLflowCallback(None, log_every=cfg.log_every))
        return callbacks + self.extra_callbacks, checkpointing

    def _lightning_trainer(self) -> pl.Trainer:
        cfg = self.config
        moe = bool(getattr(getattr(self.module, "config", None), "is_moe", False))
        strategy = make_strategy(
            self.strategy_name, self.world_size, self.backend, self.collective_timeout_s,
            layer_class=self._layer_class(), find_unused_parameters=moe,
        )  # fmt: skip
        callbacks, _ = self._callbacks()
        has_eval = self.eval_dataset is not None
        micro_per_step = cfg.grad_accum_steps
        # Lightning counts micro-batches; eval_every=0 evaluates only once training is done.
        every = cfg.eval_every if cfg.eval_every > 0 else cfg.max_steps + 1
        return pl.Trainer(
            accelerator=self.accelerator,
            devices=self.devices_per_node,
            num_nodes=self.num_nodes,
            strategy=strategy,
            precision=self.precision,  # type: ignore[arg-type]
            max_steps=cfg.max_steps,
            max_epochs=-1,
            max_time=timedelta(seconds=cfg.max_time_s) if cfg.max_time_s else None,
            accumulate_grad_batches=cfg.grad_accum_steps,
            gradient_clip_val=None,  # CausalLMModule.configure_gradient_clipping clips (and records the norm)
            val_check_interval=every * micro_per_step if has_eval else None,
            check_val_every_n_epoch=None,
            limit_val_batches=None if has_eval else 0,
            num_sanity_val_steps=0,
            use_distributed_sampler=False,  # RankBatches / EvalBatches shard the data themselves
            callbacks=callbacks,
            plugins=[PublishingCheckpointIO(self.output, cfg.keep_last, self._published)],
            logger=False,
            enable_progress_bar=cfg.progress_bar,
            enable_model_summary=False,
            default_root_dir=self.output_dir,
        )

    # ------------------------------------------------------------------ training
    def fit(self, resume: bool | str | os.PathLike[str] = True) -> DistributedTrainResult:
        """Train to config.max_steps (or max_time_s); resume=True continues from last.ckpt when present (for a
        URL output_dir: from the newest complete checkpoint published there), a path or an s3:// / gs://
        checkpoint URL resumes from that Lightning checkpoint, False starts afresh. Raises PeerLostError
        (naming the lost rank) when another process of the job dies, TrainingDivergedError when the loss
        stops being finite."""
        cfg = self.config
        if os.environ.get("LOCAL_RANK", "0") == "0":  # the node's first process: no save is running yet
            remove_stale_stages(self.checkpoint_dir)
        ckpt_path = self._resume_point(resume)
        seed_everything(cfg.seed)
        if self.activation_checkpointing and hasattr(self.module, "set_gradient_checkpointing"):
            self.module.set_gradient_checkpointing(True)  # type: ignore[operator]
        self.lightning_module = module = CausalLMModule(
            self.module, cfg, tokens_per_step=self.tokens_per_step,
            optimizer=self.optimizer, optimizer_options=self.optimizer_options,
        )  # fmt: skip
        data = _DataModule(self)
        self.trainer = trainer = self._lightning_trainer()
        started = time.perf_counter()
        finished = False
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None)
            if trainer.interrupted:
                raise KeyboardInterrupt
            if self.eval_dataset is not None and (
                not module.eval_history or module.eval_history[-1][0] != trainer.global_step
            ):
                trainer.validate(module, datamodule=data, verbose=False)
            elapsed = time.perf_counter() - started
            result = self._finish(trainer, module, elapsed)
            finished = True
            return result
        except BaseException as exc:
            lost = self._diagnose(exc)
            self._end_tracking("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            if lost is not None:
                print(f"deepseek-ee: error: {lost}", file=sys.stderr, flush=True)
                raise lost from exc
            raise
        finally:
            if self.watchdog is not None:
                self.watchdog.stop(finished=finished)
                self.watchdog = None
            if self.facade is not None and hasattr(self.facade, "reset_engine"):
                self.facade.reset_engine()  # the engine must see the new weights

    def _resume_point(self, resume: bool | str | os.PathLike[str]) -> Path | None:
        self.resumed_from = None
        if resume is False:
            return None
        if resume is True:
            if self.output.is_remote:
                # The URL is the run's record: its newest complete checkpoint wins over the staging dir, so a
                # fresh machine (or node) resumes where the job left off.
                url = latest_published_checkpoint(self.output)
                if url is None:
                    return None
                self.resumed_from = url
                return fetch_lightning_checkpoint(self.output, url)
            last = self.checkpoint_dir / LAST_CHECKPOINT
            if not last.exists():
                return None
            self.resumed_from = str(last)
            return last
        text = os.fspath(resume)
        if storage.is_remote(text):
            location = OutputLocation(Path(), url=text, storage_options=self.output.storage_options)
            location.check_access("resume")
            self.resumed_from = text.rstrip("/")
            return fetch_lightning_checkpoint(location, self.resumed_from)
        path = Path(resume)
        if not path.is_file():
            raise ValueError(f"resume: {path} is not a Lightning checkpoint file")
        self.resumed_from = str(path)
        return path

    def _published(self, step: int, url: str) -> None:
        """Told by PublishingCheckpointIO (global rank 0) each time a checkpoint reached the URL."""
        self.last_published = url
        self._log(f"checkpoint step {step} published -> {url}")

    def _diagnose(self, exc: BaseException) -> PeerLostError | None:
        """A PeerLostError naming the lost rank(s) when `exc` came from a peer going away."""
        watchdog = self.watchdog
        if (
            watchdog is None
            or not isinstance(exc, (RuntimeError, OSError))
            or isinstance(exc, (DataError, PeerLostError))
        ):
            return None
        if isinstance(exc, FloatingPointError):
            return None
        lost, detail = watchdog.find_lost()
        if not lost:
            return None
        if self.output.is_remote:
            hint = (
                f"Rerun the same command on every node to resume from the newest checkpoint under "
                f"{storage.url_join(self.output.url or '', REMOTE_CHECKPOINTS)}."
            )
        elif (self.checkpoint_dir / LAST_CHECKPOINT).exists():
            hint = f"Rerun the same command on every node to resume from {self.checkpoint_dir / LAST_CHECKPOINT}."
        else:
            hint = "No checkpoint was written yet; a rerun starts from step 0."
        return PeerLostError(
            watchdog.rank, watchdog.world_size, lost, f"{detail}; first error: {exc}".strip(), hint
        )

    def _finish(self, trainer: pl.Trainer, module: CausalLMModule, elapsed: float) -> DistributedTrainResult:
        """Export the weights (HF format), plot, log to MLflow; rank 0 writes, every rank returns a result."""
        cfg = self.config
        state = None
        if self.strategy_name == "fsdp":
            state = trainer.strategy.lightning_module_state_dict()  # a collective: every rank takes part
        rank = trainer.global_rank
        if module.start_step is None:  # resumed at max_steps: nothing was left to train
            module.start_step = trainer.global_step
        steps_run = max(0, trainer.global_step - module.start_step)
        tokens_run = steps_run * self.tokens_per_step
        train_s = (
            time.perf_counter() - module.train_started_at if module.train_started_at is not None else 0.0
        )
        stopped_by = "already_done" if module.start_step >= cfg.max_steps else (
            "max_steps" if trainer.global_step >= cfg.max_steps else "max_time_s"
        )  # fmt: skip
        window = module.loss_history[-cfg.log_every :]
        train_loss = sum(v for _, v in window) / len(window) if window else None
        last_ckpt = self.checkpoint_dir / LAST_CHECKPOINT
        result = DistributedTrainResult(
            steps=trainer.global_step,
            tokens=trainer.global_step * self.tokens_per_step,
            train_loss=train_loss,
            eval_loss=module.last_eval.get("eval_loss"),
            eval_perplexity=module.last_eval.get("eval_perplexity"),
            checkpoint=None,
            lightning_checkpoint=last_ckpt if last_ckpt.exists() else None,
            loss_curve=None,
            elapsed_s=elapsed,
            tokens_per_s=tokens_run / train_s if train_s > 0 else 0.0,
            world_size=trainer.world_size,
            global_rank=rank,
            stopped_by=stopped_by,
            start_step=module.start_step,
            resumed_from=self.resumed_from,
            lightning_checkpoint_url=self.last_published,
        )
        if rank != 0:
            return result
        export = self._export(state)
        result.checkpoint = export
        result.checkpoint_url = self.output.publish_directory(export, FINAL_DIR)
        result.loss_curve = plot_loss_curve(
            self.output_dir / LOSS_CURVE_FILE,
            module.loss_history,
            module.eval_history,
            title="deepseek-ee training loss",
        )
        config_json = self.output_dir / CONFIG_FILE
        from deepseek_core.fileio import atomic_write_text

        atomic_write_text(config_json, json.dumps(self._run_params(trainer), indent=2, default=str) + "\n")
        for path in (result.loss_curve, config_json):
            if path is not None:
                self.output.publish_file(path)
        if self.tracker is not None:
            from ..tracking import log_files

            tracker = self.tracker
            final_metrics = {"final_train_loss": train_loss, "tokens_per_s_mean": result.tokens_per_s}
            if result.eval_loss is not None:
                final_metrics.update(eval_loss=result.eval_loss, eval_perplexity=result.eval_perplexity)
            tracker.log_metrics(final_metrics, step=trainer.global_step, flush=True)
            files: list[tuple[Path | None, str | None]] = [(config_json, "config"), (result.loss_curve, None)]
            files += [(p, "config") for p in self.config_files]
            files.append((self.output_dir / LOG_FILE, None))
            log_files(tracker, files)
            if self.tracking is not None and self.tracking.log_model:
                log_files(tracker, [(export, "model")])
                tracker.register_model(self.tracking.registered_model or self.tracking.experiment, "model")
            result.mlflow_run_id = tracker.run_id
            self._end_tracking("FINISHED")
        self._log(
            f"done: {result.steps} steps, {result.tokens:,} tokens, {result.tokens_per_s:,.0f} tok/s over "
            f"{result.world_size} process(es)"
            + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
            + f"; model {export}; loss curve {result.loss_curve}"
            + (f"; published to {self.output.url}" if self.output.is_remote else "")
        )
        self.output.publish_file(self.output_dir / LOG_FILE)
        return result

    def _export(self, full_state: dict[str, Any] | None) -> Path:
        from deepseek_core import save_model

        target = self.output_dir / FINAL_DIR
        if full_state is None:
            return save_model(self.module, target, tokenizer=self.tokenizer)
        prefix = "transformer."
        weights = {k[len(prefix) :]: v for k, v in full_state.items() if k.startswith(prefix)}
        config = getattr(self.module, "config", None)
        if config is None:
            raise ValueError("model: FSDP export needs a deepseek_core Transformer (with .config)")
        # The gathered full state dict is already on the CPU: save it as is rather than building a second
        # full copy of the model just to call state_dict() on it.
        return save_model(_GatheredModel(config, weights), target, tokenizer=self.tokenizer)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ tracking and logs
    def _run_params(self, trainer: pl.Trainer) -> dict[str, Any]:
        model_config = getattr(self.module, "config", None)
        params: dict[str, Any] = {
            "training": self.config.to_dict(),
            "world_size": trainer.world_size,
            "num_nodes": self.num_nodes,
            "devices_per_node": self.devices_per_node,
            "accelerator": self.accelerator,
            "strategy": self.strategy_name,
            "backend": self.backend if trainer.world_size > 1 or self.strategy_name == "fsdp" else "none",
            "precision": self.precision,
            "optimizer": self.optimizer,
            "activation_checkpointing": self.activation_checkpointing,
            "global_batch_size": self.global_batch_size,
            "tokens_per_step": self.tokens_per_step,
            "seq_len": self.seq_len,
            "train_sequences": len(self.train_dataset),  # type: ignore[arg-type]
            "eval_sequences": len(self.eval_dataset) if self.eval_dataset is not None else 0,  # type: ignore[arg-type]
        }
        if self.optimizer_options:
            params["optimizer_options"] = self.optimizer_options
        model_params: dict[str, Any] = {"parameters": sum(p.numel() for p in self.module.parameters())}
        if model_config is not None and hasattr(model_config, "to_dict"):
            model_params.update(
                {k: v for k, v in model_config.to_dict().items() if isinstance(v, (int, float, str, bool))}
            )
        params["model"] = model_params
        return params

    def _start_tracking(self, trainer: pl.Trainer) -> None:
        if self.tracking is None or not trainer.is_global_zero or self.tracker is not None:
            return
        from ..tracking import MLflowTracker

        self.tracker = MLflowTracker(self.tracking, self.output_dir)
        tags = {"deepseek_ee.strategy": self.strategy_name, "deepseek_ee.world_size": str(trainer.world_size)}
        self.tracker.start(self._run_params(trainer), tags=tags)
        self._log(
            f"mlflow: run {self.tracker.run_id} at {self.tracker.tracking_uri} (experiment {self.tracking.experiment})"
        )

    def _end_tracking(self, status: str) -> None:
        if self.tracker is None:
            return
        try:
            self.tracker.end(status)
        except Exception as exc:  # a failing tracking server must not hide the training outcome
            print(f"deepseek-ee: warning: could not close the MLflow run: {exc}", file=sys.stderr, flush=True)
        self.tracker = None

    def _log(self, message: str) -> None:
        """One line to stdout and output_dir/train.log (global rank 0 only)."""
        if self.trainer is not None and not self.trainer.is_global_zero:
            return
        line = f"[deepseek-ee {time.strftime('%H:%M:%S')}] {message}"
        if self.echo:
            print(line, flush=True)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


class _GatheredModel:
    """What save_model reads from a model (config, state_dict(), dtype), over an FSDP-gathered state dict."""

    def __init__(self, config: Any, state: dict[str, torch.Tensor]) -> None:
        self.config = config
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    @property
    def dtype(self) -> torch.dtype:
        return next((t.dtype for t in self._state.values() if t.is_floating_point()), torch.float32)


def _tracking_settings(tracking: Any) -> TrackingConfig | None:
    if tracking is None or tracking is False:
        return None
    if tracking is True:
        return TrackingConfig()
    if isinstance(tracking, TrackingConfig):
        settings = tracking
    elif isinstance(tracking, dict):
        try:
            settings = TrackingConfig(**tracking)
        except TypeError as exc:
            raise ValueError(f"tracking: {exc}") from None
    else:
        raise TypeError(
            f"tracking: expected a TrackingConfig, a dict, True or None, got {type(tracking).__name__}"
        )
    settings.validate("tracking")
    return settings if settings.enabled else None


# ---------------------------------------------------------------------------------------------- Lightning glue
class _DataModule(pl.LightningDataModule):
    """Per-rank loaders, built once Lightning knows the rank (and after a checkpoint was restored)."""

    def __init__(self, owner: DistributedTrainer) -> None:
        super().__init__()
        self.owner = owner

    def train_dataloader(self) -> Any:
        """This rank's endless micro-batches, starting where the restored optimizer step left off."""
        owner, trainer, cfg = self.owner, self.trainer, self.owner.config
        assert trainer is not None
        per_step = cfg.grad_accum_steps * cfg.batch_size * trainer.world_size
        vocab = getattr(getattr(owner.module, "config", None), "vocab_size", None)
        return RankBatches(
            owner.train_dataset, cfg.batch_size, trainer.global_rank, trainer.world_size, cfg.seed,
            start_position=lambda: trainer.global_step * per_step, vocab_size=vocab,
        )  # fmt: skip

    def val_dataloader(self) -> Any:
        """This rank's share of the eval set (padded to equal batch counts)."""
        owner, trainer = self.owner, self.trainer
        assert trainer is not None
        if owner.eval_dataset is None:
            return []
        cfg = owner.config
        return EvalBatches(
            owner.eval_dataset, cfg.batch_size, trainer.global_rank, trainer.world_size, cfg.eval_steps
        )


class _FinalCheckpoint(pl.Callback):
    """Saves last.ckpt when training ends on a step the periodic checkpoints did not cover."""

    def __init__(self, path: Path, periodic: Any) -> None:
        self.path = path
        self.periodic = periodic

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        saved = getattr(self.periodic, "_last_global_step_saved", -1) if self.periodic is not None else -1
        done = saved == trainer.global_step and self.path.exists()
        # Rank 0's view decides for all (save_checkpoint is a collective): other nodes may have no copy of
        # output_dir, e.g. a local staging directory of a URL output_dir.
        if trainer.strategy.broadcast(done, src=0):
            return
        if self.path.is_symlink():  # ModelCheckpoint's link to an older checkpoint: replace it by a file
            if trainer.is_global_zero:
                self.path.unlink()
            trainer.strategy.barrier("deepseek_ee.final_checkpoint")
        trainer.save_checkpoint(self.path)


class _RemoteLog(pl.Callback):
    """For a URL output_dir: a run resumed on another machine keeps appending to the log it published."""

    def __init__(self, owner: DistributedTrainer) -> None:
        self.owner = owner

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            self.owner.output_dir.mkdir(parents=True, exist_ok=True)
            self.owner.output.fetch_file(LOG_FILE, self.owner.output_dir / LOG_FILE)


class _Watchdog(pl.Callback):
    """Starts the peer watchdog once the process group exists (multi-process runs only)."""

    def __init__(self, owner: DistributedTrainer) -> None:
        self.owner = owner

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size < 2 or self.owner.watchdog is not None:
            return
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            return
        interval = min(1.0, self.owner.peer_timeout_s / 5)
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.owner.watchdog = PeerWatchdog(
            trainer.global_rank, trainer.world_size, host, int(port), interval_s=interval,
            timeout_s=self.owner.peer_timeout_s, namespace=f"deepseek_ee/{restarts}",
        ).start()  # fmt: skip


class _StartTracking(pl.Callback):
    """Opens the MLflow run on global rank 0 and hands the tracker to the MLflowCallback."""

    def __init__(self, owner: DistributedTrainer) -> None:
        self.owner = owner

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.owner._start_tracking(trainer)
        from ..tracking import MLflowCallback

        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, MLflowCallback):
                callback.tracker = self.owner.tracker


class _TextLog(pl.Callback):
    """Plain-text progress lines every log_every steps (global rank 0), as the CE Trainer writes them."""

    def __init__(self, owner: DistributedTrainer) -> None:
        self.owner = owner
        self._seen = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        owner, cfg = self.owner, self.owner.config
        if owner.resumed_from is not None:
            owner._log(f"resumed from {owner.resumed_from} at step {trainer.global_step}")
        params = sum(p.numel() for p in owner.module.parameters())
        owner._log(
            f"train: {params / 1e6:.2f}M parameters | {trainer.world_size} process(es) ({owner.num_nodes} node(s) x "
            f"{owner.devices_per_node} {owner.accelerator}) | strategy {owner.strategy_name} | precision {owner.precision}"
            f" | global batch {owner.global_batch_size} sequences of {owner.seq_len} tokens | steps "
            f"{trainer.global_step}->{cfg.max_steps}"
        )
        self._seen = len(pl_module.step_metrics)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        cfg = self.owner.config
        new = pl_module.step_metrics[self._seen :]
        if not new:
            return
        m = new[-1]
        if m.step % cfg.log_every == 0 or m.step == cfg.max_steps:
            window = pl_module.step_metrics[max(0, len(pl_module.step_metrics) - cfg.log_every) :]
            loss = sum(w.loss for w in window) / len(window)
            rate = sum(w.tokens_per_s for w in window) / len(window)
            norm = f" | grad_norm {m.grad_norm:.3f}" if m.grad_norm is not None else ""
            self.owner._log(
                f"step {m.step}/{cfg.max_steps} | loss {loss:.4f} | lr {m.learning_rate:.3e}{norm} | {rate:,.0f} tok/s"
            )
        self._seen = len(pl_module.step_metrics)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if pl_module.last_eval:
            e = pl_module.last_eval
            self.owner._log(
                f"eval step {trainer.global_step} | loss {e['eval_loss']:.4f} | perplexity {e['eval_perplexity']:.2f}"
            )
