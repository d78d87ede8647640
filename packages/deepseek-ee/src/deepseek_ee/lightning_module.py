"""CausalLMModule: a LightningModule around a core Transformer, trained as the CE Trainer trains it.

Same pieces as deepseek_core.training's single-device loop: AdamW over core's parameter groups (decay on
matrices only) or EE's AdaFactor, core's warmup + cosine schedule stepped once per optimizer step, core's
language-model loss (optionally chunked), gradient clipping by global norm. Lightning does the rest:
gradient accumulation (dividing each micro-batch loss by grad_accum_steps, as CE does), DDP/FSDP gradient
averaging across ranks, mixed precision, checkpoints.

After each optimizer step the module records the step's metrics (`step_metrics`): the loss averaged over
all ranks and micro-batches, the learning rate the step used, the gradient norm and the global tokens/s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from deepseek_core.training import (
    TrainingConfig,
    TrainingDivergedError,
    chunked_lm_loss,
    lm_loss,
    parameter_groups,
    warmup_cosine_scheduler,
)
from torch import nn

__all__ = ["CausalLMModule", "StepMetrics"]

FSDP_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


@dataclass
class StepMetrics:
    """What one optimizer step did (loss: mean over every rank's micro-batches of that step)."""

    step: int
    loss: float
    learning_rate: float
    grad_norm: float | None
    tokens_per_s: float
    tokens: int


class CausalLMModule(pl.LightningModule):
    """Next-token training of `transformer` (a deepseek_core Transformer or any module mapping ids to logits).

    tokens_per_step: tokens in one optimizer step over all ranks (for tokens/s).
    """

    def __init__(
        self,
        transformer: nn.Module,
        config: TrainingConfig,
        *,
        tokens_per_step: int,
        optimizer: str = "adamw",
        optimizer_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer: must be 'adamw' or 'adafactor', got {optimizer!r}")
        # Lightning keeps each module's train/eval mode; a model loaded for inference is in eval mode, which
        # would silently disable activation checkpointing (it only runs in training mode).
        self.transformer = transformer.train()
        self.config = config
        self.tokens_per_step = tokens_per_step
        self.optimizer_name = optimizer
        self.optimizer_options = dict(optimizer_options or {})
        # Parameter names of >= 2-D tensors, taken before any FSDP wrapping flattens the shapes.
        self._decay_names = {n for n, p in transformer.named_parameters() if p.dim() >= 2}
        self.step_metrics: list[StepMetrics] = []  # steps run by this process
        self.loss_history: list[tuple[int, float]] = []  # (step, loss) of the whole run, kept in checkpoints
        self.eval_history: list[tuple[int, float]] = []
        self.start_step: int | None = None  # global step this process started (or resumed) at
        self.train_started_at: float | None = None  # perf_counter() when the first step began
        self.last_eval: dict[str, float] = {}
        self._accum_loss: torch.Tensor | None = None
        self._micro_batches = 0
        self._step_loss: float | None = None
        self._step_lr = 0.0
        self._grad_norm: float | None = None
        self._last_step_time: float | None = None
        self._eval_sum: torch.Tensor | None = None
        self._eval_count: torch.Tensor | None = None

    # ------------------------------------------------------------------ model
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab]."""
        return self.transformer(input_ids)

    def _loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        chunk = self.config.loss_chunk_size
        module: Any = self.transformer
        if chunk > 0 and hasattr(module, "hidden_states") and hasattr(module, "lm_head"):
            return chunked_lm_loss(module.hidden_states(input_ids), module.lm_head.weight, labels, chunk)
        return lm_loss(module(input_ids), labels)

    # ------------------------------------------------------------------ optimizer
    def _is_fsdp(self) -> bool:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return self._trainer is not None and isinstance(self.trainer.strategy.model, FullyShardedDataParallel)

    def _groups(self, weight_decay: float) -> list[dict[str, Any]]:
        if not self._is_fsdp():
            return parameter_groups(self.transformer, weight_decay)  # exactly core's (and so CE's) groups
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, param in self.transformer.named_parameters():
            if not param.requires_grad:
                continue
            for prefix in FSDP_WRAPPER_PREFIXES:
                name = name.replace(prefix, "")
            (decay if name in self._decay_names else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self) -> Any:
        """AdamW (core's groups, warmup + cosine) or AdaFactor (its relative step, or the same schedule)."""
        cfg = self.config
        if self.optimizer_name == "adafactor":
            from .optimizers import AdaFactor

            options = dict(self.optimizer_options)
            if isinstance(options.get("eps"), list):
                options["eps"] = tuple(options["eps"])
            optimizer: torch.optim.Optimizer = AdaFactor(
                self._groups(float(options.pop("weight_decay", 0.0))), **options
            )
            if options.get("relative_step", True):
                return optimizer  # AdaFactor computes its own step size; an external schedule does not apply
        else:
            groups = self._groups(cfg.weight_decay)
            if not groups:
                raise ValueError("model: has no trainable parameters")
            on_cuda = all(p.is_cuda for g in groups for p in g["params"])
            kwargs: dict[str, Any] = {"fused": True} if on_cuda else {"foreach": True}
            optimizer = torch.optim.AdamW(
                groups,
                lr=cfg.learning_rate,
                betas=(cfg.adam_beta1, cfg.adam_beta2),
                eps=cfg.adam_eps,
                **kwargs,
            )
        scheduler = warmup_cosine_scheduler(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: Any = None,
        gradient_clip_algorithm: Any = None,
    ) -> None:
        """Clip to config.max_grad_norm (0: no clipping) and keep the global norm for the metrics."""
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        if self._is_fsdp():
            norm = self.trainer.strategy.model.clip_grad_norm_(max_norm)  # type: ignore[union-attr,operator]
        else:
            params = [p for p in self.transformer.parameters() if p.grad is not None]
            if not params:
                self._grad_norm = None
                return
            if math.isinf(max_norm):
                norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in params if p.grad is not None], foreach=True
                )
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        self._grad_norm = float(norm)

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        """Note where training (re)starts; start the clock for tokens/s."""
        self.start_step = int(self.trainer.global_step)
        self._last_step_time = self.train_started_at = time.perf_counter()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the loss curves in the Lightning checkpoint, so a resumed run plots (and logs) all of it."""
        checkpoint["deepseek_ee"] = {
            "loss_history": [list(p) for p in self.loss_history],
            "eval_history": [list(p) for p in self.eval_history],
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Undo on_save_checkpoint."""
        saved = checkpoint.get("deepseek_ee", {})
        self.loss_history = [(int(s), float(v)) for s, v in saved.get("loss_history", [])]
        self.eval_history = [(int(s), float(v)) for s, v in saved.get("eval_history", [])]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Loss of one micro-batch (Lightning divides it by grad_accum_steps before backward)."""
        loss = self._loss(batch["input_ids"], batch["labels"])
        detached = loss.detach().float()
        self._accum_loss = detached if self._accum_loss is None else self._accum_loss + detached
        self._micro_batches += 1
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Average the step's loss over micro-batches and ranks; stop before applying a non-finite step."""
        assert self._accum_loss is not None
        local = self._accum_loss / max(1, self._micro_batches)
        loss = float(self.trainer.strategy.reduce(local, reduce_op="mean"))
        self._accum_loss, self._micro_batches = None, 0
        if not math.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            raise TrainingDivergedError(self.trainer.global_step + 1, loss)
        self._step_loss = loss
        self._step_lr = float(optimizer.param_groups[0]["lr"] or 0.0)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Step (Lightning runs the closure: forward, backward, clipping), then record the step's metrics
        here, before any callback's on_train_batch_end looks at them."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._step_loss is None:  # the closure skipped the step
            return
        now = time.perf_counter()
        elapsed = max(now - (self._last_step_time or now), 1e-9)
        self._last_step_time = now
        step = int(self.trainer.global_step) + 1  # Lightning counts the step once this hook returns
        self.loss_history.append((step, self._step_loss))
        self.step_metrics.append(
            StepMetrics(
                step=step,
                loss=self._step_loss,
                learning_rate=self._step_lr,
                grad_norm=self._grad_norm,
                tokens_per_s=self.tokens_per_step / elapsed,
                tokens=step * self.tokens_per_step,
            )
        )
        self._step_loss = None
        self._grad_norm = None

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        """Reset the token-loss sums of this evaluation."""
        self._eval_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._eval_count = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Sum of token losses of the real (weight 1) sequences of the batch."""
        logits = self.transformer(batch["input_ids"])
        labels = batch["labels"]
        per_token = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).view(labels.shape)
        counted = (labels != -100).to(torch.float64) * batch["weight"].to(torch.float64)[:, None]
        assert self._eval_sum is not None and self._eval_count is not None
        self._eval_sum += (per_token.double() * counted).sum()
        self._eval_count += counted.sum()

    def on_validation_epoch_end(self) -> None:
        """Mean eval loss over every rank's tokens."""
        assert self._eval_sum is not None and self._eval_count is not None
        totals = torch.stack([self._eval_sum, self._eval_count])
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss = float(totals[0] / totals[1].clamp(min=1))
        self.last_eval = {
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 700.0)),
            "eval_tokens": float(totals[1]),
        }
        step = int(self.trainer.global_step)
        if not self.eval_history or self.eval_history[-1][0] != step:
            self.eval_history.append((step, loss))
