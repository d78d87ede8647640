"""A training script for the distributed tests: every process of a job runs it (Lightning's launcher re-runs
it for the extra local ranks; the tests start one copy per "node" with NODE_RANK set).

It trains a small Transformer on a fixed random token stream with DistributedTrainer and saves this rank's
final weights to <out>/weights-rank<R>.pt, and its progress to <out>/progress-rank<R>.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from deepseek_core import ModelConfig, Transformer
from deepseek_core.training import PackedTokens, TrainingConfig
from deepseek_ee import DistributedTrainer

VOCAB = 256
SEQ_LEN = 16


def tiny_model(seed: int = 0) -> Transformer:
    """The same initial weights in every process."""
    config = ModelConfig.from_preset(
        "deepseek-tiny", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Transformer(config)


def token_dataset(num_sequences: int = 64, seed: int = 1) -> PackedTokens:
    """A fixed, learnable token stream (repeating patterns plus noise)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.arange(num_sequences * SEQ_LEN + 1) % 17
    noise = torch.randint(0, VOCAB, base.shape, generator=generator)
    stream = torch.where(torch.rand(base.shape, generator=generator) < 0.3, noise, base).to(torch.int32)
    return PackedTokens(stream, SEQ_LEN)


def training_config(args: argparse.Namespace) -> TrainingConfig:
    """The hyper-parameters the tests compare runs with."""
    return TrainingConfig(
        max_steps=args.max_steps, batch_size=args.batch_size, seq_len=SEQ_LEN, learning_rate=1e-3, warmup_steps=2,
        grad_accum_steps=args.grad_accum, save_every=args.save_every, keep_last=2, eval_every=args.eval_every, log_every=2,
        seed=7, progress_bar=False, max_grad_norm=1.0,
    )  # fmt: skip


class _Progress(pl.Callback):
    """Writes the step reached (and optionally slows each step so a test can act mid-run)."""

    def __init__(self, path_pattern: str, delay_s: float) -> None:
        self.path_pattern = path_pattern
        self.delay_s = delay_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        Path(self.path_pattern.format(rank=trainer.global_rank)).write_text(f"{trainer.global_step}\n")
        if self.delay_s:
            time.sleep(self.delay_s)


def build_parser() -> argparse.ArgumentParser:
    """The driver's options."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--peer-timeout", type=float, default=20.0)
    parser.add_argument("--collective-timeout", type=float, default=60.0)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--eval", action="store_true", help="evaluate on 10 held-out sequences")
    parser.add_argument("--eval-every", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the options, train, save this rank's weights."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    tracking = {"tracking_uri": args.tracking_uri, "experiment": "ddp-test"} if args.tracking_uri else None
    trainer = DistributedTrainer(
        model=tiny_model(), train_data=token_dataset(), config=training_config(args), output_dir=out,
        eval_data=token_dataset(num_sequences=10, seed=9) if args.eval else None,
        num_nodes=args.num_nodes, gpus_per_node=args.gpus_per_node, strategy=args.strategy, accelerator="cpu",
        tracking=tracking, collective_timeout_s=args.collective_timeout, peer_timeout_s=args.peer_timeout,
        callbacks=[_Progress(str(out / "progress-rank{rank}.txt"), args.step_delay)], echo=True,
    )  # fmt: skip
    result = trainer.fit(resume=not args.no_resume)
    weights = {k: v.detach().cpu().clone() for k, v in trainer.module.state_dict().items()}
    record = {
        "weights": weights,
        "steps": result.steps,
        "world_size": result.world_size,
        "eval_loss": result.eval_loss,
    }
    torch.save(record, out / f"weights-rank{result.global_rank}.pt")
    print(f"rank {result.global_rank}: done at step {result.steps}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
