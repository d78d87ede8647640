"""The `deepseek-ce` console command: quickstart | train | generate | chat | serve | info."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepseek_core.argtypes import positive_float, positive_int

PROG = "deepseek-ce"


# TrainingConfig fields settable from `train`: (option, field, type, help)
_TRAIN_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--max-steps", "max_steps", int, "optimizer steps"),
    ("--batch-size", "batch_size", int, "sequences per micro-batch"),
    ("--seq-len", "seq_len", int, "tokens per sequence"),
    ("--lr", "learning_rate", float, "peak learning rate"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (matrices only)"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--min-lr-ratio", "min_lr_ratio", float, "final learning rate as a fraction of the peak"),
    ("--grad-accum-steps", "grad_accum_steps", int, "micro-batches per optimizer step"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm (0: off)"),
    ("--eval-every", "eval_every", int, "evaluate every N steps (0: only at the end)"),
    ("--eval-steps", "eval_steps", int, "eval batches (0: the whole eval set)"),
    ("--save-every", "save_every", int, "checkpoint every N steps (0: only at the end)"),
    ("--keep-last", "keep_last", int, "checkpoints to keep (0: all)"),
    ("--seed", "seed", int, "random seed"),
    ("--precision", "precision", str, "auto | bf16 | fp32"),
    ("--eval-fraction", "eval_fraction", float, "share of the data held out for evaluation"),
    ("--text-field", "text_field", str, "text field of .jsonl / column of .parquet"),
    ("--log-every", "log_every", int, "log every N steps"),
    ("--max-time-s", "max_time_s", float, "stop (and checkpoint) after this many seconds"),
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `deepseek-ce`."""
    parser = argparse.ArgumentParser(prog=PROG, description="DeepSeek Community Edition")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    quick = sub.add_parser(
        "quickstart", help="train a tokenizer and a tiny model on Python's stdlib, offline"
    )
    quick.add_argument(
        "--output-dir",
        default="quickstart-output",
        help="where everything goes (default ./quickstart-output)",
    )
    quick.add_argument(
        "--minutes",
        type=positive_float,
        default=2.0,
        help="training time budget (default 2; fractions allowed)",
    )
    quick.add_argument(
        "--max-steps", type=positive_int, default=None, help="train exactly this many steps instead"
    )
    quick.add_argument(
        "--corpus-mb", type=positive_float, default=4.0, help="megabytes of stdlib source to use (default 4)"
    )
    quick.add_argument(
        "--vocab-size", type=positive_int, default=4096, help="tokenizer vocabulary (default 4096)"
    )
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--no-progress", action="store_true", help="no progress bar")

    train = sub.add_parser(
        "train", help="train a model on one .txt/.jsonl/.parquet file (resumes automatically)"
    )
    train.add_argument("--data", required=True, help="training data file")
    train.add_argument("--eval-data", default=None, help="eval data file (default: hold out --eval-fraction)")
    source = train.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help="start from a random preset (default deepseek-tiny)")
    source.add_argument("--model", default=None, help="start from a checkpoint directory or model id")
    train.add_argument(
        "--tokenizer", default=None, help="tokenizer directory (default: the model's, else train one)"
    )
    train.add_argument(
        "--vocab-size", type=positive_int, default=4096, help="vocabulary of a newly trained tokenizer"
    )
    train.add_argument("--output-dir", default="deepseek-ce-run", help="checkpoints, logs and loss curve")
    train.add_argument(
        "--no-resume", action="store_true", help="start afresh even if output-dir has checkpoints"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    for option, field, kind, text in _TRAIN_OPTIONS:
        train.add_argument(option, dest=field, type=kind, default=None, help=text)

    gen = sub.add_parser("generate", help="continue a prompt")
    gen.add_argument("--model", required=True, help="checkpoint directory or model id")
    gen.add_argument("prompt", help="the text to continue")
    _add_sampling(gen, default_tokens=64)
    gen.add_argument(
        "--max-length", type=positive_int, default=None, help="prompt + new tokens (as in transformers)"
    )
    gen.add_argument("--no-stream", action="store_true", help="print the whole text at the end")

    chat = sub.add_parser("chat", help="interactive chat on stdin (/exit to quit, /reset to forget)")
    chat.add_argument("--model", required=True, help="checkpoint directory or model id")
    _add_sampling(chat, default_tokens=256)

    serve = sub.add_parser("serve", help="the OpenAI-compatible server (deepseek-core serve)", add_help=False)
    serve.add_argument("serve_args", nargs=argparse.REMAINDER, help="arguments of deepseek-core serve")

    info = sub.add_parser("info", help="parameters and memory of a preset or checkpoint")
    info.add_argument("target", help="preset name or checkpoint directory")
    return parser


def _add_sampling(parser: argparse.ArgumentParser, default_tokens: int) -> None:
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=None, help=f"new tokens (default {default_tokens})"
    )
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=None)
    parser.set_defaults(default_tokens=default_tokens)


