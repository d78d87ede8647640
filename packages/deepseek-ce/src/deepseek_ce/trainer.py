"""Trainer: train a model on one device (a CUDA GPU when present, else the CPU) from one data file.

    trainer = Trainer(model=model, train_data="corpus.txt", config=TrainingConfig(max_steps=200))
    result = trainer.fit()        # resumes from output_dir's latest complete checkpoint, if any

AdamW (decay on matrices only), warmup + cosine, gradient accumulation, clipping, bf16 autocast where it
helps; a seeded, resumable data order so a killed run resumes to the very weights an uninterrupted one
reaches; atomic checkpoints every `save_every` steps and at the end; text logs and a loss-curve PNG.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from deepseek_core import storage
from deepseek_core.training import (
    BatchOrder,
    DataError,
    PackedTokens,
    TrainingConfig,
    TrainingDivergedError,
    WarmupCosine,
    build_adamw,
    capture_rng_state,
    chunked_lm_loss,
    latest_checkpoint,
    lm_loss,
    load_text_dataset,
    load_trainer_state,
    load_weights_into,
    remove_stale_temp_dirs,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    warmup_cosine_scheduler,
)
from deepseek_core.training.checkpoints import COMPLETE_MARKER
from deepseek_core.training.output import OutputLocation, resolve_output_dir
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from .runlog import RunLog, plot_loss_curve

LOSS_CURVE_FILE = "loss_curve.png"
LOG_FILE = "train.log"


@dataclass
class TrainResult:
    """What `Trainer.fit` reached."""

    steps: int
    tokens: int
    train_loss: float | None  # mean over the last logging window
    eval_loss: float | None
    eval_perplexity: float | None
    checkpoint: Path | None
    loss_curve: Path | None
    log_file: Path
    elapsed_s: float  # wall time of fit(), evaluation and checkpoints included
    tokens_per_s: float  # training throughput (time in training steps only)
    stopped_by: str  # "max_steps" | "max_time_s" | "already_done"
    checkpoint_url: str | None = None  # where `checkpoint` was published, when output_dir is a URL


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _is_facade(model: Any) -> bool:
    return isinstance(getattr(model, "module", None), nn.Module) and not isinstance(model, nn.Module)


class Trainer:
    """Single-device training of a DeepSeek Model (facade) or Transformer; see the module docstring.

    train_data: a .txt/.jsonl/.parquet file (tokenized once, cached, packed, split by eval_fraction when
    eval_data is None), a directory of packed shards (deepseek_core.training.PackedShardDataset), or a torch
    Dataset whose items are LongTensor [seq] or {"input_ids": ..., "labels"?: ...}.
    All data problems are raised here, in the constructor, before any training step.

    output_dir: a local directory, or an s3:// / gs:// URL (needs deepseek-core[cloud]): the run then works
    in a local staging directory keyed by the URL, publishes every complete checkpoint and, at the end, the
    loss curve and log to the URL, and resumes from the newest complete checkpoint found there (see
    deepseek_core.training.output). storage_options go to fsspec (e.g. {"endpoint_url": ...}).
    """

    def __init__(
        self,
        model: Any,
        train_data: Any,
        eval_data: Any = None,
        config: TrainingConfig | None = None,
        output_dir: str | os.PathLike[str] = "deepseek-ce-output",
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
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
        self.output_dir = self.output.local_dir
        self.device = torch.device(device) if device is not None else default_device()
        self.cache_dir = cache_dir
        self.precision = self._resolve_precision()
        self.train_dataset: Any
        self.eval_dataset: Any
        self.train_dataset, split_eval = self._resolve_data(train_data, "train_data", split=eval_data is None)
        self.eval_dataset = (
            split_eval if eval_data is None else self._resolve_data(eval_data, "eval_data", split=False)[0]
        )
        self.seq_len = self._check_dataset(self.train_dataset, "train_data")
        if self.eval_dataset is not None:
            self._check_dataset(self.eval_dataset, "eval_data")
        self.echo = echo
        self.step = 0
        self.tokens_seen = 0
        self.history: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
        self._log: RunLog | None = None
        self._last_eval: tuple[int, dict[str, float]] | None = None
        self.last_checkpoint_url: str | None = None

    # ------------------------------------------------------------------ setup
    def _resolve_precision(self) -> str:
        wanted = self.config.precision
        if self.device.type == "cuda":
            bf16_ok = torch.cuda.is_bf16_supported()
            if wanted == "bf16" and not bf16_ok:
                raise ValueError(
                    "TrainingConfig.precision: 'bf16' requested but this GPU does not support bfloat16"
                )
            return "bf16" if wanted == "bf16" or (wanted == "auto" and bf16_ok) else "fp32"
        # CPU: bf16 autocast only when asked for; fp32 is the faster and exact default there.
        return "bf16" if wanted == "bf16" else "fp32"

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _resolve_data(self, data: Any, name: str, split: bool) -> tuple[Any, Any]:
        cfg = self.config
        if isinstance(data, (str, os.PathLike)):
            text = os.fspath(data)
            if "://" in text:
                raise DataError(f"{name}={text!r}: the CE Trainer reads local files; download the data first")
            path = Path(text).expanduser()
            if path.is_dir():
                return self._shard_data(path, name, split)
            if self.tokenizer is None:
                raise ValueError(
                    f"{name}: a text file needs a tokenizer: pass tokenizer=... or a Model that has one"
                )
            fraction = cfg.eval_fraction if split else 0.0
            data_split = load_text_dataset(
                path,
                self.tokenizer,
                cfg.seq_len,
                fraction,
                text_field=cfg.text_field,
                cache_dir=self.cache_dir,
            )
            return data_split.train, data_split.eval
        if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            return data, None
        raise TypeError(
            f"{name}: expected a file path, a shard directory or a Dataset, got {type(data).__name__}"
        )

    def _shard_data(self, path: Path, name: str, split: bool) -> tuple[Any, Any]:
        from deepseek_core.training import PackedShardDataset

        try:
            # Stream order here; the Trainer's own seeded BatchOrder shuffles (and resumes) it.
            dataset = PackedShardDataset(path, self.config.seq_len, seed=None)
        except (OSError, ValueError) as exc:
            raise DataError(f"{name}={path}: {exc}") from None
        n = len(dataset)
        n_eval = math.ceil(n * self.config.eval_fraction) if split and self.config.eval_fraction > 0 else 0
        n_eval = min(n_eval, max(0, n - 1))
        if not n_eval:
            return dataset, None
        return Subset(dataset, range(n - n_eval)), Subset(dataset, range(n - n_eval, n))

    def _check_dataset(self, dataset: Any, name: str) -> int:
        if len(dataset) < 1:
            raise DataError(f"{name}: the dataset has no sequences (is the data shorter than seq_len?)")
        input_ids, _ = _fetch(dataset, torch.tensor([0]))
        seq_len = int(input_ids.shape[1])
        max_pos = getattr(getattr(self.module, "config", None), "max_position_embeddings", None)
        if max_pos is not None and seq_len > max_pos:
            raise DataError(
                f"{name}: sequences of {seq_len} tokens exceed the model's max_position_embeddings={max_pos}"
            )
        vocab = getattr(getattr(self.module, "config", None), "vocab_size", None)
        if isinstance(dataset, PackedTokens) and vocab is not None and dataset.max_token_id() >= vocab:
            raise DataError(
                f"{name}: token id {dataset.max_token_id()} is outside the model's vocabulary (vocab_size={vocab}); "
                "the tokenizer and the model do not match"
            )
        return seq_len

    def _prepare_module(self) -> nn.Module:
        self.module.to(self.device)
        enable = getattr(self.module, "set_gradient_checkpointing", None)
        if self.config.gradient_checkpointing and callable(enable):
            enable(True)
        return self.module

    def _batch(self, dataset: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, labels = _fetch(dataset, indices)
        vocab = getattr(getattr(self.module, "config", None), "vocab_size", None)
        if vocab is not None and not isinstance(dataset, PackedTokens):
            top = int(input_ids.max())
            if top >= vocab:
                raise DataError(
                    f"data: token id {top} is outside the model's vocabulary (vocab_size={vocab})"
                )
        if labels is None:  # plain sequences: predict token t+1 from tokens <= t
            labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1)
        non_blocking = self.device.type == "cuda"
        return input_ids.to(self.device, non_blocking=non_blocking), labels.to(
            self.device, non_blocking=non_blocking
        )

    def _loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        chunk = self.config.loss_chunk_size
        module: Any = self.module
        if chunk > 0 and hasattr(module, "hidden_states") and hasattr(module, "lm_head"):
            return chunked_lm_loss(module.hidden_states(input_ids), module.lm_head.weight, labels, chunk)
        return lm_loss(module(input_ids), labels)

    def log(self, message: str) -> None:
        """One line to stdout and output_dir/train.log."""
        if self._log is None:
            self._log = RunLog(self.output_dir / LOG_FILE, echo=self.echo)
        self._log(message)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Mean eval loss (nats/token) and perplexity over `max_batches` batches (default: config.eval_steps,
        where 0 means the whole eval set), in order, so two calls on the same weights agree."""
        if self.eval_dataset is None:
            raise ValueError(
                "evaluate: no eval data (pass eval_data=..., or a single file with eval_fraction > 0)"
            )
        module = self._prepare_module()
        was_training = module.training
        module.eval()
        limit = self.config.eval_steps if max_batches is None else max_batches
        n, bs = len(self.eval_dataset), self.config.batch_size
        batches = math.ceil(n / bs) if not limit else min(math.ceil(n / bs), limit)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        try:
            for b in range(batches):
                indices = torch.arange(b * bs, min(n, (b + 1) * bs))
                input_ids, labels = self._batch(self.eval_dataset, indices)
                with self._autocast():
                    logits = module(input_ids)
                total += F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                ).double()
                count += int((labels != -100).sum())
        finally:
            module.train(was_training)
        loss = float(total) / max(count, 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": float(count)}

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(
        self, optimizer: torch.optim.Optimizer, scheduler: Any, order: BatchOrder
    ) -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data_order": order.state_dict(),
            "rng": capture_rng_state(),
            "tokens_seen": self.tokens_seen,
            "history": {k: [list(p) for p in v] for k, v in self.history.items()},
            "precision": self.precision,
        }

    def save_checkpoint(self, optimizer: torch.optim.Optimizer, scheduler: Any, order: BatchOrder) -> Path:
        """Write checkpoint-<step> (atomically) and prune old ones to config.keep_last."""
        path = save_checkpoint(
            self.output_dir,
            self.step,
            self.module,
            self._trainer_state(optimizer, scheduler, order),
            tokenizer=self.tokenizer,
            training_config=self.config.to_dict(),
            keep_last=self.config.keep_last,
        )
        self.log(f"checkpoint step {self.step} -> {path}")
        url = self.output.publish(path, keep_last=self.config.keep_last)
        if url is not None:
            self.last_checkpoint_url = url
            self.log(f"checkpoint step {self.step} published -> {url}")
        return path

    def _restore(
        self, checkpoint: Path, optimizer: torch.optim.Optimizer, scheduler: Any, order: BatchOrder
    ) -> None:
        state = load_trainer_state(checkpoint)
        self._warn_config_changes(checkpoint)
        load_weights_into(self.module, checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The schedule follows this run's config (it equals the saved one unless the config was changed).
        cfg = self.config
        scheduler.lr_lambdas[0].__dict__.update(
            WarmupCosine(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio).__dict__
        )
        order.load_state_dict(state["data_order"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        history = state.get("history", {})
        self.history = {k: [(int(s), float(v)) for s, v in history.get(k, [])] for k in ("train", "eval")}
        self.log(f"resumed from {checkpoint} at step {self.step}")

    def _warn_config_changes(self, checkpoint: Path) -> None:
        import json

        from deepseek_core.training.checkpoints import TRAINING_CONFIG_FILE

        try:
            saved = json.loads((checkpoint / TRAINING_CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        exact = (
            "batch_size",
            "seq_len",
            "grad_accum_steps",
            "seed",
            "learning_rate",
            "weight_decay",
            "warmup_steps",
            "min_lr_ratio",
            "max_steps",
            "max_grad_norm",
            "precision",
        )
        changed = [
            f"{k} {saved[k]!r}->{getattr(self.config, k)!r}"
            for k in exact
            if k in saved and saved[k] != getattr(self.config, k)
        ]
        if changed:
            self.log(
                f"warning: resuming {checkpoint.name} with a changed config ({', '.join(changed)}); "
                "the run will not match an uninterrupted one"
            )

    # ------------------------------------------------------------------ training
    def fit(self, resume: bool | str | os.PathLike[str] = True) -> TrainResult:
        """Train to config.max_steps (or config.max_time_s), checkpointing as configured.

        resume=True continues from the latest complete checkpoint in output_dir (for a URL output_dir: the
        newest complete one published there) when there is one (a half-written one is never used); a path
        or an s3:// / gs:// checkpoint URL resumes from that checkpoint; False starts afresh.
        Raises TrainingDivergedError (naming the step) when the loss stops being finite.
        """
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(self.output_dir)
        if self._log is None:
            # A run resumed on another machine keeps appending to the log it published.
            self.output.fetch_file(LOG_FILE, self.output_dir / LOG_FILE)
        module = self._prepare_module()
        module.train()
        optimizer = build_adamw(
            module, cfg.learning_rate, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps
        )
        scheduler = warmup_cosine_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        order = BatchOrder(len(self.train_dataset), cfg.batch_size, seed=cfg.seed)
        checkpoint = self._resume_point(resume)
        self.step, self.tokens_seen, self.history = 0, 0, {"train": [], "eval": []}
        if checkpoint is not None:
            self._restore(checkpoint, optimizer, scheduler, order)
        else:
            seed_everything(cfg.seed)
        params = sum(p.numel() for p in module.parameters())
        tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * self.seq_len
        self.log(
            f"train: {params / 1e6:.2f}M parameters | {len(self.train_dataset)} train sequences of {self.seq_len} tokens"
            f" | eval {len(self.eval_dataset) if self.eval_dataset is not None else 0} sequences | device {self.device}"
            f" | precision {self.precision} | {tokens_per_step} tokens/step | steps {self.step}->{cfg.max_steps}"
        )
        start_time = time.perf_counter()
        start_tokens = self.tokens_seen
        stopped_by = "already_done" if self.step >= cfg.max_steps else "max_steps"
        last_checkpoint: Path | None = checkpoint
        # Throughput counts training steps only (not evaluation or checkpoint writing).
        window_loss, window_steps, window_s, window_tokens, train_s = 0.0, 0, 0.0, 0, 0.0
        train_loss: float | None = None
        grad_norm: torch.Tensor | None = None
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            unit="step",
            disable=not cfg.progress_bar,
            dynamic_ncols=True,
            desc="train",
        )
        try:
            while self.step < cfg.max_steps:
                step = self.step + 1
                step_start = time.perf_counter()
                accumulated = torch.zeros((), device=self.device)
                for _ in range(cfg.grad_accum_steps):
                    input_ids, labels = self._batch(self.train_dataset, order.next_batch())
                    with self._autocast():
                        loss = self._loss(input_ids, labels)
                    (loss / cfg.grad_accum_steps).backward()
                    accumulated += loss.detach()
                loss_value = float(accumulated) / cfg.grad_accum_steps
                if not math.isfinite(loss_value):
                    optimizer.zero_grad(set_to_none=True)
                    raise TrainingDivergedError(
                        step, loss_value, str(last_checkpoint) if last_checkpoint else None
                    )
                if cfg.max_grad_norm > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        module.parameters(), cfg.max_grad_norm, foreach=True
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                self.step = step
                step_s = time.perf_counter() - step_start
                train_s += step_s
                window_s += step_s
                self.tokens_seen += tokens_per_step
                self.history["train"].append((step, loss_value))
                window_loss += loss_value
                window_steps += 1
                window_tokens += tokens_per_step
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    train_loss = window_loss / window_steps
                    norm = f" | grad_norm {float(grad_norm):.3f}" if grad_norm is not None else ""
                    rate = window_tokens / max(window_s, 1e-9)
                    self.log(
                        f"step {step}/{cfg.max_steps} | loss {train_loss:.4f} | lr {optimizer.param_groups[0]['lr']:.3e}"
                        f"{norm} | {rate:,.0f} tok/s"
                    )
                    bar.set_postfix(loss=f"{train_loss:.3f}")
                    window_loss, window_steps, window_s, window_tokens = 0.0, 0, 0.0, 0
                out_of_time = (
                    cfg.max_time_s is not None and time.perf_counter() - start_time >= cfg.max_time_s
                )
                if out_of_time:
                    stopped_by = "max_time_s"
                if (
                    self.eval_dataset is not None
                    and cfg.eval_every
                    and step % cfg.eval_every == 0
                    and step < cfg.max_steps
                    and not out_of_time
                ):
                    self._log_eval()
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps and not out_of_time:
                    last_checkpoint = self.save_checkpoint(optimizer, scheduler, order)
                if out_of_time:
                    self.log(f"max_time_s={cfg.max_time_s} reached at step {step}; stopping")
                    break
        finally:
            bar.close()
        elapsed = time.perf_counter() - start_time
        metrics: dict[str, float] = {}
        if self.eval_dataset is not None:
            last = self._last_eval
            metrics = last[1] if last is not None and last[0] == self.step else self._log_eval()
        if (
            stopped_by != "already_done"
            or last_checkpoint is None
            or not (last_checkpoint / COMPLETE_MARKER).is_file()
        ):
            last_checkpoint = self.save_checkpoint(optimizer, scheduler, order)
        curve = plot_loss_curve(
            self.output_dir / LOSS_CURVE_FILE,
            self.history["train"],
            self.history["eval"],
            title="deepseek-ce training loss",
        )
        self.output.publish_file(curve)
        trained = self.tokens_seen - start_tokens
        result = TrainResult(
            steps=self.step,
            tokens=self.tokens_seen,
            train_loss=train_loss
            if train_loss is not None
            else (self.history["train"][-1][1] if self.history["train"] else None),
            eval_loss=metrics.get("eval_loss"),
            eval_perplexity=metrics.get("eval_perplexity"),
            checkpoint=last_checkpoint,
            loss_curve=curve,
            log_file=self.output_dir / LOG_FILE,
            elapsed_s=elapsed,
            tokens_per_s=trained / train_s if train_s > 0 else 0.0,
            stopped_by=stopped_by,
            checkpoint_url=self.last_checkpoint_url,
        )
        self.log(
            f"done: {result.steps} steps, {result.tokens:,} tokens, {result.tokens_per_s:,.0f} tok/s"
            + (
                f", eval loss {result.eval_loss:.4f} (perplexity {result.eval_perplexity:.2f})"
                if result.eval_loss is not None
                else ""
            )
            + f"; checkpoint {result.checkpoint}; loss curve {curve}"
            + (f"; published to {self.output.url}" if self.output.is_remote else "")
        )
        self.output.publish_file(self.output_dir / LOG_FILE)
        if self.facade is not None and hasattr(self.facade, "reset_engine"):
            self.facade.reset_engine()  # the engine must see the new weights
        return result

    def _resume_point(self, resume: bool | str | os.PathLike[str]) -> Path | None:
        self.last_checkpoint_url = None
        if resume is False:
            return None
        if resume is True:
            if not self.output.is_remote:
                return latest_checkpoint(self.output_dir)
            # The URL is the run's record: its newest complete checkpoint wins over the staging dir.
            found = self.output.latest_checkpoint()
            if found is None:
                return None
            self.last_checkpoint_url = found[1]
            return found[0]
        if storage.is_remote(os.fspath(resume)):
            self.last_checkpoint_url = os.fspath(resume).rstrip("/")
            return self.output.fetch(self.last_checkpoint_url)
        path = Path(resume)
        if not (path / COMPLETE_MARKER).is_file():
            raise ValueError(f"resume: {path} is not a complete checkpoint (no {COMPLETE_MARKER})")
        return path

    def _log_eval(self) -> dict[str, float]:
        metrics = self.evaluate()
        self._last_eval = (self.step, metrics)
        self.history["eval"].append((self.step, metrics["eval_loss"]))
        self.log(
            f"eval step {self.step} | loss {metrics['eval_loss']:.4f} | perplexity {metrics['eval_perplexity']:.2f}"
        )
        return metrics

    def close(self) -> None:
        """Close the log file."""
        if self._log is not None:
            self._log.close()


def _fetch(dataset: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids [B, S], labels [B, S] or None) for `indices`, from any supported dataset."""
    if hasattr(dataset, "get_batch"):
        batch = dataset.get_batch(indices)
        return (batch[0], batch[1]) if isinstance(batch, tuple) else (batch, None)
    items = [dataset[int(i)] for i in indices]
    first = items[0]
    if isinstance(first, dict):
        if "input_ids" not in first:
            raise DataError(f"data: dataset items are dicts without 'input_ids' (keys: {', '.join(first)})")
        input_ids = torch.stack([torch.as_tensor(it["input_ids"], dtype=torch.long) for it in items])
        labels = (
            torch.stack([torch.as_tensor(it["labels"], dtype=torch.long) for it in items])
            if "labels" in first
            else None
        )
        return input_ids, labels
    try:
        return torch.stack([torch.as_tensor(it, dtype=torch.long) for it in items]), None
    except (TypeError, RuntimeError) as exc:
        raise DataError(f"data: dataset items must be equal-length token id sequences ({exc})") from None
