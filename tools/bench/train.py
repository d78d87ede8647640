"""Training throughput: the CE Trainer against a hand-written plain PyTorch loop, side by side in one run.

Both train the same model (same initial weights), on the same batches (batch x seq tokens), in the same
precision, with AdamW + warmup/cosine + gradient clipping and a loss.item() per step (what any loop logs).
The Trainer's figure is its own training-step throughput (TrainResult.tokens_per_s: evaluation and checkpoint
writing excluded, everything else of its loop included). Rounds alternate between the two so machine noise
hits both alike; medians are reported. Goal: Trainer >= 0.95x the plain loop.

Model FLOPs utilization (MFU) uses 6 * (matmul parameters) + 12 * layers * seq * attention width FLOPs per
token (the PaLM formula), against this machine's measured peak for the dtype (a large matmul).

    python tools/bench/train.py [--preset deepseek-tiny] [--batch 8 --seq 256] [--steps 20 --rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import flops_per_token, machine_summary, measured_peak_flops, print_table  # noqa: E402
from deepseek_ce import Trainer, TrainingConfig  # noqa: E402
from deepseek_core import ModelConfig, Transformer  # noqa: E402
from deepseek_core.training import PackedTokens, lm_loss  # noqa: E402


def plain_loop(
    model: Transformer,
    data: PackedTokens,
    order: list[torch.Tensor],
    cfg: TrainingConfig,
    device: torch.device,
) -> float:
    """The baseline: the loop one writes by hand. Returns tokens/s over all steps."""
    model.to(device).train()
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        **fused,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps))
    )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.precision == "bf16"
        else contextlib.nullcontext()
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for indices in order:
        input_ids, labels = data.get_batch(indices)
        input_ids, labels = input_ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            loss = lm_loss(model(input_ids), labels)
        loss.backward()
        loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return len(order) * cfg.batch_size * cfg.seq_len / elapsed


def trainer_run(model: Transformer, data: PackedTokens, cfg: TrainingConfig, device: torch.device) -> float:
    """The CE Trainer on the same model and data; returns its training-step tokens/s."""
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, data, config=cfg, output_dir=out, device=device, echo=False)
        result = trainer.fit(resume=False)
        trainer.close()
    return result.tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default=None, help="default: deepseek-134m on a GPU, deepseek-tiny on CPU"
    )
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    preset = args.preset or ("deepseek-134m" if gpu else "deepseek-tiny")
    batch = args.batch or (16 if gpu else 8)
    seq = args.seq or (1024 if gpu else 256)
    steps = args.steps or (30 if gpu else 12)
    precision = args.precision or ("bf16" if gpu else "fp32")
    print(f"machine: {machine_summary()}")
    print(
        f"model {preset}, batch {batch} x seq {seq}, {precision}, {steps} steps x {args.rounds} rounds per side"
    )

    config = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    initial = Transformer(config)
    stream = torch.randint(0, config.vocab_size, (batch * seq * (steps + 2) + 1,), dtype=torch.int32)
    data = PackedTokens(stream, seq)
    cfg = TrainingConfig(
        max_steps=steps,
        batch_size=batch,
        seq_len=seq,
        warmup_steps=5,
        eval_every=0,
        save_every=0,
        eval_fraction=0.0,
        log_every=max(1, steps // 2),
        precision=precision,
        seed=0,
        progress_bar=False,
        keep_last=1,
    )
    # The plain loop reads the very batches the Trainer's seeded order would.
    from deepseek_core.training import BatchOrder

    sampler = BatchOrder(len(data), batch, seed=cfg.seed)
    order = [sampler.next_batch() for _ in range(steps)]

    # Warm both paths once (allocator, kernels, lazy imports), untimed.
    warm = cfg.replace(max_steps=2)
    plain_loop(copy.deepcopy(initial), data, order[:2], warm, device)
    trainer_run(copy.deepcopy(initial), data, warm, device)

    plain, ours = [], []
    for _ in range(args.rounds):
        plain.append(plain_loop(copy.deepcopy(initial), data, order, cfg, device))
        ours.append(trainer_run(copy.deepcopy(initial), data, cfg, device))
    plain_tps, ours_tps = statistics.median(plain), statistics.median(ours)

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = measured_peak_flops(device, dtype, 8192 if gpu else 2048)
    per_token = flops_per_token(initial, seq)
    rows = [
        {
            "loop": name,
            "tokens/s": f"{tps:,.0f}",
            "rounds": " ".join(f"{t:,.0f}" for t in samples),
            "TFLOP/s": f"{tps * per_token / 1e12:.3f}",
            "MFU": f"{tps * per_token / peak:.1%}",
        }
        for name, tps, samples in (
            ("plain PyTorch", plain_tps, plain),
            ("deepseek-ce Trainer", ours_tps, ours),
        )
    ]
    print_table(rows)
    print(
        f"measured {dtype} matmul peak: {peak / 1e12:.3f} TFLOP/s; model FLOPs/token: {per_token / 1e6:.1f} M"
    )
    ratio = ours_tps / plain_tps
    print(
        f"Trainer / plain loop: {ratio:.3f}x (goal >= 0.95x) -> {'PASS' if ratio >= 0.95 else 'BELOW GOAL'}"
    )


if __name__ == "__main__":
    main()