# ---------------------------------------------------------------------------------------------- commands
def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(
        output_dir=args.output_dir,
        minutes=args.minutes,
        max_steps=args.max_steps,
        corpus_mb=args.corpus_mb,
        vocab_size=args.vocab_size,
        seed=args.seed,
        progress_bar=not args.no_progress,
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from deepseek_core import Tokenizer
    from deepseek_core.facade import Model
    from deepseek_core.training import TrainingConfig, check_data_file, train_tokenizer

    from .trainer import Trainer

    overrides = {f: getattr(args, f) for _, f, _, _ in _TRAIN_OPTIONS if getattr(args, f) is not None}
    overrides["progress_bar"] = not args.no_progress
    config = TrainingConfig(**overrides)
    data = check_data_file(args.data)
    output_dir = Path(args.output_dir)
    if args.model:
        model = Model.from_pretrained(args.model)
        if args.tokenizer:
            model.tokenizer = Tokenizer.from_pretrained(args.tokenizer)
        if model.tokenizer is None:
            raise ValueError(f"--model {args.model}: has no tokenizer.json; pass --tokenizer DIR")
    else:
        saved = output_dir / "tokenizer"
        if args.tokenizer:
            tokenizer = Tokenizer.from_pretrained(args.tokenizer)
        elif (saved / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_pretrained(saved)  # a resumed run keeps the tokenizer it started with
        else:
            print(f"training a byte-level BPE tokenizer ({args.vocab_size} tokens) on {data} ...", flush=True)
            tokenizer = train_tokenizer(
                data, vocab_size=args.vocab_size, output_dir=saved, text_field=config.text_field
            )
        model = Model.from_config(args.preset or "deepseek-tiny", tokenizer=tokenizer, seed=config.seed)
    trainer = Trainer(model, data, eval_data=args.eval_data, config=config, output_dir=output_dir)
    result = trainer.fit(resume=not args.no_resume)
    trainer.close()
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(result).items()}
    print("result: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}


def cmd_generate(args: argparse.Namespace) -> int:
    from deepseek_core.facade import Model

    model = Model.from_pretrained(args.model)
    max_new = args.max_new_tokens if args.max_new_tokens or args.max_length else args.default_tokens
    kwargs = {"max_new_tokens": max_new, "max_length": args.max_length, **_sampling(args)}
    if args.no_stream:
        print(args.prompt + str(model.generate(args.prompt, **kwargs)))
        return 0
    sys.stdout.write(args.prompt)
    for piece in model.generate(args.prompt, stream=True, **kwargs):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from deepseek_core.facade import Model

    model = Model.from_pretrained(args.model)
    max_new = args.max_new_tokens or args.default_tokens
    print(
        f"chatting with {args.model} ({model.num_parameters() / 1e6:.1f}M parameters); /exit to quit, /reset to forget"
    )
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": text})
        sys.stdout.write("assistant> ")
        pieces = []
        for piece in model.chat(history, max_new_tokens=max_new, stream=True, **_sampling(args)):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from deepseek_core.cli import main as core_main  # the server lives in core; imported only when needed

    return int(core_main(["serve", *args.serve_args], prog=PROG) or 0)


def cmd_info(args: argparse.Namespace) -> int:
    from deepseek_core import ModelConfig, preset_names

    target = args.target
    if Path(target).is_dir():
        config = ModelConfig.from_pretrained(target)
    elif target in preset_names():
        config = ModelConfig.from_preset(target)
    else:
        raise ValueError(
            f"{target!r}: neither a checkpoint directory nor a preset ({', '.join(preset_names())})"
        )
    kind = config.model_type + (" (MLA)" if config.is_mla else "") + (" (MoE)" if config.is_moe else "")
    print(f"{target}: {kind}")
    count = config.param_count()
    short = f"{count / 1e9:,.1f}B" if count >= 1e9 else f"{count / 1e6:,.1f}M"
    print(f"  parameters:  {count:,} ({short})")
    print(
        f"  layers:      {config.num_hidden_layers}, hidden {config.hidden_size}, heads {config.num_attention_heads}"
    )
    print(f"  vocabulary:  {config.vocab_size:,} tokens; context {config.max_position_embeddings:,} tokens")
    print("  weights:")
    for dtype, size in config.memory_table().items():
        print(f"    {dtype:<9} {_human(size)}")
    print(f"  KV cache:    {_human(config.kv_cache_bytes_per_token('bfloat16'))} per token (bfloat16)")
    return 0


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:,.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size} B"  # pragma: no cover


COMMANDS = {
    "quickstart": cmd_quickstart,
    "train": cmd_train,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "info": cmd_info,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `deepseek-ce`; returns the exit status (2 for bad input, with a one-line error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["serve"]:  # everything after `serve` belongs to deepseek-core serve, --help included
        args = argparse.Namespace(command="serve", serve_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except FloatingPointError as exc:  # TrainingDivergedError: the loss stopped being finite
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
