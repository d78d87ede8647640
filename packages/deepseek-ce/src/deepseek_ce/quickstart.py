"""The offline quickstart: train a tokenizer and a deepseek-tiny model on Python's own standard library.

No download and no GPU needed: the corpus is the running interpreter's standard-library sources, the
tokenizer is a byte-level BPE trained on them, and training runs for about `minutes` minutes, then the
script prints eval perplexity before and after, a few greedy code completions, and where the checkpoint
(loadable by transformers) and the loss curve are.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from deepseek_core.facade import Model
from deepseek_core.training import TrainingConfig, build_adamw, lm_loss, train_tokenizer

from .corpus import stdlib_dir, write_stdlib_corpus
from .trainer import Trainer

PROMPTS = ("def fibonacci(n):", "import os\n", "class Stack:", "for i in range(")
# Chosen so a ~4M-parameter model on 2 CPU cores gets a few hundred steps in two minutes.
SEQ_LEN = 128
BATCH_SIZE = 8
LEARNING_RATE = 2e-3


@dataclass
class QuickstartResult:
    """What the quickstart produced."""

    perplexity_before: float
    perplexity_after: float
    eval_loss_before: float
    eval_loss_after: float
    steps: int
    checkpoint: Path
    loss_curve: Path
    completions: dict[str, str]


def _time_train_steps(model: Model, dataset: object, steps: int = 2) -> float:
    """Seconds per training step, measured on a throw-away copy (the real model and RNG stay untouched)."""
    module = copy.deepcopy(model.module)
    module.train()
    optimizer = build_adamw(module, LEARNING_RATE)
    indices = torch.arange(BATCH_SIZE)
    input_ids, labels = dataset.get_batch(indices)  # type: ignore[attr-defined]
    timings = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(steps + 1):
            start = time.perf_counter()
            lm_loss(module(input_ids), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            timings.append(time.perf_counter() - start)
    del module, optimizer
    return sorted(timings[1:])[len(timings[1:]) // 2]  # the first step warms up; take the median of the rest


def _pick_cpu_threads(model: Model, dataset: object) -> tuple[int, float]:
    """(threads, seconds per step): all cores, unless one thread is faster.

    On a CPU shared with other busy processes, OpenMP threads that wait on each other can make a multi-threaded
    step many times slower than a single-threaded one; measuring both avoids that trap.
    """
    threads = torch.get_num_threads()
    step_s = _time_train_steps(model, dataset)
    if torch.cuda.is_available() or threads == 1:
        return threads, step_s
    torch.set_num_threads(1)
    single_s = _time_train_steps(model, dataset)
    if single_s < 0.9 * step_s:
        return 1, single_s
    torch.set_num_threads(threads)
    return threads, step_s


def run_quickstart(
    output_dir: str | os.PathLike[str] = "quickstart-output",
    minutes: float = 2.0,
    max_steps: int | None = None,
    corpus_mb: float = 4.0,
    vocab_size: int = 4096,
    seed: int = 0,
    progress_bar: bool = True,
    echo: Callable[[str], None] = print,
) -> QuickstartResult:
    """Run the quickstart end to end (see the module docstring); `max_steps` replaces the time budget."""
    if not minutes > 0:
        raise ValueError(f"minutes: must be > 0, got {minutes}")
    if corpus_mb <= 0:
        raise ValueError(f"corpus_mb: must be > 0, got {corpus_mb}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("checkpoint-*"):  # a fresh run each time: old checkpoints would be resumed
        shutil.rmtree(stale, ignore_errors=True)
    (out / "train.log").unlink(missing_ok=True)
    threads = torch.get_num_threads()
    device = "cuda" if torch.cuda.is_available() else f"cpu, {threads} thread{'s' if threads != 1 else ''}"
    echo(f"DeepSeek CE quickstart: offline, on this machine ({device})")

    corpus, files, chars = write_stdlib_corpus(out / "data" / "stdlib.jsonl", int(corpus_mb * 1_000_000))
    echo(f"[1/5] corpus: {files} standard-library files, {chars / 1e6:.1f} M characters from {stdlib_dir()}")

    start = time.perf_counter()
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size, output_dir=out / "tokenizer")
    echo(
        f"[2/5] tokenizer: byte-level BPE, {tokenizer.vocab_size:,} tokens, trained in "
        f"{time.perf_counter() - start:.1f} s -> {out / 'tokenizer'}"
    )

    model = Model.from_config("deepseek-tiny", tokenizer=tokenizer, seed=seed)
    echo(f"[3/5] model: deepseek-tiny, {model.num_parameters() / 1e6:.1f}M parameters, random init")

    config = TrainingConfig(
        max_steps=max_steps or 1,
        batch_size=BATCH_SIZE,
        seq_len=SEQ_LEN,
        learning_rate=LEARNING_RATE,
        warmup_steps=0,
        seed=seed,
        eval_steps=5,
        eval_fraction=0.05,
        keep_last=1,
        progress_bar=progress_bar,
    )
    trainer: Trainer = Trainer(model, corpus, config=config, output_dir=out, cache_dir=out / "cache")
    budget_s = minutes * 60.0
    fixed_steps = max_steps is not None
    all_threads = torch.get_num_threads()
    threads, step_s = _pick_cpu_threads(model, trainer.train_dataset)
    if threads < all_threads:
        echo(f"      the CPU is busy: 1 thread trains faster here than {all_threads}; using 1")
    eval_start = time.perf_counter()
    before = trainer.evaluate()
    eval_s = time.perf_counter() - eval_start
    if max_steps is None:
        # The budget pays for the steps plus 2 evaluations (half-way and at the end); 5 % spare.
        max_steps = max(10, int((budget_s * 0.95 - 2 * eval_s) / step_s))
    trainer.config = config.replace(
        max_steps=max_steps,
        warmup_steps=max(1, max_steps // 20),
        eval_every=max(1, max_steps // 2),
        save_every=max(1, max_steps // 2),
        log_every=max(1, max_steps // 20),
        # A time-based run stops hard in case the machine turns slower than measured; a fixed step count does not.
        max_time_s=None if fixed_steps else budget_s * 1.1,
    )
    plan = f"{max_steps} steps" if fixed_steps else f"~{minutes:g} min: {max_steps} steps"
    echo(
        f"[4/5] training for {plan} of {BATCH_SIZE} x {SEQ_LEN} tokens "
        f"({len(trainer.train_dataset):,} training sequences); eval perplexity now {before['eval_perplexity']:,.1f}"
    )
    result = trainer.fit(resume=False)
    trainer.close()
    if result.eval_loss is None or result.eval_perplexity is None or result.checkpoint is None:
        raise RuntimeError("quickstart: training ended without an evaluation or a checkpoint")

    completions: dict[str, str] = {}
    for prompt in PROMPTS:
        # Greedy, with a mild repetition penalty: a model this small loops on its favourite token otherwise.
        completions[prompt] = str(
            model.generate(prompt, max_new_tokens=40, temperature=0.0, repetition_penalty=1.2)
        )
    echo("[5/5] results")
    echo(
        f"  eval perplexity: {before['eval_perplexity']:,.1f} before -> {result.eval_perplexity:,.1f} after "
        f"{result.steps} steps (loss {before['eval_loss']:.3f} -> {result.eval_loss:.3f} nats/token, "
        f"{result.tokens_per_s:,.0f} tokens/s)"
    )
    echo("  greedy completions (repetition penalty 1.2):")
    for prompt, text in completions.items():
        lines = [line for line in (prompt + text).split("\n") if line.strip()][:6]
        echo("    >>> " + "\n        ".join(lines))
    echo(f"  checkpoint: {result.checkpoint}  (Model.from_pretrained or transformers' AutoModelForCausalLM)")
    echo(f"  loss curve: {result.loss_curve}")
    echo(f"  log:        {result.log_file}")
    return QuickstartResult(
        perplexity_before=before["eval_perplexity"],
        perplexity_after=result.eval_perplexity,
        eval_loss_before=before["eval_loss"],
        eval_loss_after=result.eval_loss,
        steps=result.steps,
        checkpoint=result.checkpoint,
        loss_curve=result.loss_curve if result.loss_curve is not None else out / "loss_curve.png",
        completions=completions,
    )
